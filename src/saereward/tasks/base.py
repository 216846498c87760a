"""The task interface: items with gold answers, an extractor, a verifier, and few-shot demos.

A :class:`Task` is everything the rest of saereward knows about a benchmark:

* :meth:`Task.items` returns the evaluated problems, in a deterministic order for a given config and
  seed. Each :class:`TaskItem` carries only the problem text. The prompt scaffolding (``Q:``/``A:``,
  few-shot demos, chat template) is added later by :func:`saereward.tasks.format_prompt`, so a single
  task serves every prompt format.
* :meth:`Task.extract` returns the answer string the verifier compares, so that rollouts can record
  *what* was judged and not only whether it was right.
* :meth:`Task.fewshot` returns demos that never coincide with an evaluated item.
* :meth:`Task.describe` returns the resolved config (source, n, seed, params), which is written next
  to every artifact built from the task.

This module also holds the plumbing that the concrete tasks share: choosing ``n`` of ``N`` items,
finding a data file inside an installed package without importing it, reading JSONL, and loading from
the Hugging Face hub. The hub is used only when asked for, and it fails fast with a clear error when
offline.

Choosing ``n`` items from a fixed dataset (:func:`select_n`): with ``n=None`` every item is kept in
source order. Otherwise the first ``n`` indices of a permutation seeded by ``seed`` are kept, sorted
back into source order. So ``n=50`` is a subset of ``n=100`` under the same seed, different seeds give
different subsets, and asking for more than exists is an error that names the maximum.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from saereward.errors import SaeRewardError
from saereward.hub import hub_offline, hub_reachable
from saereward.io import iter_jsonl

__all__ = [
    "DemoTask",
    "Task",
    "TaskItem",
    "check_params",
    "check_source",
    "load_hf_rows",
    "package_data_dir",
    "read_jsonl",
    "require_fields",
    "select_n",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskItem:
    """One problem. ``meta`` is task-specific (the reasoning-gym entry, MMLU choices, ...).

    ``meta`` is excluded from hashing, so items can be dict keys and set members.
    """

    id: str
    question: str
    gold: str
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)


@runtime_checkable
class Task(Protocol):
    """What every task provides; see the module docstring."""

    name: str

    def items(self) -> Sequence[TaskItem]:
        """The evaluated items, in a deterministic order for the config and seed."""
        ...

    def extract(self, item: TaskItem, completion: str) -> str | None:
        """The answer the verifier uses, or ``None`` when the completion states none."""
        ...

    def verify(self, item: TaskItem, completion: str) -> bool:
        """Whether ``completion`` answers ``item`` correctly."""
        ...

    def fewshot(self, k: int) -> list[tuple[str, str]]:
        """``k`` (question, answer text) demos, none of which is an evaluated item."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable resolved config: name, source, n, seed, params."""
        ...


class DemoTask:
    """Shared implementation for tasks with fixed items and a fixed list of hand-written demos.

    Subclasses set ``name`` and call ``__init__``; they implement :meth:`extract` and :meth:`verify`.
    """

    name: str = ""

    def __init__(
        self,
        items: Sequence[TaskItem],
        demos: Sequence[tuple[str, str]],
        description: dict[str, Any],
    ) -> None:
        self._items = tuple(items)
        asked = {it.question.strip() for it in self._items}
        # A demo that is also an evaluated item would leak its answer into the prompt.
        self._demos = [d for d in demos if d[0].strip() not in asked]
        self._description = description

    def items(self) -> Sequence[TaskItem]:
        return self._items

    def fewshot(self, k: int) -> list[tuple[str, str]]:
        if k < 0 or k > len(self._demos):
            raise SaeRewardError(
                f"task {self.name!r} has {len(self._demos)} few-shot demos, asked for {k}; "
                f"use shots between 0 and {len(self._demos)}"
            )
        return list(self._demos[:k])

    def describe(self) -> dict[str, Any]:
        return dict(self._description)

    def extract(self, item: TaskItem, completion: str) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def verify(self, item: TaskItem, completion: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} n={len(self._items)}>"


