"""The reward baseline: the base model's per-token score on its own rollouts, position by position.

The fixed-scale reward forms of :mod:`saereward.rl.reward` measure a token's score against what the
base model scores at the same response position, in the same prompt format, in units of a
reference SD (:class:`RewardBaseline`, fitted by :func:`fit_baseline`). This module reads those statistics off
a rollout folder (``saereward rollouts`` keeps per-token residuals) with any per-token scorer (the
pack's :class:`~saereward.features.scoring.PackScorer` or the raw-direction scorer), leaving out the
end token and the tokens that spell a stop string, as the trainer does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saereward.errors import SaeRewardError
from saereward.io import write_json
from saereward.model.generate import end_positions, stop_strings_for

BASELINE_FILE = "reward_baseline.json"


@dataclass(frozen=True)
class RewardBaseline:
    """The per-token score of the base model on its own rollouts in the RL prompt format.

    ``pos_mean[t]``: mean score at response position ``t`` over the completions that reach it, for
    the positions at least ``min_count`` completions reach; later positions use ``tail_mean`` (the
    mean over all of them). ``mean``/``sd_raw``: the score's overall mean and SD; ``sd``: the SD of
    the position-centred score; ``mean_len``: mean scored tokens per completion (the fixed
    denominator ``L_ref``). ``meta`` records where it was measured (model, layer, task, prompt
    format, scorer, rollouts).
    """

    pos_mean: tuple[float, ...]
    tail_mean: float
    mean: float
    sd_raw: float
    sd: float
    mean_len: float
    n_completions: int
    n_tokens: int
    min_count: int = 20
    meta: dict[str, Any] = field(default_factory=dict)

    def position_means(self, T: int, device: Any = None) -> Tensor:
        """``[T]`` the mean score at response positions ``0 .. T−1`` (tail-filled)."""
        table = list(self.pos_mean[:T]) + [self.tail_mean] * max(0, T - len(self.pos_mean))
        return torch.tensor(table, dtype=torch.float32, device=device)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pos_mean": list(self.pos_mean), "format": "saereward.reward_baseline"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewardBaseline:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["pos_mean"] = tuple(float(x) for x in kw.get("pos_mean", ()))
        return cls(**kw)


def fit_baseline(
    scores: Sequence[Tensor], min_count: int = 20, meta: dict[str, Any] | None = None
) -> RewardBaseline:
    """Fit a :class:`RewardBaseline` from per-completion scores (1-D, response positions 0, 1, ...)."""
    scores = [s.detach().double().flatten().cpu() for s in scores]
    if not scores or not any(len(s) for s in scores):
        raise SaeRewardError(
            "no scored tokens to measure the reward baseline on: need base rollouts with responses"
        )
    T = max(len(s) for s in scores)
    sums, counts = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for s in scores:
        sums[: len(s)] += s
        counts[: len(s)] += 1
    reliable = int((counts >= min_count).sum()) if counts[0] >= min_count else 1
    flat = torch.cat(scores)
    pos_idx = torch.cat([torch.arange(len(s)) for s in scores])
    tail = flat[pos_idx >= reliable]
    tail_mean = float(tail.mean()) if len(tail) else float(sums[reliable - 1] / counts[reliable - 1])
    pos_mean = (sums[:reliable] / counts[:reliable]).tolist()
    table = torch.tensor(pos_mean + [tail_mean] * (T - reliable), dtype=torch.float64)
    centred = flat - table[pos_idx]
    return RewardBaseline(
        pos_mean=tuple(float(x) for x in pos_mean),
        tail_mean=tail_mean,
        mean=float(flat.mean()),
        sd_raw=float(flat.std(unbiased=False)),
        sd=float(centred.std(unbiased=False)),
        mean_len=float(len(flat) / len(scores)),
        n_completions=len(scores),
        n_tokens=len(flat),
        min_count=min_count,
        meta=dict(meta or {}),
    )


def scored_rows(
    scorer: Any, ro: Any, layer: int, tokenizer: Any, rows: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token scores of rollout responses ``rows``, padded: ``mech [B, T]``, ``full [B, T]`` (every
    position with a residual) and ``scored [B, T]`` (``full`` minus end and stop-string tokens)."""
    ro.layer_tokens(layer)  # the layer is there, or one error saying why not
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
    if not isinstance(d, dict) or d.get("format") != "saereward.reward_baseline":
        raise SaeRewardError(f"{p} is not a saereward reward baseline: re-measure it")
    numbers = [
        *(d.get("pos_mean") or []),
        *(d.get(k) for k in ("tail_mean", "mean", "sd_raw", "sd", "mean_len")),
    ]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise SaeRewardError(
            f"the reward baseline {p} holds a missing or non-finite value (the base model's scores were "
            "not finite): check the SAE and re-run discover"
        )
    return RewardBaseline.from_dict(d)
