"""What routing costs in speed (issue 13 part 5): per run, the step time and tokens/s from
/train/tokens_per_sec, next to the run's quality and router statistics, and the
quality-versus-throughput plot with one point per balancing method.

A step's time is tokens per step (train.batch x train.seq, times the ranks) / tokens_per_sec of
that step (the trainer times each optimizer step up to a device synchronisation, evaluations and
checkpoints excluded). The first `skip` fraction of the logged steps (default 10%, at least 10
steps) is dropped as warm-up (allocator growth, cuBLAS heuristics); the rest gives the median and
the interquartile range. Quality is the last validation bpb (summary.summarize_run), router
numbers are the summary's means over the last 10% of steps.
"""
from __future__ import annotations

from ._deps import require as _require

_require(("numpy",))

from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from .summary import summarize_run  # noqa: E402


def tokens_per_step(run) -> float:
    """train.batch x train.seq x ranks (parallel.ep x parallel.dp) of the run."""
    ranks = int(run.cfg("parallel.ep", 1)) * int(run.cfg("parallel.dp", 1))
    return float(run.cfg("train.batch", 8)) * float(run.cfg("train.seq", 64)) * ranks


def step_times_ms(run, skip: float = 0.1) -> np.ndarray:
    """Milliseconds of each logged step after the warm-up (see the module docstring)."""
    tps = np.asarray(run.train["tokens_per_sec"], dtype=np.float64)
    n = tps.shape[0]
    first = min(n, max(10, int(round(skip * n)))) if n > 10 else 0
    t = tps[first:]
    t = t[np.isfinite(t) & (t > 0)]
    return 1000.0 * tokens_per_step(run) / t


def method_of(run) -> Dict[str, Any]:
    """How the run balances: {kind: real|forced|aux_free_bias|expert_choice|sinkhorn|random_top2,
    aux_alpha, capacity_factor, label}."""
    policy = str(run.cfg("router.policy", "topk"))
    forced = bool(run.cfg("router.force_balance", False))
    alpha = float(run.cfg("router.aux_alpha", 0.0))
    cf = float(run.cfg("router.capacity_factor", 0.0))
    if forced:
        kind = "forced"
    elif policy != "topk":
        kind = policy
    elif float(run.cfg("router.bias_update_rate", 0.0)) > 0:
        kind = "aux_free_bias"
    else:
        kind = "real"
    cap = "dropless" if cf == 0 else "cf {:g}".format(cf)
    if kind == "real":
        label = "alpha {:g}, {}".format(alpha, cap)
    elif kind == "forced":
        label = "forced balance, {}".format(cap)
    else:
        label = kind.replace("_", " ") + ("" if cf == 0 else ", " + cap)
    return {"kind": kind, "aux_alpha": alpha, "capacity_factor": cf, "label": label}


def speed_row(run, skip: float = 0.1) -> Dict[str, Any]:
    """One run's numbers: method, step ms (median, q25, q75), tokens/s (median), val bpb,
    imbalance, drop fraction, steps timed."""
    ms = step_times_ms(run, skip)
    s = summarize_run(run)
    row = dict(method_of(run))
    row.update({
        "name": run.point or run.name,
        "steps_timed": int(ms.size),
        "step_ms": float(np.median(ms)) if ms.size else float("nan"),
        "step_ms_q25": float(np.percentile(ms, 25)) if ms.size else float("nan"),
        "step_ms_q75": float(np.percentile(ms, 75)) if ms.size else float("nan"),
        "tokens_per_s": float(tokens_per_step(run) / np.median(ms) * 1000.0) if ms.size else float("nan"),
        "val_bpb": s["val_bpb"],
        "imbalance": s["imbalance"],
        "drop_fraction": s["drop_fraction"],
    })
    return row


def run_names(directory) -> Dict[str, str]:
    """File name -> run name ("real_a0_cf1") from the sweep's sweep.json, {} without one."""
    import json
    from pathlib import Path

    p = Path(directory) / "sweep.json"
    if not p.is_file():
        return {}
    runs = json.loads(p.read_text()).get("runs") or []
    return {Path(r["file"]).name: r["name"] for r in runs if isinstance(r, dict) and "file" in r and "name" in r}


def speed_table(runs: Sequence[Any], skip: float = 0.1, names: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """speed_row of every run; `names` (file name -> run name, see run_names) names the rows."""
    rows = [speed_row(r, skip) for r in runs]
    for r, row in zip(runs, rows):
        if names and r.path.name in names:
            row["name"] = names[r.path.name]
    return rows


def markdown(rows: Sequence[Dict[str, Any]], reference: Optional[str] = None) -> str:
    """The table: one row per run; speed relative to `reference` (a row name), if given."""
    ref = next((r for r in rows if r["name"] == reference), None)
    head = ["run", "method", "step ms: median [IQR]", "tokens/s", "vs " + reference if ref else None,
            "val bpb", "imbalance", "drop"]
    head = [h for h in head if h]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], r["label"],
                 "{:.1f} [{:.1f}, {:.1f}]".format(r["step_ms"], r["step_ms_q25"], r["step_ms_q75"]),
                 "{:,.0f}".format(r["tokens_per_s"])]
        if ref:
            cells.append("{:.3f}x".format(r["tokens_per_s"] / ref["tokens_per_s"]))
        cells += ["{:.3f}".format(r["val_bpb"]), "{:.2f}".format(r["imbalance"]),
                  "{:.1%}".format(r["drop_fraction"]) if np.isfinite(r["drop_fraction"]) else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


_COLORS = {0.0: "tab:red", 0.01: "tab:blue", 0.1: "tab:green"}
_MARKERS = {0.0: "o", 1.0: "s", 1.25: "^"}
_OTHER = {"aux_free_bias": ("tab:purple", "D"), "expert_choice": ("tab:orange", "P"),
          "sinkhorn": ("tab:brown", "*"), "random_top2": ("tab:olive", "v")}


def plot(rows: Sequence[Dict[str, Any]], path, title: str = "quality vs throughput") -> None:
    """val bpb against tokens/s, one point per run: real routing coloured by alpha with a marker
    per capacity factor, forced balance in black, the other methods in their own colours; each
    point's horizontal bar spans the interquartile range of its step times."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for r in rows:
        cf = r["capacity_factor"]
        if r["kind"] == "real":
            color, marker = _COLORS.get(r["aux_alpha"], "tab:gray"), _MARKERS.get(cf, "x")
        elif r["kind"] == "forced":
            color, marker = "black", _MARKERS.get(cf, "x")
        else:
            color, marker = _OTHER.get(r["kind"], ("tab:gray", "x"))
        x = r["tokens_per_s"]
        lo, hi = x * r["step_ms"] / r["step_ms_q75"], x * r["step_ms"] / r["step_ms_q25"]
        ax.errorbar([x], [r["val_bpb"]], xerr=[[x - lo], [hi - x]], fmt=marker, color=color, ms=8,
                    mfc=color if r["kind"] != "forced" else "white", capsize=2)
        ax.annotate(r["label"], (x, r["val_bpb"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("training throughput, tokens/s (median step; bar: interquartile range)")
    ax.set_ylabel("final validation bits per byte (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
