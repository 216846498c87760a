"""Labelled rollouts: responses per question, verified, with residuals captured during generation.

``saereward rollouts`` generates ``samples`` responses per question (greedy, sampled, or one greedy
plus ``samples - 1`` sampled), verifies each with the task's verifier, and stores in ``out/``:

* ``rollouts.jsonl``: one row per response: ``rid`` (row index), ``qid``, ``split``, ``sample``,
  ``decoding``, ``prompt``, ``completion``, ``extracted``, ``gold``, ``correct``, ``n_tokens``;
* ``pooled.safetensors``: ``layer_{L}`` ``[R, d]`` float32, the mean residual over each response's
  pooled positions (see below), for every captured layer;
* ``tokens.safetensors``: ``layer_{L}`` ``[N, d]`` per-token residuals for ``token_layers``, rows of
  response ``r`` at ``offsets[r]:offsets[r + 1]``, plus ``token_ids [N]`` and ``offsets [R + 1]``;
* ``splits.json`` (question ids of the discovery and validation splits), ``summary.json`` (accuracy
  per split with Wilson CIs, counts of correct and wrong), ``config.json`` (the resolved config).

**Pooled positions.** A response's positions are those of its generated tokens that the model read
back, i.e. :attr:`saereward.model.generate.Generation.residual_mask`: every generated token up to and
including the end token, except a token sampled at the very last step (generation never feeds it
back). This is the one definition used by discovery, the G1 score and the RL reward
(:mod:`saereward.features.scoring`).

**Splits** are by question: a question's responses are all in discovery or all in validation, so no
statistic is ever validated on a question it was discovered on. The split is a seeded shuffle of the
distinct question texts (task generators repeat a question under a new id; both copies go to the
same side), recorded in ``splits.json`` as question ids.

Residuals come from :class:`saereward.model.capture.ResidualCapture` hooks during ``generate()``: no
second forward pass.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from saereward import __version__
from saereward.config import check_sampling, option, refuse_other_settings, to_dict
from saereward.errors import SaeRewardError
from saereward.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from saereward.model.generate import SamplingConfig, iter_generate, stop_strings_for
from saereward.model.lm import LoadedModel, check_device, load_model, model_dims, resolve_layer
from saereward.options import DeviceOptions, ModelOptions, TaskOptions
from saereward.stats import wilson_ci
from saereward.tasks import format_prompt, load_task
from saereward.tasks.prompts import PromptFormat

log = logging.getLogger(__name__)

Decoding = Literal["greedy", "sample", "greedy+sample"]
SPLITS = ("discovery", "validation")


@dataclass(frozen=True)
class RolloutsConfig(TaskOptions, DeviceOptions, ModelOptions):
    """Settings of ``saereward rollouts``."""

    adapter: str | None = option(None, "LoRA adapter to merge in: a `saereward train-rl` run folder")
    n: int = option(300, "number of questions")
    seed: int = option(0, "seed for the task items, sampling and the split")
    prompt_format: PromptFormat = option(
        "fewshot", "prompt format: raw (mechreward's Q:/A: CoT), fewshot, chat"
    )
    shots: int = option(2, "few-shot demos for prompt_format=fewshot")
    decoding: Decoding = option(
        "sample", "greedy (1 response per question), sample, or greedy+sample (1 greedy + samples-1)"
    )
    samples: int = option(2, "responses per question (sample, greedy+sample)")
    temperature: float = option(0.9, "sampling temperature")
    top_p: float = option(0.95, "nucleus sampling top-p")
    max_new_tokens: int = option(96, "max tokens per response")
    batch_size: int = option(16, "questions per generation batch")
    layers: tuple[int, ...] | None = option(
        None, "layers whose pooled response residuals are stored (None: every layer)"
    )
    token_layers: tuple[int, ...] = option(
        (15,), "layers whose per-token response residuals are kept (the SAE layer, for discovery)"
    )
    validation_fraction: float = option(0.5, "fraction of questions in the validation split")
    out: str = option("runs/rollouts", "output folder")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.n < 2:
            raise ValueError(f"n must be >= 2 (two splits), got {self.n}")
        if self.samples < 1 or (self.decoding == "greedy+sample" and self.samples < 2):
            raise ValueError(f"samples={self.samples} is too small for decoding={self.decoding}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if "sample" in self.decoding:
            check_sampling(self.temperature, self.top_p)


def split_questions(qids: list[str], validation_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded split of question ids into discovery and validation (each non-empty, sorted)."""
    uniq = sorted(set(qids))
    if len(uniq) < 2:
        raise SaeRewardError(f"need at least 2 distinct questions to split, got {len(uniq)}: raise n")
    order = uniq[:]
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * validation_fraction)), len(order) - 1)
    return {"discovery": sorted(order[n_val:]), "validation": sorted(order[:n_val])}


