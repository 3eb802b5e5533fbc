#!/usr/bin/env python3
"""Kernel census of a training step from ncu's raw CSV (issue 10; experiments/gpu/kernel_census.sh).

    python3 analysis/kernel_census.py NCU_CSV [--steps 4] [--bench BENCH_TXT] [--name A] [--top 25]
                                      [--torch TORCH_PROFILE_TXT]

NCU_CSV: the output of `ncu --metrics gpu__time_duration.sum --csv --page raw --print-units base
moelab bench ...`, whose lines mix the program's own output with ncu's rows; only the rows whose
duration field is a number count. ncu runs kernels one at a time, so each duration is the
kernel alone, with no host in the way: the sum over a step is the GPU-bound floor of that step.
BENCH_TXT: `moelab bench` output of the same config in the same call; its wall step (median)
is printed beside the floor. Standard library only: it runs on the GPU machine as it is.

TORCH_PROFILE_TXT: output of `torch_moe.py --config X --compile --profile N` (experiments/bench)
for the same config; its family table is set beside moelab's in four groups (GEMMs, attention,
optimizer, everything else: torch's Triton fusions mix the rest). The two come from different
runs, so the table says where the time goes, not a same-call ratio.

Prints markdown: kernels per step and GPU microseconds per step, by family and by kernel.
Kernels that only a run's start launches (INIT: the weights drawn on the device, fill_normal) are
left out of the per-step sums and reported once: dividing them over the profiled steps made
config A's elementwise family 0.30 ms a step too large (ninth session). The casts that write the
first bf16 compute copy cannot be told from a step's casts by name and stay in.
"""
import argparse
import csv
import re
import sys

