"""Tasks: problems with gold answers, answer extraction, verifiers, and prompt formats.

    task = load_task("chain_sum", n=64, seed=0)      # reasoning-gym, 2 terms of 1-2 digits
    item = task.items()[0]
    prompt = format_prompt(task, item, "fewshot", shots=2)
    ok = task.verify(item, completion)               # cut -> extract -> compare

Registered names (:func:`available_tasks`):

=====================  ==========================================================  ===============
name                   what                                                        offline source
=====================  ==========================================================  ===============
``chain_sum``          reasoning-gym sums/differences (default 2 terms, 1-2 digits)  generated
``basic_arithmetic``   reasoning-gym mixed arithmetic expressions                  generated
``gsm_symbolic``       reasoning-gym GSM8K-derived templates                       generated
``gsm8k``              GSM8K test (numeric answers)                                100 real items
``mmlu``               MMLU test (letter answers)                                  2,850 items
``math500``            MATH-500 (checked by math-verify)                           none: ``path=``
``canaries``           reward-hacking canaries (5 patterns, :mod:`.canaries`)      generated
``rg:<name>``          any reasoning-gym generator, ``**params`` = its config      generated
=====================  ==========================================================  ===============

Each loader takes ``n`` (``None`` = all, or 200 generated items), ``seed``, ``source`` (``auto``,
``offline``, ``jsonl``, ``hf``) and ``path`` (a JSONL file). ``auto`` never goes to the network.
A request the data cannot satisfy is a one-line :class:`~saereward.errors.SaeRewardError` that names
the fix: ``n`` above what exists (the message gives the maximum), an unknown name, a bad config key,
a missing package, or the hub asked for while offline.

The registry is a plain dict from name to loader (:func:`register_task` adds one). The CLI derives
its choices from :func:`available_tasks`, so it never keeps a separate list of names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from saereward.errors import SaeRewardError
from saereward.tasks import canaries, gsm8k, math500, mmlu, rgym
from saereward.tasks.base import Task, TaskItem
from saereward.tasks.extract import (
    canonical_number,
    cut_completion,
    extract_choice,
    extract_flexible,
    extract_strict,
    numbers_equal,
)
from saereward.tasks.prompts import PROMPT_FORMATS, format_prompt
from saereward.tasks.rgym import rg_datasets

__all__ = [
    "PROMPT_FORMATS",
    "Task",
    "TaskItem",
    "available_tasks",
    "canonical_number",
    "cut_completion",
    "extract_choice",
    "extract_flexible",
    "extract_strict",
    "format_prompt",
    "load_task",
    "numbers_equal",
    "register_task",
    "rg_datasets",
]

TaskLoader = Callable[..., Task]
"""``loader(*, n, seed, source, path, **params) -> Task``"""

_REGISTRY: dict[str, TaskLoader] = {
    **{name: functools.partial(rgym.load, name) for name in rgym.REGISTERED},
    "gsm8k": gsm8k.load,
    "mmlu": mmlu.load,
    "math500": math500.load,
    "canaries": canaries.load,
}


def register_task(name: str, loader: TaskLoader) -> None:
    """Add a task under ``name``. Names are unique, and the ``rg:`` prefix is reserved."""
    if name in _REGISTRY or name.startswith("rg:"):
        raise ValueError(f"task name {name!r} is taken or reserved")
    _REGISTRY[name] = loader


def available_tasks() -> list[str]:
    """Registered task names, sorted. Any reasoning-gym generator is also available as ``rg:<name>``."""
    return sorted(_REGISTRY)


def load_task(
    name: str,
    *,
    n: int | None = None,
    seed: int = 0,
    source: str = "auto",
    path: str | None = None,
    **params: Any,
) -> Task:
    """Load task ``name`` (a registered name or ``rg:<generator>``); see the module docstring."""
    if name.startswith("rg:"):
        return rgym.load(name[3:], n=n, seed=seed, source=source, path=path, **params)
    loader = _REGISTRY.get(name)
    if loader is None:
        raise SaeRewardError(
            f"unknown task {name!r}; available: {', '.join(available_tasks())}, "
            "or rg:<name> for any reasoning-gym dataset (e.g. rg:leg_counting)"
        )
    return loader(n=n, seed=seed, source=source, path=path, **params)