def select_n(items: Sequence[TaskItem], n: int | None, seed: int, task: str) -> list[TaskItem]:
    """Keep ``n`` of ``items`` (all when ``None``) by the seeded rule in the module docstring."""
    if n is None:
        return list(items)
    if n < 1:
        raise SaeRewardError(f"task {task!r}: n must be at least 1, got {n}; pass a positive n or omit it")
    if n > len(items):
        raise SaeRewardError(
            f"task {task!r} has only {len(items)} items, asked for n={n}; pass n<={len(items)} or omit n"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


def check_params(task: str, params: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Reject unknown task parameters with a one-line error listing the accepted ones."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise SaeRewardError(f"task {task!r} got unknown parameter(s) {unknown}; accepted: {accepted}")


def check_source(task: str, source: str, allowed: Sequence[str]) -> None:
    if source not in allowed:
        raise SaeRewardError(f"task {task!r} has no source {source!r}; use one of {', '.join(allowed)}")


def resolve_source(
    task: str, source: str, path: str | None, allowed: Sequence[str], *, auto: str, jsonl_needs: str
) -> str:
    """The concrete source of a fixed dataset: ``auto`` means ``jsonl`` when ``path`` is given, else ``auto``.

    ``jsonl`` without a path, or a path with another source, is a one-line error (``jsonl_needs``
    describes the file the task expects).
    """
    check_source(task, source, allowed)
    resolved = ("jsonl" if path else auto) if source == "auto" else source
    if resolved == "jsonl" and not path:
        raise SaeRewardError(f"{task}: source 'jsonl' needs path= {jsonl_needs}")
    if path and resolved != "jsonl":
        raise SaeRewardError(f"{task}: path= is only used with source 'jsonl', not {resolved!r}; drop one")
    return resolved


def package_data_dir(package: str, install: str) -> Path:
    """Folder of an installed package, found *without* importing it.

    Some data-only packages declare Python versions they do not need, or import heavy dependencies.
    Their files are what we want, so importing them would only add risk. ``install`` is the pip
    command in the error message when the package is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SaeRewardError(f"package {package!r} is not installed; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def read_jsonl(path: str | os.PathLike[str], task: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); bad JSON is a one-line error naming the line."""
    p = Path(path)
    if not p.is_file():
        raise SaeRewardError(f"task {task!r}: no file at {str(p)!r}; pass path= an existing JSONL file")
    rows: list[dict[str, Any]] = []
    for lineno, row in iter_jsonl(p):
        if not isinstance(row, dict):
            raise SaeRewardError(f"{p}:{lineno}: expected a JSON object per line; fix that line")
        rows.append(row)
    if not rows:
        raise SaeRewardError(f"task {task!r}: {p} has no rows; pass a non-empty JSONL file")
    return rows


def describe_fixed(
    name: str,
    source: str,
    path: str | None,
    chosen: Sequence[Any],
    n_available: int,
    seed: int,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``describe()`` record of a task drawn from a fixed dataset (GSM8K, MMLU, MATH-500)."""
    return {
        "name": name,
        "source": source,
        "path": str(path) if path else None,
        "n": len(chosen),
        "n_available": n_available,
        "seed": seed,
        "params": dict(params),
    }


def require_fields(row: Mapping[str, Any], fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise SaeRewardError(f"{where}: missing field(s) {missing}; each row needs {list(fields)}")


def load_hf_rows(repo: str, config: str | None, split: str, *, task: str, fix: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset via :func:`datasets.load_dataset`, failing fast when the hub is unreachable.

    With ``HF_HUB_OFFLINE=1`` only the local ``datasets`` cache is consulted. Otherwise the endpoint
    is probed first (a few seconds at most), so a machine without network gets an error instead of
    minutes of retries. ``fix`` says what to do instead (for example, which offline source to use).
    """
    if not hub_offline():
        ok, endpoint = hub_reachable()
        if not ok:
            raise SaeRewardError(
                f"task {task!r}: cannot reach {endpoint} to download {repo}; {fix} "
                "(or set HF_HUB_OFFLINE=1 if the dataset is already in the local cache)"
            )
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SaeRewardError(
            f"task {task!r}: could not load {repo} ({config or 'default'}, {split}) from the hub "
            f"({type(e).__name__}: {first[:200]}); {fix}"
        ) from None
    logger.info("loaded %d rows of %s from the hub", len(ds), repo)
    return [dict(r) for r in ds]
