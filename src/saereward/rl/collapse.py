"""The collapse guard of a GRPO run, over its logged training rows: the collapse rule
(:func:`collapse_check`) and the online monitor (:func:`monitor_rho`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SHORT_TOKENS = 3  # the collapse guard counts completions of at most this many tokens


def collapse_check(
    rows: Sequence[dict[str, Any]], window: int, short_frac: float, len_ratio: float
) -> dict[str, Any]:
    """The collapse rule over a run's training rows (``completion_len``, ``short_frac`` per step).

    A run is **collapsed** at the first step ``s`` where, over the last ``window`` steps,
    (a) the mean share of completions with at most :data:`SHORT_TOKENS` tokens is ``>= short_frac``
    (from step ``window`` on), or (b) the mean completion length is below ``len_ratio`` times the
    mean length of the first ``window`` steps (from step ``2 · window`` on). This is the failure
    mechreward's form produces: completions shrink to a few tokens.
    """
    train = [r for r in rows if r.get("step", 0) >= 1 and "completion_len" in r]
    for i in range(window - 1, len(train)):
        last = train[i - window + 1 : i + 1]
        short = sum(float(r.get("short_frac", 0.0)) for r in last) / window
        if short >= short_frac:
            return {
                "collapsed": True,
                "step": int(train[i]["step"]),
                "reason": f"{short:.0%} of completions had <= {SHORT_TOKENS} tokens over steps "
                f"{last[0]['step']}-{last[-1]['step']} (rule: >= {short_frac:.0%})",
            }
        if i + 1 >= 2 * window:
            first = sum(float(r["completion_len"]) for r in train[:window]) / window
            now = sum(float(r["completion_len"]) for r in last) / window
            if now < len_ratio * first:
                return {
                    "collapsed": True,
                    "step": int(train[i]["step"]),
                    "reason": f"mean completion length {now:.1f} tokens over steps {last[0]['step']}-"
                    f"{last[-1]['step']}, below {len_ratio} × the first steps' {first:.1f}",
                }
    return {"collapsed": False, "step": None, "reason": None}


def monitor_rho(rows: Sequence[dict[str, Any]], window: int) -> float:
    """The online monitor: Spearman ρ of the per-completion score with the outcome, pooled over the
    last ``window`` training rows (``completion_scores``/``completion_outcomes``); NaN when either is flat."""
    from scipy.stats import spearmanr

    train = [r for r in rows if "completion_scores" in r][-window:]
    xs = [v for r in train for v in r["completion_scores"]]
    ys = [v for r in train for v in r["completion_outcomes"]]
    if len(set(ys)) < 2 or len(set(xs)) < 2:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


__all__ = ["SHORT_TOKENS", "collapse_check", "monitor_rho"]
