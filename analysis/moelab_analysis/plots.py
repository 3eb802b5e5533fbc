"""Plots over run logs: each function writes one PNG and returns its path.

Headless: figures are matplotlib.figure.Figure objects rendered by the Agg canvas, never
pyplot, so nothing depends on the active backend and no global figure state leaks (safe in
notebooks and in long report runs). Every plot has labelled axes, a title and a legend where
there is more than one line. Losses are shown in bits per byte (metrics.bits_per_byte).
Functions that have nothing to show (no eval points, capacity off, no category counts)
return None and write nothing.
"""
from __future__ import annotations

from ._deps import require as _require

_require()

import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union  # noqa: E402

import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from . import metrics  # noqa: E402
from .summary import summarize_run, window as _window  # noqa: E402

PathLike = Union[str, Path]
DPI = 110


# --------------------------------------------------------------------------------------------
# Helpers


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` points, ignoring NaN/inf, shrinking at the edges."""
    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or y.size == 0:
        return y.copy()
    ok = np.isfinite(y)
    vals = np.where(ok, y, 0.0)
    cs = np.concatenate([[0.0], np.cumsum(vals)])
    cn = np.concatenate([[0], np.cumsum(ok)])
    half = window // 2
    idx = np.arange(y.size)
    lo = np.clip(idx - half, 0, y.size)
    hi = np.clip(idx + half + 1, 0, y.size)
    cnt = cn[hi] - cn[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (cs[hi] - cs[lo]) / np.maximum(cnt, 1), np.nan)


def auto_window(n: int) -> int:
    """Smoothing window: about 2% of the points, 1 (none) for short series."""
    return 1 if n < 100 else max(1, int(round(n / 50)))


def _figure(nrows: int = 1, ncols: int = 1, figsize: Tuple[float, float] = (8, 4.5), **kw):
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, out: PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), dpi=DPI)
    return out


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _legend(ax, **kw) -> None:
    """A legend only when something is labelled (matplotlib warns otherwise)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def layer_colors(n: int) -> List[Any]:
    """Distinct colours for up to 10 layers (tab10), a sequential map beyond."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def run_colors(n: int) -> List[Any]:
    """Sequential colours for runs ordered by swept value (dark = first, yellow = last)."""
    if n == 1:
        return [colormaps["tab10"](0)]
    return [colormaps["viridis"](0.9 * i / max(1, n - 1)) for i in range(n)]


def _aligned(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    m = min(len(x), len(y))
    return x[:m], y[:m]


def _bin_steps(mat: np.ndarray, steps: np.ndarray, max_cols: int = 400):
    """[N, E] -> ([E, B] means over step bins, first step, last step) with B <= max_cols."""
    n = mat.shape[0]
    if n <= max_cols:
        return mat.T, steps[0], steps[-1]
    edges = np.linspace(0, n, max_cols + 1).astype(int)
    binned = np.stack([mat[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:]) if b > a])
    return binned.T, steps[0], steps[-1]


def _title_run(run) -> str:
    return run.label if getattr(run, "swept", None) else run.name


# --------------------------------------------------------------------------------------------
# One run


def plot_loss_curves(run, out: PathLike) -> Path:
    """Training and validation loss in bits per byte against step (train raw + smoothed)."""
    fig, axes = _figure()
    ax = axes[0, 0]
    bpt = run.bytes_per_token
    steps = run.train["step"]
    if steps.size:
        y = metrics.bits_per_byte(run.train["loss"], bpt)
        w = auto_window(y.size)
        if w > 1:
            ax.plot(steps, y, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
            ax.plot(steps, smooth(y, w), color="tab:blue", lw=1.8, label="train ({}-step mean)".format(w))
        else:
            ax.plot(steps, y, color="tab:blue", lw=1.5, label="train")
    if run.eval["step"].size:
        ye = metrics.bits_per_byte(run.eval["loss"], bpt)
        ax.plot(run.eval["step"], ye, "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
        s = summarize_run(run)
        if np.isfinite(s["val_bpb"]):
            ax.annotate("{:.3f}".format(s["val_bpb"]), (s["val_step"], s["val_bpb"]),
                        textcoords="offset points", xytext=(4, 8), color="tab:orange")
    if not steps.size and not run.eval["step"].size:
        _no_data(ax, "no logged steps")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (bits per byte)")
    ax.set_title("{}: language-model loss".format(_title_run(run)))
    ax.grid(alpha=0.3)
    if ax.lines:
        _legend(ax)
    return _save(fig, out)


def _heatmap(run, layer, values: np.ndarray, title: str, cbar_label: str, out: PathLike) -> Path:
    fig, axes = _figure(figsize=(9, 0.9 + 0.28 * max(4, layer.experts) + 1.2))
    ax = axes[0, 0]
    steps = run.train["step"][: values.shape[0]]
    if values.shape[0] == 0:
        _no_data(ax, "no logged steps")
    else:
        mat, s0, s1 = _bin_steps(values, steps)
        finite = mat[np.isfinite(mat)]
        vmax = max(2.0, float(np.quantile(finite, 0.995)) if finite.size else 2.0)
        norm = mcolors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
        im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                       extent=(s0, s1, layer.experts - 0.5, -0.5))
        cb = fig.colorbar(im, ax=ax, pad=0.01)
        cb.set_label(cbar_label)
        if layer.experts <= 32:
            ax.set_yticks(range(layer.experts))
    ax.set_xlabel("training step")
    ax.set_ylabel("expert")
    ax.set_title(title)
    return _save(fig, out)


def plot_expert_load(run, layer_index: int, out: PathLike) -> Path:
    """Heat map, experts x steps, of routed count / mean routed count (1 = balanced)."""
    layer = run.router[layer_index]
    r = layer.routed.astype(np.float64)
    mean = r.mean(axis=1, keepdims=True) if r.size else r
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(mean > 0, r / np.where(mean > 0, mean, 1), np.nan)
    title = "{}: layer {:02d} expert load before capacity (final max/mean {:.2f})".format(
        _title_run(run), layer_index, _final_layer(metrics.load_imbalance(layer.routed)))
    return _heatmap(run, layer, rel, title, "routed / mean over experts", out)


def _final_layer(series: np.ndarray) -> float:
    series = np.asarray(series, dtype=np.float64)
    v = series[_window(series.size)]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def plot_kept_load(run, layer_index: int, out: PathLike) -> Optional[Path]:
    """Heat map of kept count / mean routed count; None when capacity dropped nothing."""
    layer = run.router[layer_index]
    if not layer.capacity_on:
        return None
    r = layer.routed.astype(np.float64)
    mean = r.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(mean > 0, layer.kept / np.where(mean > 0, mean, 1), np.nan)
    drop = metrics.drop_fraction(layer.routed.sum(0), layer.kept.sum(0))
    cf = run.cfg("router.capacity_factor")
    title = "{}: layer {:02d} kept after capacity (cf {}, {:.1%} of assignments dropped)".format(
        _title_run(run), layer_index, cf if cf is not None else "?", drop)
    return _heatmap(run, layer, rel, title, "kept / mean routed (cap = capacity factor)", out)


def plot_load_imbalance(run, out: PathLike) -> Path:
    """Max/mean load and coefficient of variation of routed counts over steps, a line per layer."""
    fig, axes = _figure(1, 2, figsize=(11, 4.2))
    steps = run.train["step"]
    colors = layer_colors(len(run.layers))
    for col, (fn, name, ref) in enumerate([
            (metrics.load_imbalance, "max / mean load", 1.0),
            (metrics.coefficient_of_variation, "coefficient of variation", 0.0)]):
        ax = axes[0, col]
        for c, idx in zip(colors, run.layers):
            layer = run.router[idx]
            if not layer.steps_logged:
                continue
            y = fn(layer.routed)
            x, y = _aligned(steps, y)
            ax.plot(x, smooth(y, auto_window(y.size)), color=c, lw=1.4, label="layer {:02d}".format(idx))
        ax.axhline(ref, color="0.3", ls="--", lw=1, label="perfect balance")
        if not run.layers:
            _no_data(ax, "no MoE layers")
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.set_title(name + " (routed, before capacity)")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize="small")
    fig.suptitle("{}: expert load imbalance".format(_title_run(run)))
    return _save(fig, out)


ROUTER_PANELS = [
    # (key, y label, title)
    ("drop_fraction", "fraction dropped", "capacity drop fraction"),
    ("aux_loss", "E * sum f_i P_i (1 = balanced)", "load-balancing loss (un-scaled)"),
    ("z_loss", "mean logsumexp^2", "router z-loss (un-scaled)"),
    ("entropy", "nats", "router entropy"),
    ("logit_rms", "RMS", "router logit RMS"),
    ("logit_max", "max |logit|", "max |router logit|"),
    ("top1_prob", "probability", "mean top-1 probability"),   # optional extra
]


def router_series(layer, key: str) -> Optional[np.ndarray]:
    """A per-step router series by panel key (derived drop_fraction included); None if absent."""
    if key == "drop_fraction":
        return metrics.drop_fraction(layer.routed, layer.kept)
    if key in ("aux_loss", "z_loss", "entropy", "logit_rms", "logit_max"):
        return np.asarray(getattr(layer, key), dtype=np.float64)
    v = layer.extras.get(key)
    if v is not None and v.ndim == 1:
        return np.asarray(v, dtype=np.float64)
    return None


def plot_router_stats(run, out: PathLike) -> Path:
    """Small multiples over steps, a line per layer: drop fraction, aux loss, z-loss, entropy,
    logit RMS, max |logit| (and mean top-1 probability when logged)."""
    panels = [p for p in ROUTER_PANELS
              if p[0] != "top1_prob" or any(router_series(l, "top1_prob") is not None for l in run.layer_list)]
    ncols = 3
    nrows = int(math.ceil(len(panels) / ncols))
    fig, axes = _figure(nrows, ncols, figsize=(13, 3.4 * nrows + 0.6))
    steps = run.train["step"]
    colors = layer_colors(len(run.layers))
    n = steps.size
    w = auto_window(n)
    experts = max((l.experts for l in run.layer_list), default=0)
    for i, (key, ylabel, title) in enumerate(panels):
        ax = axes[i // ncols, i % ncols]
        for c, idx in zip(colors, run.layers):
            y = router_series(run.router[idx], key)
            if y is None or not y.size:
                continue
            x, y = _aligned(steps, y)
            ax.plot(x, smooth(y, w), color=c, lw=1.3, label="layer {:02d}".format(idx))
        if key == "aux_loss":
            ax.axhline(1.0, color="0.3", ls="--", lw=1, label="perfect balance")
        if key == "entropy" and experts:
            ax.axhline(math.log(experts), color="0.3", ls="--", lw=1, label="log E (uniform)")
        if key == "drop_fraction":
            ax.set_ylim(bottom=0)
        if not ax.lines:
            _no_data(ax, "no data")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if i == 0 or key in ("aux_loss", "entropy"):
            _legend(ax, fontsize="small")
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    fig.suptitle("{}: router statistics per MoE layer{}".format(
        _title_run(run), " ({}-step moving mean)".format(w) if w > 1 else ""))
    return _save(fig, out)


def plot_specialization(run, layer_index: int, out: PathLike, eval_index: int = -1) -> Optional[Path]:
    """Expert x category heat map, row-normalised p(category | expert), at one eval step,
    with a reference row of the overall category mix; MI and NMI in the title."""
    layer = run.router[layer_index]
    if not layer.has_categories:
        return None
    mat = np.asarray(layer.category_counts[eval_index], dtype=np.float64)   # [E, C]
    step = int(layer.category_step[eval_index])
    mi, nmi = metrics.mutual_information(mat)
    e, c = mat.shape
    rows = mat.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rn = np.where(rows > 0, mat / np.where(rows > 0, rows, 1), np.nan)
    total = mat.sum()
    overall = mat.sum(axis=0) / total if total > 0 else np.full(c, np.nan)
    shown = np.vstack([rn, overall[None, :]])
    fig, axes = _figure(figsize=(1.6 + 1.1 * c + 1.5, 1.4 + 0.38 * (e + 1) + 0.6))
    ax = axes[0, 0]
    im = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("p(category | expert)")
    ax.axhline(e - 0.5, color="white", lw=3)
    share = rows[:, 0] / total if total > 0 else np.zeros(e)
    ax.set_yticks(range(e + 1))
    ax.set_yticklabels(["e{} ({:.0%})".format(i, share[i]) for i in range(e)] + ["all experts"])
    ax.set_xticks(range(c))
    ax.set_xticklabels(layer.category_names, rotation=30, ha="right")
    if (e + 1) * c <= 220:
        for i in range(e + 1):
            for j in range(c):
                v = shown[i, j]
                if np.isfinite(v):
                    ax.text(j, i, "{:.2f}".format(v), ha="center", va="center", fontsize=8,
                            color="black" if v > 0.6 else "white")
    ax.set_xlabel("token category")
    ax.set_ylabel("expert (share of assignments)")
    ax.set_title("{}: layer {:02d} specialisation at step {}\nMI = {:.3f} nats, "
                 "NMI = {:.3f} (MI / min(H_expert, H_category))".format(
                     _title_run(run), layer_index, step, mi, nmi), fontsize=10)
    return _save(fig, out)


def plot_specialization_over_time(run, out: PathLike) -> Optional[Path]:
    """Normalised MI between expert and category at each evaluation, a line per layer."""
    layers = [l for l in run.layer_list if l.has_categories]
    if not layers:
        return None
    fig, axes = _figure(1, 2, figsize=(11, 4.2))
    colors = layer_colors(len(run.layers))
    cmap = dict(zip(run.layers, colors))
    for layer in layers:
        mi, nmi = metrics.mutual_information(layer.category_counts)
        axes[0, 0].plot(layer.category_step, mi, "o-", ms=3, color=cmap[layer.index],
                        label="layer {:02d}".format(layer.index))
        axes[0, 1].plot(layer.category_step, nmi, "o-", ms=3, color=cmap[layer.index],
                        label="layer {:02d}".format(layer.index))
    axes[0, 0].set_ylabel("MI (nats)")
    axes[0, 0].set_title("mutual information I(expert; category)")
    axes[0, 1].set_ylabel("NMI = MI / min(H_expert, H_category)")
    axes[0, 1].set_title("normalised mutual information")
    axes[0, 1].set_ylim(0, 1)
    for ax in axes[0]:
        ax.set_xlabel("training step (evaluation)")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize="small")
    fig.suptitle("{}: expert specialisation over training".format(_title_run(run)))
    return _save(fig, out)


# --------------------------------------------------------------------------------------------
# Several runs


def _swept_axis(runs) -> Tuple[Optional[str], List[str]]:
    """The primary swept key (most distinct values) and the remaining keys (one line per combo)."""
    keys: List[str] = []
    for r in runs:
        for k in r.swept:
            if k not in keys:
                keys.append(k)
    if not keys:
        return None, []
    distinct = {k: len({repr(r.swept.get(k)) for r in runs}) for k in keys}
    primary = max(keys, key=lambda k: (distinct[k], -keys.index(k)))
    return primary, [k for k in keys if k != primary]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


SWEEP_PANELS = [
    ("val_bpb", "final validation bpb"),
    ("imbalance", "final load imbalance (max / mean)"),
    ("drop_fraction", "final drop fraction"),
    ("logit_rms", "final router logit RMS"),
]


def plot_sweep_comparison(runs: Sequence, out: PathLike, key: Optional[str] = None,
                          window_frac: float = 0.1) -> Path:
    """Final metrics (validation bpb, imbalance, drop fraction, logit RMS) against the swept value.

    x is `key` (default: the swept key with the most distinct values); each combination of the
    other swept keys gets its own line. Numeric x spanning a decade or more uses a log axis
    (symlog when a value is 0). Without swept values, runs are placed by name.
    """
    primary, others = _swept_axis(runs)
    if key is not None:
        primary, others = key, [k for k in (others + ([primary] if primary else [])) if k != key]
    summaries = [summarize_run(r, window_frac) for r in runs]
    xs = [r.swept.get(primary) if primary else None for r in runs]
    numeric = primary is not None and all(_is_number(v) for v in xs)
    if not numeric:
        cats: List[str] = []
        for r, v in zip(runs, xs):
            label = str(v) if primary else r.name
            if label not in cats:
                cats.append(label)
        xpos = [cats.index(str(v) if primary else r.name) for r, v in zip(runs, xs)]
    else:
        xpos = [float(v) for v in xs]
    groups: Dict[Tuple, List[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(tuple(repr(r.swept.get(k)) for k in others), []).append(i)
    fig, axes = _figure(2, 2, figsize=(11, 7.5))
    colors = run_colors(len(groups)) if len(groups) > 1 else ["tab:blue"]
    for (gkey, idxs), color in zip(groups.items(), colors):
        idxs = sorted(idxs, key=lambda i: xpos[i])
        label = ", ".join("{}={}".format(k.split(".")[-1], runs[idxs[0]].swept.get(k)) for k in others) or None
        for p, (mkey, title) in enumerate(SWEEP_PANELS):
            ax = axes[p // 2, p % 2]
            ys = [summaries[i][mkey] for i in idxs]
            ax.plot([xpos[i] for i in idxs], ys, "o-", color=color, lw=1.5, ms=6, label=label)
    xlabel = primary if primary else "run"
    for p, (mkey, title) in enumerate(SWEEP_PANELS):
        ax = axes[p // 2, p % 2]
        ax.set_title(title)
        ax.set_ylabel(title.replace("final ", ""))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if numeric:
            vals = sorted(set(xpos))
            pos = [v for v in vals if v > 0]
            if pos and max(pos) / min(pos) >= 10:
                if min(vals) <= 0:
                    ax.set_xscale("symlog", linthresh=min(pos))
                else:
                    ax.set_xscale("log")
            ax.set_xticks(vals)
            ax.set_xticklabels(["{:g}".format(v) for v in vals])
        else:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=20, ha="right")
        if mkey == "drop_fraction":
            ax.set_ylim(bottom=0)
        if len(groups) > 1:
            _legend(ax, fontsize="small")
    fig.suptitle("sweep over {} ({} runs): final metrics (last {:.0%} of steps)".format(
        xlabel, len(runs), window_frac))
    return _save(fig, out)


def plot_overlay_loss(runs: Sequence, out: PathLike) -> Path:
    """Training (smoothed) and validation bpb against step, a line per run."""
    fig, axes = _figure(1, 2, figsize=(12, 4.5), sharey=True)
    colors = run_colors(len(runs))
    for r, c in zip(runs, colors):
        bpt = r.bytes_per_token
        if r.train["step"].size:
            y = metrics.bits_per_byte(r.train["loss"], bpt)
            axes[0, 0].plot(r.train["step"], smooth(y, auto_window(y.size)), color=c, lw=1.4, label=r.label)
        if r.eval["step"].size:
            axes[0, 1].plot(r.eval["step"], metrics.bits_per_byte(r.eval["loss"], bpt), "o-", ms=3,
                            color=c, lw=1.4, label=r.label)
    for ax, title in zip(axes[0], ["training loss (moving mean)", "validation loss"]):
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (bits per byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            _legend(ax, fontsize="small")
        else:
            _no_data(ax, "no data")
    fig.suptitle("loss across {} runs".format(len(runs)))
    return _save(fig, out)


def _layer_mean(run, fn) -> Tuple[np.ndarray, np.ndarray]:
    ys = [np.asarray(fn(l), dtype=np.float64) for l in run.layer_list if l.steps_logged]
    if not ys:
        return np.zeros(0), np.zeros(0)
    m = min(y.size for y in ys)
    with np.errstate(invalid="ignore"):
        y = np.nanmean(np.stack([y[:m] for y in ys]), axis=0)
    return _aligned(run.train["step"], y)


def plot_overlay_router(runs: Sequence, out: PathLike) -> Path:
    """Load imbalance, drop fraction and logit RMS (means over layers) against step, a line per run."""
    fig, axes = _figure(1, 3, figsize=(15, 4.3))
    panels = [
        (lambda l: metrics.load_imbalance(l.routed), "max / mean load", "load imbalance"),
        (lambda l: metrics.drop_fraction(l.routed, l.kept), "fraction dropped", "drop fraction"),
        (lambda l: l.logit_rms, "RMS", "router logit RMS"),
    ]
    colors = run_colors(len(runs))
    for r, c in zip(runs, colors):
        for ax, (fn, _, _) in zip(axes[0], panels):
            x, y = _layer_mean(r, fn)
            if y.size:
                ax.plot(x, smooth(y, auto_window(y.size)), color=c, lw=1.4, label=r.label)
    for ax, (_, ylabel, title) in zip(axes[0], panels):
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title + " (mean over layers)")
        ax.grid(alpha=0.3)
        if ax.lines:
            _legend(ax, fontsize="small")
        else:
            _no_data(ax, "no data")
    axes[0, 1].set_ylim(bottom=0)
    fig.suptitle("router statistics across {} runs".format(len(runs)))
    return _save(fig, out)


def plot_parallel_comm(run, out: PathLike) -> Optional[Path]:
    """Per rank and step: all-to-all megabytes sent and seconds spent communicating (runs on
    several ranks only; None otherwise)."""
    par = getattr(run, "parallel", {}) or {}
    if "a2a_sent_bytes" not in par or "comm_seconds" not in par:
        return None
    steps = run.train["step"]
    sent = np.asarray(par["a2a_sent_bytes"], dtype=float)
    comm = np.asarray(par["comm_seconds"], dtype=float)
    n = min(len(steps), len(sent), len(comm))
    if n == 0 or sent.ndim != 2:
        return None
    fig, axes = _figure(1, 2, figsize=(11, 4))
    a1, a2 = axes[0]
    colors = run_colors(sent.shape[1])
    for r in range(sent.shape[1]):
        a1.plot(steps[:n], np.where(sent[:n, r] < 0, np.nan, sent[:n, r] / 1e6), color=colors[r], label="rank {}".format(r))
        a2.plot(steps[:n], 1e3 * comm[:n, r], color=colors[r], label="rank {}".format(r))
    a1.set_xlabel("step")
    a1.set_ylabel("all-to-all MB sent to other ranks")
    a1.set_title("all-to-all volume per rank")
    a2.set_xlabel("step")
    a2.set_ylabel("ms in communication")
    a2.set_title("communication time per rank")
    _legend(a1)
    _legend(a2)
    fig.suptitle(_title_run(run))
    return _save(fig, out)


# --------------------------------------------------------------------------------------------
# Seeded studies (studies.py): every grid point over its seeds, with a band


def _study_x(study):
    """x positions of the grid points: the swept value when one numeric key is swept, else 0..G-1;
    returns (xs, tick labels, numeric, axis label)."""
    keys = []
    for p in study.points:
        keys += [k for k in study.values.get(p, {}) if k not in keys]
    if len(keys) == 1:
        vals = [study.values[p].get(keys[0]) for p in study.points]
        if all(_is_number(v) for v in vals) and len(set(vals)) == len(vals):
            return [float(v) for v in vals], ["{:g}".format(float(v)) for v in vals], True, keys[0]
    return list(range(len(study.points))), list(study.points), False, ", ".join(keys) or "grid point"


def _numeric_axis(ax, xs):
    vals = sorted(set(xs))
    pos = [v for v in vals if v > 0]
    if pos and max(pos) / min(pos) >= 10:
        if min(vals) <= 0:
            ax.set_xscale("symlog", linthresh=min(pos))
            ax.set_xlim(min(vals) - 0.3 * min(pos), max(vals) * 1.6)
        else:
            ax.set_xscale("log")
            ax.set_xlim(min(vals) / 1.6, max(vals) * 1.6)
    ax.set_xticks(vals)
    ax.set_xticklabels(["{:g}".format(v) for v in vals])


def plot_seeded_comparison(study, summaries, out: PathLike, baseline: Optional[str] = None,
                           panels: Sequence[Tuple[str, str]] = SWEEP_PANELS, level: float = 0.95) -> Path:
    """Final metrics per grid point over seeds: every seed as a dot, the mean with its t-interval
    (error bar; a shaded band joins the intervals when the swept key is numeric), the baseline
    drawn as a dashed line at its mean."""
    from . import stats
    xs, labels, numeric, xlabel = _study_x(study)
    ncols = 2
    nrows = int(math.ceil(len(panels) / ncols))
    fig, axes = _figure(nrows, ncols, figsize=(11, 3.7 * nrows + 0.4))
    for i, (key, title) in enumerate(panels):
        ax = axes[i // ncols, i % ncols]
        means, los, his = [], [], []
        for x, p in zip(xs, study.points):
            vals = [summaries[id(r)].get(key, float("nan")) for _, r in sorted(study.runs[p].items())]
            finite = [v for v in vals if v is not None and math.isfinite(v)]
            ci = stats.mean_ci(finite, level)
            means.append(ci.mean)
            los.append(ci.lo)
            his.append(ci.hi)
            if finite:
                jitter = (np.linspace(-0.08, 0.08, len(finite)) if not numeric else np.zeros(len(finite)))
                ax.scatter(np.asarray([x] * len(finite)) + jitter, finite, s=14, color="0.55", zorder=2,
                           label="one seed" if x == xs[0] else None)
            if ci.n >= 2:
                ax.errorbar([x], [ci.mean], yerr=[[ci.mean - ci.lo], [ci.hi - ci.mean]], fmt="o",
                            color="tab:red" if p == baseline else "tab:blue", ms=6, capsize=4, lw=1.6, zorder=3,
                            label=("mean, {:.0%} interval".format(level) if x == xs[0] else None))
            elif ci.n == 1:
                ax.plot([x], [ci.mean], "o", color="tab:blue", ms=6, zorder=3)
        if numeric and any(math.isfinite(v) for v in los):
            order = np.argsort(xs)
            ax.fill_between(np.asarray(xs)[order], np.asarray(los)[order], np.asarray(his)[order],
                            color="tab:blue", alpha=0.15, lw=0)
            ax.plot(np.asarray(xs)[order], np.asarray(means)[order], "-", color="tab:blue", lw=1.2)
        if baseline in study.points:
            b = means[study.points.index(baseline)]
            if math.isfinite(b):
                ax.axhline(b, color="tab:red", ls="--", lw=1, label="baseline ({})".format(baseline))
        if not ax.collections and not ax.lines:
            _no_data(ax, "no data")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if numeric:
            _numeric_axis(ax, xs)
        else:
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, rotation=20, ha="right")
        if key == "drop_fraction":
            ax.set_ylim(bottom=0)
        if i == 0:
            _legend(ax, fontsize="small")
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    fig.suptitle("{} grid points x {} seeds: final metrics, mean and {:.0%} t-interval over seeds".format(
        len(study.points), len(study.seeds), level))
    return _save(fig, out)


def _band(ax, x, curves, color, label, level):
    from . import stats
    mean, lo, hi = stats.band(curves, level)
    if not mean.size:
        return
    x = np.asarray(x)[: mean.size]
    ax.plot(x, mean, color=color, lw=1.5, label=label)
    if len(curves) > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def plot_seeded_loss(study, out: PathLike, level: float = 0.95) -> Path:
    """Training (moving mean) and validation bpb against step: per grid point the mean over
    seeds with the band of its t-interval."""
    fig, axes = _figure(1, 2, figsize=(12, 4.5), sharey=True)
    colors = run_colors(len(study.points))
    for p, c in zip(study.points, colors):
        runs = [r for _, r in sorted(study.runs[p].items())]
        train, val = [], []
        x_train = x_val = None
        for r in runs:
            if r.train["step"].size:
                y = metrics.bits_per_byte(r.train["loss"], r.bytes_per_token)
                train.append(smooth(y, auto_window(y.size)))
                x_train = r.train["step"] if x_train is None or r.train["step"].size < len(x_train) else x_train
            if r.eval["step"].size:
                val.append(metrics.bits_per_byte(r.eval["loss"], r.bytes_per_token))
                x_val = r.eval["step"] if x_val is None or r.eval["step"].size < len(x_val) else x_val
        label = "{} ({} seeds)".format(p, len(runs))
        if train:
            _band(axes[0, 0], x_train, train, c, label, level)
        if val:
            _band(axes[0, 1], x_val, val, c, label, level)
    for ax, title in zip(axes[0], ["training loss (moving mean)", "validation loss"]):
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (bits per byte)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            _legend(ax, fontsize="small")
        else:
            _no_data(ax, "no data")
    fig.suptitle("loss per grid point: mean over seeds, band = {:.0%} t-interval".format(level))
    return _save(fig, out)


def plot_seeded_router(study, out: PathLike, level: float = 0.95) -> Path:
    """Load imbalance, drop fraction and logit RMS (means over layers) against step: per grid
    point the mean over seeds with the band of its t-interval."""
    fig, axes = _figure(1, 3, figsize=(15, 4.3))
    panels = [
        (lambda l: metrics.load_imbalance(l.routed), "max / mean load", "load imbalance"),
        (lambda l: metrics.drop_fraction(l.routed, l.kept), "fraction dropped", "drop fraction"),
        (lambda l: l.logit_rms, "RMS", "router logit RMS"),
    ]
    colors = run_colors(len(study.points))
    for p, c in zip(study.points, colors):
        runs = [r for _, r in sorted(study.runs[p].items())]
        for ax, (fn, _, _) in zip(axes[0], panels):
            curves, xs = [], None
            for r in runs:
                x, y = _layer_mean(r, fn)
                if y.size:
                    curves.append(smooth(y, auto_window(y.size)))
                    xs = x if xs is None or len(x) < len(xs) else xs
            if curves:
                _band(ax, xs, curves, c, p, level)
    for ax, (_, ylabel, title) in zip(axes[0], panels):
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title + " (mean over layers)")
        ax.grid(alpha=0.3)
        if ax.lines:
            _legend(ax, fontsize="small")
        else:
            _no_data(ax, "no data")
    axes[0, 1].set_ylim(bottom=0)
    fig.suptitle("router statistics per grid point: mean over seeds, band = {:.0%} t-interval".format(level))
    return _save(fig, out)


# --------------------------------------------------------------------------------------------
# Expert weights across checkpoints (checkpoint.expert_weight_trajectory)

_MATRIX_LABELS = {"w1": "w1 (gate)", "w3": "w3 (up)", "w2": "w2 (down)"}


def plot_expert_similarity(traj: dict, block: int, out: PathLike,
                           indices: Sequence[int] = (0, -1)) -> Path:
    """Cosine similarity between the experts of one MoE block (each expert's matrix flattened),
    one heatmap per matrix (columns: w1, w3, w2) and per checkpoint (rows: `indices` into
    traj["steps"], by default the first and the last). Diagonal = 1; off-diagonal near 0 means
    the experts are unrelated directions, near 1 that they learned the same function."""
    d = traj[block]
    keys = [k for k in ("w1", "w3", "w2") if k in d["similarity"]]
    steps = traj["steps"]
    rows = sorted({i % len(steps) for i in indices})
    fig, axes = _figure(len(rows), len(keys), figsize=(3.3 * len(keys) + 0.8, 3.0 * len(rows) + 0.6))
    im = None
    for r, i in enumerate(rows):
        for c, k in enumerate(keys):
            ax = axes[r, c]
            sim = d["similarity"][k][i]
            e = sim.shape[0]
            im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title("{}, step {}\nmean off-diag {:.3f}".format(
                _MATRIX_LABELS.get(k, k), int(steps[i]), float(d["mean_similarity"][k][i])), fontsize=9)
            if e <= 32:
                ax.set_xticks(range(e))
                ax.set_yticks(range(e))
                ax.tick_params(labelsize=7)
            ax.set_xlabel("expert")
            ax.set_ylabel("expert")
    if im is not None:
        cb = fig.colorbar(im, ax=axes, shrink=0.8, pad=0.02)
        cb.set_label("cosine similarity")
    fig.suptitle("MoE block {}: similarity between experts".format(block))
    return _save(fig, out)


def plot_expert_weights_over_training(traj: dict, out: PathLike) -> Path:
    """Across checkpoints: (left) the mean off-diagonal cosine similarity between experts per MoE
    block and matrix, (right) the L2 norm of each expert's router column per block (how strongly
    the router can prefer that expert; router biases are not included)."""
    steps = traj["steps"]
    blocks = traj["blocks"]
    fig, axes = _figure(1, 2, figsize=(12, 4.5))
    ax, ax2 = axes[0, 0], axes[0, 1]
    colors = layer_colors(max(1, len(blocks)))
    styles = {"w1": "-", "w3": "--", "w2": ":"}
    for bi, b in enumerate(blocks):
        for k, s in traj[b]["mean_similarity"].items():
            ax.plot(steps, s, styles.get(k, "-"), color=colors[bi], marker="o", ms=3,
                    label="block {} {}".format(b, _MATRIX_LABELS.get(k, k)))
        norms = traj[b]["router_norm"]
        for e in range(norms.shape[1]):
            ax2.plot(steps, norms[:, e], color=colors[bi], alpha=0.35 + 0.65 * (e + 1) / norms.shape[1],
                     marker="o", ms=2, lw=1, label="block {}".format(b) if e == 0 else None)
    if not blocks:
        _no_data(ax, "no MoE blocks in these checkpoints")
        _no_data(ax2, "no MoE blocks in these checkpoints")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean cosine similarity between experts")
    ax.set_title("expert similarity (off-diagonal mean)")
    _legend(ax, fontsize=7)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("router column L2 norm")
    ax2.set_title("router weight norm per expert (one line each)")
    _legend(ax2, fontsize=7)
    return _save(fig, out)
