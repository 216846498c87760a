"""Greedy evaluation: transformers' ``generate()`` vs saereward's own decode loop, in one process.

``saereward eval`` on chain_sum with the R0 check's held-out settings (SmolLM2-135M-Instruct, fp32, raw
prompts, 100 questions, ≤ 64 new tokens, batches of 50), alternating ``fast_decode`` off (HF
``generate()``, the peer every evaluation harness uses) and on (:mod:`saereward.model.fastdecode`) for
``--reps`` rounds on the same loaded model. Prints each run's wall time and tokens/s, the medians,
whether completions and verdicts agree, and as its last line ``eval_time_ratio_vs_generate=<x>``
(on / off; below 1 is faster).

    .venv/bin/python benchmarks/eval_decode.py --reps 3 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=100, help="chain_sum questions")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()

    from saereward.analysis.evaluate import EvalConfig, run_eval
    from saereward.model.lm import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(dtype=args.dtype)
    cfg = EvalConfig(
        task="chain_sum",
        n=args.n,
        seed=1,
        prompt_format="raw",
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        dtype=args.dtype,
        progress=False,
    )
    walls: dict[bool, list[float]] = {False: [], True: []}
    rows: dict[bool, list[tuple[str, bool]]] = {}
    for _ in range(args.reps):
        for on in (False, True):
            r = run_eval(dataclasses.replace(cfg, fast_decode=on), lm=lm)
            s = r.summary
            walls[on].append(s["wall_seconds"])
            rows[on] = [(x["completion"], x["correct"]) for x in r.rows]
            print(  # noqa: T201
                f"fast_decode={on}: {s['wall_seconds']:.2f} s, {s['tokens_per_s']:.1f} tok/s, "
                f"accuracy {s['correct']}/{s['n']}"
            )
    same = sum(a == b for a, b in zip(rows[False], rows[True], strict=True))
    verdicts = sum(a[1] == b[1] for a, b in zip(rows[False], rows[True], strict=True))
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    print(  # noqa: T201
        f"machine: {torch.backends.cpu.get_cpu_capability()}, threads {args.threads}, {args.dtype}, "
        f"n {args.n}, batch {args.batch_size}, {args.reps} reps\n"
        f"median wall: generate() {off:.2f} s, fast_decode {on:.2f} s\n"
        f"identical completions {same}/{len(rows[True])}, identical verdicts {verdicts}/{len(rows[True])}"
    )
    print(f"eval_time_ratio_vs_generate={on / off:.3f}")  # noqa: T201


if __name__ == "__main__":
    main()
