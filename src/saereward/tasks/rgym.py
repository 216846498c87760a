"""Adapter for reasoning-gym's procedural datasets (``reasoning_gym.create_dataset``).

reasoning-gym (Apache-2.0, on PyPI) has about 100 generators, each with a verifier
``score_answer(answer, entry) -> float``. Any of them is a saereward task:
``load_task("rg:<name>", n=..., seed=..., **config)``. Three are also registered under their bare
names: ``chain_sum``, ``basic_arithmetic`` and ``gsm_symbolic``.

Defaults
    ``chain_sum`` defaults to 2 terms of 1-2 digits (``min_terms=max_terms=2``,
    ``min_digits=1``, ``max_digits=2``). That is the configuration measured in the design notes,
    where SmolLM2-135M is right about half the time with a 2-shot prompt: enough of a correct/wrong
    mix for contrastive discovery and room for RL. The default applies to ``chain_sum`` and
    ``rg:chain_sum`` alike. Other generators use reasoning-gym's own defaults. Keyword ``params``
    override fields of the generator's config dataclass. ``seed`` and ``size`` are set from
    ``seed`` and ``n`` (default 200). A config key the generator lacks, or a value its ``validate()``
    rejects, is a one-line :class:`SaeRewardError`.

Imports
    The three registered generators import alone (:mod:`saereward.tasks.rg_loader`); listing every
    generator, or any other ``rg:`` name, imports the whole package.

Items
    Item ``i`` is ``dataset[i]``, with id ``{name}-s{seed}-{i}``. The full reasoning-gym entry
    (question, answer, metadata) is kept in ``meta["entry"]`` because ``score_answer`` needs it.

Extraction (:meth:`ReasoningGymTask.extract`)
    1. the content of the last ``<answer>...</answer>``, the convention of reasoning-gym's own
       prompts. When gold is numeric, the number in it is canonicalised (``<answer>$1,000</answer>``
       becomes ``1000``);
    2. otherwise, when gold is a plain decimal number (``-28``, ``3.5``; not ``3/4``),
       :func:`extract_flexible`;
    3. otherwise the text after the last ``answer is`` / ``answer:``, else the last non-empty line.

Verification: ``score_answer(extracted, entry) >= 1.0``. Partial credit counts as wrong. An exception
inside a verifier counts as wrong and is logged, so one odd completion cannot stop a rollout batch.

Few-shot demos come from the same generator and config with seed ``seed + 1_000_003``, skipping any
whose question is also an evaluated item. The answer text is short and ends with the answer:
``15 - 43 = -28. The answer is -28.`` when the entry has an arithmetic ``expression``; GSM-style
worked solutions for ``gsm_symbolic``; otherwise just ``The answer is X.``
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from importlib import metadata
from typing import Any

from saereward.errors import SaeRewardError
from saereward.tasks import rg_loader
from saereward.tasks.base import TaskItem
from saereward.tasks.extract import (
    canonical_number,
    extract_flexible,
    extract_last_line,
    extract_phrase,
    extract_tagged,
)
from saereward.tasks.gsm8k import solution_to_demo

__all__ = ["DEFAULT_N", "DEMO_SEED_OFFSET", "RG_DEFAULTS", "ReasoningGymTask", "load", "rg_datasets"]

logger = logging.getLogger(__name__)

_DECIMAL_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")

DEFAULT_N = 200
DEMO_SEED_OFFSET = 1_000_003
REGISTERED = ("chain_sum", "basic_arithmetic", "gsm_symbolic")
RG_DEFAULTS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
}
"""saereward's defaults per generator, applied under both the bare and the ``rg:`` name."""


def _registry(name: str | None = None) -> dict[str, Any]:
    """reasoning-gym's generators: ``name`` alone where it imports on its own
    (:data:`saereward.tasks.rg_loader.LEAN`), else all of them."""
    try:
        return dict(rg_loader.factory(name).DATASETS)
    except ImportError:  # pragma: no cover - a declared dependency
        raise SaeRewardError(
            "reasoning-gym is not installed; run: pip install reasoning-gym==0.1.25"
        ) from None


def rg_datasets() -> list[str]:
    """Names of every reasoning-gym generator (usable as ``rg:<name>``)."""
    return sorted(_registry())


def did_you_mean(name: str) -> str:
    """``"did you mean rg:a, rg:b? "`` for the generators whose names are close to ``name``; ``""`` if none."""
    close = difflib.get_close_matches(name, rg_datasets(), n=3)
    return f"did you mean {', '.join('rg:' + c for c in close)}? " if close else ""


