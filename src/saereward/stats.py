"""Small, exact statistics used by evaluations and gates (pure functions, no I/O).

* :func:`wilson_ci`: Wilson score interval for a binomial proportion. Unlike the normal (Wald)
  interval it stays inside [0, 1] and keeps close to nominal coverage at small n or extreme p,
  which matters for accuracies like 8/64.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Proportion:
    """``k`` successes out of ``n`` with a Wilson confidence interval."""

    k: int
    n: int
    low: float
    high: float
    confidence: float = 0.95

    @property
    def p(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {
            "k": self.k,
            "n": self.n,
            "p": self.p,
            "ci_low": self.low,
            "ci_high": self.high,
            "confidence": self.confidence,
        }

    def __str__(self) -> str:
        return f"{self.p:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.k}/{self.n})"


def wilson_ci(k: int, n: int, confidence: float = 0.95) -> Proportion:
    """Wilson score interval for ``k`` successes in ``n`` trials (scipy's ``binomtest(...).proportion_ci``).

    ``n == 0`` gives the uninformative interval [0, 1].
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Proportion(0, 0, 0.0, 1.0, confidence)
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Proportion(k, n, float(ci.low), float(ci.high), confidence)


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> dict[str, float]:
    """Pooled two-proportion z-test of ``p2`` vs ``p1`` (e.g. base = 1, trained = 2).

    Returns the difference ``p2 − p1``, z, the two-sided p-value and the one-sided p-value of
    ``p2 > p1``. With no variance (both 0 or both 1) z is 0 and both p-values are 1.
    """
    import math

    from scipy.stats import norm

    if min(n1, n2) < 1 or not (0 <= k1 <= n1 and 0 <= k2 <= n2):
        raise ValueError(f"need 0 <= k <= n and n >= 1, got {k1}/{n1} and {k2}/{n2}")
    p1, p2 = k1 / n1, k2 / n2
    pool = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    z = (p2 - p1) / se if se > 0 else 0.0
    return {
        "diff": p2 - p1,
        "z": z,
        "p_two_sided": float(2 * norm.sf(abs(z))) if se > 0 else 1.0,
        "p_greater": float(norm.sf(z)) if se > 0 else 1.0,
    }


def mcnemar(before: list[bool], after: list[bool]) -> dict[str, float | int]:
    """Exact McNemar test on paired binary outcomes (same items before and after).

    ``recovered`` = wrong before and right after, ``broken`` = right before and wrong after; the
    two-sided p-value is the exact binomial test of ``recovered`` out of the discordant pairs at 1/2.
    """
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need equal lengths, got {len(before)} and {len(after)}")
    from scipy.stats import binomtest

    rec = sum(1 for b, a in zip(before, after, strict=True) if not b and a)
    brk = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    p = float(binomtest(rec, rec + brk, 0.5).pvalue) if rec + brk else 1.0
    return {"n": len(before), "recovered": rec, "broken": brk, "p_value": p}
