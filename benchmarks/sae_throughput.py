"""TopK SAE training throughput and quality: saereward vs EleutherAI sparsify vs SAELens, in one process.

Peers live in the main venv next to torch 2.13.0 / transformers 5.23.0 (no separate venv needed). The
dry run with both pins reports nothing to install or change, and the real install is the same line
without ``--dry-run``:

    printf 'torch==2.13.0\\ntransformers==5.23.0\\n' > /tmp/pins.txt
    .venv/bin/pip install --dry-run eai-sparsify==1.3.3 sae-lens==6.54.12 -c /tmp/pins.txt
    .venv/bin/pip install eai-sparsify==1.3.3 sae-lens==6.54.12 -c /tmp/pins.txt

What runs (all fp32 weights on CPU, same batches, same Adam lr 2e-4 with our warmup + cosine-to-0.3
schedule, same init seed where the library takes one):

* ``saereward``: :class:`saereward.sae.train.SAETrainer` ``train_step`` (fast kernels: bf16 selection,
  sparse decoder, sparse encoder backward; re-normalize every 10 steps; loss FVU + AuxK/8). Its init
  directions are isotropic by default; ``--init-dist uniform`` draws them as sparsify's ``nn.Linear``
  does, which is what its held-out FVU depends on most on this synthetic data; ``--rotate-basis``
  trains it in a random orthonormal basis (BENCHMARKS.md).
* ``sparsify``: ``sparsify.SparseCoder`` driven by the body of ``sparsify.Trainer.fit`` replayed step
  for step (its ``Trainer`` needs an HF model to hook; the SAE math is the library's): b_dec = batch
  mean at step 0, decoder re-normalized every step, ``remove_gradient_parallel_to_decoder_directions``,
  loss ``fvu + auxk_alpha * auxk`` with AuxK at 1/8, dead after 10M tokens.
* ``saelens``: ``sae_lens.TopKTrainingSAE`` trained by ``sae_lens`` ``SAETrainer.step`` (its own loss,
  grad clipping and dead-neuron bookkeeping); its LR scheduler is replaced by the shared schedule.
* ``eager`` (with ``--with-eager``): saereward with ``SAEREWARD_KERNELS=eager``, i.e. a naive dense TopK.

Timing: the trainers take turns, ``--interval`` steps each (order rotated every round) on the same
batches, so machine load hits all of them alike; tokens/s is the median over the timed intervals (the
first is warm-up). Quality: FVU on ``--eval-tokens`` held-out tokens after the whole ``--tokens`` budget.

Data: ``--acts FILE.safetensors`` (a ``[N, d]`` tensor of real residuals whose last 5% is held out, or
``train`` and ``heldout`` tensors; training cycles with a fresh permutation per epoch), else synthetic
*real-ish* residuals (:class:`Synthetic`): a large mean offset, a sparse code over 4 x M ground-truth
unit directions with Zipf feature frequencies and log-normal magnitudes, a rank-32 dense part with a
decaying spectrum, per-token log-normal scale, 0.5% "attention sink" tokens 30x off along one
direction, and small isotropic noise. Batch ``i`` depends only on ``(seed, i)``.

    .venv/bin/python benchmarks/sae_throughput.py                  # d=576, M=9216, k=32, 2M tokens, all peers
    .venv/bin/python benchmarks/sae_throughput.py --quick          # < 60 s; last line speedup_vs_sparsify=<x>
    .venv/bin/python benchmarks/sae_throughput.py --grid           # tokens/s over M x k (ours vs sparsify)
    .venv/bin/python benchmarks/sae_throughput.py --acts acts.safetensors --peers sparsify
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from bench_out import check_out, write_out
from saereward.sae import kernels
from saereward.sae.coder import TopKSAE
from saereward.sae.train import SAETrainConfig, SAETrainer, lr_at

LR = 2e-4
AUX = 1 / 8
DEAD_TOKENS = 10_000_000
#: where every trainer runs (``--device``); batches are moved there before the timed steps
DEVICE = torch.device("cpu")


def _sync() -> None:
    """Wait for queued GPU work, so host timers measure it (no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class Synthetic:
    """Real-ish synthetic residuals (see module docstring); ``batch(i, n)`` is deterministic in ``i``."""

    def __init__(self, d: int, n_features: int, seed: int = 0, active: int = 24) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d, self.seed, self.active = d, seed, active
        self.mean = 2.0 * torch.randn(d, generator=g)
        dirs = torch.randn(n_features, d, generator=g)
        self.dirs = dirs / dirs.norm(dim=1, keepdim=True)
        ranks = torch.arange(1, n_features + 1, dtype=torch.float64)
        self.freq = (1.0 / (ranks + 10.0) ** 1.1)[torch.randperm(n_features, generator=g)]
        self.scale = torch.exp(0.5 * torch.randn(n_features, generator=g))
        self.lowrank = torch.randn(32, d, generator=g) / torch.arange(1, 33).sqrt()[:, None]
        self.sink = torch.randn(d, generator=g)
        self.sink /= self.sink.norm()

    def batch(self, i: int, n: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.multinomial(self.freq, n * self.active, replacement=True, generator=g).view(
            n, self.active
        )
        mags = torch.exp(0.7 * torch.randn(n, self.active, generator=g)) * self.scale[ids]
        sparse = F.embedding_bag(ids, self.dirs, per_sample_weights=mags, mode="sum")
        token_scale = torch.exp(0.3 * torch.randn(n, 1, generator=g))
        dense = torch.randn(n, 32, generator=g) @ self.lowrank
        x = self.mean + token_scale * sparse + dense + 0.05 * torch.randn(n, self.d, generator=g)
        sinks = torch.rand(n, generator=g) < 0.005
        x[sinks] += 30.0 * self.sink
        return x


class FileActs:
    """Batches from a ``[N, d]`` tensor on disk; the last 5% is held out, the rest cycled per epoch."""

    def __init__(self, path: str, seed: int = 0) -> None:
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "train" in tensors and "heldout" in tensors:  # an explicit split (e.g. ActivationStore's)
            self.train, self.heldout = tensors["train"].float(), tensors["heldout"].float()
        else:
            key = next((k for k in ("acts", "activations", "x") if k in tensors), next(iter(tensors)))
            acts = tensors[key].float().reshape(-1, tensors[key].shape[-1])
            n_hold = max(1, len(acts) // 20)
            self.train, self.heldout = acts[:-n_hold], acts[-n_hold:]
        self.d, self.seed = self.train.shape[1], seed
        self._perm: dict[int, Tensor] = {}

    def batch(self, i: int, n: int) -> Tensor:
        if i >= 10**6:  # held-out range
            start = ((i - 10**6) * n) % len(self.heldout)
            return self.heldout.roll(-start, 0)[:n]
        start = i * n
        out = []
        while len(out) < n:
            epoch, pos = divmod(start, len(self.train))
            if epoch not in self._perm:
                self._perm = {
                    epoch: torch.randperm(len(self.train), generator=torch.Generator().manual_seed(epoch))
                }
            take = self._perm[epoch][pos : pos + n - len(out)]
            out.extend(take.tolist())
            start += len(take)
        return self.train[torch.tensor(out)]


# --------------------------------------------------------------------------------------------------
# Trainers under test
# --------------------------------------------------------------------------------------------------


class Runner(Protocol):
    name: str

    def step(self, x: Tensor) -> None: ...

    def recon(self, x: Tensor) -> Tensor: ...


def schedule(total_steps: int, warmup: int) -> Callable[[int], float]:
    """The shared LR multiplier (saereward's warmup + cosine to 0.3) for LambdaLR."""
    return lambda s: lr_at(s, peak=1.0, warmup=warmup, total=total_steps, floor=0.3)


class Ours:
    def __init__(
        self,
        d: int,
        m: int,
        k: int,
        batch: int,
        steps: int,
        warmup: int,
        mode: str = "fast",
        init_dist: str = "normal",
        rotate_basis: bool = False,
    ) -> None:
        self.name = "saereward" if mode == "fast" else "eager"
        self.mode = mode
        cfg = SAETrainConfig(
            d_sae=m,
            k=k,
            lr=LR,
            warmup_steps=warmup,
            batch_size=batch,
            total_tokens=steps * batch,
            aux_coef=AUX,
            dead_tokens=DEAD_TOKENS,
            checkpoint_every=0,
            log_every=10**9,
            progress=False,
            kernels=mode,
            init_dist=init_dist,  # type: ignore[arg-type]
            rotate_basis=rotate_basis,
        )
        self.trainer = SAETrainer(cfg, d, device=DEVICE)
        self._exported: TopKSAE | None = None

    def step(self, x: Tensor) -> None:
        self._exported = None
        with kernels.use_kernels(self.mode):  # type: ignore[arg-type]
            if not self.trainer.initialized:
                self.trainer.initialize(x)
            self.trainer.train_step(x)

    @torch.no_grad()
    def recon(self, x: Tensor) -> Tensor:
        if self._exported is None:  # the SAE in the data's basis (a folded copy with rotate_basis)
            self._exported = self.trainer.export()
        with kernels.use_kernels("eager"):
            return self._exported(x).recon


class Sparsify:
    name = "sparsify"

    def __init__(self, d: int, m: int, k: int, batch: int, steps: int, warmup: int) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a Triton notice on import
            from sparsify import SparseCoder, SparseCoderConfig
        torch.manual_seed(0)
        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k), device=DEVICE, dtype=torch.float32)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule(steps, warmup))
        self.since_fired = torch.zeros(m, dtype=torch.long, device=DEVICE)
        self.did_fire = torch.zeros(m, dtype=torch.bool, device=DEVICE)
        self.first = True

    def step(self, x: Tensor) -> None:  # the body of sparsify.Trainer.fit for one SAE, loss_fn="fvu"
        sae = self.sae
        if self.first:
            sae.b_dec.data = x.mean(0)
            self.first = False
        sae.set_decoder_norm_to_unit_norm()
        dead = self.since_fired > DEAD_TOKENS
        out = sae(x=x, y=x, dead_mask=dead, total_variance=(x - x.mean(0)).pow(2).sum())
        self.did_fire[out.latent_indices.flatten()] = True
        (out.fvu + AUX * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[self.did_fire] = 0
            self.did_fire.zero_()

    @torch.no_grad()
    def recon(self, x: Tensor) -> Tensor:
        return self.sae(x).sae_out


class SaeLens:
    name = "saelens"

    def __init__(self, d: int, m: int, k: int, batch: int, steps: int, warmup: int) -> None:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer as LensTrainer

        torch.manual_seed(0)
        sae = TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, dtype="float32", device=str(DEVICE))
        )
        cfg = SAETrainerConfig(
            total_training_samples=steps * batch,
            train_batch_size_samples=batch,
            lr=LR,
            lr_end=0.3 * LR,
            lr_warm_up_steps=warmup,
            device=str(DEVICE),
        )
        self.trainer = LensTrainer(cfg, sae, data_provider=iter(()))
        self.trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.trainer.optimizer, schedule(steps, warmup)
        )
        self.sae = sae

    def step(self, x: Tensor) -> None:
        self.trainer.step(x)
        self.trainer.n_training_steps += 1

    @torch.no_grad()
    def recon(self, x: Tensor) -> Tensor:
        return self.sae(x)


