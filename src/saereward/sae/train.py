"""Train a TopK SAE on a stream of activation batches: mechreward's recipe, resumable bit for bit.

Recipe (mechreward's, :mod:`saereward.sae.coder` for the model itself):

* Adam (lr 2e-4), linear warmup, then cosine decay to a floor of ``lr_floor`` (0.3) x peak;
* loss ``recon + aux_coef * auxk`` with ``aux_coef`` 1/8 and ``k_aux`` 512; a latent is *dead* once it
  has not fired (been in a token's top-k with a positive value) for ``dead_tokens`` tokens;
* ``b_dec`` starts at the geometric median of the first batch; decoder rows are re-normalized every
  ``renorm_every`` (10) steps.

Departures from mechreward, all switchable:

* ``init_enc_scale`` (default 1/sqrt(3) = 0.577): a fresh run starts from ``W_enc = 0.577 * W_dec.T``
  instead of the tied ``W_enc = W_dec.T``; directions stay tied, only the encoder's norm shrinks to
  that of sparsify's ``nn.Linear`` init. Adam's steps have a fixed size per element, so a smaller
  encoder turns faster. Measured on the benchmark data (d=576, M=9216, k=32, synthetic, held-out FVU
  vs sparsify at 0.1066): the tied init trails by 0.03 for most of the run and still by 0.009 after 2M
  tokens (0.1156); 0.577 tracks sparsify throughout and ends at 0.1094 (BENCHMARKS.md, "SAE training vs
  sparsify and SAELens"). Set 1.0 for mechreward's exact init.
* ``init_dist`` (default ``normal``: mechreward's isotropic directions) may draw the directions as
  sparsify does instead (``uniform``: ``U(-1, 1)`` entries, rows then scaled to unit norm). Which trains
  better depends on the data, and by more than anything else that differs between the two trainers:
  on SmolLM2-135M's layer-15 residuals ``normal`` reaches a 4 % lower held-out FVU, on the benchmark's
  synthetic residuals ``uniform`` a 1 % lower one (BENCHMARKS.md, same section).
* ``rotate_basis`` trains the SAE on ``x @ Q`` for a seeded random rotation ``Q`` and folds ``Q`` back
  (:func:`~saereward.sae.coder.change_basis`) into every SAE the trainer hands out: returned by
  :meth:`SAETrainer.fit`, saved, or given to ``evaluate``. The SAE's function class is the same in
  every orthonormal basis; Adam's per-coordinate steps are not. A residual stream keeps most of its
  variance in a few fixed coordinates (SmolLM2-135M layer 15: one coordinate holds 71 % of it), and in
  a random basis that variance is spread evenly. ``trainer.sae`` and checkpoints stay in the training
  basis (``trainer.export()`` folds it back).
* ``recon_loss="fvu"`` (default) divides the summed squared error by the batch's total variance instead
  of by ``N*d`` (mechreward's MSE). Both give the same gradient *direction* each step; FVU makes the
  relative weight of ``aux_coef`` independent of the residual stream's scale.
* ``remove_parallel_grad`` (off; sparsify does it and re-normalizes every step), ``grad_clip`` (off),
  ``resample_dead`` (off; re-initializes dead latents toward badly reconstructed inputs).

Interfaces (SAELens ``SAETrainer`` style): the trainer is given

* ``data``: the batches, ``[B, d_in]`` each, one per optimizer step. Either an iterable, or a callable
  ``data(start) -> Iterable`` that yields the batches *after the first ``start``*; the trainer records
  how many batches it consumed (``TrainState.batches``) and, on resume, passes that number back. The
  data source is responsible for skipping (``ActivationStore.iter_batches(start_batch=...)`` does).
* ``evaluate(sae) -> {name: value}`` (optional), run every ``eval_every`` steps and at the end;
* ``save(sae, folder)`` (optional; default :func:`saereward.sae.formats.save_sae` with the resolved
  training config), run once at the end.

Checkpoints (every ``checkpoint_every`` steps, no pickle): ``checkpoints/step-NNNNNNNNN/`` holds
``sae.safetensors`` (weights; with ``rotate_basis`` in the training basis, the seed that makes it in
the file's metadata, so a warm start from it folds it back), ``trainer.safetensors`` (Adam moments
and steps, tokens-since-fired, the torch and numpy RNG states as tensors) and ``trainer.json`` (step,
batches, tokens, python RNG state, the configs). The folder is complete and fsynced before
``checkpoints/latest.json`` is atomically re-pointed at it, so a kill at any instant leaves a loadable
checkpoint. ``fit(..., resume=True)`` on
CPU reproduces the uninterrupted run's final weights bit for bit: every kernel is deterministic, the
schedule is a pure function of the step, and the state above is everything that carries over.

Outputs in ``run_dir``: ``train_log.jsonl`` (step, loss, mse, fvu, auxk, l0, dead_pct, lr, grad_norm,
tokens, tok_s, eval/*), TensorBoard events in ``tensorboard/``, and a tqdm bar with FVU, L0 and dead %.

Distributed data parallel: when ``torch.distributed`` is initialized, every rank trains on its own
shard; parameters are broadcast from rank 0 after initialization and gradients are summed with one
all-reduce per step, scaled so that one step on ``world`` shards of ``B`` rows equals one step on their
concatenation (exactly for both recon losses: the FVU denominator is the global total variance; AuxK
keeps per-shard normalization). Rank 0 alone logs and checkpoints.

The optimizer works on *storage-order aliases* of the parameters (``W_enc`` is stored transposed, see
:mod:`.coder`): fused Adam then never copies a weight-sized tensor to make it contiguous.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from saereward.config import option, to_dict
from saereward.errors import RunMismatch, SaeRewardError
from saereward.io import as_json, atomic_path, finite, json_text, read_json, read_jsonl, write_json
from saereward.metrics import MetricSinks, ReportTo
from saereward.sae import kernels
from saereward.sae.coder import (
    PARAM_NAMES,
    ForwardOutput,
    InitDist,
    SAEConfig,
    TopKSAE,
    change_basis,
    geometric_median,
    random_rotation,
    rotate_state,
    unit_mean_norm_scale,
)
from saereward.sae.formats import load_sae, save_sae

log = logging.getLogger(__name__)

#: safetensors metadata key of a rotate_basis checkpoint's ``sae.safetensors``: the run's seed, whose
#: :func:`random_rotation` maps the model's basis to the weights' training basis
BASIS_SEED_KEY = "saereward_basis_seed"

DataSource = Iterable[Tensor] | Callable[[int], Iterable[Tensor]]
Evaluate = Callable[[TopKSAE], Mapping[str, float]]
Save = Callable[[TopKSAE, Path], Any]
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class SAETrainConfig:
    """Settings of one SAE training run (the architecture comes from ``d_sae``/``expansion`` and ``k``)."""

    d_sae: int | None = option(None, help="number of latents; None means expansion * d_in")
    expansion: int = option(16, help="latents per input dimension when d_sae is not given")
    k: int = option(32, help="active latents per token (TopK)")
    lr: float = option(2e-4, help="peak Adam learning rate")
    warmup_steps: int = option(1000, help="linear warmup steps from lr/warmup_steps to lr")
    lr_floor: float = option(0.3, help="cosine decay ends at lr_floor * lr on the last step")
    batch_size: int = option(
        4096, help="tokens per optimizer step (per rank); the data source yields batches of it"
    )
    total_tokens: int = option(
        50_000_000, help="training length in tokens (all ranks together); sets the schedule"
    )
    recon_loss: Literal["fvu", "mse"] = option(
        "fvu",
        help="reconstruction term: fvu (squared error / total variance) or mse (mechreward's, per element)",
    )
    aux_coef: float = option(1 / 8, help="weight of the AuxK loss (0 turns AuxK and its cost off)")
    k_aux: int = option(512, help="dead latents per token used by AuxK (at most the number of dead latents)")
    dead_tokens: int = option(10_000_000, help="a latent is dead after this many tokens without firing")
    renorm_every: int = option(10, help="re-normalize decoder rows to unit norm every N steps (0: never)")
    remove_parallel_grad: bool = option(
        False, help="project W_dec gradients orthogonal to the rows (sparsify)"
    )
    grad_clip: float = option(0.0, help="clip the global gradient norm to this value (0: no clipping)")
    normalize_input: Literal["none", "unit_mean_norm"] = option(
        "none", help="scale inputs so a sample's mean L2 norm is 1 (stored with the SAE)"
    )
    init_tokens: int = option(16384, help="rows of the first batch used for the b_dec median and input scale")
    init_enc_scale: float = option(
        3**-0.5,
        help="fresh runs start from W_enc = init_enc_scale * W_dec.T (1: mechreward's tied init; 0.577: the "
        "encoder norm of sparsify's nn.Linear init, which Adam trains faster)",
    )
    init_dist: InitDist = option(
        "normal",
        help="distribution of a fresh run's random directions, each row then scaled to unit norm: uniform "
        "(U(-1, 1) entries, the directions of sparsify's nn.Linear init) or normal (isotropic, mechreward's); "
        "drawn in the training basis when rotate_basis is on",
    )
    rotate_basis: bool = option(
        False,
        help="train in a random orthonormal basis of the residual stream (seeded), folded back into the "
        "model's basis whenever the SAE is saved, evaluated or returned: Adam's per-coordinate steps then "
        "meet no coordinate that holds most of the variance (a residual stream's massive activations)",
    )
    resample_dead: bool = option(False, help="re-initialize dead latents every resample_every steps")
    resample_every: int = option(2500, help="steps between dead-latent resamplings (with resample_dead)")
    warm_start: str | None = option(
        None, help="start from this SAE (any format load_sae reads) instead of random"
    )
    seed: int = option(0, help="seed of the weight init and of dead-latent resampling")
    checkpoint_every: int = option(1000, help="write a resumable checkpoint every N steps (0: never)")
    log_every: int = option(50, help="log metrics every N steps")
    eval_every: int = option(0, help="run the evaluate callable every N steps (0: only at the end)")
    kernels: Literal["auto", "fast", "eager"] = option(
        "auto", help="SAE kernels: fast, eager (reference), or auto ($SAEREWARD_KERNELS, default fast)"
    )
    progress: bool = option(True, help="show a progress bar")
    report_to: tuple[ReportTo, ...] = option(
        ("tensorboard",),
        help="metric sinks beside train_log.jsonl: tensorboard, wandb (the wandb extra), none",
    )

    def __post_init__(self) -> None:
        positive = (
            "expansion",
            "k",
            "batch_size",
            "total_tokens",
            "k_aux",
            "dead_tokens",
            "init_tokens",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise SaeRewardError(f"{name}={getattr(self, name)} must be at least 1")
        nonneg = ("warmup_steps", "renorm_every", "checkpoint_every", "eval_every", "aux_coef", "grad_clip")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise SaeRewardError(f"{name}={getattr(self, name)} must not be negative")
        if self.d_sae is not None and self.d_sae < self.k:
            raise SaeRewardError(f"d_sae={self.d_sae} is smaller than k={self.k}: raise d_sae or lower k")
        for name in ("lr", "init_enc_scale"):
            if not getattr(self, name) > 0:
                raise SaeRewardError(f"{name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.lr_floor <= 1.0:
            raise SaeRewardError(f"lr_floor={self.lr_floor} must be between 0 and 1")
        if self.resample_dead and self.resample_every < 1:
            raise SaeRewardError("resample_every must be at least 1 when resample_dead is on")


class TrainPlan(NamedTuple):
    """Values derived from a config and the data (kept off the frozen config)."""

    d_in: int
    d_sae: int
    total_steps: int
    world_size: int


def plan(cfg: SAETrainConfig, d_in: int, world_size: int = 1) -> TrainPlan:
    d_sae = cfg.d_sae if cfg.d_sae is not None else cfg.expansion * d_in
    steps = max(1, math.ceil(cfg.total_tokens / (cfg.batch_size * world_size)))
    return TrainPlan(d_in, d_sae, steps, world_size)


def lr_at(step: int, *, peak: float, warmup: int, total: int, floor: float) -> float:
    """Learning rate of 0-based ``step``: linear warmup, then cosine from ``peak`` to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that a resume must restore."""

    step: int = 0  # optimizer steps taken
    batches: int = 0  # batches consumed from the data source (per rank)
    tokens: int = 0  # tokens trained on, all ranks


# --------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------


def _storage_alias(t: Tensor) -> Tensor:
    """A contiguous view of ``t``'s memory (``t`` itself, or ``t.T`` for transposed storage)."""
    if t.is_contiguous():
        return t
    if t.dim() == 2 and t.t().is_contiguous():
        return t.t()
    raise ValueError("parameter is neither contiguous nor a transposed contiguous matrix")


