"""Activation collection (``saereward collect``) into on-disk shards; :mod:`saereward.data.store` reads them.

**Sources.** Residuals come from up to two kinds of source, collected in this order until ``max_tokens``:

* *task*: the task's prompts (formatted like ``saereward eval``) and the model's own generations. The
  residuals are captured *during* ``generate()`` (:func:`saereward.model.generate.iter_generate` with
  ``capture_layers``), so there is no second forward. Kept positions: the real prompt tokens and the
  response tokens that have a residual (:attr:`~saereward.model.generate.Generation.residual_mask`); left pads,
  tokens after the end token and the last sampled token (never fed through the model) are not kept.
  With ``dedupe_prompt_prefix`` the token prefix that *every* prompt shares (few-shot demos, a chat
  template's system prompt) is kept for item 0 only, not once per item: otherwise it would be the most
  repeated row in the data, with identical activations each time.
* *corpus*: text documents from local ``.txt`` files (one document per blank-line-separated paragraph,
  or per line with ``txt_unit="line"``), ``.jsonl`` files (one document per row, field ``text_field``),
  and/or a Hugging Face ``datasets`` stream (``hf_dataset``; offline this fails at once with a clear
  error). Each document is tokenized without special tokens and cut into chunks of at most
  ``context_len`` tokens; each chunk starts with the tokens the tokenizer itself puts in front of a
  text (its BOS, if it adds one) and is one sequence of a left-padded batch, run through
  :func:`saereward.model.capture.forward_residuals`. Pads are not kept.

All layers of ``layers`` are captured in the same forward (or generation) pass.

**skip_first (default 1).** The first ``skip_first`` real positions of every sequence are dropped. The
first position is an attention sink whether or not it is a BOS token: on SmolLM2-135M its residual norm
at layer 15 is ~23,000 against a median of ~170 for the other positions (measured on three texts, with
and without BOS), so one such row would dominate an SAE's MSE. Use 0 to keep it.

**Shards.** ``out/shard_{i:05d}.safetensors`` holds ``layer_{L}`` ``[n, d]`` for every layer (in
``store_dtype``) plus, per row, ``token_ids`` (int32), ``seq_ids`` (int64: the task item index, or the
document index of a corpus source) and ``positions`` (int32: position in the forwarded sequence, 0 = its
first real token). ``manifest.json`` lists the model, layers, ``d_model``, storage dtype, the sources
with their resolved configs (task config, corpus files with size and sha256), every shard with its row
counts and held-out range, the totals, the saereward version and a ``complete`` flag. ``config.json``
is the resolved :class:`CollectConfig`. Shards and manifest are written atomically, the manifest after
each shard.

**Resume.** The unit of work is one *batch*: ``batch_size`` task items (items sorted by prompt length,
longest first, then cut into batches, as ``iter_generate`` does) or ``batch_size`` corpus chunks. A
shard holds whole units of one source and is closed at the first unit boundary where it reaches
``shard_tokens`` rows (or at the end of a source, or when ``max_tokens`` is reached, the last unit then
being cut short). Units are deterministic (the generation seed of unit ``u`` is derived from ``seed``
and ``u``), so shard ``i`` covers the same items or text whether or not the run was interrupted. The
manifest records each shard's unit range; a re-run with the same config checks every listed shard (file
size, safetensors header, shapes), drops the first damaged one and all after it, and continues from the
end of the last good shard. A different config in a folder that already has shards is refused
(settings that do not change the data, ``progress``/``threads``/``out``, may differ); a folder with no
shard yet is simply started over.

**Held-out split.** Within every shard the rows from a *sequence boundary* near ``(1 -
held_out_fraction)`` of the shard to its end are held out (``heldout_start`` in the manifest): whole task
items or whole documents, so the ``train`` split never sees a token of a held-out item. A document that
straddles two shards can have its head held out in one shard and its tail in the next shard's train
rows. A shard with a single sequence has no held-out rows.

The reader of these folders is :class:`saereward.data.store.ActivationStore`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from saereward import __version__
from saereward.config import option, to_dict
from saereward.data.store import FORMAT, FORMAT_VERSION, MANIFEST, STORE_DTYPES, StoreDType, check_shard
from saereward.errors import SaeRewardError
from saereward.hub import hub_offline, hub_reachable
from saereward.io import as_json, atomic_path, file_sha256, iter_jsonl, write_json
from saereward.lock import folder_lock
from saereward.model.capture import forward_residuals
from saereward.model.generate import SamplingConfig, iter_generate, stop_strings_for
from saereward.model.lm import LoadedModel, check_device, load_model, resolve_layer
from saereward.options import DeviceOptions, ModelOptions, TaskOptions
from saereward.tasks import format_prompt, load_task
from saereward.tasks.prompts import PromptFormat

log = logging.getLogger(__name__)

TxtUnit = Literal["paragraph", "line"]

CONFIG = "config.json"
# Settings that do not change what is collected: a re-run may differ in these.
_NOT_CONTENT = ("progress", "threads", "out", "device")


@dataclass(frozen=True)
class CollectConfig(TaskOptions, DeviceOptions, ModelOptions):
    """Settings of ``saereward collect``: residual activations of a model, written as shards."""

    layers: tuple[int, ...] = option(
        (15,), "decoder layers to capture, all in one pass (layer L = output of block L)"
    )
    # -- task source: prompts + the model's own generations (as in `saereward eval`) --
    # collect alone may have no task (text corpora only): a wider type than the group's
    task: str | None = option(  # type: ignore[assignment]
        "chain_sum", "task whose prompts and generations are collected (none = no task source)"
    )
    n: int | None = option(200, "number of task items (None = all the task has)")
    prompt_format: PromptFormat = option(
        "fewshot", "prompt format: raw (mechreward's Q:/A: CoT), fewshot, chat"
    )
    shots: int = option(2, "few-shot demos for prompt_format=fewshot")
    max_new_tokens: int = option(128, "max tokens to generate per item")
    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(0.9, "sampling temperature (with --sample)")
    top_p: float = option(0.95, "nucleus sampling top-p (with --sample)")
    dedupe_prompt_prefix: bool = option(
        True, "keep the token prefix shared by all prompts (few-shot demos, system prompt) for one item only"
    )
    # -- corpus source --
    text_paths: tuple[str, ...] = option(
        (), "local text files: .txt (see txt_unit) or .jsonl (field text_field)"
    )
    txt_unit: TxtUnit = option("paragraph", "a .txt document is a blank-line-separated paragraph, or a line")
    text_field: str = option(
        "text",
        "field holding the text in .jsonl rows and hf_dataset rows; a comma list (document,passage) "
        "takes the first field each row has",
    )
    dedupe_documents: bool = option(
        True, "skip a document whose exact text was already seen (QA sets repeat one passage per question)"
    )
    hf_dataset: str | None = option(
        None, "Hugging Face datasets name to stream (needs the hub; offline fails)"
    )
    hf_config: str | None = option(None, "config name of hf_dataset")
    hf_split: str = option("train", "split of hf_dataset")
    context_len: int = option(256, "corpus chunk length in tokens (BOS included)")
    # -- collection --
    max_tokens: int | None = option(None, "stop after this many kept tokens (None = exhaust every source)")
    batch_size: int = option(16, "sequences per forward/generation batch (also the unit of resume)")
    skip_first: int = option(1, "drop the first N real positions of every sequence (attention sink)")
    store_dtype: StoreDType = option("fp32", "dtype of the stored activations")
    shard_tokens: int = option(65536, "tokens per shard (shards hold whole batches, so slightly more)")
    held_out_fraction: float = option(0.05, "fraction of each shard's tokens held out, whole sequences")
    seed: int = option(0, "seed for task generation and sampling")
    out: str = option("runs/activations", "output folder for shards, manifest.json and config.json")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_device(self.device)
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers has duplicates: {list(self.layers)}")
        if not (self.task or self.text_paths or self.hf_dataset):
            raise ValueError("no source: set task, text_paths or hf_dataset")
        for name in ("batch_size", "shard_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.skip_first < 0:
            raise ValueError(f"skip_first must be >= 0, got {self.skip_first}")
        if self.context_len < self.skip_first + 2:
            raise ValueError(f"context_len must be >= skip_first + 2, got {self.context_len}")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        bad = [p for p in self.text_paths if Path(p).suffix.lower() not in (".txt", ".jsonl")]
        if bad:
            raise ValueError(f"text_paths entry {bad[0]!r} is neither .txt nor .jsonl")


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def heldout_start(seq_ids: torch.Tensor, fraction: float) -> int:
    """First held-out row of a shard whose rows belong to sequences ``seq_ids [n]`` (contiguous runs).

    The sequence start (or ``n``) nearest to ``n * (1 - fraction)``; ties go to the later one, so a
    shard never holds out more than the rule asks for when two boundaries are equally near.
    """
    n = int(seq_ids.shape[0])
    if fraction <= 0 or n == 0:
        return n
    target = n * (1.0 - fraction)
    changes = (torch.nonzero(seq_ids[1:] != seq_ids[:-1]).flatten() + 1).tolist()
    starts = [0, *changes, n]
    return int(min(starts, key=lambda s: (abs(s - target), -s)))


def chunk_document(ids: Sequence[int], context_len: int, prefix: Sequence[int] = ()) -> list[list[int]]:
    """Cut one document's token ids into sequences ``prefix + body`` of at most ``context_len`` tokens."""
    body = context_len - len(prefix)
    if body < 1:
        raise ValueError(f"context_len {context_len} leaves no room after the {len(prefix)} prefix tokens")
    return [[*prefix, *ids[i : i + body]] for i in range(0, len(ids), body)]


