"""TRL integration: ``SAEGRPOTrainer``, a ``trl.GRPOTrainer`` that adds a per-token SAE advantage.

TRL computes one scalar reward per completion and a ``(B,)`` advantage; its loss also accepts a
``(B, T)`` advantage from subclasses (it unsqueezes only 1-D advantages). This subclass keeps TRL's
group-normalized outcome advantage ``A_b`` and adds a per-token mech credit on completion tokens,
``mech(t) = Σ_i w_i a_i(t)`` from :class:`~saereward.features.scoring.PackScorer` (the same true-TopK
statistic G1 validated), in one of the reward forms of :mod:`saereward.rl.reward`:

    reward_form="position" (default):  adv_bt = A_b + λ · clip((mech_bt − μ_ref(t)) / σ_ref)
    reward_form="decoupled" / "shaped": see saereward.rl.reward
    reward_form="mechreward":          adv_bt = A_b + λ · z(mech)_bt   (the ``token`` aggregation)

The fixed-scale forms need ``baseline``, a :class:`~saereward.rl.reward.RewardBaseline` measured on
base rollouts in the training prompt format (``saereward discover`` writes one beside the pack;
:func:`saereward.features.baseline.load_baseline` reads it); they leave the end token out of the score.

**No extra forward pass.** With ``beta > 0`` TRL already runs the reference model over
prompt + completion to get reference log-probs; a hook on the pack's layer records the hidden states
of that forward (the frozen base model: the policy cannot steer its own reward). With ``beta = 0``
there is no reference forward, and the trainer runs one no-grad forward of the base model itself
(logged once as a warning). The policy must never score itself: ``sync_ref_model=True`` (which copies
the policy into the reference) and β = 0 without a PEFT adapter (no frozen base to switch back to)
are refused. A completion that TRL marks unscorable (every reward function returned ``None``) gets
TRL's advantage 0 and no mech credit, and stays out of the mechreward form's z-score.

    trainer = SAEGRPOTrainer(model=..., reward_funcs=OutcomeReward(task), args=GRPOConfig(beta=0.05, ...),
                             train_dataset=ds, peft_config=LoraConfig(...), scorer=PackScorer(sae, pack),
                             layer=pack.layer, lam=0.1)
"""

from __future__ import annotations

import logging
from typing import Any

import torch

try:
    from trl import GRPOTrainer
except ImportError as exc:  # an optional extra: the own trainer (train-rl) needs no TRL
    raise ImportError("saereward.rl.trl needs TRL: pip install 'saereward[trl]'") from exc

from saereward.errors import SaeRewardError
from saereward.features.baseline import RewardBaseline
from saereward.model.capture import ResidualCapture, forward_residuals
from saereward.model.generate import end_positions, stop_strings_for
from saereward.rl.reward import REWARD_FORMS, check_pack_scorer, masked_zscore, mech_credit

log = logging.getLogger(__name__)


def _adapters_disabled(model: Any) -> bool:
    for m in model.modules():
        flag = getattr(m, "disable_adapters", None)
        if isinstance(flag, bool) and hasattr(m, "lora_A"):
            return flag
    return False


def _check_frozen_source(args: Any, peft_config: Any, model: Any) -> None:
    """The reward must read a model the policy cannot move. Refuse the setups where it would not:
    ``sync_ref_model`` (TRL copies the policy into the reference it reads), and β = 0 without a PEFT
    adapter (no reference model, and no adapter to switch off: the policy would score itself)."""
    if args is not None and getattr(args, "sync_ref_model", False):
        raise SaeRewardError(
            "sync_ref_model=True moves the reference model the SAE reward reads: the policy would shape "
            "its own reward; set sync_ref_model=False"
        )
    has_adapter = peft_config is not None or hasattr(model, "peft_config")
    if args is not None and getattr(args, "beta", 0.0) == 0.0 and not has_adapter:
        raise SaeRewardError(
            "beta=0 without a PEFT adapter leaves no frozen base model to read the SAE reward from: "
            "pass peft_config=, or beta > 0 (TRL then keeps a reference model)"
        )


class SAEGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` + per-token SAE advantage; see the module docstring."""

    def __init__(
        self,
        *args: Any,
        scorer: Any,
        layer: int | None = None,
        lam: float = 0.1,
        reward_form: str = "position",
        baseline: RewardBaseline | None = None,
        clip: float = 3.0,
        **kwargs: Any,
    ) -> None:
        """``scorer``: a :class:`~saereward.features.scoring.PackScorer`; ``layer``: the decoder layer
        it reads (default: the pack's). The pack and SAE are checked against the model (layer, SAE
        width) before TRL builds anything when ``model`` is a module, else right after.
        ``reward_form``/``baseline``/``clip``: see the module docstring."""
        if reward_form not in REWARD_FORMS:
            raise SaeRewardError(
                f"unknown reward form {reward_form!r}: choose from {', '.join(REWARD_FORMS)}"
            )
        if reward_form != "mechreward" and baseline is None:
            raise SaeRewardError(
                f"reward_form {reward_form!r} needs baseline= (a RewardBaseline: load_baseline('<pack>.baseline.json')), "
                "or use reward_form='mechreward'"
            )
        self.sae_form, self.sae_baseline, self.sae_clip = reward_form, baseline, float(clip)
        model = kwargs.get("model", args[0] if args else None)
        _check_frozen_source(kwargs.get("args"), kwargs.get("peft_config"), model)
        checked = isinstance(model, torch.nn.Module)
        if checked:
            layer = check_pack_scorer(scorer, model, layer)
        super().__init__(*args, **kwargs)
        if not checked:
            layer = check_pack_scorer(scorer, self.accelerator.unwrap_model(self.model), layer)
        # the SAE reads hidden states where TRL computes them (the accelerator's device)
        self.sae_scorer = scorer.to(self.accelerator.device) if hasattr(scorer, "to") else scorer
        self.sae_layer = int(layer)  # type: ignore[arg-type]
        self.sae_lam = float(lam)
        self._sae_hidden: torch.Tensor | None = None
        self._sae_collecting = False
        self._warned_extra_forward = False
        self._sae_unscorable: torch.Tensor | None = None

    def _calculate_rewards(
        self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any
    ) -> Any:
        """TRL's rewards (gathered over processes); remembers which completions no reward function scored."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._sae_unscorable = torch.isnan(rewards).all(dim=1)
        return rewards

    def _local_unscorable(self, n: int, device: Any) -> torch.Tensor:
        """``[n]`` this process's rows that TRL marked unscorable (its advantage 0): they get no credit."""
        flags = self._sae_unscorable
        self._sae_unscorable = None
        if flags is None:
            return torch.zeros(n, dtype=torch.bool, device=device)
        start = self.accelerator.process_index * n  # TRL's own slice of the gathered rewards
        return flags[start : start + n].to(device)

    # The reference forward: record the residuals at the pack's layer while TRL computes ref log-probs.
    def _get_per_token_logps_and_entropies(
        self, model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int, *args: Any, **kwargs: Any
    ) -> Any:
        is_ref = model is self.ref_model or _adapters_disabled(self.accelerator.unwrap_model(model))
        if not (self._sae_collecting and is_ref and not torch.is_grad_enabled()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        with ResidualCapture(self.accelerator.unwrap_model(model), [self.sae_layer]) as cap:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        # TRL splits the batch into chunks of rows: one recorded tensor per chunk
        hidden = torch.cat(cap.chunks(self.sae_layer), dim=0)
        self._sae_hidden = hidden[:, -logits_to_keep:]
        return out

    def _extra_forward(self, output: dict[str, Any]) -> torch.Tensor:
        if not self._warned_extra_forward:
            log.warning(
                "beta = 0: no reference forward to read hidden states from; running one extra forward"
            )
            self._warned_extra_forward = True

        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        model = self.accelerator.unwrap_model(self.model)
        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else torch.no_grad()
        with torch.no_grad(), ctx:
            res = forward_residuals(model, ids, mask, [self.sae_layer])[self.sae_layer]
        return res[:, -output["completion_ids"].shape[1] :]

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        self._sae_hidden = None
        self._sae_collecting = True
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._sae_collecting = False
        hidden = self._sae_hidden if self._sae_hidden is not None else self._extra_forward(output)
        self._sae_hidden = None
        mask = output["completion_mask"].bool()
        mask = mask & ~self._local_unscorable(mask.shape[0], mask.device)[:, None]
        mech = self.sae_scorer.token_scores(hidden.float()).to(mask.device)
        mech = mech.where(mask, torch.zeros((), device=mask.device))
        adv = output["advantages"]
        output["advantages"] = self._token_advantages(output, adv, mech, mask)
        mode = "train" if getattr(self.model, "training", True) else "eval"
        denom = mask.sum().clamp_min(1)
        self._metrics[mode]["sae/mech_mean"].append(float(mech.sum() / denom))
        return output

    def _token_advantages(
        self, output: dict[str, Any], adv: torch.Tensor, mech: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """TRL's ``(B,)`` outcome advantage plus the form's per-token mech credit, ``(B, T)``."""
        zero = torch.zeros((), device=mask.device)
        adv2d = adv.unsqueeze(1).expand_as(mask).float()
        if self.sae_form == "mechreward":
            return (adv2d + self.sae_lam * masked_zscore(mech, mask)).where(mask, zero)

        proc: Any = self.processing_class
        tok: Any = getattr(proc, "tokenizer", proc)  # a processor wraps its tokenizer

        fmt = (self.sae_baseline.meta if self.sae_baseline is not None else {}).get("prompt_format")
        stops = stop_strings_for(fmt) if fmt else ()  # as the baseline was measured
        ends = end_positions(output["completion_ids"].cpu(), mask.cpu(), tok, stops, set(tok.all_special_ids))
        scored = mask & ~ends.to(mask.device)
        u = mech_credit(
            self.sae_form, mech, scored, self.sae_lam, self.sae_baseline, self.sae_clip, loss_mask=mask
        )
        return (adv2d + u).where(mask, zero)
