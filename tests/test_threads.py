"""Thread settings that share a busy machine well (saereward.threads), set by the command before torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from saereward import threads


def test_a_busy_machine_gets_a_free_core_thread_count_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "free_cores", lambda window=0.2: 3)
    env: dict[str, str] = {}
    assert threads.tame_threads(env) == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(threads, "free_cores", lambda window=0.2: 1)
    one: dict[str, str] = {}
    assert threads.tame_threads(one) == {"OMP_NUM_THREADS": "1"}  # no team, nothing to wait for
    mine = {"OMP_NUM_THREADS": "8"}
    assert threads.tame_threads(mine) == {} and mine == {"OMP_NUM_THREADS": "8"}
    active = {"OMP_WAIT_POLICY": "ACTIVE"}
    monkeypatch.setattr(threads, "free_cores", lambda window=0.2: 2)
    assert threads.tame_threads(active) == {"OMP_NUM_THREADS": "2"} and active["OMP_WAIT_POLICY"] == "ACTIVE"
    off = {threads.OFF: "0"}
    assert threads.tame_threads(off) == {} and off == {threads.OFF: "0"}


def test_a_quiet_machine_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "free_cores", lambda window=0.2: 4)
    env: dict[str, str] = {}
    assert threads.tame_threads(env) == {} and env == {}


def test_free_cores_counts_what_others_leave_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = iter([(1000, 4000), (1000 + 150, 4000 + 200)])  # 75 % of 2 cores busy: 1.5 cores' worth
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.free_cores() == 1  # never fewer than one
    samples = iter([(0, 0), (0, 200)])
    assert threads.free_cores() == 2
    monkeypatch.setattr(threads, "_cpu_times", lambda: None)
    assert threads.free_cores() is None  # no /proc/stat: leave torch's choice


def test_the_command_sets_them_before_torch_starts() -> None:
    """Parsing the command line imports the stages (and torch): the settings must already be there."""
    code = (
        "import os, sys\n"
        "for k in ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS', 'SAEREWARD_TAME_THREADS'): os.environ.pop(k, None)\n"
        "from saereward import threads\n"
        "threads.usable_cores = lambda: 2\n"
        "threads.free_cores = lambda window=0.2: 1  # as if another process held one of two cores\n"
        "sys.argv = ['saereward', '--version']\n"
        "from saereward.cli import entry\n"
        "try:\n    entry()\nexcept SystemExit:\n    pass\n"
        "import torch\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["None", "1"]  # one free core: one thread, no team to wait in


_FIRST_COS = """
import torch
torch.set_num_threads(2)
from saereward.threads import warm_vector_math
warm_vector_math()
x = torch.arange(4 * 64 * 64, dtype=torch.float32).reshape(4, 64, 64) * 1e-3
first, again = x.cos(), x.cos()  # 16,384 values: above ATen's grain, so both threads take a share
print(int(torch.equal(first, again)), float((first.double() - x.double().cos()).abs().max()))
"""


def test_the_first_parallel_cos_of_a_process_is_as_accurate_as_later_ones() -> None:
    """Without the warm-up, 7 of 44 fresh 2-thread processes on an AVX-512 VM computed their first
    ``cos`` on one thread's share with errors up to 1.5e-4 (the rotary embedding of a first forward)."""
    for _ in range(16):  # a fresh process each time: only a process's first call is affected
        out = subprocess.run([sys.executable, "-c", _FIRST_COS], capture_output=True, text=True, check=True)
        same, err = out.stdout.split()
        assert same == "1" and float(err) < 1e-6, out.stdout
