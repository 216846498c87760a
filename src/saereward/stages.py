"""The stage registry: every stage of a pipeline run, described once.

A **stage** (``rollouts``, ``sae``, ``g2``, ...) is what ``saereward pipeline`` runs, skips or
re-runs as a unit. It runs one or more **steps**; a step is one subcommand of the CLI with its
config table (the TOML table of a preset, e.g. ``[train_sae]``), its config dataclass and its run
function. A stage also names the stages it reads from (``depends``), the paths it writes inside the
run folder (``outputs``, rebuilt beside the old ones by ``--force``) and its **artifact**, the file whose presence
means it finished.

The pipeline, the CLI, the report and ``docs/run_layout.md`` all read this table, so a new stage is
added here once. Config classes and run functions are named as ``"module:attribute"`` and imported
on first use (:func:`load`): this module imports nothing heavy, so ``saereward --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["STAGES", "STAGE_NAMES", "Stage", "Step", "depends", "load", "run_layout_table", "stage", "step"]


@dataclass(frozen=True)
class Step:
    """One subcommand run by a stage."""

    table: str  #: the preset's TOML table and the key of its config in the stage's configs
    command: str  #: the CLI subcommand
    config: str  #: ``"module:Class"``, the frozen config dataclass
    run: str  #: ``"module:function"``, called with the config
    help: str  #: the subcommand's one-line help


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline run (paths are relative to the run folder)."""

    name: str
    steps: tuple[Step, ...]
    depends: tuple[str, ...]
    artifact: str
    outputs: tuple[str, ...]
    files: str  #: what else the stage writes, for ``docs/run_layout.md``
    note: str = ""  #: how the pipeline wires it, when the command alone does not say
    #: files beside the artifact that later stages read: one missing means the stage is not done
    required: tuple[str, ...] = ()

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(s.table for s in self.steps)


