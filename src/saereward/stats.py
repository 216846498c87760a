"""Small, exact statistics used by evaluations and gates (pure functions, no I/O).

* :func:`wilson_ci`: Wilson score interval for a binomial proportion. Unlike the normal (Wald)
  interval it stays inside [0, 1] and keeps close to nominal coverage at small n or extreme p,
  which matters for accuracies like 8/64.
* :func:`cluster_bootstrap_indices`: bootstrap resamples that draw whole clusters (e.g. every
  response to one question), the honest resampling unit when samples within a cluster are correlated.
* :func:`percentile_ci`: percentile interval of bootstrap replicates, ignoring undefined ones.
* :func:`partial_spearman`: Spearman correlation of two variables with a third held fixed.
* :func:`association` / :func:`partial_association`: a score against a binary outcome (Spearman,
  Pearson, AUROC; partial ρ given a control), with cluster-bootstrap CIs.
* :func:`cohens_d`, :func:`require_both_outcomes`: the contrastive statistics of discovery, the
  layer map and the gates.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saereward.errors import SaeRewardError


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


def cluster_bootstrap_indices(
    clusters: Sequence[Hashable] | np.ndarray, n_boot: int, seed: int
) -> list[np.ndarray]:
    """``n_boot`` bootstrap resamples of row indices that draw whole clusters with replacement.

    ``clusters[i]`` labels row ``i`` (e.g. the question a response answers). Each resample draws as
    many clusters as there are, uniformly with replacement, and takes *all* rows of every drawn
    cluster (a cluster drawn twice contributes its rows twice). Rows of one cluster stay together,
    so the bootstrap sees the data's real number of independent units: when a question's samples
    share their score and outcome, a per-row bootstrap treats them as independent evidence and
    gives a CI that is too narrow; this one does not.

    With unequal cluster sizes the resamples have unequal lengths. Clusters are numbered in order
    of first appearance and drawn with one ``rng.integers(0, G, size=(n_boot, G))`` call, so with one
    row per cluster (``clusters = range(n)``) the resamples equal the ordinary per-row bootstrap
    ``rng.integers(0, n, size=(n_boot, n))`` of the same seed.
    """
    labels = clusters.tolist() if isinstance(clusters, np.ndarray) else list(clusters)
    if not labels:
        raise ValueError("need at least one row to resample")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    code_of: dict[Hashable, int] = {}
    codes = np.fromiter((code_of.setdefault(c, len(code_of)) for c in labels), dtype=np.int64)
    n_clusters = len(code_of)
    order = np.argsort(codes, kind="stable")  # rows grouped by cluster, in their original order
    sizes = np.bincount(codes, minlength=n_clusters)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picks = np.random.default_rng(seed).integers(0, n_clusters, size=(n_boot, n_clusters))
    out = []
    for row in picks:
        k = sizes[row]
        first = np.repeat(starts[row], k)  # where each drawn cluster's rows begin in ``order``
        within = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)  # 0..size-1 inside each cluster
        out.append(order[first + within])
    return out


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` float64: how often each of ``n`` units is drawn in each of ``n_boot`` resamples
    with replacement (``rng.integers(0, n, size=(n_boot, n))`` of ``seed``). A resample of per-unit
    sums is then one product: ``bootstrap_counts(...) @ sums``."""
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)


def percentile_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval ``[q((1-c)/2), q((1+c)/2)]`` of the finite ``values`` (NaN if none are)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    a = (1 - confidence) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def partial_spearman(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, z: Sequence[float] | np.ndarray
) -> float:
    """Spearman partial correlation of ``x`` and ``y`` controlling for ``z``.

    All three are replaced by their average ranks (ties share a rank); the ranks of ``z`` are
    regressed out of those of ``x`` and of ``y`` by least squares with an intercept; the result is
    the Pearson correlation of the two residuals. For one control variable this equals the closed
    form on the rank correlations ``(r_xy − r_xz r_yz) / sqrt((1 − r_xz²)(1 − r_yz²))``.

    It answers "does ``x`` still order ``y`` among responses of the same length (``z``)?". NaN
    when a residual has no variance (e.g. ``x`` is a monotone function of ``z``).
    """
    from scipy.stats import rankdata

    rx, ry, rz = (rankdata(np.asarray(v, dtype=np.float64).ravel()) for v in (x, y, z))
    if not len(rx) == len(ry) == len(rz) or len(rx) < 3:
        raise ValueError(f"need >= 3 paired values, got lengths {len(rx)}, {len(ry)}, {len(rz)}")
    design = np.column_stack([np.ones_like(rz), rz])
    coef, *_ = np.linalg.lstsq(design, np.column_stack([rx, ry]), rcond=None)
    res = np.column_stack([rx, ry]) - design @ coef
    res -= res.mean(0)
    den = float(np.sqrt((res[:, 0] ** 2).sum() * (res[:, 1] ** 2).sum()))
    scale = float(np.sqrt((rx - rx.mean()) @ (rx - rx.mean()) * ((ry - ry.mean()) @ (ry - ry.mean()))))
    if not den > 1e-12 * max(scale, 1.0):
        return float("nan")
    return float((res[:, 0] * res[:, 1]).sum() / den)


