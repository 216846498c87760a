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


_FAKE_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from grpo_step import StepGate
gate = StepGate(sys.argv[sys.argv.index("--gate") + 1])
spans = []
for s in range(3):
    gate.begin()
    t0 = time.monotonic()
    time.sleep(0.05)
    spans.append((t0, time.monotonic()))
    gate.end(last=s == 2)
print("noise")
print(json.dumps({"spans": spans}))
"""


def test_interleaved_children_step_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``grpo_step.py --interleave``: the trainers' steps never overlap, and who goes first rotates."""
    monkeypatch.syspath_prepend(str(BENCH))
    from grpo_step import run_interleaved

    child = tmp_path / "child.py"
    child.write_text(_FAKE_CHILD)
    cmd = [sys.executable, str(child), str(BENCH)]
    res = run_interleaved({"a": cmd, "b": cmd, "c": cmd}, rounds=3)
    spans = sorted((t0, t1, k) for k, r in res.items() for t0, t1 in r["spans"])
    assert len(spans) == 9
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False))
    assert [k for _, _, k in spans] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_grpo_bounds_count_each_batchs_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """``roofline.py``'s GRPO bounds: shared prompts counted once per group, decode steps only for the
    rows still running, the slower of compute and reading the weights per step, train twice the
    reference."""
    monkeypatch.syspath_prepend(str(BENCH))
    from roofline import GrpoWork, grpo_bounds

    params, d, vocab = 1000, 4, 50  # body 800
    w = GrpoWork(lengths=[3, 1], prompts=[5])
    got = grpo_bounds(w, params, d, vocab, gflops=1e-6, gbs=1e-9)  # 1000 FLOP/s, 1 byte/s
    # prefill 2·800·5 + 2·4·50 = 8400; decode steps t=1, 2 run 1 row each: 2·1000 FLOP (2 s) against
    # reading 4000 bytes (4000 s), twice
    assert got["generate"] == pytest.approx((8400 / 1e9 + 4000 / 1e9, 8.4 + 8000))
    ref = 2 * 800 * (4 + 4) + 2 * 4 * 50 * 4  # prompt but its last token, plus the 4 response tokens
    assert got["reference"] == pytest.approx((ref / 1e9, ref / 1000))
    assert got["train"] == pytest.approx((2 * ref / 1e9, 2 * ref / 1000))
    fast_read = grpo_bounds(w, params, d, vocab, gflops=1e-6, gbs=1e3)["generate"][1]
    assert fast_read == pytest.approx(8.4 + 2 * 2.0)  # compute-bound steps now
