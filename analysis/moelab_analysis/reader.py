"""Read moelab HDF5 run logs (the contract in DESIGN.md, "HDF5 run log").

Required (a missing one raises RunLogError naming the file and the path):

    /                         attributes config (INI text), moelab_version, backend
                              (a missing attribute only warns: the reader can still plot)
    /train/step, loss, lr, grad_norm, tokens_per_sec            [N]
    /eval/step, loss                                            [M]
    /router/layer_XX/routed, kept (int [N, E]), mean_prob (float [N, E]),
                     aux_loss, z_loss, entropy, logit_rms, logit_max (float [N])

Optional paths this reader understands beyond the contract:

    /router/layer_XX/category_counts   int [M, E, C]: at evaluation step m (aligned with
                                       /eval/step), the number of routed assignments of
                                       tokens of category c to expert e. Category names come
                                       from the attribute `category_names` (array of strings)
                                       on the dataset, else on the layer group, on /router or
                                       on the root; else "cat0", "cat1", ...
    /router/layer_XX/category_step     int [M]: the steps of category_counts when they are not
                                       those of /eval/step (overrides the alignment above).
    /router/layer_XX/<other>           any other dataset (for example top1_prob [N], the mean
                                       top-1 probability; dropped [N, E]; bias [N, E]) goes to
                                       RouterLayer.extras.
    /train/<other>, /eval/<other>      extra series go to Run.train / Run.eval as well.
    attribute bytes_per_token (root) or config [data] bytes_per_token: bytes per token for
                                       bits-per-byte conversion; default 1 (byte-level tokens).
    A file whose root has no /train but whose child groups each hold the full layout is a
    multi-run file (a sweep written as one group per run); load_run(path, group=NAME) reads
    one of them and find_runs expands all of them.

Killed runs: the trainer flushes at intervals, so a killed run can leave datasets of unequal
length. Per-step datasets under /train and /router are truncated to the shortest of the
required ones (N), those under /eval (and category_counts) to the shortest of /eval/step and
/eval/loss (M), with a RunLogWarning naming the datasets. Extra datasets longer than N are
cut to N; shorter ones are kept as they are (plots align them from the first step).
"""
from __future__ import annotations

from ._deps import require as _require

_require(("numpy", "h5py"))

import configparser  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

TRAIN_REQUIRED = ("step", "loss", "lr", "grad_norm", "tokens_per_sec")
EVAL_REQUIRED = ("step", "loss")
ROUTER_MATRIX = ("routed", "kept", "mean_prob")  # [N, E]
ROUTER_SERIES = ("aux_loss", "z_loss", "entropy", "logit_rms", "logit_max")  # [N]
ROUTER_REQUIRED = ROUTER_MATRIX + ROUTER_SERIES
ROOT_ATTRS = ("config", "moelab_version", "backend")
LAYER_RE = re.compile(r"^layer_(\d+)$")
SWEEP_INDEX_NAMES = ("sweep.json", "sweep_index.json")
# Config keys that differ between runs of a sweep without being swept (paths, names).
_NOT_SWEPT_RE = re.compile(r"(^|\.)(out|output|path|name|run_name|checkpoint_dir|.*_dir|.*_path|.*_file)$")


class RunLogError(Exception):
    """A run log that cannot be read: missing file, not HDF5, missing or malformed dataset."""


class RunLogWarning(UserWarning):
    """Something odd but recoverable in a run log (truncated datasets, missing attribute)."""


# --------------------------------------------------------------------------------------------
# Small helpers


def _decode(value: Any) -> Any:
    """HDF5 strings arrive as str, bytes or numpy arrays of either; return str / list / scalar."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in ("S", "O", "U"):
            return [_decode(v) for v in value.tolist()]
        if value.shape == ():
            return value.item()
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def parse_value(text: Any) -> Any:
    """'8' -> 8, '0.01' -> 0.01, 'true' -> True; anything else stays a (stripped) string."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def parse_config(text: str) -> Dict[str, Dict[str, str]]:
    """Parse the INI text of the `config` attribute into {section: {key: value-string}}.

    Keys before any section header (Boost.Program_options allows them) land in section "".
    Raises configparser.Error on malformed text.
    """
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"),
                                       strict=False, default_section="\x00no-default")
    parser.optionxform = str  # keep key case as written
    body = text or ""
    first = next((ln.strip() for ln in body.splitlines()
                  if ln.strip() and not ln.strip().startswith(("#", ";"))), "")
    if first and not first.startswith("["):
        body = "[\x00root]\n" + body
    parser.read_string(body)
    out: Dict[str, Dict[str, str]] = {}
    for section in parser.sections():
        name = "" if section == "\x00root" else section
        out[name] = {k: v for k, v in parser.items(section)}
    return out


