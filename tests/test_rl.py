"""GRPO rewards (pure functions) and the lean trainer on a tiny model: updates, rewards, resume after a kill."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from saereward.errors import SaeRewardError
from saereward.features.pack import Feature, FeaturePack, save_pack
from saereward.rl.collapse import monitor_rho
from saereward.rl.config import GRPOConfig
from saereward.rl.grpo import GRPOTrainer
from saereward.rl.loss import HeadWorkspace, head_log_softmax, kl_term, selective_log_softmax, surrogate_loss
from saereward.rl.reward import (
    DirectionScorer,
    LambdaSchedule,
    OutcomeReward,
    group_advantages,
    masked_zscore,
    token_advantages,
)
from saereward.sae.formats import save_sae
from tiny_models import D_MODEL, random_sae, tiny_lm

TESTS = Path(__file__).parent

# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def test_masked_zscore_ignores_pads() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 5.0, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]).bool()
    z = masked_zscore(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0])
    ref = (vals - vals.mean()) / (vals.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(z[mask], ref)
    assert (z[~mask] == 0).all()
    # mechreward's unmasked z-score differs (pads pull the mean toward 0)
    assert not torch.allclose(((x - x.mean()) / x.std())[mask], ref)


def test_group_advantages() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4)
    assert a[0] > 0 and a[1] < 0 and torch.allclose(a[4:], torch.zeros(4))
    torch.testing.assert_close(a.view(2, 4).sum(1), torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(SaeRewardError, match="group size 1 < 2"):
        group_advantages(r, 1)


def test_token_advantages_forms() -> None:
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mech = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 0.5], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 0, 0]]).bool()
    r0, t0 = token_advantages(outcome, None, mask, 2, 0.1)
    assert torch.equal(t0, outcome) and (r0[~mask] == 0).all()
    # mechreward's form (the function's default, passed explicitly here): its exact values
    mr = {"form": "mechreward"}
    both, total = token_advantages(outcome, mech, mask, 2, 0.1, "both", **mr)
    mean = (mech * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(total, outcome + 0.1 * mean)
    A = group_advantages(total, 2)
    torch.testing.assert_close(both, (A[:, None] + 0.1 * masked_zscore(mech, mask)) * mask)
    traj, _ = token_advantages(outcome, mech, mask, 2, 0.1, "trajectory", **mr)
    torch.testing.assert_close(traj, A[:, None].expand(4, 3) * mask)
    tok, total_t = token_advantages(outcome, mech, mask, 2, 0.1, "token", **mr)
    torch.testing.assert_close(total_t, outcome)
    # loss_mask: the final token gets A without a mech term
    lm = mask.clone()
    lm[3, 1] = True
    adv, _ = token_advantages(outcome, mech, mask, 2, 0.1, "both", loss_mask=lm, **mr)
    assert adv[3, 1] == A[3] and adv[3, 2] == 0


def test_lambda_schedule() -> None:
    assert LambdaSchedule("constant", 0.2).__call__(50) == 0.2
    lin = LambdaSchedule("linear", 0.2, 0.0, 10)
    assert lin(0) == 0.2 and lin(5) == pytest.approx(0.1) and lin(20) == 0.0


def test_direction_scorer_and_outcome_reward() -> None:
    d = DirectionScorer(torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(d.token_scores(torch.tensor([[1.0, 1.0]])), torch.tensor([1.4]))
    with pytest.raises(SaeRewardError, match="zero"):
        DirectionScorer(torch.zeros(2))
    from saereward.tasks import load_task

    task = load_task("chain_sum", n=3, seed=0)
    items = list(task.items())
    reward = OutcomeReward(task)
    out = reward(
        prompts=["p"] * 2, completions=[f"The answer is {items[0].gold}.", "no"], qid=[items[0].id] * 2
    )
    assert out == [1.0, 0.0]
    chat = reward(completions=[[{"role": "assistant", "content": items[1].gold}]], qid=[items[1].id])
    assert chat == [1.0]
    with pytest.raises(SaeRewardError, match="qid"):
        reward(completions=["x"])


def test_selective_log_softmax_and_kl() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    ids = torch.randint(0, 11, (3, 5))
    lp, ent = selective_log_softmax(logits, ids, chunk=2)
    ref = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, ref)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))
    lp2, ent2 = selective_log_softmax(logits, ids, chunk=2, entropy=False)  # reference log-probs
    assert torch.equal(lp2, lp) and not ent2.any()
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    torch.testing.assert_close(kl_term(a, b, "sq"), torch.tensor([0.25, 0.0]))
    k3 = kl_term(a, b, "k3")
    assert k3[1] == 0 and k3[0] > 0


def test_selective_log_softmax_checkpointed_gradient_and_temperature() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 13, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 13, (5, 4))
    w = torch.randn(5, 4)
    lp, ent = selective_log_softmax(logits, ids, chunk=2, temperature=0.7)
    (lp * w).sum().backward()
    g = logits.grad.clone()
    logits.grad = None
    f = logits.float() / 0.7
    ref = torch.log_softmax(f, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (ref * w).sum().backward()
    torch.testing.assert_close(lp, ref)
    torch.testing.assert_close(logits.grad, g)
    assert not ent.requires_grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_log_softmax_equals_the_logits_path(bias: bool, temperature: float) -> None:
    """Log-probs, entropies and the hidden states' gradient from the head's weight = from the logits."""
    torch.manual_seed(0)
    w, b = torch.randn(37, 8), (torch.randn(37) if bias else None)
    h = torch.randn(3, 5, 8, requires_grad=True)
    ids = torch.randint(0, 37, (3, 5))
    g = torch.randn(3, 5)
    lp, ent = head_log_softmax(h, w, b, ids, temperature, chunk=4)  # 15 rows: chunks of 4, 4, 4, 3
    (lp * g).sum().backward()
    grad = h.grad.clone()
    h.grad = None
    ref_lp, ref_ent = selective_log_softmax(torch.nn.functional.linear(h, w, b), ids, temperature=temperature)
    (ref_lp * g).sum().backward()
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(grad, h.grad)
    assert not ent.requires_grad
    with torch.no_grad():  # the reference pass: no gradient, no entropy
        lp2, ent2 = head_log_softmax(h, w, b, ids, temperature, entropy=False, chunk=100)
    torch.testing.assert_close(lp2, ref_lp.detach())
    assert not ent2.any()
    with pytest.raises(ValueError, match="fp32"):
        head_log_softmax(h.bfloat16(), w.bfloat16(), None, ids)


def test_head_workspace_buffers_are_reused_and_change_nothing() -> None:
    """One workspace across calls: the same buffers serve every call that fits (grown once when one
    does not), and the values equal those of calls with their own buffers, whatever the workspace held."""
    torch.manual_seed(0)
    w, h, ids = torch.randn(37, 8), torch.randn(3, 5, 8), torch.randint(0, 37, (3, 5))
    ws = HeadWorkspace()
    first = ws.buffers(h, 37 * 4)
    assert ws.buffers(h, 37 * 2)[0].data_ptr() == first[0].data_ptr()  # fits: the same memory
    for chunk in (4, 2, 7):  # 7 rows: larger than the buffers, which grow
        first[0].fill_(float("nan"))
        lp, ent = head_log_softmax(h, w, None, ids, 0.7, chunk=chunk, workspace=ws)
        ref_lp, ref_ent = head_log_softmax(h, w, None, ids, 0.7, chunk=chunk)
        assert torch.equal(lp, ref_lp) and torch.equal(ent, ref_ent)
    assert ws.buffers(h, 37 * 7)[0].numel() >= 37 * 7
    assert ws.buffers(h.double(), 10)[0].dtype == torch.float64  # another dtype: new buffers


def test_surrogate_first_pass_is_mechreward_loss() -> None:
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]]).bool()
    ref = torch.tensor([[-1.2, -2.0, -9.0]])
    loss, stats = surrogate_loss(lp, lp.detach(), ref, adv, mask, 0.05, "sq", 0.2)
    loss.backward()
    # d/dlogp of −ρ·adv at ρ=1 is −adv; plus β·2(logp−ref); averaged over the 2 masked tokens
    expect = (-adv + 0.05 * 2 * (lp.detach() - ref)) * mask / 2
    torch.testing.assert_close(lp.grad, expect)
    assert stats["clip_frac"] == 0.0 and stats["kl"] == pytest.approx(0.04 / 2)


def test_surrogate_clips_a_reused_batch() -> None:
    """A second pass over a batch (ρ ≠ 1): tokens whose ratio left [1 − ε, 1 + ε] in the advantage's
    direction are clipped (counted in clip_frac, no gradient); the others keep −ρ·adv's gradient."""
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])  # clipped: ρ 1.5 with adv > 0, ρ 0.5 with adv < 0
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = surrogate_loss(lp, old, None, adv, mask, 0.0, "sq", 0.2)
    loss.backward()
    assert stats["clip_frac"] == pytest.approx(0.5) and "kl" not in stats
    expect = torch.tensor([[0.0, 0.0, -1.1, -0.5]]) / 4  # d(−ρ·adv)/dlogp = −ρ·adv where not clipped
    torch.testing.assert_close(lp.grad, expect)
    # min(ρ·adv, clip(ρ)·adv) per token: 1.2, −0.8, 1.1, 0.5
    torch.testing.assert_close(loss.detach(), torch.tensor(-(1.2 - 0.8 + 1.1 + 0.5) / 4))


def _rows(short: list[float], length: list[float]) -> list[dict[str, Any]]:
    """A run's log: the step-0 evaluation, then one training row per step."""
    rows: list[dict[str, Any]] = [{"step": 0, "eval_accuracy": 0.1, "eval_bits": "0"}]
    for i, (sf, n) in enumerate(zip(short, length, strict=True)):
        rows.append({"step": i + 1, "short_frac": sf, "completion_len": n, "sec_step": 1.0})
    return rows


def test_collapse_check_marks_shrinking_runs() -> None:
    from saereward.rl.collapse import SHORT_TOKENS, collapse_check

    rule = {"window": 3, "short_frac": 0.5, "len_ratio": 0.5}
    # more and more completions of <= 3 tokens: the mean over steps 4-6 is 0.6, the first window at 0.5
    climbing = collapse_check(_rows([0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0], [20.0] * 8), **rule)
    assert climbing["collapsed"] is True and climbing["step"] == 6
    assert f"<= {SHORT_TOKENS} tokens" in climbing["reason"] and "steps 4-6" in climbing["reason"]
    at_rule = collapse_check(_rows([0.5, 0.5, 0.5, 0.0], [20.0] * 4), **rule)  # >= the rule: collapsed
    assert at_rule["collapsed"] and at_rule["step"] == 3
    below = collapse_check(_rows([0.49, 0.49, 0.49, 0.0], [20.0] * 4), **rule)
    assert below == {"collapsed": False, "step": None, "reason": None}
    # one short step does not make a window
    assert not collapse_check(_rows([0.0, 1.0, 0.0, 0.0, 0.4], [20.0] * 5), **rule)["collapsed"]
    # lengths fall to 10 from 40: (25 + 15 + 10) / 3 < 0.5 × 40 over steps 5-7, (30 + 25 + 15) / 3 is not
    shrinking = collapse_check(_rows([0.0] * 8, [40, 40, 40, 30, 25, 15, 10, 10]), **rule)
    assert shrinking["collapsed"] and shrinking["step"] == 7
    assert "mean completion length 16.7" in shrinking["reason"] and "40.0" in shrinking["reason"]
    # the length rule waits for 2 · window steps: steps 3-5 already average 16.7, step 6 is the first checked
    early = collapse_check(_rows([0.0] * 6, [40, 40, 40, 5, 5, 5]), **rule)
    assert early["collapsed"] and early["step"] == 6
    assert not collapse_check(_rows([0.0] * 5, [40, 40, 40, 5, 5]), **rule)["collapsed"]
    # a healthy run: lengths wander, a few short completions
    healthy = _rows([0.1, 0.0, 0.2, 0.1, 0.3, 0.1, 0.0, 0.2, 0.1], [42, 38, 45, 36, 40, 33, 44, 39, 41])
    assert collapse_check(healthy, **rule) == {"collapsed": False, "step": None, "reason": None}
    assert not collapse_check(healthy[:2], **rule)["collapsed"]  # fewer steps than a window
    # a window of 1 reacts to a single step; rows from before short_frac was logged count as 0
    assert collapse_check(_rows([0.0, 0.6], [20, 20]), 1, 0.5, 0.5)["step"] == 2
    old = [{k: v for k, v in r.items() if k != "short_frac"} for r in _rows([0.9] * 4, [20.0] * 4)]
    assert not collapse_check(old, **rule)["collapsed"]


