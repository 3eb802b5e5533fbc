"""Statistics over seeds: confidence intervals, paired differences, Holm's correction.

A study runs every grid point once per seed (moelab `train.seeds`); a seed fixes the model's
initialisation, the order of the data and every random draw, so two grid points run with the same
seed differ only by what the grid changes. The functions here are pure (numpy and scipy.stats);
studies.py applies them to run logs.

    mean_ci(x)                 mean and t-interval of one grid point's values over seeds
    paired_t(a, b)             the paired difference a - b (by seed): t-interval, t, two-sided p
    holm(p)                    Holm's step-down adjusted p-values (family-wise error control)
    compare(diffs_by_name)     paired tests of several grid points against one baseline, Holm
                               over them, each with its Holm-compatible interval and verdict

The t-interval of n values x_1..x_n with mean m and sample standard deviation s (ddof = 1) at
level 1 - g is m +- t_{1-g/2, n-1} s / sqrt(n). The paired test is that interval, and the
Student t-test, of the differences d_i = a_i - b_i: t = mean(d) / (sd(d) / sqrt(n)), p = 2 P(T_{n-1}
> |t|). With n seeds the test needs n >= 2; a difference that is the same for every seed (sd 0)
has p = 0 when it is not 0 and p = 1 when it is (identical runs).

Holm: sort the m p-values p_(1) <= ... <= p_(m); the adjusted p_(i)' = max_{j <= i} min(1,
(m - j + 1) p_(j)). Rejecting where p' < alpha controls the family-wise error rate at alpha.

Holm-compatible interval (what report.md calls the corrected interval): the t-interval of the
differences at level 1 - alpha * p / p', which excludes 0 exactly when p' < alpha. For the i-th
smallest p-value, when the step-down's running maximum does not raise it, that level is Holm's
own 1 - alpha / (m - i + 1); it is never narrower than the unadjusted interval. (These intervals
agree with Holm's decisions; only Bonferroni's, all at 1 - alpha / m, have exact simultaneous
coverage.) A difference is "beyond noise" when its corrected interval excludes 0.
"""
from __future__ import annotations

from ._deps import require as _require

_require(("numpy", "scipy"))

import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Dict, List, Mapping, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
from scipy import stats as _sps  # noqa: E402

NAN = float("nan")


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with df degrees of freedom (scipy.stats.t.ppf)."""
    return float(_sps.t.ppf(q, df))


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of a t statistic: 2 P(T_df > |t|)."""
    if math.isnan(t):
        return NAN
    if math.isinf(t):
        return 0.0
    return float(min(1.0, 2.0 * _sps.t.sf(abs(t), df)))


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(list(values), dtype=np.float64)
    return x[np.isfinite(x)]


@dataclass
class MeanCI:
    """Mean of n values with its t-interval [lo, hi] at `level` (nan where n < 2)."""

    n: int
    mean: float
    sd: float        # sample standard deviation (ddof = 1)
    lo: float
    hi: float
    level: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean and t-interval of the finite values (non-finite ones, e.g. a dense run's router
    metrics, are left out). n = 1 gives the value with a nan interval; n = 0 nan throughout."""
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return MeanCI(0, NAN, NAN, NAN, NAN, level)
    m = float(x.mean())
    if n == 1:
        return MeanCI(1, m, NAN, NAN, NAN, level)
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return MeanCI(n, m, sd, m - half, m + half, level)


@dataclass
class PairedTest:
    """The paired difference a - b over n seeds: mean, t-interval at `level`, t and p."""

    n: int
    mean: float
    sd: float
    lo: float
    hi: float
    level: float
    t: float
    p: float

    def interval(self, level: float) -> tuple:
        """The t-interval of the differences at another level (same mean and sd)."""
        if self.n < 2:
            return (NAN, NAN)
        half = t_quantile(0.5 + level / 2.0, self.n - 1) * self.sd / math.sqrt(self.n)
        return (self.mean - half, self.mean + half)


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedTest:
    """Paired t-test of a - b; a[i] and b[i] share a seed. Pairs with a non-finite member are
    left out. n < 2 gives nan interval and p."""
    a = np.asarray(list(a), dtype=np.float64)
    b = np.asarray(list(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired_t: {} values against {}; pair them by seed".format(a.size, b.size))
    d = a - b
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return PairedTest(0, NAN, NAN, NAN, NAN, level, NAN, NAN)
    m = float(d.mean())
    if n == 1:
        return PairedTest(1, m, NAN, NAN, NAN, level, NAN, NAN)
    sd = float(d.std(ddof=1))
    if sd == 0.0 or sd <= 1e-15 * max(1.0, abs(m)):
        # The same difference for every seed: exact, not noisy.
        same = m == 0.0
        return PairedTest(n, m, 0.0, m, m, level, 0.0 if same else math.copysign(math.inf, m), 1.0 if same else 0.0)
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    t = m / se
    return PairedTest(n, m, sd, m - half, m + half, level, t, t_two_sided_p(t, n - 1))


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm-adjusted p-values in the input order. nan entries stay nan and do not count in m."""
    p = [float(v) for v in pvalues]
    idx = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(idx)
    out = [NAN] * len(p)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def holm_levels(pvalues: Sequence[float], adjusted: Sequence[float], alpha: float = 0.05) -> List[float]:
    """Per comparison, the confidence level 1 - alpha * p / p' of its Holm-compatible interval
    (which excludes 0 exactly when p' < alpha). p = 0 (an exact difference) gets Holm's level for
    its rank, 1 - alpha / (m - rank); nan where p is nan."""
    p = [float(v) for v in pvalues]
    idx = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(idx)
    order = sorted(idx, key=lambda i: p[i])
    out = [NAN] * len(p)
    for rank, i in enumerate(order):
        if p[i] > 0 and adjusted[i] > 0:
            out[i] = 1.0 - alpha * p[i] / adjusted[i]
        else:
            out[i] = 1.0 - alpha / (m - rank)
    return out


