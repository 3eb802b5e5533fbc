"""Router metrics over per-expert counts (pure numpy; BACKGROUND.md section 6).

Shapes: c [..., E] counts per expert (a row per step, or one row), n [E, C] an expert-by-category
contingency table (rows experts, columns categories / true sources), or [M, E, C] a stack of them.
Functions reduce over the last axis (or the last two for tables) and keep the leading ones.
"""
from __future__ import annotations

from ._deps import require as _require

_require(("numpy",))

import math  # noqa: E402
from typing import Dict, Tuple, Union  # noqa: E402

import numpy as np  # noqa: E402

ArrayLike = Union[np.ndarray, list, tuple]
LN2 = math.log(2.0)


def load_imbalance(counts: ArrayLike) -> np.ndarray:
    """Max over mean load per row: max_i c_i / ((1/E) sum_i c_i).

    1 is perfect balance, E means every assignment went to one expert. A row of zeros gives
    nan. Example: [1, 1, 2] -> 2 / (4/3) = 1.5. Returns a scalar for 1-D input.
    """
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(mean > 0, c.max(axis=-1) / np.where(mean > 0, mean, 1.0), np.nan)
    return out[()] if out.ndim == 0 else out


def coefficient_of_variation(counts: ArrayLike) -> np.ndarray:
    """CV per row: std_i(c_i) / mean_i(c_i), population std (ddof = 0).

    0 is perfect balance; sqrt(E - 1) is the maximum (all load on one expert). Shazeer et al.'s
    importance / load losses are w * CV^2. Example: [1, 1, 2] -> sqrt(2/9) / (4/3) = 0.35355.
    A row of zeros gives nan.
    """
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=-1)
    std = c.std(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), np.nan)
    return out[()] if out.ndim == 0 else out


def drop_fraction(routed: ArrayLike, kept: ArrayLike) -> np.ndarray:
    """Fraction of assignments dropped by capacity per row: 1 - sum_i kept_i / sum_i routed_i.

    0 when dropless. A row with nothing routed gives nan. To pool over rows (e.g. the last steps),
    pass the summed counts: drop_fraction(routed.sum(0), kept.sum(0)).
    """
    r = np.asarray(routed, dtype=np.float64)
    k = np.asarray(kept, dtype=np.float64)
    if r.shape != k.shape:
        raise ValueError("routed {} and kept {} differ in shape".format(r.shape, k.shape))
    rs = r.sum(axis=-1)
    ks = k.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(rs > 0, 1.0 - ks / np.where(rs > 0, rs, 1.0), np.nan)
    return out[()] if out.ndim == 0 else out


