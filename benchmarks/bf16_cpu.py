"""bf16 on a CPU without bf16 units: PyTorch's own bf16 products vs ``saereward.model.bf16cpu`` vs fp32.

One process, the embedded SmolLM2-135M-Instruct, three ways of running it, alternated round by
round (``--reps`` rounds; medians):

* ``native``: the model in bf16 with PyTorch's bf16 matrix products (what a stock ``transformers``
  model does; on an AVX2-only CPU a generic, slow loop);
* ``bf16cpu``: the same bf16 model, its ``nn.Linear`` products through fp32 GEMM on the bf16
  operands with one rounding to bf16 (``saereward.model.bf16cpu``, installed by ``load_model``);
* ``fp32``: the model in fp32, for scale.

Workloads: a no-grad forward of 16 x 64 tokens (a prefill / reference forward), a forward and
backward of 8 x 64 tokens with the gradient taken to the input embeddings (the frozen base model
of a LoRA update), and greedy ``generate()`` of 32 new tokens for 16 rows of 16 prompt tokens.
Next to the times it prints how far the ``bf16cpu`` logits are from the ``native`` ones and how far
both are from fp32.

    .venv/bin/python benchmarks/bf16_cpu.py            # 3 rounds (~10 min on 2 AVX2 cores)
    .venv/bin/python benchmarks/bf16_cpu.py --quick    # 1 round, smaller shapes (~1 min)

The last line is ``bf16cpu_speedup_vs_native=<forward time native / bf16cpu>``. On a CPU with bf16
units (AVX512-BF16, AMX) ``saereward`` keeps PyTorch's product; run with
``SAEREWARD_BF16_MATMUL=fp32`` there to time this path anyway.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def _set_mode(model: Any, wide: bool) -> None:
    from torch import nn

    from saereward.model import bf16cpu

    for m in model.modules():
        if type(m) is nn.Linear and "forward" in m.__dict__:
            del m.forward
    if wide:
        os.environ[bf16cpu.ENV] = "fp32"
        assert bf16cpu.install(model) > 0


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="rounds (each runs all three ways once)")
    ap.add_argument("--quick", action="store_true", help="1 round, half the rows and tokens")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from saereward.model import bf16cpu
    from saereward.model.lm import load_model

    torch.set_num_threads(args.threads)
    reps = 1 if args.quick else args.reps
    scale = 2 if args.quick else 1
    rows, toks, new = 16 // scale, 64 // scale, 32 // scale
    os.environ[bf16cpu.ENV] = "native"
    lm16 = load_model(dtype="bf16")
    lm32 = load_model(dtype="fp32")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (rows, toks), generator=g)
    train_ids = ids[: max(rows // 2, 1)]
    prompts = ids[:, :16]

    def forward(model: Any) -> Any:
        with torch.no_grad():
            return model(ids).logits.float()

    def train(model: Any) -> None:
        emb = model.get_input_embeddings()(train_ids).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits.float().logsumexp(-1).mean().backward()

    def decode(model: Any) -> Any:
        with torch.no_grad():
            return model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=lm16.tokenizer.pad_token_id,
            )

    ways = ("native", "bf16cpu", "fp32")
    times: dict[tuple[str, str], list[float]] = {
        (w, k): [] for w in ways for k in ("forward", "train", "decode")
    }
    logits: dict[str, Any] = {}
    tokens: dict[str, Any] = {}
    forward(lm32.model)  # warm-up (allocator, oneDNN/MKL)
    for r in range(reps):
        for way in ways:
            model = lm32.model if way == "fp32" else lm16.model
            if way != "fp32":
                _set_mode(model, way == "bf16cpu")
            t, logits[way] = _timed(lambda m=model: forward(m))
            times[way, "forward"].append(t)
            times[way, "train"].append(_timed(lambda m=model: train(m))[0])
            t, tokens[way] = _timed(lambda m=model: decode(m))
            times[way, "decode"].append(t)
            print(f"round {r + 1}/{reps} {way:8}: " + ", ".join(  # noqa: T201
                f"{k} {times[way, k][-1]:.2f} s" for k in ("forward", "train", "decode")), flush=True)  # fmt: skip
    shapes = {
        "forward": f"{rows}x{toks} tokens, no grad",
        "train": f"{len(train_ids)}x{toks} tokens, fwd+bwd",
        "decode": f"{rows} rows x {new} new tokens",
    }
    _report({k: statistics.median(v) for k, v in times.items()}, shapes, logits, tokens, args.threads, reps)


def _report(
    med: dict[tuple[str, str], float],
    shapes: dict[str, str],
    logits: dict[str, Any],
    tokens: dict[str, Any],
    threads: int,
    reps: int,
) -> None:
    """The summary: median seconds per way and workload, the logits' and tokens' agreement, and the
    last line ``bf16cpu_speedup_vs_native=<x>``."""
    import torch

    print(  # noqa: T201
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads "
        f"{threads}, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"PyTorch's oneDNN bf16 path: {bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}; "
        f"median of {reps} round(s)"
    )
    print(f"{'workload':34} {'native s':>9} {'bf16cpu s':>10} {'fp32 s':>8} {'native/bf16cpu':>15}")  # noqa: T201
    for k, shape in shapes.items():
        n, w, f = med["native", k], med["bf16cpu", k], med["fp32", k]
        print(f"{k + ' (' + shape + ')':34} {n:>9.2f} {w:>10.2f} {f:>8.2f} {n / w:>14.2f}x")  # noqa: T201
    ref = logits["fp32"]
    print(  # noqa: T201
        f"logits, max |diff|: bf16cpu vs native {(logits['bf16cpu'] - logits['native']).abs().max():.3f}, "
        f"native vs fp32 {(logits['native'] - ref).abs().max():.3f}, bf16cpu vs fp32 "
        f"{(logits['bf16cpu'] - ref).abs().max():.3f} (logit scale {ref.abs().max():.1f}); next-token "
        f"argmax agrees with fp32 on {(logits['native'].argmax(-1) == ref.argmax(-1)).float().mean():.1%} "
        f"(native) / {(logits['bf16cpu'].argmax(-1) == ref.argmax(-1)).float().mean():.1%} (bf16cpu) of positions"
    )
    same = (tokens["bf16cpu"] == tokens["native"]).float().mean()
    print(f"greedy tokens, bf16cpu vs native: {same:.1%} equal")  # noqa: T201
    print(f"bf16cpu_speedup_vs_native={med['native', 'forward'] / med['bf16cpu', 'forward']:.2f}")  # noqa: T201


if __name__ == "__main__":
    main()
