"""Metric functions against hand-computed values."""
import itertools
import math

import numpy as np
import pytest

from moelab_analysis import metrics


def test_load_imbalance_hand_values():
    assert metrics.load_imbalance([1, 1, 2]) == pytest.approx(1.5)          # 2 / (4/3)
    assert metrics.load_imbalance([5, 5, 5, 5]) == pytest.approx(1.0)
    assert metrics.load_imbalance([0, 0, 8, 0]) == pytest.approx(4.0)       # all on one: E
    rows = metrics.load_imbalance(np.array([[1, 1, 2], [3, 3, 3], [0, 0, 0]]))
    assert rows[:2] == pytest.approx([1.5, 1.0])
    assert math.isnan(rows[2])


def test_coefficient_of_variation_hand_values():
    # mean 4/3, population std sqrt(((1/3)^2 * 2 + (2/3)^2) / 3) = sqrt(2/9)
    assert metrics.coefficient_of_variation([1, 1, 2]) == pytest.approx(math.sqrt(2 / 9) / (4 / 3))
    assert metrics.coefficient_of_variation([7, 7, 7]) == pytest.approx(0.0)
    # all load on one of E experts: CV = sqrt(E - 1)
    assert metrics.coefficient_of_variation([0, 0, 0, 12]) == pytest.approx(math.sqrt(3))


def test_drop_fraction():
    assert metrics.drop_fraction([4, 4], [4, 2]) == pytest.approx(0.25)
    assert metrics.drop_fraction([[10, 0], [5, 5]], [[10, 0], [5, 5]]) == pytest.approx([0.0, 0.0])
    assert math.isnan(metrics.drop_fraction([0, 0], [0, 0]))
    with pytest.raises(ValueError):
        metrics.drop_fraction([1, 2], [1, 2, 3])


def test_mutual_information_diagonal_and_independent():
    mi, nmi = metrics.mutual_information(np.eye(4) * 25)
    assert mi == pytest.approx(math.log(4))
    assert nmi == pytest.approx(1.0)
    # outer product of marginals: independent, MI = 0
    mi, nmi = metrics.mutual_information(np.outer([1, 2, 3], [4, 1]))
    assert mi == pytest.approx(0.0, abs=1e-12)
    assert nmi == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_normalisation_min_vs_sqrt():
    # 4 experts, 2 categories, each expert serves one category: category determined by expert.
    table = np.array([[10, 0], [10, 0], [0, 10], [0, 10]])
    mi, nmi_min = metrics.mutual_information(table)
    assert mi == pytest.approx(math.log(2))                  # H(category)
    assert nmi_min == pytest.approx(1.0)                     # / min(log 4, log 2)
    _, nmi_sqrt = metrics.mutual_information(table, norm="sqrt")
    assert nmi_sqrt == pytest.approx(math.log(2) / math.sqrt(math.log(4) * math.log(2)))
    # a hand-computed 2x2: p = [[.4, .1], [.1, .4]]
    mi, _ = metrics.mutual_information([[4, 1], [1, 4]])
    expected = 2 * 0.4 * math.log(0.4 / 0.25) + 2 * 0.1 * math.log(0.1 / 0.25)
    assert mi == pytest.approx(expected)
    # stacked [M, E, C] gives one value per M; an empty table gives 0
    mis, nmis = metrics.mutual_information(np.stack([np.eye(3), np.ones((3, 3)), np.zeros((3, 3))]))
    assert mis == pytest.approx([math.log(3), 0.0, 0.0])
    assert nmis == pytest.approx([1.0, 0.0, 0.0])


def test_source_recovery_many_to_one_and_one_to_one():
    table = np.array([[9, 1], [8, 2], [0, 10]])              # experts 0,1 -> source 0
    assert metrics.source_recovery(table) == pytest.approx((9 + 8 + 10) / 30)
    # one-to-one: best is e0->s0 (9) + e2->s1 (10)
    assert metrics.source_recovery(table, one_to_one=True) == pytest.approx(19 / 30)
    assert metrics.source_recovery(np.eye(3) * 5, one_to_one=True) == pytest.approx(1.0)
    assert math.isnan(metrics.source_recovery(np.zeros((2, 2))))


def test_one_to_one_matches_brute_force():
    rng = np.random.default_rng(0)
    for shape in [(3, 3), (4, 3), (3, 5), (5, 5), (6, 4)]:
        for _ in range(10):
            w = rng.integers(0, 20, size=shape)
            e, c = shape
            best = 0
            if e <= c:
                for perm in itertools.permutations(range(c), e):
                    best = max(best, sum(w[i, perm[i]] for i in range(e)))
            else:
                for perm in itertools.permutations(range(e), c):
                    best = max(best, sum(w[perm[j], j] for j in range(c)))
            got = metrics.source_recovery(w, one_to_one=True) * w.sum()
            assert got == pytest.approx(best), (shape, w)


def test_bits_per_byte():
    assert metrics.bits_per_byte(math.log(256)) == pytest.approx(8.0)
    assert metrics.bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert metrics.bits_per_byte([math.log(4)], bytes_per_token=2.0) == pytest.approx([1.0])
    with pytest.raises(ValueError):
        metrics.bits_per_byte(1.0, bytes_per_token=0)
