"""Greedy generation throughput of a model, fp32 vs bf16, at several batch sizes, in one process.

Each cell generates exactly ``--new-tokens`` tokens per row (``min_new_tokens`` = ``max_new_tokens``,
so early EOS does not change the work) from real chain_sum few-shot prompts, and reports the median
tokens/s over ``--repeats`` timed runs after one warm-up; fp32 and bf16 runs alternate. Absolute numbers on a shared machine are
noise; the bf16/fp32 ratio per batch size is the signal.

    .venv/bin/python benchmarks/gen_throughput.py            # embedded SmolLM2-135M, batch 1/8/16
    .venv/bin/python benchmarks/gen_throughput.py --quick    # fewer tokens and repeats
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from bench_out import check_out, write_out
from saereward.model.lm import DEFAULT_MODEL, LoadedModel, load_model
from saereward.tasks import format_prompt, load_task


def _timer(lm: LoadedModel, prompts: list[str], batch: int, new_tokens: int) -> Callable[[], float]:
    """A closure that runs one greedy generation of exactly ``new_tokens`` per row and returns seconds."""
    tok = lm.tokenizer
    enc = tok(prompts[:batch], return_tensors="pt", padding=True, add_special_tokens=False)
    gcfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )

    def run() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = lm.model.generate(**enc, generation_config=gcfg)
            dt = time.perf_counter() - t0
        assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
        return dt

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 3 repeats")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    check_out(args.json, "--json")
    if args.quick:
        args.new_tokens, args.repeats = 16, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task("chain_sum", n=64, seed=0)
    prompts = [format_prompt(task, it, "fewshot") for it in task.items()]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    models = {dt: load_model(args.model, dtype=dt) for dt in ("fp32", "bf16")}  # type: ignore[arg-type]
    print(
        f"model={args.model} threads={torch.get_num_threads()} new_tokens={args.new_tokens} "
        f"repeats={args.repeats} torch={torch.__version__} cpu={platform.processor() or platform.machine()}"
    )
    print(f"{'batch':>5} {'fp32 tok/s':>11} {'bf16 tok/s':>11} {'bf16/fp32':>10}")
    for b in batches:
        timers = {dt: _timer(lm, prompts, b, args.new_tokens) for dt, lm in models.items()}
        times: dict[str, list[float]] = {dt: [] for dt in timers}
        for dt in timers:  # warm-up
            timers[dt]()
        for _ in range(args.repeats):  # interleaved, so load changes hit both sides alike
            for dt in timers:
                times[dt].append(timers[dt]())
        fp32, bf16 = (b * args.new_tokens / statistics.median(times[dt]) for dt in ("fp32", "bf16"))
        rows.append(
            {
                "batch": b,
                "fp32_tok_s": round(fp32, 1),
                "bf16_tok_s": round(bf16, 1),
                "ratio": round(bf16 / fp32, 2),
            }
        )
        print(f"{b:>5} {fp32:>11.1f} {bf16:>11.1f} {bf16 / fp32:>10.2f}")
    write_out(args.json, rows)


if __name__ == "__main__":
    main()
