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
    from saereward.model.lm import load_model
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


def _base_baseline(lm: Any, scorer: Any, prompts: list[str], layer: int = 15) -> Any:
    """The reward baseline of the base model (before TRL wraps it): the pack's per-token score on its own
    sampled completions of the training prompts, read at ``layer`` during generation, end tokens left out."""
    from saereward.features.baseline import fit_baseline
    from saereward.model.generate import SamplingConfig, end_positions, generate_batch

    sampling = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0)
    g = generate_batch(lm, prompts * 2, sampling, capture_layers=[layer], seed=0)
    P, tok = g.prompt_len, lm.tokenizer
    mask = g.residual_mask[:, P:]
    ends = end_positions(g.sequences[:, P:], mask, tok, (), set(tok.all_special_ids))
    with torch.no_grad():
        mech = scorer.token_scores(g.residuals[layer][:, P:].float())
    scores = [mech[i][mask[i] & ~ends[i]] for i in range(len(mech))]
    return fit_baseline(
        scores, min_count=4, meta={"layer": layer, "prompt_format": "raw", "task": "chain_sum"}
    )


def _last_special(ids: torch.Tensor, mask: torch.Tensor, special: set[int]) -> torch.Tensor:
    """``[B, T]`` True on each row's last completion token where it is a special (end) token."""
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        pos = torch.nonzero(mask[b]).flatten()
        if len(pos) and int(ids[b, pos[-1]]) in special:
            out[b, pos[-1]] = True
    return out


