"""Option groups shared by the stage configs: which model, where it runs, which task.

A stage config that loads a model, or draws task items, inherits the groups it needs instead of
declaring the same fields again. The fields stay flat: a group's fields are the config's own, so CLI
flags (``--model``, ``--device``, ``--task-path``) and TOML keys (``model = ...`` at the top of a
stage's table) are unchanged, and a stage may re-declare a field to give it another default or a
more specific help. Groups are listed in reverse order of appearance
(``class C(TaskOptions, DeviceOptions, ModelOptions)`` puts ``model`` first in ``--help``), since a
dataclass collects its bases' fields from the last base to the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saereward.config import option
from saereward.model.lm import DEFAULT_MODEL, DType

__all__ = ["DeviceOptions", "ModelOptions", "PackOptions", "TaskOptions"]


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """The language model a stage loads."""

    model: str = option(DEFAULT_MODEL, "model: embedded:<key>, a .gguf file, an HF folder or a hub id")
    dtype: DType = option("fp32", "model dtype")


@dataclass(frozen=True, kw_only=True)
class DeviceOptions:
    """Where a stage computes."""

    device: str = option("cpu", "where the model runs: cpu, cuda or cuda:N")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """The task whose items a stage draws (``saereward tasks`` lists them)."""

    task: str = option("chain_sum", "task (see `saereward tasks`)")
    task_source: str = option("auto", "where the task data comes from: auto, offline, hf, jsonl")
    task_path: str | None = option(None, "local JSONL file for the task (GSM8K or MATH format)")
    task_params: dict[str, Any] = option({}, "extra task settings, e.g. reasoning-gym config (TOML table)")


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    """A feature pack, the SAE it indexes and the model whose residuals they score (reward servers)."""

    pack: str = option("", "feature pack (pack.json) whose score is the mech term")
    sae: str | None = option(None, "SAE the pack indexes (default: the path the pack recorded)")
    model: str | None = option(None, "model whose residuals are scored (default: the pack's model)")
    dtype: DType = option("fp32", "model dtype")
    device: str = option("cpu", "where the model runs: cpu, cuda or cuda:N")
