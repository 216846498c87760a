"""Stage Gate 2: does the SAE reward beat outcome-only RL, and the raw direction, at the same budget?

For each reward in ``rewards`` (R0 = outcome, R1 = outcome + SAE pack, R2 = outcome + raw
contrastive direction) and each seed in ``seeds``, one GRPO run with identical settings otherwise
(:class:`saereward.rl.grpo.GRPOConfig` under ``rl``; same questions per step, same held-out split,
same steps). Per reward we report the held-out greedy accuracy at the end of each run, the mean
over seeds, and a Wilson 95 % CI on the pooled counts (all seeds' held-out answers together; the
per-seed spread is listed next to it). The seed's verdict rule, configurable:

    PASS  iff  acc(R1) ≥ acc(R0) + r1_over_r0   and   acc(R1) − acc(R2) ≥ r1_over_r2

with the seed's margins of 2 and 5 percentage points. Writes ``gate_g2.json`` and a plot of held-out
accuracy against steps (mean over seeds per reward).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saereward import __version__
from saereward.config import option, to_dict
from saereward.errors import SaeRewardError
from saereward.io import save_figure, write_json
from saereward.rl.grpo import GRPOConfig
from saereward.stats import wilson_ci

log = logging.getLogger(__name__)

LABELS = {"outcome": "R0", "sae": "R1", "direction": "R2"}


@dataclass(frozen=True)
class GateG2Config:
    """Settings of ``saereward gate-g2``. GRPO settings are under ``rl`` (flags ``--rl-*``)."""

    rewards: tuple[str, ...] = option(("outcome", "sae", "direction"), "rewards compared (R0, R1, R2)")
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds, one run per reward and seed")
    r1_over_r0: float = option(0.02, "PASS needs acc(R1) >= acc(R0) + this")
    r1_over_r2: float = option(0.05, "PASS needs acc(R1) - acc(R2) >= this")
    min_seeds: int = option(3, "fewest seeds per reward for a PASS / FAIL verdict (fewer: INCOMPLETE)")
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


def _finished(run: Path, rcfg: GRPOConfig) -> bool:
    """Whether ``run`` holds a finished run of ``rcfg``; a run made with other settings is an error."""
    from saereward.rl.grpo import settings_diff

    if not (run / "config.json").is_file():
        return False
    diff = settings_diff(json.loads((run / "config.json").read_text()), rcfg)
    if diff:
        raise SaeRewardError(
            f"{run} holds a run with other settings ({', '.join(diff[:4])}): use another --out, or delete it"
        )
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text())["steps"] == rcfg.steps


def _final_eval(run: Path) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval_accuracy" in r]
    if not evals:
        raise SaeRewardError(f"run {run} has no held-out evaluation: it did not finish")
    return evals[-1], [(int(r["step"]), float(r["eval_accuracy"])) for r in evals]


def run_gate_g2(cfg: GateG2Config, lm_factory: Any = None) -> dict[str, Any]:
    """Run (or resume) every reward × seed, then compute the table and verdict. ``lm_factory`` is for tests.

    Before the first run, every reward's settings get the trainer's checks (pack and SAE against the
    model and layer, the direction's rollouts, the verifier), so bad input fails at once, not after
    the earlier rewards' runs. A finished run is reused only if its saved settings match."""
    from saereward.rl.grpo import GRPOTrainer, run_train_rl

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
    runs: list[tuple[str, int, Path, GRPOConfig]] = []
    for reward in cfg.rewards:
        for seed in cfg.seeds:
            run = out / f"{LABELS[reward]}_{reward}_seed{seed}"
            rcfg = dataclasses.replace(cfg.rl, reward=reward, seed=seed, out=str(run))  # type: ignore[arg-type]
            runs.append((reward, seed, run, rcfg))
    todo = [r for r in runs if not _finished(r[2], r[3])]
    if todo:
        from saereward.lm import load_model

        lm = (
            lm_factory()
            if lm_factory
            else load_model(cfg.rl.model, dtype=cfg.rl.dtype, threads=cfg.rl.threads)
        )
        for reward in dict.fromkeys(r[0] for r in todo):
            GRPOTrainer(next(r[3] for r in todo if r[0] == reward), lm=lm, check_only=True)
        del lm
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    finals: dict[str, dict[int, dict[str, Any]]] = {}
    for reward, seed, run, rcfg in runs:
        if not _finished(run, rcfg):
            run_train_rl(rcfg, lm=lm_factory() if lm_factory else None)
        final, curve = _final_eval(run)
        finals.setdefault(reward, {})[seed] = final
        curves.setdefault(reward, {})[seed] = curve
    table: dict[str, Any] = {}
    for reward, per_seed in finals.items():
        k = sum(int(f["eval_correct"]) for f in per_seed.values())
        n = sum(int(f["eval_n"]) for f in per_seed.values())
        ci = wilson_ci(k, n)
        accs = [float(f["eval_accuracy"]) for f in per_seed.values()]
        base = [c[0][1] for c in curves[reward].values()]
        table[reward] = {
            "label": LABELS[reward],
            "accuracy": sum(accs) / len(accs),
            "pooled_correct": k,
            "pooled_n": n,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "per_seed": {str(s): a for s, a in zip(per_seed, accs, strict=True)},
            "start_accuracy": sum(base) / len(base),
        }
    verdict = "INCOMPLETE"
    checks: dict[str, Any] = {}
    if len(cfg.seeds) < cfg.min_seeds:
        checks["note"] = f"{len(cfg.seeds)} seed(s) < min_seeds {cfg.min_seeds}: no verdict"
    elif {"outcome", "sae", "direction"} <= set(table):
        r0, r1, r2 = (table[x]["accuracy"] for x in ("outcome", "sae", "direction"))
        checks = {
            "r1_minus_r0": r1 - r0,
            "r1_minus_r2": r1 - r2,
            "r1_over_r0_ok": r1 >= r0 + cfg.r1_over_r0,
            "r1_over_r2_ok": r1 - r2 >= cfg.r1_over_r2,
        }
        verdict = "PASS" if checks["r1_over_r0_ok"] and checks["r1_over_r2_ok"] else "FAIL"
    result = {
        "gate": "G2",
        "verdict": verdict,
        "rule": f"acc(R1) >= acc(R0) + {cfg.r1_over_r0} and acc(R1) - acc(R2) >= {cfg.r1_over_r2}",
        "checks": checks,
        "seeds": list(cfg.seeds),
        "steps": cfg.rl.steps,
        "n_eval_per_run": next(iter(next(iter(finals.values())).values()))["eval_n"],
        "table": table,
        "curves": {r: {str(s): c for s, c in v.items()} for r, v in curves.items()},
        "config": to_dict(cfg),
        "saereward_version": __version__,
    }
    write_json(out / "gate_g2.json", result)
    _plot(result, out / "gate_g2.png")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for reward, per_seed in result["curves"].items():
        steps = sorted({s for c in per_seed.values() for s, _ in c})
        mean = [sum(dict(c).get(s, float("nan")) for c in per_seed.values()) / len(per_seed) for s in steps]
        ax.plot(steps, mean, marker="o", label=f"{LABELS[reward]} ({reward})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"G2: mean over seeds {result['seeds']}")
    ax.legend()
    save_figure(fig, path)


def format_g2(result: dict[str, Any]) -> str:
    lines = [
        f"Stage Gate 2: {result['steps']} steps per run, seeds {result['seeds']}, "
        f"{result['n_eval_per_run']} held-out questions per run",
        f"{'reward':14} {'start':>6} {'final':>6} {'95% CI (pooled)':>17}  per seed",
    ]
    for reward, t in result["table"].items():
        per = ", ".join(f"{a:.3f}" for a in t["per_seed"].values())
        lines.append(
            f"{t['label'] + ' ' + reward:14} {t['start_accuracy']:>6.3f} {t['accuracy']:>6.3f} "
            f"[{t['ci_low']:.3f}, {t['ci_high']:.3f}]  {per}"
        )
    lines.append(f"verdict: {result['verdict']}  ({result['rule']})")
    return "\n".join(lines)
