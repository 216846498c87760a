"""Run-folder locks: a second writer is refused with the holder's PID; stale locks do not block."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saereward.errors import SaeRewardError
from saereward.lock import LOCK_NAME, folder_lock, lock_holder

HOLD = "import sys, time; from saereward.lock import folder_lock\nwith folder_lock(sys.argv[1], 'holder'):\n    print('held', flush=True); time.sleep(60)\n"


def test_a_live_holder_refuses_a_second_writer_by_pid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with (
            pytest.raises(SaeRewardError, match=rf"in use by process {proc.pid} .*\(holder\).*another --out"),
            folder_lock(run, "second"),
        ):
            pass
        holder = lock_holder(run)
        assert holder is not None and holder["pid"] == proc.pid and holder["command"] == "holder"
    finally:
        proc.kill()
        proc.wait()
    # killed with SIGKILL: its lock file is left behind, but stale, so it blocks nothing
    assert (run / LOCK_NAME).exists() and lock_holder(run) is None
    with folder_lock(run, "third"):
        assert json.loads((run / LOCK_NAME).read_text())["command"] == "third"
    assert not (run / LOCK_NAME).exists()


def test_reentry_cleanup_and_a_file_in_the_way(tmp_path: Path) -> None:
    run = tmp_path / "new" / "run"
    with folder_lock(run, "outer"):
        with folder_lock(run, "inner"):  # noqa: SIM117 - the same process may enter again
            assert (run / LOCK_NAME).exists()
        assert (run / LOCK_NAME).exists()  # only the outermost exit releases it
    assert not run.exists()  # the lock made the folder and nothing was written: removed again
    with pytest.raises(RuntimeError), folder_lock(run, "fails"):
        (run / "artifact.json").write_text("{}")
        raise RuntimeError("stage failed")
    assert not (run / LOCK_NAME).exists() and (run / "artifact.json").exists()  # released, output kept
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SaeRewardError, match="is a file: pass a folder path"), folder_lock(blocker, "x"):
        pass


def test_the_pipeline_takes_its_run_folders_lock(tmp_path: Path) -> None:
    from saereward import pipeline as pl
    from saereward.config import from_dict

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        cfg = from_dict(pl.PipelineConfig, {"out": str(run), "progress": False, "stages": ["report"]})
        t0 = time.perf_counter()
        with pytest.raises(SaeRewardError, match=rf"in use by process {proc.pid}"):
            pl.run_pipeline(cfg)
        assert time.perf_counter() - t0 < 30
        assert (
            not (run / "stages.json").exists() and not (run / "pipeline.json").exists()
        )  # refused: no record
    finally:
        proc.kill()
        proc.wait()