def test_sae_grpo_trainer_two_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default reward form: the advantage that reaches TRL's loss is TRL's own ``(B,)`` outcome
    advantage plus the position-centred mech credit on the completion tokens, end token unscored."""
    import trl

    from saereward.errors import SaeRewardError
    from saereward.features.scoring import PackScorer
    from saereward.rl.reward import masked_zscore, mech_credit
    from saereward.rl.trl import SAEGRPOTrainer
    from tiny_models import random_sae

    lm, pack, common = _setup(
        tmp_path, 8, max_completion_length=8, max_steps=2, beta=0.05, learning_rate=1e-3
    )
    sae = random_sae(d_in=576, d_sae=512, k=16, layer=15)
    baseline = _base_baseline(lm, PackScorer(sae, pack), list(common["train_dataset"]["prompt"]))
    assert baseline.sd > 0 and baseline.n_completions == 16
    # bad input is refused before TRL builds anything (the model is not wrapped yet)
    narrow = PackScorer(random_sae(d_in=64, d_sae=512, k=16, layer=15), pack)
    with pytest.raises(SaeRewardError, match="d_in 64 does not match model width 576"):
        SAEGRPOTrainer(model=lm.model, scorer=narrow, baseline=baseline, **common)
    with pytest.raises(SaeRewardError, match="discovered at layer 15, the reward reads layer 3"):
        SAEGRPOTrainer(model=lm.model, scorer=PackScorer(sae, pack), layer=3, baseline=baseline, **common)
    # the fixed-scale forms need a baseline; the form must be one of REWARD_FORMS
    with pytest.raises(SaeRewardError, match="reward_form 'position' needs baseline="):
        SAEGRPOTrainer(model=lm.model, scorer=PackScorer(sae, pack), reward_form="position", **common)
    with pytest.raises(SaeRewardError, match="reward_form 'shaped' needs baseline="):
        SAEGRPOTrainer(model=lm.model, scorer=PackScorer(sae, pack), reward_form="shaped", **common)
    with pytest.raises(SaeRewardError, match="unknown reward form 'mean'"):
        SAEGRPOTrainer(model=lm.model, scorer=PackScorer(sae, pack), reward_form="mean", **common)
    assert not hasattr(lm.model, "peft_config")

    # TRL's own outputs (before the subclass adds the mech credit) and the per-token scores
    generated: list[dict[str, torch.Tensor]] = []
    parent = trl.GRPOTrainer._generate_and_score_completions

    def record(self: Any, inputs: Any) -> dict[str, Any]:
        out = parent(self, inputs)
        keys = ("advantages", "prompt_ids", "completion_ids", "completion_mask")
        generated.append({k: out[k].detach().clone() for k in keys})
        return out

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", record)
    lam = 0.5
    trainer = SAEGRPOTrainer(
        model=lm.model, scorer=PackScorer(sae, pack), layer=15, lam=lam, baseline=baseline, **common
    )
    assert trainer.sae_form == "position" and trainer.sae_clip == 3.0
    scores: list[torch.Tensor] = []
    token_scores = trainer.sae_scorer.token_scores

    def score_spy(x: torch.Tensor) -> torch.Tensor:
        out = token_scores(x)
        scores.append(out.detach().clone())
        return out

    trainer.sae_scorer.token_scores = score_spy  # type: ignore[method-assign]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    seen: list[dict[str, torch.Tensor]] = []
    loss_gap: list[float] = []
    orig = trainer._compute_loss

    def spy(model: Any, inputs: dict[str, Any]) -> Any:
        adv = inputs["advantages"]
        seen.append({k: inputs[k].detach().clone() for k in ("advantages", "prompt_ids", "completion_ids")})
        loss = orig(model, inputs)
        with torch.no_grad():  # the same batch with each row's advantage flattened to its first token's
            flat = orig(model, {**inputs, "advantages": adv[:, :1].expand_as(adv).contiguous()})
        loss_gap.append(float((loss.detach() - flat).abs()))
        return loss

    trainer._compute_loss = spy  # type: ignore[method-assign]
    extra: list[int] = []
    trainer._extra_forward = lambda out: extra.append(1)  # type: ignore[method-assign,assignment,return-value]
    trainer.train()
    assert len(seen) == len(generated) == len(scores) == 2 and all(s["advantages"].dim() == 2 for s in seen)
    special = set(lm.tokenizer.all_special_ids)
    for got, gen, score in zip(seen, generated, scores, strict=True):
        mask = gen["completion_mask"].bool()
        mech = score.where(mask, torch.zeros(()))
        scored = mask & ~_last_special(gen["completion_ids"], mask, special)
        u = mech_credit("position", mech, scored, lam, baseline, 3.0, loss_mask=mask)
        want = (gen["advantages"][:, None].expand_as(mask).float() + u).where(mask, torch.zeros(()))
        assert (u[mask & ~scored] == 0).all() and u[scored].abs().sum() > 0
        # TRL shuffles the generated batch before the loss: match rows by their tokens
        for i in range(len(got["advantages"])):
            rows = [
                j
                for j in range(len(want))
                if torch.equal(got["prompt_ids"][i], gen["prompt_ids"][j])
                and torch.equal(got["completion_ids"][i], gen["completion_ids"][j])
            ]
            assert rows and any(torch.equal(got["advantages"][i], want[j]) for j in rows), i
    # per-token: within a completion the advantage varies along the tokens
    assert any((s["advantages"][:, 1:] - s["advantages"][:, :-1]).abs().sum() > 0 for s in seen)
    assert max(loss_gap) > 1e-6  # the per-token part of the advantage reaches the loss
    assert not extra  # hidden states came from TRL's own reference forward
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, after[n].detach()) for n, p in before.items())
    assert any("sae/mech_mean" in h for h in trainer.state.log_history)
    # mechreward's form (the ``token`` aggregation): λ·z(mech) over every completion token, end token too
    gen = generated[-1]
    mask = gen["completion_mask"].bool()
    mech = scores[-1].where(mask, torch.zeros(()))
    trainer.sae_form = "mechreward"
    old = trainer._token_advantages(gen, gen["advantages"], mech, mask)
    want = (gen["advantages"][:, None] + lam * masked_zscore(mech, mask)).where(mask, torch.zeros(()))
    torch.testing.assert_close(old, want)


def test_sae_grpo_trainer_beta_zero_reads_the_base_model(tmp_path: Path) -> None:
    """β = 0: TRL runs no reference forward, so the subclass runs one no-grad forward of the base model
    (adapters disabled) and the per-token advantage still reaches the loss."""
    from saereward.features.scoring import PackScorer
    from saereward.rl.trl import SAEGRPOTrainer
    from tiny_models import random_sae

    lm, pack, common = _setup(tmp_path, 4, max_completion_length=6, max_steps=1, beta=0.0)
    scorer = PackScorer(random_sae(d_in=576, d_sae=512, k=16, layer=15), pack)
    baseline = _base_baseline(lm, scorer, list(common["train_dataset"]["prompt"]))
    trainer = SAEGRPOTrainer(model=lm.model, scorer=scorer, lam=0.5, baseline=baseline, **common)
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


def _length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [float(len(str(c))) for c in completions]


def _lora(trainer: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_lambda_zero_is_bitwise_trls_own_trainer(tmp_path: Path, loss_type: str) -> None:
    """With λ = 0 the subclass changes nothing: the same LoRA weights and logged loss as
    ``trl.GRPOTrainer``, bit for bit, for each loss type."""
    import trl

    from saereward.features.scoring import PackScorer
    from saereward.rl.trl import SAEGRPOTrainer
    from tiny_models import random_sae

    kw = {
        "max_completion_length": 6,
        "max_steps": 1,
        "beta": 0.05,
        "learning_rate": 1e-2,
        "loss_type": loss_type,
    }
    lm, pack, common = _setup(tmp_path / "ours", 4, **kw)
    common["reward_funcs"] = _length_reward  # varies within a group, so the outcome advantage is not 0
    scorer = PackScorer(random_sae(d_in=576, d_sae=512, k=16, layer=15), pack)
    baseline = _base_baseline(lm, scorer, list(common["train_dataset"]["prompt"]))
    torch.manual_seed(0)
    ours = SAEGRPOTrainer(model=lm.model, scorer=scorer, lam=0.0, baseline=baseline, **common)
    ours.train()
    lm2, _, common2 = _setup(tmp_path / "trl", 4, **kw)
    common2["reward_funcs"] = _length_reward
    torch.manual_seed(0)
    theirs = trl.GRPOTrainer(model=lm2.model, **common2)
    theirs.train()
    a, b = _lora(ours), _lora(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
    loss = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert loss == [h["loss"] for h in theirs.state.log_history if "loss" in h]


def test_the_credit_reads_the_frozen_base_at_exactly_the_completion_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scores behind the advantage equal the pack's scores of the base model (adapter off),
    recomputed independently over prompt + completion, at the completion positions: a reward read
    one token early or late, or from the policy, fails this."""
    import trl

    from saereward.features.scoring import PackScorer
    from saereward.model.capture import forward_residuals
    from saereward.rl.trl import SAEGRPOTrainer
    from tiny_models import random_sae

    lm, pack, common = _setup(
        tmp_path, 4, max_completion_length=6, max_steps=1, beta=0.05, learning_rate=1e-2
    )
    scorer = PackScorer(random_sae(d_in=576, d_sae=512, k=16, layer=15), pack)
    generated: list[dict[str, torch.Tensor]] = []
    parent = trl.GRPOTrainer._generate_and_score_completions

    def record(self: Any, inputs: Any) -> dict[str, Any]:
        out = parent(self, inputs)
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        generated.append({k: out[k].detach().clone() for k in keys})
        return out

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", record)
    trainer = SAEGRPOTrainer(model=lm.model, scorer=scorer, lam=0.5, reward_form="mechreward", **common)
    scores: list[torch.Tensor] = []
    token_scores = trainer.sae_scorer.token_scores

    def score_spy(x: torch.Tensor) -> torch.Tensor:
        scores.append(token_scores(x).detach().clone())
        return scores[-1]

    trainer.sae_scorer.token_scores = score_spy  # type: ignore[method-assign]
    trainer.train()
    (gen,) = generated
    ids = torch.cat([gen["prompt_ids"], gen["completion_ids"]], dim=1)
    mask = torch.cat([gen["prompt_mask"], gen["completion_mask"]], dim=1)
    T = gen["completion_ids"].shape[1]
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad(), model.disable_adapter():
        want = token_scores(forward_residuals(model, ids, mask, [15])[15][:, -T:].float())
        early = token_scores(forward_residuals(model, ids, mask, [15])[15][:, -T - 1 : -1].float())
    m = gen["completion_mask"].bool()
    torch.testing.assert_close(scores[0][m], want[m], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0][m], early[m], atol=1e-5)  # read one token early: caught
    with torch.no_grad():  # the policy (adapter on, after a step) reads differently from the base
        policy = token_scores(forward_residuals(model, ids, mask, [15])[15][:, -T:].float())
    assert not torch.allclose(scores[0][m], policy[m], atol=1e-5)


