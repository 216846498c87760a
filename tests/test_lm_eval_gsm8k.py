"""GSM8K scored as lm-evaluation-harness scores it: our port against lm-eval's own filter and YAML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from saereward.tasks import lm_eval_gsm8k as lmg
from saereward.tasks import load_task

# (completion, reference solution): answers in GSM8K's format, in prose, with $ and commas, a decimal
# that is numerically right but not the same string, a follow-on question, nothing numeric
CASES: list[tuple[str, str]] = [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "48 + 24 = 72 clips.\n#### 72"),
    ("She earns 12/60 = 0.2 per minute, so 0.2 * 50 = 10. The answer is 10.", "...\n#### 10"),
    ("The total is $1,234.", "...\n#### 1234"),
    ("#### 1,234\nQuestion: what is 2+2? Answer: 4", "...\n#### 1234"),
    ("So the answer is 72.0", "...\n#### 72"),
    ("-5 degrees, then it rises by 3 to -2", "...\n#### -2"),
    ("I don't know.", "...\n#### 7"),
    ("7 apples and 8 pears make 15 fruits.\n\nQuestion: Tom has 3 cats", "...\n#### 15"),
    ("#### 18 is wrong, the right total is 20", "...\n#### 18"),
]


def _lm_eval_yaml() -> dict[str, Any]:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def test_our_constants_are_the_published_task_definition() -> None:
    spec = _lm_eval_yaml()
    filters = {f["name"]: f["filter"][0] for f in spec["filter_list"]}
    assert filters["strict-match"]["regex_pattern"] == lmg.STRICT_PATTERN
    assert filters["flexible-extract"]["regex_pattern"] == lmg.FLEXIBLE_PATTERN
    assert filters["flexible-extract"]["group_select"] == -1 and "group_select" not in filters["strict-match"]
    (metric,) = spec["metric_list"]
    assert tuple(metric["regexes_to_ignore"]) == lmg.REGEXES_TO_IGNORE
    assert metric["ignore_case"] is True and metric["ignore_punctuation"] is False
    assert tuple(spec["generation_kwargs"]["until"]) == lmg.UNTIL


@pytest.mark.parametrize("mode", lmg.LM_EVAL_MODES)
def test_scores_match_lm_evals_own_filter_on_shared_cases(mode: str) -> None:
    from lm_eval.filters.extraction import RegexFilter

    spec = _lm_eval_yaml()
    (f,) = [x["filter"][0] for x in spec["filter_list"] if x["name"] == mode]
    theirs = RegexFilter(regex_pattern=f["regex_pattern"], group_select=f.get("group_select", 0))
    ignore = spec["metric_list"][0]["regexes_to_ignore"]

    def exact_match(pred: str, ref: str) -> bool:  # lm-eval's exact_match_hf_evaluate, ignore_case on
        for s in ignore:
            pred, ref = re.sub(s, "", pred), re.sub(s, "", ref)
        return pred.lower() == ref.lower()

    for completion, reference in CASES:
        cut = lmg.cut_at_until(completion)  # generation stops there in lm-eval
        (([filtered],),) = (theirs.apply([[cut]], None),)
        assert lmg.lm_eval_filter(completion, mode) == filtered, completion  # type: ignore[arg-type]
        assert lmg.lm_eval_correct(completion, reference, mode) == exact_match(filtered, reference)  # type: ignore[arg-type]


def test_hand_checked_verdicts() -> None:
    ok = {mode: [lmg.lm_eval_correct(c, r, mode) for c, r in CASES] for mode in lmg.LM_EVAL_MODES}  # type: ignore[arg-type]
    assert ok["strict-match"] == [True, False, False, True, False, False, False, False, True]
    assert ok["flexible-extract"] == [True, True, True, True, False, True, False, True, False]


def test_the_gsm8k_task_offers_and_names_the_modes() -> None:
    task = load_task("gsm8k", n=3, seed=0, extraction="strict-match")
    item = task.items()[0]
    assert task.describe()["params"] == {"extraction": "strict-match"}  # recorded with every result
    assert task.verify(item, f"Working...\n#### {item.gold}")
    assert not task.verify(item, f"The answer is {item.gold}.")  # strict-match needs ####
    flexible = load_task("gsm8k", n=3, seed=0, extraction="flexible-extract")
    assert flexible.verify(item, f"The answer is {item.gold}.")
    assert flexible.extract(item, "no number here") is None