def _decoding_plan(cfg: RolloutsConfig) -> list[str]:
    if cfg.decoding == "greedy":
        return ["greedy"]
    if cfg.decoding == "sample":
        return ["sample"] * cfg.samples
    return ["greedy"] + ["sample"] * (cfg.samples - 1)


def _row(
    task: Any, item: Any, completion: str, split: str, s: int, mode: str, prompt: str, n_tok: int
) -> dict[str, Any]:
    """One response's record in ``rollouts.jsonl`` (``rid`` is added once all passes are in)."""
    return {
        "qid": item.id,
        "split": split,
        "sample": s,
        "decoding": mode,
        "prompt": prompt,
        "completion": completion,
        "extracted": task.extract(item, completion),
        "gold": item.gold,
        "correct": bool(task.verify(item, completion)),
        "n_tokens": n_tok,
    }


def _generate_pass(
    cfg: RolloutsConfig,
    lm: LoadedModel,
    task: Any,
    prompts: list[str],
    split_of: dict[str, str],
    s: int,
    mode: str,
    layers: list[int],
    token_layers: list[int],
) -> list[tuple[dict[str, Any], dict[int, Any], dict[int, Any], Any]]:
    """Decoding pass ``s``: ``(row, pooled mean per layer, per-token residuals, token ids)`` per question, in question order."""
    import torch

    items = list(task.items())
    capture = sorted(set(layers) | set(token_layers))
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=mode == "sample",
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=stop_strings_for(cfg.prompt_format),
    )
    # every pass has its own seed stream, so sample s differs from sample s' for a question
    batches = iter_generate(
        lm,
        prompts,
        sampling,
        batch_size=cfg.batch_size,
        seed=cfg.seed * 1000 + s,
        capture_layers=capture,
        progress=cfg.progress,
        desc=f"rollouts {s + 1}/{cfg.samples if cfg.decoding != 'greedy' else 1}",
    )
    pass_rows: list[tuple[int, dict[str, Any], dict[int, Any], dict[int, Any], Any]] = []
    for idx, g in batches:
        mask = g.residual_mask.cpu()  # results are kept on the CPU, wherever the model runs
        residuals = {x: g.residuals[x].cpu() for x in capture}
        sequences = g.sequences.cpu()
        for j, i in enumerate(idx):
            item, m = items[i], mask[j]
            n_tok = int(m.sum())
            row = _row(task, item, g.completions[j], split_of[item.id], s, mode, prompts[i], n_tok)
            tok = {x: residuals[x][j][m].float() for x in capture}
            mean = {x: (tok[x].mean(0) if n_tok else torch.zeros(lm.d_model)) for x in layers}
            pass_rows.append((i, row, mean, {x: tok[x] for x in token_layers}, sequences[j][m]))
    return [r[1:] for r in sorted(pass_rows, key=lambda r: r[0])]


