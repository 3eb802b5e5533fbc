"""The final numbers of a run: what report.md's table and the sweep plots show.

"Final" for per-step series means the mean over the last window of logged steps, the last
max(1, round(window_frac * N)) of them (default 10%), because single-step router statistics are
noisy. Validation bpb is the last evaluation. Router numbers average over MoE layers, except
max |logit| (maximum over layers) and the drop fraction (pooled: 1 - sum kept / sum routed over
the window and all layers).
"""
from __future__ import annotations

from ._deps import require as _require

_require(("numpy",))

import math  # noqa: E402
from typing import Any, Dict, List  # noqa: E402

import numpy as np  # noqa: E402

from . import metrics  # noqa: E402

# Column key -> header, in report order.
SUMMARY_COLUMNS = [
    ("steps", "last step"),
    ("train_bpb", "final train bpb"),
    ("val_bpb", "final val bpb"),
    ("imbalance", "imbalance max/mean"),
    ("cv", "load CV"),
    ("drop_fraction", "drop fraction"),
    ("logit_rms", "logit RMS"),
    ("logit_max", "max |logit|"),
    ("z_loss", "router z-loss (mean lse^2)"),
]


def window(n: int, window_frac: float = 0.1) -> slice:
    """The slice of the last max(1, round(window_frac * n)) of n steps (empty when n = 0)."""
    if n <= 0:
        return slice(0, 0)
    w = max(1, int(round(window_frac * n)))
    return slice(n - w, n)


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def summarize_run(run, window_frac: float = 0.1) -> Dict[str, Any]:
    """{steps, train_bpb, val_bpb, imbalance, cv, drop_fraction, logit_rms, logit_max, z_loss, layers,
    experts}. z_loss is the un-scaled router z-loss, mean_t logsumexp(logits_t)^2, averaged over
    layers (what router.z_loss penalises)."""
    n = int(run.train["step"].shape[0])
    sl = window(n, window_frac)
    bpt = run.bytes_per_token
    out: Dict[str, Any] = {
        "steps": int(run.train["step"][-1]) if n else 0,
        "train_bpb": _nanmean(metrics.bits_per_byte(run.train["loss"][sl], bpt)) if n else float("nan"),
        "layers": len(run.router),
        "experts": max((l.experts for l in run.router.values()), default=0),
    }
    ev = run.eval["loss"]
    finite = np.nonzero(np.isfinite(np.asarray(ev, dtype=np.float64)))[0] if ev.size else []
    out["val_bpb"] = float(metrics.bits_per_byte(ev[finite[-1]], bpt)) if len(finite) else float("nan")
    out["val_step"] = int(run.eval["step"][finite[-1]]) if len(finite) else None

    imb: List[float] = []
    cv: List[float] = []
    rms: List[float] = []
    lmax: List[float] = []
    zl: List[float] = []
    routed_total = 0.0
    kept_total = 0.0
    for layer in run.router.values():
        m = layer.steps_logged
        if m == 0:
            continue
        lsl = window(m, window_frac)
        imb.append(_nanmean(metrics.load_imbalance(layer.routed[lsl])))
        cv.append(_nanmean(metrics.coefficient_of_variation(layer.routed[lsl])))
        rms.append(_nanmean(layer.logit_rms[lsl]))
        zl.append(_nanmean(layer.z_loss[lsl]))
        v = np.asarray(layer.logit_max[lsl], dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            lmax.append(float(np.abs(v).max()))
        routed_total += float(layer.routed[lsl].sum())
        kept_total += float(layer.kept[lsl].sum())
    out["imbalance"] = _nanmean(imb)
    out["cv"] = _nanmean(cv)
    out["logit_rms"] = _nanmean(rms)
    out["z_loss"] = _nanmean(zl)
    out["logit_max"] = max(lmax) if lmax else float("nan")
    out["drop_fraction"] = (1.0 - kept_total / routed_total) if routed_total > 0 else float("nan")
    return out


def format_value(key: str, value: Any) -> str:
    """Table formatting: integers plain, fractions with 4 decimals, others 3 significant-ish."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if key == "steps":
        return str(int(value))
    if key == "drop_fraction":
        return "{:.4f}".format(value)
    if isinstance(value, float):
        return "{:.3f}".format(value)
    return str(value)
