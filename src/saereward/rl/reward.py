"""Rewards and advantages for GRPO: outcome (R0), SAE pack (R1), raw direction (R2).

Pure tensor functions; shapes are ``B`` completions (``B = questions × G``, grouped contiguously),
``T`` response positions, ``mask [B, T]`` the positions whose per-token score ``mech(t)`` counts
(:class:`saereward.features.scoring.PackScorer` for R1, the projection on the raw contrastive
direction for R2), ``loss_mask [B, T]`` the tokens that receive an advantage. R0 is ``λ = 0``.

**Reward forms** (``form``; registry :data:`REWARD_FORMS`). Each returns per-token advantages and a
per-completion reward ``o_b + M_b``, where ``M_b`` is the form's mechanistic reward of the whole
completion (what :func:`completion_mech_reward` computes and the truncation audit cuts):

``mechreward`` (mechreward's G3 form, kept as the ablation; **length-biased**)::

    r_b = o_b + λ · mean_{t ∈ mask_b} mech_b(t)
    A_b = (r_b − mean_group(r)) / (std_group(r) + ε)
    adv_bt = A_b + λ · z(mech)_bt

  Two faults make it pay to stop early. In a group whose outcomes tie (most groups at low base
  accuracy) ``A_b = (m̄_b − m̄_g)/(std_g(m̄) + ε/λ)``: λ divides out and the mech mean ranks the
  completions at the strength of a correct-vs-wrong signal. And the mean over a completion's own
  tokens inherits the score's profile over positions: when the first tokens score high, a 1-token
  completion has the best mean. ``aggregation`` keeps its variants (``trajectory``: the mean in
  ``r`` only; ``token``: ``A_b`` from the outcome plus ``λ z``).

The other forms share one shape: the outcome advantage ``A_b = (o_b − mean_g o)/(std_g o + ε)``
(normalised within its group, 0 in a tied group) plus a per-token mech credit ``u_bt`` at a **fixed
scale** (never divided by a group's SD), from a score clipped to ``±clip`` reference SDs::

    adv_bt = A_b + u_bt            M_b = Σ_t u_bt / L_ref

``L_ref``, the mean scored length of base rollouts, is a fixed denominator: a completion's mech
reward does not change when it is merely shorter. In a tied group ``A_b = 0`` and only the O(λ)
credits remain.

``decoupled``: ``u_bt = λ · clip((mech_bt − μ_ref) / σ_ref)`` with the mean and SD of the score on
  base rollouts (:class:`RewardBaseline`). Decouples the two terms, but keeps the position profile.
``position``: ``u_bt = λ · clip((mech_bt − μ_ref(t)) / σ_ref)``, ``μ_ref(t)`` the base model's mean
  score at response position ``t`` in the RL prompt format, ``σ_ref`` the SD of that centred score.
  The base policy's expected credit is 0 at every position, so cutting or extending a completion
  gains nothing in expectation. End and stop-string tokens are left out of ``mask`` by the caller.
``shaped``: potential-based shaping (Ng et al. 1999) on the same centred score: potential
  ``Φ_t = λ · clip(s_t)`` after token ``t`` (0 before the first token and after the last), credit
  ``u_t = Φ_t − Φ_{t−1}``; the last token also gets the terminal ``−Φ``. Each completion's credits
  sum to exactly 0, so neither truncation nor padding can pay; the term only moves credit between
  a completion's tokens (towards those that raise the score). Credits reach ±2λ·clip. Since the
  credit is per token (no return-to-go), the end token carries ``−Φ`` of the last state: once RL
  has raised the score above the base model's, ending is penalised, a pull towards longer
  completions that the truncation audit (which sees ``M_b ≡ 0``) cannot show.

``z`` (mechreward form) is a z-score over the **response positions of the whole batch only**
(mechreward's own z-score also counted prompt and pad zeros).

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
from saereward.features.baseline import RewardBaseline
from saereward.model.lm import hidden_size, resolve_layer
from saereward.sae.formats import check_sae_matches_model

RewardKind = Literal["outcome", "sae", "direction"]
Aggregation = Literal["both", "trajectory", "token"]
RewardForm = Literal["mechreward", "decoupled", "position", "shaped"]
REWARD_FORMS: dict[str, str] = {
    "mechreward": "mechreward's form: λ·mean mech inside a group-normalised reward (length-biased; ablation)",
    "decoupled": "group-normalised outcome + λ·clip((mech − μ_ref)/σ_ref) per token, fixed scale",
    "position": "as decoupled, the score centred by the base model's mean at each response position",
    "shaped": "potential-based shaping of the position-centred score: each completion's credits sum to 0",
}
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


def all_gather_floats(t: Tensor) -> list[float]:
    """The values of a 1-D ``t`` from every data-parallel rank, in rank order (``t`` itself without
    an initialized process group)."""
    import torch.distributed as dist

    vals = [float(v) for v in t.detach().flatten().tolist()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, vals)
        return [v for p in parts for v in p]
    return vals


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


def require_baseline(form: str, baseline: RewardBaseline | None) -> RewardBaseline:
    if baseline is None:
        raise SaeRewardError(
            f"reward form {form!r} needs a reward baseline measured on base rollouts: pass one "
            "(train-rl measures it from the pack's rollouts), or use reward_form=mechreward"
        )
    for name in ("sd", "sd_raw", "mean_len"):
        if not getattr(baseline, name) > 0:
            raise SaeRewardError(f"the reward baseline has {name} = {getattr(baseline, name)}: re-measure it")
    return baseline


def standardized_score(form: str, mech: Tensor, baseline: RewardBaseline) -> Tensor:
    """``s_bt``: the score in reference-SD units, centred overall (decoupled) or per position."""
    if form == "decoupled":
        return (mech.float() - baseline.mean) / baseline.sd_raw
    return (mech.float() - baseline.position_means(mech.shape[1], mech.device)) / baseline.sd


def last_position(mask: Tensor) -> Tensor:
    """``[B]`` index of each row's last True position (−1 for an empty row)."""
    T = mask.shape[1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).max(1).values


