"""Speed on a busy machine: three workloads, quiet and beside one busy competitor, per OpenMP setting.

A laptop always has something else running. PyTorch's OpenMP threads spin-wait between parallel
regions; when another process holds one of the cores, a spinning thread burns the time slice its
partner needs, and each region waits for a thread that is not running. This benchmark measures how
much that costs and what avoids it.

Workloads (each in a fresh child process, because the OpenMP runtime reads its settings once, when
it starts; the first run is a warm-up and the reported time is the median of the timed runs):

* ``generate``: greedy generation of ``--new-tokens`` tokens for 8 chain_sum few-shot prompts
  (embedded SmolLM2-135M, fp32, ``min_new_tokens = max_new_tokens``);
* ``sae``: :class:`saereward.sae.train.SAETrainer` ``train_step`` on ``[4096, 576]`` batches
  (M 9216, k 32, fast kernels);
* ``grpo``: one step of the GRPO trainer with the per-token SAE reward (4 prompts x 4 samples, LoRA
  r 16, ``--grpo-tokens`` new tokens, fp32).

Settings (the environment of the child):

* ``default``: what torch does by itself (2 threads here, OpenMP's default spin-then-sleep);
* ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once);
* ``cli``: what the ``saereward`` command sets (:func:`saereward.threads.tame_threads`, measured when
  the child starts): on a quiet machine nothing; beside the competitor, as many threads as free cores.

Load: ``quiet``, or ``loaded``: one competitor process spinning on one core (a Python busy loop),
started before the child and stopped after it. The table gives seconds, each setting's loaded/quiet throughput, and both against the default
setting's quiet time (the speed a user had before).

    .venv/bin/python benchmarks/under_load.py            # all workloads, 3 timed runs each
    .venv/bin/python benchmarks/under_load.py --quick    # 2 timed runs, shorter generations
    .venv/bin/python benchmarks/under_load.py --workloads generate --settings default,passive
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_out import check_out, write_out

HERE = Path(__file__).resolve().parent
SETTINGS = ("default", "passive", "cli")
WORKLOADS = ("generate", "sae", "grpo")


# --------------------------------------------------------------------------------------------------
# Children: one workload, timed
# --------------------------------------------------------------------------------------------------


def _generate_runner(new_tokens: int) -> Callable[[], None]:
    import torch
    from transformers import GenerationConfig

    from saereward.model.lm import load_model
    from saereward.tasks import format_prompt, load_task

    lm = load_model(dtype="fp32")
    task = load_task("chain_sum", n=8, seed=0)
    prompts = [format_prompt(task, it, "fewshot") for it in task.items()]
    tok = lm.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    gcfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )

    def run() -> None:
        with torch.no_grad():
            lm.model.generate(**enc, generation_config=gcfg)

    return run


def _sae_runner(steps: int) -> Callable[[], None]:
    import torch

    from saereward.sae.train import SAETrainConfig, SAETrainer

    cfg = SAETrainConfig(
        d_sae=9216,
        k=32,
        batch_size=4096,
        total_tokens=10**9,
        checkpoint_every=0,
        log_every=10**9,
        progress=False,
    )
    trainer = SAETrainer(cfg, 576)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4096, 576, generator=g) * 3 + 1 for _ in range(4)]
    trainer.initialize(batches[0])

    def run() -> None:
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])

    return run


def _grpo_runner(new_tokens: int) -> Callable[[], None]:
    sys.path.insert(0, str(HERE))
    from grpo_step import bench_config, make_pack
    from saereward.model.lm import load_model
    from saereward.rl.grpo import GRPOTrainer

    work = Path(tempfile.mkdtemp(prefix="under_load_"))
    make_pack(work)
    cfg = bench_config(
        "fp32",
        8,
        100,
        reward="sae",
        reward_form="mechreward",  # no reward baseline to measure first; the per-step cost is the same
        pack=str(work / "pack.json"),
        layer=15,
        max_new_tokens=new_tokens,
    )
    trainer = GRPOTrainer(cfg, lm=load_model(dtype="fp32"))
    step = iter(range(100))

    def run() -> None:
        trainer.step(next(step))

    return run


def child(workload: str, repeats: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    make: dict[str, Callable[[], Callable[[], None]]] = {
        "generate": lambda: _generate_runner(args.new_tokens),
        "sae": lambda: _sae_runner(args.sae_steps),
        "grpo": lambda: _grpo_runner(args.grpo_tokens),
    }
    run = make[workload]()
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"times": times, "threads": torch.get_num_threads(), "omp_wait": os.environ.get("OMP_WAIT_POLICY")}


# --------------------------------------------------------------------------------------------------
# Parent: settings x load
# --------------------------------------------------------------------------------------------------


def _env(setting: str) -> tuple[dict[str, str], list[str]]:
    """The child's environment and extra arguments under ``setting``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        return env, []
    if setting == "cli":
        from saereward.threads import tame_threads

        tame_threads(env)  # what the saereward command does to its own environment, measured now
        return env, []
    return env, []


def _competitor() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    time.sleep(1.0)  # let it take its core
    return proc


def measure(workload: str, setting: str, loaded: bool, args: argparse.Namespace) -> dict[str, Any]:
    comp = _competitor() if loaded else None
    try:
        env, extra = _env(setting)  # after the competitor starts: "cli" counts free cores now
        cmd = [sys.executable, __file__, "--child", workload, "--repeats", str(args.repeats), *extra]
        cmd += ["--new-tokens", str(args.new_tokens), "--sae-steps", str(args.sae_steps)]
        cmd += ["--grpo-tokens", str(args.grpo_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        if comp is not None:
            comp.kill()
            comp.wait()
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"child {workload}/{setting} failed (exit {proc.returncode})")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["median_s"] = statistics.median(res["times"])
    return res


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| workload | setting | threads quiet / loaded | quiet s | loaded s | loaded / quiet | "
        "quiet vs default quiet | loaded vs default quiet |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for w, by_setting in results.items():
        ref = by_setting.get("default", next(iter(by_setting.values())))["quiet"]["median_s"]
        for s, r in by_setting.items():
            q, lo = r["quiet"], r["loaded"]
            lines.append(
                f"| {w} | {s} | {q['threads']} / {lo['threads']} | {q['median_s']:.2f} | {lo['median_s']:.2f} "
                f"| {q['median_s'] / lo['median_s']:.2f} | {ref / q['median_s']:.2f} | {ref / lo['median_s']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--sae-steps", type=int, default=10)
    ap.add_argument("--grpo-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="2 timed runs, 24 generated tokens, 16 GRPO tokens")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_out(args.json, "--json")
    # a kill of this script must stop its competitor too: SIGTERM unwinds through measure()'s finally
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args)))
        return
    if args.quick:
        args.repeats, args.new_tokens, args.grpo_tokens, args.sae_steps = 2, 24, 16, 6
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for w in args.workloads.split(","):
        for s in args.settings.split(","):
            cell = {"quiet": measure(w, s, False, args), "loaded": measure(w, s, True, args)}
            results.setdefault(w, {})[s] = cell
            print(
                f"{w:9s} {s:8s} quiet {cell['quiet']['median_s']:7.2f} s  loaded {cell['loaded']['median_s']:7.2f} s",
                flush=True,
            )
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(table(results))
    write_out(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
