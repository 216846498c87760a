"""Gate G2 on synthetic run folders: paired differences, collapse, question order, bootstrap, warnings.

Each test writes finished GRPO run folders by hand (``config.json`` as the trainer saves it,
``train_log.jsonl`` with a step-0 and a final evaluation carrying ``eval_bits``, ``summary.json``
with ``eval_qids`` and ``collapse``), so :func:`run_gate_g2` reuses them and trains nothing: the
``lm_factory`` given raises if it is ever asked for a model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from saereward.config import to_dict
from saereward.errors import SaeRewardError
from saereward.gates.g2_rl_ablation import LABELS, GateG2Config, _finished, format_g2, run_gate_g2
from saereward.gates.paired import bootstrap_means, paired_compare, two_level_bootstrap
from saereward.io import write_json, write_jsonl
from saereward.rl.config import GRPOConfig

Q = 10
QIDS = [f"q{i}" for i in range(Q)]
STEPS = 4


def no_training() -> Any:
    raise AssertionError("G2 tried to train: the synthetic run folders were not reused")


def write_pack(folder: Path, **meta: Any) -> Path:
    path = folder / "pack.json"
    write_json(
        path,
        {
            "name": "t",
            "helpful_features": [{"feature_id": 1, "weight": 1.0}],
            "harmful_features": [{"feature_id": 2, "weight": -1.0}],
            "metadata": {"target_layer": 1, **meta},
        },
    )
    return path


def gate_cfg(
    tmp_path: Path, seeds: tuple[int, ...] = (0, 1), pack_meta: dict[str, Any] | None = None, **kw: Any
):
    pack = write_pack(tmp_path, **(pack_meta or {}))
    rl = GRPOConfig(
        steps=STEPS,
        n_eval=Q,
        pack=str(pack),
        direction_rollouts=str(tmp_path / "ro"),
        threads=1,
        progress=False,
    )
    return GateG2Config(seeds=seeds, out=str(tmp_path / "g2"), rl=rl, min_seeds=len(seeds), n_boot=500, **kw)


def _eval(bits: str) -> dict[str, Any]:
    k = bits.count("1")
    return {"eval_accuracy": k / len(bits), "eval_correct": k, "eval_n": len(bits), "eval_bits": bits}


def write_run(
    cfg: GateG2Config,
    reward: str,
    seed: int,
    final: str,
    start: str = "0" * Q,
    *,
    collapsed_at: int | None = None,
    length: float = 40.0,
    qids: list[str] | None = None,
    bits: bool = True,
) -> Path:
    """One finished run folder; a collapsed run stops at ``collapsed_at`` with 2-token completions."""
    run = Path(cfg.out) / f"{LABELS[reward]}_{reward}_seed{seed}"
    rcfg = dataclasses.replace(cfg.rl, reward=reward, seed=seed, out=str(run))  # type: ignore[arg-type]
    write_json(run / "config.json", to_dict(rcfg))
    stop = collapsed_at or STEPS
    rows: list[dict[str, Any]] = [{"step": 0, **_eval(start)}]
    for s in range(1, stop + 1):
        ln = 2.0 if collapsed_at and s == stop else length
        row: dict[str, Any] = {"step": s, "outcome": 0.5, "completion_len": ln, "short_frac": float(ln <= 3)}
        rows.append({**row, **_eval(final)} if s == stop else row)
    if not bits:
        rows = [{k: v for k, v in r.items() if k != "eval_bits"} for r in rows]
    write_jsonl(run / "train_log.jsonl", rows)
    summary: dict[str, Any] = {
        "reward": reward,
        "seed": seed,
        "steps": STEPS,
        "steps_done": stop,
        "prompt_format": cfg.rl.prompt_format,
        "reward_form": "sum",
        "collapse": {
            "collapsed": collapsed_at is not None,
            "step": collapsed_at,
            "reason": "completions of <= 3 tokens" if collapsed_at else None,
        },
    }
    if bits:
        summary["eval_qids"] = qids or QIDS
    write_json(run / "summary.json", summary)
    return run


def write_all(cfg: GateG2Config, bits: dict[str, list[str]], **kw: dict[str, Any]) -> None:
    """``bits[reward][i]`` is seed ``cfg.seeds[i]``'s final correctness; ``kw[reward]`` extra settings."""
    for reward, per_seed in bits.items():
        for seed, b in zip(cfg.seeds, per_seed, strict=True):
            write_run(cfg, reward, seed, b, **kw.get(reward, {}))


# R1 right where R0 is wrong on 6 (seed, question) pairs, the reverse on 1: mean diff 5/20
R0_BITS = ["1100000000", "1011000000"]
R1_BITS = ["1011110000", "1011110000"]
R2_BITS = ["1000000000", "1000000000"]


