"""verl adapter: per-token SAE rewards in verl's reward loop, and a GRPO estimator that keeps them.

Importing verl imports this module (saereward's ``verl.plugins`` entry point), which registers:

* the reward manager ``saereward`` (``reward.reward_manager.name=saereward``; or, by file,
  ``reward.reward_manager.source=importlib``, ``module.path=<this file>``, ``name=SAERewardManager``);
* the advantage estimator ``saereward_grpo`` (``algorithm.adv_estimator=saereward_grpo``).

Settings come from the ``reward.saereward`` table (``+reward.saereward.pack=/runs/x/pack.json``, see
:class:`saereward.integrations.token_credit.TokenCreditConfig`).

**Reward.** For each response verl hands over, the manager scores the outcome with verl's
``compute_score`` (the task's verifier, or ``custom_reward_function``) and the per-token credit ``u(t)``
of the fixed-scale reward form with one forward of the frozen base model
(:class:`~saereward.integrations.token_credit.TokenCredits`). verl has one token-reward channel,
``rm_scores [B, R]``; it carries both terms: ``u(t)`` on the response tokens before the last, the
outcome on the last valid token (whose own credit is 0: like the end token in saereward's trainer,
it is not scored; a response cut at the length limit thus loses its last token's credit).

**Advantage.** verl's built-in GRPO sums token rewards into one number per response, which would put
the mech term back inside the group-normalised reward (mechreward's length-biased form). The
``saereward_grpo`` estimator splits the channel again (:func:`saereward.rl.reward.split_last_token_rewards`)
and computes ``adv(t) = (o − mean_g o) / (std_g o + ε) + u(t)``: groups by verl's ``uid``, population
std, ``ε = 1e-4``, no std division with ``norm_adv_by_std_in_grpo=false``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est
from verl.utils.reward_score import default_compute_score

from saereward.integrations.token_credit import TokenCreditConfig, TokenCredits
from saereward.rl.reward import keyed_group_advantages, outcome_last_token_rewards, split_last_token_rewards

__all__ = ["ESTIMATOR", "MANAGER", "SAERewardManager", "saereward_grpo_advantage"]

MANAGER = "saereward"
ESTIMATOR = "saereward_grpo"


def _settings(config: Any) -> TokenCreditConfig:
    table = config.reward.get("saereward") if "reward" in config else None
    if isinstance(table, DictConfig):
        table = OmegaConf.to_container(table, resolve=True)
    return TokenCreditConfig.from_mapping(table)  # type: ignore[arg-type]


class SAERewardManager(RewardManagerBase):
    """Outcome + per-token SAE credit of each response (see the module docstring)."""

    _credits: TokenCredits | None = None  # one model per process, shared by the instances

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any = None, **_: Any) -> None:
        super().__init__(config, tokenizer, compute_score)
        self.compute_score = compute_score or default_compute_score
        self.settings = _settings(config)
        if SAERewardManager._credits is None or SAERewardManager._credits.cfg != self.settings:
            SAERewardManager._credits = TokenCredits.load(self.settings)
        self.credits = SAERewardManager._credits

    async def _outcome(self, item: Any, response: str) -> float:
        kw = {
            "data_source": item.non_tensor_batch["data_source"],
            "solution_str": response,
            "ground_truth": item.non_tensor_batch["reward_model"]["ground_truth"],
            "extra_info": item.non_tensor_batch.get("extra_info", {}),
        }
        if inspect.iscoroutinefunction(self.compute_score):
            result = await self.compute_score(**kw)
        else:
            result = await self.loop.run_in_executor(None, lambda: self.compute_score(**kw))
        return float(result["score"] if isinstance(result, dict) else result)

    async def run_single(self, data: DataProto) -> dict[str, Any]:
        item = data[-1:][0]
        responses = item.batch["responses"]
        mask = item.batch["attention_mask"].bool()
        n_resp = responses.shape[-1]
        prompt_ids = item.batch["prompts"][mask[:-n_resp]].tolist()
        response_ids = responses[: int(mask[-n_resp:].sum())].tolist()
        text = await self.loop.run_in_executor(
            None, lambda: self.tokenizer.decode(response_ids, skip_special_tokens=True)
        )
        outcome = await self._outcome(item, text)
        u = await self.loop.run_in_executor(None, lambda: self.credits.credits(prompt_ids, response_ids))
        info = {"acc": outcome, "mech_credit": float(u.sum())}
        return {"reward_score": {"outcome": outcome, "credits": u.tolist()}, "reward_extra_info": info}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: list[Any]) -> torch.Tensor:
        responses = data.batch["responses"]
        n_prompt = data.batch["prompts"].size(1)
        lengths = data.batch["attention_mask"][:, n_prompt:].sum(dim=1)
        credits = torch.zeros(responses.shape, dtype=torch.float32)
        for b, s in enumerate(scores):
            u = torch.tensor(s["credits"], dtype=torch.float32)
            credits[b, : len(u)] = u
        outcome = torch.tensor([float(s["outcome"]) for s in scores])
        return outcome_last_token_rewards(outcome, credits, lengths.cpu()).to(responses.device)


def saereward_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantages ``A_b + u(t)`` (see the module docstring); ``(advantages, returns)``."""
    outcome, credits = split_last_token_rewards(token_level_rewards, response_mask)
    scale = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    groups = list(index) if index is not None else list(range(len(outcome)))
    adv = keyed_group_advantages(outcome, groups, scale=scale)
    out = (adv[:, None] + credits) * response_mask.float()
    return out, out


# Registered once per process: the entry point imports this module, and ``source=importlib`` loads the
# file again under another name (that copy's classes then serve its own config only).
if MANAGER not in REWARD_MANAGER:
    register(MANAGER)(SAERewardManager)
if ESTIMATOR not in ADV_ESTIMATOR_REGISTRY:
    register_adv_est(ESTIMATOR)(saereward_grpo_advantage)
