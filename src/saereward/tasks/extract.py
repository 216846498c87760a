"""Answer extraction: turn a model's free-text completion into the one answer a verifier checks.

Every extractor first applies :func:`cut_completion`. A base model that was shown a few-shot
``Q:/A:`` prompt keeps writing the pattern: after its answer it invents the next ``Q:`` and answers
that as well. Whatever follows that point is not an answer to *our* question, so it is dropped before
any search. The cut happens at the first ``"\\nQ:"``, ``"\\nProblem:"`` or ``"\\nQuestion:"``.

Numbers (:data:`NUMBER_RE`, :func:`canonical_number`)
    A number is digits with an optional decimal part (``3.50``, ``.5``) or with thousands commas in
    groups of exactly three (``1,234,567``). It may carry a leading ``$`` and a minus sign (``-5``,
    ``-$5``, the unicode minus ``−5``). A minus counts as a sign only when it is not a binary
    operator: the ``-`` in ``15 - 43`` or ``5-3`` is not a sign, but the one in ``= -28`` is.
    Trailing ``.``, ``%`` and units are simply not part of the match. The canonical form drops commas,
    ``$`` and leading zeros, and trims trailing zeros after a decimal point: ``$1,234.50`` becomes
    ``1234.5``, ``5.0`` becomes ``5`` and ``-0`` becomes ``0``.

Strict extraction (:func:`extract_strict`)
    Only the exact answer formats a GSM8K-style prompt teaches count: the number after the last
    ``#### `` marker (the GSM8K solution format) or after the last ``The answer is`` (the format
    saereward's few-shot demos use). Anything else, however clearly it states a number, is ``None``.
    The second marker departs from lm-eval's ``####``-only strict match. Without it, strict scoring
    of a model prompted with our own demos would be nearly always zero.

Flexible extraction (:func:`extract_flexible`)
    The first of these tiers that yields a number wins:

    1. the last ``\\boxed{...}`` (or ``\\fbox{...}``). A plain ``\\frac{a}{b}`` inside it becomes
       ``a/b``; otherwise the last number inside the box;
    2. the last answer marker: ``answer is N``, ``answer: N``, ``answer = N`` (any case; "final answer
       is" included; ``**``, ``$`` and ``(`` may sit between marker and number), or ``#### N``;
    3. the last number anywhere in the (cut) text, as lm-eval's GSM8K "flexible-extract" does.

    The marker tier comes before "last number" so that ``The answer is 12. Check: 12 - 5 = 7`` gives
    12, not 7.

Multiple choice (:func:`extract_choice`)
    The first explicit statement wins: ``answer is (B)``, ``Answer: C``, ``option D``, ``choice A``
    (any case). Failing that, the first standalone capital letter among the choices, e.g. ``(B)``,
    ``B.``, ``B)`` or a bare ``B``. A bare ``A`` followed by a lowercase word (``A good ...``) is read
    as the English article and skipped, unless that word is a verb or conjunction such as ``is`` or
    ``and`` (``A is correct``). Only capital letters count, so ``the answer is a bit unclear`` does
    not pick ``a``.

Comparison (:func:`numbers_equal`)
    Both sides go through :class:`fractions.Fraction`, so ``1/2``, ``0.5`` and ``0.50`` are equal.
    They match when they differ by at most 1e-6 (absolute). If either side is not a number, the two
    stripped strings are compared instead.

Documented edge cases with their expected outputs: ``docs/answer_extraction.md``; the same table is
a parametrized test in ``tests/test_extract.py``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = [
    "CUT_MARKERS",
    "NUMBER_RE",
    "canonical_number",
    "cut_completion",
    "extract_boxed",
    "extract_choice",
    "extract_flexible",
    "extract_last_line",
    "extract_phrase",
    "extract_strict",
    "extract_tagged",
    "is_number",
    "numbers_equal",
]

CUT_MARKERS: tuple[str, ...] = ("\nQ:", "\nProblem:", "\nQuestion:")
"""Where a completion is cut: the model has started inventing the next few-shot question."""

_CUT_RE = re.compile("|".join(re.escape(m) for m in CUT_MARKERS))

NUMBER_RE = re.compile(
    r"""
    (?P<sign>(?<![\w)\]}.])[-\u2212])?    # a minus that is a sign, not a binary operator
    \$?                                   # currency
    (?P<body>
        \d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?    # 1,234,567.89 (groups of exactly three)
      | \d+(?:\.\d+)?                         # 1234 or 3.50
      | \.\d+                                 # .5
    )
    """,
    re.VERBOSE,
)
"""One number as it appears in text; see the module docstring for what is and is not a number."""

_STRICT_RE = re.compile(r"(?:\#\#\#\#|The\s+answer\s+is)\s*(?P<num>" + NUMBER_RE.pattern + ")", re.VERBOSE)
_MARKER_RE = re.compile(
    r"(?:\banswer\s*(?:is|:|=)|\#\#\#\#)[\s*:=($\\]{0,6}?(?P<num>" + NUMBER_RE.pattern + ")",
    re.VERBOSE | re.IGNORECASE,
)
_FRAC_RE = re.compile(r"^(?P<sign>-?)\\[dt]?frac\{\s*(?P<p>\d+)\s*\}\{\s*(?P<q>\d+)\s*\}$")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ARTICLE_RE = re.compile(r"[ \t]+(?!(?:is|was|would|seems|looks|and|or|because|since)\b)[a-z]")
_TAG_RE_CACHE: dict[str, re.Pattern[str]] = {}
_PHRASE_RE = re.compile(r"(?i)\b(?:final\s+)?answer\s*(?:is|:)\s*:?\s*(?P<ans>.+)$", re.MULTILINE)
_CHOICE_PHRASE_RE = re.compile(
    r"(?i)\b(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option\s*|choice\s*)?[(\[*]*\s*(?P<letter>(?-i:[A-Z]))(?![\w'])"
)


def cut_completion(text: str) -> str:
    """Return ``text`` up to the first ``\\nQ:`` / ``\\nProblem:`` / ``\\nQuestion:`` (exclusive).

    This is an exact prefix of the input, so character offsets into it stay valid.
    """
    m = _CUT_RE.search(text)
    return text if m is None else text[: m.start()]


#: the most digits a number :func:`canonical_number` accepts may have before or after the point
MAX_DIGITS = 1000


def canonical_number(text: str) -> str | None:
    """Canonical form of one number written as text (``"$1,234.50"`` -> ``"1234.5"``).

    Also accepts a fraction ``"p/q"`` (returned reduced, or as an integer when whole). Returns
    ``None`` when ``text`` is not a single number, and for a number of more than :data:`MAX_DIGITS`
    digits either side of the point (``"1e999999"``): no task's answer, and writing it out would take
    minutes (or exceed Python's 4,300-digit limit on ``int``/``str`` conversions).
    """
    s = text.strip().replace("\u2212", "-").replace(",", "").replace("$", "")
    s = s.rstrip(".%").strip()
    if len(s) > 2 * MAX_DIGITS:
        return None
    if "/" in s:
        try:
            f = Fraction(s.replace(" ", ""))
        except (ValueError, ZeroDivisionError):
            return None
        return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite() or abs(d.adjusted()) > MAX_DIGITS:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def is_number(text: str | None) -> bool:
    """Whether ``text`` is a single number that :func:`canonical_number` accepts."""
    return text is not None and canonical_number(text) is not None


def _match_to_canonical(m: re.Match[str]) -> str | None:
    sign = "-" if m.group("sign") else ""
    return canonical_number(sign + m.group("body"))


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - the loop only advances to the final match
        pass
    return last


def _last_number(text: str) -> str | None:
    last = _last_match(NUMBER_RE, text)
    return None if last is None else _match_to_canonical(last)


def extract_boxed(text: str) -> str | None:
    """Raw content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced), or ``None``."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _number_in_box(content: str) -> str | None:
    cleaned = re.sub(r"\\[,!;: ]|\\\$|\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}", "", content).strip()
    cleaned = cleaned.replace("\\left", "").replace("\\right", "").strip()
    frac = _FRAC_RE.match(cleaned.replace("\u2212", "-"))
    if frac is not None:
        return canonical_number(f"{frac['sign']}{frac['p']}/{frac['q']}")
    return _last_number(cleaned)


