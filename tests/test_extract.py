"""Answer extraction: the documented edge-case table plus hypothesis properties.

The tables below are the same as docs/answer_extraction.md; change both together.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saereward.tasks.extract import (
    canonical_number,
    cut_completion,
    extract_boxed,
    extract_choice,
    extract_flexible,
    extract_last_line,
    extract_phrase,
    extract_strict,
    extract_tagged,
    numbers_equal,
)

# (completion, strict, flexible)
NUMERIC_CASES = [
    ("15 - 43 = -28", None, "-28"),
    ("5-3", None, "3"),
    ("The answer is 12. Check: 12 - 5 = 7", "12", "12"),
    ("It costs $1,234.50.", None, "1234.5"),
    ("The discount is 25%.", None, "25"),
    ("So 3.50 + 1.50 = 5.00", None, "5"),
    ("x = 5.0", None, "5"),
    ("about .5 liters", None, "0.5"),
    ("007 agents", None, "7"),
    ("-0", None, "0"),
    ("\u22127 degrees", None, "-7"),
    ("Answer: -$5", None, "-5"),
    ("The answer is: **42**", None, "42"),
    ("The final answer is 9.", None, "9"),
    ("the answer is -5", None, "-5"),
    ("The answer is 72 apples.", "72", "72"),
    ("#### 1,000", "1000", "1000"),
    ("#### 5\nThe answer is 6", "6", "6"),
    ("#### 18\n\nQuestion: next one #### 99", "18", "18"),
    ("She has 6.\nQ: What is 2 + 2?\nA: 4", None, "6"),
    ("3 + 3 = 6\nProblem: 7 + 1", None, "6"),
    ("$\\boxed{\\frac{1}{2}}$", None, "1/2"),
    ("\\boxed{-\\dfrac{3}{6}}", None, "-1/2"),
    ("The total is \\boxed{1,234} dollars, not 7.", None, "1234"),
    ("\\boxed{x} so x = 4", None, "4"),
    ("1,2345", None, "2345"),
    ("100,200 and 300", None, "300"),
    ("between 100,200", None, "100200"),
    ("It takes 3:45 hours", None, "45"),
    ("1 234", None, "234"),
    ("1e3", None, "3"),
    ("no numbers here", None, None),
    ("", None, None),
]

# (completion, letter)
CHOICE_CASES = [
    ("B", "B"),
    ("(B)", "B"),
    ("B. $0 $25000 $0", "B"),
    ("Answer: C", "C"),
    ("The answer is D.", "D"),
    ("The correct answer is (B) because A is wrong", "B"),
    ("A good choice is (C)", "C"),
    ("I think A is right", "A"),
    ("the answer is a bit unclear, C", "C"),
    ("answer is **B**", "B"),
    ("Option D", "D"),
    ("A) 5\nQ: next\nA: B", "A"),
    ("E", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), NUMERIC_CASES)
def test_numeric_edge_cases(text: str, strict: str | None, flexible: str | None) -> None:
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize(("text", "letter"), CHOICE_CASES)
def test_choice_edge_cases(text: str, letter: str | None) -> None:
    assert extract_choice(text) == letter


@pytest.mark.parametrize(
    ("text", "canon"),
    [("$1,234.50", "1234.5"), ("5.0", "5"), ("-0.0", "0"), ("+3", "3"), ("1/2", "1/2"), ("4/2", "2"),
     ("25%", "25"), ("7.", "7"), ("abc", None), ("", None), ("nan", None), ("1/0", None)],
)  # fmt: skip
def test_canonical_number(text: str, canon: str | None) -> None:
    assert canonical_number(text) == canon


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [("0.5", "1/2", True), ("3.50", "3.5", True), ("1,000", "1000", True), ("1", "2", False),
     (None, "1", False), ("0.3333333", "1/3", True), ("0.333", "1/3", False), ("abc", "abc", True),
     ("abc", "1", False), (" x ", "x", True)],
)  # fmt: skip
def test_numbers_equal(a: str | None, b: str, equal: bool) -> None:
    assert numbers_equal(a, b) is equal


def test_cut_completion_is_a_prefix() -> None:
    assert cut_completion("A: 5\nQ: more") == "A: 5"
    assert cut_completion("x\nQuestion: y\nQ: z") == "x"
    assert cut_completion("no marker") == "no marker"
    assert cut_completion("Q: at the very start") == "Q: at the very start"  # needs a newline before


def test_small_extractors() -> None:
    assert extract_tagged("<answer> 5 </answer> then <answer>6</answer>") == "6"
    assert extract_tagged("none") is None
    assert extract_boxed("\\boxed{\\frac{1}{2}} and \\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_phrase("so the answer is nus.") == "nus"
    assert extract_phrase("Answer: **yes**") == "yes"
    assert extract_phrase("nothing") is None
    assert extract_last_line("a\n\n  b  \n\n") == "b"
    assert extract_last_line("  \n ") is None


# ---- properties -------------------------------------------------------------------------------

# Filler text: no digits, no ':' (so no "\nQ:" cut marker), no '\\' (no \boxed), no '$' or '-'.
FILLER = st.text(alphabet=st.sampled_from(list("abcdefghij klmnopqrstuvwxyz ABCXYZ.,!?\n")), max_size=40)


@st.composite
def formatted_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """(number as a model might write it, canonical form computed independently)."""
    negative = draw(st.booleans())
    int_part = draw(st.integers(min_value=0, max_value=10**12))
    frac = draw(st.one_of(st.just(""), st.text(alphabet="0123456789", min_size=1, max_size=6)))
    commas = draw(st.booleans())
    dollar = draw(st.booleans())
    body = f"{int_part:,}" if commas else str(int_part)
    if frac:
        body += "." + frac
    written = ("-" if negative else "") + ("$" if dollar else "") + body
    frac_trim = frac.rstrip("0")
    value = f"{int_part}.{frac_trim}" if frac_trim else str(int_part)
    is_zero = Decimal(value) == 0
    canon = value if (not negative or is_zero) else "-" + value
    return written, canon


@settings(max_examples=300, deadline=None)
@given(
    num=formatted_numbers(), before=FILLER, after=FILLER, trailing=st.sampled_from(["", ".", "%", " units"])
)
def test_flexible_finds_the_number_in_filler(
    num: tuple[str, str], before: str, after: str, trailing: str
) -> None:
    written, canon = num
    text = f"{before} {written}{trailing} {after}"
    assert extract_flexible(text) == canon
    assert numbers_equal(extract_flexible(text), written)


@settings(max_examples=200, deadline=None)
@given(num=formatted_numbers(), before=FILLER)
def test_strict_reads_the_gsm8k_marker(num: tuple[str, str], before: str) -> None:
    written, canon = num
    assert extract_strict(f"{before}\n#### {written}") == canon
    assert extract_strict(f"{before}\nThe answer is {written}.") == canon
    assert extract_strict(before) is None


_NO_MARKER = st.text(max_size=60).filter(lambda s: cut_completion(s + "\nQ:") == s)


@settings(max_examples=300, deadline=None)
@given(prefix=_NO_MARKER, suffix=st.text(max_size=60))
def test_text_after_next_question_never_matters(prefix: str, suffix: str) -> None:
    tail = "\nQ:" + suffix
    assert extract_flexible(prefix + tail) == extract_flexible(prefix)
    assert extract_strict(prefix + tail) == extract_strict(prefix)
    assert extract_choice(prefix + tail) == extract_choice(prefix)


@settings(max_examples=200, deadline=None)
@given(
    letter=st.sampled_from("ABCD"),
    template=st.sampled_from(["{L}", "({L})", "{L}.", "{L}) because", "Answer: {L}", "The answer is {L}.",
                              "answer is ({L})", "**{L}**"]),
    after=st.text(alphabet=st.sampled_from(list("abcxyz XYZ.,!?\n")), max_size=40),
)  # fmt: skip
def test_choice_templates(letter: str, template: str, after: str) -> None:
    # The filler follows the stated answer and has no capital A-D, so it can state no other choice.
    # It starts on a new line: "A good ..." on the same line would read as the article.
    assert extract_choice(template.format(L=letter) + "\n" + after) == letter


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_extractors_never_raise(text: str) -> None:
    for fn in (extract_flexible, extract_strict, extract_choice, extract_phrase, extract_last_line):
        out = fn(text)
        assert out is None or isinstance(out, str)
    flex = extract_flexible(text)
    assert flex is None or canonical_number(flex) == flex


def test_a_number_past_the_digit_bound_is_none_at_once() -> None:
    """More than MAX_DIGITS digits either side of the point is no answer (and writing one out costs
    minutes, or raises past Python's 4,300-digit limit); up to the bound is a number."""
    import time

    from saereward.tasks.extract import MAX_DIGITS, canonical_number

    t0 = time.perf_counter()
    for text in ("1e999999", "1e-999999", "7" * (2 * MAX_DIGITS + 1), "1" * 5000 + "/3"):
        assert canonical_number(text) is None
    assert time.perf_counter() - t0 < 1
    assert canonical_number("9" * MAX_DIGITS) == "9" * MAX_DIGITS
    assert canonical_number("12e3") == "12000" and canonical_number("-3/6") == "-1/2"
