"""The reward baseline: the base model's per-token score on its own rollouts, position by position.

The fixed-scale reward forms of :mod:`saereward.rl.reward` measure a token's score against what the
base model scores at the same response position, in the same prompt format, in units of a
reference SD (:class:`~saereward.rl.reward.RewardBaseline`). This module reads those statistics off
a rollout folder (``saereward rollouts`` keeps per-token residuals) with any per-token scorer (the
pack's :class:`~saereward.features.scoring.PackScorer` or the raw-direction scorer), leaving out the
end token and the tokens that spell a stop string, as the trainer does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saereward.errors import SaeRewardError
from saereward.io import write_json
from saereward.rl.reward import RewardBaseline, fit_baseline

BASELINE_FILE = "reward_baseline.json"


def scored_rows(
    scorer: Any, ro: Any, layer: int, tokenizer: Any, rows: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token scores of rollout responses ``rows``, padded: ``mech [B, T]``, ``full [B, T]`` (every
    position with a residual) and ``scored [B, T]`` (``full`` minus end and stop-string tokens)."""
    from saereward.generate import end_positions, stop_strings_for

    if layer not in ro.tokens:
        raise SaeRewardError(
            f"the rollouts at {ro.path} kept per-token residuals for layers {sorted(ro.tokens)}, not {layer}: "
            f"re-run `saereward rollouts --token-layers {layer}`"
        )
    off = ro.offsets
    lengths = [int(off[r + 1] - off[r]) for r in rows]
    T = max([1, *lengths])
    mech = torch.zeros(len(rows), T)
    ids = torch.full((len(rows), T), -1, dtype=torch.long)
    full = torch.zeros(len(rows), T, dtype=torch.bool)
    with torch.no_grad():
        for i, r in enumerate(rows):
            n = lengths[i]
            if n:
                mech[i, :n] = scorer.token_scores(ro.response_tokens(layer, r).float()).float().cpu()
                ids[i, :n] = ro.token_ids[int(off[r]) : int(off[r + 1])]
                full[i, :n] = True
    stops = stop_strings_for(ro.generation.get("prompt_format", "raw"))
    ends = end_positions(ids.clamp_min(0), full, tokenizer, stops, set(tokenizer.all_special_ids))
    return mech, full, full & ~ends


def measure_baseline(
    scorer: Any,
    ro: Any,
    layer: int,
    tokenizer: Any,
    split: str | None = "discovery",
    meta: dict[str, Any] | None = None,
) -> RewardBaseline:
    """Fit the baseline on the responses of ``split`` (``None``: all) of a rollout folder."""
    rows = [i for i, r in enumerate(ro.rows) if split is None or r.get("split") == split]
    if not rows:
        rows = list(range(len(ro.rows)))
    mech, _, scored = scored_rows(scorer, ro, layer, tokenizer, rows)
    scores = [mech[i][scored[i]] for i in range(len(rows))]
    info = {
        "rollouts": str(Path(ro.path).resolve()),
        "split": split,
        "layer": layer,
        "model": ro.summary.get("model"),
        "task": (ro.summary.get("task") or {}).get("name"),
        **ro.generation,
        **(meta or {}),
    }
    return fit_baseline(scores, meta=info)


def baseline_beside(pack_path: str | Path) -> Path:
    """Where discovery writes a pack's reward baseline: ``<pack>.baseline.json`` next to it."""
    p = Path(pack_path)
    return p.with_name(p.stem + ".baseline.json")


def save_baseline(b: RewardBaseline, path: str | Path) -> Path:
    write_json(path, b.to_dict())
    return Path(path)


def load_baseline(path: str | Path) -> RewardBaseline:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SaeRewardError(f"cannot read the reward baseline {p}: {exc}; re-measure it") from None
    if d.get("format") != "saereward.reward_baseline":
        raise SaeRewardError(f"{p} is not a saereward reward baseline: re-measure it")
    return RewardBaseline.from_dict(d)
