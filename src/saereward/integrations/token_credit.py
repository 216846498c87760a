"""Per-token SAE credits for frameworks that hand over token ids: the scoring behind the verl adapter.

One forward of the frozen base model over a prompt and its response (vLLM-style rollouts return no
hidden states), the residuals at the pack's layer, the pack score ``mech(t)`` of each response token
(:class:`saereward.features.scoring.PackScorer`, true TopK), then the fixed-scale credit of a reward
form (:func:`saereward.rl.reward.mech_credit`: ``decoupled``, ``position`` or ``shaped``) against the
reward baseline that discovery measured beside the pack. The response's last token is left out of the
score, as saereward's own trainer leaves out the end token, so its credit is 0 and it can carry the
outcome (:func:`saereward.rl.reward.outcome_last_token_rewards`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from saereward.config import from_dict, option
from saereward.errors import SaeRewardError
from saereward.features.baseline import RewardBaseline, baseline_beside, load_baseline
from saereward.features.pack import load_pack
from saereward.features.scoring import PackScorer
from saereward.model.capture import forward_residuals
from saereward.model.lm import DEFAULT_MODEL, LoadedModel, load_model
from saereward.options import PackOptions
from saereward.rl.reward import mech_credit
from saereward.sae.formats import load_sae

__all__ = ["TokenCreditConfig", "TokenCredits"]

CreditForm = Literal["decoupled", "position", "shaped"]


@dataclass(frozen=True)
class TokenCreditConfig(PackOptions):
    """Settings of the per-token credit (verl: the ``reward.saereward`` table)."""

    form: CreditForm = option("position", "reward form of the credit (see `saereward train-rl --help`)")
    lam: float = option(0.1, "λ: credit per reference SD of the score")
    clip: float = option(3.0, "clip of the standardized score, in reference SDs")
    baseline: str | None = option(None, "reward baseline (default: <pack>.baseline.json beside the pack)")

    def __post_init__(self) -> None:
        if not self.pack:
            raise ValueError("pack is required (verl: +reward.saereward.pack=/path/pack.json)")
        if self.lam < 0 or self.clip <= 0:
            raise ValueError("lam must be >= 0 and clip > 0")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TokenCreditConfig:
        return from_dict(cls, dict(data or {}), prefix="reward.saereward.")


class TokenCredits:
    """``credits(prompt_ids, response_ids)``: the fixed-scale credit of each response token."""

    def __init__(
        self,
        lm: LoadedModel,
        scorer: PackScorer,
        layer: int,
        baseline: RewardBaseline,
        cfg: TokenCreditConfig,
    ) -> None:
        self.lm, self.scorer, self.layer, self.baseline, self.cfg = lm, scorer, layer, baseline, cfg
        self._lock = threading.Lock()  # one forward at a time: the model is shared

    @classmethod
    def load(cls, cfg: TokenCreditConfig, lm: LoadedModel | None = None) -> TokenCredits:
        pack = load_pack(cfg.pack)
        sae_path = cfg.sae or pack.metadata.get("sae_path")
        if not sae_path:
            raise SaeRewardError(f"{cfg.pack} records no SAE: set reward.saereward.sae")
        sae = load_sae(sae_path, device=cfg.device)
        if lm is None:
            lm = load_model(cfg.model or pack.model_name or DEFAULT_MODEL, dtype=cfg.dtype, device=cfg.device)
        layer = pack.layer if pack.layer is not None else sae.cfg.layer
        if layer is None:
            raise SaeRewardError(f"neither {cfg.pack} nor its SAE records a layer")
        baseline = load_baseline(cfg.baseline or baseline_beside(cfg.pack))
        return cls(lm, PackScorer(sae, pack, d_model=lm.d_model), int(layer), baseline, cfg)

    def mech(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Tensor:
        """``mech(t)`` ``[n]`` of each response token, read from one forward over prompt + response."""
        ids = torch.tensor(
            [list(prompt_ids) + list(response_ids)], device=next(self.lm.model.parameters()).device
        )
        with torch.no_grad(), self._lock:
            x = forward_residuals(self.lm.model, ids, torch.ones_like(ids), [self.layer])[self.layer]
            return self.scorer.token_scores(x[0, len(prompt_ids) :].float()).float().cpu()

    def credits(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Tensor:
        """``u(t)`` ``[n]``; the last response token is not scored, so its credit is 0."""
        n = len(response_ids)
        if n == 0:
            return torch.zeros(0)
        mask = torch.ones(1, n, dtype=torch.bool)
        mask[0, -1] = False
        u = mech_credit(
            self.cfg.form,
            self.mech(prompt_ids, response_ids)[None],
            mask,
            self.cfg.lam,
            self.baseline,
            self.cfg.clip,
            loss_mask=mask,
        )
        return u[0].where(mask[0], torch.zeros(()))
