"""The verl adapter through verl's own code path, on a tiny model (CPU).

verl's reward-manager loader (``source=importlib``) builds our manager from a verl config; it scores
a real ``DataProto`` with left-padded prompts and right-padded responses; verl's ``compute_advantage``
runs our registered estimator. The per-token credits are checked against an independent reading of
the residuals (``output_hidden_states``), which a one-token shift fails.

verl 0.9.1 pins transformers < 5.11, so this file runs in its own venv (``.venv-verl``, made by
``scripts/test.sh``, where ``SAEREWARD_REQUIRE_VERL=1`` turns a missing verl into a failure); the
main venv skips it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

if os.environ.get("SAEREWARD_REQUIRE_VERL"):
    import verl  # noqa: F401
else:
    pytest.importorskip("verl")

import numpy as np
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.reward import load_reward_manager, resolve_reward_manager_cls

import saereward.integrations.verl as adapter
from saereward.features.baseline import baseline_beside, fit_baseline, save_baseline
from saereward.features.pack import Feature, FeaturePack, save_pack
from saereward.features.scoring import PackScorer
from saereward.rl.reward import keyed_group_advantages, mech_credit
from saereward.sae.formats import save_sae
from tiny_models import D_MODEL, char_tokenizer, make_tiny, random_sae

LAYER = 1
PROMPTS = ["Q: 3+4?", "Q: 3+4?", "Q: 2*5?", "Q: 2*5?"]
ANSWERS = ["7", "7", "10", "10"]
RESPONSES = ["so #### 7</s>", "#### 8</s>", "#### 10", "it is #### 10</s>"]  # the third was cut short


def _run_folder(tmp: Path) -> dict[str, Path]:
    model, _ = make_tiny("llama")
    model.save_pretrained(tmp / "model")
    char_tokenizer().save_pretrained(tmp / "model")
    sae = random_sae(d_in=D_MODEL, d_sae=128, k=8, layer=LAYER, model=str(tmp / "model"))
    save_sae(sae, tmp / "sae")
    pack = FeaturePack(
        "t",
        [Feature(i, 1.0) for i in range(5)],
        [Feature(i, -1.0) for i in range(5, 10)],
        layer=LAYER,
        model_name=str(tmp / "model"),
        metadata={"d_model": D_MODEL, "d_sae": 128, "sae_path": str(tmp / "sae")},
    )
    pack_path = save_pack(pack, tmp / "pack.json")
    g = torch.Generator().manual_seed(0)
    save_baseline(
        fit_baseline([torch.randn(12, generator=g) * 0.5 + 0.1 for _ in range(30)], min_count=5),
        baseline_beside(pack_path),
    )
    return {"model": tmp / "model", "pack": pack_path, "sae": tmp / "sae"}


def _batch(tok: Any) -> DataProto:
    """Left-padded prompts and right-padded responses, as verl's rollout hands them over."""
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    r_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in RESPONSES]
    P, R = max(map(len, p_ids)) + 2, max(map(len, r_ids)) + 3
    pad = tok.pad_token_id
    prompts = torch.tensor([[pad] * (P - len(p)) + p for p in p_ids])
    responses = torch.tensor([r + [pad] * (R - len(r)) for r in r_ids])
    pm = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in p_ids])
    rm = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in r_ids])
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": torch.cat([pm, rm], 1),
        },
        non_tensors={
            "data_source": np.array(["openai/gsm8k"] * 4, dtype=object),
            "reward_model": np.array([{"ground_truth": a} for a in ANSWERS], dtype=object),
            "uid": np.array(["q0", "q0", "q1", "q1"], dtype=object),
        },
    )


def _independent_credits(paths: dict[str, Path], data: DataProto, b: int, shift: int = 0) -> torch.Tensor:
    """The credits from ``output_hidden_states`` of the unpadded sequence (no capture hooks)."""
    from transformers import AutoModelForCausalLM

    from saereward.features.baseline import load_baseline
    from saereward.features.pack import load_pack
    from saereward.sae.formats import load_sae

    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32).eval()
    mask = data.batch["attention_mask"][b].bool()
    ids = data.batch["input_ids"][b][mask][None]
    n_prompt = int(mask[: data.batch["prompts"].shape[1]].sum())
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
    scorer = PackScorer(load_sae(paths["sae"]), load_pack(paths["pack"]), d_model=D_MODEL)
    mech = scorer.token_scores(h[n_prompt + shift : ids.shape[1] + min(shift, 0)].float())
    n = mech.shape[0]
    m = torch.ones(1, n, dtype=torch.bool)
    m[0, -1] = False
    u = mech_credit(
        "position", mech[None], m, 0.5, load_baseline(baseline_beside(paths["pack"])), 3.0, loss_mask=m
    )
    return u[0]


