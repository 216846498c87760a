"""Bad input and OS failures end in one clear line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from saereward.cli import main
from saereward.errors import SaeRewardError
from saereward.io import read_jsonl


def test_truncated_jsonl_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"qid": "a", "correct": true}\n{"qid": "b", "corr')
    with pytest.raises(SaeRewardError, match=r"rollouts.jsonl:2: not valid JSON .*fix that line"):
        read_jsonl(path)
    path.write_text('{"qid": "a"}\n\n{"qid": "b"}\n')
    assert read_jsonl(path) == [{"qid": "a"}, {"qid": "b"}]


def test_an_os_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output path under a regular file (NotADirectoryError) is reported in one line, exit 1."""
    run = tmp_path / "run"
    run.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert main(["report", str(run), "--out", str(blocker / "report.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "blocker" in err and "writable" in err
    assert blocker.read_text() == "a file, not a folder"
