"""Stage Gate 2: does the SAE reward beat outcome-only RL, and the raw direction, at the same budget?

For each reward in ``rewards`` (R0 = outcome, R1 = outcome + SAE pack, R2 = outcome + raw
contrastive direction) and each random seed in ``seeds``, one GRPO run with identical settings
otherwise (:class:`saereward.rl.config.GRPOConfig` under ``rl``; same questions per step, same
held-out split, same steps). Every run is scored greedily on the same held-out questions, in the
same order (its ``summary.json`` lists them as ``eval_qids``; each evaluation row of
``train_log.jsonl`` carries ``eval_bits``, one ``'0'/'1'`` per question).

**Paired statistics** (:mod:`saereward.gates.paired`). Because the questions are shared, arms are
compared pair by pair: for R1 − R0 and R1 − R2, the difference of final correctness per (random
seed, question); its mean (= the difference of mean accuracies), a 95 % percentile bootstrap CI
that resamples seeds and then questions (so both run-to-run and question-to-question variation
count), and an exact McNemar test on the discordant pairs pooled over seeds. The same statistics
for each arm's **lift** over step 0 (the base model's correctness on the same questions).

**Collapse.** A run that the trainer's collapse guard stopped early (``summary.json``:
``collapse.collapsed``) is finished; its final evaluation is the one at the stop step. The gate
shows, per run, the collapse flag and step and the mean completion length of the last training
rows, and per arm that length relative to R0's (``gate_g2_length.png`` plots it per step).

**Verdict rule** (computed by :func:`_decide`; the margins are configurable)::

    PASS  iff  (a) no R1 run collapsed,
               (b) mean paired R1 − R0 ≥ r1_over_r0  and the lower end of its 95 % CI > 0,
               (c) mean paired R1 − R2 ≥ r1_over_r2,
               (d) no blocking warning is recorded;
    FAIL  otherwise;
    INCOMPLETE  with fewer than min_seeds seeds, an arm (R0, R1, R2) missing, or no paired data
                (runs without eval_bits / eval_qids), the reason in ``checks["note"]``.

The margins are mechreward's: 2 and 5 percentage points.

**Warnings** are recorded in ``result["warnings"]`` (each ``{"kind", "message", "blocks_pass"}``)
and logged loudly. The gate itself records a pack whose discovery ``prompt_format`` or ``task``
differs from the runs' (not blocking: the features may still transfer, but the reader should know);
callers add their own through ``run_gate_g2(..., extra_warnings=[...])`` (see :func:`warning`).

Writes ``gate_g2.json`` (keys: ``verdict``, ``rule``, ``checks``, ``table`` (per-reward unpaired
accuracies with pooled Wilson CIs, kept for reference), ``paired``, ``lift``, ``collapse``,
``warnings``, ``curves``, ``length_curves``), ``gate_g2.png`` (held-out accuracy against steps,
mean over seeds per reward) and ``gate_g2_length.png`` (mean completion length against steps).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saereward import __version__, plots
from saereward.config import option, to_dict
from saereward.errors import RunMismatch, SaeRewardError
from saereward.features.pack import load_pack
from saereward.gates.paired import paired_compare
from saereward.io import read_json, read_jsonl, write_json
from saereward.model.lm import load_model
from saereward.rl.audit import AuditConfig, format_audit, run_audit
from saereward.rl.checkpoint import (
    checkpointed_steps,
    reward_inputs,
    same_inputs,
    saved_inputs,
    settings_diff,
)
from saereward.rl.config import GRPOConfig
from saereward.rl.grpo import GRPOTrainer, check_reward_inputs, run_train_rl
from saereward.stats import wilson_ci

log = logging.getLogger(__name__)

LABELS = {"outcome": "R0", "sae": "R1", "direction": "R2"}
ARMS = ("outcome", "sae", "direction")
TAIL_ROWS = 5  #: "final" completion length = mean over this many last training rows
#: the checks of the rule, in order; each must be True for a PASS
RULE_CHECKS = (
    "no_r1_collapse_ok",
    "r1_over_r0_ok",
    "r1_over_r0_ci_ok",
    "r1_over_r2_ok",
    "no_blocking_warning_ok",
)


@dataclass(frozen=True)
class GateG2Config:
    """Settings of ``saereward gate-g2``. GRPO settings are under ``rl`` (flags ``--rl-*``)."""

    rewards: tuple[str, ...] = option(("outcome", "sae", "direction"), "rewards compared (R0, R1, R2)")
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds, one run per reward and seed")
    r1_over_r0: float = option(0.02, "PASS needs mean paired R1 - R0 >= this (and its CI above 0)")
    r1_over_r2: float = option(0.05, "PASS needs mean paired R1 - R2 >= this")
    min_seeds: int = option(3, "fewest seeds per reward for a PASS / FAIL verdict (fewer: INCOMPLETE)")
    n_boot: int = option(2000, "bootstrap replicates of the paired CIs (seeds, then questions)")
    boot_seed: int = option(0, "random seed of the paired bootstrap")
    audit: bool = option(
        True, "run the truncation audit (`saereward audit-reward`) of the reward forms first (R1 with a pack)"
    )
    audit_warn_sigma: float = option(
        0.1, "the audit flags a form whose reward gain from cutting completions exceeds this many σ"
    )
    out: str = option("runs/gate_g2", "folder: one run per reward/seed, gate_g2.json, gate_g2.png")
    rl: GRPOConfig = option(GRPOConfig(), "GRPO settings shared by every run")

    def __post_init__(self) -> None:
        bad = [r for r in self.rewards if r not in LABELS]
        if bad:
            raise ValueError(f"unknown reward(s) {bad}: choose from {', '.join(LABELS)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {list(self.seeds)} repeat a seed: name each once")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")
        if len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"rewards {list(self.rewards)} repeat a reward: name each once")
        if self.min_seeds < 1:
            raise ValueError(f"min_seeds must be >= 1, got {self.min_seeds}")
        default = GRPOConfig()
        per_run = [f"rl.{k}" for k in ("reward", "seed", "out") if getattr(self.rl, k) != getattr(default, k)]
        if per_run:
            raise ValueError(
                f"{', '.join(per_run)} would be ignored: gate-g2 sets each run's reward, seed and folder "
                "from rewards, seeds and out; drop it"
            )


def rule_text(cfg: GateG2Config) -> str:
    """The verdict rule in one line, with this gate's margins."""
    return (
        f"PASS iff (a) no R1 run collapsed, (b) mean paired R1 - R0 >= {cfg.r1_over_r0} and its 95 % CI "
        f"lower end > 0, (c) mean paired R1 - R2 >= {cfg.r1_over_r2}, (d) no blocking warning; FAIL "
        f"otherwise; INCOMPLETE with < {cfg.min_seeds} seeds, a missing arm or no paired eval_bits"
    )