def test_setups_where_the_policy_would_score_itself_are_refused(tmp_path: Path) -> None:
    import copy

    from saereward.errors import SaeRewardError
    from saereward.features.scoring import PackScorer
    from saereward.rl.trl import SAEGRPOTrainer
    from tiny_models import random_sae

    lm, pack, common = _setup(tmp_path, 4, max_completion_length=6, max_steps=1, beta=0.0)
    scorer = PackScorer(random_sae(d_in=576, d_sae=512, k=16, layer=15), pack)
    no_peft = {k: v for k, v in common.items() if k != "peft_config"}
    with pytest.raises(SaeRewardError, match="beta=0 without a PEFT adapter"):
        SAEGRPOTrainer(model=lm.model, scorer=scorer, reward_form="mechreward", **no_peft)
    args = copy.copy(common["args"])
    args.beta, args.sync_ref_model = 0.05, True
    synced = {**common, "args": args}
    with pytest.raises(SaeRewardError, match="sync_ref_model=True"):
        SAEGRPOTrainer(model=lm.model, scorer=scorer, reward_form="mechreward", **synced)


@pytest.mark.parametrize("form", ["position", "decoupled", "shaped", "mechreward"])
def test_each_reward_form_adds_its_credit_and_unscorable_rows_get_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """Per reward form: the trainer's advantage is TRL's outcome advantage plus exactly the form's credit
    on the spied base-model scores (end tokens left out of the fixed-scale forms' score); completions
    of a question whose reward function returns None (TRL: unscorable, advantage 0) get no credit."""
    import trl

    from saereward.features.scoring import PackScorer
    from saereward.model.generate import end_positions, stop_strings_for
    from saereward.rl.reward import masked_zscore, mech_credit
    from saereward.rl.trl import SAEGRPOTrainer
    from tiny_models import random_sae

    lm, pack, common = _setup(
        tmp_path,
        4,
        max_completion_length=6,
        max_steps=1,
        beta=0.05,
        learning_rate=1e-2,
        per_device_train_batch_size=8,  # two questions × 4 completions in one generation batch
    )
    outcome = common["reward_funcs"]
    skip: list[Any] = []

    def partly_unscorable(prompts: list[Any], completions: list[Any], **kw: Any) -> list[float | None]:
        """The verifier's reward, except None for every completion of the batch's first question."""
        scores = outcome(prompts, completions, **kw)
        skip.append(skip[0] if skip else kw["qid"][0])
        return [None if q == skip[0] else r for q, r in zip(kw["qid"], scores, strict=True)]

    common["reward_funcs"] = partly_unscorable
    scorer = PackScorer(random_sae(d_in=576, d_sae=512, k=16, layer=15), pack)
    baseline = (
        None if form == "mechreward" else _base_baseline(lm, scorer, list(common["train_dataset"]["prompt"]))
    )
    seen: dict[str, Any] = {}
    parent = trl.GRPOTrainer._generate_and_score_completions

    def record(self: Any, inputs: Any) -> dict[str, Any]:
        out = parent(self, inputs)
        seen.setdefault("trl_adv", out["advantages"].detach().clone())
        seen.setdefault("ids", out["completion_ids"].detach().clone())
        seen.setdefault("mask", out["completion_mask"].bool().clone())
        seen.setdefault("qids", [x["qid"] for x in inputs])
        return out

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", record)
    trainer = SAEGRPOTrainer(
        model=lm.model, scorer=scorer, lam=0.5, reward_form=form, baseline=baseline, **common
    )
    token_scores = trainer.sae_scorer.token_scores
    trainer.sae_scorer.token_scores = lambda x: seen.setdefault("mech", token_scores(x))  # type: ignore[method-assign]
    ours = trainer._generate_and_score_completions

    def ours_spy(inputs: Any) -> dict[str, Any]:
        out = ours(inputs)
        seen.setdefault("adv", out["advantages"].detach().clone())
        return out

    trainer._generate_and_score_completions = ours_spy  # type: ignore[method-assign]
    trainer.train()
    dead = torch.tensor([q == skip[0] for q in seen["qids"]])
    assert dead.any() and not dead.all()
    mask = seen["mask"] & ~dead[:, None]
    mech = seen["mech"].where(mask, torch.zeros(()))
    if form == "mechreward":
        credit = 0.5 * masked_zscore(mech, mask)
    else:
        tok = lm.tokenizer
        stops = stop_strings_for("raw")  # the baseline's prompt format, as the trainer reads it
        ends = end_positions(seen["ids"], mask, tok, stops, set(tok.all_special_ids))
        credit = mech_credit(form, mech, mask & ~ends, 0.5, baseline, 3.0, loss_mask=mask)
    want = (seen["trl_adv"][:, None] + credit).where(mask, torch.zeros(()))
    torch.testing.assert_close(seen["adv"], want, atol=1e-5, rtol=1e-5)
    assert not seen["adv"][dead].any()  # unscorable: TRL's 0, and no credit
    assert credit[mask].abs().sum() > 0