PEERS: dict[str, Callable[..., Runner]] = {"sparsify": Sparsify, "saelens": SaeLens}


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def fvu(runner: Runner, data: Synthetic | FileActs, eval_tokens: int, batch: int) -> float:
    xs = [data.batch(10**6 + i, batch).to(DEVICE) for i in range(max(1, eval_tokens // batch))]
    x_all = torch.cat(xs)
    mean = x_all.mean(0)
    sse = sum(float((x - runner.recon(x)).pow(2).sum()) for x in xs)
    return sse / float((x_all - mean).pow(2).sum())


def run(
    args: argparse.Namespace,
    d: int,
    m: int,
    k: int,
    peers: list[str],
    with_eager: bool,
    tokens: int,
    data: Synthetic | FileActs,
    evaluate: bool,
) -> dict[str, dict[str, float]]:
    steps = max(args.interval * (args.min_intervals + 1), tokens // args.batch)
    rounds = math.ceil(steps / args.interval)
    steps = rounds * args.interval
    warmup = max(1, steps // 10)
    kw = {"init_dist": args.init_dist, "rotate_basis": args.rotate_basis}
    runners: list[Runner] = [Ours(d, m, k, args.batch, steps, warmup, **kw)]
    if with_eager:
        runners.append(Ours(d, m, k, args.batch, steps, warmup, mode="eager", **kw))
    runners += [PEERS[p](d, m, k, args.batch, steps, warmup) for p in peers]
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    t_start = time.perf_counter()
    for r in range(rounds):
        batches = [data.batch(r * args.interval + j, args.batch).to(DEVICE) for j in range(args.interval)]
        order = runners[r % len(runners) :] + runners[: r % len(runners)]
        for runner in order:
            _sync()
            t0 = time.perf_counter()
            for x in batches:
                runner.step(x)
            _sync()
            times[runner.name].append(time.perf_counter() - t0)
        if args.verbose and (r % 10 == 0 or r == rounds - 1):
            live = {
                n: round(args.interval * args.batch / statistics.median(t[1:] or t)) for n, t in times.items()
            }
            print(
                f"  round {r + 1}/{rounds} ({time.perf_counter() - t_start:.0f}s) tok/s {live}",
                file=sys.stderr,
            )
    results: dict[str, dict[str, float]] = {}
    for runner in runners:
        timed = times[runner.name][1:]
        res = {
            "tok_s": args.interval * args.batch / statistics.median(timed),
            "intervals": float(len(timed)),
            "tokens": float(steps * args.batch),
        }
        if evaluate:
            res["fvu"] = fvu(runner, data, args.eval_tokens, args.batch)
        results[runner.name] = res
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    base = results.get("sparsify", {}).get("tok_s")
    lines = ["| trainer | tokens/s | vs sparsify | FVU (held-out) |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        fv = f"{r['fvu']:.4f}" if "fvu" in r else "-"
        lines.append(f"| {name} | {r['tok_s']:,.0f} | {ratio} | {fv} |")
    return "\n".join(lines)


def _device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", help="a safetensors file with a [N, d] tensor of real residuals")
    ap.add_argument("--d-sae", type=int, default=9216)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training budget per trainer")
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    ap.add_argument("--interval", type=int, default=5, help="steps per timed interval")
    ap.add_argument("--min-intervals", type=int, default=5)
    ap.add_argument("--peers", default="sparsify,saelens", help="comma list of sparsify, saelens (or empty)")
    ap.add_argument("--with-eager", action="store_true", help="also time saereward's eager (dense) reference")
    ap.add_argument("--quick", action="store_true", help="speed only, ours vs sparsify, < 60 s")
    ap.add_argument(
        "--grid", action="store_true", help="tokens/s over M in {4608,9216,18432} x k in {32,64,128}"
    )
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads for every trainer (0: torch's default)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--init-dist",
        choices=("normal", "uniform"),
        default="normal",
        help="saereward's init directions (SAETrainConfig.init_dist; uniform draws them as sparsify does)",
    )
    ap.add_argument(
        "--rotate-basis",
        action="store_true",
        help="saereward trains in a random orthonormal basis (SAETrainConfig.rotate_basis)",
    )
    ap.add_argument("--d-in", type=int, default=576, help="synthetic data width (SmolLM2-135M: 576)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: every trainer runs there")
    ap.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: allow TF32 for every trainer's fp32 matmuls (off by default)",
    )
    ap.add_argument("--verbose", action="store_true")
    return ap


def _grid(
    args: argparse.Namespace, d: int, peers: list[str], data: Synthetic | FileActs
) -> dict[str, object]:
    """``--grid``: ours and sparsify over M × k; prints the table, returns the results by cell."""
    args.interval = 2
    rows = ["| M | k | saereward tok/s | sparsify tok/s | speedup |", "|---:|---:|---:|---:|---:|"]
    grid = {}
    for m in (4608, 9216, 18432):
        for k in (32, 64, 128):
            spar = [p for p in peers if p == "sparsify"] or ["sparsify"]
            res = run(args, d, m, k, spar, False, 0, data, evaluate=False)
            ours, sp = res["saereward"]["tok_s"], res["sparsify"]["tok_s"]
            rows.append(f"| {m} | {k} | {ours:,.0f} | {sp:,.0f} | {ours / sp:.2f}x |")
            grid[f"M{m}_k{k}"] = res
            print(rows[-1], flush=True)
    print("\n".join(rows))
    return grid


def main() -> None:
    args = _parser().parse_args()
    check_out(args.out, "--out")
    warnings.filterwarnings("ignore")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu")
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    if args.threads:
        torch.set_num_threads(args.threads)
    peers = [p for p in args.peers.split(",") if p]

    data: Synthetic | FileActs
    if args.acts:
        data = FileActs(args.acts, args.seed)
        source = f"real activations from {args.acts} ({len(data.train):,} train tokens)"
    else:
        data = Synthetic(args.d_in, 4 * args.d_sae, seed=args.seed)
        source = "synthetic real-ish residuals (see docstring)"
    d = data.d
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"device {_device_name()}{' (TF32 on)' if args.tf32 else ''}, "
        f"SAEREWARD_KERNELS={os.environ.get('SAEREWARD_KERNELS', 'fast')}; data: {source}"
    )
    print(header)
    report: dict[str, object] = {"header": header}

    if args.quick:
        args.interval, args.min_intervals = 1, 5
        res = run(args, d, args.d_sae, args.k, ["sparsify"], False, 0, data, evaluate=False)
        print(table(res))
        print(f"speedup_vs_sparsify={res['saereward']['tok_s'] / res['sparsify']['tok_s']:.2f}")
        return

    if args.grid:
        report["grid"] = _grid(args, d, peers, data)
    else:
        res = run(args, d, args.d_sae, args.k, peers, args.with_eager, args.tokens, data, evaluate=True)
        print(
            f"d={d}, M={args.d_sae}, k={args.k}, batch={args.batch}, {int(res['saereward']['tokens']):,} tokens each"
        )
        print(table(res))
        report["main"] = res
        if "sparsify" in res:
            print(f"speedup_vs_sparsify={res['saereward']['tok_s'] / res['sparsify']['tok_s']:.2f}")
    write_out(args.out, report)


if __name__ == "__main__":
    main()