@dataclass
class Comparison:
    """One grid point against the baseline, for one metric (studies.compare_metric fills name
    and metric)."""

    name: str
    test: PairedTest
    p_holm: float
    level: float          # of the corrected interval
    lo: float             # corrected (Holm-compatible) interval
    hi: float
    alpha: float = 0.05
    metric: str = ""

    @property
    def beyond_noise(self) -> Optional[bool]:
        """True when the corrected interval excludes 0 (p_holm < alpha); None without a test."""
        if math.isnan(self.p_holm):
            return None
        return bool(self.lo > 0 or self.hi < 0)

    @property
    def verdict(self) -> str:
        b = self.beyond_noise
        if b is None:
            return "n/a (fewer than 2 paired seeds)" if self.test.n < 2 else "n/a"
        if not b and self.test.sd == 0 and self.test.mean == 0:
            return "identical"
        return "beyond noise" if b else "within noise"


def compare(diffs: Mapping[str, tuple], alpha: float = 0.05) -> List[Comparison]:
    """Paired tests of several grid points against one baseline, Holm-corrected over them.

    diffs: name -> (values of the grid point, values of the baseline), paired by position (seed).
    Returns one Comparison per name, in the input order.
    """
    names = list(diffs)
    tests = [paired_t(*diffs[k], level=1.0 - alpha) for k in names]
    adjusted = holm([t.p for t in tests])
    levels = holm_levels([t.p for t in tests], adjusted, alpha)
    out = []
    for name, t, pa, lv in zip(names, tests, adjusted, levels):
        if math.isnan(pa):
            lo, hi = NAN, NAN
        elif t.sd == 0:
            lo, hi = t.mean, t.mean
        else:
            lo, hi = t.interval(lv)
        out.append(Comparison(name=name, test=t, p_holm=pa, level=lv, lo=lo, hi=hi, alpha=alpha))
    return out


def band(curves: Sequence[np.ndarray], level: float = 0.95):
    """Mean and t-interval, step by step, of several curves of one grid point (one per seed):
    returns (mean, lo, hi) arrays over the common length; lo = hi = mean with one curve."""
    curves = [np.asarray(c, dtype=np.float64) for c in curves if np.asarray(c).size]
    if not curves:
        z = np.zeros(0)
        return z, z, z
    n_steps = min(c.size for c in curves)
    mat = np.stack([c[:n_steps] for c in curves])
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(mat, axis=0)
        n = np.sum(np.isfinite(mat), axis=0)
        if mat.shape[0] < 2:
            return mean, mean.copy(), mean.copy()
        sd = np.nanstd(mat, axis=0, ddof=1)
        q = np.where(n >= 2, _sps.t.ppf(0.5 + level / 2.0, np.maximum(n - 1, 1)), np.nan)
        half = q * sd / np.sqrt(np.maximum(n, 1))
    return mean, mean - half, mean + half


def noise_summary(by_seed: Mapping[str, Mapping[int, float]]) -> Dict[str, float]:
    """Pooled seed-to-seed standard deviation over grid points (one metric), and the standard
    deviation of a single-seed difference between two grid points implied by it (sqrt 2 times,
    for independent runs): what a one-seed comparison can hide."""
    ss, dof = 0.0, 0
    for values in by_seed.values():
        x = _finite(values.values())
        if x.size >= 2:
            ss += float(((x - x.mean()) ** 2).sum())
            dof += x.size - 1
    sd = math.sqrt(ss / dof) if dof else NAN
    return {"pooled_sd": sd, "single_diff_sd": sd * math.sqrt(2.0) if dof else NAN, "dof": dof}