def cohens_d(x: Tensor, y: Tensor) -> Tensor:
    """Column-wise Cohen's d of ``x [n_c, F]`` vs ``y [n_w, F]`` (pooled SD, ddof=1); 0 where the SD is 0."""
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"Cohen's d needs >= 2 rows per group, got {x.shape[0]} and {y.shape[0]}")
    x, y = x.double(), y.double()
    diff = x.mean(0) - y.mean(0)
    sd = ((x.var(0, unbiased=True) + y.var(0, unbiased=True)) / 2).sqrt()
    return torch.where(sd > 0, diff / sd.clamp_min(1e-300), torch.zeros_like(diff)).float()


def require_both_outcomes(correct: Tensor, where: str, fix: str) -> tuple[int, int]:
    """Raise unless there are >= 2 correct and >= 2 wrong responses; return (n_correct, n_wrong)."""
    n_c = int(correct.sum())
    n_w = int((~correct).sum())
    if n_c < 2 or n_w < 2:
        raise SaeRewardError(
            f"{where} has {n_c} correct and {n_w} wrong responses; contrastive statistics need at least 2 "
            f"of each: {fix}"
        )
    return n_c, n_w


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / den, np.nan)


def _row_auroc(score_ranks: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mann–Whitney AUROC per row from average ranks of the scores (ties count 1/2)."""
    n1 = y.sum(1)
    n0 = y.shape[1] - n1
    r1 = (score_ranks * y).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), (r1 - n1 * (n1 + 1) / 2) / (n1 * n0), np.nan)


def _equal_length_groups(draws: list[np.ndarray]) -> list[np.ndarray]:
    """Stack bootstrap resamples of equal length into ``[B_k, L]`` index matrices, one per length.

    A cluster bootstrap with unequal cluster sizes gives resamples of unequal lengths; grouping them
    keeps the row-wise (vectorised) ranks. Quantiles do not depend on the order of the replicates.
    """
    by_len: dict[int, list[np.ndarray]] = {}
    for d in draws:
        by_len.setdefault(len(d), []).append(d)
    return [np.stack(v) for v in by_len.values()]


def resample_indices(n: int, clusters: Any, n_boot: int, seed: int) -> list[np.ndarray]:
    """The bootstrap's ``n_boot`` resamples of ``n`` row indices as ``[B_k, L]`` matrices, one per
    resample length: by cluster (:func:`cluster_bootstrap_indices`) when ``clusters`` is given, else
    by row."""
    labels = range(n) if clusters is None else list(np.asarray(clusters).ravel())
    if len(labels) != n:
        raise SaeRewardError(f"clusters has {len(labels)} labels for {n} responses")
    return _equal_length_groups(cluster_bootstrap_indices(labels, n_boot, seed))


def association(
    score: Any,
    outcome: Any,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    clusters: Any = None,
) -> dict[str, Any]:
    """Spearman ρ (+p, bootstrap CI), Pearson r (+p), AUROC (+bootstrap CI) of ``score`` vs binary ``outcome``.

    The CIs are percentile bootstraps. With ``clusters`` (one label per response, e.g. its question
    id) the bootstrap draws whole clusters (:func:`cluster_bootstrap_indices`):
    samples of one question are correlated, and resampling them one by one would count each
    question several times as independent evidence and narrow the CI. Without ``clusters`` every
    response is its own cluster. Resamples where ρ or AUROC is undefined (one class only, constant
    score) are dropped; ``n_boot`` counts the ones kept. p-values are the usual per-response tests
    and ignore the clustering (so they are optimistic when questions repeat).
    """
    from scipy.stats import pearsonr, rankdata, spearmanr

    s = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(outcome, dtype=np.float64).ravel()
    n = len(s)
    if n != len(y) or n < 3:
        raise SaeRewardError(f"association needs >= 3 paired values, got {n} scores and {len(y)} outcomes")
    if not np.isfinite(s).all():
        raise SaeRewardError("scores contain NaN or inf: check the SAE and the rollouts")
    both = 0 < y.sum() < n
    const = bool(np.ptp(s) == 0)
    n_clusters = n if clusters is None else len(set(np.asarray(clusters).ravel().tolist()))
    res: dict[str, Any] = {
        "n": n,
        "n_correct": int(y.sum()),
        "n_clusters": n_clusters,
        "bootstrap_unit": "response" if clusters is None else "cluster",
        "seed": seed,
        "confidence": confidence,
    }
    if not both or const:
        res.update(
            {
                "spearman_rho": float("nan"),
                "spearman_p": float("nan"),
                "pearson_r": float("nan"),
                "pearson_p": float("nan"),
                "auroc": float("nan"),
                "rho_ci": [float("nan")] * 2,
                "auroc_ci": [float("nan")] * 2,
                "n_boot": 0,
                "note": "one outcome class only" if not both else "constant score",
            }
        )
        return res
    sp = spearmanr(s, y)
    pr = pearsonr(s, y)
    auc = float(_row_auroc(rankdata(s)[None], y[None])[0])
    rho_parts, auc_parts = [], []
    for idx in resample_indices(n, clusters, n_boot, seed):
        bs, by = s[idx], y[idx]
        bsr = rankdata(bs, axis=1)
        rho_parts.append(_row_pearson(bsr, rankdata(by, axis=1)))
        auc_parts.append(_row_auroc(bsr, by))
    rho_b, auc_b = np.concatenate(rho_parts), np.concatenate(auc_parts)
    ok = np.isfinite(rho_b) & np.isfinite(auc_b)
    res.update(
        {
            "spearman_rho": float(sp.statistic),
            "spearman_p": float(sp.pvalue),
            "pearson_r": float(pr.statistic),
            "pearson_p": float(pr.pvalue),
            "auroc": auc,
            "rho_ci": list(percentile_ci(rho_b[ok], confidence)),
            "auroc_ci": list(percentile_ci(auc_b[ok], confidence)),
            "n_boot": int(ok.sum()),
        }
    )
    return res


def partial_association(
    score: Any,
    outcome: Any,
    control: Any,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    clusters: Any = None,
) -> dict[str, Any]:
    """Spearman partial ρ of ``score`` vs ``outcome`` with ``control`` held fixed, + bootstrap CI.

    The point value is :func:`partial_spearman`. The bootstrap (by cluster when
    ``clusters`` is given, with the same resamples as :func:`association` for the same seed) uses the
    closed form on row-wise rank correlations, ``(r_xy − r_xz r_yz) / sqrt((1 − r_xz²)(1 − r_yz²))``,
    which equals the residual definition; resamples where it is undefined are dropped.
    """
    from scipy.stats import rankdata

    s, y, z = (np.asarray(v, dtype=np.float64).ravel() for v in (score, outcome, control))
    n = len(s)
    if not n == len(y) == len(z) or n < 3:
        raise SaeRewardError(f"partial association needs >= 3 triples, got {n}, {len(y)}, {len(z)}")
    rho = partial_spearman(s, y, z)
    res: dict[str, Any] = {"partial_rho": rho, "partial_rho_ci": [float("nan")] * 2, "n_boot": 0}
    if not np.isfinite(rho):
        return res
    parts = []
    for idx in resample_indices(n, clusters, n_boot, seed):
        rs, ry, rz = (rankdata(v[idx], axis=1) for v in (s, y, z))
        r_sy, r_sz, r_yz = _row_pearson(rs, ry), _row_pearson(rs, rz), _row_pearson(ry, rz)
        with np.errstate(invalid="ignore", divide="ignore"):
            parts.append((r_sy - r_sz * r_yz) / np.sqrt((1 - r_sz**2) * (1 - r_yz**2)))
    b = np.concatenate(parts)
    b = b[np.isfinite(b) & (np.abs(b) <= 1 + 1e-9)]
    res.update({"partial_rho_ci": list(percentile_ci(b, confidence)), "n_boot": len(b)})
    return res


def mean_difference(x: Tensor, correct: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    """``mean(x | correct) − mean(x | wrong)`` over the rows of ``x [R, d]``, computed in ``dtype``.

    The contrastive vector of the layer map, the raw-direction baselines and CAA steering. Raises
    unless both outcomes are present and there is one label per row.
    """
    y = torch.as_tensor(correct if isinstance(correct, Tensor) else list(correct)).bool().flatten()
    if y.shape[0] != x.shape[0]:
        raise SaeRewardError(f"{x.shape[0]} pooled residuals but {y.shape[0]} correctness labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise SaeRewardError(
            f"the contrastive vector needs correct and wrong responses, got {n_pos} correct and {n_neg} wrong: "
            "use rollouts with both"
        )
    xd = x.to(dtype)
    return xd[y].mean(0) - xd[~y].mean(0)
