"""Paired comparison of two RL arms on the same held-out questions, over several random seeds.

Every G2 run is scored greedily on the same fixed list of held-out questions, so two arms (say R1
and R0) give, for each random seed ``s`` and question ``q``, a pair of 0/1 outcomes. Their
difference ``d[s, q] = a[s, q] − b[s, q]`` is −1, 0 or +1, and the mean of ``d`` over all pairs is
exactly the difference of the two arms' mean accuracies. Pairing removes the question-difficulty
variance that two independent accuracies (and their separate Wilson intervals) carry: a hard
question that both arms miss contributes 0 to ``d`` instead of noise to both accuracies.

**Two-level bootstrap.** The mean difference has two sources of uncertainty: which questions were
drawn (item variance) and which training trajectories the seeds happened to produce (run variance).
Resampling only questions treats the seeds as fixed and understates the uncertainty of a claim about
the *training method*. :func:`two_level_bootstrap` therefore draws, for each replicate, ``S`` seeds
with replacement and then ``Q`` questions with replacement; each drawn question keeps its pairs of
every drawn seed, so the replicate is the ``S × Q`` sub-matrix ``d[seeds][:, questions]`` and its
statistic is that sub-matrix's mean. The 95 % CI is the percentile interval (2.5 % and 97.5 %
quantiles of the replicate means).

The replicate mean is computed without building the sub-matrix: if ``c_s`` counts how often seed
``s`` was drawn and ``k_q`` how often question ``q`` was, then ``mean = Σ_s Σ_q c_s d[s,q] k_q /
(S·Q)``, one matrix product for all replicates.

**McNemar.** The exact McNemar test (:func:`saereward.stats.mcnemar`) looks only at the discordant
pairs, pooled over seeds: ``a_only`` (a right, b wrong) against ``b_only`` (a wrong, b right); under
"no difference" each discordant pair falls either way with probability 1/2. Pooling over seeds
treats the ``S·Q`` pairs as independent, which ignores the run variance; the bootstrap CI is the
primary interval and the p-value a familiar companion.

The functions here are pure (no I/O) and take correctness as ``'0'/'1'`` strings, one per seed, in a
shared question order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from saereward.stats import mcnemar


def bits_matrix(bits_per_seed: Sequence[str]) -> np.ndarray:
    """A ``(seeds, questions)`` 0/1 matrix from one ``'0'/'1'`` string per seed (equal lengths)."""
    if not bits_per_seed:
        raise ValueError("no seeds: need at least one eval_bits string")
    lengths = {len(b) for b in bits_per_seed}
    if len(lengths) != 1:
        raise ValueError(f"eval_bits of unequal lengths {sorted(lengths)}: the runs saw different questions")
    bad = [b for b in bits_per_seed if set(b) - {"0", "1"}]
    if bad:
        raise ValueError(f"eval_bits must hold only '0'/'1', got {bad[0][:20]!r}")
    return np.array([[c == "1" for c in b] for b in bits_per_seed], dtype=np.float64)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Row-wise draw counts: ``out[b, i]`` = how often ``i`` appears in ``idx[b]``."""
    out = np.zeros((idx.shape[0], n))
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return out


def bootstrap_means(diff: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """``n_boot`` two-level replicate means of the ``(seeds, questions)`` matrix ``diff``.

    Per replicate: ``S`` seed indices, then ``Q`` question indices, each uniform with replacement
    (drawn as ``rng.integers`` in that order from ``numpy.random.default_rng(seed)``, so a given
    seed always gives the same replicates)."""
    if diff.ndim != 2 or 0 in diff.shape:
        raise ValueError(f"diff must be a non-empty (seeds, questions) matrix, got shape {diff.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n_s, n_q = diff.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_s, size=(n_boot, n_s))
    questions = rng.integers(0, n_q, size=(n_boot, n_q))
    c_s, k_q = _counts(seeds, n_s), _counts(questions, n_q)
    means: np.ndarray = ((c_s @ diff) * k_q).sum(axis=1) / (n_s * n_q)
    return means


def two_level_bootstrap(
    diff: np.ndarray, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of the mean of ``diff`` resampling seeds, then questions (see the module text)."""
    means = bootstrap_means(diff, n_boot=n_boot, seed=seed)
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_compare(
    a_bits: Sequence[str], b_bits: Sequence[str], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Paired ``a − b`` over seeds × questions: mean difference, two-level bootstrap CI, McNemar.

    ``a_bits[i]`` and ``b_bits[i]`` are the same random seed's correctness strings of the two arms
    (for a lift over step 0: the run's final and step-0 strings). Returns ``mean_diff`` (accuracy
    units), ``ci_low``/``ci_high`` (95 %), ``per_seed_diff``, ``n_seeds``, ``n_questions``,
    ``n_pairs``, ``a_only``/``b_only`` (the discordant pairs) and McNemar's exact ``p_value``."""
    if len(a_bits) != len(b_bits):
        raise ValueError(f"paired arms need the same seeds, got {len(a_bits)} and {len(b_bits)}")
    a, b = bits_matrix(a_bits), bits_matrix(b_bits)
    if a.shape != b.shape:
        raise ValueError(f"paired arms saw {a.shape[1]} and {b.shape[1]} questions: not the same list")
    diff = a - b
    lo, hi = two_level_bootstrap(diff, n_boot=n_boot, seed=seed)
    mc = mcnemar([bool(x) for x in b.ravel()], [bool(x) for x in a.ravel()])
    return {
        "mean_diff": float(diff.mean()),
        "ci_low": lo,
        "ci_high": hi,
        "per_seed_diff": [float(x) for x in diff.mean(axis=1)],
        "n_seeds": int(diff.shape[0]),
        "n_questions": int(diff.shape[1]),
        "n_pairs": int(diff.size),
        "a_only": int(mc["recovered"]),
        "b_only": int(mc["broken"]),
        "p_value": float(mc["p_value"]),
        "n_boot": n_boot,
        "boot_seed": seed,
        "confidence": 0.95,
    }