def _write_tensors(
    out: Path,
    cfg: RolloutsConfig,
    pooled: dict[int, list[Any]],
    per_token: dict[int, list[Any]],
    token_ids: list[Any],
) -> None:
    """``pooled.safetensors`` and ``tokens.safetensors`` (with ``token_ids`` and ``offsets``), atomically."""
    import torch
    from safetensors.torch import save_file

    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    meta = {"format": "saereward.rollouts", "format_version": "1", "model": cfg.model}
    with atomic_path(out / "pooled.safetensors") as tmp:
        save_file(
            {f"layer_{x}": torch.stack(v).contiguous() for x, v in pooled.items()}, str(tmp), metadata=meta
        )
    tensors = {f"layer_{x}": torch.cat(v).contiguous() for x, v in per_token.items()}
    tensors["token_ids"] = torch.cat(token_ids).long()
    tensors["offsets"] = offsets
    with atomic_path(out / "tokens.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def run_rollouts(cfg: RolloutsConfig, lm: LoadedModel | None = None, *, replace: bool = False) -> Path:
    """Generate, verify, capture and write the rollout folder; return its path. A folder that holds
    rollouts made with other settings is refused before any work, unless ``replace``."""
    import torch

    if not replace:
        refuse_other_settings(
            Path(cfg.out), cfg, ("progress", "out", "threads"), cache=".", holds="rollouts", stage="rollouts"
        )

    task = load_task(
        cfg.task, n=cfg.n, seed=cfg.seed, source=cfg.task_source, path=cfg.task_path, **cfg.task_params
    )
    items = list(task.items())
    if lm is None:
        lm = load_model(
            cfg.model, dtype=cfg.dtype, threads=cfg.threads, adapter=cfg.adapter, device=cfg.device
        )
    if cfg.prompt_format == "chat" and not getattr(lm.tokenizer, "chat_template", None):
        raise SaeRewardError(f"model {cfg.model} has no chat template: use --prompt-format raw or fewshot")
    layers = (
        list(range(lm.num_layers))
        if cfg.layers is None
        else sorted({resolve_layer(lm.model, x) for x in cfg.layers})
    )
    token_layers = sorted({resolve_layer(lm.model, x) for x in cfg.token_layers})
    # split by question *text*: generators repeat questions under new ids, and a repeat must not
    # land on the other side of the split
    by_text = split_questions([it.question for it in items], cfg.validation_fraction, cfg.seed)
    side = {q: s for s, qs in by_text.items() for q in qs}
    split_of = {it.id: side[it.question] for it in items}
    splits = {s: sorted(i for i, v in split_of.items() if v == s) for s in SPLITS}
    prompts = [
        format_prompt(task, it, cfg.prompt_format, tokenizer=lm.tokenizer, shots=cfg.shots) for it in items
    ]

    rows: list[dict[str, Any]] = []
    pooled: dict[int, list[torch.Tensor]] = {x: [] for x in layers}
    per_token: dict[int, list[torch.Tensor]] = {x: [] for x in token_layers}
    token_ids: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for s, mode in enumerate(_decoding_plan(cfg)):
        for row, mean, tok, ids in _generate_pass(
            cfg, lm, task, prompts, split_of, s, mode, layers, token_layers
        ):
            rows.append(row)
            for x in layers:
                pooled[x].append(mean[x])
            for x in token_layers:
                per_token[x].append(tok[x])
            token_ids.append(ids)
    wall = time.perf_counter() - t0
    for r, row in enumerate(rows):
        row["rid"] = r

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_tensors(out, cfg, pooled, per_token, token_ids)
    write_jsonl(out / "rollouts.jsonl", rows)
    write_json(
        out / "splits.json", {"seed": cfg.seed, "validation_fraction": cfg.validation_fraction, **splits}
    )
    summary = summarize(rows)
    summary.update(
        {
            "model": cfg.model,
            "task": task.describe(),
            "layers": layers,
            "token_layers": token_layers,
            "num_layers": lm.num_layers,
            "d_model": lm.d_model,
            "seed": cfg.seed,
            "wall_seconds": round(wall, 2),
            "threads": torch.get_num_threads(),
            "saereward_version": __version__,
        }
    )
    write_json(out / "summary.json", summary)
    write_json(out / "config.json", to_dict(cfg))
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per split: responses, questions, correct, wrong and accuracy with a Wilson 95 % CI."""
    res: dict[str, Any] = {}
    for split in (*SPLITS, "all"):
        sel = [r for r in rows if split == "all" or r["split"] == split]
        k = sum(r["correct"] for r in sel)
        ci = wilson_ci(k, len(sel))
        res[split] = {
            "responses": len(sel),
            "questions": len({r["qid"] for r in sel}),
            "correct": k,
            "wrong": len(sel) - k,
            "accuracy": ci.p if sel else None,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "confidence": ci.confidence,
        }
    return res


@dataclass
class Rollouts:
    """A rollout folder in memory. ``pooled[L]`` is ``[R, d]``; ``tokens[L]`` is ``[N, d]``."""

    path: Path
    rows: list[dict[str, Any]]
    pooled: dict[int, Any]
    tokens: dict[int, Any]
    token_ids: Any
    offsets: Any
    summary: dict[str, Any]

    @property
    def generation(self) -> dict[str, Any]:
        """How the responses were made: ``prompt_format``, ``shots``, ``task``, ``temperature``,
        ``top_p``, ``max_new_tokens``, ``decoding`` (from the folder's ``config.json``; {} if absent)."""
        from saereward.io import read_json

        f = self.path / "config.json"
        cfg = read_json(f, expect=dict) if f.is_file() else {}
        keys = ("prompt_format", "shots", "task", "temperature", "top_p", "max_new_tokens", "decoding")
        return {k: cfg[k] for k in keys if k in cfg}

    @property
    def correct(self) -> Any:
        import torch

        return torch.tensor([bool(r["correct"]) for r in self.rows])

    @property
    def questions(self) -> list[Any]:
        """Each response's question, the unit of a clustered bootstrap: its prompt text where recorded
        (task generators repeat a question under a new id), else its ``qid``."""
        return [r.get("prompt", r["qid"]) for r in self.rows]

    def split_mask(self, split: str) -> Any:
        import torch

        if split not in SPLITS:
            raise SaeRewardError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return torch.tensor([r["split"] == split for r in self.rows])

    def layer_tokens(self, layer: int, what: str = "layer") -> Any:
        """Per-token residuals ``[N, d]`` at ``layer``, or one error saying why there are none: a layer
        the model does not have, or one the rollouts did not keep. ``what`` names where ``layer`` came
        from (e.g. "the SAE's layer")."""
        if layer in self.tokens:
            return self.tokens[layer]
        n = self.summary.get("num_layers")
        if not isinstance(n, int) and isinstance(self.summary.get("model"), str):  # an older summary
            n = (model_dims(self.summary["model"]) or (None, None))[0]
        if isinstance(n, int) and not 0 <= layer < n:
            raise SaeRewardError(
                f"{what} {layer} is out of range: the model of the rollouts at {self.path} has {n} layers "
                f"(0-{n - 1}); pass a layer in that range"
            )
        raise SaeRewardError(
            f"the rollouts at {self.path} kept per-token residuals for layers {sorted(self.tokens)}, not "
            f"{what} {layer}: re-run `saereward rollouts --token-layers {layer}`"
        )

    def response_tokens(self, layer: int, r: int) -> Any:
        """Per-token residuals ``[T_r, d]`` of response ``r`` at ``layer``."""
        return self.layer_tokens(layer)[int(self.offsets[r]) : int(self.offsets[r + 1])]


def load_rollouts(path: str | Path) -> Rollouts:
    """Read a folder written by :func:`run_rollouts`, checking that its parts agree."""

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    need = ("rollouts.jsonl", "pooled.safetensors", "tokens.safetensors", "summary.json")
    missing = [f for f in need if not (p / f).is_file()]
    if missing:
        raise SaeRewardError(
            f"{p} is not a rollout folder (missing {', '.join(missing)}): run `saereward rollouts --out {p}` first"
        )
    rows = read_jsonl(p / "rollouts.jsonl")
    keys = ("qid", "split", "correct")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in keys):
            raise SaeRewardError(
                f"{p / 'rollouts.jsonl'}: response {i + 1} lacks {', '.join(keys)}: not a rollout saereward "
                "wrote (or edited); re-run `saereward rollouts`"
            )
    try:
        pooled_t = load_file(str(p / "pooled.safetensors"))
        tok_t = load_file(str(p / "tokens.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise SaeRewardError(f"cannot read the tensors in {p}: {exc}; re-run `saereward rollouts`") from None
    pooled, tokens = _layer_tensors(pooled_t, p), _layer_tensors(tok_t, p)
    offsets, token_ids = tok_t.get("offsets"), tok_t.get("token_ids")
    bad = [L for L, v in pooled.items() if v.shape[0] != len(rows)]
    if offsets is None or offsets.shape[0] != len(rows) + 1 or bad:
        raise SaeRewardError(
            f"{p}: rollouts.jsonl and the tensor files disagree on the number of responses; re-run"
        )
    n = int(offsets[-1]) if len(offsets) else 0
    steps_ok = bool((offsets[1:] >= offsets[:-1]).all()) and (not len(offsets) or int(offsets[0]) == 0)
    sizes = {v.shape[0] for v in tokens.values()} | ({token_ids.shape[0]} if token_ids is not None else set())
    if token_ids is None or not steps_ok or sizes != {n}:
        raise SaeRewardError(
            f"{p}/tokens.safetensors: its offsets, token ids and per-token residuals disagree (truncated or "
            "edited); re-run `saereward rollouts`"
        )
    summary = read_json(p / "summary.json", expect=dict)
    if not isinstance(summary.get("d_model"), int):
        raise SaeRewardError(
            f"{p / 'summary.json'} records no d_model: not the summary `saereward rollouts` writes (another "
            "command's output over it?); re-run `saereward rollouts`"
        )
    return Rollouts(p, rows, pooled, tokens, token_ids, offsets, summary)


def _layer_tensors(tensors: dict[str, Any], folder: Path) -> dict[int, Any]:
    """``{layer: tensor}`` of a rollout tensor file's ``layer_{L}`` entries."""
    out = {}
    for k, v in tensors.items():
        if k.startswith("layer_"):
            if not k[6:].isdigit():
                raise SaeRewardError(
                    f"{folder}: tensor {k!r} is not layer_<number>; re-run `saereward rollouts`"
                )
            out[int(k[6:])] = v
    return out
