"""Batched task evaluation: accuracy with a Wilson 95 % CI, per-item records, and throughput.

``saereward eval`` = :func:`run_eval`. It formats each task item with a prompt format, generates in
length-bucketed batches, verifies each completion with the task's verifier and writes, atomically:

* ``items.jsonl``: one record per item (id, prompt, completion, extracted answer, gold, correct, tokens);
* ``summary.json``: accuracy, Wilson CI, n, seed, tokens/s and the resolved config;
* ``config.json``: the resolved :class:`EvalConfig`.

``saereward baseline`` (:func:`run_baseline`) runs the evaluations that make up the README's baseline
table (chain_sum with several prompt formats, and the 100 real GSM8K items) and prints one table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from saereward import __version__
from saereward.config import check_sampling, option, to_dict
from saereward.errors import SaeRewardError
from saereward.io import as_json, file_sha256, read_jsonl, write_json, write_jsonl
from saereward.model.generate import SamplingConfig, iter_generate, stop_strings_for
from saereward.model.lm import LoadedModel, adapter_dir, check_device, load_model
from saereward.options import DeviceOptions, ModelOptions, TaskOptions
from saereward.stats import wilson_ci
from saereward.tasks import format_prompt, load_task
from saereward.tasks.base import Task, TaskItem
from saereward.tasks.prompts import PromptFormat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig(TaskOptions, DeviceOptions, ModelOptions):
    """Settings of ``saereward eval``."""

    adapter: str | None = option(None, "LoRA adapter to merge in: a `saereward train-rl` run folder")
    n: int | None = option(200, "number of items (None = all the task has)")
    seed: int = option(0, "seed for task generation and sampling")
    prompt_format: PromptFormat = option(
        "fewshot", "prompt format: raw (mechreward's Q:/A: CoT), fewshot, chat"
    )
    shots: int = option(2, "few-shot demos for prompt_format=fewshot")
    max_new_tokens: int = option(128, "max tokens to generate per item")
    batch_size: int = option(16, "generation batch size")
    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(0.9, "sampling temperature (with --sample)")
    top_p: float = option(0.95, "nucleus sampling top-p (with --sample)")
    fast_decode: bool = option(
        False,
        "decode with saereward's own loop (preallocated KV cache, finished rows leave the batch) for "
        "Llama/Qwen2 models; greedy tokens match generate() up to float rounding; others use generate()",
    )
    out: str | None = option(None, "output folder for items.jsonl, summary.json and config.json")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.sample:
            check_sampling(self.temperature, self.top_p)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")


@dataclass
class EvalResult:
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def _load_task(cfg: EvalConfig):  # noqa: ANN202

    return load_task(
        cfg.task, n=cfg.n, seed=cfg.seed, source=cfg.task_source, path=cfg.task_path, **cfg.task_params
    )


def run_eval(cfg: EvalConfig, lm: LoadedModel | Callable[[], LoadedModel] | None = None) -> EvalResult:
    """Evaluate ``cfg.model`` on ``cfg.task``; write artifacts to ``cfg.out`` if set.

    ``lm``: the loaded model, or a loader called once the task has loaded (None: load ``cfg.model``).
    """
    task = _load_task(cfg)  # validate the task before paying for the model
    items = list(task.items())
    if callable(lm):
        lm = lm()
    if lm is None:
        lm = load_model(
            cfg.model, dtype=cfg.dtype, threads=cfg.threads, adapter=cfg.adapter, device=cfg.device
        )
    if cfg.prompt_format == "chat" and not getattr(lm.tokenizer, "chat_template", None):
        raise SaeRewardError(f"model {cfg.model} has no chat template: use --prompt-format raw or fewshot")
    prompts = [
        format_prompt(task, it, cfg.prompt_format, tokenizer=lm.tokenizer, shots=cfg.shots) for it in items
    ]
    sampling = _sampling(cfg)
    rows: list[dict[str, Any]] = [{} for _ in items]
    t0 = time.perf_counter()
    n_tokens, gen_seconds = 0, 0.0
    desc = f"{task.name}/{cfg.prompt_format}"
    for idx, g in iter_generate(
        lm,
        prompts,
        sampling,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=cfg.progress,
        desc=desc,
        fast_decode=cfg.fast_decode,
    ):
        gen_seconds += g.seconds
        for j, i in enumerate(idx):
            item, completion = items[i], g.completions[j]
            ntok = int(g.response_mask[j].sum())
            n_tokens += ntok
            rows[i] = _item_record(task, item, prompts[i], completion, ntok)
    wall = time.perf_counter() - t0
    summary = _summary(cfg, task, rows, n_tokens, gen_seconds, wall)
    if cfg.out:
        out = Path(cfg.out)
        write_jsonl(out / "items.jsonl", rows)
        write_json(out / "config.json", to_dict(cfg))
        write_json(
            out / "summary.json", {**summary, "config": to_dict(cfg), "adapter_sha256": _adapter_sha(cfg)}
        )
    return EvalResult(summary=summary, rows=rows)


def _adapter_sha(cfg: EvalConfig) -> str | None:
    """sha256 of the adapter's weights (``None`` without one): a cached evaluation of an adapter path
    is reused only for the same weights (a run trained again in the same folder is evaluated again)."""
    return file_sha256(adapter_dir(cfg.adapter) / "adapter.safetensors") if cfg.adapter else None


def _sampling(cfg: EvalConfig) -> SamplingConfig:
    """The decoding settings of ``cfg``, with the stop strings of its prompt format."""
    return SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.sample,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=stop_strings_for(cfg.prompt_format),
    )


def _item_record(task: Task, item: TaskItem, prompt: str, completion: str, new_tokens: int) -> dict[str, Any]:
    """The ``items.jsonl`` record of one item: its completion, extracted answer and verdict."""
    return {
        "id": item.id,
        "prompt": prompt,
        "completion": completion,
        "extracted": task.extract(item, completion),
        "gold": item.gold,
        "correct": bool(task.verify(item, completion)),
        "new_tokens": new_tokens,
    }


def _summary(
    cfg: EvalConfig, task: Task, rows: list[dict[str, Any]], n_tokens: int, gen_seconds: float, wall: float
) -> dict[str, Any]:
    """``summary.json`` without the config: accuracy with its Wilson CI, throughput and the setup."""
    import torch

    k = sum(r["correct"] for r in rows)
    ci = wilson_ci(k, len(rows))
    return {
        "task": task.name,
        "model": cfg.model,
        "prompt_format": cfg.prompt_format,
        "n": len(rows),
        "correct": k,
        "accuracy": ci.p,
        "ci_low": ci.low,
        "ci_high": ci.high,
        "confidence": ci.confidence,
        "seed": cfg.seed,
        "decoding": "sample" if cfg.sample else "greedy",
        "tokens_generated": n_tokens,
        "gen_seconds": round(gen_seconds, 3),
        "tokens_per_s": round(n_tokens / gen_seconds, 2) if gen_seconds > 0 else None,
        "wall_seconds": round(wall, 3),
        "dtype": cfg.dtype,
        "threads": torch.get_num_threads(),
        "task_config": task.describe(),
        "saereward_version": __version__,
    }


def base_and_trained(adapter: str | None) -> list[tuple[str, str | None]]:
    """``[("base", None)]``, plus ``("trained", adapter)`` when an adapter is given: the policies compared."""
    return [("base", None)] + ([("trained", adapter)] if adapter else [])


def run_eval_cached(
    cfg: EvalConfig, lm: LoadedModel | Callable[[], LoadedModel] | None = None
) -> list[dict[str, Any]]:
    """Rows of a finished evaluation in ``cfg.out`` made with the same settings, else :func:`run_eval`'s.

    ``lm`` may be a loader: called only when the evaluation has to run (a reused one loads nothing).

    ``summary.json`` is written last, so its presence marks a finished run; ``progress`` is ignored
    in the comparison (it does not change results). Lets multi-evaluation stages resume after a kill.
    """
    import json

    if cfg.out:
        folder = Path(cfg.out)
        if (folder / "summary.json").is_file() and (folder / "items.jsonl").is_file():
            saved = json.loads((folder / "config.json").read_text())
            mine = as_json(to_dict(cfg))
            for key in ("progress", "device"):  # where it ran does not change what was asked
                saved.pop(key, None)
                mine.pop(key, None)
            defaults = to_dict(EvalConfig())
            for k in mine.keys() - saved.keys():  # an option added since: the run used its default
                saved[k] = defaults.get(k)
            recorded = json.loads((folder / "summary.json").read_text()).get("adapter_sha256")
            same_adapter = recorded is None or recorded == _adapter_sha(cfg)  # older runs: by path
            for key in ("out", "adapter") if recorded is not None else ("out",):  # a moved run folder
                saved.pop(key, None)
                mine.pop(key, None)
            if saved == mine and same_adapter:
                log.info("reusing the finished evaluation in %s", folder)
                return read_jsonl(folder / "items.jsonl")
    return run_eval(cfg, lm=lm).rows


# --------------------------------------------------------------------------------------------------
# Baseline table (the README's first command, until the full pipeline replaces it)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineConfig(DeviceOptions, ModelOptions):
    """Settings of ``saereward baseline``: the embedded model's baseline accuracy table."""

    n: int = option(200, "chain_sum items per prompt format")
    formats: tuple[str, ...] = option(("raw", "fewshot"), "chain_sum prompt formats (comma-separated)")
    gsm8k: bool = option(True, "also evaluate the 100 real GSM8K test items (offline copy)")
    gsm8k_format: PromptFormat = option("fewshot", "prompt format for GSM8K")
    seed: int = option(0, "seed")
    batch_size: int = option(16, "generation batch size")
    out: str = option("runs/baseline", "output folder (one sub-folder per evaluation)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        check_device(self.device)
        bad = [f for f in self.formats if f not in ("raw", "fewshot", "chat")]
        if bad:
            raise ValueError(f"unknown prompt format {bad[0]!r}: use raw, fewshot or chat")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# Generation budgets: mechreward's raw prompt asks for step-by-step reasoning, so it needs room.
_MAX_NEW = {"raw": 128, "fewshot": 48, "chat": 128}


def baseline_configs(cfg: BaselineConfig) -> list[EvalConfig]:
    base = EvalConfig(
        model=cfg.model,
        dtype=cfg.dtype,
        threads=cfg.threads,
        device=cfg.device,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
    )
    runs = [
        replace(base, task="chain_sum", n=cfg.n, prompt_format=fmt, max_new_tokens=_MAX_NEW[fmt])  # type: ignore[arg-type]
        for fmt in cfg.formats
    ]
    if cfg.gsm8k:
        runs.append(
            replace(
                base,
                task="gsm8k",
                task_source="offline",
                n=None,
                prompt_format=cfg.gsm8k_format,
                max_new_tokens=256,
            )
        )
    return [replace(r, out=str(Path(cfg.out) / f"{r.task}-{r.prompt_format}")) for r in runs]


def run_baseline(cfg: BaselineConfig) -> list[dict[str, Any]]:
    lm = load_model(cfg.model, dtype=cfg.dtype, threads=cfg.threads, device=cfg.device)
    summaries = [run_eval(ec, lm=lm).summary for ec in baseline_configs(cfg)]
    write_json(Path(cfg.out) / "baseline.json", {"config": to_dict(cfg), "results": summaries})
    return summaries


def format_table(summaries: list[dict[str, Any]], title: str = "accuracy (Wilson 95% CI)") -> str:
    """A plain-text table of eval summaries (also used in README/BENCHMARKS)."""
    head = f"{'task':<10} {'prompt':<8} {'n':>5} {'correct':>8} {'accuracy':>9}  {'95% CI':<15} {'tok/s':>7}"
    lines = [title, head, "-" * len(head)]
    for s in summaries:
        lines.append(
            f"{s['task']:<10} {s['prompt_format']:<8} {s['n']:>5} {s['correct']:>8} {s['accuracy']:>9.3f}  "
            f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]  {s['tokens_per_s'] or 0:>7.0f}"
        )
    return "\n".join(lines)
