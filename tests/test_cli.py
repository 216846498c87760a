"""The CLI as a user runs it: help, the eval path, and one clear error line (exit 2, no traceback) per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saereward.cli import COMMANDS, main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd.name in out
    for cmd in COMMANDS:
        with pytest.raises(SystemExit):
            main([cmd.name, "--help"])
        assert "--set KEY=VALUE" in capsys.readouterr().out


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_unknown_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown task" in _err(capsys, ["eval", "--task", "nosuchtask"]).lower()


def test_n_larger_than_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    line = _err(capsys, ["eval", "--task", "gsm8k", "--n", "500"])
    assert "100" in line


def test_unknown_model_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _err(capsys, ["eval", "--model", str(tmp_path / "nope" / "model"), "--n", "2"])
    assert "does not exist" in line


def test_gguf_that_is_not_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all")
    assert "not a GGUF" in _err(capsys, ["info", "--model", str(junk)])
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + os.urandom(64))  # right magic, garbage body
    assert "cannot load GGUF" in _err(capsys, ["info", "--model", str(fake)])


def test_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown config key" in _err(capsys, ["eval", "--set", "bogus=1"])


@pytest.mark.slow
def test_layer_out_of_range(capsys: pytest.CaptureFixture[str], smollm) -> None:
    line = _err(capsys, ["info", "--layers", "40"])
    assert "layer 40 is out of range" in line and "30" in line


@pytest.mark.slow
def test_info_with_layers(capsys: pytest.CaptureFixture[str], smollm) -> None:
    assert main(["info", "--layers", "3,-1"]) == 0
    out = capsys.readouterr().out
    assert "layers     30" in out and "d_model    576" in out
    assert "layer 3 " in out and "layer 29" in out


@pytest.mark.slow
def test_eval_writes_artifacts(tmp_path: Path, smollm, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    code = main(
        [
            "eval",
            "--n",
            "6",
            "--max-new-tokens",
            "24",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert summary["n"] == len(rows) == 6
    assert summary["correct"] == sum(r["correct"] for r in rows)
    assert summary["ci_low"] <= summary["accuracy"] <= summary["ci_high"]
    assert summary["seed"] == 0 and summary["tokens_per_s"] > 0
    assert json.loads((out / "config.json").read_text())["n"] == 6
    assert {"id", "prompt", "completion", "extracted", "gold", "correct"} <= set(rows[0])
    table = capsys.readouterr().out
    assert "chain_sum" in table and "95% CI" in table


def test_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "saereward"
    proc = subprocess.run(
        [str(exe), "eval", "--task", "gsm8k", "--n", "1000"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
