"""Our GRPO step alone, phase by phase: seconds and peak RSS of rollouts / reference / reward / update.

A diagnostic for where the step's time and memory go (no peer: the side-by-side comparison with TRL
is ``benchmarks/grpo_step.py``). Same configuration as that benchmark (SmolLM2-135M-Instruct, LoRA
r=16, 4 × 4 completions, 64 new tokens, outcome reward). A thread samples VmRSS every 10 ms and
records the peak inside each phase.

    .venv/bin/python benchmarks/grpo_phases.py --dtype bf16 --steps 2 --threads 2
    .venv/bin/python benchmarks/grpo_phases.py --set sampler=hf --set lora_autocast=false   # A/B
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="GRPOConfig override KEY=VALUE (JSON value)")
    args = ap.parse_args()

    import torch

    from grpo_step import bench_config, parse_sets  # the benchmark's configuration (this folder)
    from saereward.model.lm import load_model
    from saereward.rl.grpo import GRPOTrainer

    torch.set_num_threads(args.threads)
    cfg = bench_config(
        args.dtype, 200, args.steps, **parse_sets(args.set)
    )  # 200 questions: grpo_step.py's draw before 2026-11-29 (its --questions default is now 4)
    phase = ["setup"]
    peaks: dict[str, float] = {}

    def sample() -> None:
        while True:
            p, r = phase[0], _rss_gb()
            peaks[p] = max(peaks.get(p, 0.0), r)
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    tr = GRPOTrainer(cfg, lm=load_model(dtype=cfg.dtype))
    for name in ("_rollouts", "reference", "advantages", "update"):
        fn = getattr(tr, name)

        def wrapped(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            outer, phase[0] = phase[0], _name
            try:
                return _fn(*a, **k)
            finally:
                phase[0] = outer

        setattr(tr, name, wrapped)
    phase[0] = "between phases"
    for s in range(args.steps):
        row = tr.step(s)
        print(  # noqa: T201
            f"step {s + 1}: {row['sec_step']:.2f} s (generate {row['sec_generate']:.2f}, reference "
            f"{row['sec_reference']:.2f}, reward {row['sec_reward']:.3f}, train {row['sec_train']:.2f}), "
            f"completion {row['completion_len']:.1f} tokens",
            flush=True,
        )
    print("peak RSS by phase (GB):", {k: round(v, 2) for k, v in peaks.items()})  # noqa: T201


if __name__ == "__main__":
    main()
