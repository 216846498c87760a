"""SAEGRPOTrainer (a trl.GRPOTrainer subclass) on the embedded SmolLM2 for 2 steps on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow


def _setup(tmp_path: Path, n: int, **args: Any) -> tuple[Any, Any, dict[str, Any]]:
    """A private SmolLM2 (the trainer wraps it with LoRA), a pack at layer 15 and the TRL keyword
    arguments shared by the tests: chain_sum, 4 prompts × 4 generations, LoRA r 4 on q/v, fp32, CPU."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

    from saereward.features.pack import Feature, FeaturePack
    from saereward.lm import load_model
    from saereward.rl.reward import OutcomeReward
    from saereward.tasks import format_prompt, load_task

    lm = load_model()
    task = load_task("chain_sum", n=n, seed=0)
    ds = Dataset.from_list([{"prompt": format_prompt(task, it, "raw"), "qid": it.id} for it in task.items()])
    pack = FeaturePack(
        "t", [Feature(i, 1.0) for i in range(0, 64)], [Feature(i, -1.0) for i in range(64, 128)], layer=15
    )
    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "bf16": False,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
    }
    common = {
        "reward_funcs": OutcomeReward(task),
        "args": GRPOConfig(**{**base, **args}),
        "train_dataset": ds,
        "processing_class": lm.tokenizer,
        "peft_config": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
    }
    return lm, pack, common


def test_sae_grpo_trainer_two_steps(tmp_path: Path) -> None:
    from saereward.errors import SaeRewardError
    from saereward.features.scoring import PackScorer
    from saereward.rl.trl import SAEGRPOTrainer
    from tiny_models import random_sae

    lm, pack, common = _setup(
        tmp_path, 8, max_completion_length=8, max_steps=2, beta=0.05, learning_rate=1e-3
    )
    sae = random_sae(d_in=576, d_sae=512, k=16, layer=15)
    # bad input is refused before TRL builds anything (the model is not wrapped yet)
    narrow = PackScorer(random_sae(d_in=64, d_sae=512, k=16, layer=15), pack)
    with pytest.raises(SaeRewardError, match="d_in 64 does not match model width 576"):
        SAEGRPOTrainer(model=lm.model, scorer=narrow, **common)
    with pytest.raises(SaeRewardError, match="discovered at layer 15, the reward reads layer 3"):
        SAEGRPOTrainer(model=lm.model, scorer=PackScorer(sae, pack), layer=3, **common)
    assert not hasattr(lm.model, "peft_config")
    trainer = SAEGRPOTrainer(model=lm.model, scorer=PackScorer(sae, pack), layer=15, lam=0.5, **common)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    seen: list[torch.Tensor] = []
    loss_gap: list[float] = []
    orig = trainer._compute_loss

    def spy(model: Any, inputs: dict[str, Any]) -> Any:
        adv = inputs["advantages"]
        seen.append(adv.detach().clone())
        loss = orig(model, inputs)
        with torch.no_grad():  # the same batch with each row's advantage flattened to its first token's
            flat = orig(model, {**inputs, "advantages": adv[:, :1].expand_as(adv).contiguous()})
        loss_gap.append(float((loss.detach() - flat).abs()))
        return loss

    trainer._compute_loss = spy  # type: ignore[method-assign]
    extra: list[int] = []
    trainer._extra_forward = lambda out: extra.append(1)  # type: ignore[method-assign,assignment,return-value]
    trainer.train()
    assert seen and all(a.dim() == 2 for a in seen)
    # per-token: within a completion the advantage varies along the tokens
    assert any((a[:, 1:] - a[:, :-1]).abs().sum() > 0 for a in seen)
    assert max(loss_gap) > 1e-6  # the per-token part of the advantage reaches the loss
    assert not extra  # hidden states came from TRL's own reference forward
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, after[n].detach()) for n, p in before.items())
    assert any("sae/mech_mean" in h for h in trainer.state.log_history)


def test_sae_grpo_trainer_beta_zero_reads_the_base_model(tmp_path: Path) -> None:
    """β = 0: TRL runs no reference forward, so the subclass runs one no-grad forward of the base model
    (adapters disabled) and the per-token advantage still reaches the loss."""
    from saereward.features.scoring import PackScorer
    from saereward.rl.trl import SAEGRPOTrainer
    from tiny_models import random_sae

    lm, pack, common = _setup(tmp_path, 4, max_completion_length=6, max_steps=1, beta=0.0)
    trainer = SAEGRPOTrainer(
        model=lm.model,
        scorer=PackScorer(random_sae(d_in=576, d_sae=512, k=16, layer=15), pack),
        lam=0.5,
        **common,
    )
    assert trainer.sae_layer == 15  # the pack's layer
    seen: list[torch.Tensor] = []
    orig = trainer._compute_loss

    def spy(model: Any, inputs: dict[str, Any]) -> Any:
        seen.append(inputs["advantages"].detach().clone())
        return orig(model, inputs)

    trainer._compute_loss = spy  # type: ignore[method-assign]
    trainer.train()
    assert trainer._warned_extra_forward  # the extra forward ran
    assert seen and all(a.dim() == 2 for a in seen)
    assert any((a[:, 1:] - a[:, :-1]).abs().sum() > 0 for a in seen)
