"""Synthetic moelab run logs that follow the DESIGN.md HDF5 contract exactly.

For tests and notebooks before (or without) the C++ trainer. The numbers are made up but tell
the stories the real logs should: loss falls like a power law from ln 256 nats (a uniform byte
model); without a load-balancing loss (aux_alpha = 0) the load collapses onto a few experts,
with aux_alpha about 0.01 it stays near balance, a large aux_alpha costs a little loss; capacity
(capacity_factor > 0) drops the overflow of the busiest experts; the z-loss keeps router logits
small; experts specialise on token categories as training goes on.

The router statistics are internally consistent: aux_loss = E * sum_i f_i P_i with
f_i = routed_i / (T k) and P_i = mean_prob_i, kept = min(routed, C) with C = ceil(cf T k / E),
z_loss = mean logsumexp^2 of the logits whose RMS is logit_rms.

Besides the contract it writes /router/layer_XX/top1_prob [N] (mean top-1 probability) and,
when categories are on, /router/layer_XX/category_counts [M, E, C] with attribute
category_names (see reader.py), aligned with /eval/step.
"""
from __future__ import annotations

from ._deps import require as _require

_require(("numpy", "h5py"))

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

BYTE_CATEGORIES = ["lowercase", "uppercase", "digit", "whitespace", "punctuation"]
BYTE_FREQ = [0.72, 0.03, 0.01, 0.18, 0.06]          # roughly the Brown corpus
SYNTHETIC_VERSION = "0.1.0-synthetic"

# Sweepable config keys -> write_synthetic_run keyword.
SWEEP_KEYS = {
    "router.aux_alpha": "aux_alpha",
    "router.capacity_factor": "capacity_factor",
    "router.z_loss": "z_loss",
    "model.experts": "experts",
    "model.top_k": "top_k",
    "train.seed": "seed",
    "train.lr": "lr",
}


def _config_text(kw: Dict[str, Any], moe_layer_count: int) -> str:
    model_layers = moe_layer_count * kw["moe_every"]
    return (
        "[model]\nlayers = {L}\nd_model = 64\nheads = 4\nexperts = {experts}\ntop_k = {top_k}\n"
        "d_expert = 128\nmoe_every = {moe_every}\nshared_experts = 0\n\n"
        "[router]\nscore = softmax\nnormalize = true\npolicy = topk\nnoise = none\nnoise_eps = 0.01\n"
        "aux_alpha = {aux_alpha:g}\nz_loss = {z_loss:g}\ncapacity_factor = {cf:g}\n"
        "drop_policy = position\nbias_update_rate = 0\n\n"
        "[train]\nsteps = {steps}\nbatch = {batch}\nseq = {seq}\nlr = {lr:g}\nwarmup = {warmup}\n"
        "seed = {seed}\n\n"
        "[data]\nsource = {source}\n\n"
        "[log]\nevery = {log_every}\neval_every = {eval_every}\ncheckpoint_every = 0\n"
        "checkpoint_dir = {ckpt}\n"
    ).format(L=model_layers, cf=kw["capacity_factor"], ckpt=kw["checkpoint_dir"], **{
        k: v for k, v in kw.items() if k not in ("capacity_factor", "checkpoint_dir")})


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _write(g: h5py.Group, name: str, data: np.ndarray) -> None:
    """Chunked, resizable along the step axis: how an appending writer lays datasets out."""
    data = np.asarray(data)
    maxshape = (None,) + data.shape[1:]
    chunks = (max(1, min(1024, data.shape[0])),) + data.shape[1:] if data.shape[0] else None
    g.create_dataset(name, data=data, maxshape=maxshape, chunks=chunks or True)