def shaping_credits(phi: Tensor, loss_mask: Tensor) -> Tensor:
    """Potential-based credits ``Φ_t − Φ_{t−1}`` on ``loss_mask`` (``Φ_{−1} = 0``), the last token
    also paying the terminal ``−Φ``: every row's credits sum to exactly 0.

    ``phi [B, T]`` is 0 where no potential is defined (unscored tokens such as the end token).
    """
    lm = loss_mask.bool()
    zero = torch.zeros((), dtype=phi.dtype, device=phi.device)
    phi = phi.where(lm, zero)
    # Φ of the previous *loss* position (a mask with gaps still telescopes)
    idx = torch.arange(lm.shape[1], device=lm.device).expand_as(lm)
    last_seen = torch.where(lm, idx, torch.full_like(idx, -1)).cummax(1).values
    j = torch.nn.functional.pad(last_seen[:, :-1], (1, 0), value=-1)
    prev = phi.gather(1, j.clamp_min(0)).where(j >= 0, zero)
    credit = (phi - prev).where(lm, zero)
    last = last_position(lm)
    rows = torch.nonzero(last >= 0).flatten()
    credit[rows, last[rows]] -= phi[rows, last[rows]]
    return credit


def mech_credit(
    form: str,
    mech: Tensor,
    mask: Tensor,
    lam: float,
    baseline: RewardBaseline | None,
    clip: float = 3.0,
    loss_mask: Tensor | None = None,
    gate: Tensor | None = None,
) -> Tensor:
    """Per-token mech credit ``u [B, T]`` of the fixed-scale forms (0 off ``mask``/``loss_mask``)."""
    if form not in ("decoupled", "position", "shaped"):
        raise ValueError(f"mech_credit covers the fixed-scale forms, not {form!r}")
    b = require_baseline(form, baseline)
    m = mask.bool()
    zero = torch.zeros((), device=mech.device)
    s = standardized_score(form, mech, b).clamp(-clip, clip).where(m, zero)
    if gate is not None:
        s = s.where(gate.bool(), zero)
    u = lam * s
    if form == "shaped":
        return shaping_credits(u, m if loss_mask is None else loss_mask.bool() | m)
    return u


