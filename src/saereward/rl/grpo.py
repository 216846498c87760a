"""A lean GRPO trainer with per-token SAE rewards that cost no extra forward pass.

One step (``GRPOTrainer.step``):

1. **Rollouts.** ``questions_per_step`` training questions (a seeded draw per step), each repeated
   ``group_size`` times, are sampled with the LoRA policy (temperature, top-p). With
   ``reward_source = policy`` the residual at the pack's layer is captured by hooks *during*
   generation.
2. **Reference forward** under ``disable_adapter()`` (the frozen base model), which GRPO needs anyway
   for the KL term: it yields the reference log-probs and, with ``reward_source = reference``, the
   residuals for the reward (the RLFR-style variant the policy cannot steer by moving its own
   activations). No other forward pass is made for the reward.
3. **Rewards.** outcome = the task verifier; ``mech(t)`` from :class:`~saereward.features.scoring.
   PackScorer` (R1, the exact G1 statistic: true TopK, eager fp32) or the raw direction (R2);
   advantages by :func:`saereward.rl.reward.token_advantages` in the configured ``reward_form``
   (default ``position``: the group-normalised outcome advantage plus a fixed-scale, clipped,
   position-centred per-token credit; ``mechreward`` keeps mechreward's length-biased form). The
   fixed-scale forms read a :class:`~saereward.rl.reward.RewardBaseline` (the base model's score
   by response position in the RL prompt format) and leave end and stop-string tokens unscored.
4. **Update.** ``epochs_per_batch`` passes of the clipped surrogate over the batch. Each pass
   accumulates gradients over micro-batches of ``micro_batch`` completions, sorted by length and cut
   to their own longest sequence (:func:`micro_batches`; the reference forward uses them too).
   Each distinct prompt runs once per forward pass, its KV cache shared by its group's completions
   (:class:`PromptPrefix`; the rollouts' prefill does the same);
   activation checkpointing, if asked for, is on only for this training forward. Loss per response
   token, averaged over all response tokens of the batch (mechreward's ``/ N``):
   ``−min(ρ·adv, clip(ρ, 1±ε)·adv) + β·KL``, KL mechreward's squared log-ratio (``kl = sq``) or the
   k3 estimator. ``ρ = exp(logπ − logπ_old)`` is 1 on the first pass (so the first pass is the
   mechreward's ``−logπ·adv``).
5. **Log** (JSONL + TensorBoard): outcome, mech, KL, the grad norm returned by ``clip_grad_norm_``,
   entropy, clip fraction, completion length, seconds in generate / verify / reference / reward /
   train. Under data parallelism these are over the whole batch (sums all-reduced), not one rank's.

**Collapse guard.** Every step logs the mean completion length, the share of completions with at
most 3 tokens (``short_frac``), the within-group correlation of length with the mech part of the
advantage (``len_mech_corr``: positive when the reward pays for length, negative when it pays for
stopping) and an online monitor, Spearman ρ of the per-completion score with the outcome over the
last ``collapse_window`` steps (``monitor_rho``). :func:`collapse_check` marks a run collapsed when,
over ``collapse_window`` steps, half the completions have at most 3 tokens, or the mean length has
fallen below half the first steps'; by default a run with a mech reward is evaluated, checkpointed
and stopped there (an R0 run, which has no score to hack, is only marked), and ``summary.json``
records it. A warning is logged (and kept in the summary) when RL trains on
another prompt format or task than the score was discovered on.

Every random draw is seeded from ``(seed, step)``, so a run resumed from a checkpoint replays
exactly what an uninterrupted run does (tested with a real kill on CPU); the checkpoint's step is
the RNG state. Checkpoints are safetensors (LoRA weights, optimizer moments) + JSON (step, config),
written to a temp folder and renamed into place (a kill between the renames resumes from
``checkpoint.old``).

**Processes and devices.** ``device`` (default ``cpu``) is where the model runs; ``cuda`` puts it on the
GPU of the process's ``LOCAL_RANK``. ``accelerate launch --multi_gpu --num_processes N`` (accelerate's
torchrun launcher; its ``--cpu`` launcher needs MPI for N > 1) or ``torchrun --nproc_per_node N``
runs N data-parallel processes (gloo on the CPU, NCCL on CUDA): each samples
``questions_per_step / N`` questions, and the summed gradients give the single-process step. The
bit-identical resume is tested on the CPU; on CUDA some kernels (e.g. attention's backward) are not
deterministic. TRL users: the subclass in :mod:`saereward.rl.trl`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from saereward import __version__
from saereward.config import option, to_dict
from saereward.data.rollouts import load_rollouts
from saereward.errors import SaeRewardError
from saereward.features.baseline import (
    BASELINE_FILE,
    RewardBaseline,
    baseline_beside,
    load_baseline,
    measure_baseline,
    save_baseline,
)
from saereward.features.layers import contrastive_direction
from saereward.features.pack import load_pack
from saereward.features.probe import load_probe
from saereward.features.scoring import PackScorer, masked_mean
from saereward.io import read_jsonl, write_json, write_jsonl
from saereward.lock import folder_lock
from saereward.model import bf16cpu
from saereward.model.capture import ResidualCapture, position_ids_from_mask
from saereward.model.generate import (
    SamplingConfig,
    distinct_prefix_cache,
    end_positions,
    gatherable_cache,
    generate_batch,
    iter_generate,
    stop_strings_for,
)
from saereward.model.lm import (
    DEFAULT_MODEL,
    DType,
    LoadedModel,
    check_device,
    load_model,
    require_device,
    resolve_layer,
)
from saereward.rl.reward import (
    REWARD_FORMS,
    Aggregation,
    DirectionScorer,
    LambdaSchedule,
    RewardForm,
    RewardKind,
    all_gather_floats,
    all_reduce_sum,
    check_pack_scorer,
    dual_gate,
    require_baseline,
    token_advantages,
    within_group_corr,
)
from saereward.sae.formats import load_sae
from saereward.stats import wilson_ci
from saereward.tasks import format_prompt, load_task
from saereward.tasks.prompts import PromptFormat

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GRPOConfig:
    """Settings of ``saereward train-rl``."""

    model: str = option(DEFAULT_MODEL, "model: embedded:<key>, a .gguf file, an HF folder or a hub id")
    dtype: DType = option("fp32", "model dtype (bf16 halves memory; the LoRA weights stay fp32)")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    device: str = option("cpu", "where the policy runs: cpu, cuda (the GPU of LOCAL_RANK) or cuda:N")
    task: str = option("chain_sum", "task (see `saereward tasks`)")
    task_source: str = option("auto", "where the task data comes from: auto, offline, hf, jsonl")
    task_path: str | None = option(None, "local JSONL file for the task")
    task_params: dict[str, Any] = option({}, "extra task settings, e.g. reasoning-gym config (TOML table)")
    n_train: int = option(2000, "training questions")
    train_seed: int = option(
        0, "task seed of the training questions (fixed across --seed, so runs share data)"
    )
    n_eval: int = option(100, "held-out questions for evaluation (a different task seed)")
    eval_seed: int = option(12_345, "task seed of the held-out questions (disjoint ids from training)")
    prompt_format: PromptFormat = option("raw", "prompt format: raw (mechreward's Q:/A: CoT), fewshot, chat")
    shots: int = option(2, "few-shot demos for prompt_format=fewshot")
    # -- reward --
    reward: RewardKind = option("outcome", "outcome (R0), sae (R1: pack score), direction (R2)")
    pack: str | None = option(None, "feature pack for reward=sae")
    sae: str | None = option(None, "SAE for reward=sae (default: the pack's recorded sae_path)")
    direction_rollouts: str | None = option(
        None, "rollout folder whose discovery split defines the raw direction (reward=direction)"
    )
    layer: int | None = option(None, "reward layer (default: the pack's; for direction: required)")
    reward_source: Literal["policy", "reference"] = option(
        "policy", "hidden states for the reward: captured during generation (policy) or the reference forward"
    )
    dual_verifier: str | None = option(
        None, "probe file (`saereward probe`) that gates the mech term per token by sign agreement"
    )
    lam: float = option(0.1, "λ: weight of the mech term")
    lam_schedule: Literal["constant", "linear"] = option("constant", "λ schedule")
    lam_end: float = option(0.0, "λ at the last step (linear schedule)")
    reward_form: RewardForm = option(
        "position",
        "how the mech score enters the advantage: " + "; ".join(f"{k}: {v}" for k, v in REWARD_FORMS.items()),
    )
    reward_clip: float = option(
        3.0, "fixed-scale forms: clip the standardized score at ± this many reference SDs"
    )
    reward_baseline: str | None = option(
        None,
        "fixed-scale forms: a reward_baseline.json, or a rollout folder (base model, RL prompt format) to "
        "measure it on (default: the pack's discovery rollouts for R1, direction_rollouts for R2)",
    )
    aggregation: Aggregation = option(
        "both",
        "reward_form=mechreward only: both (its G3 form), trajectory (mean in r only), token (z-term only)",
    )
    # -- collapse guard --
    collapse_stop: bool = option(True, "stop a run the collapse rule marks as collapsed (see the module doc)")
    collapse_window: int = option(3, "collapse rule: steps averaged (and monitor ρ window, in steps)")
    collapse_short_frac: float = option(
        0.5, "collapse rule: mean share of completions with <= 3 tokens over the window at or above this"
    )
    collapse_len_ratio: float = option(
        0.5, "collapse rule: or mean completion length over the window below this × the first window's"
    )
    # -- rollouts --
    questions_per_step: int = option(4, "questions per step")
    group_size: int = option(4, "completions per question (G)")
    temperature: float = option(0.9, "sampling temperature")
    top_p: float = option(0.95, "nucleus top-p")
    max_new_tokens: int = option(96, "max completion tokens")
    sampler: Literal["hf", "topk"] = option(
        "topk",
        "rollout sampler: topk = temperature/top-p drawn from a partial sort (same distribution, "
        "faster on large vocabularies), hf = transformers' warpers",
    )
    stop_strings: bool = option(
        True, "stop a completion at the prompt format's stop strings (raw/fewshot: \\nQ:)"
    )
    # -- optimisation --
    steps: int = option(60, "optimizer steps")
    lr: float = option(2e-5, "AdamW learning rate (LoRA parameters)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta: float = option(0.05, "KL coefficient β (0: no reference forward unless reward_source=reference)")
    kl: Literal["sq", "k3"] = option(
        "sq", "KL estimator: sq = (logπ − logπ_ref)² (seed), k3 = exp(d) − d − 1"
    )
    epochs_per_batch: int = option(1, "optimisation passes per batch (> 1 uses the clipped ratio)")
    clip_eps: float = option(0.2, "PPO ratio clip ε")
    grad_clip: float = option(1.0, "max grad norm")
    grad_checkpointing: bool = option(
        False,
        "gradient checkpointing for the training forward (recomputes it in the backward: ~1/3 more "
        "update time; with micro-batches the stored activations are small anyway)",
    )
    micro_batch: int = option(
        4,
        "completions per reference / training forward (gradients accumulate across them; each is "
        "sorted by length and cut to its own longest sequence; 0: the whole batch at once)",
    )
    share_prompt: bool = option(
        True,
        "run each question's prompt once and reuse its KV cache for the group's completions, in "
        "the rollouts' prefill and in the reference and training forwards (not with gradient "
        "checkpointing or reference-source residuals); same values up to float rounding",
    )
    mmap_large_allocations: bool = option(
        True,
        "glibc: allocate big tensors with mmap so freed memory returns to the OS (lower peak RSS)",
    )
    lora_autocast: bool = option(
        True,
        "bf16 base: run the LoRA matmuls of the training forward in bf16 under autocast (weights and "
        "optimizer stay fp32); off: PEFT casts every adapted input to fp32",
    )
    skinny_decode: bool = option(
        True,
        "rollouts: few-row linear layers as W @ x^T (faster decoding on CPU; same products, "
        "other rounding order)",
    )
    fast_decode: bool = option(
        True,
        "rollouts: saereward's own decode loop after the HF prefill (preallocated KV cache; ended "
        "rows leave the batch) for Llama/Qwen2 models with merged LoRA; others use generate()",
    )
    lean_lora: bool = option(
        True,
        "LoRA projections as base(x) + addmm((x A^T)·s, B^T): the scale multiplies the rank-r "
        "activations and the sum happens inside the matrix product (PEFT: two passes over the output)",
    )
    merge_for_generation: bool = option(
        True, "sample with the LoRA weights merged into the base (exact base weights restored after)"
    )
    lora_r: int = option(32, "LoRA rank")
    lora_alpha: int = option(64, "LoRA α")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_targets: tuple[str, ...] = option(LORA_TARGETS, "LoRA target modules")
    # -- bookkeeping --
    seed: int = option(0, "seed for questions, sampling, LoRA init")
    eval_every: int = option(
        20, "evaluate on the held-out questions every N steps (0: only at start and end)"
    )
    eval_batch_size: int = option(32, "batch size of the greedy evaluation")
    checkpoint_every: int = option(10, "checkpoint every N steps")
    snapshot_every: int = option(
        0, "also keep the LoRA adapter of every N-th step in out/snapshots/step_NNNNN (for drift; 0: none)"
    )
    out: str = option("runs/rl", "run folder")
    resume: bool = option(True, "continue from the latest checkpoint in out")
    progress: bool = option(True, "progress bar")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.group_size < 2:
            raise ValueError(
                f"group_size {self.group_size} < 2: GRPO compares completions within a group; use >= 2"
            )
        for name in (
            "questions_per_step",
            "steps",
            "max_new_tokens",
            "epochs_per_batch",
            "n_train",
            "n_eval",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reward == "sae" and not self.pack:
            raise ValueError("reward=sae needs --pack")
        if self.reward == "direction" and not self.direction_rollouts:
            raise ValueError("reward=direction needs --direction-rollouts")
        if self.dual_verifier and self.reward == "outcome":
            raise ValueError("dual_verifier gates the mech term: use it with reward=sae or direction")
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0: whole batch), got {self.micro_batch}")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {self.snapshot_every}")
        if self.lr <= 0 or self.beta < 0 or self.lam < 0:
            raise ValueError("lr must be > 0, beta and lam >= 0")
        if self.reward_form not in REWARD_FORMS:
            raise ValueError(
                f"unknown reward_form {self.reward_form!r}: choose from {', '.join(REWARD_FORMS)}"
            )
        if self.reward_clip <= 0 or self.collapse_window < 1:
            raise ValueError("reward_clip must be > 0 and collapse_window >= 1")
        if not (0 < self.collapse_short_frac <= 1 and 0 <= self.collapse_len_ratio < 1):
            raise ValueError("collapse_short_frac must be in (0, 1] and collapse_len_ratio in [0, 1)")


# --------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``log softmax(x / T)[id]`` (and, if asked, the entropy) of one chunk, with a hand-written backward.

    The forward makes two ``[.., V]`` fp32 temporaries (the shifted logits and their exponentials)
    and keeps neither: it saves the chunk's logits (alive anyway) and the log-normaliser ``[..]``;
    the backward rebuilds ``softmax = exp(x / T − lse)`` once and returns
    ``(onehot − softmax) · g / T``. Autograd through ``gather − logsumexp`` under activation
    checkpointing would compute the division, the log-sum-exp and the softmax again.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, ids: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Tensor]:
        z = logits.float() / temperature  # a copy: the logits stay as they are for the backward
        top = z.amax(-1, keepdim=True)
        z.sub_(top)  # shifted in place: exp cannot overflow, and one [.., V] pass fewer than logsumexp
        e = torch.exp(z)
        sum_e = e.sum(-1)
        log_sum = sum_e.log()
        lp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - log_sum
        # entropy = log Σe − Σ e·z / Σe (the shift cancels), on e in place
        ent = log_sum - e.mul_(z).sum(-1) / sum_e if entropy else torch.zeros_like(lp)
        ctx.save_for_backward(logits, ids, top.squeeze(-1) + log_sum)  # the log-normaliser of x / T
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g: Tensor, _g_ent: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        logits, ids, lse = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.exp(logits.float() / t - lse.unsqueeze(-1))
        grad.mul_(-g.unsqueeze(-1))
        grad.scatter_add_(-1, ids.unsqueeze(-1), g.unsqueeze(-1))
        if t != 1.0:
            grad.div_(t)
        return grad.to(logits.dtype), None, None, None


def selective_log_softmax(
    logits: Tensor, ids: Tensor, chunk: int = 2, temperature: float = 1.0, entropy: bool = True
) -> tuple[Tensor, Tensor]:
    """``log p(ids)`` and the entropy per position of ``logits / temperature``; ``[B, T, V]`` -> ``[B, T]`` each.

    Row-chunked: the fp32 log-softmax of a large vocabulary never exists for more than ``chunk``
    rows, forward or backward (:class:`_SelectiveLogSoftmax`; with 2 rows × 64 positions × 49k
    vocabulary a chunk's fp32 temporaries are ~25 MB each; 8 rows put ~0.7 GB on the GRPO step's
    peak RSS). Chunks come from ``split`` (its backward concatenates the chunk gradients once;
    slicing would allocate a zero-filled copy of the whole ``[B, T, V]`` gradient per chunk).
    ``entropy=False`` skips the entropy (zeros are returned), e.g. for reference log-probs.
    """
    logps, ents = [], []
    for lg, idx in zip(logits.split(chunk), ids.split(chunk), strict=True):
        lp, ent = _SelectiveLogSoftmax.apply(lg, idx, temperature, entropy)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents)


def kl_term(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL penalty: mechreward's ``(logπ − logπ_ref)²`` or k3 ``exp(r) − r − 1`` with ``r = ref − logπ``."""
    if kind == "sq":
        return (logp - ref_logp) ** 2
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def surrogate_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    beta: float,
    kl: str,
    clip_eps: float,
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss + β·KL, averaged over masked tokens; ``[B, N]`` inputs.

    ``n_tokens`` overrides the divisor (data-parallel ranks divide by the global token count, so the
    summed gradients equal a single process's).
    """
    m = mask.float()
    n = (m.sum() if n_tokens is None else n_tokens).clamp_min(1)
    ratio = torch.exp(logp - old_logp)
    un = ratio * adv
    cl = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    pg = -torch.minimum(un, cl)
    loss_tok = pg
    stats: dict[str, float] = {}
    if ref_logp is not None and beta > 0:
        k = kl_term(logp, ref_logp, kl)
        loss_tok = loss_tok + beta * k
        stats["kl"] = float((k.detach() * m).sum() / n)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    stats["clip_frac"] = float((clipped.float() * m).sum() / n)
    return (loss_tok * m).sum() / n, stats


def mmap_large_allocations(threshold: int = 4 << 20, trim: int = 64 << 20) -> bool:
    """Ask glibc to serve allocations >= ``threshold`` bytes with ``mmap`` (process-wide).

    glibc raises its mmap threshold dynamically after big frees, after which large tensors come from
    the heap; a step's differently sized logits and activations then fragment it, and peak RSS grows
    from step to step although the live memory does not. With a fixed threshold every large tensor
    is its own mapping, returned to the OS on free. 4 MiB keeps the many small per-token tensors of
    decoding (KV-cache growth) on the heap: on the GRPO benchmark 256 KiB and 1 MiB cost 40-50 % more
    step time for ~0.45 GB less peak RSS; 4 MiB costs ~1 % and saves ~0.65 GB; 16 MiB saves little.
    A fixed mmap threshold also freezes glibc's trim threshold at 128 KiB, so the heap gave back its
    free top after every mid-sized free and page-faulted it in again: ~12k-18k minor faults per
    reference forward or rollout batch of the GRPO benchmark. ``trim`` (64 MiB) keeps that much free
    heap mapped; the faults dropped to ~0 there, peak RSS unchanged (2.00 vs 1.99 GB).
    Returns False where this is not glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # -3 = M_MMAP_THRESHOLD, -1 = M_TRIM_THRESHOLD
        return bool(libc.mallopt(-3, int(threshold))) and bool(libc.mallopt(-1, int(trim)))
    except (OSError, AttributeError):
        return False


@contextmanager
def merged_lora(model: Any, enabled: bool = True) -> Iterator[None]:
    """Merge every LoRA adapter into its base weight for the block; restore the exact base weights after.

    Unmerged adapters add two small matmuls per adapted projection per decoded token, which on a CPU
    cost more than their FLOPs. PEFT's own ``unmerge`` subtracts the delta again, which in bf16 does
    not give the original weights back; we copy them instead. Sampling then uses ``W + BA`` rounded
    to the base dtype (identical in fp32 up to summation order).
    """
    if not enabled:
        yield
        return
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [(m, m.get_base_layer().weight.detach().clone()) for m in layers]  # type: ignore[operator]
    with torch.no_grad():
        model.merge_adapter()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, w in saved:
                m.get_base_layer().weight.copy_(w)  # type: ignore[operator]
                m.merged_adapters.clear()


@contextmanager
def skinny_linear(model: Any, max_rows: int = 64) -> Iterator[None]:
    """During the block, a no-grad ``nn.Linear`` call on at most ``max_rows`` rows computes ``W @ xᵀ``.

    Decoding feeds each projection 16 rows (one token per sequence). For ``x @ Wᵀ`` with so few rows
    the CPU GEMM packs the whole weight on every call; ``W @ xᵀ`` (the weight as the left, large
    operand) does not. On the 2-core AVX2 machine the 210 projections of a SmolLM2 decode step took
    80 ms as ``F.linear`` and 60 ms as ``(W @ xᵀ)ᵀ``, its 49k-row LM head 38 → 23 ms (fp32, cold
    caches; ``benchmarks/grpo_phases.py`` has the step-level effect). Same products, other summation
    order: logits agree to rounding, not bit for bit, so this is used for GRPO rollouts only, never
    for evaluation. fp32 only: in bf16 on the same machine ``W @ xᵀ`` was no faster for the
    projections and slower for the head (84 vs 59 ms). Larger inputs, other dtypes and anything
    under autograd or off the CPU take ``F.linear``.
    """
    from torch import nn
    from torch.nn import functional as F

    patched = []
    for m in model.modules():
        if type(m) is nn.Linear and "forward" not in m.__dict__:

            def forward(x: Tensor, _m: nn.Linear = m) -> Tensor:
                w = _m.weight
                if (
                    torch.is_grad_enabled()
                    or x.device.type != "cpu"
                    or x.numel() > max_rows * w.shape[1]
                    or not (x.dtype == w.dtype == torch.float32)
                ):
                    return F.linear(x, w, _m.bias)
                x2 = x.reshape(-1, w.shape[1]).t()
                y = torch.mm(w, x2) if _m.bias is None else torch.addmm(_m.bias.unsqueeze(1), w, x2)
                return y.t().view(*x.shape[:-1], w.shape[0])  # a transposed view: no copy

            m.forward = forward  # type: ignore[method-assign,assignment]
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def install_lean_lora(model: Any) -> int:
    """Give every PEFT LoRA ``Linear`` of ``model`` a leaner forward; returns how many were patched.

    PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: a multiply and an add over the
    whole ``[tokens, out]`` output per adapted projection, in the forward and again in the backward
    (210 projections on SmolLM2). Here the scale multiplies the ``[tokens, r]`` activations and the
    add is the ``beta = 1`` of one ``addmm``: the same function (rounding aside). Any case this does
    not cover (adapters disabled or merged, several adapters, dropout, LoRA variants such as DoRA,
    extra arguments, mixed dtypes outside autocast) falls back to PEFT's own forward.
    """
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for m in model.modules():
        if not isinstance(m, LoraLinear) or getattr(m, "_saereward_lean", False):
            continue
        m.forward = _lean_lora_forward(m, m.forward)  # type: ignore[method-assign]
        m._saereward_lean = True  # type: ignore[assignment]
        n += 1
    return n


def _lean_lora_forward(m: Any, peft_forward: Any) -> Any:
    from torch import nn
    from torch.nn import functional as F

    wide = bf16cpu.installed(m.base_layer)  # bf16 products through fp32 GEMM (CPU without bf16 units)

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs or m.disable_adapters or m.merged or len(m.active_adapters) != 1:
            return peft_forward(x, *args, **kwargs)
        name = m.active_adapters[0]
        if (
            name not in m.lora_A
            or name in getattr(m, "lora_variant", {})
            or not isinstance(m.lora_dropout[name], nn.Identity)
        ):
            return peft_forward(x, *args, **kwargs)
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        result = m.base_layer(x)
        xin = m._cast_input_dtype(x, a.dtype)
        if not torch.is_autocast_enabled(x.device.type) and not (result.dtype == xin.dtype == b.dtype):
            return peft_forward(x, *args, **kwargs)
        if wide and result.dtype == torch.bfloat16:
            return result + bf16cpu.linear(bf16cpu.linear(xin, a) * m.scaling[name], b)
        h = F.linear(xin, a) * m.scaling[name]
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
        return out.view(result.shape).to(result.dtype)

    return forward


# --------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON; no pickle)
# --------------------------------------------------------------------------------------------------


def collapse_check(
    rows: Sequence[dict[str, Any]], window: int, short_frac: float, len_ratio: float
) -> dict[str, Any]:
    """The collapse rule over a run's training rows (``completion_len``, ``short_frac`` per step).

    A run is **collapsed** at the first step ``s`` where, over the last ``window`` steps,
    (a) the mean share of completions with at most :data:`SHORT_TOKENS` tokens is ``>= short_frac``
    (from step ``window`` on), or (b) the mean completion length is below ``len_ratio`` times the
    mean length of the first ``window`` steps (from step ``2 · window`` on). This is the failure
    mechreward's form produces: completions shrink to a few tokens.
    """
    train = [r for r in rows if r.get("step", 0) >= 1 and "completion_len" in r]
    for i in range(window - 1, len(train)):
        last = train[i - window + 1 : i + 1]
        short = sum(float(r.get("short_frac", 0.0)) for r in last) / window
        if short >= short_frac:
            return {
                "collapsed": True,
                "step": int(train[i]["step"]),
                "reason": f"{short:.0%} of completions had <= {SHORT_TOKENS} tokens over steps "
                f"{last[0]['step']}-{last[-1]['step']} (rule: >= {short_frac:.0%})",
            }
        if i + 1 >= 2 * window:
            first = sum(float(r["completion_len"]) for r in train[:window]) / window
            now = sum(float(r["completion_len"]) for r in last) / window
            if now < len_ratio * first:
                return {
                    "collapsed": True,
                    "step": int(train[i]["step"]),
                    "reason": f"mean completion length {now:.1f} tokens over steps {last[0]['step']}-"
                    f"{last[-1]['step']}, below {len_ratio} × the first steps' {first:.1f}",
                }
    return {"collapsed": False, "step": None, "reason": None}


def monitor_rho(rows: Sequence[dict[str, Any]], window: int) -> float:
    """The online monitor: Spearman ρ of the per-completion score with the outcome, pooled over the
    last ``window`` training rows (``completion_scores``/``completion_outcomes``); NaN when either is flat."""
    from scipy.stats import spearmanr

    train = [r for r in rows if "completion_scores" in r][-window:]
    xs = [v for r in train for v in r["completion_scores"]]
    ys = [v for r in train for v in r["completion_outcomes"]]
    if len(set(ys)) < 2 or len(set(xs)) < 2:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


def settings_diff(saved: dict[str, Any], cfg: GRPOConfig) -> list[str]:
    """Settings of ``cfg`` that differ from a run's saved ``config.json``, leaving out those that do not
    change what a step computes (``steps`` too: a longer run resumes a shorter one's checkpoint)."""
    mine = to_dict(cfg)  # JSON-plain, as the saved file
    # options added since the run: what such a run did, else today's default
    default = {**to_dict(GRPOConfig()), **_LEGACY}
    skip: tuple[str, ...] = (
        "out",
        "resume",
        "progress",
        "steps",
        "threads",
        "device",
        "snapshot_every",
        "checkpoint_every",
    )
    if cfg.reward == "outcome":  # R0 reads no score: how a score would enter changes nothing
        skip += ("reward_form", "reward_clip", "reward_baseline", "aggregation", "pack", "sae", "lam")
    return [k for k in mine if k not in skip and saved.get(k, default.get(k)) != mine[k]]


#: runs saved before an option existed behaved like this (the reward form was mechreward's)
_LEGACY: dict[str, Any] = {"reward_form": "mechreward"}
SHORT_TOKENS = 3  # the collapse guard counts completions of at most this many tokens
_STEP_SEED = 104_729  # torch is seeded with seed * _STEP_SEED + step before each step


def _save_checkpoint(
    folder: Path, step: int, lora: dict[str, Tensor], opt: torch.optim.Optimizer, cfg: GRPOConfig
) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, str(tmp / "adapter.safetensors"))
    state = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in state["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = val
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    write_json(
        tmp / "state.json",
        {
            "step": step,
            "param_groups": state["param_groups"],
            "scalars": scalars,
            # no generator state to store: fit() reseeds torch before every step from (seed, step)
            "rng": f"torch.manual_seed({cfg.seed} * {_STEP_SEED} + step) before each step",
            "saereward_version": __version__,
        },
    )
    write_json(tmp / "config.json", to_dict(cfg))
    if folder.exists():  # a kill between the two renames leaves the previous checkpoint in .old
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def _save_snapshot(folder: Path, lora: dict[str, Tensor], cfg: GRPOConfig) -> None:
    """The adapter alone (no optimizer state), written to a temp folder and renamed into place."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, str(tmp / "adapter.safetensors"))
    write_json(tmp / "config.json", to_dict(cfg))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def snapshots(run: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every adapter snapshot a train-rl run kept, in step order."""
    root = Path(run) / "snapshots"
    found = []
    for d in root.glob("step_*") if root.is_dir() else ():
        if d.name[5:].isdigit() and (d / "adapter.safetensors").is_file():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def _load_optimizer(folder: Path, opt: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file

    st = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    for name, v in st["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": st["param_groups"]})
    return int(st["step"])


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """One micro-batch: batch rows ``rows`` and the columns ``start:end`` that hold their tokens."""

    rows: Tensor
    start: int
    end: int


def micro_batches(attention_mask: Tensor, prompt_len: int, size: int) -> list[_Slice]:
    """Split a left-padded ``[B, T]`` batch into micro-batches of at most ``size`` rows (0: one).

    Rows are sorted by the column after their last real token (then by their first), so that rows of
    similar length share a micro-batch, and each micro-batch keeps only the columns from its rows'
    first real token to its longest row's last (at least one response column). On a GRPO batch with
    ≤ 64 new tokens and completions of 40-60 tokens this drops 15-25 % of the positions a padded
    forward computes. The split depends on the mask alone (deterministic, so resume replays it).
    """
    B, T = attention_mask.shape
    real = attention_mask.bool()
    cols = torch.arange(T, device=attention_mask.device)
    first = torch.where(real, cols, T).amin(1)
    end = (torch.where(real, cols, -1).amax(1) + 1).clamp_min(prompt_len + 1)
    if size <= 0 or size >= B:
        groups = [torch.arange(B, device=attention_mask.device)]
    else:
        order = torch.argsort(end * (T + 1) + first, stable=True)
        groups = [g.sort().values for g in order.split(size)]
    return [_Slice(g, int(first[g].min().clamp_max(prompt_len - 1)), int(end[g].max())) for g in groups]


_NO_SHARED_PROMPT = "_saereward_no_shared_prompt"


class PromptPrefix:
    """The KV cache of a batch's distinct prompts (each but its last column), computed once.

    GRPO repeats every prompt ``group_size`` times. The reference and training forwards run each
    distinct prompt once here; every micro-batch then runs only its rows' last prompt token and
    responses on top of the cache rows gathered for it (:meth:`for_rows`). Positions come from the
    full mask, as in the one-pass forward, so the values equal it up to float rounding. With
    ``grad``, the gathered cache reads detached leaf copies: each micro-batch's backward stops there
    and sums its gradient into them, and :meth:`backward` sends the total through the prompt forward
    once. A batch of ``U`` prompts × ``G`` completions costs ``U·P + U·G·N`` positions instead of
    ``U·G·(P + N)`` (the raw chain_sum prompt is ~30 tokens, a completion ~45).
    """

    def __init__(self, model: Any, b: _Batch, *, grad: bool) -> None:
        P = b.prompt_len
        self.pos = position_ids_from_mask(b.attention_mask)
        self.cache, self.index = distinct_prefix_cache(  # index: batch row -> row of the prefix cache
            model, b.sequences[:, : P - 1], b.attention_mask[:, : P - 1], self.pos[:, : P - 1]
        )
        layers = getattr(self.cache, "layers", None) or []
        self.live = [t for layer in layers for t in (layer.keys, layer.values)]
        self.leaves = [t.detach().requires_grad_() for t in self.live] if grad else self.live

    @staticmethod
    def wanted(model: Any, b: _Batch) -> bool:
        """Whether the batch repeats a prompt (and the prompt has a column to cache)."""
        if b.prompt_len < 2 or getattr(model, _NO_SHARED_PROMPT, False):
            return False
        key = torch.cat([b.sequences[:, : b.prompt_len - 1], b.attention_mask[:, : b.prompt_len - 1]], 1)
        return len(torch.unique(key, dim=0)) < len(key)

    @classmethod
    def build(cls, model: Any, b: _Batch, *, grad: bool) -> PromptPrefix | None:
        """The prefix, or ``None`` (and a note on the model) when its cache rows cannot be gathered."""
        prefix = cls(model, b, grad=grad)
        if gatherable_cache(prefix.cache):
            return prefix
        setattr(model, _NO_SHARED_PROMPT, True)
        log.info("share_prompt: this model's cache rows cannot be gathered; one-pass forwards instead")
        return None

    def for_rows(self, rows: Tensor) -> Any:
        """A cache for the batch rows ``rows``: their prompts' keys and values, gathered."""
        idx = self.index[rows]
        cache = copy.copy(self.cache)
        cache.layers = []
        for i, layer in enumerate(self.cache.layers):
            new = copy.copy(layer)  # DynamicLayer.update rebinds keys/values: the original stays intact
            new.keys, new.values = self.leaves[2 * i][idx], self.leaves[2 * i + 1][idx]
            cache.layers.append(new)
        return cache

    def backward(self) -> None:
        """Backpropagate the gradient the micro-batches left on the cache through the prompt forward."""
        pairs = [
            (t, leaf.grad) for t, leaf in zip(self.live, self.leaves, strict=True) if leaf.grad is not None
        ]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


@dataclass
class _Batch:
    sequences: Tensor  #: [B, T]
    attention_mask: Tensor  #: [B, T]
    response_mask: Tensor  #: [B, T] tokens the loss covers (generated, up to the end token)
    residual_mask: Tensor  #: [B, T] positions whose residual feeds the reward (as in G1)
    prompt_len: int
    completions: list[str]
    qids: list[str]
    residuals: Tensor | None  #: [B, T, d] at the reward layer (policy source)


class GRPOTrainer:
    """The loop; see the module docstring. ``lm`` may be passed in (tests); otherwise it is loaded."""

    def __init__(self, cfg: GRPOConfig, lm: LoadedModel | None = None, *, check_only: bool = False) -> None:
        import torch.distributed as dist
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        self.out = Path(cfg.out)
        device = _local_device(cfg.device)
        if cfg.mmap_large_allocations and device == "cpu" and not mmap_large_allocations():
            log.info("mmap_large_allocations: not glibc, left as is")
        dist_on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if dist_on else 0
        self.world = dist.get_world_size() if dist_on else 1
        if cfg.questions_per_step % self.world:
            raise SaeRewardError(
                f"questions_per_step {cfg.questions_per_step} does not split over {self.world} processes: "
                "use a multiple of the process count"
            )
        kw = {"source": cfg.task_source, "path": cfg.task_path, **cfg.task_params}
        self.task = load_task(cfg.task, n=cfg.n_train, seed=cfg.train_seed, **kw)
        self.train_items = list(self.task.items())
        self._check_verifier_fires()
        train_q = {it.question for it in self.train_items}
        # held-out questions: a different task seed, minus any question text that training also has
        # (small generators repeat questions); draw extra so that n_eval remain where possible
        self.eval_task = load_task(cfg.task, n=cfg.n_eval * 4, seed=cfg.eval_seed, **kw)
        self.eval_items = [it for it in self.eval_task.items() if it.question not in train_q][: cfg.n_eval]
        if not self.eval_items:
            raise SaeRewardError(
                "every held-out question also appears in training: change eval_seed or lower n_train"
            )
        if len(self.eval_items) < cfg.n_eval:
            log.warning("only %d held-out questions are disjoint from training", len(self.eval_items))
        self.lm = lm or load_model(cfg.model, dtype=cfg.dtype, threads=cfg.threads, device=device)
        self.device = next(self.lm.model.parameters()).device  # a model passed in decides
        tok = self.lm.tokenizer
        self.prompt = {
            it.id: format_prompt(self.task, it, cfg.prompt_format, tokenizer=tok, shots=cfg.shots)
            for it in self.train_items
        }
        self.eval_prompts = [
            format_prompt(self.eval_task, it, cfg.prompt_format, tokenizer=tok, shots=cfg.shots)
            for it in self.eval_items
        ]
        self.scorer, self.layer = self._build_scorer()
        self.probe = self._load_probe()
        self.format_warning = self._check_prompt_format()
        self.baseline = self._build_baseline()
        if check_only:  # every check on the settings has run; no adapter, no optimizer
            return
        torch.manual_seed(cfg.seed)
        base = self.lm.model
        targets = [t for t in cfg.lora_targets if any(n.endswith(t) for n, _ in base.named_modules())]
        if not targets:
            raise SaeRewardError(f"none of the LoRA targets {list(cfg.lora_targets)} exist in {cfg.model}")
        lcfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, lcfg)
        for p in self.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA weights train in fp32 whatever the base dtype
        if cfg.lean_lora:
            install_lean_lora(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lam = LambdaSchedule(cfg.lam_schedule, cfg.lam, cfg.lam_end, cfg.steps)

    # -- setup ------------------------------------------------------------------------------------
    def _build_scorer(self) -> tuple[Any, int | None]:
        cfg = self.cfg
        if cfg.reward == "outcome":
            return None, None

        if cfg.reward == "sae":
            pack = load_pack(cfg.pack)  # type: ignore[arg-type]
            sae_path = cfg.sae or pack.metadata.get("sae_path")
            if not sae_path:
                raise SaeRewardError(f"pack {cfg.pack} records no SAE: pass --sae")
            scorer = PackScorer(load_sae(sae_path), pack, d_model=self.lm.d_model)
            scorer.to(self.device)  # where the model runs
            return scorer, check_pack_scorer(scorer, self.lm.model, cfg.layer, model_name=cfg.model)

        ro = load_rollouts(cfg.direction_rollouts)  # type: ignore[arg-type]
        if ro.summary.get("model") not in (None, cfg.model):
            raise SaeRewardError(
                f"the rollouts at {ro.path} come from {ro.summary.get('model')}, training uses {cfg.model}"
            )
        if cfg.layer is None:
            import json as _json

            lm_file = ro.path / "layer_map.json"
            if not lm_file.is_file():
                raise SaeRewardError(
                    "reward=direction needs --layer (or run `saereward layers` on the rollouts)"
                )
            layer = int(_json.loads(lm_file.read_text())["peak_layer"])
        else:
            layer = resolve_layer(self.lm.model, cfg.layer)
        if layer not in ro.pooled:
            raise SaeRewardError(
                f"layer {layer} was not captured in {ro.path}: choose one of {sorted(ro.pooled)}"
            )
        disc = ro.split_mask("discovery")
        return DirectionScorer(contrastive_direction(ro.pooled[layer][disc], ro.correct[disc])), layer

    def _scorer_rollouts(self) -> str | None:
        """The rollout folder the reward's score was defined on (the pack's discovery rollouts, or R2's)."""
        if self.cfg.reward == "direction":
            return self.cfg.direction_rollouts
        return self.scorer.pack.metadata.get("rollouts") if self.scorer is not None else None

    def _check_prompt_format(self) -> str | None:
        """Warn when RL trains on another prompt format or task than the score was discovered on."""
        if self.scorer is None:
            return None
        meta: dict[str, Any] = {}
        if self.cfg.reward == "sae":
            meta = {k: self.scorer.pack.metadata.get(k) for k in ("prompt_format", "task")}
        src = self._scorer_rollouts()
        if src and Path(src, "config.json").is_file():  # fill what the pack does not record
            ro_cfg = json.loads(Path(src, "config.json").read_text())
            meta = {
                k: meta.get(k) if meta.get(k) is not None else ro_cfg.get(k)
                for k in ("prompt_format", "task")
            }
        diffs = [
            f"{k} {meta[k]!r} (discovery) vs {getattr(self.cfg, k)!r} (RL)"
            for k in ("prompt_format", "task")
            if meta.get(k) is not None and meta[k] != getattr(self.cfg, k)
        ]
        if not diffs:
            return None
        msg = (
            "the reward's score was validated on another distribution than RL trains on: "
            + "; ".join(diffs)
            + ". G1's correlation need not hold here: discover on rollouts in the RL format"
        )
        log.warning(msg)
        return msg

    def _build_baseline(self) -> RewardBaseline | None:
        """The fixed-scale forms' reference statistics: loaded, or measured on base rollouts."""
        cfg = self.cfg
        if self.scorer is None or cfg.reward_form == "mechreward":
            return None

        beside = baseline_beside(cfg.pack) if (cfg.reward == "sae" and cfg.pack) else None
        own = self.out / BASELINE_FILE  # a resumed run keeps the baseline it started with
        src = (
            str(own)
            if (cfg.resume and own.is_file())
            else cfg.reward_baseline
            or (str(beside) if beside and beside.is_file() else self._scorer_rollouts())
        )
        if not src:
            raise SaeRewardError(
                f"reward_form {cfg.reward_form!r} needs base rollouts to measure the reward baseline on: "
                "pass --reward-baseline (a rollout folder or reward_baseline.json)"
            )
        if Path(src).is_file():
            b = load_baseline(src)
            if b.meta.get("layer") not in (None, self.layer):
                raise SaeRewardError(
                    f"the reward baseline {src} was measured at layer {b.meta.get('layer')}, the reward reads "
                    f"layer {self.layer}: re-measure it"
                )
        else:
            ro = load_rollouts(src)
            b = measure_baseline(self.scorer, ro, self.layer, self.lm.tokenizer, meta={"scorer": cfg.reward})  # type: ignore[arg-type]
        require_baseline(cfg.reward_form, b)  # a degenerate baseline fails before any step
        if b.meta.get("prompt_format") not in (None, cfg.prompt_format):
            log.warning(
                "the reward baseline was measured on %s prompts, RL uses %s: its position means may not apply",
                b.meta.get("prompt_format"),
                cfg.prompt_format,
            )
        return b

    def _load_probe(self) -> Any:
        if not self.cfg.dual_verifier:
            return None

        probe = load_probe(self.cfg.dual_verifier)
        if probe.layer != self.layer:
            raise SaeRewardError(
                f"the dual-verifier probe reads layer {probe.layer}, the reward reads layer {self.layer}: "
                f"fit it with `saereward probe --layer {self.layer}`"
            )
        if probe.d_model != self.lm.d_model:
            raise SaeRewardError(
                f"the probe has width {probe.d_model}, the model {self.lm.d_model}: fit it on this model's rollouts"
            )
        return probe

    def _check_verifier_fires(self) -> None:
        """Refuse a task whose verifier accepts nothing, not even the gold answer."""
        it = self.train_items[0]
        if not any(
            self.task.verify(i, f" {i.gold}") or self.task.verify(i, f"The answer is {i.gold}.")
            for i in self.train_items[:20]
        ):
            raise SaeRewardError(
                f"task {self.cfg.task!r}: the verifier accepts not even the gold answers (e.g. {it.gold!r}); "
                "no outcome reward would ever fire: check the task and its answer format"
            )

    # -- pieces of a step ---------------------------------------------------------------------------
    def _policy_lm(self) -> LoadedModel:
        """The LoRA-wrapped policy as a :class:`LoadedModel` (for the generation helpers)."""
        return LoadedModel(
            model=self.model,
            tokenizer=self.lm.tokenizer,
            spec=self.lm.spec,
            source=self.lm.source,
            path=self.lm.path,
        )

    def _questions(self, step: int) -> list[Any]:
        """This rank's share of the step's questions (the same global draw on every rank)."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        qs = rng.sample(self.train_items, min(self.cfg.questions_per_step, len(self.train_items)))
        per = len(qs) // self.world
        return qs[self.rank * per : (self.rank + 1) * per]

    @torch.no_grad()
    def _rollouts(self, step: int) -> _Batch:
        cfg = self.cfg
        items = self._questions(step)
        prompts = [self.prompt[it.id] for it in items for _ in range(cfg.group_size)]
        qids = [it.id for it in items for _ in range(cfg.group_size)]
        sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop=stop_strings_for(cfg.prompt_format) if cfg.stop_strings else (),
            sampler=cfg.sampler,
        )
        capture = (
            [self.layer]
            if (self.layer is not None and self.scorer is not None and cfg.reward_source == "policy")
            else []
        )
        self.model.eval()
        lm = self._policy_lm()
        with (
            merged_lora(self.model, enabled=cfg.merge_for_generation),
            skinny_linear(self.model) if cfg.skinny_decode else contextlib.nullcontext(),
        ):
            g = generate_batch(
                lm,
                prompts,
                sampling,
                capture_layers=capture,
                seed=cfg.seed * 7919 + step + 1_000_003 * self.rank,
                share_prompts=cfg.share_prompt,
                fast_decode=cfg.fast_decode,
                skinny=cfg.skinny_decode,
            )
        res = g.residuals[capture[0]] if capture else None
        return _Batch(
            g.sequences,
            g.attention_mask,
            g.response_mask,
            g.residual_mask,
            g.prompt_len,
            g.completions,
            qids,
            res,
        )

    def _lora_autocast(self) -> bool:
        return self.cfg.lora_autocast and next(self.model.parameters()).dtype == torch.bfloat16

    def _no_input_cast(self) -> contextlib.AbstractContextManager[Any]:
        """PEFT's per-projection fp32 cast of adapted inputs, switched off for the whole update (the
        checkpointed forward is recomputed during backward, outside the forward's own context)."""
        if not self._lora_autocast():
            return contextlib.nullcontext()
        from peft.helpers import disable_input_dtype_casting

        return disable_input_dtype_casting(self.model)

    def _train_forward_context(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for the LoRA matmuls of the training forward (bf16 base only; see ``lora_autocast``).

        PEFT keeps the adapter weights in fp32 and casts each adapted projection's input to fp32 (a
        copy of the activations per projection, forward, recompute and backward). Under autocast with
        that cast disabled, the adapters run in bf16 like the base model; autograd casts the fp32
        weights, so gradients and AdamW stay fp32 (gradients matched the fp32-adapter ones to cosine
        0.999 on a GRPO batch). Timing: BENCHMARKS.md, GRPO step section.
        """
        if not self._lora_autocast():
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    def _logps(
        self,
        model: Any,
        b: _Batch,
        sl: _Slice,
        capture_layer: int | None = None,
        context: contextlib.AbstractContextManager[Any] | None = None,
        entropy: bool = True,
        prefix: PromptPrefix | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Log-probs and entropies (zeros with ``entropy=False``) ``[m, n]`` of one micro-batch's response tokens; optional capture.

        The forward sees the rows ``sl.rows`` cut to columns ``sl.start:sl.end`` (columns where none
        of these rows has a real token are dropped: exact, since attention masks them and positions
        come from the mask). Response position ``j < n`` is column ``prompt_len + j`` of the batch.
        The residuals, if captured, are ``[m, sl.end - sl.start, d]``. ``context`` wraps the model
        forward only (the log-softmax runs outside it, in fp32). With ``prefix`` (no capture) the
        rows run only from their last prompt column, on the prompts' shared cache.
        """
        seq = b.sequences[sl.rows, sl.start : sl.end]
        am = b.attention_mask[sl.rows, sl.start : sl.end]
        p = b.prompt_len - sl.start
        n = sl.end - b.prompt_len
        kwargs = {
            "input_ids": seq,
            "attention_mask": am,
            "position_ids": position_ids_from_mask(am),
            "use_cache": False,
            # exactly the n positions that predict response tokens: no [:, :-1] slice of the [m, n, V]
            # logits (whose backward would allocate a zero-filled copy of the whole tensor)
            "logits_to_keep": torch.arange(p - 1, p - 1 + n, device=seq.device),
        }
        with context or contextlib.nullcontext():
            if capture_layer is not None:
                with ResidualCapture(model, [capture_layer]) as cap:
                    logits = model(**kwargs).logits
                res = cap.sequence(capture_layer)
            elif prefix is not None:
                P, rows = b.prompt_len, sl.rows
                logits = model(
                    input_ids=b.sequences[rows, P - 1 : sl.end - 1],
                    attention_mask=b.attention_mask[rows, : sl.end - 1],
                    position_ids=prefix.pos[rows, P - 1 : sl.end - 1],
                    past_key_values=prefix.for_rows(rows),
                    use_cache=True,
                    logits_to_keep=0,
                ).logits
                res = None
            else:
                logits = model(**kwargs).logits
                res = None
        lp, ent = selective_log_softmax(logits, seq[:, p:], temperature=self.cfg.temperature, entropy=entropy)
        return lp, ent, res

    def _prompt_prefix(self, b: _Batch, grad: bool) -> PromptPrefix | None:
        """The batch's shared prompt cache for the next forwards (``share_prompt``), if it helps.

        Not under gradient checkpointing (transformers turns the cache off in checkpointed training).
        """
        if not self.cfg.share_prompt or (grad and self.cfg.grad_checkpointing):
            return None
        if not PromptPrefix.wanted(self.model, b):
            return None
        return PromptPrefix.build(self.model, b, grad=grad)

    def outcomes(self, b: _Batch) -> Tensor:
        """``[B]`` 1.0 where the task's verifier accepts the completion."""
        items = {it.id: it for it in self.train_items}
        return torch.tensor(
            [
                1.0 if self.task.verify(items[q], c) else 0.0
                for q, c in zip(b.qids, b.completions, strict=True)
            ],
            device=b.sequences.device,
        )

    def reference(self, b: _Batch) -> tuple[Tensor | None, Tensor | None]:
        """Reference log-probs (when β > 0) and, for ``reward_source = reference``, the residuals: one forward."""
        cfg = self.cfg
        layer = self.layer if (self.scorer is not None and cfg.reward_source == "reference") else None
        if not (cfg.beta > 0 or layer is not None):
            return None, None
        self.model.eval()
        B, T = b.sequences.shape
        ref_lp = torch.zeros(B, T - b.prompt_len, device=b.sequences.device)
        res_full: Tensor | None = None
        with torch.no_grad(), self.model.disable_adapter():
            prefix = None if layer is not None else self._prompt_prefix(b, grad=False)
            for sl in micro_batches(b.attention_mask, b.prompt_len, cfg.micro_batch):
                lp, _, res = self._logps(self.model, b, sl, capture_layer=layer, entropy=False, prefix=prefix)
                ref_lp[sl.rows, : lp.shape[1]] = lp
                if res is not None:
                    if res_full is None:
                        res_full = res.new_zeros(B, T, res.shape[-1])
                    res_full[sl.rows, sl.start : sl.end] = res
        return (ref_lp if cfg.beta > 0 else None), res_full

    def scored_mask(self, b: _Batch) -> Tensor:
        """``[B, N]`` response positions whose score counts: with a residual, and (fixed-scale forms)
        not the end token or a stop string's tokens, which only say that the completion ended."""
        P = b.prompt_len
        rmask = b.residual_mask[:, P:]
        if self.cfg.reward_form == "mechreward":
            return rmask

        tok = self.lm.tokenizer
        ends = set(tok.all_special_ids) | ({int(tok.eos_token_id)} if tok.eos_token_id is not None else set())
        stops = stop_strings_for(self.cfg.prompt_format) if self.cfg.stop_strings else ()
        resp = b.response_mask[:, P:]
        return rmask & ~end_positions(b.sequences[:, P:].cpu(), resp.cpu(), tok, stops, ends).to(rmask.device)

    def advantages(
        self, b: _Batch, outcome: Tensor, residuals: Tensor | None, lam: float
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Per-token advantages ``[B, N]``, total rewards ``[B]``, and the reward's statistics: the mean
        mech score, the share of tokens the dual verifier zeroed, the within-group correlation of
        completion length with the mech part of the advantage (all NaN for R0)."""
        cfg = self.cfg
        P = b.prompt_len
        resp = b.response_mask[:, P:]
        nan = float("nan")
        if self.scorer is None:
            adv, total = token_advantages(outcome, None, resp, cfg.group_size, 0.0)
            return (
                adv,
                total,
                {"mech": nan, "n_scored": 0.0, "gated": nan, "len_mech_corr": nan, "scores": []},
            )
        if residuals is None:
            raise SaeRewardError("no residuals for the mech reward: internal error, please report")
        rmask = self.scored_mask(b)
        x = residuals[:, P:].float()
        mech = self.scorer.token_scores(x).where(rmask, torch.zeros((), device=rmask.device))
        gate, gated = None, nan
        if self.probe is not None:
            gate = dual_gate(mech, self.probe.logits(x), rmask)
            gated = float(1 - gate.sum() / rmask.sum().clamp_min(1))
        adv, total = token_advantages(
            outcome,
            mech,
            rmask,
            cfg.group_size,
            lam,
            cfg.aggregation,
            loss_mask=resp,
            gate=gate,
            form=cfg.reward_form,
            baseline=self.baseline,
            clip=cfg.reward_clip,
        )

        zero = torch.zeros((), device=resp.device)
        base = token_advantages(outcome, None, resp, cfg.group_size, 0.0)[0]
        lengths = resp.sum(1).float()
        mech_part = (adv - base).where(resp, zero).sum(1) / lengths.clamp_min(1)
        # whole groups live on one rank: the gathered rows keep them contiguous
        lengths_all, part_all = all_gather_floats(lengths), all_gather_floats(mech_part)
        return (
            adv,
            total,
            {
                "mech": float(mech.sum() / rmask.sum().clamp_min(1)),
                "n_scored": float(rmask.sum()),
                "gated": gated,
                "len_mech_corr": within_group_corr(
                    torch.tensor(lengths_all), torch.tensor(part_all), cfg.group_size
                ),
                "scores": [round(v, 5) for v in all_gather_floats(masked_mean(mech, rmask))],
            },
        )

    def step(self, step: int) -> dict[str, Any]:
        """One GRPO step (rollouts, reference, rewards, update); returns the log row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        b = self._rollouts(step)
        t_gen = time.perf_counter() - t0
        outcome = self.outcomes(b)
        t_verify = time.perf_counter() - t0 - t_gen
        t1 = time.perf_counter()
        ref_lp, ref_res = self.reference(b)
        residuals = ref_res if cfg.reward_source == "reference" else b.residuals
        t_ref = time.perf_counter() - t1
        t2 = time.perf_counter()
        lam = self.lam(step)
        adv, total, rstats = self.advantages(b, outcome, residuals, lam)
        t_reward = time.perf_counter() - t2
        t3 = time.perf_counter()
        loss, stats, gnorm, ent_mean = self.update(b, adv, ref_lp)
        t_train = time.perf_counter() - t3

        row: dict[str, Any] = {
            "step": step + 1,
            **self.batch_stats(b, outcome, total, rstats, loss, stats, ent_mean),
            "len_mech_corr": rstats["len_mech_corr"],
            "lam": lam,
            "grad_norm": gnorm,
            "sec_generate": round(t_gen, 3),
            "sec_verify": round(t_verify, 4),
            "sec_reference": round(t_ref, 3),
            "sec_reward": round(t_reward, 4),
            "sec_train": round(t_train, 3),
            "sec_step": round(time.perf_counter() - t0, 3),
        }
        if self.scorer is not None:  # the online monitor's raw material, logged so a resume rebuilds it
            row["completion_scores"] = rstats["scores"]
            row["completion_outcomes"] = [int(v) for v in all_gather_floats(outcome.float())]
        return row

    def batch_stats(
        self,
        b: _Batch,
        outcome: Tensor,
        total: Tensor,
        rstats: dict[str, Any],
        loss: Tensor,
        stats: dict[str, float],
        ent_mean: float,
    ) -> dict[str, float]:
        """The step's logged statistics over the whole batch: under data parallelism each rank's sums
        and counts are all-reduced (``loss``, ``kl`` and ``clip_frac`` are already divided by the
        global token count), so every rank logs what a single process would."""
        resp = b.response_mask[:, b.prompt_len :]
        n_resp = float(resp.sum())
        mech_mean, gated = rstats["mech"], rstats["gated"]
        n_mech = float(rstats["n_scored"]) if self.scorer is not None else 0.0
        local = [
            float(outcome.float().sum()),
            float(total.sum()),
            float(outcome.numel()),
            mech_mean * n_mech if n_mech else 0.0,
            gated * n_mech if n_mech and not math.isnan(gated) else 0.0,
            n_mech,
            ent_mean * n_resp,
            n_resp,
            float(loss),
            stats.get("kl", 0.0),
            stats.get("clip_frac", 0.0),
            float((resp.sum(1) <= SHORT_TOKENS).sum()),
        ]
        g = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        rows, mech_n = max(g[2], 1.0), max(g[5], 1.0)
        return {
            "outcome": g[0] / rows,
            "reward": g[1] / rows,
            "mech": g[3] / mech_n if self.scorer is not None else float("nan"),
            "gated_frac": g[4] / mech_n if not math.isnan(gated) else float("nan"),
            "loss": g[8],
            "kl": g[9],
            "clip_frac": g[10],
            "entropy": g[6] / max(g[7], 1.0),
            "completion_len": g[7] / rows,
            "short_frac": g[11] / rows,
        }

    def update(
        self, b: _Batch, adv: Tensor, ref_lp: Tensor | None
    ) -> tuple[Tensor, dict[str, float], float, float]:
        """``epochs_per_batch`` optimizer steps on one batch; returns (loss, stats, grad norm, entropy).

        Each step accumulates the gradients of ``micro_batch``-sized forwards (see
        :func:`micro_batches`); every micro-batch's loss is divided by the batch's total number of
        response tokens, so the accumulated gradient is the whole batch's. Under data parallelism each
        rank holds part of the batch: the divisor is the global number of response tokens and gradients
        are summed across ranks before clipping, so every rank takes the step a single process would
        take on the whole batch.
        """
        cfg = self.cfg
        resp = b.response_mask[:, b.prompt_len :]
        n_global = all_reduce_sum(resp.sum().double()).float()
        slices = micro_batches(b.attention_mask, b.prompt_len, cfg.micro_batch)
        old_lp: Tensor | None = None
        ent_all = torch.zeros(resp.shape, device=resp.device)
        stats: dict[str, float] = {}
        gnorm, ent_mean = 0.0, 0.0
        loss = torch.zeros(())
        for _ in range(cfg.epochs_per_batch):
            self.model.train()
            first = old_lp is None
            new_old = torch.zeros(resp.shape, device=resp.device) if first else None
            loss = torch.zeros(())
            stats = {}
            self.opt.zero_grad(set_to_none=True)
            with self._no_input_cast():
                if cfg.grad_checkpointing:
                    self.model.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False}
                    )
                try:
                    with self._train_forward_context():
                        prefix = self._prompt_prefix(b, grad=True)
                    for sl in slices:
                        lp, ent, _ = self._logps(
                            self.model, b, sl, context=self._train_forward_context(), prefix=prefix
                        )
                        n = lp.shape[1]
                        if new_old is not None:
                            new_old[sl.rows, :n] = lp.detach()
                            ent_all[sl.rows, :n] = ent
                        old = lp.detach() if old_lp is None else old_lp[sl.rows, :n]
                        part, st = surrogate_loss(
                            lp,
                            old,
                            None if ref_lp is None else ref_lp[sl.rows, :n],
                            adv[sl.rows, :n],
                            resp[sl.rows, :n],
                            cfg.beta,
                            cfg.kl,
                            cfg.clip_eps,
                            n_global,
                        )
                        part.backward()
                        loss = loss + part.detach()
                        for k, v in st.items():
                            stats[k] = stats.get(k, 0.0) + v
                        del lp, ent, part
                    if prefix is not None:
                        prefix.backward()
                    del prefix
                finally:
                    if cfg.grad_checkpointing:
                        self.model.gradient_checkpointing_disable()
            if new_old is not None:
                old_lp = new_old
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad = all_reduce_sum(p.grad)
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
            self.opt.step()
            if first:
                ent_mean = float((ent_all * resp).sum() / resp.sum().clamp_min(1))
        return loss, stats, gnorm, ent_mean

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Greedy accuracy on the held-out questions, with a Wilson 95 % CI."""
        self.model.eval()
        lm = self._policy_lm()
        sampling = SamplingConfig(
            max_new_tokens=self.cfg.max_new_tokens, stop=stop_strings_for(self.cfg.prompt_format)
        )
        bits = ["0"] * len(self.eval_items)
        for idx, g in iter_generate(
            lm, self.eval_prompts, sampling, batch_size=self.cfg.eval_batch_size, progress=False
        ):
            for i, c in zip(idx, g.completions, strict=True):
                bits[i] = "1" if self.eval_task.verify(self.eval_items[i], c) else "0"
        k = bits.count("1")
        ci = wilson_ci(k, len(self.eval_items))
        return {
            "eval_bits": "".join(bits),
            "eval_correct": k,
            "eval_n": ci.n,
            "eval_accuracy": ci.p,
            "eval_ci_low": ci.low,
            "eval_ci_high": ci.high,
        }

    # -- the loop -----------------------------------------------------------------------------------
    def _lora_state(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self) -> int:
        from safetensors.torch import load_file

        ck = self.out / "checkpoint"
        if not (ck / "state.json").is_file():  # killed between _save_checkpoint's two renames
            ck = ck.with_name("checkpoint.old")
        if not (self.cfg.resume and (ck / "state.json").is_file()):
            return 0
        diff = settings_diff(json.loads((ck / "config.json").read_text()), self.cfg)
        if diff:
            raise SaeRewardError(
                f"the checkpoint in {ck} was made with different settings ({', '.join(diff[:4])}): "
                "use another --out or --no-resume"
            )
        weights = load_file(str(ck / "adapter.safetensors"))
        state = self._lora_state()
        missing = set(state) ^ set(weights)
        if missing:
            raise SaeRewardError(f"checkpoint {ck} does not match this LoRA setup: use another --out")
        with torch.no_grad():
            for n, p in state.items():
                p.copy_(weights[n])
        return _load_optimizer(ck, self.opt)

    def fit(self) -> dict[str, Any]:
        """Train ``steps`` steps (resuming if a checkpoint exists); rank 0 evaluates, logs and checkpoints.

        The run folder is locked while it trains (:func:`saereward.lock.folder_lock`).
        """
        with folder_lock(self.cfg.out, "saereward train-rl"):
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        """The training loop of :meth:`fit`.

        After every step the collapse rule (:func:`collapse_check`) runs on the logged rows; a
        collapsed run is evaluated, checkpointed and (``collapse_stop``) stopped there.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        main = self.rank == 0
        self.out.mkdir(parents=True, exist_ok=True)
        start = self._restore()
        rows, tb = self._open_log(start, main)
        collapse = self._collapse(rows)
        stop_at = (
            collapse["step"]
            if (collapse["collapsed"] and cfg.collapse_stop and self.scorer is not None)
            else None
        )
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            desc=f"grpo {cfg.reward}",
            disable=not (cfg.progress and main),
            dynamic_ncols=True,
        )
        try:
            for s in range(start, cfg.steps if stop_at is None else start):
                torch.manual_seed(cfg.seed * _STEP_SEED + s)
                row = self.step(s)
                rows.append(row)  # every rank: the batch statistics are all-reduced, the rule agrees
                row["monitor_rho"] = monitor_rho(rows, cfg.collapse_window)
                was = collapse["collapsed"]
                collapse = self._collapse(rows)
                # R0 has no mech reward to hack: a shrinking R0 run is recorded, never stopped
                stop = collapse["collapsed"] and cfg.collapse_stop and self.scorer is not None
                if collapse["collapsed"] and not (was or stop):
                    log.warning(
                        "run %s collapsed at step %d: %s", self.out, collapse["step"], collapse["reason"]
                    )
                last = s + 1 == cfg.steps or stop
                if stop:
                    log.warning(
                        "run %s collapsed at step %d: %s; stopping", self.out, s + 1, collapse["reason"]
                    )
                if main:
                    self._log_step(rows, tb, s, last)
                    bar.update(1)
                    bar.set_postfix(
                        outcome=f"{row['outcome']:.2f}",
                        len=f"{row['completion_len']:.1f}",
                        kl=f"{row['kl']:.3g}",
                    )
                if stop:
                    break
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        return self._summary(rows, collapse, main)

    def _collapse(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        c = self.cfg
        return collapse_check(rows, c.collapse_window, c.collapse_short_frac, c.collapse_len_ratio)

    def _open_log(self, start: int, main: bool) -> tuple[list[dict[str, Any]], Any]:
        """The log rows up to the checkpoint (later ones dropped); a fresh run evaluates step 0."""
        log_path = self.out / "train_log.jsonl"
        rows = (
            [r for r in read_jsonl(log_path) if r.get("step", 0) <= start]
            if (start and log_path.is_file())
            else []
        )
        tb = None
        if main:
            write_jsonl(log_path, rows)  # drop lines written after the checkpoint
            write_json(self.out / "config.json", to_dict(self.cfg))
            if self.baseline is not None:
                save_baseline(self.baseline, self.out / BASELINE_FILE)
            tb = _tensorboard(self.out / "tensorboard")
            if start == 0:
                rows.append({"step": 0, **self.evaluate()})
                write_jsonl(log_path, rows)
                _add_scalars(tb, rows[-1], 0)
        return rows, tb

    def _log_step(self, rows: list[dict[str, Any]], tb: Any, s: int, last: bool) -> None:
        """Rank 0 after step ``s``: evaluate when due, log, snapshot and checkpoint."""
        cfg = self.cfg
        row = rows[-1]
        if last or (cfg.eval_every and (s + 1) % cfg.eval_every == 0):
            row.update(self.evaluate())
        write_jsonl(self.out / "train_log.jsonl", rows)
        _add_scalars(tb, row, s + 1)
        if cfg.snapshot_every and (s + 1) % cfg.snapshot_every == 0:
            _save_snapshot(self.out / "snapshots" / f"step_{s + 1:05d}", self._lora_state(), cfg)
        if last or (s + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(self.out / "checkpoint", s + 1, self._lora_state(), self.opt, cfg)

    def _summary(self, rows: list[dict[str, Any]], collapse: dict[str, Any], main: bool) -> dict[str, Any]:
        cfg = self.cfg
        evals = [r for r in rows if "eval_accuracy" in r]
        train = [r for r in rows if "sec_step" in r]
        summary = {
            "reward": cfg.reward,
            "reward_form": cfg.reward_form if self.scorer is not None else None,
            "prompt_format": cfg.prompt_format,
            "seed": cfg.seed,
            "steps": cfg.steps,
            "steps_done": int(train[-1]["step"]) if train else 0,
            "lr": cfg.lr,
            "processes": self.world,
            "eval_first": evals[0] if evals else None,
            "eval_last": evals[-1] if evals else None,
            "eval_qids": [it.id for it in self.eval_items],
            "collapse": collapse,
            "final_completion_len": train[-1]["completion_len"] if train else None,
            "format_warning": self.format_warning,
            "seconds_per_step": _median([r["sec_step"] for r in train]),
            "saereward_version": __version__,
        }
        if main:
            write_json(self.out / "summary.json", summary)
        return {**summary, "rank": self.rank}


def _median(xs: Sequence[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[len(s) // 2]


def _add_scalars(tb: Any, row: dict[str, Any], step: int) -> None:
    """Every finite number of a log row as a TensorBoard scalar at ``step`` (no-op without a writer)."""
    if tb is None:
        return
    for k, v in row.items():
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            tb.add_scalar(k, v, step)


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return None
    return SummaryWriter(str(path))


def _local_device(device: str) -> str:
    """``device`` for this process: ``cuda`` becomes the GPU of ``LOCAL_RANK`` (set by torchrun /
    ``accelerate launch``), so data-parallel ranks do not all land on GPU 0; checked to exist."""
    import os

    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    require_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return device


def _init_distributed(device: str = "cpu") -> bool:
    """Join the process group that ``accelerate launch`` / ``torchrun`` describe in the environment:
    gloo when the model runs on the CPU, NCCL on CUDA (NCCL refuses CPU tensors, gloo is slow on GPU ones)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def run_train_rl(cfg: GRPOConfig, lm: LoadedModel | None = None) -> dict[str, Any]:
    """``saereward train-rl``: build the trainer (all checks before any training) and fit.

    Under ``accelerate launch --num_processes N`` (or torchrun) every process joins the group and
    takes ``questions_per_step / N`` questions per step; see :meth:`GRPOTrainer.update`.
    """
    started = _init_distributed(cfg.device)
    try:
        return GRPOTrainer(cfg, lm=lm).fit()
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "install_lean_lora",
    "kl_term",
    "micro_batches",
    "run_train_rl",
    "selective_log_softmax",
    "settings_diff",
    "skinny_linear",
    "surrogate_loss",
]