def text_fields(text_field: str) -> list[str]:
    """The candidate field names of a ``text_field`` setting (comma-separated, first present wins)."""
    fields = [f.strip() for f in text_field.split(",") if f.strip()]
    if not fields:
        raise SaeRewardError(f"text_field {text_field!r} names no field: set it, e.g. text_field=text")
    return fields


def _row_text(row: Any, fields: Sequence[str]) -> str | None:
    if isinstance(row, dict):
        for f in fields:
            if isinstance(row.get(f), str):
                return row[f]
    return None


def _row_texts(rows: Iterable[tuple[str, Any]], text_field: str) -> Iterator[str]:
    """Non-empty texts of ``(location, row)`` pairs; a row without a text field is a one-line error."""
    fields = text_fields(text_field)
    for where, row in rows:
        text = _row_text(row, fields)
        if text is None:
            raise SaeRewardError(
                f"{where}: expected a JSON object with a string field {' or '.join(map(repr, fields))}; "
                "fix that row or set text_field"
            )
        if text.strip():
            yield text


def iter_text_documents(
    path: str | Path, txt_unit: TxtUnit = "paragraph", text_field: str = "text"
) -> Iterator[str]:
    """Documents of one ``.txt`` or ``.jsonl`` file, read lazily; empty documents are skipped."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        yield from _row_texts(((f"{p}:{lineno}", row) for lineno, row in iter_jsonl(p)), text_field)
        return
    try:
        yield from _txt_documents(p, txt_unit)
    except UnicodeDecodeError:
        raise SaeRewardError(f"{p}: not UTF-8 text; pass a UTF-8 .txt or .jsonl file") from None


def _txt_documents(p: Path, txt_unit: TxtUnit) -> Iterator[str]:
    """The lines (``txt_unit = "line"``) or blank-line-separated paragraphs of a text file."""
    with p.open(encoding="utf-8") as fh:
        if txt_unit == "line":
            for line in fh:
                if line.strip():
                    yield line.rstrip("\r\n")
            return
        para: list[str] = []
        for line in fh:
            if line.strip():
                para.append(line.rstrip("\r\n"))
            elif para:
                yield "\n".join(para)
                para = []
        if para:
            yield "\n".join(para)


def _text_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (its BOS, or nothing)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


# --------------------------------------------------------------------------------------------------
# Rows of one unit
# --------------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Kept positions of one unit: activations per layer ``[n, d]`` and per-row metadata ``[n]``."""

    acts: dict[int, torch.Tensor]
    token_ids: torch.Tensor
    seq_ids: torch.Tensor
    positions: torch.Tensor

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @classmethod
    def from_mask(
        cls,
        residuals: dict[int, torch.Tensor],
        ids: torch.Tensor,
        seq: Sequence[int],
        pos: torch.Tensor,
        keep: torch.Tensor,
    ) -> _Rows:
        """Select ``keep [B, T]`` (row-major: sequence by sequence) from ``[B, T, d]`` residuals and ids."""
        seq_t = torch.as_tensor(list(seq), dtype=torch.int64)[:, None].expand_as(keep)
        return cls(
            acts={layer: r[keep] for layer, r in residuals.items()},
            token_ids=ids[keep].to(torch.int32),
            seq_ids=seq_t[keep],
            positions=pos[keep].to(torch.int32),
        )

    def head(self, n: int) -> _Rows:
        return _Rows(
            {k: v[:n] for k, v in self.acts.items()}, self.token_ids[:n], self.seq_ids[:n], self.positions[:n]
        )

    def cast(self, dtype: torch.dtype) -> _Rows:
        return _Rows(
            {k: v.to(dtype) for k, v in self.acts.items()}, self.token_ids, self.seq_ids, self.positions
        )

    @classmethod
    def cat(cls, parts: Sequence[_Rows]) -> _Rows:
        return cls(
            acts={k: torch.cat([p.acts[k] for p in parts]) for k in parts[0].acts},
            token_ids=torch.cat([p.token_ids for p in parts]),
            seq_ids=torch.cat([p.seq_ids for p in parts]),
            positions=torch.cat([p.positions for p in parts]),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"layer_{k}": v.contiguous() for k, v in self.acts.items()}
        out.update(token_ids=self.token_ids, seq_ids=self.seq_ids, positions=self.positions)
        return out


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class _TaskSource:
    """Task prompts and the model's generations; unit ``u`` = the ``u``-th batch of length-sorted items."""

    kind = "task"

    def __init__(self, cfg: CollectConfig) -> None:
        assert cfg.task
        self.cfg = cfg
        self.task = load_task(
            cfg.task, n=cfg.n, seed=cfg.seed, source=cfg.task_source, path=cfg.task_path, **cfg.task_params
        )
        self.items = list(self.task.items())
        self.prompts: list[str] = []
        self.groups: list[list[int]] = []
        self.prefix_len = 0

    def prepare(self, lm: LoadedModel) -> None:
        cfg = self.cfg
        if cfg.prompt_format == "chat" and not getattr(lm.tokenizer, "chat_template", None):
            raise SaeRewardError(
                f"model {cfg.model} has no chat template: use --prompt-format raw or fewshot"
            )
        self.prompts = [
            format_prompt(self.task, it, cfg.prompt_format, tokenizer=lm.tokenizer, shots=cfg.shots)
            for it in self.items
        ]
        ids = lm.tokenizer(self.prompts, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))  # iter_generate's bucketing
        self.groups = [order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
        if cfg.dedupe_prompt_prefix and len(ids) > 1:
            shortest = min(len(x) for x in ids)
            k = 0
            while k < shortest and all(x[k] == ids[0][k] for x in ids):
                k += 1
            self.prefix_len = k

    def sampling(self) -> Any:
        cfg = self.cfg
        return SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop=stop_strings_for(cfg.prompt_format),
        )

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "kind": self.kind,
            "task": self.task.describe(),
            "prompt_format": cfg.prompt_format,
            "shots": cfg.shots,
            "sampling": to_dict(self.sampling()),
            "n_items": len(self.items),
            "n_units": len(self.groups),
            "unit": f"{cfg.batch_size} items, sorted by prompt length (longest first)",
            "shared_prefix_tokens": self.prefix_len,
            "shared_prefix_kept_for_item": 0 if self.prefix_len else None,
        }

    def units(self, lm: LoadedModel, layers: Sequence[int], start: int) -> Iterator[tuple[int, _Rows]]:
        sampling = self.sampling()
        for u in range(start, len(self.groups)):
            group = self.groups[u]
            prompts = [self.prompts[i] for i in group]
            for local, g in iter_generate(
                lm,
                prompts,
                sampling,
                batch_size=len(group),
                seed=self.cfg.seed * 1_000_003 + u,
                capture_layers=layers,
                progress=False,
            ):
                seqs, resp = g.sequences.cpu(), g.response_mask.cpu()
                real = g.attention_mask.cpu().bool()
                pos = real.long().cumsum(1) - 1
                keep = (real & ~resp) | g.residual_mask.cpu()
                keep &= pos >= self.cfg.skip_first
                items = [group[j] for j in local]
                if self.prefix_len:
                    owner = torch.tensor([i == 0 for i in items])[:, None]
                    keep &= owner | (pos >= self.prefix_len)
                residuals = {k: v.cpu() for k, v in g.residuals.items()}
                yield u, _Rows.from_mask(residuals, seqs, items, pos, keep)