def flatten_config(config: Dict[str, Dict[str, str]]) -> Dict[str, str]:
    """{"router": {"aux_alpha": "0.01"}} -> {"router.aux_alpha": "0.01"}."""
    flat = {}
    for section, items in config.items():
        for key, value in items.items():
            flat[(section + "." + key) if section else key] = value
    return flat


def _warn(msg: str, sink: List[str]) -> None:
    sink.append(msg)
    warnings.warn(RunLogWarning(msg), stacklevel=3)


# --------------------------------------------------------------------------------------------
# Data classes


@dataclass
class RouterLayer:
    """Router statistics of one MoE layer. N logged steps, E experts, M eval steps, C categories."""

    index: int                      # the XX of /router/layer_XX
    name: str                       # "layer_XX"
    routed: np.ndarray              # [N, E] int64 assignments per expert before capacity
    kept: np.ndarray                # [N, E] int64 assignments per expert after capacity
    mean_prob: np.ndarray           # [N, E] P_i, mean full-softmax probability
    aux_loss: np.ndarray            # [N] un-scaled E * sum_i f_i P_i (1 = perfect balance)
    z_loss: np.ndarray              # [N] un-scaled mean_t logsumexp(l_t)^2
    entropy: np.ndarray             # [N] mean router entropy (nats)
    logit_rms: np.ndarray           # [N]
    logit_max: np.ndarray           # [N] max |logit|
    extras: Dict[str, np.ndarray] = field(default_factory=dict)
    category_counts: Optional[np.ndarray] = None   # [M, E, C] or None
    category_names: List[str] = field(default_factory=list)   # [C]
    category_step: Optional[np.ndarray] = None     # [M] steps of category_counts

    @property
    def experts(self) -> int:
        return int(self.routed.shape[1]) if self.routed.ndim == 2 else 0

    @property
    def steps_logged(self) -> int:
        return int(self.routed.shape[0])

    @property
    def capacity_on(self) -> bool:
        """True when capacity dropped anything (kept != routed at some step)."""
        return bool(self.routed.size) and bool(np.any(self.kept != self.routed))

    @property
    def has_categories(self) -> bool:
        return self.category_counts is not None and self.category_counts.shape[0] > 0

    def series(self, name: str) -> np.ndarray:
        """A required dataset or an extra by name."""
        if name in ROUTER_REQUIRED:
            return getattr(self, name)
        if name in self.extras:
            return self.extras[name]
        raise KeyError("layer {} has no dataset {!r}".format(self.name, name))


