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
   to their own longest sequence (:func:`~saereward.rl.batching.micro_batches`; the reference forward too,
   of ``reference_micro_batch`` completions where set).
   Each distinct prompt runs once per forward pass, its KV cache shared by its group's completions
   (:class:`~saereward.rl.batching.PromptPrefix`; the rollouts' prefill does the same);
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
last ``collapse_window`` steps (``monitor_rho``). :func:`~saereward.rl.collapse.collapse_check` marks a run collapsed when,
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

**Modules.** This one holds the trainer (:class:`GRPOTrainer`, :func:`run_train_rl`); beside it:
the settings (:mod:`saereward.rl.config`), the loss math (:mod:`saereward.rl.loss`), micro-batches
and the shared prompt cache (:mod:`saereward.rl.batching`), checkpoints, snapshots and the resume
check (:mod:`saereward.rl.checkpoint`), the collapse guard (:mod:`saereward.rl.collapse`) and the
CPU and LoRA patches (:mod:`saereward.rl.patches`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saereward import __version__
from saereward.config import to_dict
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
from saereward.features.pack import check_pack_sae, load_pack
from saereward.features.probe import load_probe
from saereward.features.scoring import PackScorer, masked_mean
from saereward.io import read_json, read_jsonl, write_json, write_jsonl
from saereward.lock import folder_lock
from saereward.metrics import MetricSinks
from saereward.model import onednn
from saereward.model.capture import ResidualCapture, position_ids_from_mask
from saereward.model.generate import (
    SamplingConfig,
    end_positions,
    generate_batch,
    iter_generate,
    packs_weights,
    stop_strings_for,
)
from saereward.model.lm import (
    LoadedModel,
    decoder_layers,
    load_model,
    require_device,
    resolve_layer,
    with_lora,
)
from saereward.rl.batching import PromptPrefix, _Batch, _Slice, micro_batches
from saereward.rl.checkpoint import (
    STEP_SEED,
    restore_checkpoint,
    reward_inputs,
    save_checkpoint,
    save_snapshot,
)
from saereward.rl.collapse import SHORT_TOKENS, collapse_check, monitor_rho
from saereward.rl.config import GRPOConfig
from saereward.rl.loss import HeadWorkspace, head_log_softmax, selective_log_softmax, surrogate_loss
from saereward.rl.patches import (
    cpu_sdpa_gqa,
    head_returns_hidden,
    install_lean_lora,
    merged_lora,
    mmap_large_allocations,
    plain_fp32_head,
    skinny_linear,
)
from saereward.rl.rebuild import install_lean_mlp, install_lean_norms
from saereward.rl.reward import (
    DirectionScorer,
    LambdaSchedule,
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

log = logging.getLogger(__name__)


class GRPOTrainer:
    """The loop; see the module docstring. ``lm`` may be passed in (tests); otherwise it is loaded."""

    def __init__(self, cfg: GRPOConfig, lm: LoadedModel | None = None, *, check_only: bool = False) -> None:
        import torch.distributed as dist
        from peft import LoraConfig

        self.cfg = cfg
        self.out = Path(cfg.out)
        device = _local_device(cfg.device)
        if (
            cfg.mmap_large_allocations
            and device == "cpu"
            and not mmap_large_allocations(threshold=cfg.mmap_threshold_kib << 10)
        ):
            log.info("mmap_large_allocations: not glibc, left as is")
        dist_on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if dist_on else 0
        self.world = dist.get_world_size() if dist_on else 1
        if cfg.questions_per_step % self.world:
            raise SaeRewardError(
                f"questions_per_step {cfg.questions_per_step} does not split over {self.world} processes: "
                "use a multiple of the process count"
            )
        self._load_tasks()
        if lm is None:  # a missing or malformed input file is one line before the model loads
            check_reward_inputs(cfg)
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
        self.inputs = reward_inputs(cfg)  # what a resume must find unchanged
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
        self.model = with_lora(base, lcfg)
        for p in self.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA weights train in fp32 whatever the base dtype
        if cfg.lean_lora:
            install_lean_lora(self.model)
        install_lean_mlp(self.model)  # the same gradients bit for bit, two activations less per layer
        if cfg.rebuild_norms:  # two more, rebuilt in the backward through the lean LoRA forward
            install_lean_norms(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lam = LambdaSchedule(cfg.lam_schedule, cfg.lam, cfg.lam_end, cfg.steps)

    # -- setup ------------------------------------------------------------------------------------
    def _load_tasks(self) -> None:
        """The training questions, and held-out ones from another task seed that training lacks."""
        cfg = self.cfg
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

    def _build_scorer(self) -> tuple[Any, int | None]:
        cfg = self.cfg
        if cfg.reward == "outcome":
            return None, None

        if cfg.reward == "sae":
            pack = load_pack(cfg.pack)  # type: ignore[arg-type]
            sae_path = cfg.sae or pack.metadata.get("sae_path")
            if not sae_path:
                raise SaeRewardError(f"pack {cfg.pack} records no SAE: pass --sae")
            check_pack_sae(pack, sae_path)
            # the step's rewards in chunks of 256 tokens: the encoder's dense pre-activations stay
            # ~9 MB instead of sitting on the step's memory at once (each token is encoded on its own:
            # on the 2-core VM the scores equal the one-chunk ones bit for bit); the reward reads
            # activations only, so the SAE's decoder is not kept (21 MB at 9216 × 576 fp32)
            sae = load_sae(sae_path).encoder_only()
            scorer = PackScorer(sae, pack, d_model=self.lm.d_model, chunk=256)
            scorer.to(self.device)  # where the model runs
            return scorer, check_pack_scorer(scorer, self.lm.model, cfg.layer, model_name=cfg.model)

        ro = load_rollouts(cfg.direction_rollouts)  # type: ignore[arg-type]
        if ro.summary.get("model") not in (None, cfg.model):
            raise SaeRewardError(
                f"the rollouts at {ro.path} come from {ro.summary.get('model')}, training uses {cfg.model}"
            )
        if cfg.layer is None:
            lm_file = ro.path / "layer_map.json"
            if not lm_file.is_file():
                raise SaeRewardError(
                    "reward=direction needs --layer (or run `saereward layers` on the rollouts)"
                )
            peak = read_json(lm_file, dict).get("peak_layer")
            if not isinstance(peak, int):
                raise SaeRewardError(
                    f"{lm_file} records no peak_layer: re-run `saereward layers`, or pass --layer"
                )
            layer = peak
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
            ro_cfg = read_json(Path(src, "config.json"), dict)
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

        src = _baseline_file(cfg) or self._scorer_rollouts()
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
        if not self.cfg.dual_verifier or self.cfg.reward == "outcome":  # it gates the mech term only
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
            min_new_tokens=cfg.min_new_tokens,
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
        # packed decoding folds the adapters into its own copy (or, in place, keeps them beside it):
        # merging in place would copy them again
        packed = packs_weights(self.model, sampling, cfg.fast_decode, cfg.skinny_decode, cfg.packed_decode)
        # with packed_in_place the reference's packed copy reuses the heap this one leaves, and gives
        # it back itself
        in_place = packed and cfg.packed_in_place and not self._reference_packs()
        with (
            merged_lora(self.model, enabled=cfg.merge_for_generation and not packed),
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
                packed=packed,
                packed_in_place=in_place,
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

    @contextlib.contextmanager
    def _update_context(self) -> Iterator[None]:
        """What holds for a whole update, its backward included: no PEFT input cast
        (:meth:`_no_input_cast`), grouped-head SDPA (a checkpoint's recompute must take the forward's
        attention path: repeated heads would not match what the forward saved) and, with
        ``grad_checkpointing``, activation checkpointing, switched off again afterwards."""
        with self._no_input_cast(), cpu_sdpa_gqa():
            if not self.cfg.grad_checkpointing:
                yield
                return
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            try:
                yield
            finally:
                self.model.gradient_checkpointing_disable()

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
        workspace: HeadWorkspace | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Log-probs and entropies (zeros with ``entropy=False``) ``[m, n]`` of one micro-batch's response tokens; optional capture.

        The forward sees the rows ``sl.rows`` cut to columns ``sl.start:sl.end`` (columns where none
        of these rows has a real token are dropped: exact, since attention masks them and positions
        come from the mask). Response position ``j < n`` is column ``prompt_len + j`` of the batch.
        The residuals, if captured, are ``[m, sl.end - sl.start, d]``. ``context`` wraps the model
        forward only (the log-softmax runs outside it, in fp32). With ``prefix`` (no capture) the
        rows run only from their last prompt column, on the prompts' shared cache. Where the head allows
        (:func:`saereward.rl.patches.plain_fp32_head`) the log-probs come from the final hidden states
        and the head's weight (:func:`saereward.rl.loss.head_log_softmax`, its chunk buffers from
        ``workspace`` if given), the logits never stored.
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
        head = plain_fp32_head(model)  # then ``logits`` below are the head's input: see head_log_softmax
        with (
            context or contextlib.nullcontext(),
            head_returns_hidden(model) if head else contextlib.nullcontext(),
            cpu_sdpa_gqa(),
        ):
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
        ids, t = seq[:, p:], self.cfg.temperature
        if head is not None:
            lp, ent = head_log_softmax(
                logits, *head, ids, temperature=t, entropy=entropy, workspace=workspace
            )
        else:
            lp, ent = selective_log_softmax(logits, ids, temperature=t, entropy=entropy)
        return lp, ent, res

    def _prompt_prefix(self, b: _Batch, grad: bool) -> PromptPrefix | None:
        """The batch's shared prompt cache for the next forwards (``share_prompt``), if it helps.

        Not under gradient checkpointing (transformers turns the cache off in checkpointed training).
        """
        if not self.cfg.share_prompt or (grad and self.cfg.grad_checkpointing):
            return None
        if not PromptPrefix.wanted(self.model, b):
            return None
        return PromptPrefix.build(self.model, b, grad=grad, recompute=grad and self.cfg.recompute_prompt)

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
        if not self._reference_runs():
            return None, None
        layer = self.layer if self._reference_residuals() else None
        self.model.eval()
        B, T = b.sequences.shape
        ref_lp = torch.zeros(B, T - b.prompt_len, device=b.sequences.device)
        res_full: Tensor | None = None
        with torch.no_grad(), self.model.disable_adapter(), self._packed_reference():
            prefix = None if layer is not None else self._prompt_prefix(b, grad=False)
            # the micro-batches share the head's chunk buffers (not in the update: held through its
            # backward passes, they would add ~50 MB to the step's peak)
            ws = HeadWorkspace()
            size = cfg.micro_batch if cfg.reference_micro_batch < 0 else cfg.reference_micro_batch
            for sl in micro_batches(b.attention_mask, b.prompt_len, size):
                lp, _, res = self._logps(
                    self.model, b, sl, capture_layer=layer, entropy=False, prefix=prefix, workspace=ws
                )
                ref_lp[sl.rows, : lp.shape[1]] = lp
                if res is not None:
                    if res_full is None:
                        res_full = res.new_zeros(B, T, res.shape[-1])
                    res_full[sl.rows, sl.start : sl.end] = res
        return (ref_lp if cfg.beta > 0 else None), res_full

    def _reference_linears(self) -> list[Any]:
        """The decoder's projections as the reference forward computes them: the base layers (the
        LoRA adapters' own layers, disabled there, left out)."""
        return [
            m
            for block in decoder_layers(self.model)
            for name, m in block.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name
        ]

    def _reference_residuals(self) -> bool:
        """Whether the SAE reward reads the reference forward's residuals (``reward_source = reference``)."""
        return self.scorer is not None and self.layer is not None and self.cfg.reward_source == "reference"

    def _reference_runs(self) -> bool:
        """Whether :meth:`reference` runs a forward: for the KL term (β > 0) or the reward's residuals."""
        return self.cfg.beta > 0 or self._reference_residuals()

    def _reference_packs(self) -> bool:
        """Whether :meth:`reference` runs a forward on packed base weights (``packed_reference`` where
        :func:`saereward.model.onednn.packable` holds: CPU fp32 weights in a file mapping)."""
        return (
            self.cfg.packed_reference
            and self._reference_runs()
            and onednn.packable(self._reference_linears())
        )

    def _packed_reference(self) -> contextlib.AbstractContextManager[Any]:
        """:meth:`reference`'s products on packed base weights with ``packed_reference``, where
        :func:`saereward.model.onednn.packed_linears` applies (it checks :func:`~saereward.model.onednn.packable`
        itself); with ``packed_in_place`` the free heap their packed copy leaves goes back to the OS
        afterwards (the rollouts then keep theirs for it: the two copies take the same sizes)."""
        if not self.cfg.packed_reference:
            return contextlib.nullcontext()
        return onednn.packed_linears(self._reference_linears(), release=self.cfg.packed_in_place)

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
        slices = micro_batches(b.attention_mask, b.prompt_len, cfg.micro_batch, cfg.micro_batch_tokens)
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
            # zeroed in place: the LoRA gradients keep their place on the heap from step to step (set
            # to None, they were allocated anew in every update, between the activations)
            self.opt.zero_grad(set_to_none=False)
            with self._update_context():
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
            "eval_ci_confidence": ci.confidence,
        }

    # -- the loop -----------------------------------------------------------------------------------
    def _lora_state(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self) -> int:
        return restore_checkpoint(self.out, self.cfg, self._lora_state(), self.opt, self.inputs)

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
        if start >= cfg.steps and main:
            log.warning(
                "%s holds %d steps already (steps = %d): nothing to train; pass a larger --steps to go on",
                self.out,
                start,
                cfg.steps,
            )
        elif start and main:
            log.info("resumed %s from its checkpoint at step %d of %d", self.out, start, cfg.steps)
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
                torch.manual_seed(cfg.seed * STEP_SEED + s)
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
            tb = MetricSinks(
                self.out,
                self.cfg.report_to,
                name=f"train-rl:{self.out.name}",
                config=to_dict(self.cfg),
                resume_step=start,
            )
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
            save_snapshot(self.out / "snapshots" / f"step_{s + 1:05d}", self._lora_state(), cfg)
        if last or (s + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(self.out / "checkpoint", s + 1, self._lora_state(), self.opt, cfg, self.inputs)

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


def check_reward_inputs(cfg: GRPOConfig, flag_prefix: str = "--") -> None:
    """Raise one line when a local input file of the reward is missing, or the pack is not one: the
    checks that need no model (the scorer's own, against the model's width, come after it loads).
    ``flag_prefix`` starts the option names the message gives (``--rl-`` under gate-g2)."""
    from saereward.hub import HF_SCHEME

    named = {
        "pack": cfg.pack,
        "sae": cfg.sae,
        "direction-rollouts": cfg.direction_rollouts,
        "dual-verifier": cfg.dual_verifier,
        "reward-baseline": cfg.reward_baseline,
    }
    for flag, value in named.items():
        if value and not str(value).startswith(HF_SCHEME) and not Path(value).expanduser().exists():
            raise SaeRewardError(f"{flag_prefix}{flag} {value} not found: check the path")
    if cfg.reward == "sae" and cfg.pack and not str(cfg.pack).startswith(HF_SCHEME):
        load_pack(cfg.pack)  # malformed: its own one-line error
    if cfg.reward != "outcome" and cfg.reward_form != "mechreward":
        src = _baseline_file(cfg)
        if src and Path(src).is_file():
            load_baseline(src)  # the file the fixed-scale forms would read: a corrupt one fails now


def _baseline_file(cfg: GRPOConfig) -> str | None:
    """Where the fixed-scale forms' reward baseline comes from, short of measuring it on the scorer's
    rollouts: the run's own (a resumed run keeps the baseline it started with), ``reward_baseline``,
    or the one discovery wrote beside the pack."""
    own = Path(cfg.out) / BASELINE_FILE
    if cfg.resume and own.is_file():
        return str(own)
    beside = baseline_beside(cfg.pack) if (cfg.reward == "sae" and cfg.pack) else None
    return cfg.reward_baseline or (str(beside) if beside and beside.is_file() else None)


def _median(xs: Sequence[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[len(s) // 2]


def _add_scalars(tb: MetricSinks | None, row: dict[str, Any], step: int) -> None:
    """Every finite number of a log row to the metric sinks at ``step`` (no-op without sinks)."""
    if tb is not None:
        tb.log(row, step)


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


__all__ = ["GRPOTrainer", "run_train_rl"]