def completion_mech_reward(
    form: str,
    mech: Tensor,
    mask: Tensor,
    lam: float,
    baseline: RewardBaseline | None = None,
    clip: float = 3.0,
    loss_mask: Tensor | None = None,
) -> Tensor:
    """``M_b [B]``: the mechanistic reward a form gives each whole completion.

    mechreward: ``λ · mean_t mech`` (the term inside its group-normalised reward); the fixed-scale
    forms: ``Σ_t u_bt / L_ref``. This is what the truncation audit compares before and after a cut.
    """
    m = mask.bool()
    if form == "mechreward":
        mech = mech.float().where(m, torch.zeros((), device=mech.device))
        return lam * mech.sum(1) / m.sum(1).clamp_min(1)
    b = require_baseline(form, baseline)
    u = mech_credit(form, mech, m, lam, b, clip, loss_mask=loss_mask)
    return u.sum(1) / b.mean_len


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
    form: RewardForm = "mechreward",
    baseline: RewardBaseline | None = None,
    clip: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Per-token advantages ``[B, T]`` and the per-completion total rewards ``[B]`` of ``form``.

    ``mask`` marks the positions that carry ``mech``; ``loss_mask`` (default ``mask``) the tokens
    that receive the advantage; 0 elsewhere. ``gate`` ``[B, T]`` (bool, the dual verifier) keeps
    the per-token mech term only where True. ``aggregation`` applies to the mechreward form only;
    ``baseline`` and ``clip`` to the fixed-scale forms (see the module docstring).
    """
    if form not in REWARD_FORMS:
        raise SaeRewardError(f"unknown reward form {form!r}: choose from {', '.join(REWARD_FORMS)}")
    m = mask.bool()
    lm = m if loss_mask is None else loss_mask.bool()
    zero = torch.zeros((), device=m.device)
    outcome = outcome.to(m.device).float()  # verifier results may be built on the CPU
    if mech is None or lam == 0.0:
        adv = group_advantages(outcome, group_size, eps)
        return adv[:, None].expand_as(lm).where(lm, zero).float(), outcome
    if form != "mechreward":
        A = group_advantages(outcome, group_size, eps)
        u = mech_credit(form, mech, m, lam, baseline, clip, loss_mask=lm, gate=gate)
        u = u.where(lm, zero)
        adv = (A[:, None].expand_as(lm).float() + u).where(lm, zero)
        return adv, outcome + u.sum(1) / baseline.mean_len  # type: ignore[union-attr]
    mech = mech.float().where(m, zero)
    mech_mean = mech.sum(1) / m.sum(1).clamp_min(1)
    total = outcome + (lam * mech_mean if aggregation in ("both", "trajectory") else 0.0)
    A = group_advantages(total, group_size, eps)
    adv = A[:, None].expand_as(lm).float().where(lm, zero)
    if aggregation in ("both", "token"):
        z = masked_zscore(mech, m).where(lm, zero)
        if gate is not None:
            z = z.where(gate.bool(), zero)
        adv = adv + lam * z
    return adv, total


def outcome_last_token_rewards(outcome: Tensor, credits: Tensor, lengths: Tensor) -> Tensor:
    """One ``[B, T]`` reward tensor that carries both terms, for frameworks with a single token-reward
    channel (verl): the per-token credits ``u`` before each row's last token, the outcome ``o`` on it.

    The last token's own credit must be 0 (the caller leaves it out of the score, as the end token);
    :func:`split_last_token_rewards` inverts this exactly.
    """
    B, T = credits.shape
    pos = torch.arange(T, device=credits.device).expand(B, T)
    last = (lengths.to(credits.device).long() - 1)[:, None]
    if bool((credits.where(pos == last, torch.zeros((), device=credits.device)) != 0).any()):
        raise ValueError("a row's last token carries a credit: it must be left out of the score")
    keep = (pos < last).float()
    return credits.float() * keep + outcome.to(credits.device).float()[:, None] * (pos == last).float()


def split_last_token_rewards(rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`outcome_last_token_rewards`: ``(outcome [B], credits [B, T])`` from a reward
    tensor and its response ``mask`` (the last True position of a row holds the outcome)."""
    last = last_position(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    outcome = rewards[rows, last.clamp_min(0)].where(last >= 0, torch.zeros((), device=rewards.device))
    pos = torch.arange(rewards.shape[1], device=rewards.device).expand_as(rewards)
    credits = rewards.where((pos < last[:, None]) & mask.bool(), torch.zeros((), device=rewards.device))
    return outcome.float(), credits.float()


def keyed_group_advantages(
    rewards: Tensor, groups: Sequence[Any], eps: float = 1e-4, scale: bool = True
) -> Tensor:
    """:func:`group_advantages` for groups named by a key per row, in any order and of any size
    (population std; a group of one gets 0)."""
    keys: dict[Any, int] = {}
    gid = torch.tensor([keys.setdefault(g, len(keys)) for g in groups], device=rewards.device)
    r = rewards.double()
    n = torch.zeros(len(keys), dtype=torch.float64, device=r.device).index_add_(0, gid, torch.ones_like(r))
    mean = torch.zeros_like(n).index_add_(0, gid, r) / n
    var = torch.zeros_like(n).index_add_(0, gid, (r - mean[gid]) ** 2) / n
    adv = r - mean[gid]
    if scale:
        adv = adv / (var[gid].sqrt() + eps)
    return adv.to(rewards.dtype)


def within_group_corr(x: Tensor, y: Tensor, group_size: int) -> float:
    """Pearson correlation of ``x`` and ``y`` ``[B]`` after removing each group's mean (NaN if flat)."""
    xg = x.double().view(-1, group_size)
    yg = y.double().view(-1, group_size)
    xd = (xg - xg.mean(1, keepdim=True)).flatten()
    yd = (yg - yg.mean(1, keepdim=True)).flatten()
    den = float((xd.square().sum() * yd.square().sum()).sqrt())
    return float((xd * yd).sum()) / den if den > 1e-12 else float("nan")


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


def dual_gate(mech: Tensor, probe_logit: Tensor, mask: Tensor) -> Tensor:
    """``[B, T]`` bool: response tokens where z(mech) and z(probe logit) share a sign (the dual verifier: :mod:`saereward.features.dual_probe`).

    Positions outside ``mask`` are False. A z-score of exactly 0 agrees with nothing.
    """
    m = mask.bool()
    zm = masked_zscore(mech.float().where(m, torch.zeros(())), m)
    zp = masked_zscore(probe_logit.float().where(m, torch.zeros(())), m)
    return (torch.sign(zm) * torch.sign(zp) > 0) & m
