"""Statistics over seeds (moelab_analysis.stats) against values computed by hand.

Student t quantiles come from a printed table (t_{0.975,4} = 2.7764451, t_{0.9875,4} = 3.4954059,
t_{0.975,7} = 2.3646243); the two-sided p of t with 4 degrees of freedom from the closed form of
the t CDF for even df: with sin(th) = t / sqrt(t^2 + 4) and cos(th)^2 = 4 / (t^2 + 4),
p = 1 - sin(th) (1 + cos(th)^2 / 2).
"""
import math

import numpy as np
import pytest

from moelab_analysis import stats

T975_4 = 2.7764451
T9875_4 = 3.4954059
T975_7 = 2.3646243


def p_df4(t):
    s = abs(t) / math.sqrt(t * t + 4)
    c2 = 4 / (t * t + 4)
    return 1 - s * (1 + c2 / 2)


def test_t_quantiles_match_the_table():
    assert stats.t_quantile(0.975, 4) == pytest.approx(T975_4, abs=1e-7)
    assert stats.t_quantile(0.9875, 4) == pytest.approx(T9875_4, abs=1e-7)
    assert stats.t_quantile(0.975, 7) == pytest.approx(T975_7, abs=1e-7)
    assert stats.t_two_sided_p(3.0, 4) == pytest.approx(p_df4(3.0), abs=1e-12)


def test_mean_ci_by_hand():
    # 1..5: mean 3, sd sqrt(2.5) = 1.5811388, se = 0.7071068, half = 2.7764451 * se = 1.9632432.
    ci = stats.mean_ci([1, 2, 3, 4, 5])
    assert (ci.n, ci.mean) == (5, 3.0)
    assert ci.sd == pytest.approx(math.sqrt(2.5), abs=1e-12)
    assert ci.lo == pytest.approx(1.0367568, abs=1e-6)
    assert ci.hi == pytest.approx(4.9632432, abs=1e-6)
    # 2 4 4 4 5 5 7 9: mean 5, sd sqrt(32/7) = 2.1380899, half = 2.3646243 * 2.1380899 / sqrt 8 = 1.7874879.
    ci = stats.mean_ci([2, 4, 4, 4, 5, 5, 7, 9])
    assert ci.half_width == pytest.approx(1.7874879, abs=1e-6)
    # Non-finite values (a dense run's router metrics) are left out; one value has no interval.
    ci = stats.mean_ci([1.0, float("nan"), 3.0])
    assert ci.n == 2 and ci.mean == 2.0
    one = stats.mean_ci([4.0])
    assert one.n == 1 and one.mean == 4.0 and math.isnan(one.lo)
    assert stats.mean_ci([]).n == 0


def test_paired_t_by_hand():
    # d = a - b = 0.1, 0, 0.2, 0.1, 0.2: mean 0.12, sum of squares 0.028, sd sqrt(0.007) = 0.0836660,
    # se = 0.0374166, t = 3.2071349, half = 2.7764451 * se = 0.1038846, p = 0.0326779 (closed form).
    a = [3.1, 2.9, 3.3, 3.0, 3.2]
    b = [3.0, 2.9, 3.1, 2.9, 3.0]
    t = stats.paired_t(a, b)
    assert t.n == 5
    assert t.mean == pytest.approx(0.12, abs=1e-12)
    assert t.sd == pytest.approx(math.sqrt(0.007), abs=1e-12)
    assert t.t == pytest.approx(3.2071349, abs=1e-6)
    assert t.lo == pytest.approx(0.12 - 0.1038846, abs=1e-6)
    assert t.hi == pytest.approx(0.12 + 0.1038846, abs=1e-6)
    assert t.p == pytest.approx(p_df4(3.2071349), abs=1e-7)
    assert t.p == pytest.approx(0.0326779, abs=1e-6)
    # The direction: b - a is the mirror image.
    r = stats.paired_t(b, a)
    assert r.mean == pytest.approx(-0.12) and r.p == pytest.approx(t.p)
    # At another level: t_{0.9875,4} = 3.4954059.
    lo, hi = t.interval(0.975)
    assert hi - 0.12 == pytest.approx(T9875_4 * 0.0374166, abs=1e-6)
    # Pairing matters: unpaired lengths are an error, a nan pair is dropped.
    with pytest.raises(ValueError):
        stats.paired_t([1, 2], [1, 2, 3])
    assert stats.paired_t([1, 2, float("nan")], [0, 0, 0]).n == 2