# --------------------------------------------------------------------------------------------------
# The trainer on a tiny model
# --------------------------------------------------------------------------------------------------

import test_stage1  # noqa: E402,F401  (registers the hash_test / hash_always tasks)


def rl_cfg(out: Path, **kw: Any) -> GRPOConfig:
    base: dict[str, Any] = {
        "model": "tiny",
        "task": "hash_test",
        "n_train": 16,
        "n_eval": 6,
        "eval_seed": 1,
        "questions_per_step": 2,
        "group_size": 3,
        "max_new_tokens": 5,
        "steps": 2,
        "lr": 1e-2,
        "lora_r": 4,
        "lora_alpha": 8,
        "eval_every": 0,
        "eval_batch_size": 8,
        "checkpoint_every": 1,
        "out": str(out),
        "progress": False,
    }
    base.update(kw)
    return GRPOConfig(**base)


def fresh_tiny() -> Any:
    from saereward.model.lm import LoadedModel
    from tiny_models import char_tokenizer, make_tiny

    model, _ = make_tiny("llama")
    return LoadedModel(model=model, tokenizer=char_tokenizer(), spec="tiny", source="hf", path="")


def tiny_rollouts(folder: Path, layer: int = 1) -> Path:
    """Base rollouts of the tiny model (its weights are ``fresh_tiny``'s) on the trainer's task and
    prompt format, with per-token residuals at ``layer``: what a reward baseline is measured on."""
    from saereward.data.rollouts import run_rollouts
    from test_stage1 import rollouts_cfg

    run_rollouts(
        rollouts_cfg(folder, n=12, samples=2, layers=(layer,), token_layers=(layer,)), lm=tiny_lm("llama")
    )
    return folder


def tiny_pack(folder: Path, layer: int = 1, baseline: bool = True, **metadata: Any) -> Path:
    """A pack on a random SAE of the tiny model, saved as discovery saves one: with ``baseline``, its
    metadata names the base rollouts it came from (``tiny_rollouts``) and the reward baseline measured
    on them lies beside it (``pack.baseline.json``), as the fixed-scale reward forms need."""
    from saereward.data.rollouts import load_rollouts
    from saereward.features.baseline import baseline_beside, measure_baseline, save_baseline
    from saereward.features.scoring import PackScorer
    from tiny_models import char_tokenizer

    sae = random_sae(d_in=D_MODEL, d_sae=128, k=8, layer=layer, model="tiny")
    save_sae(sae, folder / "sae")
    meta: dict[str, Any] = {"d_model": D_MODEL, "d_sae": 128, "sae_path": str(folder / "sae")}
    ro = tiny_rollouts(folder / "base_rollouts", layer) if baseline else None
    if ro is not None:
        meta.update(rollouts=str(ro), task="hash_test", prompt_format="raw")
    meta.update(metadata)
    pack = FeaturePack(
        "t",
        [Feature(i, 1.0) for i in range(0, 40)],
        [Feature(i, -1.0) for i in range(40, 80)],
        layer=layer,
        model_name="tiny",
        metadata=meta,
    )
    path = save_pack(pack, folder / "pack.json")
    if ro is not None:
        scorer = PackScorer(sae, pack, d_model=D_MODEL)
        b = measure_baseline(scorer, load_rollouts(ro), layer, char_tokenizer(), meta={"scorer": "pack:t"})
        save_baseline(b, baseline_beside(path))
    return path


@pytest.mark.parametrize("source", ["policy", "reference"])
def test_trainer_sae_reward_updates_lora(tmp_path: Path, source: str) -> None:
    pack = tiny_pack(tmp_path)
    tr = GRPOTrainer(
        rl_cfg(tmp_path / "run", reward="sae", pack=str(pack), reward_source=source, lam=0.5), lm=fresh_tiny()
    )
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    seen: list[torch.Tensor] = []
    orig = tr.scorer.token_scores

    def spy(x: torch.Tensor) -> torch.Tensor:
        out = orig(x)
        seen.append(out)
        return out

    tr.scorer.token_scores = spy  # type: ignore[method-assign]
    summary = tr.fit()
    after = dict(tr.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert changed and all("lora_" in n for n in before)
    assert len(seen) == 2 and seen[0].abs().sum() > 0  # the reward was computed every step
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "sec_step" in r]
    assert len(steps) == 2
    for key in (
        "outcome",
        "mech",
        "kl",
        "grad_norm",
        "entropy",
        "clip_frac",
        "completion_len",
        "sec_generate",
        "sec_reward",
        "sec_train",
    ):
        assert key in steps[0]
    assert steps[0]["grad_norm"] > 0 and "eval_accuracy" in rows[0] and "eval_accuracy" in rows[-1]
    assert summary["eval_last"]["eval_n"] == 6
    check_log_rows(tmp_path / "run", n_eval=6, mech=True)
    assert summary["reward_form"] == "position" and summary["collapse"]["collapsed"] is False
    assert summary["steps_done"] == 2 and summary["format_warning"] is None
    # the trainer used the baseline beside the pack, and keeps a copy in the run folder
    from saereward.features.baseline import BASELINE_FILE, baseline_beside, load_baseline

    assert tr.baseline == load_baseline(baseline_beside(pack))
    assert load_baseline(tmp_path / "run" / BASELINE_FILE) == tr.baseline
    assert (tmp_path / "run" / "checkpoint" / "adapter.safetensors").is_file()
    # TensorBoard holds the same numbers as the JSONL log, at the same steps (the step-0 evaluation too)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    for key in ("outcome", "mech", "kl", "grad_norm", "sec_reward", "eval_accuracy"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in ea.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key