# --------------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------------


def _finished(run: Path, rcfg: GRPOConfig) -> bool:
    """Whether ``run`` holds a finished run of ``rcfg``; a run made with other settings is an error.

    Finished: ``summary.json`` exists and either the run did all ``rcfg.steps`` steps
    (``steps_done``, or ``steps`` in summaries that predate it) or the collapse guard stopped it
    early (``collapse.collapsed``) in a run configured for ``rcfg.steps``."""
    if not (run / "config.json").is_file():
        return False
    same = same_inputs(saved_inputs(run), reward_inputs(rcfg))  # a moved run folder: paths differ, files not
    diff = settings_diff(read_json(run / "config.json", dict), rcfg, same)
    if diff:
        raise RunMismatch(
            f"{run} holds a run with other settings ({', '.join(diff[:4])}): use another --out, or delete it"
        )
    held = checkpointed_steps(run)
    if held > rcfg.steps:  # the arms are compared at one budget
        raise RunMismatch(
            f"{run} holds {held} steps, more than --rl-steps {rcfg.steps}: the arms share one step budget, "
            f"so pass --rl-steps {held} or more, or use another --out"
        )
    path = run / "summary.json"
    if not path.is_file():
        return False
    summary = read_json(path, dict)
    done = summary.get("steps_done", summary.get("steps"))
    collapsed = bool(_d(summary.get("collapse")).get("collapsed"))
    return done == rcfg.steps or (collapsed and summary.get("steps") == rcfg.steps)