def naive_bootstrap(diff: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The two-level bootstrap by its definition: the mean of the sub-matrix of drawn seeds × questions."""
    rng = np.random.default_rng(seed)
    n_s, n_q = diff.shape
    seeds = rng.integers(0, n_s, size=(n_boot, n_s))
    qs = rng.integers(0, n_q, size=(n_boot, n_q))
    return np.array([diff[np.ix_(seeds[b], qs[b])].mean() for b in range(n_boot)])


def test_paired_difference_ci_and_mcnemar_match_hand_computation(tmp_path: Path) -> None:
    cfg = gate_cfg(tmp_path)
    write_all(cfg, {"outcome": R0_BITS, "sae": R1_BITS, "direction": R2_BITS})
    res = run_gate_g2(cfg, lm_factory=no_training)
    d = res["paired"]["R1-R0"]
    # seed 0: R1-only at q3,q4,q5 and q2 (4), R0-only at q1 (1); seed 1: R1-only at q4,q5 (2), none reversed
    assert (d["a_only"], d["b_only"]) == (6, 1)
    assert d["mean_diff"] == pytest.approx(5 / 20)
    assert d["per_seed_diff"] == pytest.approx([3 / 10, 2 / 10])
    # exact McNemar: 2 * P(Binomial(7, 1/2) <= 1) = 2 * (1 + 7) / 128
    assert d["p_value"] == pytest.approx(16 / 128)
    # the CI is the 2.5/97.5 % quantiles of the two-level replicate means, by definition
    diff = np.array(
        [[int(a) - int(b) for a, b in zip(r1, r0, strict=True)] for r1, r0 in zip(R1_BITS, R0_BITS)]
    )
    means = naive_bootstrap(diff, cfg.n_boot, cfg.boot_seed)
    assert [d["ci_low"], d["ci_high"]] == pytest.approx(list(np.quantile(means, [0.025, 0.975])))
    # R1 - R2 (R2 right on q0 only): R1-only on q2..q5 for both seeds (8), no R2-only pair
    d2 = res["paired"]["R1-R2"]
    assert (d2["a_only"], d2["b_only"], d2["mean_diff"]) == (8, 0, pytest.approx(8 / 20))
    assert d2["p_value"] == pytest.approx(2 / 2**8)
    # lift over step 0 (all wrong at step 0): R1 answered 5 + 5 of 20 right
    lift = res["lift"]["sae"]
    assert (lift["mean_diff"], lift["a_only"], lift["b_only"]) == (pytest.approx(0.5), 10, 0)
    assert res["step0_identical"] is True and res["n_eval_questions"] == Q
    # verdict by the rule: +0.25 >= 0.02 with its CI above 0 iff lower end > 0
    assert res["checks"]["r1_over_r0_ci_ok"] == (d["ci_low"] > 0)
    assert res["verdict"] == ("PASS" if d["ci_low"] > 0 else "FAIL")
    saved = json.loads((tmp_path / "g2" / "gate_g2.json").read_text())
    assert {"table", "paired", "lift", "collapse", "warnings", "rule", "checks"} <= set(saved)
    assert saved["table"]["sae"]["per_seed"] == {"0": 0.5, "1": 0.5}
    assert (tmp_path / "g2" / "gate_g2_length.png").stat().st_size > 1000
    text = format_g2(res)
    assert "R1-R0" in text and "+0.250" in text and "CI lower end > 0" in text


def test_collapsed_r1_run_fails_the_gate_and_is_shown(tmp_path: Path) -> None:
    strong = ["1111111110", "1111111101"]  # R1 far ahead of R0 and R2 on both seeds
    cfg = gate_cfg(tmp_path)
    write_all(cfg, {"outcome": R0_BITS, "sae": strong, "direction": R2_BITS})
    ok = run_gate_g2(cfg, lm_factory=no_training)
    assert ok["verdict"] == "PASS" and ok["checks"]["failed"] == []  # the control: same runs, no collapse
    # seed 1's R1 run stopped by the collapse guard at step 2 (a finished run, not retrained)
    run = write_run(cfg, "sae", 1, strong[1], collapsed_at=2)
    assert _finished(run, dataclasses.replace(cfg.rl, reward="sae", seed=1, out=str(run)))  # type: ignore[arg-type]
    res = run_gate_g2(cfg, lm_factory=no_training)
    assert res["verdict"] == "FAIL"
    assert res["checks"]["failed"] == ["no_r1_collapse_ok"] and res["checks"]["r1_collapsed_seeds"] == ["1"]
    c = res["collapse"]["sae"]
    assert c["n_collapsed"] == 1 and c["runs"]["1"]["collapsed"] and c["runs"]["1"]["step"] == 2
    assert c["runs"]["1"]["steps_done"] == 2 and c["runs"]["1"]["final_short_frac"] == pytest.approx(0.5)
    # final length: mean of the last training rows (seed 0: 40; seed 1: 40, 2 -> 21); R0: 40
    assert c["final_completion_len"] == pytest.approx((40 + 21) / 2)
    assert c["len_vs_r0"] == pytest.approx(30.5 / 40) and res["collapse"]["outcome"]["len_vs_r0"] == 1.0
    assert res["table"]["sae"]["collapsed_seeds"] == ["1"]
    text = format_g2(res)
    assert "COLLAPSED@2" in text and "seed 1 COLLAPSED at step 2" in text and "verdict: FAIL" in text


def test_unfinished_run_is_not_finished(tmp_path: Path) -> None:
    cfg = gate_cfg(tmp_path)
    run = write_run(cfg, "outcome", 0, R0_BITS[0])
    rcfg = dataclasses.replace(cfg.rl, reward="outcome", seed=0, out=str(run))
    assert _finished(run, rcfg)
    summary = json.loads((run / "summary.json").read_text())
    write_json(run / "summary.json", {**summary, "steps_done": 2})  # stopped early, no collapse: a kill
    assert not _finished(run, rcfg)
    write_json(run / "summary.json", {k: v for k, v in summary.items() if k != "steps_done"})  # older summary
    assert _finished(run, rcfg)


def test_an_arm_with_more_steps_than_the_budget_is_refused(tmp_path: Path) -> None:
    """The arms are compared at one step budget: a run whose checkpoint holds more steps than
    --rl-steps (a gate re-run with fewer steps) is an error, not a silently longer arm."""
    cfg = gate_cfg(tmp_path)
    run = write_run(cfg, "outcome", 0, R0_BITS[0])
    rcfg = dataclasses.replace(cfg.rl, reward="outcome", seed=0, out=str(run))
    write_json(run / "checkpoint" / "state.json", {"step": rcfg.steps + 2})
    with pytest.raises(
        SaeRewardError, match=rf"holds {rcfg.steps + 2} steps, more than --rl-steps {rcfg.steps}"
    ):
        _finished(run, rcfg)


def test_mismatched_eval_qids_are_refused(tmp_path: Path) -> None:
    cfg = gate_cfg(tmp_path)
    write_all(cfg, {"outcome": R0_BITS, "sae": R1_BITS, "direction": R2_BITS})
    write_run(cfg, "direction", 1, R2_BITS[1], qids=[f"other{i}" for i in range(Q)])
    with pytest.raises(SaeRewardError, match=r"R0_outcome_seed0 and R2_direction_seed1 .*different held-out"):
        run_gate_g2(cfg, lm_factory=no_training)


def test_missing_eval_bits_or_arm_gives_incomplete(tmp_path: Path) -> None:
    cfg = gate_cfg(tmp_path)
    write_all(cfg, {"outcome": R0_BITS, "sae": R1_BITS, "direction": R2_BITS})
    write_run(cfg, "outcome", 0, R0_BITS[0], bits=False)  # a run from before per-question correctness
    res = run_gate_g2(cfg, lm_factory=no_training)
    assert res["verdict"] == "INCOMPLETE" and "paired statistics unavailable" in res["checks"]["note"]
    assert res["paired"] == {} and res["table"]["outcome"]["pooled_n"] == 2 * Q
    write_run(cfg, "outcome", 0, R0_BITS[0])
    res = run_gate_g2(dataclasses.replace(cfg, rewards=("outcome", "sae")), lm_factory=no_training)
    assert res["verdict"] == "INCOMPLETE" and "R2 (direction) not in rewards" in res["checks"]["note"]
    assert set(res["paired"]) == {"R1-R0"}


def test_two_level_bootstrap_is_deterministic_and_resamples_seeds(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    diff = rng.integers(-1, 2, size=(3, 40)).astype(float)
    a = two_level_bootstrap(diff, n_boot=300, seed=11)
    assert a == two_level_bootstrap(diff, n_boot=300, seed=11)
    assert a != two_level_bootstrap(diff, n_boot=300, seed=12)
    # the count-matrix shortcut equals the sub-matrix means, replicate by replicate
    np.testing.assert_allclose(bootstrap_means(diff, 300, 11), naive_bootstrap(diff, 300, 11))
    # seed 0 gains on every question, seed 1 on none: the question-level spread is 0 within each
    # seed, so the whole interval comes from resampling seeds (means 1, 1/2 or 0)
    split = np.vstack([np.ones(20), np.zeros(20)])
    assert two_level_bootstrap(split, n_boot=2000, seed=0) == (0.0, 1.0)
    assert sorted(set(np.round(bootstrap_means(split, 200, 0), 9))) == [0.0, 0.5, 1.0]
    # one seed, questions {+1, 0}: replicate means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    means = bootstrap_means(np.array([[1.0, 0.0]]), 4000, 3)
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.03)
    # through the gate: the same files and boot_seed give the same CIs, another boot_seed others
    cfg = gate_cfg(tmp_path)
    write_all(cfg, {"outcome": R0_BITS, "sae": R1_BITS, "direction": R2_BITS})
    first = run_gate_g2(cfg, lm_factory=no_training)["paired"]
    assert run_gate_g2(cfg, lm_factory=no_training)["paired"] == first
    other = run_gate_g2(dataclasses.replace(cfg, boot_seed=5), lm_factory=no_training)["paired"]["R1-R0"]
    r1r0 = np.array([[int(a) - int(b) for a, b in zip(x, y, strict=True)] for x, y in zip(R1_BITS, R0_BITS)])
    want = np.quantile(naive_bootstrap(r1r0, cfg.n_boot, 5), [0.025, 0.975])
    assert other["boot_seed"] == 5 and [other["ci_low"], other["ci_high"]] == pytest.approx(list(want))


def test_paired_compare_rejects_unpaired_inputs() -> None:
    with pytest.raises(ValueError, match="same seeds"):
        paired_compare(["01"], ["01", "10"])
    with pytest.raises(ValueError, match="unequal lengths"):
        paired_compare(["01", "011"], ["01", "10"])


def test_prompt_format_mismatch_is_a_recorded_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    strong = ["1111111110", "1111111101"]
    cfg = gate_cfg(tmp_path, pack_meta={"prompt_format": "chat", "task": "chain_sum"})
    write_all(cfg, {"outcome": R0_BITS, "sae": strong, "direction": R2_BITS})
    with caplog.at_level(logging.WARNING, logger="saereward.gates.g2_rl_ablation"):
        res = run_gate_g2(cfg, lm_factory=no_training)
    assert [w["kind"] for w in res["warnings"]] == ["prompt_format_mismatch"]
    w = res["warnings"][0]
    assert w["blocks_pass"] is False and "'chat'" in w["message"] and "'raw'" in w["message"]
    assert "prompt_format_mismatch" in caplog.text
    assert res["verdict"] == "PASS"  # not blocking
    assert "WARNING [prompt_format_mismatch]" in format_g2(res)
    # a blocking warning from the caller turns the PASS into FAIL
    audit = {
        "kind": "truncation_audit",
        "message": "40 % of completions hit max_new_tokens",
        "blocks_pass": True,
    }
    res = run_gate_g2(cfg, lm_factory=no_training, extra_warnings=[audit])
    assert [w["kind"] for w in res["warnings"]] == ["prompt_format_mismatch", "truncation_audit"]
    assert res["verdict"] == "FAIL" and res["checks"]["failed"] == ["no_blocking_warning_ok"]
    assert json.loads((tmp_path / "g2" / "gate_g2.json").read_text())["warnings"][1]["blocks_pass"] is True


def test_task_mismatch_and_old_pack(tmp_path: Path) -> None:
    from saereward.gates.g2_rl_ablation import _format_warnings

    cfg = gate_cfg(tmp_path)
    assert _format_warnings(cfg, {"task": "gsm8k", "prompt_format": "raw"})[0]["kind"] == "task_mismatch"
    assert _format_warnings(cfg, {"d_sae": 128}) == []  # a pack from before discovery recorded them
    assert (
        _format_warnings(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, pack=None)), {"task": "x"})
        == []
    )


def test_audit_lines_show_each_forms_best_cut_with_its_ci() -> None:
    from saereward.gates.g2_rl_ablation import _format_audit

    audit = {
        "n_completions": 10,
        "form": "position",
        "forms": {
            "mechreward": {
                "cut_gain_sigma": {"1": 0.8, "2": -0.1},
                "cut_gain_sigma_ci": {"1": [0.5, 1.0], "2": [-0.2, 0.0]},
                "warn": True,
            },
            "position": {
                "cut_gain_sigma": {"1": 0.01},
                "cut_gain_sigma_ci": {"1": [None, None]},
                "warn": False,
            },
            "shaped": {"cut_gain_sigma": {"1": None}, "warn": False},  # a gate_g2.json from before the CIs
        },
    }
    head, mech, pos, shaped = _format_audit(audit)
    assert mech.endswith("k=1 +0.800, k=2 -0.100; k=1 95 % CI [+0.500, +1.000]  FLAGGED")
    assert pos.endswith("k=1 +0.010 <- runs") and shaped.endswith("k=1 -")
