"""Batched greedy decoding: transformers' ``generate()`` vs saereward's own decode loop, any device.

Times :func:`saereward.model.generate.generate_batch` with ``fast_decode`` off (HF ``generate()``) and on
(:mod:`saereward.model.fastdecode`), alternating, on the same loaded model and prompts (two-number sums in
mechreward's raw prompt), and reports the median wall time per batch, new tokens/s, and the share of rows
whose greedy tokens agree (bf16 rounding can differ between the two paths' kernels and flip a
near-tie). Rows never end early on a model with random weights, so each row decodes the full
``--new-tokens``.

    python benchmarks/decode_speed.py --model /tmp/smol-random --device cuda --dtype bf16
    .venv/bin/python benchmarks/decode_speed.py --device cpu --dtype fp32 --batches 16 --reps 2

The last line is ``decode_time_ratio_vs_generate=<fast / generate>`` for the largest batch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="a load_model spec or folder")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from saereward.model.generate import SamplingConfig, generate_batch
    from saereward.model.lm import load_model

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)  # greedy (do_sample off)
    rng = random.Random(0)
    ratio = float("nan")
    print(f"{name}, {args.dtype}, {args.model}, {args.new_tokens} new tokens, greedy")  # noqa: T201
    for bs in [int(b) for b in args.batches.split(",")]:
        prompts = []
        for _ in range(bs):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            prompts.append(f"Q: What is {a} + {b}?\nA: Let's think step by step.")
        walls: dict[bool, list[float]] = {False: [], True: []}
        toks: dict[bool, torch.Tensor] = {}
        for rep in range(args.reps + 1):  # the first round warms up both paths
            for fast in (False, True) if rep % 2 == 0 else (True, False):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                gen = generate_batch(lm, prompts, sampling, fast_decode=fast)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if rep:
                    walls[fast].append(time.perf_counter() - t0)
                toks[fast] = gen.sequences[:, gen.prompt_len :].cpu()
        n = min(toks[False].shape[1], toks[True].shape[1])
        agree = float((toks[False][:, :n] == toks[True][:, :n]).all(1).float().mean())
        g, f = statistics.median(walls[False]), statistics.median(walls[True])
        ratio = f / g
        new = bs * args.new_tokens
        print(  # noqa: T201
            f"batch {bs:4}: generate() {g:.3f} s ({new / g:,.0f} tok/s), fast {f:.3f} s ({new / f:,.0f} tok/s), "
            f"ratio {ratio:.2f}, rows identical {100 * agree:.0f} %"
        )
    print(f"decode_time_ratio_vs_generate={ratio:.3f}")  # noqa: T201


if __name__ == "__main__":
    main()