# Families, first match wins (kernel names are demangled C++ or cuBLAS's internal names).
FAMILIES = [
    ("expert/dense GEMMs (cuBLAS)", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
    ("attention (flash)", r"flash|attn"),
    ("optimizer (AdamW)", r"adamw"),
    ("norm (sum of squares)", r"sumsq|device_sum|sum_squares"),
    ("router (softmax, top-k, losses, stats)", r"topk|softmax|router|zloss|z_loss|aux|gates|cv2|stats|logsumexp"),
    ("permute / un-permute / dispatch", r"permute|dispatch|scatter|gather|count|offsets|sort|scan|histogram"),
    ("SwiGLU", r"swiglu"),
    ("RMSNorm", r"rmsnorm|rms_"),
    ("RoPE", r"rope"),
    ("cross-entropy", r"ce_fwd|ce_bwd|cross_entropy"),
    ("embedding", r"embed"),
    ("elementwise (fill, cast, axpy, scale, copy)", r"fill|cast|axpy|mul_|scale|copy|add_|memset"),
]


# Kernels only the start of a run launches (Backend::fill_normal: model and MoE-layer init).
INIT = r"fill_normal"


def split_init(rows):
    """(the steps' rows, the run start's rows): INIT kernels go to the second list."""
    steps, init = [], []
    for name, ns in rows:
        (init if re.search(INIT, name.lower()) else steps).append((name, ns))
    return steps, init


def short_name(name):
    """The kernel's name without its template arguments and parameter list."""
    depth, out = 0, []
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    s = "".join(out).strip()
    s = re.sub(r"^(void|static)\s+", "", s)
    s = re.sub(r"^.*::", "", s)
    return s or name[:60]


def family(name):
    low = name.lower()
    for fam, pat in FAMILIES:
        if re.search(pat, low):
            return fam
    return "other"


def read_rows(path):
    """(kernel name, ns) for every kernel row of ncu's raw CSV."""
    with open(path, newline="", errors="replace") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rows = list(csv.reader(lines))
    if not rows:
        return []
    header = rows[0]
    try:
        k_name = header.index("Kernel Name")
        k_time = header.index("gpu__time_duration.sum")
    except ValueError:
        raise SystemExit(f"{path}: no 'Kernel Name' / 'gpu__time_duration.sum' columns in ncu's header")
    out = []
    for r in rows[1:]:
        if len(r) <= max(k_name, k_time):
            continue
        try:
            ns = float(r[k_time].replace(",", ""))
        except ValueError:
            continue  # the units row
        out.append((r[k_name], ns))
    return out


def bench_step_ms(path):
    """The median wall step (ms) of `moelab bench`: the 4th number after the token count."""
    with open(path, errors="replace") as f:
        for ln in f:
            parts = ln.split()
            if len(parts) >= 9 and parts[1] == "cuda":
                try:
                    return float(parts[7])
                except ValueError:
                    pass
    return None


def census(rows, steps, top=25):
    """Markdown tables: per family and per kernel, count and microseconds per step."""
    fam_n, fam_us, k_n, k_us, k_fam = {}, {}, {}, {}, {}
    for name, ns in rows:
        fam = family(name)
        key = short_name(name)
        fam_n[fam] = fam_n.get(fam, 0) + 1
        fam_us[fam] = fam_us.get(fam, 0.0) + ns / 1e3
        k_n[key] = k_n.get(key, 0) + 1
        k_us[key] = k_us.get(key, 0.0) + ns / 1e3
        k_fam[key] = fam
    total_us = sum(fam_us.values()) / steps
    total_n = sum(fam_n.values()) / steps
    lines = ["| family | kernels / step | GPU us / step | share |", "|---|---|---|---|"]
    for fam in sorted(fam_us, key=lambda f: -fam_us[f]):
        us = fam_us[fam] / steps
        lines.append(f"| {fam} | {fam_n[fam] / steps:.1f} | {us:.0f} | {100 * us / total_us:.1f}% |")
    lines.append(f"| **all** | {total_n:.1f} | {total_us:.0f} | |")
    lines += ["", f"Top {top} kernels:", "", "| kernel | family | calls / step | us / step | us / call |",
              "|---|---|---|---|---|"]
    for key in sorted(k_us, key=lambda k: -k_us[k])[:top]:
        lines.append(f"| `{key[:70]}` | {k_fam[key]} | {k_n[key] / steps:.1f} | {k_us[key] / steps:.0f} | "
                     f"{k_us[key] / k_n[key]:.1f} |")
    return total_us, total_n, "\n".join(lines)


# moelab's census families and torch_moe.py --profile's families, in the groups both can show.
GROUPS = ["GEMMs", "attention", "optimizer", "everything else"]
MOELAB_GROUP = {"expert/dense GEMMs (cuBLAS)": "GEMMs", "attention (flash)": "attention",
                "optimizer (AdamW)": "optimizer"}
TORCH_GROUP = {"GEMMs": "GEMMs", "attention": "attention", "optimizer": "optimizer"}


def family_us(rows, steps):
    """Microseconds per step by census family."""
    out = {}
    for name, ns in rows:
        fam = family(name)
        out[fam] = out.get(fam, 0.0) + ns / 1e3 / steps
    return out


def read_torch_profile(path):
    """{family: us per step} from the family table that torch_moe.py --profile prints."""
    out, in_table = {}, False
    with open(path, errors="replace") as f:
        for ln in f:
            ln = ln.strip()
            if ln.startswith("profile:"):
                in_table, out = True, {}  # the last profile of the file counts
                continue
            if not in_table or not ln.startswith("|"):
                continue
            cells = [c.strip() for c in ln.strip("|").split("|")]
            if cells[0] == "kernel":
                in_table = False  # the per-kernel table follows the family table
                continue
            if len(cells) != 4 or cells[0] in ("family", "") or cells[0].startswith("---"):
                continue
            try:
                out[cells[0]] = float(cells[2])
            except ValueError:
                continue
    return out


def against_torch(moelab_fam_us, torch_fam_us):
    """Markdown: moelab's and torch's kernel microseconds per step in GROUPS."""
    def grouped(fam_us, mapping):
        g = dict.fromkeys(GROUPS, 0.0)
        for fam, us in fam_us.items():
            g[mapping.get(fam, "everything else")] += us
        return g
    m, t = grouped(moelab_fam_us, MOELAB_GROUP), grouped(torch_fam_us, TORCH_GROUP)
    lines = ["| group | moelab us / step | torch.compile us / step | moelab - torch |", "|---|---|---|---|"]
    for grp in GROUPS + ["all kernels"]:
        a = sum(m.values()) if grp == "all kernels" else m[grp]
        b = sum(t.values()) if grp == "all kernels" else t[grp]
        lines.append(f"| {grp} | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--steps", type=float, default=4.0, help="training steps in the profiled run")
    ap.add_argument("--bench", help="moelab bench output of the same config (wall step)")
    ap.add_argument("--name", default="")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--torch", help="torch_moe.py --compile --profile N output of the same config")
    a = ap.parse_args(argv)
    if a.steps <= 0:
        ap.error("--steps must be > 0")
    rows, init = split_init(read_rows(a.csv))
    if not rows:
        print(f"## {a.name}: no kernel rows of a training step in {a.csv} (did ncu run?)\n")
        return 1
    total_us, total_n, table = census(rows, a.steps, a.top)
    print(f"## Kernel census {a.name}\n")
    wall = bench_step_ms(a.bench) if a.bench else None
    head = f"{total_n:.0f} kernels and {total_us / 1e3:.2f} ms of kernel time per step (each kernel alone, ncu)"
    if wall:
        head += (f"; wall step {wall:.2f} ms (moelab bench, same call): the GPU is busy "
                 f"{100 * total_us / 1e3 / wall:.0f}% of the step")
    print(head + ".\n")
    if init:
        print(f"Left out, launched once at the run's start: {len(init)} weight-init kernels (fill_normal), "
              f"{sum(ns for _, ns in init) / 1e6:.2f} ms in all.\n")
    print(table + "\n")
    if a.torch:
        torch_fam = read_torch_profile(a.torch)
        if not torch_fam:
            print(f"No family table in {a.torch} (did torch_moe.py run with --profile?)\n")
            return 1
        print("Against torch.compile's kernels (torch_moe.py --profile; another run, so not a ratio):\n")
        print(against_torch(family_us(rows, a.steps), torch_fam) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
