"""SAEGRPOTrainer (a trl.GRPOTrainer subclass) on the embedded SmolLM2 for 2 steps on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow


def test_sae_grpo_trainer_two_steps(smollm: Any, tmp_path: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

    from saereward.features.pack import Feature, FeaturePack
    from saereward.features.scoring import PackScorer
    from saereward.lm import load_model
    from saereward.rl.reward import OutcomeReward
    from saereward.rl.trl import SAEGRPOTrainer
    from saereward.tasks import format_prompt, load_task
    from tiny_models import random_sae

    lm = load_model()  # a private copy: the trainer wraps it with LoRA
    task = load_task("chain_sum", n=8, seed=0)
    ds = Dataset.from_list([{"prompt": format_prompt(task, it, "raw"), "qid": it.id} for it in task.items()])
    sae = random_sae(d_in=576, d_sae=512, k=16, layer=15)
    pack = FeaturePack(
        "t", [Feature(i, 1.0) for i in range(0, 64)], [Feature(i, -1.0) for i in range(64, 128)], layer=15
    )
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        beta=0.05,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    trainer = SAEGRPOTrainer(
        model=lm.model,
        reward_funcs=OutcomeReward(task),
        args=args,
        train_dataset=ds,
        processing_class=lm.tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        scorer=PackScorer(sae, pack),
        layer=15,
        lam=0.5,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    seen: list[torch.Tensor] = []
    orig = trainer._compute_loss

    def spy(model: Any, inputs: dict[str, Any]) -> Any:
        seen.append(inputs["advantages"].detach().clone())
        return orig(model, inputs)

    trainer._compute_loss = spy  # type: ignore[method-assign]
    extra: list[int] = []
    trainer._extra_forward = lambda out: extra.append(1)  # type: ignore[method-assign,assignment,return-value]
    trainer.train()
    assert seen and all(a.dim() == 2 for a in seen)
    # per-token: within a completion the advantage varies along the tokens
    assert any((a[:, 1:] - a[:, :-1]).abs().sum() > 0 for a in seen)
    assert not extra  # hidden states came from TRL's own reference forward
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, after[n].detach()) for n, p in before.items())
    assert any("sae/mech_mean" in h for h in trainer.state.log_history)