class _CorpusSource:
    """Text documents cut into chunks; unit ``u`` = chunks ``u * batch_size ... (u + 1) * batch_size - 1``."""

    kind = "corpus"

    def __init__(self, cfg: CollectConfig) -> None:
        self.cfg = cfg
        self.files: list[dict[str, Any]] = []
        for p in cfg.text_paths:
            path = Path(p).expanduser()
            if not path.is_file():
                raise SaeRewardError(f"text file {p} not found: check text_paths")
            if path.stat().st_size == 0:
                raise SaeRewardError(f"text file {p} is empty: check text_paths")
            # its first document now (a binary file, a malformed first row, a missing text field), before
            # the model loads, rather than after a model load or, in a pipeline, after the rollouts
            if next(iter_text_documents(path, cfg.txt_unit, cfg.text_field), None) is None:
                raise SaeRewardError(f"text file {p} holds no text: check text_paths")
            self.files.append(
                {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
            )
        self.hf: Any = _open_hf_stream(cfg) if cfg.hf_dataset else None
        self.prefix: list[int] = []

    def prepare(self, lm: LoadedModel) -> None:
        self.prefix = _text_prefix(lm.tokenizer)
        if len(self.prefix) >= self.cfg.context_len - self.cfg.skip_first:
            raise SaeRewardError(
                f"context_len {self.cfg.context_len} is too short for the tokenizer's prefix"
            )

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "kind": self.kind,
            "text_files": self.files,
            "txt_unit": cfg.txt_unit,
            "text_field": cfg.text_field,
            "dedupe_documents": cfg.dedupe_documents,
            "hf_dataset": (
                {"name": cfg.hf_dataset, "config": cfg.hf_config, "split": cfg.hf_split}
                if cfg.hf_dataset
                else None
            ),
            "context_len": cfg.context_len,
            "prefix_ids": self.prefix,
            "unit": f"{cfg.batch_size} chunks of at most {cfg.context_len} tokens",
        }

    def _all_documents(self) -> Iterator[str]:
        for f in self.files:
            yield from iter_text_documents(f["path"], self.cfg.txt_unit, self.cfg.text_field)
        if self.hf is not None:
            name = self.cfg.hf_dataset
            yield from _row_texts(
                ((f"hf_dataset {name!r} row {i}", row) for i, row in enumerate(self.hf)), self.cfg.text_field
            )

    def documents(self) -> Iterator[str]:
        """Every document in order; with ``dedupe_documents`` an exact repeat is skipped (deterministic)."""
        seen: set[bytes] = set()
        for text in self._all_documents():
            if self.cfg.dedupe_documents:
                key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if key in seen:
                    continue
                seen.add(key)
            yield text

    def chunks(self, tokenizer: Any) -> Iterator[tuple[int, list[int]]]:
        """``(document index, token ids)`` per chunk; chunks too short to keep a position are skipped."""
        for doc_id, text in enumerate(self.documents()):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for chunk in chunk_document(ids, self.cfg.context_len, self.prefix):
                if len(chunk) > self.cfg.skip_first:
                    yield doc_id, chunk

    def units(self, lm: LoadedModel, layers: Sequence[int], start: int) -> Iterator[tuple[int, _Rows]]:
        bs = self.cfg.batch_size
        pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        device = next(lm.model.parameters()).device
        batch: list[tuple[int, list[int]]] = []
        u = 0
        for item in self.chunks(lm.tokenizer):
            batch.append(item)
            if len(batch) < bs:
                continue
            if u >= start:
                yield u, self._forward(lm, layers, batch, pad_id, device, forward_residuals)
            u, batch = u + 1, []
        if batch and u >= start:
            yield u, self._forward(lm, layers, batch, pad_id, device, forward_residuals)

    def _forward(
        self,
        lm: LoadedModel,
        layers: Sequence[int],
        batch: list[tuple[int, list[int]]],
        pad_id: int,
        device: Any,
        fwd: Any,
    ) -> _Rows:
        width = max(len(c) for _, c in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, chunk) in enumerate(batch):  # left padding, as the tokenizer and generate use
            ids[row, width - len(chunk) :] = torch.tensor(chunk)
            mask[row, width - len(chunk) :] = 1
        residuals = fwd(lm.model, ids.to(device), mask.to(device), layers)
        residuals = {k: v.cpu() for k, v in residuals.items()}
        pos = mask.cumsum(1) - 1
        keep = mask.bool() & (pos >= self.cfg.skip_first)
        return _Rows.from_mask(residuals, ids, [d for d, _ in batch], pos, keep)