def test_verl_loads_our_manager_and_runs_our_estimator(tmp_path: Path) -> None:
    paths = _run_folder(tmp_path)
    assert adapter.ESTIMATOR in ADV_ESTIMATOR_REGISTRY  # registered at `import verl` (entry point)
    config = OmegaConf.create(
        {
            "reward": {
                "reward_manager": {
                    "source": "importlib",
                    "name": "SAERewardManager",
                    "module": {"path": adapter.__file__, "name": "SAERewardManager"},
                },
                "custom_reward_function": {"path": None},
                "saereward": {"pack": str(paths["pack"]), "lam": 0.5, "form": "position"},
            }
        }
    )
    tok = char_tokenizer()
    manager = load_reward_manager(config, tok)
    assert type(manager).__name__ == "SAERewardManager"
    by_name = OmegaConf.create(
        {"reward": {"reward_manager": {"source": "register", "name": adapter.MANAGER}}}
    )
    assert resolve_reward_manager_cls(by_name) is adapter.SAERewardManager
    data = _batch(tok)
    outs = [manager.loop.run_until_complete(manager.run_single(data[i : i + 1])) for i in range(len(data))]
    outcome = torch.tensor([o["reward_score"]["outcome"] for o in outs])
    assert outcome.tolist() == [1.0, 0.0, 1.0, 1.0]  # verl's own GSM8K scorer on "#### N"
    rm = type(manager).assemble_rm_scores(data, [o["reward_score"] for o in outs])
    P = data.batch["prompts"].shape[1]
    resp_mask = data.batch["attention_mask"][:, P:]
    lengths = resp_mask.sum(1)
    for b in range(len(data)):
        n = int(lengths[b])
        want = _independent_credits(paths, data, b)
        assert torch.allclose(rm[b, : n - 1], want[: n - 1], atol=1e-5), f"row {b}: credits differ"
        assert rm[b, n - 1] == outcome[b] and not rm[b, n:].any()
        shifted = _independent_credits(paths, data, b, shift=1)
        assert not torch.allclose(rm[b, : n - 2], shifted[: n - 2], atol=1e-5)  # a one-token shift fails
    assert rm[:, :-1].abs().sum() > 0  # the credits are not all zero

    data.batch["token_level_rewards"] = rm
    data.batch["response_mask"] = resp_mask
    out = compute_advantage(data, adv_estimator=adapter.ESTIMATOR, config=AlgoConfig())
    adv = out.batch["advantages"]
    A = keyed_group_advantages(outcome, ["q0", "q0", "q1", "q1"])
    for b in range(len(data)):
        n = int(lengths[b])
        want = torch.zeros(adv.shape[1])
        want[:n] = A[b]
        want[: n - 1] += rm[b, : n - 1]
        assert torch.allclose(adv[b], want, atol=1e-6), f"row {b}: advantages differ"
    # in group q1 both answers are right: the outcome term is 0 and only the per-token credits remain
    assert torch.allclose(adv[2, : int(lengths[2]) - 1], rm[2, : int(lengths[2]) - 1], atol=1e-6)
    # verl's own GRPO would sum the credits into the group-normalised reward: a different advantage
    grpo = compute_advantage(data, adv_estimator="grpo", config=AlgoConfig()).batch["advantages"]
    assert not torch.allclose(grpo, adv, atol=1e-3)


def test_settings_errors_are_one_line(tmp_path: Path) -> None:
    from saereward.errors import SaeRewardError
    from saereward.integrations.token_credit import TokenCreditConfig

    with pytest.raises(SaeRewardError, match="pack is required"):
        TokenCreditConfig.from_mapping({})
    with pytest.raises(SaeRewardError, match="unknown config key 'reward.saereward.lamda'"):
        TokenCreditConfig.from_mapping({"pack": "p.json", "lamda": 1})
    with pytest.raises(SaeRewardError, match="reward.saereward.form='mechreward' is not allowed"):
        TokenCreditConfig.from_mapping({"pack": "p.json", "form": "mechreward"})
