"""The stage registry is the one description of the stages: the pipeline, CLI, report and docs agree."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import saereward.pipeline as pl
from saereward import cli
from saereward.report import artifacts as report
from saereward.stages import STAGE_NAMES, STAGES, load, run_layout_table, stage

ROOT = Path(__file__).resolve().parents[1]


def test_every_step_resolves_to_a_frozen_config_and_a_function() -> None:
    for s in STAGES:
        assert s.steps and s.artifact and s.outputs
        assert any(s.artifact == o or s.artifact.startswith(o + "/") for o in s.outputs), s.name
        assert all(d in STAGE_NAMES[: STAGE_NAMES.index(s.name)] for d in s.depends), s.name
        for st in s.steps:
            cls = load(st.config)
            assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
            assert callable(load(st.run))


def test_pipeline_cli_and_report_read_the_registry(tmp_path: Path) -> None:
    assert pl.STAGE_ORDER == STAGE_NAMES and {s.name: s.depends for s in STAGES} == pl.DEPENDS
    lay = pl.Layout(tmp_path)
    assert lay.artifact("g2") == tmp_path / "g2" / "gate_g2.json"
    assert lay.outputs("discover") == [tmp_path / p for p in stage("discover").outputs]
    commands = {c.name: c for c in cli.COMMANDS}
    for s in STAGES:
        for st in s.steps:
            assert commands[st.command].help == st.help
            assert commands[st.command].config() is load(st.config)
            assert st.table in pl._TABLES
    assert {s.name: s.artifact for s in STAGES if s.name != "report"} == report.STAGE_ARTIFACTS


def test_run_layout_doc_is_the_registry_table() -> None:
    doc = (ROOT / "docs" / "run_layout.md").read_text(encoding="utf-8")
    assert run_layout_table() in doc, (
        "docs/run_layout.md is out of date: paste the output of "
        "`python -c 'from saereward.stages import run_layout_table; print(run_layout_table())'`"
    )


def test_the_cli_and_the_registry_import_no_torch() -> None:
    code = "import sys, saereward.cli, saereward.pipeline, saereward.stages; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_lists_every_command_without_importing_a_stage() -> None:
    code = (
        "import sys\nfrom saereward.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, any(m.startswith('saereward.sae') for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]
    assert all(c.name in out for c in cli.COMMANDS)


def test_a_subcommand_still_gets_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train-sae", "--help"])
    assert "--train-k" in capsys.readouterr().out


def test_every_subcommand_help_imports_no_stage_module_nor_torch() -> None:
    """Each ``saereward COMMAND --help`` builds its parser from cli_schema.json: no torch, no stage module."""
    code = (
        "import sys\nfrom saereward.cli import COMMANDS, main\n"
        "for c in COMMANDS:\n"
        "    try:\n        main([c.name, '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'saereward.sae', 'saereward.rl', 'saereward.data') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"
    assert "--train-k" in out and "--reward-form" in out and "--report-to" in out


def test_the_cli_schema_matches_the_config_classes() -> None:
    """cli_schema.json (what --help and the flags are built from) is what the config classes give."""
    saved = json.loads(cli.SCHEMA.read_text(encoding="utf-8"))
    assert saved == cli.cli_schema(), (
        "src/saereward/cli_schema.json is out of date: run `python -m saereward.cli_schema`"
    )
