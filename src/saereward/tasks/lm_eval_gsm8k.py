"""GSM8K scored the way lm-evaluation-harness scores it, so a number here compares with a published one.

lm-eval's ``gsm8k`` task (``lm_eval/tasks/gsm8k/gsm8k.yaml``, version 3.0 in lm-eval 0.4.x) reports
two filters of the same generations:

``strict-match``
    the first match of ``#### (\\-?[0-9\\.\\,]+)``: only answers in GSM8K's own ``#### N`` format count;
``flexible-extract``
    the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (the first non-empty group of it): the last
    number-like run in the text.

A response with no match becomes ``[invalid]``. The filtered string and the reference (the whole GSM8K
solution) then go through ``exact_match`` with ``ignore_case`` and ``regexes_to_ignore`` = ``,``,
``\\$``, ``(?s).*#### `` and ``\\.$``, applied in that order, and must be equal as strings: ``72.0``
does not equal ``72``, unlike saereward's own numeric comparison. Generation stops at ``Question:``
(also ``</s>`` and ``<|im_end|>``), so the text is cut there first.

These are exact ports of those definitions (``tests/test_lm_eval_gsm8k.py`` runs lm-eval's own
``RegexFilter`` with the patterns read from its installed YAML on shared cases). saereward's own
modes (``strict``/``flexible`` in :mod:`saereward.tasks.extract`) stay the default for training
rewards: they read ``The answer is N`` and boxed answers too.
"""

from __future__ import annotations

import re
from typing import Literal

LmEvalMode = Literal["strict-match", "flexible-extract"]
LM_EVAL_MODES: tuple[str, ...] = ("strict-match", "flexible-extract")

STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
REGEXES_TO_IGNORE: tuple[str, ...] = (",", r"\$", r"(?s).*#### ", r"\.$")
UNTIL: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")
INVALID = "[invalid]"

_FILTERS: dict[str, tuple[re.Pattern[str], int]] = {
    "strict-match": (re.compile(STRICT_PATTERN), 0),
    "flexible-extract": (re.compile(FLEXIBLE_PATTERN), -1),
}


def cut_at_until(text: str) -> str:
    """The text before the first of lm-eval's stop sequences."""
    cut = min((i for i in (text.find(s) for s in UNTIL) if i >= 0), default=len(text))
    return text[:cut]


def lm_eval_filter(completion: str, mode: LmEvalMode) -> str:
    """The filtered response of ``mode`` (lm-eval's ``regex`` then ``take_first``), or ``[invalid]``."""
    pattern, select = _FILTERS[mode]
    found = pattern.findall(cut_at_until(completion))
    if not found:
        return INVALID
    match = found[select]
    if isinstance(match, tuple):
        match = next(m for m in match if m)
    return str(match).strip()


def lm_eval_normalise(text: str) -> str:
    """``exact_match``'s preprocessing of both sides: the ignored regexes in order, then lower case."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def lm_eval_correct(completion: str, reference: str, mode: LmEvalMode) -> bool:
    """lm-eval's ``exact_match`` of one response under ``mode``; ``reference`` is the GSM8K solution
    (``... #### N``) or the bare number."""
    return lm_eval_normalise(lm_eval_filter(completion, mode)) == lm_eval_normalise(reference)


__all__ = [
    "FLEXIBLE_PATTERN",
    "INVALID",
    "LM_EVAL_MODES",
    "REGEXES_TO_IGNORE",
    "STRICT_PATTERN",
    "UNTIL",
    "LmEvalMode",
    "cut_at_until",
    "lm_eval_correct",
    "lm_eval_filter",
    "lm_eval_normalise",
]