def read_run(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A run folder's log rows and its summary.json."""
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return rows, json.loads((run / "summary.json").read_text())


def check_log_rows(run: Path, n_eval: int, mech: bool) -> None:
    """What every run logs: per training step the collapse guard's inputs and the reward monitors, per
    evaluation the held-out questions' verdicts bit by bit, and the held-out ids in the summary."""
    rows, summary = read_run(run)
    train = [r for r in rows if "sec_step" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert train and evals and evals[0]["step"] == 0 and evals[-1]["step"] == train[-1]["step"]
    for r in train:
        assert 0.0 <= r["short_frac"] <= 1.0
        if not mech:  # R0 has no mech term to correlate with anything: undefined, null in the log
            assert r["len_mech_corr"] is None and r["monitor_rho"] is None
        for key in ("len_mech_corr", "monitor_rho"):
            assert r[key] is None or (isinstance(r[key], float) and -1.0 - 1e-9 <= r[key] <= 1.0 + 1e-9), key
    for r in evals:
        bits = r["eval_bits"]
        assert len(bits) == r["eval_n"] == n_eval and set(bits) <= {"0", "1"}
        assert bits.count("1") == r["eval_correct"]
    assert len(summary["eval_qids"]) == n_eval == len(set(summary["eval_qids"]))


def test_collapse_guard_stops_the_run(tmp_path: Path) -> None:
    """Completions of at most 2 tokens (max_new_tokens = 2) are a collapsed run by the rule: it stops at
    step collapse_window, evaluated and checkpointed there, and a second fit() does not train on."""
    run = tmp_path / "run"
    pack = str(tiny_pack(tmp_path))
    cfg = rl_cfg(run, reward="sae", pack=pack, lam=0.5, max_new_tokens=2, steps=5, collapse_window=2)
    summary = GRPOTrainer(cfg, lm=fresh_tiny()).fit()
    rows, saved = read_run(run)
    collapse = saved["collapse"]
    assert collapse["collapsed"] is True and collapse["step"] == 2 and "<= 3 tokens" in collapse["reason"]
    assert saved["steps_done"] == summary["steps_done"] == 2 < cfg.steps
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval_bits" in rows[-1]
    assert all(r["short_frac"] == 1.0 and r["completion_len"] <= 2 for r in rows[1:])
    assert saved["final_completion_len"] == rows[-1]["completion_len"] and saved["reward_form"] == "position"
    check_log_rows(run, n_eval=6, mech=True)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    log_before = (run / "train_log.jsonl").read_text()

    again = GRPOTrainer(cfg, lm=fresh_tiny())

    def no_step(step: int) -> dict[str, Any]:
        raise AssertionError(f"a collapsed run trained on (step {step})")

    again.step = no_step  # type: ignore[method-assign]
    summary2 = again.fit()
    assert summary2["steps_done"] == 2 and summary2["collapse"] == collapse
    assert (run / "train_log.jsonl").read_text() == log_before
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2

    # collapse_stop = False: every step runs, the collapse is still recorded where it happened
    kw = {"reward": "sae", "pack": pack, "lam": 0.5, "max_new_tokens": 2, "steps": 3, "collapse_window": 2}
    go_on = rl_cfg(tmp_path / "go_on", collapse_stop=False, **kw)
    summary3 = GRPOTrainer(go_on, lm=fresh_tiny()).fit()
    rows3, saved3 = read_run(tmp_path / "go_on")
    assert saved3["steps_done"] == summary3["steps_done"] == 3 and [r["step"] for r in rows3] == [0, 1, 2, 3]
    assert saved3["collapse"] == collapse
    # R0 has no score to hack: its collapse is recorded, the run is not stopped
    r0 = rl_cfg(tmp_path / "r0", max_new_tokens=2, steps=3, collapse_window=2)
    summary4 = GRPOTrainer(r0, lm=fresh_tiny()).fit()
    assert summary4["steps_done"] == 3 and summary4["collapse"]["collapsed"] is True
    assert summary4["reward_form"] is None


def test_settings_diff_reads_old_runs_as_mechreward_form() -> None:
    """A run saved before reward forms existed trained mechreward's form: it matches that, not the default."""
    from saereward.config import to_dict
    from saereward.rl.checkpoint import settings_diff

    new = GRPOConfig(reward="sae", pack="p.json")
    old = {k: v for k, v in to_dict(new).items() if k not in ("reward_form", "packed_decode")}
    assert sorted(settings_diff(old, new)) == ["packed_decode", "reward_form"]
    same = GRPOConfig(reward="sae", pack="p.json", reward_form="mechreward", packed_decode=False)
    assert settings_diff(old, same) == []  # such a run decoded with MKL's products on merged weights
    r0 = GRPOConfig()  # R0 ignores how a score would enter
    assert settings_diff({**to_dict(r0), "reward_form": "shaped", "lam": 0.3}, r0) == []


def test_prompt_format_mismatch_warns_and_is_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pack discovered on few-shot prompts, RL on raw prompts: a warning at construction, kept in the summary."""
    import logging

    pack = tiny_pack(tmp_path, prompt_format="fewshot")
    cfg = rl_cfg(tmp_path / "run", reward="sae", pack=str(pack), lam=0.5, steps=1)
    with caplog.at_level(logging.WARNING):
        tr = GRPOTrainer(cfg, lm=fresh_tiny(), check_only=True)
    assert "prompt_format 'fewshot' (discovery) vs 'raw' (RL)" in caplog.text
    assert tr.format_warning is not None and "prompt_format 'fewshot'" in tr.format_warning
    assert "task '" not in tr.format_warning  # the task agrees
    GRPOTrainer(cfg, lm=fresh_tiny()).fit()
    _, saved = read_run(tmp_path / "run")
    assert saved["format_warning"] == tr.format_warning and saved["prompt_format"] == "raw"
    # the pack's own record decides; without one, the config of the rollouts it came from
    bare = tiny_pack(tmp_path / "b", prompt_format=None, task=None)
    assert (
        GRPOTrainer(dataclasses.replace(cfg, pack=str(bare)), lm=fresh_tiny(), check_only=True).format_warning
        is None
    )
    other = tiny_pack(tmp_path / "c", task="hash_always")
    warn = GRPOTrainer(
        dataclasses.replace(cfg, pack=str(other)), lm=fresh_tiny(), check_only=True
    ).format_warning
    assert warn is not None and "task 'hash_always' (discovery) vs 'hash_test' (RL)" in warn


def test_trainer_reward_baseline_sources(tmp_path: Path) -> None:
    """Where the fixed-scale forms' baseline comes from: --reward-baseline (a JSON or a rollout folder),
    else the JSON beside the pack, else the pack's recorded rollouts (R1) / direction_rollouts (R2)."""
    from saereward.features.baseline import baseline_beside, fit_baseline, load_baseline, save_baseline

    pack = tiny_pack(tmp_path)
    ro = tmp_path / "base_rollouts"
    beside = load_baseline(baseline_beside(pack))
    assert beside.meta["layer"] == 1 and beside.meta["prompt_format"] == "raw" and beside.sd > 0

    def baseline(**kw: Any) -> Any:
        cfg = rl_cfg(tmp_path / "run", **{"reward": "sae", "pack": str(pack), **kw})
        return GRPOTrainer(cfg, lm=fresh_tiny(), check_only=True).baseline

    def stats(b: Any) -> Any:
        return dataclasses.replace(b, meta={})

    assert baseline() == beside
    assert stats(baseline(reward_baseline=str(ro))) == stats(beside)  # measured on the same rollouts
    own = fit_baseline([torch.arange(5.0), torch.arange(3.0) - 1], min_count=1, meta={"layer": 1})
    save_baseline(own, tmp_path / "own.json")
    assert baseline(reward_baseline=str(tmp_path / "own.json")) == own
    save_baseline(dataclasses.replace(own, meta={"layer": 2}), tmp_path / "l2.json")
    with pytest.raises(SaeRewardError, match="measured at layer 2, the reward reads layer 1"):
        baseline(reward_baseline=str(tmp_path / "l2.json"))
    baseline_beside(pack).unlink()  # no JSON beside the pack: its discovery rollouts
    measured = baseline()
    assert stats(measured) == stats(beside) and measured.meta["rollouts"] == str(ro.resolve())
    assert baseline(reward_form="mechreward") is None
    bare = tiny_pack(tmp_path / "bare", baseline=False)  # neither: refused before training, with the way out
    with pytest.raises(SaeRewardError, match="needs base rollouts .* --reward-baseline"):
        baseline(pack=str(bare))
    assert baseline(pack=str(bare), reward_form="mechreward") is None
    r2 = baseline(reward="direction", pack=None, direction_rollouts=str(ro), layer=1, reward_form="shaped")
    assert r2.meta["rollouts"] == str(ro.resolve()) and r2.meta["scorer"] == "direction" and r2.sd > 0
    assert baseline(reward="outcome", pack=None) is None


def _text_batch(tr: GRPOTrainer, texts: list[str]) -> Any:
    """Step 0's rollouts with each row's response replaced by ``texts[i]`` (``</s>``: the end token)."""
    tok = tr.lm.tokenizer
    b = tr._rollouts(0)
    P = b.prompt_len
    for i, text in enumerate(texts):
        parts = text.split("</s>")
        ids = tok(parts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] * (len(parts) - 1)
        n = len(ids)
        b.sequences[i, P : P + n] = torch.tensor(ids)
        for m in (b.attention_mask, b.response_mask, b.residual_mask):
            m[i, P + n :] = 0
            m[i, P : P + n] = 1
    b.residual_mask[:, -1] = 0  # the last column is never fed through the model
    return b


def test_trainer_position_advantages(tmp_path: Path) -> None:
    """The default form on a batch with an end token and a stop string: the outcome advantage plus
    λ·clip((mech − μ_ref(t)) / σ_ref) on the scored tokens (not the end token, not "\\nQ:"'s three),
    the length/mech correlation and the monitor's ρ as logged."""
    import numpy as np
    from scipy.stats import spearmanr

    pack = tiny_pack(tmp_path)
    cfg = rl_cfg(tmp_path / "run", reward="sae", pack=str(pack), reward_source="reference", max_new_tokens=8)
    tr = GRPOTrainer(cfg, lm=fresh_tiny())
    texts = ["12 and 5", "7 </s>", "19\nQ:", "the sum ", "42", "x = 3."]
    b = _text_batch(tr, texts)
    P = b.prompt_len
    _, res = tr.reference(b)
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    lam = 0.5
    adv, total, rs = tr.advantages(b, outcome, res, lam)

    resp = b.response_mask[:, P:]
    lengths = resp.sum(1)
    assert lengths.tolist() == [8, 3, 5, 8, 2, 6]
    scored = b.residual_mask[:, P:].clone()
    scored[1, 2] = False  # the end token
    scored[2, 2:5] = False  # "\n", "Q", ":"
    assert torch.equal(tr.scored_mask(b), scored)
    base = tr.baseline
    N = resp.shape[1]
    mu = torch.tensor([base.pos_mean[t] if t < len(base.pos_mean) else base.tail_mean for t in range(N)])
    mech = tr.scorer.token_scores(res[:, P:].float())
    u = torch.where(scored, lam * ((mech - mu) / base.sd).clamp(-3.0, 3.0), torch.zeros(()))
    g = outcome.view(2, 3)
    A = ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten()
    want = torch.where(resp, A[:, None] + u, torch.zeros(()))
    torch.testing.assert_close(adv, want)
    assert (adv[1, 2] == A[1]) and (adv[2, 2:5] == A[2]).all()  # no mech credit for ending
    torch.testing.assert_close(total, outcome + u.sum(1) / base.mean_len)
    per_row = (mech * scored).sum(1) / scored.sum(1)
    assert rs["mech"] == pytest.approx(float((mech * scored).sum() / scored.sum()), rel=1e-5)
    # within each group: completion length against the mech part of the mean advantage
    mech_part = ((adv - A[:, None]) * resp).sum(1) / lengths
    x = (lengths.double().view(2, 3) - lengths.double().view(2, 3).mean(1, keepdim=True)).flatten()
    y = (mech_part.double().view(2, 3) - mech_part.double().view(2, 3).mean(1, keepdim=True)).flatten()
    assert rs["len_mech_corr"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-6)
    assert rs["scores"] == pytest.approx(per_row.tolist(), abs=1e-4)
    row = {"completion_scores": rs["scores"], "completion_outcomes": [int(v) for v in outcome]}
    assert monitor_rho([row], 3) == pytest.approx(
        spearmanr(per_row.tolist(), outcome.tolist()).statistic, abs=1e-3
    )
    assert monitor_rho([row, {**row, "completion_outcomes": [0] * len(outcome)}], 1) != monitor_rho([row], 1)
    # mechreward's form (asked for explicitly) scores every position with a residual, the end token too
    mr = GRPOTrainer(dataclasses.replace(cfg, reward_form="mechreward"), lm=fresh_tiny(), check_only=True)
    assert mr.baseline is None
    rmask = b.residual_mask[:, P:]
    assert torch.equal(mr.scored_mask(b), rmask)
    adv_mr, total_mr, _ = mr.advantages(b, outcome, res, lam)
    want_mr, want_total = token_advantages(
        outcome, mech.where(rmask, torch.zeros(())), rmask, 3, lam, "both", loss_mask=resp, form="mechreward"
    )
    torch.testing.assert_close(adv_mr, want_mr)
    torch.testing.assert_close(total_mr, want_total)


def test_trainer_rejects_bad_setups(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="group_size 1 < 2"):
        rl_cfg(tmp_path, group_size=1)
    pack = tiny_pack(tmp_path, layer=2)
    with pytest.raises(SaeRewardError, match="discovered at layer 2, the reward reads layer 1"):
        GRPOTrainer(rl_cfg(tmp_path / "r", reward="sae", pack=str(pack), layer=1), lm=fresh_tiny())
    sae32 = random_sae(d_in=32, d_sae=128, k=8, layer=2)
    save_sae(sae32, tmp_path / "sae32")
    with pytest.raises(SaeRewardError, match="d_in 32 does not match model width 64"):
        GRPOTrainer(
            rl_cfg(tmp_path / "r", reward="sae", pack=str(pack), sae=str(tmp_path / "sae32")), lm=fresh_tiny()
        )
    other = json.loads(pack.read_text())
    other["model_name"] = "embedded:smollm2-135m-instruct"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SaeRewardError, match="was built on model embedded:smollm2"):
        GRPOTrainer(rl_cfg(tmp_path / "r", reward="sae", pack=str(tmp_path / "other.json")), lm=fresh_tiny())


def test_sae_from_another_model_of_the_same_width_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    save_sae(random_sae(d_in=D_MODEL, d_sae=128, k=8, layer=1, model="other"), tmp_path / "sae_other")
    cfg = rl_cfg(tmp_path / "r", reward="sae", pack=str(tiny_pack(tmp_path)), sae=str(tmp_path / "sae_other"))
    with caplog.at_level(logging.WARNING):
        tr = GRPOTrainer(cfg, lm=fresh_tiny(), check_only=True)
    assert "the SAE was trained on other, training uses tiny" in caplog.text
    assert tr.layer == 1 and not hasattr(tr, "opt")  # checked only: no adapter, no optimizer


def test_verifier_that_never_fires_is_refused(tmp_path: Path) -> None:
    from saereward.tasks import register_task
    from test_stage1 import HashTask

    class Never(HashTask):
        def verify(self, item: Any, completion: str) -> bool:
            return False

    with contextlib.suppress(ValueError):
        register_task("never_test", lambda n=None, seed=0, **kw: Never(n or 10, False, seed))
    with pytest.raises(SaeRewardError, match="no outcome reward would ever fire"):
        GRPOTrainer(rl_cfg(tmp_path, task="never_test"), lm=fresh_tiny())


RUNNER = """
import sys, json
sys.path.insert(0, {tests!r})
import test_rl
from saereward.rl.grpo import GRPOTrainer
cfg = test_rl.rl_cfg(__import__("pathlib").Path({out!r}), steps=6, **json.loads({kw!r}))
GRPOTrainer(cfg, lm=test_rl.fresh_tiny()).fit()
"""


def _run(out: Path, kw: dict[str, Any], kill_after_step: int | None = None) -> None:
    code = RUNNER.format(tests=str(TESTS), out=str(out), kw=json.dumps(kw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    if kill_after_step is None:
        assert proc.wait(timeout=600) == 0
        return
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline:
        if state.is_file():
            try:
                if json.loads(state.read_text())["step"] >= kill_after_step:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_resume_after_kill_is_identical(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    pack = tiny_pack(tmp_path)
    kw = {"reward": "sae", "pack": str(pack), "lam": 0.5, "threads": 1}
    _run(tmp_path / "full", kw)
    _run(tmp_path / "killed", kw, kill_after_step=3)
    resumed_at = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"]
    assert resumed_at < 6
    _run(tmp_path / "killed", kw)  # resumes
    a = load_file(tmp_path / "full" / "checkpoint" / "adapter.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoint" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    strip = lambda rows: [  # noqa: E731  (NaN != NaN: compare the monitor as text)
        {k: (str(v) if k == "monitor_rho" else v) for k, v in r.items() if not k.startswith("sec_")}
        for r in rows
    ]
    assert strip(la) == strip(lb)


def test_resume_keeps_the_monitor_window(tmp_path: Path) -> None:
    """monitor_rho at step 3 of a run resumed after step 2 = that of the uninterrupted run."""
    kw = {"reward": "sae", "pack": str(tiny_pack(tmp_path)), "lam": 0.5}
    GRPOTrainer(rl_cfg(tmp_path / "full", steps=3, **kw), lm=fresh_tiny()).fit()
    GRPOTrainer(rl_cfg(tmp_path / "split", steps=2, **kw), lm=fresh_tiny()).fit()
    GRPOTrainer(rl_cfg(tmp_path / "split", steps=3, **kw), lm=fresh_tiny()).fit()
    full, _ = read_run(tmp_path / "full")
    split, _ = read_run(tmp_path / "split")
    assert [r["step"] for r in split] == [0, 1, 2, 3]
    want = [r["monitor_rho"] for r in full[1:]]
    if any(v is None for v in want):  # a window without both outcomes compares nothing (null in the log)
        pytest.skip("the uninterrupted run's monitor ρ is undefined here")
    assert [r["monitor_rho"] for r in split[1:]] == pytest.approx(want, rel=1e-6)


def test_resume_after_kill_between_checkpoint_renames(tmp_path: Path) -> None:
    """A kill after ``checkpoint`` became ``checkpoint.old`` and before ``checkpoint.tmp`` took its place:
    the next run resumes from ``checkpoint.old`` instead of starting again."""
    cfg = rl_cfg(tmp_path / "run", steps=2)
    GRPOTrainer(cfg, lm=fresh_tiny()).fit()
    ck = tmp_path / "run" / "checkpoint"
    saved = json.loads((ck / "state.json").read_text())
    assert saved["step"] == 2 and "manual_seed" in saved["rng"]
    ck.rename(ck.with_name("checkpoint.old"))
    tr = GRPOTrainer(GRPOConfig(**{**cfg.__dict__, "steps": 3}), lm=fresh_tiny())
    assert tr._restore() == 2


def test_resume_refuses_a_checkpoint_made_with_other_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = rl_cfg(tmp_path / "run", steps=1)
    GRPOTrainer(cfg, lm=fresh_tiny()).fit()
    with caplog.at_level("WARNING", logger="saereward.rl.grpo"):
        GRPOTrainer(cfg, lm=fresh_tiny()).fit()  # done already: says so rather than "1 steps"
    assert "holds 1 steps already (steps = 1): nothing to train" in caplog.text
    other = GRPOConfig(**{**cfg.__dict__, "steps": 2, "lr": cfg.lr * 2, "seed": cfg.seed + 1})
    with pytest.raises(
        SaeRewardError, match=r"different settings \(lr, seed\).*another --out or --no-resume"
    ):
        GRPOTrainer(other, lm=fresh_tiny())._restore()
    # a longer run, progress bars and the checkpoint cadence do not change what a step computes
    same = GRPOConfig(**{**cfg.__dict__, "steps": 2, "progress": not cfg.progress, "checkpoint_every": 5})
    assert GRPOTrainer(same, lm=fresh_tiny())._restore() == 1


def test_resume_refuses_fewer_steps_and_a_linear_schedules_new_budget(tmp_path: Path) -> None:
    """A checkpoint with more steps than asked is refused (its summary would label the adapter with an
    earlier evaluation); a linear λ schedule spreads over ``steps``, so a changed budget is refused too."""
    cfg = rl_cfg(tmp_path / "run", steps=2)
    GRPOTrainer(cfg, lm=fresh_tiny()).fit()
    fewer = GRPOConfig(**{**cfg.__dict__, "steps": 1})
    with pytest.raises(SaeRewardError, match=r"holds 2 steps, more than steps = 1: pass --steps 2"):
        GRPOTrainer(fewer, lm=fresh_tiny())._restore()
    kw = {"reward": "sae", "pack": str(tiny_pack(tmp_path)), "lam": 0.5, "lam_schedule": "linear"}
    lin = rl_cfg(tmp_path / "linear", steps=1, **kw)
    GRPOTrainer(lin, lm=fresh_tiny()).fit()
    with pytest.raises(SaeRewardError, match=r"different settings \(steps\)"):
        GRPOTrainer(GRPOConfig(**{**lin.__dict__, "steps": 2}), lm=fresh_tiny())._restore()


def test_settings_another_reward_reads_do_not_block_a_resume(tmp_path: Path) -> None:
    """R0 reads no score files and R1 no direction rollouts: their paths (which move with a copied
    run folder) are not settings of those runs; a setting the reward reads still is."""
    from saereward.config import to_dict
    from saereward.rl.checkpoint import settings_diff

    r0 = rl_cfg(tmp_path / "r0", steps=1)
    moved = GRPOConfig(**{**r0.__dict__, "direction_rollouts": "/elsewhere/rollouts", "dual_verifier": "p"})
    assert settings_diff(to_dict(r0), moved) == []
    r1 = rl_cfg(tmp_path / "r1", steps=1, reward="sae", pack="a/pack.json", lam=0.5)
    assert settings_diff(to_dict(r1), GRPOConfig(**{**r1.__dict__, "direction_rollouts": "x"})) == []
    assert settings_diff(to_dict(r1), GRPOConfig(**{**r1.__dict__, "pack": "b/pack.json"})) == ["pack"]


def test_resume_refuses_a_pack_changed_at_the_same_path(tmp_path: Path) -> None:
    """The checkpoint records the reward's inputs by hash: a pack re-discovered into the same path
    (same settings, other features) is refused on resume; the same score resumes, a rewritten
    validation record included."""
    pack = tiny_pack(tmp_path)
    cfg = rl_cfg(tmp_path / "run", steps=1, reward="sae", pack=str(pack), lam=0.5)
    GRPOTrainer(cfg, lm=fresh_tiny()).fit()
    longer = dataclasses.replace(cfg, steps=2)
    assert GRPOTrainer(longer, lm=fresh_tiny())._restore() == 1
    data = json.loads(pack.read_text())
    data["validation"] = {"verdict": "FAIL"}  # what gate-g1 rewrites: the score is the same
    pack.write_text(json.dumps(data))
    assert GRPOTrainer(longer, lm=fresh_tiny())._restore() == 1
    data["helpful_features"] = data["helpful_features"][:5]
    pack.write_text(json.dumps(data))
    with pytest.raises(SaeRewardError, match=r"other content in pack \(the file changed since"):
        GRPOTrainer(longer, lm=fresh_tiny())._restore()


def test_building_the_trainer_raises_no_future_warning(tmp_path: Path) -> None:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing``: its FutureWarning, printed on
    every RL run and nothing a user can act on, is kept out of the trainer's output."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        GRPOTrainer(rl_cfg(tmp_path / "run", steps=1), lm=fresh_tiny())


def test_a_moved_run_folder_resumes_with_its_own_pack(tmp_path: Path) -> None:
    """A run folder moved with its pack (the pack's path differs, its content does not) resumes its
    checkpoint, and G2 counts its finished run; a pack whose content differs is still refused."""
    from saereward.gates.g2_rl_ablation import _finished
    from saereward.rl.checkpoint import settings_diff

    a, b = tmp_path / "a", tmp_path / "b"
    cfg = rl_cfg(a / "run", steps=1, reward="sae", pack=str(tiny_pack(a)), lam=0.5)
    GRPOTrainer(cfg, lm=fresh_tiny()).fit()
    shutil.move(a, b)
    moved = dataclasses.replace(cfg, out=str(b / "run"), pack=str(b / "pack.json"))
    assert _finished(b / "run", moved)
    assert GRPOTrainer(dataclasses.replace(moved, steps=2), lm=fresh_tiny())._restore() == 1
    saved = json.loads((b / "run" / "config.json").read_text())
    assert settings_diff(saved, moved, ["pack"]) == [] and settings_diff(saved, moved) == ["pack"]
    data = json.loads((b / "pack.json").read_text())
    data["helpful_features"] = data["helpful_features"][:5]
    (b / "pack.json").write_text(json.dumps(data))
    with pytest.raises(SaeRewardError, match=r"different settings \(pack\)"):
        GRPOTrainer(dataclasses.replace(moved, steps=2), lm=fresh_tiny())._restore()
    with pytest.raises(SaeRewardError, match=r"holds a run with other settings \(pack\)"):
        _finished(b / "run", moved)


def test_gate_g2_runs_every_reward_and_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from saereward.data.rollouts import run_rollouts
    from saereward.gates.g2_rl_ablation import GateG2Config, format_g2, run_gate_g2
    from test_stage1 import rollouts_cfg

    run_rollouts(rollouts_cfg(tmp_path / "ro", n=12, samples=2), lm=tiny_lm("llama"))
    pack = tiny_pack(tmp_path)
    rl = rl_cfg(
        tmp_path / "unused", steps=1, pack=str(pack), direction_rollouts=str(tmp_path / "ro"), layer=1
    )
    # no truncation audit: it reads the tokenizer by model name, which the tiny model has none of
    rl = dataclasses.replace(rl, out=GRPOConfig().out)  # gate-g2 names each run's folder itself
    cfg = GateG2Config(seeds=(0, 1), out=str(tmp_path / "g2"), rl=rl, min_seeds=2, audit=False)
    # bad input fails before any run, not after R0's: here R1's pack is from another layer
    bad = dataclasses.replace(cfg, rl=dataclasses.replace(rl, layer=3))
    with pytest.raises(SaeRewardError, match="discovered at layer 1, the reward reads layer 3"):
        run_gate_g2(dataclasses.replace(bad, rewards=("outcome", "sae")), lm_factory=fresh_tiny)
    assert not (tmp_path / "g2").exists()
    res = run_gate_g2(cfg, lm_factory=fresh_tiny)
    assert res["verdict"] in ("PASS", "FAIL")
    assert set(res["table"]) == {"outcome", "sae", "direction"}
    for t in res["table"].values():
        assert t["pooled_n"] == 2 * res["n_eval_per_run"] and t["ci_low"] <= t["accuracy"] <= t["ci_high"]
        assert len(t["per_seed"]) == 2
    assert (tmp_path / "g2" / "gate_g2.png").stat().st_size > 1000
    assert len(list((tmp_path / "g2").glob("R*_seed*"))) == 6
    text = format_g2(res)
    assert "R1 sae" in text and "verdict:" in text
    # a second call reuses the finished runs
    mtime = (tmp_path / "g2" / "R0_outcome_seed0" / "summary.json").stat().st_mtime
    again = run_gate_g2(dataclasses.replace(cfg, min_seeds=3), lm_factory=fresh_tiny)
    assert (tmp_path / "g2" / "R0_outcome_seed0" / "summary.json").stat().st_mtime == mtime
    assert again["verdict"] == "INCOMPLETE" and "min_seeds 3" in again["checks"]["note"]  # 2 seeds
    # ...but not a finished run made with other settings
    with pytest.raises(SaeRewardError, match=r"holds a run with other settings \(lr\)"):
        run_gate_g2(dataclasses.replace(cfg, rl=dataclasses.replace(rl, lr=5e-3)), lm_factory=fresh_tiny)


# --------------------------------------------------------------------------------------------------
# Data parallel: 2 gloo processes, each with half the batch, take the single-process step
# --------------------------------------------------------------------------------------------------


def _split_batch(b: Any, rows: slice) -> Any:
    from dataclasses import replace

    return replace(
        b,
        sequences=b.sequences[rows],
        attention_mask=b.attention_mask[rows],
        response_mask=b.response_mask[rows],
        residual_mask=b.residual_mask[rows],
        completions=b.completions[rows],
        qids=b.qids[rows],
        residuals=None if b.residuals is None else b.residuals[rows],
    )


def _save_batch(folder: Path, b: Any, outcome: torch.Tensor, pack: str) -> None:
    from safetensors.torch import save_file

    t = {
        k: getattr(b, k).contiguous()
        for k in ("sequences", "attention_mask", "response_mask", "residual_mask")
    }
    t.update({"residuals": b.residuals.contiguous(), "outcome": outcome})
    save_file(t, str(folder / "batch.safetensors"))
    (folder / "batch.json").write_text(
        json.dumps({"prompt_len": b.prompt_len, "completions": b.completions, "qids": b.qids, "pack": pack})
    )


def _load_batch(folder: Path) -> tuple[Any, torch.Tensor, str]:
    from safetensors.torch import load_file

    from saereward.rl.batching import _Batch

    t = load_file(str(folder / "batch.safetensors"))
    meta = json.loads((folder / "batch.json").read_text())
    b = _Batch(
        t["sequences"],
        t["attention_mask"],
        t["response_mask"],
        t["residual_mask"],
        meta["prompt_len"],
        meta["completions"],
        meta["qids"],
        t["residuals"],
    )
    return b, t["outcome"], meta["pack"]


def _ddp_grpo_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b, outcome, pack = _load_batch(Path(folder))
        tr = GRPOTrainer(
            rl_cfg(Path(folder) / f"rank{rank}", reward="sae", pack=pack, lam=0.5), lm=fresh_tiny()
        )
        assert tr.world == 2
        rows = slice(3 * rank, 3 * rank + 3)  # one whole group per rank
        part = _split_batch(b, rows)
        ref_lp, _ = tr.reference(part)
        adv, total, rs = tr.advantages(part, outcome[rows], part.residuals, 0.5)
        loss, stats, _, ent = tr.update(part, adv, ref_lp)
        logged = tr.batch_stats(part, outcome[rows], total, rs, loss, stats, ent)
        if rank == 0:
            from safetensors.torch import save_file

            (Path(folder) / "ddp_stats.json").write_text(json.dumps(logged))

            state = {n: p.detach().contiguous() for n, p in tr._lora_state().items()}
            state.update({f"grad.{n}": p.grad.contiguous() for n, p in tr._lora_state().items()})
            save_file(state, str(Path(folder) / "ddp.st"))
        torch.distributed.barrier()  # both ranks done before either tears down gloo
    finally:
        torch.distributed.destroy_process_group()
    from saereward.cli import exit_rank

    exit_rank(0)  # as the saereward command ends a rank: gloo's threads outlive the group (see exit_rank)


def test_data_parallel_update_equals_single_process(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    pack = str(tiny_pack(tmp_path))
    tr = GRPOTrainer(rl_cfg(tmp_path / "single", reward="sae", pack=pack, lam=0.5), lm=fresh_tiny())
    b = tr._rollouts(0)
    assert b.sequences.shape[0] == 6
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    _save_batch(tmp_path, b, outcome, pack)
    init = {n: p.detach().clone() for n, p in tr._lora_state().items()}
    ref_lp, _ = tr.reference(b)
    adv, total, rs = tr.advantages(b, outcome, b.residuals, 0.5)
    loss, stats, _, ent = tr.update(b, adv, ref_lp)
    logged = tr.batch_stats(b, outcome, total, rs, loss, stats, ent)
    single = {n: p.detach() for n, p in tr._lora_state().items()}
    grads = {n: p.grad for n, p in tr._lora_state().items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_grpo_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ddp = load_file(tmp_path / "ddp.st")
    # rank 0 logs the whole batch's statistics, not its own half's
    ddp_logged = json.loads((tmp_path / "ddp_stats.json").read_text())
    assert ddp_logged.keys() == logged.keys() and logged["entropy"] > 0 and logged["completion_len"] > 0
    for k, v in logged.items():
        assert ddp_logged[k] == pytest.approx(v, rel=1e-4, abs=1e-7, nan_ok=True), k
    assert any(not torch.equal(single[n], init[n]) for n in single)  # the step did something
    for n in single:
        g = grads[n]
        scale = float(g.abs().max())
        # the summed, clipped gradients agree; so do the weights wherever Adam's first step (lr * sign g)
        # is not decided by rounding noise around 0
        torch.testing.assert_close(ddp[f"grad.{n}"], g, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=n)
        clear = g.abs() > 1e-3 * scale
        torch.testing.assert_close(ddp[n][clear], single[n][clear], rtol=1e-4, atol=1e-6, msg=n)


ACCELERATE_RUNNER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
import test_rl
from saereward.rl.grpo import GRPOTrainer, _init_distributed

torch.set_num_threads(1)
assert _init_distributed()
cfg = test_rl.rl_cfg(Path({out!r}), steps=2, reward="sae", pack={pack!r}, lam=0.5, eval_every=1)
tr = GRPOTrainer(cfg, lm=test_rl.fresh_tiny())
tr.fit()
flat = torch.cat([p.detach().flatten() for p in tr._lora_state().values()])
every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(every, flat)
if dist.get_rank() == 0:
    Path({out!r}, "ranks.json").write_text(json.dumps({{
        "world": tr.world, "backend": dist.get_backend(), "questions": len(tr._questions(0)),
        "same_weights": all(torch.equal(every[0], w) for w in every),
    }}))
dist.destroy_process_group()
from saereward.cli import exit_rank
exit_rank(0)  # as the saereward command ends a rank: gloo's threads outlive the group (see exit_rank)
"""


@pytest.mark.slow
def test_trainer_under_accelerate_launch(tmp_path: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` (accelerate's torchrun launcher; its ``--cpu``
    launcher needs MPI for more than one process) on a CPU-only machine: both ranks join a gloo
    group, split each step's questions, take identical steps; rank 0 alone evaluates, logs and
    checkpoints."""
    pack = str(tiny_pack(tmp_path))
    script = tmp_path / "runner.py"
    script.write_text(ACCELERATE_RUNNER.format(tests=str(TESTS), out=str(tmp_path / "run"), pack=pack))
    launcher = Path(sys.executable).with_name("accelerate")
    with socket.socket() as probe:  # a free port: the default 29500 may be taken (another launch)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--main_process_port", str(port)]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "run" / "ranks.json").read_text())
    assert ranks == {"world": 2, "backend": "gloo", "questions": 1, "same_weights": True}
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # one writer
    assert all("eval_accuracy" in r for r in rows) and rows[1]["grad_norm"] > 0
    assert (tmp_path / "run" / "checkpoint" / "adapter.safetensors").is_file()


def test_merged_lora_restores_exact_base_weights(tmp_path: Path) -> None:
    from saereward.rl.patches import merged_lora

    tr = GRPOTrainer(rl_cfg(tmp_path), lm=fresh_tiny())
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a non-trivial adapter
    base = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "base_layer" in n}
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        before = tr.model(input_ids=ids).logits
        with merged_lora(tr.model):
            merged = tr.model(input_ids=ids).logits
            changed = any(not torch.equal(p, base[n]) for n, p in tr.model.named_parameters() if n in base)
        after = tr.model(input_ids=ids).logits
    assert changed  # the adapter was merged into the base weights during the block
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)  # same function
    for n, p in tr.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # exact restore, not W + BA - BA
    assert torch.equal(after, before)  # the LoRA path is active again


def test_mmap_large_allocations_on_glibc() -> None:
    import platform

    from saereward.rl.patches import mmap_large_allocations

    assert mmap_large_allocations() is (platform.libc_ver()[0] == "glibc")
    x = torch.ones(1 << 20)  # allocations still work afterwards
    assert float(x.sum()) == float(1 << 20)


def test_rollouts_unmerged_lora_equal_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``merge_for_generation=False``: the fast decode loop samples from the unmerged LoRA policy the
    same tokens and residuals as from the merged one (same seed), and so does ``packed_decode`` (the
    adapters folded into oneDNN packed weights, nothing merged in place), also ``packed_in_place``
    (the packed copy standing in for the weights, the adapters beside it), and packed decoding of
    weights in a checkpoint's file mapping, in place or not (their pages dropped, the adapters folded
    in); all leave the weights as they were."""
    from transformers import AutoModelForCausalLM

    from saereward.model import fastdecode
    from saereward.model.lm import LoadedModel
    from tiny_models import char_tokenizer

    packs: list[int] = []
    real_pack = fastdecode._pack
    monkeypatch.setattr(fastdecode, "_pack", lambda *ps, **kw: packs.append(1) or real_pack(*ps, **kw))
    batches = []
    pack = str(tiny_pack(tmp_path))
    fresh_tiny().model.save_pretrained(tmp_path / "ckpt")
    for merge, packed, in_place, mapped in (
        (True, False, False, False),
        (False, False, False, False),
        (True, True, False, False),
        (True, True, True, False),
        (True, True, False, True),
        (True, True, True, True),
    ):
        packs.clear()
        cfg = rl_cfg(
            tmp_path / f"m{merge}{packed}{in_place}{mapped}",
            merge_for_generation=merge,
            packed_decode=packed,
            packed_in_place=in_place,
            fast_decode=True,
            max_new_tokens=8,
            reward="sae",
            pack=pack,
            reward_form="mechreward",  # residuals of the policy, no reward baseline needed
        )
        lm = fresh_tiny()
        if mapped:
            model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
            lm = LoadedModel(model=model, tokenizer=char_tokenizer(), spec="tiny", source="hf", path="")
        tr = GRPOTrainer(cfg, lm=lm)
        torch.manual_seed(7)
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.5)  # a trained-looking adapter (PEFT starts B at zero)
        assert fastdecode.unsupported(tr.model) is None  # the loop runs the unmerged adapters
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        batches.append(tr._rollouts(0))
        assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
        # every projection (and the head unless released in place) packed, only when asked
        assert bool(packs) == packed
        head = not in_place or mapped
        assert len(packs) == (4 * len(fastdecode.decoder_layers(tr.model)) + head if packed else 0)
    merged, *others = batches
    for other in others:
        assert torch.equal(merged.sequences, other.sequences)
        # other rounding orders: differences relative to the residuals' scale (|x| reaches ~40)
        scale = merged.residuals.abs().max()
        assert float((merged.residuals - other.residuals).abs().max() / scale) < 1e-5


def test_lora_autocast_bf16_update(tmp_path: Path) -> None:
    """bf16 base: the adapters run in bf16 under autocast; fp32 weights and gradients; same gradient."""
    lm = fresh_tiny()
    lm.model.to(torch.bfloat16)
    grads = {}
    for autocast, lean in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        tr = GRPOTrainer(
            rl_cfg(tmp_path / f"a{autocast}{lean}", lora_autocast=autocast, lean_lora=lean), lm=lm
        )
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        b = tr._rollouts(0)
        outcome = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        adv, *_ = tr.advantages(b, outcome, None, 0.0)
        ref, _ = tr.reference(b)
        lora_inputs: list[torch.dtype] = []
        handles = [
            m.register_forward_pre_hook(lambda mod, a, acc=lora_inputs: acc.append(a[0].dtype))
            for n, m in tr.model.named_modules()
            if n.endswith("lora_A.default")
        ]
        tr.opt.step = lambda *a, **k: None  # type: ignore[method-assign]  # keep the weights for comparison
        tr.update(b, adv, ref)
        for h in handles:
            h.remove()
        if not lean:  # (the lean forward calls the LoRA weights directly: no module hooks fire)
            assert lora_inputs and set(lora_inputs) == {torch.bfloat16 if autocast else torch.float32}
        assert all(p.dtype == torch.float32 and p.grad is not None for p in tr.params)
        grads[autocast, lean] = torch.cat([p.grad.flatten() for p in tr.params])
        tr.model.unload()  # give the base model back for the next trainer
    for key in ((True, False), (True, True)):
        assert grads[key].norm() > 0
        cos = torch.nn.functional.cosine_similarity(grads[key], grads[False, False], dim=0)
        assert cos > 0.99, (key, float(cos))


def test_micro_batches_cover_every_token() -> None:
    from saereward.rl.batching import micro_batches

    # left-padded prompts (P = 4) and responses of different lengths, padded on the right
    am = torch.tensor(
        [
            [0, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 1, 1, 1, 0],
        ]
    )
    P = 4
    for size in (0, 1, 2, 3, 5, 9):
        sl = micro_batches(am, P, size)
        rows = torch.cat([s.rows for s in sl]).sort().values
        assert rows.tolist() == list(range(5))  # a partition of the rows
        assert all(len(s.rows) <= (size or 5) for s in sl)
        for s in sl:
            assert s.start <= P - 1 < P < s.end  # at least one response column, prompt's last kept
            outside = am[s.rows].clone()
            outside[:, s.start : s.end] = 0
            assert outside.sum() == 0  # no real token is cut off
    # sorted by length: the two shortest rows share the first micro-batch of two
    assert micro_batches(am, P, 2)[0].rows.tolist() == [0, 2]
    assert [(s.start, s.end) for s in micro_batches(am, P, 2)] == [(1, 6), (1, 8), (0, 9)]
    # a cap on response positions (rows x response columns): widths 1, 2, 3, 4, 5 here
    for size, cap in ((0, 1), (0, 4), (0, 6), (3, 100), (2, 6)):
        sl = micro_batches(am, P, size, max_tokens=cap)
        assert sorted(torch.cat([s.rows for s in sl]).tolist()) == list(range(5))
        for s in sl:
            assert len(s.rows) <= (size or 5)
            assert len(s.rows) == 1 or len(s.rows) * (s.end - P) <= cap
    assert [s.rows.tolist() for s in micro_batches(am, P, 0, max_tokens=8)] == [[0, 2], [3, 4], [1]]


def _ragged_batch(tr: GRPOTrainer) -> Any:
    """Non-zero LoRA B weights, then step 0's 6 rollouts with responses ended at different lengths,
    as end tokens do (the tiny model never emits one)."""
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    b = tr._rollouts(0)
    for i, n in enumerate([8, 3, 5, 8, 2, 6]):
        for m in (b.attention_mask, b.response_mask, b.residual_mask):
            m[i, b.prompt_len + n :] = 0
    return b


@pytest.mark.parametrize("epochs", [1, 2])
def test_micro_batched_update_equals_whole_batch(tmp_path: Path, epochs: int) -> None:
    """Gradient accumulation over length-sorted, column-trimmed micro-batches = one padded forward."""
    pack = str(tiny_pack(tmp_path))
    lm = fresh_tiny()
    out: dict[int, Any] = {}
    # 0: the whole batch; 2: micro-batches of 2; 1: of at most 12 response positions (3, 1, 1 and 1 rows)
    for mb in (0, 2, 1):
        torch.manual_seed(0)
        tr = GRPOTrainer(
            rl_cfg(
                tmp_path / f"mb{mb}",
                reward="sae",
                pack=pack,
                lam=0.5,
                micro_batch=mb if mb != 1 else 0,
                micro_batch_tokens=12 if mb == 1 else 0,
                epochs_per_batch=epochs,
                reward_source="reference",
                max_new_tokens=8,
                lr=1e-6,  # Adam's first step is ~lr * sign(g), noise where g ~ 0: keep it off epoch 2
            ),
            lm=lm,
        )
        b = _ragged_batch(tr)
        ref, res = tr.reference(b)
        outcome = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
        adv, *_ = tr.advantages(b, outcome, res, 0.5)
        loss, stats, gnorm, ent = tr.update(b, adv, ref)
        out[mb] = (
            ref,
            res,
            float(loss),
            stats,
            gnorm,
            ent,
            {n: (p.detach().clone(), p.grad.clone()) for n, p in tr._lora_state().items()},
        )
        tr.model.unload()
    from saereward.rl.batching import micro_batches

    assert [len(s.rows) for s in micro_batches(b.attention_mask, b.prompt_len, 0, 12)] == [3, 1, 1, 1]
    for other in (2, 1):
        _assert_same_accumulated_update(b, out[0], out[other])


def _assert_same_accumulated_update(b: Any, whole: tuple[Any, ...], split: tuple[Any, ...]) -> None:
    (r0, s0, l0, st0, g0, e0, w0), (r2, s2, l2, st2, g2, e2, w2) = whole, split
    resp = b.response_mask[:, b.prompt_len :]  # log-probs past a response's end are 0 when trimmed
    torch.testing.assert_close(r2[resp], r0[resp], rtol=1e-5, atol=1e-5)
    real = b.attention_mask.bool()  # the reference residuals at real tokens (trimmed columns are 0)
    torch.testing.assert_close(s2[real], s0[real], rtol=1e-5, atol=1e-5)
    assert l2 == pytest.approx(l0, rel=1e-4, abs=1e-6) and g2 == pytest.approx(g0, rel=1e-4)
    assert e2 == pytest.approx(e0, rel=1e-5) and st2["kl"] == pytest.approx(st0["kl"], rel=1e-4, abs=1e-9)
    for n in w0:
        (p0, g0_), (p2, g2_) = w0[n], w2[n]
        scale = float(g0_.abs().max())
        torch.testing.assert_close(g2_, g0_, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=n)
        clear = g0_.abs() > 1e-3 * scale  # Adam's early steps are ~lr * sign(g): noise around g = 0
        torch.testing.assert_close(p2[clear], p0[clear], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("micro_batch", [0, 2, 4])
def test_shared_prompt_forward_equals_one_pass(
    tmp_path: Path, micro_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each prompt run once with its KV cache gathered to its completions = every row run whole:
    the same reference log-probs, loss, entropy and LoRA gradients (float rounding apart)."""
    from saereward.rl import grpo

    built: list[bool] = []
    init = grpo.PromptPrefix.__init__

    def counting_init(self: Any, model: Any, b: Any, *, grad: bool, recompute: bool = False) -> None:
        built.append(grad)
        init(self, model, b, grad=grad, recompute=recompute)

    monkeypatch.setattr(grpo.PromptPrefix, "__init__", counting_init)
    lm = fresh_tiny()
    out: dict[bool, Any] = {}
    for share in (False, True):
        torch.manual_seed(0)
        tr = GRPOTrainer(
            rl_cfg(tmp_path / f"s{share}", micro_batch=micro_batch, share_prompt=share, max_new_tokens=8),
            lm=lm,
        )
        b, _, out[share] = _ragged_update(tr)
    assert built == [False, True]  # the shared run built one prefix for the reference, one for training
    _assert_same_update(b, out[False], out[True])


def test_reference_micro_batch_sizes_the_reference_forward_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``reference_micro_batch`` cuts the reference forward (the update keeps ``micro_batch``), to the
    same reference log-probs up to float rounding; -1 keeps ``micro_batch`` for both."""
    from saereward.rl import grpo

    sizes: list[int] = []
    real = grpo.micro_batches

    def spy(mask: torch.Tensor, prompt_len: int, size: int, max_tokens: int = 0) -> Any:
        sizes.append(size)
        return real(mask, prompt_len, size, max_tokens)

    monkeypatch.setattr(grpo, "micro_batches", spy)
    lm = fresh_tiny()
    refs = []
    for ref_mb in (-1, 0):
        torch.manual_seed(0)
        tr = GRPOTrainer(
            rl_cfg(tmp_path / f"m{ref_mb}", micro_batch=2, reference_micro_batch=ref_mb, max_new_tokens=8),
            lm=lm,
        )
        b = _ragged_batch(tr)
        sizes.clear()
        ref, _ = tr.reference(b)
        adv = torch.linspace(-1, 1, 6)[:, None].expand(6, ref.shape[1]).contiguous()
        tr.update(b, adv, ref)
        assert sizes == [2 if ref_mb < 0 else ref_mb, 2]  # reference, then the update
        refs.append(ref[b.response_mask[:, b.prompt_len :].bool()])  # a forward's padding differs
        tr.model.unload()
    assert refs[0].numel() > 0
    torch.testing.assert_close(refs[1], refs[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reference_micro_batch"):
        GRPOConfig(reference_micro_batch=-2)


def test_mmap_threshold_reaches_glibc_and_leaves_resume_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer fixes glibc's mmap threshold at ``mmap_threshold_kib``; out-of-range values are
    refused; a run resumes under other memory settings (they change no value a step computes)."""
    from saereward.config import to_dict
    from saereward.rl import grpo
    from saereward.rl.checkpoint import settings_diff

    asked: list[int] = []
    monkeypatch.setattr(grpo, "mmap_large_allocations", lambda threshold: asked.append(threshold) or True)
    GRPOTrainer(rl_cfg(tmp_path / "a", mmap_threshold_kib=1024), lm=fresh_tiny(), check_only=True)
    GRPOTrainer(rl_cfg(tmp_path / "b", mmap_large_allocations=False), lm=fresh_tiny(), check_only=True)
    assert asked == [1 << 20]
    for bad in (63, 32769):
        with pytest.raises(ValueError, match="mmap_threshold_kib"):
            GRPOConfig(mmap_threshold_kib=bad)
    cfg = GRPOConfig(mmap_threshold_kib=512, mmap_large_allocations=False)
    assert settings_diff(to_dict(GRPOConfig()), cfg) == []


def test_min_new_tokens_fixes_the_completion_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``min_new_tokens = max_new_tokens``: the rollouts' sampler gets it, and every rollout runs the
    full length (fixed-work timing)."""
    from saereward.rl import grpo

    for bad in (-1, 6):
        with pytest.raises(ValueError, match="min_new_tokens"):
            GRPOConfig(max_new_tokens=5, min_new_tokens=bad)
    asked: list[int] = []
    real = grpo.generate_batch
    monkeypatch.setattr(
        grpo, "generate_batch", lambda lm, p, s, **kw: asked.append(s.min_new_tokens) or real(lm, p, s, **kw)
    )
    fixed = GRPOTrainer(rl_cfg(tmp_path / "b", steps=1, min_new_tokens=5), lm=fresh_tiny()).step(0)
    assert asked == [5] and fixed["completion_len"] == 5.0


def _ragged_update(tr: GRPOTrainer) -> tuple[Any, Any, tuple[Any, ...]]:
    """The reference forward and one update on :func:`_ragged_batch`, then the adapters unloaded:
    ``(batch, reference residuals, (reference log-probs, loss, grad norm, entropy, KL, LoRA gradients))``."""
    b = _ragged_batch(tr)
    ref, res = tr.reference(b)
    adv = torch.linspace(-1, 1, 6)[:, None].expand(6, ref.shape[1]).contiguous()
    loss, stats, gnorm, ent = tr.update(b, adv, ref)
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    tr.model.unload()
    return b, res, (ref, float(loss), gnorm, ent, stats["kl"], grads)


def _assert_same_update(b: Any, base: tuple[Any, ...], other: tuple[Any, ...]) -> None:
    """Two updates of batch ``b``, each ``(reference log-probs, loss, grad norm, entropy, KL, LoRA
    gradients)``, agree up to float rounding."""
    (r0, l0, g0, e0, k0, w0), (r1, l1, g1, e1, k1, w1) = base, other
    resp = b.response_mask[:, b.prompt_len :]
    assert resp.sum() > 0 and (r0[resp] != 0).all()
    torch.testing.assert_close(r1[resp], r0[resp], rtol=1e-5, atol=1e-5)
    assert l1 == pytest.approx(l0, rel=1e-4, abs=1e-6) and g1 == pytest.approx(g0, rel=1e-4)
    assert e1 == pytest.approx(e0, rel=1e-5) and k1 == pytest.approx(k0, rel=1e-4, abs=1e-9)
    assert w0.keys() == w1.keys() and w0
    for n in w0:
        scale = float(w0[n].abs().max())
        torch.testing.assert_close(w1[n], w0[n], rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=n)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_logps_from_the_head_weight_equal_the_logits_path(
    tmp_path: Path, share_prompt: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's log-probs from the hidden states and the frozen head (never the logits) = from the
    model's logits: reference log-probs and captured residuals, loss, entropy, KL, LoRA gradients."""
    from saereward.rl import grpo

    pack = str(tiny_pack(tmp_path))
    lm = fresh_tiny()
    out: dict[bool, Any] = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(grpo, "plain_fp32_head", lambda model: None)
        torch.manual_seed(0)
        cfg = rl_cfg(
            tmp_path / f"f{fused}",
            reward="sae",
            pack=pack,
            reward_source="reference",  # the reference forward captures residuals too
            micro_batch=2,
            share_prompt=share_prompt,
            max_new_tokens=8,
        )
        tr = GRPOTrainer(cfg, lm=lm)
        assert (grpo.plain_fp32_head(tr.model) is not None) == fused
        b, res, update = _ragged_update(tr)
        out[fused] = (res, update)
    torch.testing.assert_close(out[True][0], out[False][0])  # the residuals the reference captured
    _assert_same_update(b, out[False][1], out[True][1])


def test_plain_fp32_head_only_where_the_logits_are_the_heads() -> None:
    from saereward.rl.patches import head_returns_hidden, plain_fp32_head
    from tiny_models import make_tiny

    model = fresh_tiny().model
    assert plain_fp32_head(model) is None  # a trainable head: its gradient is not computed there
    model.requires_grad_(False)  # frozen, as under LoRA
    w, bias = plain_fp32_head(model)
    assert w is model.get_output_embeddings().weight and bias is None
    with head_returns_hidden(model):
        ids = torch.tensor([[3, 4, 5, 6]])
        h = model(input_ids=ids, logits_to_keep=2).logits
        assert h.shape == (1, 2, model.config.hidden_size)
    assert "forward" not in model.get_output_embeddings().__dict__  # restored
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    gpt2, _ = make_tiny("gpt2")
    assert plain_fp32_head(gpt2.requires_grad_(False)) is None  # an architecture not known to be plain
    assert plain_fp32_head(fresh_tiny().model.requires_grad_(False).to(torch.bfloat16)) is None
    patched = fresh_tiny().model.requires_grad_(False)
    patched.get_output_embeddings().forward = lambda x: x  # e.g. an accelerate hook
    assert plain_fp32_head(patched) is None


def test_silu_mul_saves_less_and_equals_autograd_bit_for_bit() -> None:
    """The lean MLP activation: the same output and input gradients as autograd's ``silu(g) * u`` bit
    for bit, with two saved tensors instead of three."""
    from saereward.rl.rebuild import _silu_mul_sharing, _SiluMul

    g0, u0, grad = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(0)).unbind(0)
    results = []
    for fn in (lambda g, u: torch.nn.functional.silu(g) * u, _SiluMul.apply):
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        saved: set[int] = set()

        def pack(t: torch.Tensor, saved: set[int] = saved) -> torch.Tensor:
            saved.add(t.data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn(g, u)
        y.backward(grad)
        results.append((y.detach(), g.grad, u.grad, len(saved)))
    (y0, dg0, du0, n0), (y1, dg1, du1, n1) = results
    assert torch.equal(y1, y0) and torch.equal(dg1, dg0) and torch.equal(du1, du0)
    assert (n0, n1) == (3, 2)
    u1 = u0.clone().requires_grad_()
    _SiluMul.apply(g0, u1).backward(grad)  # only the input that needs a gradient gets one
    assert torch.equal(u1.grad, du0)
    # silu(g) left by the product's rebuild is used once (popped), with the same result
    g2, u2 = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    share: dict[str, torch.Tensor] = {}
    y2 = _SiluMul.apply(g2, u2, share)
    assert torch.equal(_silu_mul_sharing(g0, u0, share), y2.detach()) and "silu" in share
    y2.backward(grad)
    assert not share and torch.equal(g2.grad, dg0) and torch.equal(u2.grad, du0)


def test_lean_mlp_patches_only_gated_silu_mlps() -> None:
    from saereward.rl.rebuild import install_lean_mlp
    from tiny_models import make_tiny

    model = fresh_tiny().model
    layers = model.model.layers
    layers[0].mlp.act_fn = torch.nn.GELU()  # another activation: left alone
    assert install_lean_mlp(model) == len(layers) - 1
    assert "forward" not in layers[0].mlp.__dict__ and "forward" in layers[1].mlp.__dict__
    assert install_lean_mlp(model) == 0  # already patched
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        plain = fresh_tiny().model
        plain.model.layers[0].mlp.act_fn = torch.nn.GELU()
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    gpt2, _ = make_tiny("gpt2")
    assert install_lean_mlp(gpt2) == 0


@pytest.mark.parametrize("patch", ["install_lean_mlp", "cpu_sdpa_gqa"])
def test_training_memory_patches_keep_the_update(
    tmp_path: Path, patch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer with the lean MLP activation or grouped-head SDPA = without it: reference log-probs,
    loss, entropy, KL and LoRA gradients (rounding apart) on the tiny GQA llama (4 query, 2 KV heads)."""
    from saereward.rl import grpo

    lm = fresh_tiny()
    assert lm.model.config.num_key_value_heads < lm.model.config.num_attention_heads
    calls: list[bool] = []
    real = getattr(grpo, patch)
    out: dict[bool, Any] = {}
    for on in (False, True):
        if on:
            monkeypatch.setattr(grpo, patch, lambda *a: calls.append(True) or real(*a))
        else:
            monkeypatch.setattr(
                grpo, patch, (lambda m: 0) if patch == "install_lean_mlp" else contextlib.nullcontext
            )
        torch.manual_seed(0)
        tr = GRPOTrainer(rl_cfg(tmp_path / f"p{on}", micro_batch=2, max_new_tokens=8), lm=lm)
        b, _, out[on] = _ragged_update(tr)
    assert calls
    _assert_same_update(b, out[False], out[True])


def _assert_identical_update(base: tuple[Any, ...], other: tuple[Any, ...]) -> None:
    """Two :func:`_ragged_update` results equal bit for bit: reference log-probs, loss, grad norm,
    entropy, KL and every LoRA gradient."""
    (r0, l0, g0, e0, k0, w0), (r1, l1, g1, e1, k1, w1) = base, other
    assert torch.equal(r0, r1) and (l0, g0, e0, k0) == (l1, g1, e1, k1)
    assert w0.keys() == w1.keys() and w0 and all(torch.equal(w0[n], w1[n]) for n in w0)


@pytest.mark.parametrize("recompute_prompt", [False, True])
def test_gradient_checkpointing_keeps_the_update(tmp_path: Path, recompute_prompt: bool) -> None:
    """``grad_checkpointing``: the update's forwards run again in the backward, on the tiny GQA llama
    (4 query, 2 KV heads); reference log-probs, loss, entropy, KL and LoRA gradients are the ones
    without it (rounding apart). The recompute takes the forward's grouped-head attention path."""
    lm = fresh_tiny()
    assert lm.model.config.num_key_value_heads < lm.model.config.num_attention_heads
    out: dict[bool, Any] = {}
    for on in (False, True):
        torch.manual_seed(0)
        cfg = rl_cfg(
            tmp_path / f"c{on}",
            micro_batch=2,
            max_new_tokens=8,
            grad_checkpointing=on,
            recompute_prompt=recompute_prompt,
        )
        tr = GRPOTrainer(cfg, lm=lm)
        b, _, out[on] = _ragged_update(tr)
        assert not tr.model.is_activation_checkpointing  # switched off again after the update
    _assert_same_update(b, out[False], out[True])


def _floats_saved(run: Any) -> int:
    """Floating-point elements that autograd saves for the backward while ``run()`` runs."""
    n = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        n[0] += t.numel() * t.is_floating_point()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return n[0]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_recomputed_prompt_keeps_the_update_bit_for_bit(tmp_path: Path, dropout: float) -> None:
    """``recompute_prompt``: the shared prompt forward of the update keeps no activations and runs
    again in the backward; reference log-probs, loss, entropy, KL and LoRA gradients are equal bit for
    bit, LoRA dropout included (the recompute replays the forward's random state)."""
    from saereward.rl import grpo

    lm = fresh_tiny()
    out: dict[bool, Any] = {}
    saved: dict[bool, int] = {}
    for on in (False, True):
        torch.manual_seed(0)
        cfg = rl_cfg(
            tmp_path / f"r{on}", micro_batch=2, max_new_tokens=8, lora_dropout=dropout, recompute_prompt=on
        )
        tr = GRPOTrainer(cfg, lm=lm)
        b = _ragged_batch(tr)
        # with recompute, the checkpoint saves the token ids, mask and positions only
        saved[on] = _floats_saved(lambda: grpo.PromptPrefix(tr.model, b, grad=True, recompute=on))  # noqa: B023
        b, _, update = _ragged_update(tr)
        out[on] = (*update, torch.rand(1))
    assert saved[False] > 0 and saved[True] == 0  # the prompt's graph holds no activations
    _assert_identical_update(out[False][:-1], out[True][:-1])
    # the recompute leaves the random stream where the forward left it
    assert torch.equal(out[False][-1], out[True][-1])


def _storage_refs(modules: list[Any], products: list[Any], output: bool) -> list[Any]:
    """Forward hooks that append a weak reference to each module's input (or output) storage."""

    def keep(m: Any, a: Any, o: Any = None) -> None:
        products.append((o if output else a[0]).untyped_storage()._weak_ref())

    if output:
        return [m.register_forward_hook(keep) for m in modules]
    return [m.register_forward_pre_hook(keep) for m in modules]


@pytest.mark.parametrize("what", ["mlp_product", "norm_outputs"])
def test_rebuilt_activations_keep_the_update_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """Activations that LoRA's ``A`` saves for its weight gradient, rebuilt in the backward instead:
    the gated MLP's ``silu(g)·u`` (from ``g`` and ``u``) and each decoder layer's RMSNorm outputs (from
    the norm's input, through the lean LoRA forward). Each is freed once the forward is done (kept until the backward without the
    rebuild); the update's loss, grad norm, entropy, KL and every LoRA gradient are equal bit for bit.
    Under an outer saved-tensor hook (a checkpoint's) they are saved as usual."""
    from saereward.model.lm import decoder_layers
    from saereward.rl import rebuild

    own, real_make = rebuild._hooks_free, rebuild._Maker.__call__
    lm = fresh_tiny()
    out: dict[bool, Any] = {}
    for on in (False, True):
        monkeypatch.setattr(rebuild, "_hooks_free", own if on else (lambda: False))
        torch.manual_seed(0)
        cfg = rl_cfg(
            tmp_path / f"d{on}", micro_batch=2, max_new_tokens=8, rebuild_norms=what != "mlp_product"
        )
        tr = GRPOTrainer(cfg, lm=lm)
        layers = decoder_layers(tr.model)
        norms = [n for la in layers for n in (la.input_layernorm, la.post_attention_layernorm)]
        assert all(("forward" in n.__dict__) == cfg.rebuild_norms for n in norms)
        if what == "mlp_product":
            modules, output = [la.mlp.down_proj for la in layers], False
        else:
            modules, output = norms, True
        products: list[Any] = []
        hooks = _storage_refs(modules, products, output)
        for outer in (False, True):
            products.clear()
            ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
            with ctx if outer else contextlib.nullcontext():
                logits = tr.model(input_ids=torch.randint(3, 100, (2, 7))).logits
            assert len(products) == len(modules)
            assert all(torch.UntypedStorage._expired(p) == (on and not outer) for p in products)
            logits.sum().backward()
            tr.model.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
        made: list[int] = []

        def counted(self: Any, made: list[int] = made) -> torch.Tensor:
            made.append(1)
            return real_make(self)

        monkeypatch.setattr(rebuild._Maker, "__call__", counted)
        out[on] = _ragged_update(tr)[2]
        # the update rebuilt the MLPs' activations (and the norms': 3 per layer), for each micro-batch
        per_layer = 1 + 2 * cfg.rebuild_norms
        assert len(made) >= (per_layer * len(layers) if on else 0) and (len(made) > 0) == on
    _assert_identical_update(out[False], out[True])
    assert any("down_proj" in n for n in out[True][-1]) and any("q_proj" in n for n in out[True][-1])


def test_rebuilt_norm_output_checks_layout_and_in_place_edits() -> None:
    """A lean norm tags its output only under autograd with no other saved-tensor hook; the rebuild
    refuses a layout other than the forward's and an input edited in place since the forward (an
    error, never a wrong gradient); tensors other than the tagged one are saved as they are."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from saereward.rl import rebuild

    norm = LlamaRMSNorm(6)
    assert rebuild.install_lean_norms(torch.nn.Sequential(norm)) == 1
    x = torch.randn(3, 6, requires_grad=True)
    with torch.no_grad():
        assert not hasattr(norm(x), rebuild._TAG)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not hasattr(norm(x), rebuild._TAG)
    w = torch.randn(4, 6, requires_grad=True)
    grads = []
    for rebuilt in (False, True):
        h = x * 1.0
        y = norm(h)
        with rebuild.rebuilt_input(y) if rebuilt else contextlib.nullcontext():
            z = torch.nn.functional.linear(y, w)
        z.square().sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
        x.grad, w.grad = None, None
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    h = x * 1.0
    y = norm(h)
    with rebuild.rebuilt_input(y):
        z = torch.nn.functional.linear(y, w)
    with torch.no_grad():
        h.add_(1.0)  # an in-place edit the norm's own saved input would also catch
    with pytest.raises(RuntimeError, match="modified"):
        z.sum().backward()
    bad = rebuild._Maker(lambda: torch.ones(6, 4).t(), torch.ones(4, 6))  # same values, transposed
    with pytest.raises(RuntimeError, match="layout"):
        bad()


def test_cpu_sdpa_gqa_is_undone_after_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations import sdpa_attention

    from saereward.rl import patches
    from saereward.rl.patches import cpu_sdpa_gqa

    own = sdpa_attention.use_gqa_in_sdpa
    k = torch.zeros(1, 2, 3, 4)
    with cpu_sdpa_gqa():
        assert sdpa_attention.use_gqa_in_sdpa(torch.ones(1, 1, 3, 3, dtype=torch.bool), k, k)
    assert sdpa_attention.use_gqa_in_sdpa is own
    assert not own(torch.ones(1, 1, 3, 3, dtype=torch.bool), k, k)  # transformers' own rule on CPU
    monkeypatch.setattr(patches, "_torch_version", lambda: (2, 4))  # no enable_gqa before PyTorch 2.5
    with cpu_sdpa_gqa():
        assert sdpa_attention.use_gqa_in_sdpa is own


def test_lean_lora_forward_matches_peft(tmp_path: Path) -> None:
    """Same outputs and LoRA gradients as PEFT's forward; PEFT's path when adapters are off or merged."""
    from saereward.rl.patches import install_lean_lora, merged_lora

    ids = torch.randint(3, 100, (3, 9))
    res = {}
    for lean in (False, True):
        torch.manual_seed(0)
        tr = GRPOTrainer(rl_cfg(tmp_path / f"l{lean}", lean_lora=lean), lm=fresh_tiny())
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        patched = [m for m in tr.model.modules() if getattr(m, "_saereward_lean", False)]
        assert bool(patched) is lean
        logits = tr.model(input_ids=ids).logits
        logits.square().mean().backward()
        with torch.no_grad(), tr.model.disable_adapter():
            base = tr.model(input_ids=ids).logits
        with torch.no_grad(), merged_lora(tr.model):
            merged = tr.model(input_ids=ids).logits
        res[lean] = (logits.detach(), base, merged, {n: p.grad.clone() for n, p in tr._lora_state().items()})
        from peft.tuners.lora import Linear as LoraLinear

        n_lora = sum(isinstance(m, LoraLinear) for m in tr.model.modules())
        assert install_lean_lora(tr.model) == (0 if lean else n_lora)  # patches each layer once
    (l0, b0, m0, g0), (l1, b1, m1, g1) = res[False], res[True]
    assert torch.equal(m1, m0)  # merged: PEFT's path on both
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert torch.equal(b1, b0)  # adapters disabled: PEFT's own path, the base model
    torch.testing.assert_close(m1, l1, rtol=1e-4, atol=1e-4)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lean_lora_sums_in_place_only_into_an_output_no_one_else_holds(tmp_path: Path) -> None:
    """The adapter's product goes into a plain base layer's output in place; a base layer with a hook
    (which may keep its output) gets an out-of-place sum, so what the hook kept is the base output."""
    from peft.tuners.lora import Linear as LoraLinear

    torch.manual_seed(0)
    tr = GRPOTrainer(rl_cfg(tmp_path / "h"), lm=fresh_tiny())
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    m = next(m for m in tr.model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(2, 5, m.base_layer.in_features)
    with torch.no_grad():
        plain = m(x)
        kept: list[torch.Tensor] = []
        hook = m.base_layer.register_forward_hook(lambda mod, a, out: kept.append(out))
        hooked = m(x)
        hook.remove()
        base = m.base_layer(x.reshape(-1, x.shape[-1]))
    assert (
        torch.equal(plain, hooked)
        and torch.equal(kept[0], base)
        and not torch.equal(plain.flatten(0, 1), base)
    )


def test_skinny_linear_same_products_and_restored() -> None:
    from saereward.rl.patches import skinny_linear

    lm = fresh_tiny()
    model = lm.model
    lin = torch.nn.Linear(8, 5)
    ids = torch.randint(3, 100, (2, 1))
    few, many = torch.randn(3, 8), torch.randn(200, 8)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        ref_few, ref_many = lin(few), lin(many)
        with skinny_linear(model), skinny_linear(lin, max_rows=4):
            skinny = model(input_ids=ids).logits
            assert "forward" in lin.__dict__
            torch.testing.assert_close(lin(few), ref_few)  # W @ x^T + bias, 3 rows
            assert torch.equal(lin(many), ref_many)  # over max_rows: F.linear itself
        assert "forward" not in lin.__dict__  # restored
    torch.testing.assert_close(skinny, base, rtol=1e-5, atol=1e-5)
    with skinny_linear(lin, max_rows=4):  # under autograd: F.linear (its backward)
        x = few.clone().requires_grad_()
        lin(x).sum().backward()
        assert x.grad is not None


def test_packed_reference_on_mapped_weights_matches_plain_products(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``packed_reference``: with the base weights in the checkpoint's file mapping the reference forward
    runs every decoder projection on packed weights (one oneDNN product per projection call), each
    weight handed to ``drop_mapped_pages`` once, to the plain products' log-probs up to float rounding;
    afterwards no projection keeps a patched forward and the weights hold the same bits. With
    ``packed_in_place`` the free heap goes back to the OS once, after the reference, not after the
    rollouts (the reference's copy reuses theirs). Weights in the process's own memory, or the option
    off: plain products only."""
    from transformers import AutoModelForCausalLM

    from saereward.model import onednn, residency
    from saereward.model.lm import LoadedModel, decoder_layers
    from tiny_models import char_tokenizer, make_tiny

    if not onednn.available(torch.float32):
        pytest.skip("this torch build has no oneDNN packed linear")
    make_tiny("llama")[0].save_pretrained(tmp_path / "ckpt")
    calls, dropped, trims = [], [], []
    real_linear, real_drop, real_trim = (
        onednn.linear,
        residency.drop_mapped_pages,
        residency.return_free_memory,
    )
    monkeypatch.setattr(residency, "return_free_memory", lambda: trims.append(1) or real_trim())
    monkeypatch.setattr(onednn, "linear", lambda *a, **k: calls.append(1) or real_linear(*a, **k))
    monkeypatch.setattr(
        residency, "drop_mapped_pages", lambda ts, *a: real_drop((t for t in ts if not dropped.append(1)), *a)
    )
    refs = {}
    cases = (("plain", False, True, False), ("packed", True, True, False), ("own", True, False, False))
    for name, packed, mapped, in_place in (*cases, ("released", True, True, True)):
        if mapped:
            model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
        else:
            model = make_tiny("llama")[0]
        lm = LoadedModel(model=model, tokenizer=char_tokenizer(), spec="tiny", source="hf", path="")
        torch.manual_seed(0)
        cfg = rl_cfg(tmp_path / name, packed_reference=packed, packed_in_place=in_place, max_new_tokens=8)
        tr = GRPOTrainer(cfg, lm=lm)
        trims.clear()
        b = _ragged_batch(tr)
        assert trims == []
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        calls.clear()
        dropped.clear()
        ref, _ = tr.reference(b)
        assert len(trims) == in_place
        blocks = decoder_layers(tr.model)
        n_proj = sum(
            1
            for blk in blocks
            for n, m in blk.named_modules()
            if type(m) is torch.nn.Linear and "lora_" not in n
        )
        if packed and mapped:
            assert n_proj == 7 * len(blocks) and len(dropped) == n_proj
            assert len(calls) >= n_proj
        else:
            assert calls == [] and dropped == []
        assert not any("forward" in m.__dict__ for m in tr.model.modules() if type(m) is torch.nn.Linear)
        assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
        refs[name] = ref[b.response_mask[:, b.prompt_len :].bool()]
    assert refs["plain"].numel() > 0
    torch.testing.assert_close(refs["packed"], refs["plain"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(refs["own"], refs["plain"], rtol=1e-5, atol=1e-5)
