#!/usr/bin/env python3
"""The benchmark shapes of issue 10, written once, for both sides of the comparison.

moelab reads a config as `--set section.key=value` overrides; the PyTorch model
(torch_moe.py) reads the same dictionaries. Keys are moelab's own config keys, so
`moelab_args(NAME)` is the exact command-line tail that `moelab bench` gets.

Pure Python (no torch): compare.sh calls it on the GPU machine, and `report` can be run
anywhere on the raw outputs that compare.sh wrote.

  bench_configs.py names                 the model configs, in table order
  bench_configs.py moe-names             the MoE-layer shapes
  bench_configs.py moelab-args NAME      "--set model.layers=4 --set ..." for `moelab bench`
  bench_configs.py moe-moelab-args NAME  the same for the (future) `moelab bench moe-layer`
  bench_configs.py describe              one line per config: shape, parameters, FLOPs per token
  bench_configs.py report DIR [DIR ...]  the markdown tables from compare.sh's raw outputs
  bench_configs.py roofline              the floor of each config's step: its model FLOPs at the
                                         measured GEMM peak plus the optimizer's bytes at HBM speed

Router settings not listed below are moelab's defaults, which are the only ones the PyTorch
model implements: router.score = softmax, router.policy = topk, router.normalize = true
(top-k gates renormalised), router.noise = none, router.capacity_factor = 0 (dropless),
model.expert_dropout = 0, router.importance_weight = router.load_weight = 0.
"""
import json
import os
import re
import sys
import tarfile

# moelab's defaults for every key read here (core/io/config.h, core/moe/config.h, core/model.h).
MOELAB_DEFAULTS = {
    "model.vocab": 256,
    "model.d_model": 64,
    "model.layers": 2,
    "model.heads": 4,
    "model.kv_heads": 0,          # 0 = same as heads
    "model.experts": 8,
    "model.d_expert": 128,
    "model.top_k": 2,
    "model.moe_every": 2,         # block i is MoE when i % moe_every == moe_every - 1
    "model.d_ff": 0,              # dense FFN width; 0 = top_k * d_expert
    "model.shared_experts": 0,
    "model.shared_gate": False,
    "model.tie_embeddings": True,
    "model.init_scale": 1.0,
    "router.aux_alpha": 0.0,
    "router.z_loss": 0.0,
    "router.normalize": True,
    "router.score_scale": 1.0,
    "train.batch": 8,
    "train.seq": 64,
    "train.seed": 1234,
}

# Not config keys in moelab (LMConfig defaults in core/model.h); the PyTorch model uses the same.
ROPE_THETA = 10000.0
NORM_EPS = 1e-5

# Settings shared by every benchmark config. moe_every = 1: every block is an MoE block (with
# moelab's default of 2 the one-layer config C would have no MoE block at all). The router
# losses are on, on both sides, so that their forward and backward are in the timed step.
COMMON = {
    "model.vocab": 256,
    "model.moe_every": 1,
    "model.tie_embeddings": True,
    "router.aux_alpha": 0.01,
    "router.z_loss": 0.001,
}


def _cfg(layers, d, heads, kv, experts, d_expert, top_k, batch, seq):
    c = dict(COMMON)
    c.update({"model.layers": layers, "model.d_model": d, "model.heads": heads,
              "model.kv_heads": kv, "model.experts": experts, "model.d_expert": d_expert,
              "model.top_k": top_k, "train.batch": batch, "train.seq": seq})
    return c


