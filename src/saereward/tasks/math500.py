"""MATH-500: 500 competition problems (Lightman et al.'s subset of MATH) checked by ``math-verify``.

Sources (``source=``):

``jsonl``
    A local file with ``problem`` and ``answer`` per line, optionally ``solution``, ``unique_id``,
    ``subject`` and ``level``. This is the layout of ``HuggingFaceH4/MATH-500``, so a dump of the
    hub dataset works as is.
``hf``
    ``HuggingFaceH4/MATH-500`` (``test``) via :mod:`datasets`. Fails in seconds when the hub cannot
    be reached.
``auto`` (default)
    ``jsonl`` when ``path`` is given, else ``hf``. No PyPI package ships MATH-500, so there is no
    offline source. Without network, pass ``path=`` a JSONL file.

Item ids are ``math500-{row:03d}`` in source order; the dataset's ``unique_id`` is kept in ``meta``.

Verification follows math-verify's contract. The gold answer is wrapped as ``$\\boxed{answer}$`` and
parsed. The completion, cut at the next few-shot question, is parsed with the default LaTeX and
plain-expression extractors. Then ``verify(gold, prediction)`` compares them symbolically, so
``\\frac{1}{2}``, ``0.5`` and ``\\boxed{\\dfrac12}`` all match. :meth:`MATH500Task.extract` returns
the string that math-verify matched.

Timeouts: math-verify bounds each parse and comparison with ``signal.alarm``, which only works on the
main thread. Elsewhere (a data-loader worker, a thread pool) it raises. So the timeouts are used on
the main thread and switched off (``parsing_timeout=None``, ``timeout_seconds=None``) on any other,
where the caller owns the time budget.

Few-shot demos are four hand-written problems, with solutions that end in ``\\boxed{}``.
"""

from __future__ import annotations

import threading
from typing import Any

from saereward.errors import SaeRewardError
from saereward.tasks.base import (
    DemoTask,
    TaskItem,
    check_params,
    describe_fixed,
    load_hf_rows,
    read_jsonl,
    require_fields,
    resolve_source,
    select_n,
)
from saereward.tasks.extract import cut_completion

__all__ = ["MATH500_DEMOS", "MATH500Task", "load"]

SOURCES = ("auto", "jsonl", "hf")
HF_REPO = "HuggingFaceH4/MATH-500"
TIMEOUT_S = 5

MATH500_DEMOS: tuple[tuple[str, str], ...] = (
    (
        "What is $\\frac{1}{2} + \\frac{1}{3}$? Express your answer as a common fraction.",
        "$\\frac{1}{2} + \\frac{1}{3} = \\frac{3}{6} + \\frac{2}{6} = \\frac{5}{6}$. "
        "The answer is $\\boxed{\\frac{5}{6}}$.",
    ),
    (
        "Solve for $x$: $3x - 7 = 11$.",
        "Adding 7 to both sides gives $3x = 18$, so $x = 6$. The answer is $\\boxed{6}$.",
    ),
    (
        "What is the greatest common divisor of 84 and 120?",
        "$84 = 2^2 \\cdot 3 \\cdot 7$ and $120 = 2^3 \\cdot 3 \\cdot 5$, so the gcd is "
        "$2^2 \\cdot 3 = 12$. The answer is $\\boxed{12}$.",
    ),
    (
        "A right triangle has legs of length 5 and 12. What is the length of its hypotenuse?",
        "By the Pythagorean theorem the hypotenuse is $\\sqrt{5^2 + 12^2} = \\sqrt{169} = 13$. "
        "The answer is $\\boxed{13}$.",
    ),
)
"""Hand-written demos (question, answer text) in MATH style."""


def _timeouts() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError:
        raise SaeRewardError("the math500 task needs math-verify: pip install 'saereward[math]'") from None
    return math_verify


def _parse(text: str) -> list[Any]:
    parse = _math_verify().parse

    # parsing_timeout=None is math-verify's documented way to skip its signal-based timeout.
    return list(parse(text, parsing_timeout=_timeouts()))


class MATH500Task(DemoTask):
    """MATH-500 items verified symbolically by math-verify; see the module docstring."""

    name = "math500"

    def __init__(self, items: list[TaskItem], description: dict[str, Any]) -> None:
        super().__init__(items, MATH500_DEMOS, description)
        self._gold_cache: dict[str, list[Any]] = {}

    def _gold(self, item: TaskItem) -> list[Any]:
        parsed = self._gold_cache.get(item.id)
        if parsed is None:
            parsed = _parse("$\\boxed{" + item.gold + "}$")
            self._gold_cache[item.id] = parsed
        return parsed

    def extract(self, item: TaskItem, completion: str) -> str | None:
        parsed = _parse(cut_completion(completion))
        if not parsed:
            return None
        strings = [p for p in parsed if isinstance(p, str)]
        return strings[-1] if strings else str(parsed[0])

    def verify(self, item: TaskItem, completion: str) -> bool:
        verify = _math_verify().verify
        pred = _parse(cut_completion(completion))
        if not pred:
            return False
        return bool(verify(self._gold(item), pred, timeout_seconds=_timeouts()))


def _make_item(row: dict[str, Any], index: int, where: str) -> TaskItem:
    require_fields(row, ("problem", "answer"), where)
    meta: dict[str, Any] = {k: row[k] for k in ("solution", "unique_id", "subject", "level") if k in row}
    return TaskItem(
        id=f"math500-{index:03d}", question=str(row["problem"]).strip(), gold=str(row["answer"]), meta=meta
    )


def load(
    *, n: int | None = None, seed: int = 0, source: str = "auto", path: str | None = None, **params: Any
) -> MATH500Task:
    """Load MATH-500 from ``source``; see the module docstring."""
    check_params("math500", params, ())
    resolved = resolve_source(
        "math500", source, path, SOURCES, auto="hf", jsonl_needs="a JSONL file with problem/answer fields"
    )

    if resolved == "jsonl":
        assert path is not None
        rows = read_jsonl(path, "math500")
        items = [_make_item(r, i, f"{path} row {i + 1}") for i, r in enumerate(rows)]
    else:
        rows = load_hf_rows(
            HF_REPO,
            None,
            "test",
            task="math500",
            fix="MATH-500 has no offline copy: pass path= a JSONL file with 'problem' and 'answer' per line",
        )
        items = [_make_item(r, i, f"{HF_REPO} row {i}") for i, r in enumerate(rows)]

    chosen = select_n(items, n, seed, "math500")
    description = describe_fixed("math500", resolved, path, chosen, len(items), seed, {})
    return MATH500Task(chosen, description)
