"""Rewards and advantages for GRPO: outcome (R0), SAE pack (R1), raw direction (R2).

Pure tensor functions; shapes are ``B`` completions (``B = questions × G``, grouped contiguously),
``T`` positions, ``mask [B, T]`` the response positions (see :mod:`saereward.rollouts` for the one
definition). The seed's G3 form, with ``mech(t)`` the per-token score of
:class:`saereward.features.scoring.PackScorer` (R1) or the projection on the raw contrastive
direction (R2):

    r_b   = outcome_b + λ · mean_{t ∈ mask_b} mech_b(t)
    A_b   = (r_b − mean_group(r)) / (std_group(r) + ε)
    adv_bt = A_b + λ · z(mech)_bt      on response positions, 0 elsewhere

``z`` is a z-score over the **response positions of the whole batch only** (the seed's z-score also
counted prompt and pad zeros, which shifts the mean toward 0 and shrinks the spread by the share of
padding). ``aggregation`` picks the seed's form (``both``), only the trajectory term
(``trajectory``: ``adv = A_b`` with the mech mean inside ``r``), or only the token term (``token``:
``A_b`` from the outcome alone, plus ``λ z``). R0 is ``λ = 0``.

:class:`OutcomeReward` is a TRL-compatible reward callable (``(prompts, completions, **columns) ->
list[float]``) built on a task's verifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from saereward.errors import SaeRewardError

RewardKind = Literal["outcome", "sae", "direction"]
Aggregation = Literal["both", "trajectory", "token"]
REWARD_KINDS: dict[str, str] = {
    "outcome": "R0: verifier outcome only",
    "sae": "R1: outcome + λ · per-token SAE pack score (the G1 statistic)",
    "direction": "R2: outcome + λ · projection on the raw contrastive direction",
}


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over data-parallel ranks (identity without an initialized process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def masked_zscore(x: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """z-score of ``x [B, T]`` using only the positions in ``mask``; 0 outside the mask.

    The mean and (population) SD come from sums that are all-reduced across data-parallel ranks, so
    every rank normalizes with the statistics of the whole batch, as a single process would.
    """
    m = mask.bool()
    xm = x.double().where(m, torch.zeros((), dtype=torch.float64))
    sums = all_reduce_sum(torch.stack([xm.sum(), (xm * xm).sum(), m.sum().double()]))
    n = float(sums[2])
    if n == 0:
        return torch.zeros_like(x)
    mean = sums[0] / n
    var = (sums[1] / n - mean * mean).clamp_min(0.0)
    std = var.sqrt() if n > 1 else var.new_tensor(0.0)
    return torch.where(m, ((x.double() - mean) / (std + eps)).to(x.dtype), torch.zeros_like(x))


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """``(r − mean_g) / (std_g + ε)`` within contiguous groups of ``group_size`` (population std)."""
    if group_size < 2:
        raise SaeRewardError(
            f"group size {group_size} < 2: GRPO compares completions within a group; use >= 2"
        )
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def token_advantages(
    outcome: Tensor,
    mech: Tensor | None,
    mask: Tensor,
    group_size: int,
    lam: float,
    aggregation: Aggregation = "both",
    eps: float = 1e-4,
    loss_mask: Tensor | None = None,
    gate: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token advantages ``[B, T]`` and the per-completion total rewards ``[B]``.

    ``mask`` marks the positions that carry ``mech`` (its mean and z-score use only them);
    ``loss_mask`` (default ``mask``) the tokens that receive the advantage; 0 elsewhere. ``gate``
    ``[B, T]`` (bool, the dual verifier) keeps the per-token ``λ·z(mech)`` term only where True; the
    z-score itself is computed over all of ``mask``.
    """
    m = mask.bool()
    lm = m if loss_mask is None else loss_mask.bool()
    zero = torch.zeros(())
    outcome = outcome.to(m.device)  # verifier results may be built on the CPU
    if mech is None or lam == 0.0:
        adv = group_advantages(outcome.float(), group_size, eps)
        return adv[:, None].expand_as(lm).where(lm, zero).float(), outcome.float()
    mech = mech.float().where(m, zero)
    mech_mean = mech.sum(1) / m.sum(1).clamp_min(1)
    total = outcome.float() + (lam * mech_mean if aggregation in ("both", "trajectory") else 0.0)
    A = group_advantages(total, group_size, eps)
    adv = A[:, None].expand_as(lm).float().where(lm, zero)
    if aggregation in ("both", "token"):
        z = masked_zscore(mech, m).where(lm, zero)
        if gate is not None:
            z = z.where(gate.bool(), zero)
        adv = adv + lam * z
    return adv, total