def test_paired_t_exact_and_identical():
    exact = stats.paired_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])      # +1 for every seed
    assert (exact.mean, exact.sd, exact.p, exact.lo, exact.hi) == (1.0, 0.0, 0.0, 1.0, 1.0)
    same = stats.paired_t([2.0, 3.0], [2.0, 3.0])
    assert (same.mean, same.p) == (0.0, 1.0)
    assert math.isnan(stats.paired_t([1.0], [0.0]).p)            # one seed: no test


def test_holm_on_known_p_values():
    # Sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to 0.06).
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # nan does not count in m and stays nan; adjusted p never exceeds 1.
    out = stats.holm([0.2, float("nan"), 0.6])
    assert out[0] == pytest.approx(0.4) and math.isnan(out[1]) and out[2] == pytest.approx(0.6)
    assert stats.holm([0.5, 0.6, 0.7]) == pytest.approx([1.0, 1.0, 1.0])
    assert stats.holm([]) == []


def test_holm_levels_and_corrected_intervals():
    # Holm's own level for the smallest of m = 2 p-values: 1 - 0.05 / 2 = 0.975.
    p = [0.01, 0.011]
    adj = stats.holm(p)
    assert adj == pytest.approx([0.02, 0.02])
    lv = stats.holm_levels(p, adj)
    assert lv[0] == pytest.approx(0.975)
    assert lv[1] == pytest.approx(1 - 0.05 * 0.011 / 0.02)      # the step-down carried 0.02 up
    # compare(): the corrected interval of the smaller p is the t-interval at 0.975.
    a = [3.1, 2.9, 3.3, 3.0, 3.2]
    b = [3.0, 2.9, 3.1, 2.9, 3.0]
    far = [5.0, 5.1, 4.9, 5.05, 4.95]
    comps = stats.compare({"near": (a, b), "far": (far, b)})
    near, farc = comps
    assert [c.name for c in comps] == ["near", "far"]
    # "far" has the smaller p: rank 1 of 2, level 0.975; "near" (p = 0.0327) is second: level
    # 1 - 0.05 * p / p_holm with p_holm = max(2 p_far, p_near) = p_near, i.e. 0.95.
    assert farc.level == pytest.approx(0.975)
    assert near.p_holm == pytest.approx(near.test.p)
    assert near.level == pytest.approx(0.95)
    assert (near.lo, near.hi) == pytest.approx((0.12 - 0.1038846, 0.12 + 0.1038846), abs=1e-6)
    assert near.beyond_noise and near.verdict == "beyond noise"
    # With a third, noisy comparison Holm's m grows to 3 and "near" is no longer beyond noise.
    noisy = [3.5, 2.5, 3.4, 2.6, 3.2]
    comps3 = stats.compare({"near": (a, b), "far": (far, b), "noisy": (noisy, b)})
    near3 = comps3[0]
    assert near3.p_holm == pytest.approx(2 * near.test.p)
    assert near3.p_holm > 0.05 and not near3.beyond_noise and near3.verdict == "within noise"
    assert near3.lo < 0 < near3.hi
    # The interval excludes 0 exactly when p_holm < alpha, for every comparison.
    for c in comps + comps3:
        assert (c.lo > 0 or c.hi < 0) == (c.p_holm < 0.05)
    # Identical runs: "identical"; one seed: n/a.
    same = stats.compare({"same": (b, b), "one": ([1.0], [2.0])})
    assert same[0].verdict == "identical" and not same[0].beyond_noise
    assert same[1].beyond_noise is None and same[1].verdict.startswith("n/a")


def test_band_and_noise_summary():
    mean, lo, hi = stats.band([np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0, 9.0])])
    assert mean == pytest.approx([2.0, 2.0, 2.0])                # the common length
    # Two curves: sd sqrt(2) at the ends, half = t_{0.975,1} * sqrt(2) / sqrt(2) = 12.7062047.
    assert hi[0] - mean[0] == pytest.approx(12.7062047, abs=1e-6)
    assert hi[1] == mean[1] == lo[1]
    m1, l1, h1 = stats.band([np.array([1.0, 2.0])])
    assert list(l1) == list(m1) == list(h1) == [1.0, 2.0]
    # Pooled sd over points: squares (1 + 1) and (0.25 + 0.25) over 1 + 1 dof -> sqrt(1.25).
    ns = stats.noise_summary({"a": {1: 1.0, 2: 3.0}, "b": {1: 0.0, 2: 1.0}})
    assert ns["pooled_sd"] == pytest.approx(math.sqrt((2.0 + 0.5) / 2))
    assert ns["single_diff_sd"] == pytest.approx(math.sqrt(2) * ns["pooled_sd"])
