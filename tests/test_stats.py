"""Wilson interval, cluster bootstrap and partial Spearman against known values and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import spearmanr

from saereward.stats import (
    bootstrap_counts,
    cluster_bootstrap_indices,
    partial_spearman,
    percentile_ci,
    wilson_ci,
)


def test_wilson_known_values() -> None:
    # Closed form (z = 1.959964): center = (p + z²/2n)/(1 + z²/n), half = z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    z = 1.959963984540054
    for k, n in [(8, 64), (33, 64), (1, 200)]:
        p = k / n
        d = 1 + z * z / n
        c = (p + z * z / (2 * n)) / d
        h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
        ci = wilson_ci(k, n)
        assert (ci.low, ci.high) == pytest.approx((c - h, c + h), abs=1e-9)
    assert wilson_ci(8, 64).low == pytest.approx(0.0647224, abs=1e-6)


def test_wilson_edges() -> None:
    assert wilson_ci(0, 10).low == 0.0
    assert wilson_ci(10, 10).high == 1.0
    assert (wilson_ci(0, 0).low, wilson_ci(0, 0).high) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_ci(5, 3)


@given(n=st.integers(1, 5000), frac=st.floats(0, 1))
def test_wilson_contains_p_and_in_unit_interval(n: int, frac: float) -> None:
    k = min(n, int(round(frac * n)))
    ci = wilson_ci(k, n)
    assert 0.0 <= ci.low <= ci.p <= ci.high <= 1.0
    assert not math.isnan(ci.low)


def test_wilson_narrows_with_n() -> None:
    assert (wilson_ci(50, 100).high - wilson_ci(50, 100).low) > (
        wilson_ci(500, 1000).high - wilson_ci(500, 1000).low
    )


# --------------------------------------------------------------------------------------------------
# cluster bootstrap
# --------------------------------------------------------------------------------------------------


def test_cluster_bootstrap_keeps_clusters_whole() -> None:
    clusters = ["a", "b", "a", "c", "b", "a", "c", "c", "c"]  # sizes a=3, b=2, c=4, interleaved
    members = {c: [i for i, x in enumerate(clusters) if x == c] for c in set(clusters)}
    draws = cluster_bootstrap_indices(clusters, n_boot=300, seed=0)
    assert len(draws) == 300
    lengths = set()
    for d in draws:
        labels = [clusters[i] for i in d]
        # the resample is whole clusters, one after another, each with all of its rows in order
        pos, drawn = 0, 0
        while pos < len(d):
            rows = members[labels[pos]]
            assert d[pos : pos + len(rows)].tolist() == rows
            pos += len(rows)
            drawn += 1
        assert drawn == 3  # as many clusters drawn as there are
        lengths.add(len(d))
    assert lengths == {6, 7, 8, 9, 10, 11, 12}  # 3 draws from sizes {2, 3, 4}: every total occurs
    # seeded: same seed, same resamples; another seed, others
    again = cluster_bootstrap_indices(clusters, n_boot=300, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again, strict=True))
    other = cluster_bootstrap_indices(clusters, n_boot=300, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(draws, other, strict=True))


def test_cluster_bootstrap_with_singletons_is_the_row_bootstrap() -> None:
    n = 17
    draws = np.stack(cluster_bootstrap_indices(np.arange(n), n_boot=50, seed=3))
    expected = np.random.default_rng(3).integers(0, n, size=(50, n))
    assert np.array_equal(draws, expected)


def test_cluster_bootstrap_errors() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        cluster_bootstrap_indices([], n_boot=10, seed=0)
    with pytest.raises(ValueError, match="n_boot"):
        cluster_bootstrap_indices([1, 2], n_boot=0, seed=0)


def test_percentile_ci_ignores_undefined_replicates() -> None:
    v = np.concatenate([np.arange(101.0), [np.nan, np.inf]])
    assert percentile_ci(v, 0.9) == pytest.approx((5.0, 95.0))
    assert all(math.isnan(x) for x in percentile_ci([np.nan], 0.95))


# --------------------------------------------------------------------------------------------------
# partial Spearman
# --------------------------------------------------------------------------------------------------


def _formula(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    r_xy, r_xz, r_yz = (spearmanr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    return (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz**2) * (1 - r_yz**2))


def test_partial_spearman_equals_the_three_variable_formula() -> None:
    rng = np.random.default_rng(0)
    z = rng.integers(5, 60, size=200).astype(float)  # token counts: many ties
    y = (rng.random(200) < 1 / (1 + np.exp((z - 30) / 8))).astype(float)  # short answers more often right
    x = -z + rng.normal(0, 15, size=200) + 10 * y
    got = partial_spearman(x, y, z)
    assert got == pytest.approx(_formula(x, y, z), abs=1e-12)
    # length explains part of rho(x, y): the partial is smaller than the raw rank correlation
    assert 0 < got < spearmanr(x, y).statistic


def test_partial_spearman_hand_computed() -> None:
    # distinct values, so ranks are the values and r = 1 − 6 Σd² / (n(n² − 1)) with n(n² − 1) = 120:
    # Σd² is 4 (x, y), 8 (x, z), 10 (y, z), so r_xy = 0.8, r_xz = 0.6, r_yz = 0.5
    x, y, z = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5], [3, 1, 2, 5, 4]
    assert spearmanr(x, y).statistic == pytest.approx(0.8)
    assert spearmanr(x, z).statistic == pytest.approx(0.6)
    assert spearmanr(y, z).statistic == pytest.approx(0.5)
    expected = (0.8 - 0.6 * 0.5) / math.sqrt((1 - 0.36) * (1 - 0.25))  # = 0.5 / sqrt(0.48) = 0.7217
    assert partial_spearman(x, y, z) == pytest.approx(expected, abs=1e-12)


def test_partial_spearman_degenerate() -> None:
    z = np.arange(20.0)
    y = (z % 3 == 0).astype(float)
    assert math.isnan(partial_spearman(2 * z + 1, y, z))  # x is a monotone function of z: nothing left
    # a control that is unrelated to both leaves rho about unchanged; a constant control leaves it exact
    x = np.sin(z)
    assert partial_spearman(x, y, np.ones(20)) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    with pytest.raises(ValueError, match=">= 3 paired"):
        partial_spearman([1, 2], [1, 2], [1, 2])


def test_bootstrap_counts_are_the_draws_of_a_per_unit_bootstrap() -> None:
    """Row r counts how often each unit is drawn in resample r of ``rng.integers(0, n, (n_boot, n))``."""
    counts = bootstrap_counts(7, 50, seed=3)
    draws = np.random.default_rng(3).integers(0, 7, size=(50, 7))
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all()
    sums = np.arange(7.0) ** 2
    assert np.allclose(counts @ sums, sums[draws].sum(1))