# A-D: the table of issue 10. E and F: shapes of our own (every config has 16384 tokens a step):
#   E  many narrow experts, top-8 of 128 (Qwen3-MoE-like: d 2048, 128 x 512, GQA 16/4 heads),
#      2 layers, 8 sequences of 2048. Expert weights: 2 x 128 x 3 x 2048 x 512 = 805M parameters.
#   F  a long sequence on the B model: 4 sequences of 4096 tokens.
CONFIGS = {
    "A": _cfg(4, 512, 8, 8, 8, 2048, 2, 32, 512),
    "B": _cfg(4, 1024, 8, 8, 8, 4096, 2, 32, 512),
    "C": _cfg(1, 4096, 32, 8, 8, 14336, 2, 8, 2048),
    "D": _cfg(2, 2048, 16, 16, 64, 1408, 6, 8, 2048),
    "E": _cfg(2, 2048, 16, 4, 128, 512, 8, 8, 2048),
    "F": _cfg(4, 1024, 8, 8, 8, 4096, 2, 4, 4096),
}
CONFIG_NOTES = {
    "A": "4 x d512, 8 heads, 8 x 2048 top-2, 32 x 512",
    "B": "4 x d1024, 8 heads, 8 x 4096 top-2, 32 x 512",
    "C": "1 x d4096, 32/8 heads, 8 x 14336 top-2, 8 x 2048",
    "D": "2 x d2048, 16 heads, 64 x 1408 top-6, 8 x 2048",
    "E": "2 x d2048, 16/4 heads, 128 x 512 top-8, 8 x 2048",
    "F": "4 x d1024, 8 heads, 8 x 4096 top-2, 4 x 4096",
}

# The tiny f32 model of `torch_moe.py --check`: block 0 dense (width top_k x d_expert), block 1 MoE,
# grouped-query attention (4 query heads on 2 kv heads).
CHECK = dict(COMMON)
CHECK.update({"model.layers": 2, "model.d_model": 64, "model.heads": 4, "model.kv_heads": 2,
              "model.experts": 8, "model.d_expert": 128, "model.top_k": 2, "model.moe_every": 2,
              "train.batch": 4, "train.seq": 64})

# The MoE layer alone (issue 10): tokens x d_model, experts x d_expert, top-k.
MOE_LAYER_SHAPES = {
    "fine": {"tokens": 16384, "d_model": 2048, "experts": 64, "d_expert": 1408, "top_k": 6},
    "mixtral": {"tokens": 16384, "d_model": 4096, "experts": 8, "d_expert": 14336, "top_k": 2},
}

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 peak (the MFU denominator)


