"""Every benchmark script parses its arguments: ``--help`` runs and exits 0 (catches bit-rot cheaply).

The benchmarks themselves take minutes and are run by hand (BENCHMARKS.md); this only checks that each
script still imports and builds its command line against the current library.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_there_are_benchmarks() -> None:
    assert {p.name for p in SCRIPTS} >= {"grpo_step.py", "sae_throughput.py", "trl_sae_step.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_help(
    script: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(BENCH))  # scripts import their siblings
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out