@dataclass(frozen=True)
class LambdaSchedule:
    """λ at step s: ``constant`` (``start``) or ``linear`` from ``start`` to ``end`` over ``steps``."""

    kind: Literal["constant", "linear"] = "constant"
    start: float = 0.1
    end: float = 0.0
    steps: int = 100

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        frac = min(max(step / max(self.steps, 1), 0.0), 1.0)
        return self.start + (self.end - self.start) * frac


class DirectionScorer:
    """R2's per-token score: projection of residuals on a unit direction (same interface as ``PackScorer``)."""

    def __init__(self, direction: Tensor) -> None:
        n = direction.norm()
        if not n > 0:
            raise SaeRewardError("the contrastive direction is zero: re-run discovery with both outcomes")
        self.direction = (direction / n).float()

    def token_scores(self, x: Tensor) -> Tensor:
        return x.float() @ self.direction.to(x.device)


class OutcomeReward:
    """TRL-compatible outcome reward: 1.0 when the task's verifier accepts the completion, else 0.0.

    Call as ``reward(prompts=..., completions=..., qid=[...])``: the dataset must carry a ``qid``
    column (question id); extra columns are ignored, as TRL requires. Chat-style completions (lists
    of messages) are reduced to the text of their last message.
    """

    def __init__(self, task: Any) -> None:
        self.task = task
        self.items = {it.id: it for it in task.items()}
        self.__name__ = f"outcome_{task.name}"

    def __call__(
        self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **kw: Any
    ) -> list[float]:
        qids = kw.get("qid")
        if qids is None:
            raise SaeRewardError("OutcomeReward needs a `qid` column in the dataset to find each question")
        out = []
        for qid, c in zip(qids, completions, strict=True):
            text = c[-1]["content"] if isinstance(c, list) else str(c)
            item = self.items.get(qid)
            if item is None:
                raise SaeRewardError(f"question id {qid!r} is not in task {self.task.name!r}")
            out.append(1.0 if self.task.verify(item, text) else 0.0)
        return out


def check_pack_scorer(scorer: Any, model: Any, layer: int | None, model_name: str | None = None) -> int:
    """Refuse a :class:`~saereward.features.scoring.PackScorer` that cannot read ``model`` at ``layer``;
    return the layer as a non-negative index (``None``: the pack's, else the SAE's).

    The checks both GRPO trainers make before training: a layer the model has, the pack's discovery
    layer, the SAE's width against the residual stream, and (given ``model_name``) the model a
    saereward pack was built on. Foreign packs, which record another naming of the model, only warn.
    """
    import logging

    from saereward.lm import hidden_size, resolve_layer
    from saereward.sae.formats import check_sae_matches_model

    pack, sae = scorer.pack, scorer.sae
    if layer is None:
        layer = pack.layer if pack.layer is not None else sae.cfg.layer
    if layer is None:
        raise SaeRewardError("no reward layer: the pack and SAE record none; pass --layer")
    layer = resolve_layer(model, layer)
    if pack.layer is not None and pack.layer != layer:
        raise SaeRewardError(
            f"pack {pack.name!r} was discovered at layer {pack.layer}, the reward reads layer {layer}: "
            "use the pack's layer or re-run discovery at this layer"
        )
    if model_name and pack.model_name and pack.model_name != model_name:
        msg = (
            f"pack {pack.name!r} was built on model {pack.model_name}, training uses {model_name}: "
            "use a pack discovered on this model"
        )
        if pack.source_format == "saereward.pack":
            raise SaeRewardError(msg)
        logging.getLogger(__name__).warning("%s (a foreign pack: checked by width only)", msg)
    check_sae_matches_model(sae, hidden_size(model), layer)
    if model_name and sae.cfg.model and sae.cfg.model != model_name:  # same width, maybe another model
        logging.getLogger(__name__).warning(
            "the SAE was trained on %s, training uses %s: check that it reads this model",
            sae.cfg.model,
            model_name,
        )
    return layer