@dataclass
class Run:
    """One run log. train/eval map dataset name -> array; router maps layer index -> RouterLayer."""

    path: Path
    group: str                                  # "/" or the run's group in a multi-run file
    config_text: str
    config: Dict[str, Dict[str, str]]
    attrs: Dict[str, Any]
    train: Dict[str, np.ndarray]
    eval: Dict[str, np.ndarray]
    router: Dict[int, RouterLayer]
    swept: Dict[str, Any] = field(default_factory=dict)    # filled by find_runs / infer_swept
    warnings: List[str] = field(default_factory=list)
    # /parallel of a run on several ranks (docs/run-log.md): dataset name -> [N, ranks] array
    # (a2a_sent_bytes, a2a_recv_bytes, comm_seconds, a2a_seconds); empty on one rank.
    parallel: Dict[str, np.ndarray] = field(default_factory=dict)
    # A seeded study's run (moelab train.seeds; from sweep.json, filled by find_runs): its grid
    # point (the run's name without "_seed=S") and its seed; None otherwise. studies.py groups by
    # them (and infers them from train.seed when no index names them).
    point: Optional[str] = None
    seed: Optional[int] = None
    index_baseline: Optional[str] = None   # the study's baseline grid point named in sweep.json
    planned_runs: Optional[int] = None     # the runs the study's sweep.json planned
    index_points: List[str] = field(default_factory=list)  # the study's grid points in grid order

    @property
    def layers(self) -> List[int]:
        return sorted(self.router)

    @property
    def layer_list(self) -> List[RouterLayer]:
        return [self.router[i] for i in self.layers]

    @property
    def moelab_version(self) -> str:
        return str(self.attrs.get("moelab_version", ""))

    @property
    def backend(self) -> str:
        return str(self.attrs.get("backend", ""))

    @property
    def name(self) -> str:
        base = self.path.stem
        return base if self.group in ("", "/") else base + ":" + self.group.strip("/")

    @property
    def label(self) -> str:
        """Swept values when known ("aux_alpha=0.01"), else the file name."""
        if self.swept:
            return ", ".join("{}={}".format(k.split(".")[-1], _fmt(v)) for k, v in self.swept.items())
        return self.name

    @property
    def flat_config(self) -> Dict[str, str]:
        return flatten_config(self.config)

    def cfg(self, key: str, default: Any = None) -> Any:
        """Typed config value by "section.key" (e.g. "router.aux_alpha"); default if absent."""
        flat = self.flat_config
        return parse_value(flat[key]) if key in flat else default

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token for bits-per-byte: attribute or [data] bytes_per_token, else 1."""
        value = self.attrs.get("bytes_per_token", self.cfg("data.bytes_per_token", 1.0))
        try:
            value = float(value)
        except (TypeError, ValueError):
            return 1.0
        return value if value > 0 else 1.0

    @property
    def steps(self) -> np.ndarray:
        return self.train["step"]

    @property
    def eval_steps(self) -> np.ndarray:
        return self.eval["step"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "{:g}".format(v)
    return str(v)


# --------------------------------------------------------------------------------------------
# Loading


def _open(path: Union[str, Path]) -> h5py.File:
    p = Path(path)
    if not p.exists():
        raise RunLogError("{}: no such file".format(p))
    if p.is_dir():
        raise RunLogError("{}: is a directory, not a run log (use find_runs for sweeps)".format(p))
    try:
        if not h5py.is_hdf5(str(p)):
            raise RunLogError("{}: not an HDF5 file".format(p))
        return h5py.File(str(p), "r")
    except RunLogError:
        raise
    except OSError as exc:
        raise RunLogError("{}: cannot open as HDF5 ({})".format(p, exc)) from exc


def run_groups(h5: h5py.Group) -> List[str]:
    """"/" when the root holds a run; else the names of child groups that hold one."""
    if "train" in h5:
        return ["/"]
    names = []
    for name, obj in h5.items():
        if isinstance(obj, h5py.Group) and "train" in obj and isinstance(obj["train"], h5py.Group):
            names.append(name)
    return sorted(names)


def _dataset(g: h5py.Group, name: str, path: Path, where: str) -> np.ndarray:
    full = where.rstrip("/") + "/" + name
    if name not in g:
        raise RunLogError("{}: missing required dataset {}".format(path, full))
    obj = g[name]
    if not isinstance(obj, h5py.Dataset):
        raise RunLogError("{}: {} is not a dataset".format(path, full))
    try:
        return np.asarray(obj[()])
    except Exception as exc:  # corrupted chunk in a killed run
        raise RunLogError("{}: cannot read {} ({})".format(path, full, exc)) from exc


def _group(h5: h5py.Group, name: str, path: Path, where: str) -> h5py.Group:
    full = where.rstrip("/") + "/" + name
    if name not in h5 or not isinstance(h5[name], h5py.Group):
        raise RunLogError("{}: missing required group {}".format(path, full))
    return h5[name]


def _extras(g: h5py.Group, skip: Iterable[str]) -> Dict[str, np.ndarray]:
    out = {}
    for name, obj in g.items():
        if name in skip or not isinstance(obj, h5py.Dataset):
            continue
        try:
            out[name] = np.asarray(obj[()])
        except Exception:  # an unreadable extra must not spoil the run
            continue
    return out


def _len0(a: np.ndarray) -> int:
    return int(a.shape[0]) if a.ndim >= 1 else 1


def _truncate(named: Dict[str, np.ndarray], n: int) -> Dict[str, np.ndarray]:
    return {k: (v[:n] if v.ndim >= 1 else v) for k, v in named.items()}


def list_layers(source: Union["Run", h5py.Group, str, Path]) -> List[int]:
    """Sorted MoE layer indices (the XX of /router/layer_XX) of a Run, an open h5py group or a path."""
    if isinstance(source, Run):
        return source.layers
    if isinstance(source, (str, Path)):
        with _open(source) as h5:
            return list_layers(h5)
    if "router" not in source:
        return []
    return sorted(int(m.group(1)) for m in (LAYER_RE.match(k) for k in source["router"].keys()) if m)


def load_run(path: Union[str, Path], group: Optional[str] = None) -> Run:
    """Read one run log into a Run. `group` picks a run inside a multi-run file.

    Raises RunLogError (message names the file and the HDF5 path) on a missing file, a file
    that is not HDF5, or a missing required dataset. Warns (RunLogWarning) and truncates on
    datasets of unequal length.
    """
    p = Path(path)
    with _open(p) as h5:
        groups = run_groups(h5)
        if group is None:
            if groups == ["/"]:
                group = "/"
            elif len(groups) >= 1:
                raise RunLogError("{}: holds {} runs as groups ({}); pass group=NAME".format(
                    p, len(groups), ", ".join(groups)))
            else:
                raise RunLogError("{}: missing required group /train".format(p))
        root = h5 if group in ("", "/") else h5.get(group)
        if root is None or not isinstance(root, h5py.Group):
            raise RunLogError("{}: no group {}".format(p, group))
        prefix = "" if group in ("", "/") else "/" + group.strip("/")
        return _load_from_group(p, root, prefix or "/", h5)


def _load_from_group(p: Path, root: h5py.Group, where: str, h5: h5py.File) -> Run:
    notes: List[str] = []
    base = "" if where == "/" else where

    # Attributes
    attrs = {k: _decode(v) for k, v in root.attrs.items()}
    for name in ROOT_ATTRS:
        if name not in attrs:
            _warn("{}: missing attribute {}@{}".format(p, where, name), notes)
    config_text = attrs.get("config", "") or ""
    if isinstance(config_text, list):
        config_text = "\n".join(str(x) for x in config_text)
    config_text = str(config_text)
    try:
        config = parse_config(config_text)
    except configparser.Error as exc:
        _warn("{}: attribute config is not valid INI ({}); config left empty".format(
            p, str(exc).splitlines()[0]), notes)
        config = {}

    # /train and router: one N for all of them
    tg = _group(root, "train", p, where)
    train = {k: _dataset(tg, k, p, base + "/train") for k in TRAIN_REQUIRED}
    train_extra = _extras(tg, TRAIN_REQUIRED)

    rg = root["router"] if "router" in root and isinstance(root["router"], h5py.Group) else None
    if rg is None:
        _warn("{}: no {}/router group (dense model?): no router statistics".format(p, base), notes)
    layer_raw = {}
    layer_extra = {}
    layer_groups = {}
    if rg is not None:
        for key in sorted(rg.keys()):
            m = LAYER_RE.match(key)
            if not m or not isinstance(rg[key], h5py.Group):
                continue
            lg = rg[key]
            lwhere = "{}/router/{}".format(base, key)
            raw = {k: _dataset(lg, k, p, lwhere) for k in ROUTER_REQUIRED}
            for k in ROUTER_MATRIX:
                if raw[k].ndim != 2:
                    raise RunLogError("{}: {}/{} must be 2-D [N, E], has shape {}".format(
                        p, lwhere, k, raw[k].shape))
            e_set = {raw[k].shape[1] for k in ROUTER_MATRIX}
            if len(e_set) != 1:
                raise RunLogError("{}: {}: routed/kept/mean_prob disagree on E: {}".format(
                    p, lwhere, {k: raw[k].shape for k in ROUTER_MATRIX}))
            for k in ROUTER_SERIES:
                if raw[k].ndim != 1:
                    raise RunLogError("{}: {}/{} must be 1-D [N], has shape {}".format(
                        p, lwhere, k, raw[k].shape))
            idx = int(m.group(1))
            layer_raw[idx] = raw
            layer_extra[idx] = _extras(lg, ROUTER_REQUIRED + ("category_counts", "category_step"))
            layer_groups[idx] = (key, lg, lwhere)

    lengths = {base + "/train/" + k: _len0(v) for k, v in train.items()}
    for idx, raw in layer_raw.items():
        for k, v in raw.items():
            lengths["{}/router/{}/{}".format(base, layer_groups[idx][0], k)] = _len0(v)
    n = min(lengths.values())
    n_max = max(lengths.values())
    if n != n_max:
        short = sorted(k for k, v in lengths.items() if v == n)
        _warn("{}: datasets of unequal length (killed run?): {} to {} steps; truncated to {} "
              "(shortest: {})".format(p, n, n_max, n, ", ".join(short[:4]) + (" ..." if len(short) > 4 else "")),
              notes)
    train = _truncate(train, n)
    for k, v in train_extra.items():
        train[k] = v[:n] if (v.ndim >= 1 and n <= _len0(v) <= n_max) else v

    # /eval: its own M
    eg = _group(root, "eval", p, where)
    evald = {k: _dataset(eg, k, p, base + "/eval") for k in EVAL_REQUIRED}
    eval_extra = _extras(eg, EVAL_REQUIRED)
    elen = {k: _len0(v) for k, v in evald.items()}
    m_len = min(elen.values())
    m_max = max(elen.values())
    if m_len != m_max:
        _warn("{}: /eval datasets of unequal length {}; truncated to {}".format(p, elen, m_len), notes)
    evald = _truncate(evald, m_len)
    for k, v in eval_extra.items():
        evald[k] = v[:m_len] if (v.ndim >= 1 and m_len <= _len0(v) <= m_max) else v

    # Router layers
    router: Dict[int, RouterLayer] = {}
    for idx in sorted(layer_raw):
        key, lg, lwhere = layer_groups[idx]
        raw = _truncate(layer_raw[idx], n)
        extras = {}
        for k, v in layer_extra[idx].items():
            extras[k] = v[:n] if (v.ndim >= 1 and n <= _len0(v) <= n_max) else v
        layer = RouterLayer(index=idx, name=key, extras=extras,
                            **{k: raw[k] for k in ROUTER_REQUIRED})
        if "category_counts" in lg:
            _read_categories(p, h5, root, rg, lg, lwhere, layer, evald["step"], notes)
        router[idx] = layer

    parallel: Dict[str, np.ndarray] = {}
    if "parallel" in root and isinstance(root["parallel"], h5py.Group):
        for k, ds in root["parallel"].items():
            v = np.asarray(ds[()])
            parallel[k] = v[:n] if v.ndim >= 1 and _len0(v) >= n else v

    if n == 0:
        _warn("{}: no logged training steps".format(p), notes)
    return Run(path=p, group=where, config_text=config_text, config=config, attrs=attrs,
               train=train, eval=evald, router=router, warnings=notes, parallel=parallel)


def _names_attr(*objs) -> Optional[List[str]]:
    for obj in objs:
        if obj is not None and "category_names" in obj.attrs:
            v = _decode(obj.attrs["category_names"])
            if isinstance(v, str):
                v = [s for s in re.split(r"[,\n]", v) if s.strip()]
            return [str(s).strip() for s in v]
    return None


def _read_categories(p, h5, root, rg, lg, lwhere, layer: RouterLayer, eval_step, notes) -> None:
    ds = lg["category_counts"]
    if not isinstance(ds, h5py.Dataset):
        return
    cc = np.asarray(ds[()])
    if cc.ndim != 3:
        _warn("{}: {}/category_counts should be [M, E, C], has shape {}; ignored".format(
            p, lwhere, cc.shape), notes)
        return
    if cc.shape[1] != layer.experts and layer.experts:
        _warn("{}: {}/category_counts has {} experts, routed has {}; ignored".format(
            p, lwhere, cc.shape[1], layer.experts), notes)
        return
    if "category_step" in lg and isinstance(lg["category_step"], h5py.Dataset):
        steps = np.asarray(lg["category_step"][()]).reshape(-1)
        source = lwhere + "/category_step"
    else:
        steps = np.asarray(eval_step).reshape(-1)
        source = "/eval/step"
    m = min(cc.shape[0], steps.shape[0])
    if cc.shape[0] != steps.shape[0]:
        _warn("{}: {}/category_counts has {} rows, {} has {}; truncated to {}".format(
            p, lwhere, cc.shape[0], source, steps.shape[0], m), notes)
    names = _names_attr(ds, lg, rg, root, h5)
    c = cc.shape[2]
    if not names or len(names) != c:
        if names:
            _warn("{}: {} category_names for {} categories; using cat0..".format(p, len(names), c), notes)
        names = ["cat{}".format(i) for i in range(c)]
    layer.category_counts = cc[:m]
    layer.category_step = steps[:m]
    layer.category_names = names


# --------------------------------------------------------------------------------------------
# Sweeps


def _read_sweep_index(directory: Path) -> Dict[str, Dict[str, Any]]:
    """Map run file name (or "file:group") -> {swept key: value} from sweep.json / sweep_index.json.

    Accepted shapes:
        {"runs": {"a.h5": {"router.aux_alpha": 0.01}, ...}, ...}
        {"runs": [{"file": "a.h5", "values": {...}}, ...]}     ("path"/"run" and "params"/"set" too)
        {"a.h5": {...}, "b.h5": {...}}
        [{"file": "a.h5", "values": {...}}, ...]
    """
    return _read_sweep_index_full(directory)[0]


def _read_sweep_index_full(directory: Path):
    """(file -> swept values, file -> {"point", "seed"} of a seeded study's runs, the index's
    {"baseline", "seeds", "planned_runs"}). moelab writes, per run, "point" and "seed" (a study
    with train.seeds lists its seeds under "seeds"; see experiments/study_cmd.cpp)."""
    values = _read_sweep_index_values(directory)
    meta: Dict[str, Dict[str, Any]] = {}
    head: Dict[str, Any] = {}
    for name in SWEEP_INDEX_NAMES:
        f = directory / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            break
        if not isinstance(data, dict):
            break
        seeded = bool(data.get("seeds"))
        groups = data.get("groups") if isinstance(data.get("groups"), list) else []
        head = {"baseline": data.get("baseline"), "seeds": data.get("seeds") or [],
                "planned_runs": data.get("planned_runs"),
                "points": [str(g["point"]) for g in groups if isinstance(g, dict) and "point" in g]}
        runs = data.get("runs")
        if seeded and isinstance(runs, list):
            for item in runs:
                if isinstance(item, dict) and item.get("file") and "seed" in item:
                    meta[Path(str(item["file"])).name] = {"point": str(item.get("point", "")),
                                                          "seed": int(item["seed"])}
        break
    return values, meta, head


def _read_sweep_index_values(directory: Path) -> Dict[str, Dict[str, Any]]:
    for name in SWEEP_INDEX_NAMES:
        f = directory / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            warnings.warn(RunLogWarning("{}: unreadable sweep index ({}); ignored".format(f, exc)))
            return {}
        runs = data.get("runs", data) if isinstance(data, dict) else data
        out: Dict[str, Dict[str, Any]] = {}
        if isinstance(runs, dict):
            for k, v in runs.items():
                if isinstance(v, dict):
                    out[str(k)] = dict(v)
        elif isinstance(runs, list):
            for item in runs:
                if not isinstance(item, dict):
                    continue
                fname = item.get("file") or item.get("path") or item.get("run")
                vals = item.get("values") or item.get("params") or item.get("set") or {}
                if fname and isinstance(vals, dict):
                    out[str(fname)] = dict(vals)
        return {Path(k).name if ":" not in k else k: v for k, v in out.items()}
    return {}


def infer_swept(runs: Sequence[Run], ignore: Optional[Iterable[str]] = None) -> List[str]:
    """Fill run.swept from the configs: keys whose value differs across runs, plus keys named in
    a [sweep] section of a run's resolved config (each run's own value of that key).

    Keys that name paths (checkpoint_dir, *_dir, *_path, out, name...) are ignored, as are keys
    in `ignore`. Values already in run.swept (from a sweep index) win. Returns the swept keys.
    """
    ignore = set(ignore or ())
    flats = [r.flat_config for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    differing = []
    # A [sweep] section left in a run's resolved config names the swept keys outright
    # ("router.aux_alpha = 0, 0.01" -> flat key "sweep.router.aux_alpha").
    for flat in flats:
        for k in flat:
            target = k[len("sweep."):]
            if k.startswith("sweep.") and target in flat and target not in differing and target not in ignore:
                differing.append(target)
    if len(runs) > 1:
        for k in keys:
            if k in ignore or _NOT_SWEPT_RE.search(k.split(".")[-1]) or k.startswith("sweep."):
                continue
            values = {f.get(k) for f in flats}
            if len(values) > 1 and k not in differing:
                differing.append(k)
    for run, flat in zip(runs, flats):
        merged = {k: parse_value(flat[k]) if k in flat else None for k in differing}
        merged.update(run.swept)
        run.swept = merged
    all_keys: List[str] = []
    for run in runs:
        for k in run.swept:
            if k not in all_keys:
                all_keys.append(k)
    return all_keys


def _sort_key(run: Run):
    out = []
    for v in run.swept.values():
        if isinstance(v, bool) or v is None:
            out.append((2, str(v)))
        elif isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out.append((0, float(v)))
        else:
            out.append((1, str(v)))
    return (out, run.name)


def find_runs(directory: Union[str, Path], pattern: str = "*.h5") -> List[Run]:
    """Load every run log in a sweep directory (non-recursive, `pattern`, sorted).

    Swept values: from sweep.json / sweep_index.json when present (run file -> {key: value}),
    completed by diffing the runs' configs (infer_swept). Runs are sorted by their swept values.
    A multi-run file contributes one Run per group. Raises RunLogError if the directory has no
    run logs; a file that fails to load raises (bad logs should not vanish from a comparison).
    """
    d = Path(directory)
    if not d.is_dir():
        raise RunLogError("{}: not a directory".format(d))
    files = sorted(f for f in d.glob(pattern) if f.is_file())
    if pattern == "*.h5":
        files += sorted(f for f in d.glob("*.hdf5") if f.is_file())
    if not files:
        raise RunLogError("{}: no run logs ({}) in this directory".format(d, pattern))
    index, meta, head = _read_sweep_index_full(d)
    runs: List[Run] = []
    for f in files:
        runs.extend(load_all(f))
    for r in runs:
        key = r.path.name if r.group in ("", "/") else "{}:{}".format(r.path.name, r.group.strip("/"))
        vals = index.get(key) or index.get(r.path.name) or index.get(r.group.strip("/"))
        if vals:
            r.swept = {k: (parse_value(v) if isinstance(v, str) else v) for k, v in vals.items()}
        if key in meta:
            r.point, r.seed = meta[key]["point"], meta[key]["seed"]
        r.index_baseline = head.get("baseline")
        r.planned_runs = head.get("planned_runs")
        r.index_points = list(head.get("points") or [])
    # A seeded study's seed is no swept value: its runs group by the other keys.
    seeded = bool(head.get("seeds")) or _seeds_repeat_points(runs)
    infer_swept(runs, ignore=("train.seed",) if seeded else None)
    runs.sort(key=lambda r: (_sort_key(r)[0], r.seed if r.seed is not None else _cfg_seed(r), r.name))
    return runs


def _cfg_seed(run: Run) -> int:
    v = run.cfg("train.seed", -1)
    return v if isinstance(v, int) else -1


def _seeds_repeat_points(runs: Sequence[Run]) -> bool:
    """Without an index: do some runs differ only in train.seed (a seeded study)?"""
    if len(runs) < 2:
        return False
    flats = [{k: v for k, v in r.flat_config.items()
              if not _NOT_SWEPT_RE.search(k.split(".")[-1]) and not k.startswith("sweep.")} for r in runs]
    seen = {}
    for f in flats:
        rest = tuple(sorted((k, v) for k, v in f.items() if k != "train.seed"))
        seen.setdefault(rest, set()).add(f.get("train.seed"))
    return any(len(v) > 1 for v in seen.values())


def load_all(path: Union[str, Path]) -> List[Run]:
    """All runs in one file: [load_run(path)] or one per group of a multi-run file."""
    p = Path(path)
    with _open(p) as h5:
        groups = run_groups(h5)
    if not groups:
        raise RunLogError("{}: missing required group /train".format(p))
    return [load_run(p, group=g) for g in groups]
