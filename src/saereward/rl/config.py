"""The settings of ``saereward train-rl`` (:class:`GRPOConfig`): one frozen dataclass whose fields are
the CLI flags and TOML keys, each with its help text; ``__post_init__`` rejects inconsistent settings. The algorithm they drive and
the collapse rule (the "module doc" of the help texts) are described in :mod:`saereward.rl.grpo`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saereward.config import check_new_tokens, check_sampling, option
from saereward.metrics import ReportTo
from saereward.model.lm import DType, check_device
from saereward.options import DeviceOptions, ModelOptions, TaskOptions
from saereward.rl.reward import REWARD_FORMS, Aggregation, RewardForm, RewardKind
from saereward.tasks.prompts import PromptFormat

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GRPOConfig(TaskOptions, DeviceOptions, ModelOptions):
    """Settings of ``saereward train-rl``."""

    dtype: DType = option("fp32", "model dtype (bf16 halves memory; the LoRA weights stay fp32)")
    device: str = option("cpu", "where the policy runs: cpu, cuda (the GPU of LOCAL_RANK) or cuda:N")
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
    min_new_tokens: int = option(
        0,
        "rollouts: no end token before this many tokens (masked, as generate(min_new_tokens=)); "
        "max_new_tokens fixes every completion's length (fixed-work timing); stop strings still end",
    )
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
        "sq", "KL estimator: sq = (logπ − logπ_ref)² (mechreward's), k3 = exp(d) − d − 1"
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
    micro_batch_tokens: int = option(
        0,
        "training forward: also cap each micro-batch at this many response positions (rows × its "
        "longest response, so short completions share a forward that long ones would not; a row alone "
        "may exceed it); 0: rows only. A memory bound with fewer, fuller forwards than a small "
        "micro_batch",
    )
    rebuild_norms: bool = option(
        False,
        "with lean_lora: keep no RMSNorm output for the LoRA A gradients of the projections it feeds; "
        "rebuild it from the norm's input in the backward (same gradients bit for bit; SmolLM2-135M "
        "fp32: 15 % less saved per micro-batch, ~2 % more update time)",
    )
    reference_micro_batch: int = option(
        -1,
        "completions per reference forward, if not micro_batch's (-1: as micro_batch; 0: the whole "
        "batch). It keeps no activations, so a low-memory micro_batch need not slow it down: on the "
        "2-core CPU, SmolLM2-135M fp32, 4 was 10 % faster than 2 (and than 8 or the whole batch)",
    )
    share_prompt: bool = option(
        True,
        "run each question's prompt once and reuse its KV cache for the group's completions, in "
        "the rollouts' prefill and in the reference and training forwards (not with gradient "
        "checkpointing or reference-source residuals); same values up to float rounding",
    )
    recompute_prompt: bool = option(
        False,
        "with share_prompt: keep no activations of the shared prompt forward in the update; recompute "
        "it in the backward (less peak memory, one more prompt forward per update; same gradients)",
    )
    mmap_large_allocations: bool = option(
        True,
        "glibc: allocate big tensors with mmap so freed memory returns to the OS (lower peak RSS)",
    )
    mmap_threshold_kib: int = option(
        4096,
        "with mmap_large_allocations: the size (KiB, 64-32768) from which an allocation gets its own "
        "mapping. Lower leaves the heap fewer large holes (lower peak RSS) for more page faults: "
        "SmolLM2-135M fp32, micro_batch=2, recompute_prompt, packed_in_place: 1024 peaked 0.05 GB "
        "below 4096 (1.38 vs 1.43 GB)",
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
    packed_decode: bool = option(
        True,
        "rollouts, CPU fp32 with fast_decode and skinny_decode: the decode loop's products through "
        "oneDNN on weights packed once per rollout with the LoRA adapters folded in (no in-place merge; "
        "same products, other rounding order; MKL runs the decode's few-row products far below the "
        "CPU's GEMM rate). Weights that are views of the checkpoint's file mapping (as transformers "
        "loads safetensors) have their pages dropped while the packed copy exists and fault back in "
        "from the file after the rollouts (pages written since loading are kept), so they are held "
        "once; other weights are held twice through the rollouts (SmolLM2-135M: +0.54 GB) unless "
        "packed_in_place. Off for the lowest peak memory",
    )
    packed_reference: bool = option(
        True,
        "reference forward, CPU fp32 weights in the checkpoint's file mapping (as transformers loads "
        "safetensors): the decoder's projections through oneDNN on base weights packed once per step, "
        "each weight's pages dropped once its packed copy exists (held once; same products, other "
        "rounding order). SmolLM2-135M fp32 on 2 cores: the reference phase ~11 % faster, packing "
        "included. Other weights: plain products",
    )
    packed_in_place: bool = option(
        False,
        "with packed_decode, for the lowest peak memory. Weights in a file mapping: the free heap the "
        "packed copy leaves after the rollouts goes back to the OS (the next phases fault it in "
        "again). Weights in the process's own memory: each projection's plain weight is released as "
        "its packed copy is made (the LoRA adapters then run beside the packed products) and unpacked "
        "back, bit for bit, after the rollouts (rollouts ~1.3x packed decoding's time). SmolLM2-135M "
        "fp32 with micro_batch=2 and recompute_prompt: the step peaks at ~1.4-1.5 GB",
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
        True,
        "sample with the LoRA weights merged into the base (exact base weights restored after); off: "
        "the fast decode loop applies the adapters unmerged, with no copy of the weights (SmolLM2 fp32 on "
        "2 AVX2 cores: 0.4 GB less RSS while sampling, rollouts ~9 % slower; generate() is much slower "
        "unmerged). Moot where packed_decode applies: the packed copy holds the adapted weights",
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
    report_to: tuple[ReportTo, ...] = option(
        ("tensorboard",), "metric sinks beside train_log.jsonl: tensorboard, wandb (the wandb extra), none"
    )

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
        check_new_tokens(self.min_new_tokens, self.max_new_tokens)
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0: whole batch), got {self.micro_batch}")
        if self.micro_batch_tokens < 0:
            raise ValueError(f"micro_batch_tokens must be >= 0 (0: no cap), got {self.micro_batch_tokens}")
        if self.reference_micro_batch < -1:
            raise ValueError(
                "reference_micro_batch must be >= -1 (-1: as micro_batch, 0: whole batch), "
                f"got {self.reference_micro_batch}"
            )
        if not 64 <= self.mmap_threshold_kib <= 32768:
            raise ValueError(f"mmap_threshold_kib must be in 64..32768, got {self.mmap_threshold_kib}")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {self.snapshot_every}")
        if self.lr <= 0 or self.beta < 0 or self.lam < 0 or self.lam_end < 0:
            raise ValueError("lr must be > 0, beta, lam and lam_end >= 0")
        check_sampling(self.temperature, self.top_p)
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.reward_form not in REWARD_FORMS:
            raise ValueError(
                f"unknown reward_form {self.reward_form!r}: choose from {', '.join(REWARD_FORMS)}"
            )
        if self.reward_clip <= 0 or self.collapse_window < 1:
            raise ValueError("reward_clip must be > 0 and collapse_window >= 1")
        if not (0 < self.collapse_short_frac <= 1 and 0 <= self.collapse_len_ratio < 1):
            raise ValueError("collapse_short_frac must be in (0, 1] and collapse_len_ratio in [0, 1)")


#: the reward inputs each reward reads (gate-g2 shares one config across rewards, so a config may
#: name inputs its own reward ignores; train-rl runs one reward and refuses them)
_READS = {
    "outcome": (),
    "sae": ("pack", "sae", "dual_verifier"),
    "direction": ("direction_rollouts", "dual_verifier"),
}


def unread_reward_inputs(cfg: GRPOConfig) -> list[str]:
    """The reward inputs set in ``cfg`` that its ``reward`` does not read (e.g. a pack with the outcome
    reward: most likely a forgotten ``--reward sae``)."""
    inputs = ("pack", "sae", "direction_rollouts", "dual_verifier")
    return [k for k in inputs if getattr(cfg, k) and k not in _READS[cfg.reward]]


__all__ = ["LORA_TARGETS", "GRPOConfig", "unread_reward_inputs"]