def _same_layout(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` viewed like :func:`_storage_alias` views ``param``."""
    g = grad if param.is_contiguous() else grad.t()
    return g if g.is_contiguous() else g.contiguous()


def _dist() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialized process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def resample_dead_latents(
    sae: TopKSAE, x: Tensor, dead: Tensor, generator: torch.Generator, enc_scale: float = 0.2
) -> Tensor:
    """Point dead latents at badly reconstructed inputs (Anthropic's "Towards Monosemanticity" recipe).

    Inputs are sampled with probability proportional to their squared reconstruction error; each dead
    latent's decoder row becomes the unit direction of its sample's centered input, its encoder column
    that direction times ``enc_scale`` times the mean norm of the live encoder columns, its bias 0.
    Returns the ids of the resampled latents. Pure apart from writing the weights.
    """
    ids = dead.nonzero().reshape(-1)
    if ids.numel() == 0:
        return ids
    with torch.no_grad():
        xn = sae.flat_input(x)
        err = (xn - sae.decode_topk(*sae.encode_topk(x)) * sae.scale).pow(2).sum(1)
        weights = err.double().cpu() + 1e-12
        pick = torch.multinomial(weights, ids.numel(), replacement=True, generator=generator).to(x.device)
        dirs = xn[pick] - sae.b_dec
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[ids] = dirs.to(sae.W_dec.dtype)
        sae.W_enc[:, ids] = (dirs * enc_norm * enc_scale).t().to(sae.W_enc.dtype)
        sae.b_enc[ids] = 0.0
    return ids


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


def _seed_global_rngs(seed: int) -> None:
    """Seed Python's, torch's and NumPy's global generators (training itself draws from its own)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        pass


class SAETrainer:
    """Owns one SAE, its optimizer and bookkeeping; :meth:`fit` runs the loop.

    Args:
        cfg: training settings.
        d_in: residual width.
        run_dir: folder for logs, checkpoints and the final SAE (``None``: nothing is written).
        sae: warm-start weights (overrides ``cfg.warm_start``); ``None`` starts from random weights.
        evaluate, save: see the module docstring.
        model, layer: recorded in the SAE's config.
        device: where to train.
    """

    def __init__(
        self,
        cfg: SAETrainConfig,
        d_in: int,
        *,
        run_dir: str | Path | None = None,
        sae: TopKSAE | Mapping[str, Tensor] | None = None,
        evaluate: Evaluate | None = None,
        save: Save | None = None,
        model: str | None = None,
        layer: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg = cfg
        self.rank, world = _dist()
        self.plan = plan(cfg, d_in, world)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.evaluate_fn = evaluate
        self.save_fn = save
        self.device = torch.device(device)
        self.state = TrainState()
        # the global generators go into every checkpoint (for a resume): seeded, two runs' match
        _seed_global_rngs(cfg.seed)
        sae_cfg = SAEConfig(
            d_in=d_in,
            d_sae=self.plan.d_sae,
            k=cfg.k,
            normalize_input=cfg.normalize_input,
            model=model,
            layer=layer,
        )
        self.sae = TopKSAE(sae_cfg, seed=cfg.seed, device=self.device, init_dist=cfg.init_dist)
        #: ``[d_in, d_in]`` rotation into the training basis (``rotate_basis``); ``self.sae`` lives there
        self.basis = (
            random_rotation(d_in, cfg.seed).to(self.device, torch.float32) if cfg.rotate_basis else None
        )
        self.initialized = self._warm_start(sae)
        params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
        self._params = params
        self._aliases = [_storage_alias(p.detach()) for p in params]
        self.opt = _adam(self._aliases, cfg.lr)
        self.since_fired = torch.zeros(self.plan.d_sae, dtype=torch.int64, device=self.device)

    # -- setup ------------------------------------------------------------------------------------

    def _warm_start(self, init: TopKSAE | Mapping[str, Tensor] | None) -> bool:
        """Copy warm-start weights in; True when the SAE needs no data-dependent init."""
        if init is None and self.cfg.warm_start:
            init = _load_warm_start(self.cfg.warm_start)
        if init is None:
            return False
        if isinstance(init, TopKSAE):
            if init.cfg.d_in != self.sae.cfg.d_in or init.cfg.d_sae != self.sae.cfg.d_sae:
                raise SaeRewardError(
                    f"warm-start SAE is {init.cfg.d_in}x{init.cfg.d_sae} but this run trains "
                    f"{self.sae.cfg.d_in}x{self.sae.cfg.d_sae}: set d_sae={init.cfg.d_sae} or drop warm_start"
                )
            self.sae.cfg = dataclasses.replace(
                self.sae.cfg, normalize_input=init.cfg.normalize_input, input_scale=init.cfg.input_scale
            )
            state: Mapping[str, Tensor] = {n: getattr(init, n) for n in PARAM_NAMES}
        else:
            state = init
        with torch.no_grad():
            for name in PARAM_NAMES:
                if name not in state or tuple(state[name].shape) != tuple(getattr(self.sae, name).shape):
                    raise SaeRewardError(
                        f"warm-start weights lack a matching {name}: use weights of the same shape"
                    )
                getattr(self.sae, name).copy_(state[name])
        if self.basis is not None:
            self._load_weights(change_basis(self.sae, self.basis))
        return True

    def _load_weights(self, sae: TopKSAE) -> None:
        with torch.no_grad():
            for name in PARAM_NAMES:
                getattr(self.sae, name).copy_(getattr(sae, name))

    def _to_basis(self, x: Tensor) -> Tensor:
        """A batch on the trainer's device, in the training basis."""
        x = x.to(self.device)
        return x if self.basis is None else x.to(self.basis.dtype) @ self.basis

    def export(self) -> TopKSAE:
        """The SAE in the model's basis: ``self.sae`` itself, or (``rotate_basis``) a folded copy."""
        return self.sae if self.basis is None else change_basis(self.sae, self.basis.t())

    def initialize(self, x: Tensor) -> None:
        """Fresh-run init from the first batch: input scale, ``b_dec`` = geometric median, encoder scale."""
        sample = self._to_basis(x[: self.cfg.init_tokens]).to(torch.float32)
        if self.cfg.normalize_input == "unit_mean_norm":
            self.sae.cfg = dataclasses.replace(self.sae.cfg, input_scale=unit_mean_norm_scale(sample))
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(sample * self.sae.scale))
            self.sae.W_enc.mul_(self.cfg.init_enc_scale)
        if self.plan.world_size > 1:  # every rank starts from rank 0's weights and scale
            for p in self._params:
                torch.distributed.broadcast(p.data, src=0)
            scale = torch.tensor([self.sae.cfg.input_scale], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(scale, src=0)
            self.sae.cfg = dataclasses.replace(self.sae.cfg, input_scale=float(scale))
        self.initialized = True

    # -- one step ---------------------------------------------------------------------------------

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.cfg.dead_tokens

    def _loss(self, out: ForwardOutput, x: Tensor) -> Tensor:
        """``recon + aux_coef * auxk``, scaled so that averaging gradients over ranks is exact."""
        world = self.plan.world_size
        if self.cfg.recon_loss == "mse":
            recon = out.mse
        elif world == 1:
            recon = out.fvu
        else:  # FVU against the *global* total variance: sum_r sse_r / tv == one big batch
            xn = x.reshape(-1, x.shape[-1]).to(out.mse.dtype) * self.sae.scale
            moments = torch.stack([xn.sum(0), xn.pow(2).sum(0)])
            count = torch.tensor(float(xn.shape[0]), dtype=xn.dtype, device=xn.device)
            torch.distributed.all_reduce(moments)
            torch.distributed.all_reduce(count)
            tv = (moments[1] - moments[0].pow(2) / count).sum()
            recon = out.mse * out.recon.numel() * world / tv
        return recon + self.cfg.aux_coef * out.auxk if self.cfg.aux_coef > 0 else recon

    def train_step(self, x: Tensor) -> dict[str, Tensor | float]:
        """One optimizer step on batch ``x`` ``[B, d_in]``; returns detached metrics (tensors).

        With fast kernels on CPU the step runs inside :func:`kernels.cpu_step`: small ops on this
        thread, the heavy SAE kernels shared out to a worker pool (robust to a loaded machine). The
        rotation into the training basis (``rotate_basis``) runs before, on all of torch's threads.
        """
        x = self._to_basis(x)
        if kernels.kernel_mode() == "fast":
            with kernels.cpu_step(self.device):
                return self._step(x)
        return self._step(x)

    def _step(self, x: Tensor) -> dict[str, Tensor | float]:
        cfg = self.cfg
        lr = lr_at(
            self.state.step,
            peak=cfg.lr,
            warmup=cfg.warmup_steps,
            total=self.plan.total_steps,
            floor=cfg.lr_floor,
        )
        for group in self.opt.param_groups:
            group["lr"] = lr
        dead = self.dead_mask() if cfg.aux_coef > 0 else None
        out = self.sae(x, dead_mask=dead, k_aux=cfg.k_aux)
        loss = self._loss(out, x)
        if not bool(torch.isfinite(loss)):  # before any update: the weights and checkpoints stay good
            raise SaeRewardError(
                f"SAE training diverged at step {self.state.step}: the loss is {float(loss.detach())}; the weights "
                "were not updated and the last checkpoint is kept. Check the activations for NaN/inf "
                "or lower lr, then resume"
            )
        for p in self._params:
            p.grad = None
        loss.backward()
        self._sync_grads()
        if cfg.remove_parallel_grad:
            self.sae.remove_parallel_grad()
        grads = [_same_layout(p.grad, p) if p.grad is not None else None for p in self._params]
        gnorm = self._clip(grads)
        for a, g in zip(self._aliases, grads):
            a.grad = g
        self.opt.step()
        for a in self._aliases:
            a.grad = None
        n_tokens = x.shape[0] * self.plan.world_size
        self._update_dead(out, n_tokens)
        self.state.step += 1
        self.state.tokens += n_tokens
        if cfg.renorm_every and self.state.step % cfg.renorm_every == 0:
            self.sae.normalize_decoder()
        if cfg.resample_dead and self.state.step % cfg.resample_every == 0:
            self._resample(x)
        l0 = (out.top_acts > 0).sum(-1).float().mean()
        return {
            "loss": loss.detach(),
            "mse": out.mse.detach(),
            "fvu": out.fvu.detach(),
            "auxk": out.auxk.detach(),
            "l0": l0,
            "lr": lr,
            "grad_norm": gnorm,
        }

    def _sync_grads(self) -> None:
        """Average gradients over ranks with one all-reduce of a flat buffer."""
        if self.plan.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch.cat([_same_layout(g, p).reshape(-1) for g, p in zip(grads, self._params)])
        torch.distributed.all_reduce(flat)
        flat /= self.plan.world_size
        offset = 0
        for g, p in zip(grads, self._params):
            n = g.numel()
            chunk = flat[offset : offset + n]
            p.grad = chunk.view(g.t().shape).t() if not p.is_contiguous() else chunk.view(g.shape)
            offset += n

    def _clip(self, grads: list[Tensor | None]) -> Tensor | float:
        """Clip to ``grad_clip`` when set; return the global norm (computed only when needed)."""
        present = [g for g in grads if g is not None]
        need_norm = self.cfg.grad_clip > 0 or (self.state.step + 1) % self.cfg.log_every == 0
        if not need_norm or not present:
            return float("nan")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
        if self.cfg.grad_clip > 0:
            factor = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(present, factor)
        return norm

    def _update_dead(self, out: ForwardOutput, n_tokens: int) -> None:
        """Count tokens since each latent last fired. No boolean indexing: on CUDA that reads a count
        back to the host (a sync each step); a scatter-add and ``masked_fill_`` do not."""
        fires = torch.zeros(self.plan.d_sae, dtype=torch.int32, device=self.device)
        fires.scatter_add_(0, out.top_indices.reshape(-1), (out.top_acts > 0).reshape(-1).to(torch.int32))
        if self.plan.world_size > 1:
            torch.distributed.all_reduce(fires, op=torch.distributed.ReduceOp.MAX)
        self.since_fired += n_tokens
        self.since_fired.masked_fill_(fires > 0, 0)

    def _resample(self, x: Tensor) -> None:
        dead = self.since_fired >= self.cfg.dead_tokens
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.state.step)
        ids = resample_dead_latents(self.sae, x, dead, gen)
        if ids.numel() == 0:
            return
        if self.plan.world_size > 1:
            for p in self._params:
                torch.distributed.broadcast(p.data, src=0)
        for alias in self._aliases:  # fresh Adam moments for the re-initialized rows
            st = self.opt.state.get(alias, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st and st[key].shape[0] == self.plan.d_sae:
                    st[key][ids] = 0.0
        self.since_fired[ids] = 0
        log.info("resampled %d dead latents at step %d", ids.numel(), self.state.step)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, data: DataSource, *, resume: bool = False) -> TopKSAE:
        """Train until ``total_tokens`` (or the data ends); returns the trained SAE.

        ``resume=True`` continues from the latest checkpoint in ``run_dir`` (a fresh start if none).
        """
        if resume:
            self.resume_latest()
        batches = data(self.state.batches) if callable(data) else data
        with kernels.use_kernels(self.cfg.kernels), ExitStack() as stack:
            logger = stack.enter_context(_Logger(self, enabled=self.rank == 0))
            for x in _take(batches, self.plan.total_steps - self.state.step):
                self.state.batches += 1
                if not self.initialized:
                    self.initialize(x)
                metrics = self.train_step(x)
                self._after_step(metrics, logger)
            logger.flush()
            logger.eval_row(self._evaluate(), final=True)
        self._save_final()
        return self.export()

    def _after_step(self, metrics: dict[str, Tensor | float], logger: _Logger) -> None:
        step = self.state.step
        logger.accumulate(metrics)
        if step % self.cfg.log_every == 0:
            logger.write(metrics)
        if self.cfg.eval_every and step % self.cfg.eval_every == 0 and step < self.plan.total_steps:
            logger.eval_row(self._evaluate())
        if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0 and self.run_dir is not None:
            self.save_checkpoint()

    def _evaluate(self) -> dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        with torch.no_grad():
            return {str(k): float(v) for k, v in self.evaluate_fn(self.export()).items()}

    def _save_final(self) -> None:
        if self.rank != 0 or self.run_dir is None:
            return
        sae = self.export()
        if self.save_fn is not None:
            self.save_fn(sae, self.run_dir / "sae")
            return

        save_sae(sae, self.run_dir / "sae", train_config=to_dict(self.cfg))

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` and re-point ``latest.json`` at it (rank 0 only)."""
        if self.rank != 0 or self.run_dir is None:
            return None
        from safetensors.torch import save_file

        root = self.run_dir / "checkpoints"
        folder = root / f"step-{self.state.step:09d}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        weights = {n: getattr(self.sae, n).detach().contiguous().cpu() for n in PARAM_NAMES}
        tensors, meta = self._trainer_state()
        # a rotate_basis checkpoint holds the training basis; the seed lets a warm start fold it back
        basis = None if self.basis is None else {BASIS_SEED_KEY: str(self.cfg.seed)}
        for name, payload, info in (
            ("sae.safetensors", weights, basis),
            ("trainer.safetensors", tensors, None),
        ):
            with atomic_path(folder / name) as tmp:
                save_file(payload, str(tmp), metadata=info)
        write_json(folder / "trainer.json", meta)
        write_json(root / "latest.json", {"step": self.state.step, "path": folder.name})
        for old in root.glob("step-*"):  # keep the newest two
            if old.is_dir() and old.name < folder.name and old.name != _previous(root, folder.name):
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def _trainer_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {"since_fired": self.since_fired.cpu().clone()}
        for i, alias in enumerate(self._aliases):
            for key, value in self.opt.state.get(alias, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"adam.{i}.{key}"] = value.detach().cpu().contiguous().clone()
        tensors["rng.torch"] = torch.get_rng_state()
        py_version, py_state, py_gauss = random.getstate()
        meta: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "state": dataclasses.asdict(self.state),
            "initialized": self.initialized,
            "sae_config": dataclasses.asdict(self.sae.cfg),
            "train_config": to_dict(self.cfg),
            "world_size": self.plan.world_size,
            # bit-identical resume needs the same thread count (CPU reductions split by thread)
            "torch_threads": torch.get_num_threads(),
            "rng_python": [py_version, list(py_state), py_gauss],
        }
        try:
            import numpy as np

            _, keys, pos, has_gauss, cached = np.random.get_state()
            tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
            meta["rng_numpy"] = [int(pos), int(has_gauss), float(cached)]
        except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
            pass
        return tensors, meta

    def resume_latest(self) -> bool:
        """Load the latest checkpoint in ``run_dir`` (its settings checked against this trainer's);
        whether there was one. :meth:`fit` then continues from it."""
        folder = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        if folder is None:
            if self.rank == 0:
                log.info("no checkpoint in %s: starting fresh", self.run_dir)
            return False
        try:
            self.load_checkpoint(folder)
        except UnreadableCheckpoint as exc:  # e.g. a disk filled while it was written
            older = [p for p in _complete_checkpoints(folder.parent) if p.name < folder.name]
            if not older:
                raise
            log.warning(
                "checkpoint %s is unreadable (%s): resuming from the older %s",
                folder,
                exc.__cause__,
                older[-1],
            )
            self.load_checkpoint(older[-1])
        return True

    def _check_resume_settings(self, folder: Path, saved: Any) -> None:
        """Refuse to resume a checkpoint written with other result-changing settings (one error line)."""
        if not isinstance(saved, dict):
            return  # a checkpoint from before the settings were saved with it
        saved = {**RESUME_LEGACY, **as_json(saved)}
        now = as_json(to_dict(self.cfg))
        diff = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))
        if diff:
            changes = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
            raise RunMismatch(
                f"checkpoint {folder} was trained with other settings ({changes}): resume with the settings "
                "it started with, or train into a new --out"
            )

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore weights, Adam state, dead statistics, RNGs and the data position from ``folder``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = read_json(folder / "trainer.json")
            weights = load_file(str(folder / "sae.safetensors"))
            tensors = load_file(str(folder / "trainer.safetensors"))
        except (OSError, ValueError, SafetensorError) as exc:
            raise UnreadableCheckpoint(
                f"checkpoint {folder} is unreadable ({exc}): delete it to start fresh"
            ) from exc
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise SaeRewardError(
                f"checkpoint {folder} has format {meta.get('format')}; this saereward reads 1"
            )
        self._check_resume_settings(folder, meta.get("train_config"))
        saved_threads = meta.get("torch_threads")
        on_cpu = self.device.type == "cpu"
        if on_cpu and saved_threads is not None and saved_threads != torch.get_num_threads():
            log.warning(
                "checkpoint %s was written with %d torch threads, resuming with %d: the result will be "
                "close to, but not bit-identical with, an uninterrupted run (pass --threads %d for that)",
                folder,
                saved_threads,
                torch.get_num_threads(),
                saved_threads,
            )
        self.sae.cfg = SAEConfig(**meta["sae_config"])
        with torch.no_grad():
            for name, value in weights.items():
                getattr(self.sae, name).copy_(value)
        self.state = TrainState(**meta["state"])
        self.initialized = bool(meta["initialized"])
        self.since_fired.copy_(tensors["since_fired"])
        opt_state = self.opt.state_dict()
        opt_state["state"] = {}
        for i in range(len(self._aliases)):
            entry = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
            if entry:
                opt_state["state"][i] = entry
        self.opt.load_state_dict(opt_state)
        torch.set_rng_state(tensors["rng.torch"])
        version, state, gauss = meta["rng_python"]
        random.setstate((version, tuple(state), gauss))
        if "rng.numpy" in tensors and "rng_numpy" in meta:
            import numpy as np

            pos, has_gauss, cached = meta["rng_numpy"]
            keys = tensors["rng.numpy"].numpy().astype(np.uint32)
            np.random.set_state(("MT19937", keys, pos, has_gauss, cached))
        if self.rank == 0:
            log.info("resumed from %s (step %d)", folder, self.state.step)


#: training settings a resumed run may change: they decide what is logged and saved, not the weights
RESUME_FREE = frozenset({"checkpoint_every", "log_every", "eval_every", "progress", "report_to"})
#: values of settings added later, as checkpoints written before them were trained
RESUME_LEGACY: dict[str, Any] = {"init_dist": "normal", "rotate_basis": False}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``checkpoints/latest.json`` points at; where that file or its folder is gone, the
    newest complete ``step-*`` folder (``trainer.json`` is written last), with a warning; else ``None``."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest.json"
    if pointer.is_file():
        folder = root / str(read_json(pointer, expect=dict).get("path", ""))
        if folder.name.startswith("step-") and folder.is_dir():
            return folder
    complete = _complete_checkpoints(root)
    if not complete:
        return None
    log.warning("%s names no checkpoint that exists: resuming from %s", pointer, complete[-1].name)
    return complete[-1]


def _complete_checkpoints(root: Path) -> list[Path]:
    """The ``step-*`` folders under ``root`` written in full (``trainer.json`` comes last), oldest first."""
    return sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())


class UnreadableCheckpoint(SaeRewardError):
    """A checkpoint folder whose files cannot be read (truncated, corrupt)."""


def _previous(root: Path, current: str) -> str | None:
    names = sorted(p.name for p in root.glob("step-*") if p.is_dir() and p.name < current)
    return names[-1] if names else None


def _adam(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """Fused Adam where the build supports it on this device (one kernel for all tensors), else foreach."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older builds without CPU fused Adam
        return torch.optim.Adam(params, lr=lr, foreach=True)


def _load_warm_start(path: str) -> TopKSAE | Mapping[str, Tensor]:
    p = Path(path)
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise SaeRewardError(f"warm_start file {path} not found: check the path")
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(p), framework="pt") as f:
            seed = (f.metadata() or {}).get(BASIS_SEED_KEY)
        state = load_file(str(p))
        if seed is None:
            return state
        if not all(n in state for n in PARAM_NAMES):
            raise SaeRewardError(f"warm_start file {path} lacks SAE weights: use an SAE checkpoint")
        # a rotate_basis checkpoint: fold its training basis back into the model's
        return rotate_state(state, random_rotation(state["W_dec"].shape[1], int(seed)).t())

    return load_sae(path)


def _take(batches: Iterable[Tensor], n: int) -> Iterator[Tensor]:
    """At most ``n`` items of ``batches`` (consuming no more than that)."""
    if n <= 0:
        return
    for i, x in enumerate(batches):
        yield x
        if i + 1 >= n:
            return


# --------------------------------------------------------------------------------------------------
# Logging: JSONL + TensorBoard + progress bar
# --------------------------------------------------------------------------------------------------


class _Logger:
    """Writes metric rows to ``train_log.jsonl`` and TensorBoard, and drives the progress bar."""

    def __init__(self, trainer: SAETrainer, *, enabled: bool) -> None:
        self.t = trainer
        self.enabled = enabled
        self.last_time = time.perf_counter()
        self.last_tokens = trainer.state.tokens
        self.latest: dict[str, Tensor | float] = {}
        self.logged_step = -1
        self.bar: Any = None
        self.tb: Any = None
        self.jsonl: Any = None

    def __enter__(self) -> _Logger:
        if not self.enabled:
            return self
        t = self.t
        if t.run_dir is not None:
            t.run_dir.mkdir(parents=True, exist_ok=True)
            path = t.run_dir / "train_log.jsonl"
            if path.exists():  # drop rows a killed run wrote after its last checkpoint
                rows = [r for r in read_jsonl(path) if r.get("step", 0) <= t.state.step]
                with atomic_path(path) as tmp:
                    tmp.write_text("".join(json_text(r) + "\n" for r in rows), encoding="utf-8")
            self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
            self.tb = MetricSinks(
                t.run_dir,
                t.cfg.report_to,
                name=f"train-sae:{t.run_dir.name}",
                config=to_dict(t.cfg),
                resume_step=t.state.step,
            )
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=t.plan.total_steps,
            initial=t.state.step,
            disable=not t.cfg.progress,
            desc="sae",
            unit="step",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for h in (self.bar, self.tb, self.jsonl):
            if h is not None:
                h.close()

    def accumulate(self, metrics: dict[str, Tensor | float]) -> None:
        self.latest = metrics
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        """Log the last step if it was not logged already."""
        if self.latest and self.logged_step != self.t.state.step:
            self.write(self.latest)

    def write(self, metrics: dict[str, Tensor | float]) -> None:
        t = self.t
        self.logged_step = t.state.step
        values = {k: float(v) for k, v in metrics.items()}
        if t.plan.world_size > 1 and values:
            keys = sorted(values)
            buf = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=t.device)
            torch.distributed.all_reduce(buf)
            values = dict(zip(keys, (buf / t.plan.world_size).tolist()))
        if not self.enabled:
            return
        now = time.perf_counter()
        tok_s = (t.state.tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, t.state.tokens
        row = {
            "step": t.state.step,
            **values,
            "dead_pct": 100.0 * float(t.dead_mask().float().mean()),
            "tokens": t.state.tokens,
            "tok_s": tok_s,
        }
        self._emit(row)
        if self.bar is not None and values:
            self.bar.set_postfix(
                fvu=f"{row.get('fvu', float('nan')):.4f}",
                l0=f"{row.get('l0', 0):.1f}",
                dead=f"{row['dead_pct']:.1f}%",
            )

    def eval_row(self, results: Mapping[str, float], final: bool = False) -> None:
        if self.enabled and results:
            self._emit(
                {"step": self.t.state.step, **{f"eval/{k}": v for k, v in results.items()}, "final": final}
            )

    def _emit(self, row: dict[str, Any]) -> None:
        row = finite(row)
        if self.jsonl is not None:
            self.jsonl.write(json_text(row) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            self.tb.log(row, row["step"])
