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