def _open_hf_stream(cfg: CollectConfig) -> Any:
    """Open ``cfg.hf_dataset`` as a streaming dataset, failing in seconds when the hub is unreachable."""
    name = cfg.hf_dataset
    fix = "save the text as .txt or .jsonl files and pass them as text_paths instead"
    if hub_offline():
        raise SaeRewardError(
            f"hf_dataset {name!r} is streamed from the Hugging Face hub, but offline mode is set; {fix}"
        )
    ok, endpoint = hub_reachable()
    if not ok:
        raise SaeRewardError(f"cannot reach {endpoint} to stream hf_dataset {name!r}; {fix}")
    try:
        import datasets
    except ImportError:
        raise SaeRewardError(
            f"hf_dataset needs the `datasets` package: pip install datasets, or {fix}"
        ) from None
    try:
        return datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SaeRewardError(
            f"cannot stream hf_dataset {name!r} ({cfg.hf_config or 'default'}, {cfg.hf_split}): "
            f"{type(exc).__name__}: {first[:200]}; {fix}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one shard atomically (a kill leaves either no file or the complete file)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    write_json(out / MANIFEST, manifest)


def _content_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_dict.items() if k not in _NOT_CONTENT}


def _prepare_out(cfg: CollectConfig) -> dict[str, Any] | None:
    """Check ``cfg.out`` against ``cfg``; return the existing manifest to resume from, or ``None``."""
    out = Path(cfg.out)
    if not out.exists():
        return None
    if not out.is_dir():
        raise SaeRewardError(f"out {out} is a file: pass a folder path as out")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries:
        return None
    if not (out / CONFIG).is_file() or not (out / MANIFEST).is_file():
        raise SaeRewardError(
            f"out folder {out} is not empty and holds no activation collection (no {CONFIG}/{MANIFEST}): "
            "pass an empty or new folder as out"
        )
    try:
        stored = json.loads((out / CONFIG).read_text(encoding="utf-8"))
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SaeRewardError(
            f"cannot read {out}/{CONFIG} or {MANIFEST} ({exc}): pass a new folder as out"
        ) from None
    if not (isinstance(stored, dict) and _is_manifest(manifest)):
        raise SaeRewardError(
            f"{out}/{CONFIG} or {MANIFEST} is not what collect writes (edited or corrupt): pass a new folder "
            f"as out, or delete {out} to start over"
        )
    new = _content_config(to_dict(cfg))
    old = _content_config(stored)
    if new != old:
        if not manifest.get("shards"):
            log.info("%s has no shards yet; starting over with the new config", out)
            return None
        diff = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        raise SaeRewardError(
            f"out folder {out} holds activations collected with a different config (differs in: "
            f"{', '.join(diff)}): pass another out folder, or delete {out} to start over"
        )
    return manifest