def load(ref: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_G2_FILES = (
    "`RUN/g2/audit/audit.json` + `audit.png` (the truncation audit, run first); "
    "`RUN/g2/<R0_outcome|R1_sae|R2_direction>_seed<k>/` each a train-rl run: `train_log.jsonl` rows "
    "{step, outcome, mech, kl, grad_norm, completion_len, short_frac, len_mech_corr, monitor_rho, "
    "sec_step, ...; eval rows add eval_accuracy, eval_correct, eval_n and eval_bits (one 0/1 per held-out "
    "question, in summary's eval_qids order)}, `summary.json` (steps_done, collapse {collapsed, step, "
    "reason}, eval_qids, reward_form, prompt_format, format_warning), `reward_baseline.json` (fixed-scale "
    "forms), `checkpoint/`, `snapshots/step_NNNNN/` (adapter only); `gate_g2.png`, `gate_g2_length.png`"
)

STAGES: tuple[Stage, ...] = (
    Stage(
        "rollouts",
        (
            Step(
                "rollouts",
                "rollouts",
                "saereward.data.rollouts:RolloutsConfig",
                "saereward.data.rollouts:run_rollouts",
                "labelled rollouts: responses per question, verified, residuals captured during generation",
            ),
        ),
        (),
        "rollouts/summary.json",
        ("rollouts",),
        "`rollouts.jsonl` (prompt, completion, correct, split, qid, rid), `tokens.safetensors` (`layer_<L>` "
        "[tokens, d], `token_ids`, `offsets` [responses+1]), `pooled.safetensors` (`layer_<i>` [responses, d]), "
        "`config.json`",
        required=("rollouts/rollouts.jsonl", "rollouts/tokens.safetensors", "rollouts/pooled.safetensors"),
    ),
    Stage(
        "collect",
        (
            Step(
                "collect",
                "collect",
                "saereward.data.collect:CollectConfig",
                "saereward.data.collect:run_collect",
                "collect residual-stream activations (task rollouts and/or text) into resumable shards",
            ),
        ),
        (),
        "activations/manifest.json",
        ("activations",),
        "shards, `done`",
    ),
    Stage(
        "sae",
        (
            Step(
                "train_sae",
                "train-sae",
                "saereward.sae.stages:TrainSAEStageConfig",
                "saereward.sae.stages:run_train_sae",
                "train a TopK SAE (AuxK, resumable) on collected activations",
            ),
            Step(
                "eval_sae",
                "eval-sae",
                "saereward.sae.stages:EvalSAEStageConfig",
                "saereward.sae.stages:run_eval_sae",
                "evaluate an SAE: held-out FVU/L0/dead %, CE-loss and KL recovered",
            ),
        ),
        ("collect",),
        "sae/sae/eval.json",
        ("sae",),
        "`RUN/sae/train_log.jsonl` (SAE curves: step, fvu, l0, dead_pct, lr, ...), `RUN/sae/eval.json` "
        "(held-out FVU/L0/dead), `RUN/sae/sae/` the SAE (`load_sae`)",
        required=("sae/sae/weights.safetensors", "sae/sae/cfg.json"),
    ),
    Stage(
        "layers",
        (
            Step(
                "layers",
                "layers",
                "saereward.features.layers:LayersConfig",
                "saereward.features.layers:run_layers",
                "layer map (Cohen's d per layer) and logit lens of a rollout folder, with plots",
            ),
        ),
        ("rollouts",),
        "rollouts/layer_map.json",
        ("rollouts/layer_map.json", "rollouts/layer_map.png"),
        "`layer_map.png`; `layer_map.json` has `scores` {layer: top-10 mean abs d}, `peak_layer`, "
        "`logit_lens.answer_prob` [layers]",
    ),
    Stage(
        "discover",
        (
            Step(
                "discover",
                "discover",
                "saereward.features.discover:DiscoverConfig",
                "saereward.features.discover:run_discover",
                "contrastive SAE feature discovery (Cohen's d, true TopK) -> feature pack",
            ),
        ),
        ("rollouts", "sae"),
        "pack.json",
        ("pack.json", "pack.config.json", "pack.baseline.json"),
        "`pack.config.json`; `pack.baseline.json` (the reward baseline: the pack's mean score per response "
        "position on the discovery rollouts, the reference SDs and mean scored length; read by the "
        "fixed-scale reward forms). The pack's `metadata` records `task`, `prompt_format` and `generation` "
        "of its rollouts",
    ),
    Stage(
        "g1",
        (
            Step(
                "gate_g1",
                "gate-g1",
                "saereward.gates.g1_correlation:GateG1Config",
                "saereward.gates.g1_correlation:run_gate_g1",
                "Stage Gate 1: pack score vs correctness on held-out questions, with CIs and baselines",
            ),
            Step(
                "token_view",
                "token-view",
                "saereward.features.token_view:TokenViewConfig",
                "saereward.features.token_view:run_token_view",
                "per-token mech reward of a sample of rollouts (the report's viewer and G1 scatter)",
            ),
        ),
        ("discover",),
        "gate_g1.json",
        ("gate_g1.json", "token_rewards.json"),
        "the validation record, written into `pack.json`; `RUN/token_rewards.json` (per-token mech reward "
        "of a sample of rollouts, every response's pooled score)",
    ),
    Stage(
        "probe",
        (
            Step(
                "probe",
                "probe",
                "saereward.features.dual_probe:ProbeConfig",
                "saereward.features.dual_probe:run_probe",
                "fit the dual-verifier probe (logistic regression on pooled residuals), held-out AUROC",
            ),
        ),
        ("rollouts",),
        "probe.safetensors",
        ("probe.safetensors", "probe.safetensors.json"),
        "`probe.safetensors.json`",
    ),
    Stage(
        "g2",
        (
            Step(
                "gate_g2",
                "gate-g2",
                "saereward.gates.g2_rl_ablation:GateG2Config",
                "saereward.gates.g2_rl_ablation:run_gate_g2",
                "Stage Gate 2: R0 vs R1 (SAE pack) vs R2 (raw direction) GRPO, same budget, several seeds",
            ),
        ),
        ("discover", "rollouts"),
        "g2/gate_g2.json",
        ("g2",),
        "`gate_g2.json`: verdict, paired differences, lifts, collapse, warnings, audit summary; " + _G2_FILES,
    ),
    Stage(
        "g3",
        (
            Step(
                "gate_g3",
                "gate-g3",
                "saereward.gates.g3_safety:GateG3Config",
                "saereward.gates.g3_safety:run_gate_g3",
                "Stage Gate 3: target reached, MMLU kept, hack rate, monitor valid (runs the three checks)",
            ),
        ),
        ("g2", "discover"),
        "g3/gate_g3.json",
        ("g3",),
        "`RUN/g3/eval_suite/eval_suite.json`, `RUN/g3/canaries/canaries.json`, `RUN/g3/monitor/monitor.json`",
        "adapter = the R1 run of the first seed",
    ),
    Stage(
        "steer",
        (
            Step(
                "steer",
                "steer",
                "saereward.analysis.steer:SteerConfig",
                "saereward.analysis.steer:run_steer",
                "CAA steering (contrastive or pack direction, scale sweep with negative control) and "
                "single-feature add/clamp: accuracy, recovered/broken questions, McNemar",
            ),
        ),
        ("rollouts", "discover"),
        "steer/steer.json",
        ("steer",),
        "`steer.png`",
    ),
    Stage(
        "drift",
        (
            Step(
                "drift",
                "drift",
                "saereward.analysis.drift:DriftConfig",
                "saereward.analysis.drift:run_drift",
                "SAE drift across RL checkpoints: base-SAE NMSE per checkpoint, warm-started refits, "
                "per-feature drift of the pack",
            ),
        ),
        ("g2", "sae", "discover", "rollouts"),
        "drift/drift.json",
        ("drift",),
        "`drift.png`",
        "on the snapshots of the R1 run of the first seed",
    ),
    Stage(
        "report",
        (
            Step(
                "report",
                "report",
                "saereward.report.html:ReportConfig",
                "saereward.report.html:run_report",
                "one self-contained HTML report of a run folder (tables, plots, per-token reward viewer)",
            ),
        ),
        ("rollouts", "collect", "sae", "layers", "discover", "g1", "probe", "g2", "g3", "steer", "drift"),
        "report.html",
        ("report.html",),
        "reads only: it computes nothing from the model, SAE or pack",
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}
_STEPS = {st.table: st for s in STAGES for st in s.steps}


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    return _BY_NAME[name]


def step(table: str) -> Step:
    """The step whose config table is ``table`` (e.g. ``"train_sae"``)."""
    return _STEPS[table]


def depends() -> dict[str, tuple[str, ...]]:
    """``{stage: the stages it reads from}``."""
    return {s.name: s.depends for s in STAGES}


def run_layout_table() -> str:
    """The Markdown table of ``docs/run_layout.md``: stage, command(s), artifact, other files."""
    lines = [
        '| stage | command it runs | artifact (the "done" marker) | other files |',
        "|---|---|---|---|",
    ]
    for s in STAGES:
        cmd = " + ".join(f"`{st.command}`" for st in s.steps) + (f" ({s.note})" if s.note else "")
        lines.append(f"| `{s.name}` | {cmd} | `RUN/{s.artifact}` | {s.files} |")
    return "\n".join(lines) + "\n"
