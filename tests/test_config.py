"""Config resolution: defaults < TOML < flags < --set; unknown keys and bad values are one-line errors."""

from __future__ import annotations

import argparse
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from saereward.analysis.evaluate import BaselineConfig, EvalConfig
from saereward.config import add_config_args, config_from_args, from_dict, parse_set, to_dict
from saereward.errors import SaeRewardError


def _parse(argv: list[str], cls: type = EvalConfig):
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return config_from_args(cls, p.parse_args(argv))


def test_defaults_and_frozen() -> None:
    cfg = _parse([])
    assert cfg == EvalConfig()
    with pytest.raises(FrozenInstanceError):
        cfg.n = 3  # type: ignore[misc]


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('n = 10\nseed = 4\ntask = "gsm8k"\n[task_params]\nmin_terms = 3\n')
    cfg = _parse(["--config", str(toml), "--n", "20", "--set", "seed=7", "--set", "task_params.max_terms=3"])
    assert (cfg.n, cfg.seed, cfg.task) == (20, 7, "gsm8k")
    assert cfg.task_params == {"min_terms": 3, "max_terms": 3}


def test_types_coerced() -> None:
    cfg = _parse(["--sample", "--temperature", "0.5", "--n", "none"])
    assert cfg.sample is True and cfg.temperature == 0.5 and cfg.n is None
    b = _parse(["--formats", "raw,chat"], BaselineConfig)
    assert b.formats == ("raw", "chat")
    # list flags take several values, comma lists, or both
    assert _parse(["--formats", "raw", "chat"], BaselineConfig).formats == ("raw", "chat")
    assert _parse(["--formats", "raw,fewshot", "chat"], BaselineConfig).formats == ("raw", "fewshot", "chat")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--set", "nosuchkey=1"], "unknown config key 'nosuchkey'"),
        (["--set", "n=abc"], "not a valid int"),
        (["--set", "prompt_format=xml"], "choose one of"),
        (["--set", "n=0"], "n must be >= 1"),
        (["--set", "sample=maybe"], "not a boolean"),
        (["--set", "novalue"], "key=value"),
        (["--set", "temperature=nan"], "temperature=nan is not a finite number"),
        (["--temperature", "inf"], "is not a finite number"),
        (["--set", "n=1e999"], "n=inf is not a whole number"),
    ],
)
def test_bad_values_are_one_line_errors(argv: list[str], needle: str) -> None:
    with pytest.raises(SaeRewardError, match=needle) as ei:
        _parse(argv)
    assert "\n" not in str(ei.value)


def test_one_value_where_a_list_goes() -> None:
    """``--set layers=15`` and TOML ``layers = 15`` give a one-element list, as ``--layers 15`` does."""
    from saereward.data.collect import CollectConfig

    assert from_dict(CollectConfig, {"layers": 15}).layers == (15,)
    assert _parse(["--set", "layers=15"], CollectConfig).layers == (15,)
    assert from_dict(CollectConfig, {"layers": [3, 5]}).layers == (3, 5)
    with pytest.raises(SaeRewardError, match="not a finite number"):
        from_dict(EvalConfig, {"temperature": float("nan")})


def test_baseline_batch_size_is_checked_before_the_model_loads() -> None:
    with pytest.raises(SaeRewardError, match="batch_size must be >= 1"):
        _parse(["--batch-size", "0"], BaselineConfig)


def test_missing_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match="not found"):
        _parse(["--config", str(tmp_path / "nope.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("n = = 3")
    with pytest.raises(SaeRewardError, match="not valid TOML"):
        _parse(["--config", str(bad)])


def test_to_dict_roundtrip() -> None:
    cfg = EvalConfig(n=5, task_params={"a": 1})
    assert from_dict(EvalConfig, to_dict(cfg)) == cfg


def test_parse_set_values() -> None:
    assert parse_set(["a=1", "b=true", "c=x y", "d=[1,2]"]) == [
        ("a", 1),
        ("b", True),
        ("c", "x y"),
        ("d", [1, 2]),
    ]


def test_example_configs_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    cfg = _parse(["--config", str(root / "eval.toml")])
    assert cfg.task == "chain_sum" and cfg.task_params["max_terms"] == 2


def test_package_root_is_light_and_lazy() -> None:
    import subprocess
    import sys

    code = "import sys, saereward; assert 'torch' not in sys.modules; print(saereward.load_sae.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "saereward.sae.formats"