def _is_manifest(m: Any) -> bool:
    """Whether ``m`` has the shape of a manifest this module writes (checked before a resume reads it)."""
    keys = {"file", "n_tokens", "heldout_start", "source", "unit_start", "unit_end"}
    shards = m.get("shards") if isinstance(m, dict) else None
    return isinstance(shards, list) and all(isinstance(e, dict) and keys <= set(e) for e in shards)


def _new_manifest(
    cfg: CollectConfig, lm: LoadedModel, layers: list[int], sources: list[Any]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saereward_version": __version__,
        "model": cfg.model,
        "model_class": type(lm.model).__name__,
        "model_dtype": cfg.dtype,
        "num_layers": lm.num_layers,
        "layers": layers,
        "d_model": lm.d_model,
        "dtype": cfg.store_dtype,
        "skip_first": cfg.skip_first,
        "held_out": {
            "fraction": cfg.held_out_fraction,
            "rule": "per shard, rows from the sequence start nearest (1 - fraction) of the shard to its end",
        },
        "sources": [s.describe() for s in sources],
        "shards": [],
        "n_tokens": 0,
        "n_train": 0,
        "n_heldout": 0,
        "complete": False,
    }


def _resume_point(out: Path, manifest: dict[str, Any]) -> None:
    """Drop the first damaged shard and everything after it from ``manifest`` (in place)."""
    for i, entry in enumerate(manifest["shards"]):
        problem = check_shard(out / entry["file"], entry, manifest["layers"], manifest["d_model"])
        if problem is not None:
            log.warning(
                "shard %s is %s: collecting it again (and the %d after it)",
                entry["file"],
                problem,
                len(manifest["shards"]) - i - 1,
            )
            del manifest["shards"][i:]
            manifest["complete"] = False
            break
    _recount(manifest)