def resolve(cfg):
    """cfg over moelab's defaults, with kv_heads 0 read as heads (as moelab's finalize does)."""
    c = dict(MOELAB_DEFAULTS)
    for k, v in cfg.items():
        if k not in MOELAB_DEFAULTS:
            raise KeyError(f"unknown key {k!r} (known: {', '.join(sorted(MOELAB_DEFAULTS))})")
        c[k] = v
    if c["model.kv_heads"] == 0:
        c["model.kv_heads"] = c["model.heads"]
    D, H, Hkv = c["model.d_model"], c["model.heads"], c["model.kv_heads"]
    if D % H or (D // H) % 2 or H % Hkv:
        raise ValueError(f"d_model {D}, heads {H}, kv_heads {Hkv}: heads must divide d_model with an "
                         "even head width, kv_heads must divide heads")
    if c["model.top_k"] > c["model.experts"]:
        raise ValueError("top_k must be <= experts")
    return c


def parse_value(key, text):
    """A --set value in the type of moelab's default for `key`."""
    default = MOELAB_DEFAULTS[key]
    if isinstance(default, bool):
        t = text.strip().lower()
        if t in ("true", "1", "yes"):
            return True
        if t in ("false", "0", "no"):
            return False
        raise ValueError(f"{key} = {text!r} is not a bool")
    if isinstance(default, int):
        return int(text)
    return float(text)


def get_config(name, sets=()):
    """A named config (or 'check') with 'key=value' overrides, resolved."""
    if name == "check":
        c = dict(CHECK)
    elif name in CONFIGS:
        c = dict(CONFIGS[name])
    else:
        raise KeyError(f"unknown config {name!r} (known: {', '.join(CONFIGS)}, check)")
    for s in sets:
        k, _, v = s.partition("=")
        k = k.strip()
        if k not in MOELAB_DEFAULTS:
            raise KeyError(f"unknown key {k!r}")
        c[k] = parse_value(k, v)
    return resolve(c)


def moe_blocks(c):
    m = c["model.moe_every"]
    return [i for i in range(c["model.layers"]) if m > 0 and i % m == m - 1]


def dense_width(c):
    return c["model.d_ff"] if c["model.d_ff"] > 0 else c["model.top_k"] * c["model.d_expert"]


def param_counts(c):
    """(total parameters, active parameters per token), as in moelab's parameter list.

    Active parameters are those that take part in a token's forward matrix products, and the
    norm gains: per block the attention projections (wq, wk, wv, wo) and the two norms; per
    MoE block the router and top_k of the E routed experts (3 D F each: w1 = [gate | up],
    w2), the shared experts and their gate; per dense block its SwiGLU FFN (3 D Fd); then the
    final norm and the output head V x D (the embedding matrix itself when tied: counted
    once, as the head; the input embedding is a lookup, no FLOPs). This reproduces the
    issue's MFU column: e.g. A: 2.94e7 active parameters, 6 x 2.94e7 + 12 x 4 x 512 x 512
    = 1.89e8 FLOPs per token; 16384 tokens in 11.1 ms -> 28% of 989 TFLOP/s, as the issue
    says (likewise C at 50% and D at 36%; the embedding's V x D = 1.3e5 .. 1e6 does not
    change the rounded figures).
    """
    V, D, L = c["model.vocab"], c["model.d_model"], c["model.layers"]
    H, Hkv = c["model.heads"], c["model.kv_heads"]
    dh = D // H
    E, F, K = c["model.experts"], c["model.d_expert"], c["model.top_k"]
    Fs = c["model.shared_experts"] * F
    attn = D * H * dh + 2 * D * Hkv * dh + H * dh * D + 2 * D  # projections + 2 norms
    shared = 3 * D * Fs + (D if (Fs and c["model.shared_gate"]) else 0)
    moe_total = D * E + 3 * E * D * F + shared
    moe_active = D * E + 3 * K * D * F + shared
    dense = 3 * D * dense_width(c)
    n_moe = len(moe_blocks(c))
    n_dense = L - n_moe
    head = V * D
    total = (V * D + (0 if c["model.tie_embeddings"] else V * D) + D
             + L * attn + n_moe * moe_total + n_dense * dense)
    active = head + D + L * attn + n_moe * moe_active + n_dense * dense
    return total, active


def flops_per_token(c):
    """The issue's training FLOPs per token: 6 x active parameters + 12 x layers x d_model x seq."""
    _, active = param_counts(c)
    return 6 * active + 12 * c["model.layers"] * c["model.d_model"] * c["train.seq"]


def mfu(c, tokens_per_s):
    return flops_per_token(c) * tokens_per_s / PEAK_FLOPS


def tokens_per_step(c):
    return c["train.batch"] * c["train.seq"]


def _fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def moelab_args(name):
    """`--set key=value` for every key of the config (model.dtype is added by the caller)."""
    c = get_config(name)
    keys = sorted(set(CONFIGS[name]) if name in CONFIGS else set(CHECK))
    return " ".join(f"--set {k}={_fmt(c[k])}" for k in keys)


def moe_moelab_args(name):
    """For `moelab bench moe-layer` (being written elsewhere; provisional): the layer's shape as
    model keys, the tokens as train.batch x train.seq with sequences of 2048."""
    s = MOE_LAYER_SHAPES[name]
    seq = 2048
    return " ".join([
        f"--set model.d_model={s['d_model']}", f"--set model.experts={s['experts']}",
        f"--set model.d_expert={s['d_expert']}", f"--set model.top_k={s['top_k']}",
        f"--set router.aux_alpha={_fmt(COMMON['router.aux_alpha'])}",
        f"--set router.z_loss={_fmt(COMMON['router.z_loss'])}",
        f"--set train.batch={s['tokens'] // seq}", f"--set train.seq={seq}"])


def moe_layer_expert_flops(s):
    """Expert GEMM FLOPs of one forward + backward: rows R = tokens x top_k; forward
    2 R D 2F + 2 R F D = 6 R D F, backward twice that (activation and weight gradients)."""
    return 18 * s["tokens"] * s["top_k"] * s["d_model"] * s["d_expert"]


# ---------------------------------------------------------------- reading compare.sh's outputs

def _read_raw(dirs):
    """{file name: text} from DIR/raw/*.txt or DIR/raw.tgz of each DIR (later DIRs win)."""
    files = {}
    for d in dirs:
        if not os.path.isdir(d):
            raise SystemExit(f"report: no folder {d}")
        here = {}
        tgz = os.path.join(d, "raw.tgz")
        if os.path.isfile(tgz):
            with tarfile.open(tgz) as t:
                for m in t.getmembers():
                    if m.isfile():
                        here[os.path.basename(m.name)] = t.extractfile(m).read().decode(errors="replace")
        raw = os.path.join(d, "raw")
        if os.path.isdir(raw):
            for n in sorted(os.listdir(raw)):
                p = os.path.join(raw, n)
                if os.path.isfile(p):
                    with open(p, errors="replace") as f:
                        here[n] = f.read()
        # Exit statuses accumulate (in order, later lines win); every other file is replaced.
        rc = files.get("rc.txt", "") + here.pop("rc.txt", "")
        files.update(here)
        files["rc.txt"] = rc
    return files


def _json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def parse_moelab_bench(text):
    """(step ms, tokens/s) from `moelab bench`'s row of run 'base' (experiments/bench_cmd.cpp:
    run backend dtype tokens fwd-ms bwd-ms adamw-ms step-ms tokens/s), or None."""
    for line in reversed(text.splitlines()):
        f = line.split()
        if len(f) >= 9 and f[0] == "base":
            try:
                return float(f[7]), float(f[8])
            except ValueError:
                return None
    return None


def parse_moelab_peak_gb(text):
    """moelab bench's peak device memory (GB, 'peak X GB' on its row of run 'base'), or None."""
    for line in reversed(text.splitlines()):
        f = line.split()
        if len(f) >= 9 and f[0] == "base":
            m = re.search(r"peak ([0-9.]+) GB", line)
            return float(m.group(1)) if m else None
    return None


def parse_moelab_moe_layer(text):
    """The layer's forward + backward ms from `moelab bench moe-layer`'s line
    ('moe-layer cuda bf16 tokens ... : X ms fwd+bwd (...), experts Y ms = Z TFLOP/s ...')."""
    for line in reversed(text.splitlines()):
        m = re.search(r"([0-9]+(?:\.[0-9]+)?) ms fwd\+bwd", line)
        if m:
            return float(m.group(1))
    return None


def _torch_result(files, name):
    text = files.get(name + ".txt")
    if text is None:
        return None
    js = [j for j in _json_lines(text) if "ms" in j]
    return js[-1] if js else None


def _status(files, name):
    """'' when the run's output is there, else why not (its exit status from rc.txt)."""
    rc = {}
    for line in files.get("rc.txt", "").splitlines():
        f = line.split()
        if len(f) == 2 and f[1].startswith("rc="):
            rc[f[0]] = f[1][3:]
    if name in rc and rc[name] != "0":
        return "rc " + rc[name] + (" (timeout)" if rc[name] in ("124", "137") else "")
    if name + ".txt" not in files:
        return "not run"
    return "no result"


def _ms(v):
    return f"{v:.1f}" if v is not None else "-"


def report(dirs):
    files = _read_raw(dirs)
    lines = []
    peak = _torch_result(files, "gemm_peak")
    peak_tflops = peak.get("tflops") if peak else None
    if peak_tflops:
        lines.append(f"Dense bf16 GEMM peak (torch.matmul 8192^3, median of {peak.get('iters')}): "
                     f"**{peak_tflops:.0f} TFLOP/s** measured; MFU below is over {PEAK_FLOPS / 1e12:.0f} "
                     f"TFLOP/s as in the issue.")
        lines.append("")
    env = peak or next((j for n in sorted(files) for j in _json_lines(files[n]) if "torch" in j), None)
    if env:
        lines.append(f"torch {env.get('torch')}, {env.get('device')}")
        lines.append("")
    lines.append("| config | shape | tokens | moelab ms | torch eager ms | torch compile ms | "
                 "moelab / compile tokens/s | MFU moelab | MFU eager | MFU compile | "
                 "peak GB moelab / eager / compile | compile warm-up s | torch SDPA kernel |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        c = get_config(name)
        T = tokens_per_step(c)
        ml = parse_moelab_bench(files.get(f"moelab_{name}.txt", ""))
        te = _torch_result(files, f"torch_eager_{name}")
        tc = _torch_result(files, f"torch_compile_{name}")
        if ml is None and te is None and tc is None and f"moelab_{name}.txt" not in files:
            continue
        m_ms, m_tps = ml if ml else (None, None)
        cells = [name, CONFIG_NOTES[name], str(T)]
        cells.append(_ms(m_ms) if ml else _status(files, f"moelab_{name}"))
        cells.append(_ms(te["ms"]) if te else _status(files, f"torch_eager_{name}"))
        cells.append(_ms(tc["ms"]) if tc else _status(files, f"torch_compile_{name}"))
        cells.append(f"{m_tps / tc['tokens_per_s']:.2f}x" if (ml and tc) else "-")
        cells.append(f"{100 * mfu(c, m_tps):.0f}%" if ml else "-")
        cells.append(f"{100 * te['mfu']:.0f}%" if te else "-")
        cells.append(f"{100 * tc['mfu']:.0f}%" if tc else "-")
        m_peak = parse_moelab_peak_gb(files.get(f"moelab_{name}.txt", ""))
        mem = [f"{m_peak:.1f}" if m_peak is not None else "-"]
        mem += [f"{j['peak_mem_gb']:.1f}" if j else "-" for j in (te, tc)]
        cells.append(" / ".join(mem))
        cells.append(f"{tc['warmup_s']:.0f}" if tc and "warmup_s" in tc else "-")
        cells.append(str((te or tc or {}).get("sdpa_choice", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("MoE layer alone (router, permute, SwiGLU experts, un-permute; forward + backward, bf16):")
    lines.append("")
    lines.append("| shape | tokens | moelab ms | torch eager ms | torch compile ms | moelab / eager | "
                 "expert TFLOP/s eager | of GEMM peak |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, s in MOE_LAYER_SHAPES.items():
        te = _torch_result(files, f"moe_torch_eager_{name}")
        tc = _torch_result(files, f"moe_torch_compile_{name}")
        mm = parse_moelab_moe_layer(files.get(f"moe_moelab_{name}.txt", ""))
        shape = f"{name}: d {s['d_model']}, {s['experts']} x {s['d_expert']} top-{s['top_k']}"
        cells = [shape, str(s["tokens"])]
        cells.append(_ms(mm) if mm else ("pending" if f"moe_moelab_{name}.txt" not in files
                                         else _status(files, f"moe_moelab_{name}")))
        cells.append(_ms(te["ms"]) if te else _status(files, f"moe_torch_eager_{name}"))
        cells.append(_ms(tc["ms"]) if tc else "-")
        cells.append(f"{te['ms'] / mm:.2f}x" if (te and mm) else "-")
        tf = moe_layer_expert_flops(s) / (te["ms"] * 1e-3) / 1e12 if te else None
        cells.append(f"{tf:.0f}" if tf else "-")
        cells.append(f"{100 * tf / peak_tflops:.0f}%" if (tf and peak_tflops) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("ms: medians of the timed steps after warm-up (moelab bench: --warmup untimed steps, 30 from "
                 "compare.sh since 2026-11-30, 3 in the calls before; a device "
                 "synchronisation after each phase; torch: CUDA events around each whole step). "
                 "moelab / compile > 1 means moelab is faster. Expert TFLOP/s counts only the expert "
                 "GEMMs (18 x tokens x top_k x d_model x d_expert per forward + backward) over the "
                 "whole layer's time.")
    return "\n".join(lines)


def describe():
    out = []
    for name in CONFIGS:
        c = get_config(name)
        total, active = param_counts(c)
        out.append(f"{name}: {CONFIG_NOTES[name]}; {tokens_per_step(c)} tokens/step; "
                   f"{total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active; "
                   f"{flops_per_token(c) / 1e9:.3f} GFLOP/token")
    return "\n".join(out)


# ---------------------------------------------------------------- roofline

GEMM_PEAK = 800e12  # dense bf16 GEMM peak measured on the H200 (compare.sh's gemm part, issue 10)
HBM_BW = 4.8e12     # H200 HBM3e bandwidth, bytes/s
# The optimizer's bytes per parameter in a bf16 step: AdamW reads the bf16 gradient (2) and the
# fp32 master, m and v (12), writes them back (12) and the bf16 copy (2); the gradient norm reads
# the gradient once more (2) and zeroing it writes it (2). torch's recipe (fp32 gradients, no norm,
# gradients set to None) moves 4 + 12 + 12 = 28 bytes.
OPT_BYTES = 32


def roofline_row(name):
    """(model GFLOP per step, compute ms, optimizer GB, memory ms, floor ms, binding limit)."""
    c = get_config(name)
    total, _ = param_counts(c)
    T = tokens_per_step(c)
    flops = flops_per_token(c) * T
    t_compute = flops / GEMM_PEAK * 1e3
    opt_bytes = OPT_BYTES * total
    t_mem = opt_bytes / HBM_BW * 1e3
    return flops / 1e9, t_compute, opt_bytes / 1e9, t_mem, t_compute + t_mem, \
        "compute" if t_compute >= t_mem else "memory"


def roofline():
    lines = [f"Floor of a bf16 training step: model FLOPs (6 x active parameters + 12 x layers x d x seq, "
             f"per token) at the measured GEMM peak of {GEMM_PEAK / 1e12:.0f} TFLOP/s, plus the optimizer's "
             f"{OPT_BYTES} bytes per parameter at {HBM_BW / 1e12:.1f} TB/s (it cannot overlap the "
             "backward that produces its gradients). Activation traffic (norms, permutes, SwiGLU, "
             "residuals) is not counted: a fused implementation hides part of it in GEMM epilogues.",
             "", "| config | shape | params | GFLOP / step | compute ms | optimizer GB | optimizer ms | "
             "floor ms | binds |", "|---|---|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        g, tc, gb, tm, fl, binds = roofline_row(name)
        total, _ = param_counts(get_config(name))
        lines.append(f"| {name} | {CONFIG_NOTES[name]} | {total / 1e6:.0f}M | {g:.0f} | {tc:.1f} | {gb:.1f} | "
                     f"{tm:.1f} | {fl:.1f} | {binds} |")
    return "\n".join(lines)


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "names":
        print(" ".join(CONFIGS))
    elif cmd == "moe-names":
        print(" ".join(MOE_LAYER_SHAPES))
    elif cmd == "moelab-args":
        print(moelab_args(rest[0]))
    elif cmd == "moe-moelab-args":
        print(moe_moelab_args(rest[0]))
    elif cmd == "describe":
        print(describe())
    elif cmd == "report":
        print(report(rest))
    elif cmd == "roofline":
        print(roofline())
    else:
        print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