def extract_strict(text: str) -> str | None:
    """The number after the last ``#### `` or ``The answer is`` marker, canonical; else ``None``."""
    last = _last_match(_STRICT_RE, cut_completion(text))
    return None if last is None else _match_to_canonical(last)


def extract_flexible(text: str) -> str | None:
    """The model's numeric answer by the tiers in the module docstring, canonical; else ``None``."""
    text = cut_completion(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        found = _number_in_box(boxed)
        if found is not None:
            return found
    last = _last_match(_MARKER_RE, text)
    if last is not None:
        return _match_to_canonical(last)
    return _last_number(text)


def numbers_equal(a: str | None, b: str, tol: float = 1e-6) -> bool:
    """Whether answer ``a`` equals gold ``b`` as numbers (|a - b| <= tol), else as stripped strings."""
    if a is None:
        return False
    fa, fb = _to_fraction(a), _to_fraction(b)
    if fa is None or fb is None:
        return a.strip() == b.strip()
    return abs(fa - fb) <= Fraction(tol)


def _to_fraction(text: str) -> Fraction | None:
    canon = canonical_number(text)
    if canon is None:
        return None
    return Fraction(canon)


def extract_tagged(text: str, tag: str = "answer") -> str | None:
    """Stripped content of the last ``<tag>...</tag>`` in ``text`` (not cut), or ``None``."""
    pattern = _TAG_RE_CACHE.get(tag)
    if pattern is None:
        pattern = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)
        _TAG_RE_CACHE[tag] = pattern
    matches = pattern.findall(text)
    return matches[-1].strip() if matches else None


def extract_phrase(text: str) -> str | None:
    """Free-text answer after the last ``answer is`` / ``answer:`` on a line, trailing ``.``/``**`` trimmed."""
    matches = _PHRASE_RE.findall(cut_completion(text))
    if not matches:
        return None
    ans = matches[-1].strip().strip("*").strip()
    ans = ans[:-1].rstrip() if ans.endswith(".") else ans
    return ans or None


def extract_last_line(text: str) -> str | None:
    """Last non-empty line of the cut completion, stripped; ``None`` for blank text."""
    lines = [ln.strip() for ln in cut_completion(text).splitlines() if ln.strip()]
    return lines[-1] if lines else None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter (upper case) by the rules in the module docstring, or ``None``."""
    text = cut_completion(text)
    allowed = set(letters.upper())
    for m in _CHOICE_PHRASE_RE.finditer(text):
        letter = m["letter"].upper()
        if letter in allowed:
            return letter
    for i, ch in enumerate(text):
        if ch not in allowed:
            continue
        prev = text[i - 1] if i > 0 else " "
        nxt = text[i + 1] if i + 1 < len(text) else " "
        if prev.isalnum() or prev in "'_" or nxt.isalnum() or nxt in "'_":
            continue
        if ch == "A" and _ARTICLE_RE.match(text, i + 1):
            continue  # "A good answer ...": the English article
        return ch
    return None