def _d(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


@dataclass
class RunRecord:
    """What G2 reads from one finished run folder."""

    reward: str
    seed: int
    path: Path
    evals: list[dict[str, Any]]  #: rows with an evaluation, in log order (the last is the final one)
    train: list[dict[str, Any]]  #: training rows (step >= 1)
    summary: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        return self.evals[-1]

    @property
    def start(self) -> dict[str, Any] | None:
        """The step-0 evaluation (the base model), if the log has one."""
        return next((r for r in self.evals if int(r["step"]) == 0), None)

    @property
    def collapse(self) -> dict[str, Any]:
        return _d(self.summary.get("collapse"))


def _load_run(reward: str, seed: int, run: Path) -> RunRecord:
    rows = read_jsonl(run / "train_log.jsonl")
    evals = [r for r in rows if "eval_accuracy" in r]
    if not evals:
        raise SaeRewardError(f"run {run} has no held-out evaluation: it did not finish")
    train = [r for r in rows if int(r.get("step", 0)) >= 1]
    summary = read_json(run / "summary.json", dict) if (run / "summary.json").is_file() else {}
    return RunRecord(reward, seed, run, evals, train, summary)


def _question_order(recs: list[RunRecord]) -> tuple[list[Any] | None, str | None]:
    """The shared ``eval_qids`` of all runs, or ``(None, reason)`` when paired data are unavailable.

    Raises when two runs list different questions (pairing them would be meaningless) or when an
    ``eval_bits`` string does not match its run's question list."""
    with_qids = [r for r in recs if isinstance(r.summary.get("eval_qids"), list)]
    for r in with_qids[1:]:
        if r.summary["eval_qids"] != with_qids[0].summary["eval_qids"]:
            raise SaeRewardError(
                f"G2 runs {with_qids[0].path.name} and {r.path.name} were evaluated on different held-out "
                "questions (eval_qids differ): re-run them with the same task, eval_seed and n_eval"
            )
    for r in with_qids:
        n = len(r.summary["eval_qids"])
        for row in (r.final, r.start or {}):
            bits = row.get("eval_bits")
            if isinstance(bits, str) and len(bits) != n:
                raise SaeRewardError(
                    f"{r.path}: eval_bits at step {row.get('step')} has {len(bits)} answers for {n} "
                    "eval_qids: the run folder is inconsistent; delete it and re-run"
                )
    lacking = [
        r.path.name for r in recs if r not in with_qids or not isinstance(r.final.get("eval_bits"), str)
    ]
    if lacking:
        return None, (
            f"paired statistics unavailable: {len(lacking)} run(s) lack eval_bits/eval_qids "
            f"(e.g. {lacking[0]}); re-run them with a trainer that records per-question correctness"
        )
    return list(with_qids[0].summary["eval_qids"]), None


# --------------------------------------------------------------------------------------------------
# Statistics per arm and pair
# --------------------------------------------------------------------------------------------------

Recs = dict[str, dict[int, RunRecord]]


def _table(recs: Recs) -> dict[str, Any]:
    """Unpaired accuracies per reward: mean over seeds, pooled Wilson CI, per seed, step 0."""
    table: dict[str, Any] = {}
    for reward, per_seed in recs.items():
        k = sum(int(r.final["eval_correct"]) for r in per_seed.values())
        n = sum(int(r.final["eval_n"]) for r in per_seed.values())
        ci = wilson_ci(k, n)
        accs = [float(r.final["eval_accuracy"]) for r in per_seed.values()]
        base = [float(r.evals[0]["eval_accuracy"]) for r in per_seed.values()]
        table[reward] = {
            "label": LABELS[reward],
            "accuracy": sum(accs) / len(accs),
            "pooled_correct": k,
            "pooled_n": n,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "confidence": ci.confidence,
            "per_seed": {str(s): a for s, a in zip(per_seed, accs, strict=True)},
            "start_accuracy": sum(base) / len(base),
            "collapsed_seeds": [str(s) for s, r in per_seed.items() if r.collapse.get("collapsed")],
        }
    return table


def _paired(cfg: GateG2Config, recs: Recs) -> dict[str, Any]:
    """``"R1-R0"``, ``"R1-R2"``: R1's final correctness minus the other arm's, same seed and question."""
    out: dict[str, Any] = {}
    if "sae" not in recs:
        return out
    for other in (r for r in ARMS if r != "sae" and r in recs):
        seeds = [s for s in cfg.seeds if s in recs["sae"] and s in recs[other]]
        res = paired_compare(
            [recs["sae"][s].final["eval_bits"] for s in seeds],
            [recs[other][s].final["eval_bits"] for s in seeds],
            n_boot=cfg.n_boot,
            seed=cfg.boot_seed,
        )
        out[f"R1-{LABELS[other]}"] = {"a": "sae", "b": other, "seeds": seeds, **res}
    return out


def _lift(cfg: GateG2Config, recs: Recs) -> dict[str, Any]:
    """Per arm: final minus step-0 correctness, paired within each run over the same questions."""
    out: dict[str, Any] = {}
    for reward, per_seed in recs.items():
        seeds = [s for s in cfg.seeds if s in per_seed]
        starts = [per_seed[s].start for s in seeds]
        start_bits = [_d(st).get("eval_bits") for st in starts]
        if not all(isinstance(b, str) for b in start_bits):
            out[reward] = {"label": LABELS[reward], "note": "no step-0 eval_bits: lift unavailable"}
            continue
        res = paired_compare(
            [per_seed[s].final["eval_bits"] for s in seeds],
            [str(b) for b in start_bits],
            n_boot=cfg.n_boot,
            seed=cfg.boot_seed,
        )
        out[reward] = {"label": LABELS[reward], "seeds": seeds, **res}
    return out


def _tail_mean(rows: list[dict[str, Any]], key: str, n: int = TAIL_ROWS) -> float | None:
    vals = [v for v in (_finite(r.get(key)) for r in rows) if v is not None][-n:]
    return sum(vals) / len(vals) if vals else None


def _collapse(recs: Recs) -> dict[str, Any]:
    """Per arm and run: collapse flag, stop step and reason, steps done, final completion length."""
    out: dict[str, Any] = {}
    for reward, per_seed in recs.items():
        runs: dict[str, dict[str, Any]] = {
            str(s): {
                "run": r.path.name,
                "collapsed": bool(r.collapse.get("collapsed")),
                "step": r.collapse.get("step"),
                "reason": r.collapse.get("reason"),
                "steps_done": r.summary.get("steps_done", r.summary.get("steps")),
                "final_completion_len": _tail_mean(r.train, "completion_len"),
                "final_short_frac": _tail_mean(r.train, "short_frac"),
            }
            for s, r in per_seed.items()
        }
        lens = [v["final_completion_len"] for v in runs.values() if v["final_completion_len"] is not None]
        out[reward] = {
            "label": LABELS[reward],
            "n_collapsed": sum(1 for v in runs.values() if v["collapsed"]),
            "final_completion_len": sum(lens) / len(lens) if lens else None,
            "runs": runs,
        }
    r0 = _d(out.get("outcome")).get("final_completion_len")
    for d in out.values():
        mine = d["final_completion_len"]
        d["len_vs_r0"] = mine / r0 if mine is not None and r0 else None
    return out


def _decide(
    cfg: GateG2Config,
    paired: dict[str, Any],
    collapse: dict[str, Any],
    warnings: list[dict[str, Any]],
    unavailable: str | None,
) -> tuple[str, dict[str, Any]]:
    """The verdict and its checks, by the rule of the module docstring (pure)."""
    checks: dict[str, Any] = {}
    r10, r12 = paired.get("R1-R0"), paired.get("R1-R2")
    if r10 and r12:
        r1_collapsed = [s for s, v in _d(collapse.get("sae")).get("runs", {}).items() if v["collapsed"]]
        blocking = [w["kind"] for w in warnings if w["blocks_pass"]]
        checks = {
            "r1_minus_r0": r10["mean_diff"],
            "r1_minus_r0_ci": [r10["ci_low"], r10["ci_high"]],
            "r1_minus_r0_mcnemar_p": r10["p_value"],
            "r1_minus_r2": r12["mean_diff"],
            "r1_minus_r2_ci": [r12["ci_low"], r12["ci_high"]],
            "r1_minus_r2_mcnemar_p": r12["p_value"],
            "r1_collapsed_seeds": r1_collapsed,
            "blocking_warnings": blocking,
            "no_r1_collapse_ok": not r1_collapsed,
            "r1_over_r0_ok": r10["mean_diff"] >= cfg.r1_over_r0,
            "r1_over_r0_ci_ok": r10["ci_low"] > 0,
            "r1_over_r2_ok": r12["mean_diff"] >= cfg.r1_over_r2,
            "no_blocking_warning_ok": not blocking,
        }
        checks["failed"] = [k for k in RULE_CHECKS if not checks[k]]
    notes = []
    if len(cfg.seeds) < cfg.min_seeds:
        notes.append(f"{len(cfg.seeds)} seed(s) < min_seeds {cfg.min_seeds}: no verdict")
    missing = [f"{LABELS[r]} ({r})" for r in ARMS if r not in cfg.rewards]
    if missing:
        notes.append(f"arm(s) {', '.join(missing)} not in rewards: no verdict")
    if unavailable:
        notes.append(unavailable)
    if notes or not checks:
        checks["note"] = "; ".join(notes) or "no paired R1 comparison"
        return "INCOMPLETE", checks
    return ("FAIL" if checks["failed"] else "PASS"), checks


# --------------------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------------------


def warning(kind: str, message: str, blocks_pass: bool) -> dict[str, Any]:
    """One G2 warning record; ``blocks_pass`` turns a would-be PASS into FAIL (rule (d))."""
    return {"kind": str(kind), "message": " ".join(str(message).split()), "blocks_pass": bool(blocks_pass)}


def _checked_warnings(ws: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for w in ws:
        if not isinstance(w, dict) or not {"kind", "message", "blocks_pass"} <= set(w):
            raise ValueError(f"a G2 warning needs kind, message and blocks_pass, got {w!r}")
        out.append(warning(w["kind"], w["message"], w["blocks_pass"]))
    return out


def _pack_meta(cfg: GateG2Config) -> dict[str, Any] | None:
    """The ``metadata`` of ``cfg.rl.pack``, or None without a pack (a missing file is the trainer's error)."""
    if not cfg.rl.pack or not Path(cfg.rl.pack).expanduser().is_file():
        return None

    return load_pack(cfg.rl.pack).metadata


def _audit(
    cfg: GateG2Config, pack_meta: dict[str, Any] | None, out: Path
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The truncation audit of the pack's score on its base rollouts (:mod:`saereward.rl.audit`).

    Returns a summary for ``gate_g2.json`` and, when the reward form the runs use gains more than
    ``audit_warn_sigma`` σ from cutting completions, a blocking warning: RL could win that reward by
    stopping early, so G2 may not call it a PASS."""
    if not cfg.audit or "sae" not in cfg.rewards or pack_meta is None:
        return None, []

    rollouts = pack_meta.get("rollouts") or cfg.rl.direction_rollouts
    if not rollouts or not Path(rollouts, "tokens.safetensors").is_file():
        log.warning("gate-g2: no base rollouts with per-token residuals for the truncation audit; skipped")
        return {"skipped": "the pack records no rollout folder with per-token residuals"}, []
    res = run_audit(
        AuditConfig(
            rollouts=str(rollouts),
            pack=str(cfg.rl.pack),
            sae=cfg.rl.sae,
            layer=cfg.rl.layer,
            model=cfg.rl.model,
            lam=cfg.rl.lam,
            clip=cfg.rl.reward_clip,
            warn_sigma=cfg.audit_warn_sigma,
            seed=cfg.boot_seed,
            out=str(out),
        )
    )
    log.info("%s", format_audit(res))
    form = cfg.rl.reward_form
    mine = res["forms"][form]
    summary = {
        "form": form,
        "n_completions": res["n_completions"],
        "n_questions": res["n_questions"],
        "bootstrap": res["bootstrap"],
        "warn_sigma": cfg.audit_warn_sigma,
        "forms": {
            f: {
                "cut_gain_sigma": {k: v["gain_sigma"] for k, v in r["cut"].items()},
                "cut_gain_sigma_ci": {k: v["gain_sigma_ci"] for k, v in r["cut"].items()},
                "pad_gain_sigma": r["pad"]["gain_sigma"],
                "warn": r["warn"],
            }
            for f, r in res["forms"].items()
        },
        "path": str(out / "audit.json"),
    }
    if not mine["warn"]:
        return summary, []
    msg = (
        f"truncation audit: reward form {form!r} gains {mine['max_cut_gain_sigma']:.2f} σ from cutting "
        f"completions (limit {cfg.audit_warn_sigma} σ): RL can win this reward by stopping early"
    )
    return summary, [warning("truncation_audit", msg, True)]


def _format_warnings(cfg: GateG2Config, pack_meta: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Warnings when the pack was discovered on another prompt format or task than the G2 runs use.

    The pack's features were selected on rollouts of one task and prompt format (recorded in its
    metadata since discovery started writing them; older packs lack them and give no warning). On
    other prompts they may read something else, so R1 would not test the pack it names. Not blocking:
    the reader decides whether the transfer is intended."""
    if not cfg.rl.pack or not pack_meta:
        return []
    out = []
    for key, kind in (("prompt_format", "prompt_format_mismatch"), ("task", "task_mismatch")):
        theirs, mine = pack_meta.get(key), getattr(cfg.rl, key)
        if theirs is not None and str(theirs) != str(mine):
            out.append(
                warning(
                    kind,
                    f"the pack {cfg.rl.pack} was discovered with {key} {theirs!r}, the G2 runs use {mine!r}: "
                    "its features may not mean the same on these prompts",
                    blocks_pass=False,
                )
            )
    return out


def _log_warnings(ws: list[dict[str, Any]]) -> None:
    for w in ws:
        log.warning(
            "gate-g2 WARNING [%s]%s: %s",
            w["kind"],
            " (blocks PASS)" if w["blocks_pass"] else "",
            w["message"],
        )


# --------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------


def _plan(cfg: GateG2Config) -> list[tuple[str, int, Path, GRPOConfig]]:
    runs = []
    for reward in cfg.rewards:
        for seed in cfg.seeds:
            run = Path(cfg.out) / f"{LABELS[reward]}_{reward}_seed{seed}"
            rcfg = dataclasses.replace(cfg.rl, reward=reward, seed=seed, out=str(run))  # type: ignore[arg-type]
            runs.append((reward, seed, run, rcfg))
    return runs


def _train_missing(runs: list[tuple[str, int, Path, GRPOConfig]], cfg: GateG2Config, lm_factory: Any) -> None:
    """Check every reward's settings once (before any run), then train the unfinished runs."""
    todo = [r for r in runs if not _finished(r[2], r[3])]
    if not todo:
        return

    lm = lm_factory() if lm_factory else load_model(cfg.rl.model, dtype=cfg.rl.dtype, threads=cfg.rl.threads)
    for reward in dict.fromkeys(r[0] for r in todo):
        GRPOTrainer(next(r[3] for r in todo if r[0] == reward), lm=lm, check_only=True)
    del lm
    for _reward, _seed, _run, rcfg in todo:
        run_train_rl(rcfg, lm=lm_factory() if lm_factory else None)


def run_gate_g2(
    cfg: GateG2Config, lm_factory: Any = None, extra_warnings: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Run (or resume) every reward × seed, then compute the paired statistics and the verdict.

    ``lm_factory`` is for tests. ``extra_warnings`` (each ``{"kind", "message", "blocks_pass"}``, see
    :func:`warning`) are recorded beside the gate's own; a blocking one prevents a PASS. Since finished
    runs are reused, a caller whose check needs the trained runs can call the gate again with it.

    Before the first run, every reward's settings get the trainer's checks (pack and SAE against the
    model and layer, the direction's rollouts, the verifier), so bad input fails at once, not after
    the earlier rewards' runs. A finished run is reused only if its saved settings match."""
    out = Path(cfg.out)
    if "sae" in cfg.rewards and not cfg.rl.pack:
        raise SaeRewardError("gate-g2 with the sae reward needs --rl-pack")
    if "direction" in cfg.rewards and not cfg.rl.direction_rollouts:
        raise SaeRewardError("gate-g2 with the direction reward needs --rl-direction-rollouts")
    if len(cfg.seeds) < cfg.min_seeds:
        log.warning(
            "gate-g2: %d seed(s) < min_seeds %d: the verdict will be INCOMPLETE",
            len(cfg.seeds),
            cfg.min_seeds,
        )
    runs = _plan(cfg)
    for rcfg in {r[0]: r[3] for r in runs if not _finished(r[2], r[3])}.values():
        check_reward_inputs(rcfg, flag_prefix="--rl-")  # each unfinished reward's files, before the model
    pack_meta = _pack_meta(cfg)
    audit, audit_warnings = _audit(cfg, pack_meta, out / "audit")
    warnings = (
        _format_warnings(cfg, pack_meta) + audit_warnings + _checked_warnings(list(extra_warnings or []))
    )
    _log_warnings(warnings)
    _train_missing(runs, cfg, lm_factory)
    recs: Recs = {}
    for reward, seed, run, _rcfg in runs:
        recs.setdefault(reward, {})[seed] = _load_run(reward, seed, run)
    result = gate_result(cfg, recs, warnings)
    result["audit"] = audit
    write_json(out / "gate_g2.json", result)
    plots.save_png(plots.g2_accuracy_by_step(result["curves"]), out / "gate_g2.png")
    if result["length_curves"]:
        stops = plots.collapse_stops(result["collapse"])
        plots.save_png(plots.completion_length(result["length_curves"], stops), out / "gate_g2_length.png")
    return result


def gate_result(cfg: GateG2Config, recs: Recs, warnings: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``gate_g2.json`` record from the loaded runs (pure: no file is read or written)."""
    flat = [r for per in recs.values() for r in per.values()]
    qids, unavailable = _question_order(flat)
    paired = _paired(cfg, recs) if qids is not None else {}
    lift = _lift(cfg, recs) if qids is not None else {}
    collapse = _collapse(recs)
    verdict, checks = _decide(cfg, paired, collapse, warnings, unavailable)
    starts = {r.start.get("eval_bits") for r in flat if r.start is not None}
    return {
        "gate": "G2",
        "verdict": verdict,
        "rule": rule_text(cfg),
        "checks": checks,
        "seeds": list(cfg.seeds),
        "steps": cfg.rl.steps,
        "n_eval_per_run": flat[0].final["eval_n"],
        "n_eval_questions": len(qids) if qids is not None else None,
        "step0_identical": len(starts) == 1 if qids is not None and starts else None,
        "table": _table(recs),
        "paired": paired,
        "lift": lift,
        "collapse": collapse,
        "warnings": warnings,
        "curves": {
            r: {
                str(s): [(int(e["step"]), float(e["eval_accuracy"])) for e in rec.evals]
                for s, rec in v.items()
            }
            for r, v in recs.items()
        },
        "length_curves": _length_curves(recs),
        "config": to_dict(cfg),
        "saereward_version": __version__,
    }


def _length_curves(recs: Recs) -> dict[str, dict[str, list[tuple[int, float]]]]:
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for reward, per_seed in recs.items():
        for s, r in per_seed.items():
            pts = [(int(x["step"]), _finite(x.get("completion_len"))) for x in r.train]
            curve = [(st, v) for st, v in pts if v is not None]
            if curve:
                out.setdefault(reward, {})[str(s)] = curve
    return out


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def _fmt_diff(d: dict[str, Any]) -> str:
    return (
        f"{d['mean_diff']:+.3f}  [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]  "
        f"{d['a_only']:>5}/{d['b_only']:<4}  p={d['p_value']:.3g}  (n={d['n_seeds']}×{d['n_questions']})"
    )


def _format_table(result: dict[str, Any]) -> list[str]:
    lines = [f"{'reward':14} {'start':>6} {'final':>6} {'95% CI (pooled)':>17}  per seed"]
    for reward, t in result["table"].items():
        runs = _d(_d(result.get("collapse")).get(reward)).get("runs", {})
        per = ", ".join(
            f"{a:.3f}" + (f" COLLAPSED@{runs[s]['step']}" if _d(runs.get(s)).get("collapsed") else "")
            for s, a in t["per_seed"].items()
        )
        lines.append(
            f"{t['label'] + ' ' + reward:14} {t['start_accuracy']:>6.3f} {t['accuracy']:>6.3f} "
            f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]  {per}"
        )
    return lines


def _format_paired(result: dict[str, Any]) -> list[str]:
    head = f"  {'':14} {'mean':>6}  {'95% CI':16}  {'discordant':10}  McNemar  (seeds×questions)"
    lines = []
    if result.get("paired"):
        lines += [
            "paired differences (same questions, same seed; CI: bootstrap over seeds, then questions):",
            head,
        ]
        lines += [f"  {k:14} {_fmt_diff(d)}" for k, d in result["paired"].items()]
    if result.get("lift"):
        lines += ["lift over step 0 (same questions):", head]
        for reward, d in result["lift"].items():
            name = f"{d['label']} {reward}"
            lines.append(
                f"  {name:14} {_fmt_diff(d)}" if "mean_diff" in d else f"  {name:14} {d.get('note')}"
            )
    return lines


def _format_collapse(result: dict[str, Any]) -> list[str]:
    lines = [f"completion length (mean of the last {TAIL_ROWS} training rows) and collapse:"]
    for reward, c in _d(result.get("collapse")).items():
        ln, rel = c.get("final_completion_len"), c.get("len_vs_r0")
        stops = [
            f"seed {s} COLLAPSED at step {v['step']} ({v.get('reason') or 'no reason given'})"
            for s, v in c["runs"].items()
            if v["collapsed"]
        ]
        lines.append(
            f"  {c['label'] + ' ' + reward:14} len {'—' if ln is None else f'{ln:.1f}'}"
            f"{'' if rel is None else f' ({rel:.2f}× R0)'}  collapsed {c['n_collapsed']}/{len(c['runs'])}"
            + (f": {'; '.join(stops)}" if stops else "")
        )
    return lines


def _format_audit(audit: dict[str, Any] | None) -> list[str]:
    if not audit or "forms" not in audit:
        return [f"truncation audit: {audit['skipped']}"] if audit else []
    out = [
        f"truncation audit (n={audit['n_completions']} base completions): reward gain from cutting after k tokens, σ"
    ]
    for form, r in audit["forms"].items():
        cells = ", ".join(
            f"k={k} {'-' if v is None else f'{v:+.3f}'}" for k, v in r["cut_gain_sigma"].items()
        )
        mark = " <- runs" if form == audit["form"] else ""
        out.append(f"  {form:11} {cells}{_best_cut_ci(r)}{'  FLAGGED' if r['warn'] else ''}{mark}")
    return out


def _best_cut_ci(form: dict[str, Any]) -> str:
    """``; k=K 95 % CI [lo, hi]`` of the form's largest gain from cutting ('' without a CI)."""
    gains = {k: v for k, v in form["cut_gain_sigma"].items() if v is not None}
    if not gains:
        return ""
    k = max(gains, key=lambda key: gains[key])
    ci = (form.get("cut_gain_sigma_ci") or {}).get(k)
    return f"; k={k} 95 % CI [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and None not in ci else ""


def format_g2(result: dict[str, Any]) -> str:
    lines = [
        f"Stage Gate 2: {result['steps']} steps per run, seeds {result['seeds']}, "
        f"{result['n_eval_per_run']} held-out questions per run",
        *_format_table(result),
        *_format_paired(result),
        *_format_collapse(result),
        *_format_audit(result.get("audit")),
    ]
    for w in result.get("warnings", []):
        lines.append(f"WARNING [{w['kind']}]{' (blocks PASS)' if w['blocks_pass'] else ''}: {w['message']}")
    checks = _d(result.get("checks"))
    lines.append(f"verdict: {result['verdict']}  ({result['rule']})")
    if checks.get("failed"):
        lines.append(f"failed: {', '.join(checks['failed'])}")
    if checks.get("note"):
        lines.append(f"note: {checks['note']}")
    return "\n".join(lines)