def entropy(p: ArrayLike, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats, H(p) = -sum p log p (0 log 0 = 0), of distributions along `axis`."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=axis)


def mutual_information(count_matrix: ArrayLike, norm: str = "min") -> Tuple[np.ndarray, np.ndarray]:
    """Mutual information between expert and category of an expert-by-category table.

    With joint p(e, c) = n_ec / sum n and marginals p(e), p(c):

        MI  = sum_{e,c} p(e,c) log( p(e,c) / (p(e) p(c)) )          (nats)
        NMI = MI / min(H(E), H(C))                                     (norm="min", default)
        NMI = MI / sqrt(H(E) H(C))                                     (norm="sqrt")

    We report the "min" normalisation: NMI = 1 exactly when one variable determines the other,
    e.g. every expert serves a single category even when a category is split over several
    experts (E > C), which is what "expert specialisation" means here. NMI = 0 when routing is
    independent of the category, and when min(H(E), H(C)) = 0 (nothing to explain). A diagonal
    table of C equal entries gives MI = log C, NMI = 1; an outer product gives 0.

    Accepts [E, C] (returns floats) or [M, E, C] (returns arrays of M). Counts may be floats.
    """
    if norm not in ("min", "sqrt"):
        raise ValueError("norm must be 'min' or 'sqrt', not {!r}".format(norm))
    n = np.asarray(count_matrix, dtype=np.float64)
    if n.ndim not in (2, 3):
        raise ValueError("expected an [E, C] or [M, E, C] table, got shape {}".format(n.shape))
    if np.any(n < 0):
        raise ValueError("counts must be non-negative")
    total = n.sum(axis=(-2, -1), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, n / np.where(total > 0, total, 1.0), 0.0)
        pe = p.sum(axis=-1, keepdims=True)
        pc = p.sum(axis=-2, keepdims=True)
        denom = pe * pc
        ratio = np.where((p > 0) & (denom > 0), p / np.where(denom > 0, denom, 1.0), 1.0)
        mi = (p * np.log(ratio)).sum(axis=(-2, -1))
    mi = np.maximum(mi, 0.0)
    he = entropy(pe[..., 0], axis=-1)
    hc = entropy(pc[..., 0, :], axis=-1)
    scale = np.minimum(he, hc) if norm == "min" else np.sqrt(he * hc)
    with np.errstate(divide="ignore", invalid="ignore"):
        nmi = np.where(scale > 1e-12, mi / np.where(scale > 1e-12, scale, 1.0), 0.0)
    nmi = np.clip(nmi, 0.0, 1.0)
    if n.ndim == 2:
        return float(mi), float(nmi)
    return mi, nmi


def _max_assignment(w: np.ndarray) -> Dict[int, int]:
    """Rows -> columns one-to-one maximising the summed weight (Kuhn-Munkres, O(n^2 m)).

    Matches min(rows, cols) pairs. Shortest augmenting paths with potentials on the cost
    max(w) - w (the e-maxx formulation), vectorised over columns.
    """
    w = np.asarray(w, dtype=np.float64)
    transposed = w.shape[0] > w.shape[1]
    if transposed:
        w = w.T
    n, m = w.shape
    if n == 0:
        return {}
    cost = w.max() - w
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)    # p[j]: row (1-based) matched to column j, 0 = none
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used
            free[0] = False
            cols = np.nonzero(free)[0]
            cur = cost[i0 - 1, cols - 1] - u[i0] - v[cols]
            better = cur < minv[cols]
            minv[cols[better]] = cur[better]
            way[cols[better]] = j0
            j1 = int(cols[np.argmin(minv[cols])])
            delta = minv[j1]
            used_idx = np.nonzero(used)[0]
            u[p[used_idx]] += delta
            v[used_idx] -= delta
            minv[cols] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while True:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
            if j0 == 0:
                break
    pairs = {int(p[j]) - 1: j - 1 for j in range(1, m + 1) if p[j] != 0}
    if transposed:
        return {c: r for r, c in pairs.items()}
    return pairs


def expert_source_mapping(matrix: ArrayLike, one_to_one: bool = False) -> Dict[int, int]:
    """Expert index -> source (category) index used by source_recovery.

    many-to-one: each expert maps to its majority source argmax_c n[e, c] (experts with no
    tokens are left out). one-to-one: the maximum-weight matching (each source used at most once;
    when E > C some experts stay unmatched).
    """
    n = np.asarray(matrix, dtype=np.float64)
    if n.ndim != 2:
        raise ValueError("expected an [E, C] table, got shape {}".format(n.shape))
    if one_to_one:
        return _max_assignment(n)
    return {e: int(np.argmax(n[e])) for e in range(n.shape[0]) if n[e].sum() > 0}


def source_recovery(matrix: ArrayLike, one_to_one: bool = False) -> float:
    """How well experts recover the true sources of synthetic data, in [0, 1].

    matrix n [E, C]: assignments of tokens from source c to expert e.

    many-to-one (default, "purity"): label each expert with its majority source and count the
    assignments that agree, acc = sum_e max_c n[e, c] / sum n. Suits E >= C where a source may
    be split over several experts; a router that ignores the source scores about max_c p(c).
    one-to-one: the best bijection between experts and sources (Hungarian matching),
    acc = max_sigma sum_e n[e, sigma(e)] / sum n; with E > C unmatched experts count as wrong,
    so it is 1 only when each source goes to a single expert.
    An empty table gives nan.
    """
    n = np.asarray(matrix, dtype=np.float64)
    total = n.sum()
    if total <= 0:
        return float("nan")
    mapping = expert_source_mapping(n, one_to_one=one_to_one)
    return float(sum(n[e, c] for e, c in mapping.items()) / total)


def bits_per_byte(nats: ArrayLike, bytes_per_token: float = 1.0) -> np.ndarray:
    """Loss in nats per token -> bits per byte: nats / (ln 2 * bytes_per_token).

    moelab's Brown corpus model reads bytes, so one token is one byte (bytes_per_token = 1).
    Example: ln(256) nats = 8 bits per byte (a uniform byte model).
    """
    if bytes_per_token <= 0:
        raise ValueError("bytes_per_token must be positive")
    out = np.asarray(nats, dtype=np.float64) / (LN2 * bytes_per_token)
    return out[()] if out.ndim == 0 else out