def write_synthetic_run(
    path: Union[str, Path],
    *,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    steps: int = 300,
    log_every: int = 1,
    eval_every: int = 25,
    batch: int = 8,
    seq: int = 128,
    capacity_factor: float = 0.0,
    drop_fraction: Optional[float] = None,
    aux_alpha: float = 0.01,
    z_loss: float = 1e-3,
    lr: float = 3e-3,
    warmup: Optional[int] = None,
    seed: int = 0,
    categories: Optional[str] = "bytes",
    source: str = "brown",
    moe_every: int = 1,
    backend: str = "cpu",
    killed: bool = False,
    checkpoint_dir: Optional[str] = None,
) -> Path:
    """Write one fake run log at `path` and return it.

    layers: MoE layers written (/router/layer_XX, XX = i * moe_every + moe_every - 1).
    steps, log_every: N = steps // log_every logged steps; eval every `eval_every` steps.
    capacity_factor: 0 = dropless; drop_fraction (0..1), if given, overrides it with the
        capacity factor that drops about that fraction on average.
    aux_alpha: load-balancing weight (0 -> load collapse). z_loss: z-loss weight (logit size).
    categories: "bytes" (Brown byte classes), "sources" (true sources of synthetic data,
        sets data.source = synthetic) or None (no category_counts).
    killed: leave datasets of unequal length, as a run killed between flushes does.
    """
    if categories not in (None, "bytes", "sources"):
        raise ValueError("categories must be None, 'bytes' or 'sources'")
    if not (1 <= top_k <= experts):
        raise ValueError("need 1 <= top_k <= experts")
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if categories == "sources":
        source = "synthetic"
    warmup = max(1, steps // 20) if warmup is None else warmup
    n = max(1, steps // log_every)
    step = (np.arange(1, n + 1) * log_every).astype(np.int64)
    x = step / float(steps)                               # training progress in (0, 1]
    t_tokens = batch * seq                                # T: tokens per router call
    assignments = t_tokens * top_k

    # ---- router statistics per layer (first, since the loss depends on balance and drops)
    balance = aux_alpha / (aux_alpha + 0.003)             # 0 (no aux loss) .. 1 (strong)
    skew = (1.0 - balance) ** 1.5 * 2.0 * (1.0 - np.exp(-4.0 * x)) + 0.06  # [N]
    r_final = (0.8 + 2.2 / (1.0 + 1000.0 * z_loss)) * (1.0 + 0.2 * (1.0 - balance))
    moe_idx = [i * moe_every + moe_every - 1 for i in range(layers)]
    routed_all, prob_all = [], []
    for li in range(layers):
        z0 = rng.normal(size=experts)
        walk = np.cumsum(rng.normal(scale=0.08, size=(n, experts)), axis=0)
        pref = z0[None, :] + walk
        pref = (pref - pref.mean(1, keepdims=True)) / (pref.std(1, keepdims=True) + 1e-9)
        q = _softmax(skew[:, None] * (1.0 + 0.15 * li) * pref)
        routed = np.stack([rng.multinomial(assignments, qi) for qi in q]).astype(np.int64)
        routed = np.minimum(routed, t_tokens)            # an expert sees a token at most once
        routed_all.append(routed)
        prob_all.append(0.75 * _softmax(0.8 * skew[:, None] * pref) + 0.25 / experts)

    if drop_fraction is not None:
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError("drop_fraction must be in [0, 1)")
        capacity_factor = 0.0 if drop_fraction == 0 else _cf_for_drop(
            routed_all, drop_fraction, t_tokens, top_k, experts)
    cap = math.ceil(capacity_factor * t_tokens * top_k / experts) if capacity_factor > 0 else None
    kept_all = [np.minimum(r, cap) if cap is not None else r.copy() for r in routed_all]
    total_routed = sum(float(r.sum()) for r in routed_all)
    mean_drop = 1.0 - sum(float(k.sum()) for k in kept_all) / total_routed if total_routed else 0.0

    # ---- losses (nats per byte)
    l_inf = 1.30 + 2.0 * aux_alpha + 0.18 * (1.0 - balance) + 0.9 * mean_drop
    tau = max(1.0, 0.02 * steps)
    clean = l_inf + (math.log(256.0) - l_inf) / (1.0 + step / tau) ** 0.75
    train_loss = clean * (1.0 + rng.normal(scale=0.025, size=n))
    e_step = np.arange(eval_every, steps + 1, eval_every, dtype=np.int64)
    e_clean = l_inf + 0.04 + (math.log(256.0) - l_inf) / (1.0 + e_step / tau) ** 0.75
    eval_loss = e_clean * (1.0 + rng.normal(scale=0.005, size=e_step.shape[0]))
    lr_sched = np.where(step <= warmup, lr * step / warmup,
                        lr * (0.1 + 0.45 * (1 + np.cos(np.pi * np.clip((step - warmup) / max(1, steps - warmup), 0, 1)))))
    grad_norm = (2.0 * np.exp(-3.0 * x) + 0.4) * np.exp(rng.normal(scale=0.15, size=n))
    spikes = rng.random(n) < 0.01
    grad_norm[spikes] *= rng.uniform(3, 8, size=int(spikes.sum()))
    tps = 21000.0 * (1.0 + rng.normal(scale=0.03, size=n))
    tps[0] *= 0.4                                          # first step pays for warm-up

    kw = dict(layers=layers, experts=experts, top_k=top_k, steps=steps, log_every=log_every,
              eval_every=eval_every, batch=batch, seq=seq, capacity_factor=capacity_factor,
              aux_alpha=aux_alpha, z_loss=z_loss, lr=lr, warmup=warmup, seed=seed, source=source,
              moe_every=moe_every, checkpoint_dir=checkpoint_dir or ("checkpoints/" + path.stem))
    config = _config_text(kw, layers)

    with h5py.File(str(path), "w") as h5:
        h5.attrs["config"] = config
        h5.attrs["moelab_version"] = SYNTHETIC_VERSION
        h5.attrs["backend"] = backend
        h5.attrs["generator"] = "analysis/make_synthetic_log.py"
        tg = h5.create_group("train")
        _write(tg, "step", step)
        _write(tg, "loss", train_loss.astype(np.float32))
        _write(tg, "lr", lr_sched.astype(np.float32))
        _write(tg, "grad_norm", grad_norm.astype(np.float32))
        _write(tg, "tokens_per_sec", tps.astype(np.float32))
        eg = h5.create_group("eval")
        _write(eg, "step", e_step)
        _write(eg, "loss", eval_loss.astype(np.float32))
        rg = h5.create_group("router")
        for li, idx in enumerate(moe_idx):
            lg = rg.create_group("layer_{:02d}".format(idx))
            routed, kept, prob = routed_all[li], kept_all[li], prob_all[li]
            f = routed / float(assignments)
            aux = experts * (f * prob).sum(axis=1)
            r = (0.2 + (r_final - 0.2) * (1.0 - np.exp(-3.0 * x)) * (1.0 + 0.1 * li)) \
                * (1.0 + rng.normal(scale=0.02, size=n))
            lse = math.log(experts) + 0.5 * r ** 2
            zl = lse ** 2 * (1.0 + rng.normal(scale=0.01, size=n))
            ent = math.log(experts) / (1.0 + 0.25 * r ** 2) * (1.0 - 0.1 * (1.0 - balance) * x)
            lmax = r * math.sqrt(2.0 * math.log(t_tokens * experts)) * (1.0 + np.abs(rng.normal(scale=0.05, size=n)))
            top1 = 1.0 / experts + (1.0 - 1.0 / experts) * 0.8 * (1.0 - ent / math.log(experts))
            _write(lg, "routed", routed)
            _write(lg, "kept", kept)
            _write(lg, "mean_prob", prob.astype(np.float32))
            _write(lg, "aux_loss", aux.astype(np.float32))
            _write(lg, "z_loss", zl.astype(np.float32))
            _write(lg, "entropy", ent.astype(np.float32))
            _write(lg, "logit_rms", r.astype(np.float32))
            _write(lg, "logit_max", lmax.astype(np.float32))
            _write(lg, "top1_prob", top1.astype(np.float32))
            if categories is not None:
                cc, names = _category_counts(rng, e_step / float(steps), experts, top_k,
                                             4 * t_tokens, categories, li)
                _write(lg, "category_counts", cc)
                lg["category_counts"].attrs["category_names"] = np.array(names, dtype=h5py.string_dtype())
        if killed:
            _simulate_kill(h5, n, e_step.shape[0])
    return path


def _cf_for_drop(routed_all: Sequence[np.ndarray], target: float, t: int, k: int, e: int) -> float:
    """Capacity factor whose fixed C = ceil(cf T k / E) drops about `target` of all assignments."""
    total = sum(float(r.sum()) for r in routed_all)

    def drop(cf: float) -> float:
        cap = math.ceil(cf * t * k / e)
        return 1.0 - sum(float(np.minimum(r, cap).sum()) for r in routed_all) / total

    lo, hi = 1e-3, float(e)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if drop(mid) > target:
            lo = mid
        else:
            hi = mid
    return round(hi, 4)


def _category_counts(rng, progress: np.ndarray, experts: int, top_k: int, tokens: int,
                     kind: str, layer: int):
    """[M, E, C] assignments of tokens of each category to experts, sharpening with training."""
    if kind == "sources":
        c = min(4, experts)
        names = ["source_{}".format(i) for i in range(c)]
        freq = np.full(c, 1.0 / c)
        strength = 4.0
    else:
        names = list(BYTE_CATEGORIES)
        c = len(names)
        freq = np.asarray(BYTE_FREQ)
        strength = 2.5
    affinity = rng.normal(scale=0.3, size=(experts, c))
    for e in range(experts):
        affinity[e, e % c] += 1.0                          # expert e prefers category e mod C
    out = np.zeros((progress.shape[0], experts, c), dtype=np.int64)
    for m, prog in enumerate(progress):
        sharp = strength * (1.0 - math.exp(-3.0 * prog)) * (1.0 + 0.3 * layer)
        per_cat = rng.multinomial(tokens, freq)
        q = _softmax(sharp * affinity, axis=0)             # p(e | c), columns sum to 1
        for ci in range(c):
            out[m, :, ci] = rng.multinomial(per_cat[ci] * top_k, q[:, ci])
    return out, names


def _simulate_kill(h5: h5py.File, n: int, m: int) -> None:
    """Shrink some datasets as if the run died between flushes of different datasets."""
    cut = max(1, int(0.7 * n))
    for name in ("step", "loss", "lr"):
        h5["train"][name].resize(min(n, cut + 2), axis=0)
    layers = sorted(h5["router"].keys())
    for name, ds in h5["router"][layers[-1]].items():
        if name != "category_counts":
            ds.resize(cut, axis=0)
    if m > 1:
        h5["eval"]["loss"].resize(m - 1, axis=0)


def write_synthetic_sweep(
    directory: Union[str, Path],
    key: str = "router.aux_alpha",
    values: Iterable[Any] = (0.0, 0.001, 0.01, 0.1),
    index_name: Optional[str] = "sweep.json",
    **kwargs: Any,
) -> List[Path]:
    """Write one run per value of `key` into `directory`, plus the sweep index (unless None).

    The index is {"keys": [key], "runs": {"<file>.h5": {key: value}}}. Other keywords go to
    write_synthetic_run for every run. Returns the run paths.
    """
    if key not in SWEEP_KEYS:
        raise ValueError("cannot sweep {!r}; choose one of {}".format(key, ", ".join(sorted(SWEEP_KEYS))))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    leaf = key.split(".")[-1]
    paths = []
    index: Dict[str, Any] = {"keys": [key], "runs": {}}
    for v in values:
        name = "run_{}_{}.h5".format(leaf, "{:g}".format(v) if isinstance(v, float) else v)
        kw = dict(kwargs)
        kw[SWEEP_KEYS[key]] = v
        paths.append(write_synthetic_run(d / name, **kw))
        index["runs"][name] = {key: v}
    if index_name:
        (d / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def write_synthetic_seeded_sweep(
    directory: Union[str, Path],
    key: str = "router.aux_alpha",
    values: Iterable[Any] = (0.0, 0.01, 0.1),
    seeds: Iterable[int] = (1, 2, 3, 4, 5),
    baseline: Optional[Any] = None,
    **kwargs: Any,
) -> List[Path]:
    """A seeded study as `moelab train` with train.seeds writes it: one run per (value, seed),
    named run_<leaf>=<value>_seed=<seed>.h5, and sweep.json with each run's grid point and seed,
    the groups and the baseline (the grid point of `baseline`, a value of `key`). The seed feeds
    write_synthetic_run's random draws, so the seeds of one grid point differ by noise and the
    grid points by the stories the knobs tell. Returns the run paths (seeds outermost)."""
    if key not in SWEEP_KEYS or key == "train.seed":
        raise ValueError("cannot sweep {!r} over seeds; choose one of {}".format(
            key, ", ".join(sorted(k for k in SWEEP_KEYS if k != "train.seed"))))
    values, seeds = list(values), [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    leaf = key.split(".")[-1]

    def text(v):
        return "{:g}".format(v) if isinstance(v, float) else str(v)

    points = ["{}={}".format(leaf, text(v)) for v in values]
    if baseline is not None and text(baseline) not in [text(v) for v in values]:
        raise ValueError("baseline {!r} is not one of the values {}".format(baseline, values))
    paths, runs = [], []
    for s in seeds:
        for v, point in zip(values, points):
            name = "{}_seed={}".format(point, s)
            kw = dict(kwargs)
            kw[SWEEP_KEYS[key]] = v
            kw["seed"] = s
            paths.append(write_synthetic_run(d / "run_{}.h5".format(name), **kw))
            runs.append({"file": "run_{}.h5".format(name), "name": name, "point": point, "seed": s,
                         "values": {key: text(v)}})
    index = {
        "axes": [key], "seeds": seeds,
        "baseline": None if baseline is None else "{}={}".format(leaf, text(baseline)),
        "planned_runs": len(runs), "finished_runs": len(runs),
        "groups": [{"point": p, "values": {key: text(v)}, "seeds": seeds,
                    "files": ["run_{}_seed={}.h5".format(p, s) for s in seeds]} for v, p in zip(values, points)],
        "runs": runs,
    }
    (d / "sweep.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def write_synthetic_checkpoints(
    directory: Union[str, Path],
    steps: Sequence[int] = (0, 20, 40, 60),
    blocks: int = 2,
    experts: int = 4,
    d_model: int = 16,
    d_expert: int = 16,
    seed: int = 1,
) -> List[Path]:
    """Checkpoints of one made-up run, as `moelab train` with log.checkpoint_every writes them
    (DIR/step_NNNNNN.ckpt, format 2, written by checkpoint.write_checkpoint): for each MoE block
    the router weights block{b}.moe.router.w [D, E] and the experts block{b}.moe.experts.w1
    [E, D, 2F] ([gate | up]) and w2 [E, F, D], plus their adam.m/adam.v state and the meta of a
    training state. The story: experts start as independent random matrices (cosine similarity
    about 0), and training adds a component shared by all experts (similarity rises) and one of
    their own; the router columns grow at expert-specific rates. Returns the paths."""
    from .checkpoint import write_checkpoint

    rng = np.random.default_rng(seed)
    d, f, e = d_model, d_expert, experts
    final = max(max(steps), 1)
    shapes = {"router.w": (d, e), "experts.w1": (e, d, 2 * f), "experts.w2": (e, f, d)}
    init = {(b, k): rng.normal(0, 1 / math.sqrt(s[-2]), size=s) for b in range(blocks) for k, s in shapes.items()}
    shared = {(b, k): rng.normal(0, 1 / math.sqrt(s[-2]), size=s[1:]) for b in range(blocks)
              for k, s in shapes.items() if k.startswith("experts")}
    own = {(b, k): rng.normal(0, 1 / math.sqrt(s[-2]), size=s) for b in range(blocks) for k, s in shapes.items()}
    growth = rng.uniform(0.5, 3.0, size=(blocks, e))
    config = ("[model]\nlayers = {b}\nd_model = {d}\nexperts = {e}\nd_expert = {f}\nmoe_every = 1\n"
              "[train]\nsteps = {s}\n[data]\nsource = synthetic\n").format(b=blocks, d=d, e=e, f=f, s=final)
    run_id = "{:032x}".format(int(rng.integers(0, 2 ** 62)))
    out = []
    for step in steps:
        p = step / final
        tensors: Dict[str, np.ndarray] = {}
        for b in range(blocks):
            for k in shapes:
                w = init[(b, k)] * (1 - 0.3 * p) + 0.8 * p * own[(b, k)]
                if k in ("experts.w1", "experts.w2"):
                    w = w + 1.5 * p * shared[(b, k)][None]
                else:
                    w = w * (1 + p * growth[b])[None, :]
                name = "block{}.moe.{}".format(b, k)
                tensors[name] = w.astype(np.float32)
                tensors["adam.m." + name] = np.zeros_like(tensors[name])
                tensors["adam.v." + name] = np.full_like(tensors[name], 1e-6 * p)
        tensors["__blob__.data_state"] = np.array([1, seed, step], dtype=np.uint64)
        meta = {"kind": "moelab-train-state-1", "step": str(step), "config": config,
                "moelab_version": SYNTHETIC_VERSION, "run_id": run_id}
        out.append(write_checkpoint(Path(directory) / "step_{:06d}.ckpt".format(step), tensors, meta))
    return out