def _recount(manifest: dict[str, Any]) -> None:
    shards = manifest["shards"]
    manifest["n_tokens"] = sum(s["n_tokens"] for s in shards)
    manifest["n_heldout"] = sum(s["n_tokens"] - s["heldout_start"] for s in shards)
    manifest["n_train"] = manifest["n_tokens"] - manifest["n_heldout"]


def run_collect(cfg: CollectConfig, lm: LoadedModel | None = None) -> Path:
    """Collect activations as described in the module docstring; return the ``out`` folder.

    A finished collection with the same config is left as it is; an interrupted one is resumed. The
    ``out`` folder is locked while it collects.
    """
    with folder_lock(cfg.out, "saereward collect"):
        return _run_collect(cfg, lm)


def _run_collect(cfg: CollectConfig, lm: LoadedModel | None) -> Path:
    out = Path(cfg.out)
    old = _prepare_out(cfg)
    # Sources are checked before the model is loaded: a typo in a path should not cost a model load.
    sources: list[Any] = []
    if cfg.task:
        sources.append(_TaskSource(cfg))
    if cfg.text_paths or cfg.hf_dataset:
        sources.append(_CorpusSource(cfg))
    if lm is None:
        lm = load_model(cfg.model, dtype=cfg.dtype, threads=cfg.threads, device=cfg.device)
    layers = sorted({resolve_layer(lm.model, layer) for layer in cfg.layers})
    for s in sources:
        s.prepare(lm)
    manifest = _new_manifest(cfg, lm, layers, sources)
    if old is not None:
        for key in ("layers", "d_model", "sources", "format_version"):
            if as_json(manifest[key]) != old.get(key):
                raise SaeRewardError(
                    f"out folder {out} was collected from different {key} (e.g. a text file changed since): "
                    f"pass another out folder, or delete {out} to start over"
                )
        manifest = old
        _resume_point(out, manifest)
        if manifest["complete"]:
            log.info(
                "%s is complete (%d tokens in %d shards)", out, manifest["n_tokens"], len(manifest["shards"])
            )
            return out
        log.info(
            "resuming %s after %d shards (%d tokens)", out, len(manifest["shards"]), manifest["n_tokens"]
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard_*.tmp"):  # left by a killed atomic write
        stale.unlink()
    write_json(out / CONFIG, to_dict(cfg))
    _write_manifest(out, manifest)
    _collect(cfg, lm, layers, sources, manifest, out)
    return out


def _collect(
    cfg: CollectConfig,
    lm: LoadedModel,
    layers: list[int],
    sources: list[Any],
    manifest: dict[str, Any],
    out: Path,
) -> None:
    from tqdm.auto import tqdm

    store = STORE_DTYPES[cfg.store_dtype]
    shards: list[dict[str, Any]] = manifest["shards"]
    first_source, first_unit = (shards[-1]["source"], shards[-1]["unit_end"]) if shards else (0, 0)
    budget = None if cfg.max_tokens is None else cfg.max_tokens - manifest["n_tokens"]
    bar = tqdm(
        total=cfg.max_tokens,
        initial=manifest["n_tokens"],
        desc="collect",
        unit="tok",
        unit_scale=True,
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    try:
        for si in range(first_source, len(sources)):
            if budget is not None and budget <= 0:
                break
            pending: list[_Rows] = []
            n_pending, unit_start = 0, first_unit if si == first_source else 0
            unit_end = unit_start
            for u, rows in sources[si].units(lm, layers, unit_start):
                unit_end = u + 1
                if budget is not None and len(rows) > budget:
                    rows = rows.head(budget)
                rows = rows.cast(store)
                _check_finite(rows, len(shards), out, sources[si].kind, u)
                pending.append(rows)
                n_pending += len(rows)
                bar.update(len(rows))
                if budget is not None:
                    budget -= len(rows)
                if n_pending >= cfg.shard_tokens or (budget is not None and budget <= 0):
                    _flush(cfg, pending, si, unit_start, unit_end, manifest, out)
                    bar.set_postfix(shards=len(shards))
                    pending, n_pending, unit_start = [], 0, unit_end
                if budget is not None and budget <= 0:
                    break
            if n_pending:
                _flush(cfg, pending, si, unit_start, unit_end, manifest, out)
                bar.set_postfix(shards=len(shards))
    finally:
        bar.close()
    if manifest["n_tokens"] == 0:
        raise SaeRewardError(
            f"collected no tokens into {out}: the sources hold no text (a chunk needs more than "
            f"skip_first={cfg.skip_first} tokens); check text_paths, hf_dataset and text_field"
        )
    manifest["complete"] = True
    _write_manifest(out, manifest)
    log.info("collected %d tokens in %d shards to %s", manifest["n_tokens"], len(shards), out)


def _check_finite(rows: _Rows, shard: int, out: Path, kind: str, unit: int) -> None:
    for layer, acts in rows.acts.items():
        bad = ~torch.isfinite(acts)
        if bad.any():
            n_bad = int(bad.any(dim=-1).sum())
            raise SaeRewardError(
                f"non-finite activations (NaN/inf) at layer {layer} in {n_bad} of {len(rows)} tokens of {kind} "
                f"batch {unit}, for shard {shard} ({out / shard_name(shard)}, not written): the model "
                "produces NaN/inf here; load it in fp32 (dtype fp32), and with store_dtype fp16 (max 65504) "
                "use bf16 or fp32 instead"
            )


def _flush(
    cfg: CollectConfig,
    pending: list[_Rows],
    source: int,
    unit_start: int,
    unit_end: int,
    manifest: dict[str, Any],
    out: Path,
) -> None:
    rows = _Rows.cat(pending)
    index = len(manifest["shards"])
    path = out / shard_name(index)
    h = heldout_start(rows.seq_ids, cfg.held_out_fraction)
    meta = {"format": FORMAT, "shard": str(index), "n_tokens": str(len(rows)), "heldout_start": str(h)}
    _write_shard(path, rows.tensors(), meta)
    manifest["shards"].append(
        {
            "file": path.name,
            "n_tokens": len(rows),
            "heldout_start": h,
            "n_sequences": int(torch.unique(rows.seq_ids).numel()),
            "source": source,
            "unit_start": unit_start,
            "unit_end": unit_end,
            "bytes": path.stat().st_size,
        }
    )
    _recount(manifest)
    _write_manifest(out, manifest)