class ReasoningGymTask:
    """A reasoning-gym generator as a :class:`~saereward.tasks.base.Task`; see the module docstring."""

    def __init__(self, name: str, config: dict[str, Any], n: int, seed: int) -> None:
        self.name = name
        self.config = config
        self.seed = seed
        self._dataset = _create(name, config, size=n, seed=seed)
        self._items = tuple(self._make_item(self._dataset[i], i) for i in range(n))
        self._demo_cache: list[tuple[str, str]] = []
        self._demo_next = 0
        self._demo_dataset: Any = None

    def _make_item(self, entry: dict[str, Any], i: int) -> TaskItem:
        return TaskItem(
            id=f"{self.name}-s{self.seed}-{i}",
            question=str(entry["question"]),
            gold=str(entry["answer"]),
            meta={"entry": entry},
        )

    def items(self) -> tuple[TaskItem, ...]:
        return self._items

    def extract(self, item: TaskItem, completion: str) -> str | None:
        numeric = _is_decimal(item.gold)
        tagged = extract_tagged(completion)
        if tagged is not None:
            if numeric:
                return extract_flexible(tagged) or tagged
            return tagged
        if numeric:
            return extract_flexible(completion)
        return extract_phrase(completion) or extract_last_line(completion)

    def verify(self, item: TaskItem, completion: str) -> bool:
        answer = self.extract(item, completion)
        if answer is None:
            return False
        try:
            score = self._dataset.score_answer(answer, item.meta["entry"])
        except Exception:
            logger.warning(
                "%s: score_answer raised on %r; counted as wrong", self.name, answer, exc_info=True
            )
            return False
        return score is not None and float(score) >= 1.0

    def fewshot(self, k: int) -> list[tuple[str, str]]:
        if k < 0:
            raise SaeRewardError(f"few-shot count must be >= 0, got {k}; pass shots>=0")
        if self._demo_dataset is None and k > 0:
            self._demo_dataset = _create(
                self.name, self.config, size=10_000, seed=self.seed + DEMO_SEED_OFFSET
            )
        asked = {it.question for it in self._items}
        while len(self._demo_cache) < k:
            if self._demo_next >= 10_000:
                raise SaeRewardError(
                    f"{self.name}: could not find {k} demos distinct from the items; use fewer shots"
                )
            entry = self._demo_dataset[self._demo_next]
            self._demo_next += 1
            if entry["question"] not in asked:
                self._demo_cache.append((str(entry["question"]), demo_answer(entry)))
        return list(self._demo_cache[:k])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": "reasoning_gym",
            "source_version": _rg_version(),
            "path": None,
            "n": len(self._items),
            "seed": self.seed,
            "params": dict(self.config),
        }

    def __repr__(self) -> str:
        return f"<ReasoningGymTask {self.name!r} n={len(self._items)} seed={self.seed} {self.config}>"


def _is_decimal(gold: str) -> bool:
    """A plain decimal gold (``-28``, ``3.5``): numeric extraction applies. Fractions such as ``3/4``
    are not, because the number regex would read only their numerator."""
    return _DECIMAL_RE.fullmatch(gold.strip()) is not None


def demo_answer(entry: dict[str, Any]) -> str:
    """Short worked answer for a demo entry, ending with ``The answer is X.``"""
    answer = str(entry["answer"])
    meta = entry.get("metadata") or {}
    cot = meta.get("answer_cot")
    if isinstance(cot, str) and "####" in cot:
        return solution_to_demo(cot)
    expression = meta.get("expression")
    if isinstance(expression, str) and canonical_number(answer) is not None:
        return f"{expression} = {answer}. The answer is {answer}."
    return f"The answer is {answer}."


def _rg_version() -> str | None:
    try:
        return metadata.version("reasoning_gym")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return None


def _create(name: str, config: dict[str, Any], *, size: int, seed: int) -> Any:
    try:
        return rg_loader.factory(name).create_dataset(name, size=size, seed=seed, **config)
    except (AssertionError, ValueError, TypeError) as e:
        raise SaeRewardError(
            f"reasoning-gym {name!r}: invalid config {config} ({e}); fix the task params"
        ) from None


def load(
    name: str,
    *,
    n: int | None = None,
    seed: int = 0,
    source: str = "auto",
    path: str | None = None,
    **params: Any,
) -> ReasoningGymTask:
    """Build a reasoning-gym task; see the module docstring for defaults and errors."""
    registry = _registry(name)
    if name not in registry:
        raise SaeRewardError(
            f"unknown reasoning-gym dataset {name!r}; {did_you_mean(name)}see saereward.tasks.rg_datasets() "
            f"for all {len(registry)} names"
        )
    if source not in ("auto", "reasoning_gym"):
        raise SaeRewardError(f"task {name!r} is generated by reasoning-gym; drop source={source!r}")
    if path is not None:
        raise SaeRewardError(f"task {name!r} is generated by reasoning-gym and reads no file; drop path=")
    if "seed" in params or "size" in params:
        raise SaeRewardError(f"task {name!r}: pass seed= and n= to load_task, not as generator params")
    _, config_cls = registry[name]
    fields = sorted(f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size"))
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise SaeRewardError(
            f"reasoning-gym {name!r} has no config key(s) {unknown}; valid keys: {', '.join(fields)}"
        )
    size = DEFAULT_N if n is None else n
    if size < 1:
        raise SaeRewardError(f"task {name!r}: n must be at least 1, got {size}; pass a positive n or omit it")
    config = {**RG_DEFAULTS.get(name, {}), **params}
    return ReasoningGymTask(name, config, size, seed)
