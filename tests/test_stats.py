"""Wilson interval against known values and invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saereward.stats import wilson_ci


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
