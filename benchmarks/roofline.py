"""How far from the hardware limit: this machine's GEMM rate and memory bandwidth, and for the SAE step
and each phase of the GRPO step, the time those rates allow beside the time we take.

Measured (median of ``--reps`` runs each): fp32 GEMM GFLOP/s at the SAE encoder's shape
(``[B, d] @ [d, M]``) and at a decoder-MLP shape; bf16 too where the CPU has native bf16; memory
bandwidth as bytes read + written by a large ``copy_``. Our times come from the same code the
benchmarks time: ``SAETrainer.train_step`` on random residuals at ``sae_throughput.py``'s shape, and
GRPO steps of ``grpo_step.py``'s configuration (``GRPOTrainer.step``, which times its phases): the
median of ``--grpo-steps`` steps (default 3) after a warm-up step.

The bounds are a model, not a measurement; each counts the work no implementation can skip:

* SAE step (batch ``B``): the dense encoder product ``2·B·d·M`` FLOP at the GEMM rate of its dtype (bf16
  where the CPU has bf16 units: the fast kernels select in bf16; fp32 elsewhere), plus writing and
  reading the ``B×M`` pre-activations once for the top-k (8·B·M bytes), plus Adam on ``W_enc`` and
  ``W_dec`` (read p, g, m, v; write p, m, v: 28 bytes per weight) at the bandwidth. The decoder and the
  encoder's backward are sparse (``k`` of ``M`` latents) and left out. The SAE row's rates and our
  step are measured in turns (``--sae-rounds`` rounds of one GEMM, one copy and one step; medians), so
  that a drift of a shared machine's speed moves the bound and our time alike.
* GRPO: per phase, from each step's own batch (response and prompt lengths), see :func:`grpo_bounds`:
  generate (the prefill once per group's prompt; per decode step the live rows' ``2·P`` FLOP or reading
  every weight once, whichever is slower), reference (one forward from the shared prompts' cache, the
  LM head at the response positions), train (that forward and the backward to the activations: the
  base weights are frozen, LoRA is small). The table prints each phase's GFLOP and the rate we sustain
  over them; ``--target-step-s`` prints the rate a step of that length would need.

  Each GRPO step's bounds use the fp32 GEMM rate (at a decoder-MLP shape) and the bandwidth measured
  right after that step. ``--fixed-length`` makes every completion 64 tokens long (as
  ``grpo_step.py --fixed-length``), so the work is the same from step to step and run to run.

With the GRPO rows the script also times the products of one decode step alone (every projection and
the LM head of the embedded model) for 1 to 32 rows, in the decode loop's two forms: MKL's ``W @ xᵀ``
(``skinny_decode``) and oneDNN on packed weights (``packed_decode``, where this torch build has it):
what this CPU's GEMM libraries do at the decode's shape, which the bandwidth bound leaves out.

    .venv/bin/python benchmarks/roofline.py            # on a quiet machine (see BENCHMARKS.md)
    .venv/bin/python benchmarks/roofline.py --skip-grpo
    .venv/bin/python benchmarks/roofline.py --fixed-length --target-step-s 9.0
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

PHASES = ("generate", "reference", "train")


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / _median_time(lambda: a @ b, reps) / 1e9


def bandwidth_gbs(mb: int, reps: int) -> float:
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), reps) / 1e9


def sae_row(select: torch.dtype, d: int, m: int, k: int, batch: int, rounds: int) -> dict[str, float]:
    """Our SAE step and its bound, measured in turns: each round times one encoder-shaped GEMM in the
    selection's dtype, one 512 MB copy and one ``train_step``, so a drift of the machine's speed
    reaches the bound and our step alike; the medians over the rounds (after one untimed round)."""
    from saereward.sae.train import SAETrainConfig, SAETrainer

    cfg = SAETrainConfig(
        d_sae=m,
        k=k,
        batch_size=batch,
        total_tokens=(rounds + 3) * batch,
        checkpoint_every=0,
        log_every=10**9,
        progress=False,
        warmup_steps=1,
    )
    tr = SAETrainer(cfg, d)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, d, generator=g) * 3 + 1 for _ in range(4)]
    tr.initialize(xs[0])
    a, b = torch.randn(batch, d, dtype=select), torch.randn(d, m, dtype=select)
    src = torch.empty(512 * 2**20 // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    blk, threads = block_operands(a, b), torch.get_num_threads()
    times: dict[str, list[float]] = {"gemm": [], "block": [], "copy": [], "ours": []}
    for r in range(rounds + 1):
        for name, fn in (
            ("gemm", lambda: a @ b),
            ("block", blk),
            ("copy", lambda: dst.copy_(src)),
            ("ours", None),
        ):
            t0 = time.perf_counter()
            if fn is None:
                tr.train_step(xs[r % 4])
            else:
                fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    flops = 2 * batch * d * m / statistics.median(times["gemm"]) / 1e9
    block_flops = 2 * SAE_BLOCK * d * m / statistics.median(times["block"]) / 1e9
    bw = 2 * src.numel() * 4 / statistics.median(times["copy"]) / 1e9
    ours = statistics.median(times["ours"])
    memory = (8 * batch * m + 28 * 2 * d * m) / (bw * 1e9)
    bound = 2 * batch * d * m / (flops * 1e9) + memory
    return {
        "ours_s": ours,
        "bound_s": bound,
        "ours_tok_s": batch / ours,
        "bound_tok_s": batch / bound,
        "gflops": flops,
        "gbs": bw,
        "block_gflops": block_flops,
        "strict_bound_s": 2 * batch * d * m / (max(flops, block_flops * threads) * 1e9) + memory,
    }


SAE_BLOCK = 256  # rows per selection block at M 9,216 (``kernels.select_topk``)


def block_operands(a: torch.Tensor, b: torch.Tensor) -> Callable[[], object]:
    """One selection-sized block (:data:`SAE_BLOCK` rows) against ``b`` packed for oneDNN as the SAE step
    multiplies it, on one thread (each worker of the step's pool runs one block at a time)."""
    from saereward.model import onednn

    x = a[:SAE_BLOCK].contiguous()
    if onednn.available(b.dtype):
        packed = onednn.pack(b.t().contiguous(), SAE_BLOCK)
        product: Callable[[], object] = lambda: onednn.linear(x, packed)  # noqa: E731
    else:
        product = lambda: x @ b  # noqa: E731

    def one_thread() -> object:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return product()
        finally:
            torch.set_num_threads(n)

    return one_thread


def decode_products(rows: tuple[int, ...], reps: int) -> tuple[int, dict[int, tuple[float, float | None]]]:
    """The number of weights a decode step of the embedded model (fp32) multiplies, and per row count
    the seconds its products take, every decoder projection and the LM head with ``x`` of that many
    rows: as ``W @ xᵀ`` (MKL), and on oneDNN packed weights (``None`` where the build lacks them)."""
    from saereward.model import fastdecode
    from saereward.model.lm import load_model

    model = load_model(dtype="fp32").model
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    packed = [fastdecode._pack((w, None, ())) for w in weights] if fastdecode.packing_available() else []
    out: dict[int, tuple[float, float | None]] = {}
    for n in rows:
        # x [rows, in] as the loop holds it; MKL gets its transposed view, as in the loop (a contiguous
        # xᵀ takes another MKL path, 2-5× slower at 2-8 rows on the Zen 4 VM)
        xs = {w.shape[1]: torch.randn(n, w.shape[1]) for w in weights}
        mkl = _median_time(lambda xs=xs: [torch.mm(w, xs[w.shape[1]].t()) for w in weights], reps)
        one = _median_time(
            lambda xs=xs: [
                fastdecode._packed(xs[w.shape[1]], p) for w, p in zip(weights, packed, strict=True)
            ],
            reps,
        )
        out[n] = (mkl, one if packed else None)
    return sum(w.numel() for w in weights), out


def print_decode_products(bw: float, reps: int) -> None:
    size, times = decode_products((1, 2, 4, 8, 16, 32), reps)
    read_ms = size * 4 / (bw * 1e9) * 1e3
    print(  # noqa: T201
        f"\none decode step's products ({size / 1e6:.0f}M fp32 weights; reading them once at the copy "
        f"bandwidth: {read_ms:.1f} ms)\n"
        "| rows | W @ x^T ms | GB/s | GFLOP/s | packed ms | GB/s | GFLOP/s |\n|---|---|---|---|---|---|---|"
    )
    for n, (mkl, one) in times.items():
        cells = [
            f"{t * 1e3:.1f} | {size * 4 / t / 1e9:.1f} | {2 * size * n / t / 1e9:.0f}"
            for t in (mkl, one)
            if t
        ]
        print(f"| {n} | {' | '.join(cells) if one else cells[0] + ' | - | - | -'} |")  # noqa: T201


class GrpoWork(NamedTuple):
    """What one GRPO step must compute, from its batch: response lengths and prompt lengths."""

    lengths: list[int]  # response tokens per sequence
    prompts: list[int]  # prompt tokens per group (the group shares its prompt)


def grpo_bounds(
    w: GrpoWork, params: int, d: int, vocab: int, gflops: float, gbs: float
) -> dict[str, tuple[float, float]]:
    """Per GRPO phase ``(GFLOP, bound in seconds)`` for one step of ``w`` at ``gflops`` and ``gbs``.

    Lower bounds, counting only the work no implementation can skip (tied embedding: the head's weight
    is the embedding's, so the body is ``params - d·vocab``; LoRA's products and attention are left out):

    * generate: the prefill runs each group's prompt once (``2·body`` FLOP per token, the head at its
      last position); then the ``t``-th decode step (``t ≥ 1``) runs the rows whose response is longer
      than ``t``: ``2·params`` FLOP per row, and reading every weight once, whichever is slower;
    * reference: one forward from the shared prompts' cache: each group's prompt but its last token
      once, and per sequence its last prompt token and all but its last response token (``2·body`` FLOP
      each), plus the head at the response positions (``2·d·vocab``);
    * train: that forward and the backward to the activations (the base weights are frozen): twice the
      reference.
    """
    body = params - d * vocab
    rate = gflops * 1e9
    prefill = 2 * body * sum(w.prompts) + 2 * d * vocab * len(w.prompts)
    read_s = params * 4 / (gbs * 1e9)
    decode_s = sum(
        max(read_s, 2 * params * rows / rate)
        for rows in (sum(n > t for n in w.lengths) for t in range(1, max(w.lengths, default=0)))
    )
    decode_flop = 2 * params * sum(max(n - 1, 0) for n in w.lengths)
    new = sum(w.lengths)
    ref = 2 * body * (sum(p - 1 for p in w.prompts) + new) + 2 * d * vocab * new
    return {
        "generate": ((prefill + decode_flop) / 1e9, prefill / rate + decode_s),
        "reference": (ref / 1e9, ref / rate),
        "train": (2 * ref / 1e9, 2 * ref / rate),
    }


def grpo_rows(steps: int, fixed_length: bool = False) -> tuple[dict[str, tuple[float, float, float]], float]:
    """Per GRPO phase and the whole step, ``(ours s, bound s, GFLOP)``: the medians over ``steps`` steps
    after a warm-up step, and the median fp32 GEMM rate. Each step's bound counts that step's batch
    (:func:`grpo_bounds`) at the fp32 GEMM rate (decoder-MLP shape) and the bandwidth measured right
    after that step, so a drift of the machine's speed moves the bound with our time.
    ``fixed_length``: every completion ``NEW_TOKENS`` long, as ``grpo_step.py --fixed-length``."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from grpo_step import NEW_TOKENS, bench_config
    from saereward.model.lm import load_model
    from saereward.rl.grpo import GRPOTrainer

    extra = {"min_new_tokens": NEW_TOKENS} if fixed_length else {}
    cfg = bench_config("fp32", 200, steps + 1, **extra)
    lm = load_model(dtype="fp32")
    tr = GRPOTrainer(cfg, lm=lm)
    work: list[GrpoWork] = []
    rollouts = tr._rollouts

    def observed(step: int) -> Any:  # the batch's lengths, for the bound
        b = rollouts(step)
        lengths = b.response_mask[:, b.prompt_len :].sum(1)
        prompts = b.attention_mask[:: cfg.group_size, : b.prompt_len].sum(1)
        work.append(GrpoWork([int(n) for n in lengths], [int(n) for n in prompts]))
        return b

    tr._rollouts = observed  # type: ignore[method-assign]
    tr.step(0)  # warm-up
    params = sum(p.numel() for p in lm.model.parameters())
    d, vocab = lm.d_model, lm.model.get_output_embeddings().weight.shape[0]
    rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in PHASES + ("step",)}
    rates = []
    for s in range(1, steps + 1):
        row = tr.step(s)
        rates.append(gemm_gflops(1024, 576, 1536, torch.float32, 3))
        bounds = grpo_bounds(work[-1], params, d, vocab, rates[-1], bandwidth_gbs(512, 3))
        for name in PHASES:
            rows[name].append((row[f"sec_{name}"], bounds[name][1], bounds[name][0]))
        total = [sum(bounds[n][i] for n in PHASES) for i in (1, 0)]
        rows["step"].append((row["sec_step"], total[0], total[1]))
    med = {name: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for name, rs in rows.items()}
    return med, statistics.median(rates)  # type: ignore[return-value]


def print_grpo(rows: dict[str, tuple[float, float, float]], rate: float, target_s: float | None) -> None:
    print(  # noqa: T201
        f"\nGRPO step (fp32; fp32 GEMM {rate:.1f} GFLOP/s at 1024x576x1536, median beside the steps)\n"
        "| phase | ours | hardware bound | ours / bound | GFLOP | ours GFLOP/s |\n|---|---|---|---|---|---|"
    )
    for name, (ours, bound, gflop) in rows.items():
        print(  # noqa: T201
            f"| {name} | {ours:.2f} s | {bound:.2f} s | {ours / bound:.1f}x | {gflop:.0f} | {gflop / ours:.0f} |"
        )
    if target_s:
        need = rows["step"][2] / target_s
        print(  # noqa: T201
            f"a {target_s:.2f} s step needs {need:.0f} GFLOP/s sustained over its {rows['step'][2]:.0f} GFLOP: "
            f"{need / rate:.0%} of the GEMM rate; the bound is {rows['step'][1] / target_s:.0%} of that step"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument(
        "--sae-rounds", type=int, default=15, help="timed rounds of GEMM, copy and SAE step, taken in turns"
    )
    ap.add_argument(
        "--grpo-steps", type=int, default=3, help="timed GRPO steps after a warm-up step (medians)"
    )
    ap.add_argument(
        "--fixed-length",
        action="store_true",
        help="every GRPO completion 64 tokens long (end tokens masked), as grpo_step.py --fixed-length",
    )
    ap.add_argument(
        "--target-step-s",
        type=float,
        default=None,
        help="also print the sustained GFLOP/s a GRPO step of this many seconds would need",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from saereward.model.lm import cpu_has_fast_bf16

    f32 = gemm_gflops(4096, 576, 9216, torch.float32, args.reps)
    f32_mlp = gemm_gflops(1024, 576, 1536, torch.float32, args.reps)
    bw = bandwidth_gbs(512, args.reps)
    print(f"threads {torch.get_num_threads()}, fast bf16: {cpu_has_fast_bf16()}")  # noqa: T201
    print(f"fp32 GEMM  {f32:.1f} GFLOP/s at 4096x576x9216 (SAE encoder), {f32_mlp:.1f} at 1024x576x1536")  # noqa: T201
    select_dtype = (
        torch.float32
    )  # the fast kernels' encoder product runs in bf16 where the CPU has bf16 units
    if cpu_has_fast_bf16():
        select_dtype = torch.bfloat16
        bf16 = gemm_gflops(4096, 576, 9216, torch.bfloat16, args.reps)
        print(f"bf16 GEMM  {bf16:.1f} GFLOP/s at 4096x576x9216 (the SAE's bf16 selection)")  # noqa: T201
    print(f"bandwidth  {bw:.1f} GB/s (copy, read + write)")  # noqa: T201
    sae = sae_row(select_dtype, 576, 9216, 32, 4096, args.sae_rounds)
    print(  # noqa: T201
        f"SAE row, measured in turns with our steps ({args.sae_rounds} rounds, medians): "
        f"{sae['gflops']:.1f} GFLOP/s, {sae['gbs']:.1f} GB/s"
    )
    print(  # noqa: T201
        f"  one {SAE_BLOCK}-row block against a packed weight on one thread: {sae['block_gflops']:.1f} GFLOP/s; "
        f"at {torch.get_num_threads()}x that rate the bound would be {sae['strict_bound_s']:.3f} s "
        f"(ours at {sae['strict_bound_s'] / sae['ours_s']:.0%} of it)"
    )
    print("\n| step | ours | hardware bound | ours / bound |\n|---|---|---|---|")  # noqa: T201
    print(  # noqa: T201
        f"| SAE train step (B 4096, d 576, M 9216, k 32) | {sae['ours_s']:.3f} s ({sae['ours_tok_s']:,.0f} tok/s) "
        f"| {sae['bound_s']:.3f} s ({sae['bound_tok_s']:,.0f} tok/s) | {sae['ours_s'] / sae['bound_s']:.2f}x |"
    )
    if not args.skip_grpo:
        print_grpo(*grpo_rows(args.grpo_steps, args.fixed_length), args.target_step_s)
        print_decode_products(bw, max(args.reps, 10))
    print(f"sae_fraction_of_bound={sae['bound_s'] / sae['ours_s']:.2f}")  # noqa: T201


if __name__ == "__main__":
    main()
