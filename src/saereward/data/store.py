"""Reading activation folders written by ``saereward collect`` (:mod:`saereward.data.collect`).

The folder layout (shards, ``manifest.json``, the per-shard held-out split) is described in
:mod:`saereward.data.collect`; this module holds what a reader needs of it: the manifest format, the
shard check and :class:`ActivationStore`.

**Reader.** :class:`ActivationStore` yields ``[B, d]`` batches of one layer and split. With ``shuffle``
the rows are cut into pieces of at most ``buffer_tokens // 8`` contiguous rows; each epoch the pieces are
put in a seeded random order and grouped into windows of at most ``buffer_tokens`` rows; each window is
loaded (only its rows: safetensors slices), permuted by a seeded permutation and streamed. The batches
are consecutive ``batch_size`` slices of that stream, epochs following each other with ``loop``, so
``start_batch=k`` seeks to row ``k * batch_size`` of the stream and loads only from the window that
holds it: the same batches as an uninterrupted iteration, with memory bounded by ``buffer_tokens`` rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from saereward.errors import SaeRewardError

StoreDType = Literal["fp32", "fp16", "bf16"]
Split = Literal["train", "heldout", "all"]

# The manifest's format name: a file-format identifier, fixed whatever the modules are called.
FORMAT = "saereward.activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PIECES_PER_BUFFER = 8


def check_shard(path: Path, entry: dict[str, Any], layers: Sequence[int], d_model: int) -> str | None:
    """What is wrong with shard ``path`` against its manifest ``entry``, or ``None`` when it is sound.

    Checks the file exists, its size, its safetensors header, and the shape of every tensor; it does not
    read the data.
    """
    from safetensors import safe_open

    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    if size != entry["bytes"]:
        return f"truncated or altered ({size} bytes, the manifest says {entry['bytes']})"
    n = entry["n_tokens"]
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            for layer in layers:
                key = f"layer_{layer}"
                if key not in keys:
                    return f"missing tensor {key}"
                shape = list(fh.get_slice(key).get_shape())
                if shape != [n, d_model]:
                    return f"tensor {key} has shape {shape}, expected {[n, d_model]}"
            for key in ("token_ids", "seq_ids", "positions"):
                if key not in keys or list(fh.get_slice(key).get_shape()) != [n]:
                    return f"tensor {key} missing or of the wrong length"
    except Exception as exc:  # safetensors raises its own error type for bad headers
        return f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an activation folder, with a clear error when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SaeRewardError(f"{folder} has no {MANIFEST}: pass a folder written by `saereward collect`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SaeRewardError(
            f"{path} is unreadable ({exc}): re-run `saereward collect` to rewrite it"
        ) from None
    if manifest.get("format") != FORMAT:
        raise SaeRewardError(f"{path} is not a saereward activation manifest")
    return manifest


@dataclass(frozen=True)
class _Span:
    """Rows ``[start, stop)`` of one shard file."""

    path: Path
    start: int
    stop: int


class ActivationStore:
    """Activations of one layer and split of a collection folder; see the module docstring.

    Args:
        folder: a folder written by :func:`saereward.data.collect.run_collect`.
        layer: one of the collected layers (negative counts from the model's last layer).
        split: ``train`` (rows before each shard's ``heldout_start``), ``heldout`` (the rest) or ``all``.
        allow_incomplete: read a collection that has not finished (otherwise an error).
    """

    def __init__(
        self, folder: str | Path, layer: int, split: Split = "train", *, allow_incomplete: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        m = self.manifest
        if split not in ("train", "heldout", "all"):
            raise SaeRewardError(f"split {split!r} is not one of train, heldout, all")
        if -m["num_layers"] <= layer < 0:
            layer += m["num_layers"]
        if layer not in m["layers"]:
            raise SaeRewardError(f"layer {layer} was not collected in {folder}: available are {m['layers']}")
        if not m["complete"] and not allow_incomplete:
            raise SaeRewardError(
                f"the collection in {folder} is incomplete ({m['n_tokens']} tokens so far): re-run "
                "`saereward collect` with the same config to finish it"
            )
        self.layer, self.split = layer, split
        self.key = f"layer_{layer}"
        self.d_model: int = m["d_model"]
        self.spans: list[_Span] = []
        self._source: dict[Path, str] = {}  # shard file -> the source its rows came from
        for entry in m["shards"]:
            start, stop = {
                "train": (0, entry["heldout_start"]),
                "heldout": (entry["heldout_start"], entry["n_tokens"]),
                "all": (0, entry["n_tokens"]),
            }[split]
            if stop <= start:
                continue
            path = self.folder / entry["file"]
            self._source[path] = str(entry.get("source"))
            problem = check_shard(path, entry, m["layers"], self.d_model)
            if problem is not None:
                raise SaeRewardError(
                    f"activation shard {path} is {problem}: re-run `saereward collect` with the same config "
                    f"(out={self.folder}) to rewrite it"
                )
            self.spans.append(_Span(path, start, stop))
        self.n_tokens = sum(s.stop - s.start for s in self.spans)
        if self.n_tokens == 0:
            raise SaeRewardError(
                f"split {split!r} of {folder} has no tokens"
                + (
                    ": collect with held_out_fraction > 0 and more than one sequence per shard"
                    if split == "heldout"
                    else ""
                )
            )

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the shards."""
        return STORE_DTYPES[self.manifest["dtype"]]

    def __len__(self) -> int:
        return self.n_tokens

    def _load(self, path: Path, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of this split's tensor in shard ``path``; NaN/inf there is an error."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            rows = fh.get_slice(self.key)[start:stop]
        bad = ~torch.isfinite(rows).all(dim=-1)
        if bool(bad.any()):
            idx = torch.nonzero(bad).flatten()
            raise SaeRewardError(
                f"activation shard {path.name} has NaN/inf in {self.key} at {len(idx)} rows "
                f"({start + int(idx[0])}..{start + int(idx[-1])}): re-collect it (`saereward collect --force`)"
            )
        return rows

    def read(self, max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The split's rows in stored order, ``[min(n_tokens, max_tokens), d]`` (all in memory)."""
        parts, left = [], self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        for s in self.spans:
            if left <= 0:
                break
            take = min(left, s.stop - s.start)
            parts.append(self._load(s.path, s.start, s.start + take).to(dtype))
            left -= take
        return torch.cat(parts)

    def sequences(self, max_tokens: int | None = None) -> torch.Tensor:
        """``[min(n_tokens, max_tokens)]`` int64: for the split's rows in stored order (as :meth:`read`),
        the sequence each belongs to (one code per source and ``seq_ids`` value: a task item or a
        corpus document, in whichever shard its rows lie), the unit of a bootstrap over sequences."""
        from safetensors import safe_open

        codes: dict[tuple[str, int], int] = {}
        parts, left = [], self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        for s in self.spans:
            if left <= 0:
                break
            take = min(left, s.stop - s.start)
            with safe_open(str(s.path), framework="pt") as fh:
                ids = fh.get_slice("seq_ids")[s.start : s.start + take]
            uniq, inverse = torch.unique(ids, return_inverse=True)
            table = torch.tensor(
                [codes.setdefault((self._source[s.path], int(u)), len(codes)) for u in uniq.tolist()],
                dtype=torch.int64,
            )
            parts.append(table[inverse])
            left -= take
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def windows(self, epoch: int, *, shuffle: bool, seed: int, buffer_tokens: int) -> list[list[_Span]]:
        """The epoch's plan: windows (lists of row ranges, in stream order) of at most ``buffer_tokens`` rows."""
        import numpy as np

        piece = max(1, buffer_tokens // _PIECES_PER_BUFFER) if shuffle else buffer_tokens
        pieces = [
            _Span(s.path, a, min(a + piece, s.stop))
            for s in self.spans
            for a in range(s.start, s.stop, piece)
        ]
        if shuffle:
            order = np.random.default_rng([seed % 2**63, epoch]).permutation(len(pieces))
            pieces = [pieces[i] for i in order]
        windows: list[list[_Span]] = []
        size = buffer_tokens  # forces a new window at the first piece
        for p in pieces:
            n = p.stop - p.start
            if size + n > buffer_tokens:
                windows.append([])
                size = 0
            windows[-1].append(p)
            size += n
        return windows

    def _epoch_stream(
        self, epoch: int, offset: int, *, shuffle: bool, seed: int, buffer_tokens: int
    ) -> Iterator[torch.Tensor]:
        """Blocks of rows of one epoch's stream, starting at row ``offset`` of that epoch."""
        import numpy as np

        start = 0
        for w, window in enumerate(
            self.windows(epoch, shuffle=shuffle, seed=seed, buffer_tokens=buffer_tokens)
        ):
            n = sum(p.stop - p.start for p in window)
            if start + n <= offset:
                start += n
                continue
            rows = torch.cat([self._load(p.path, p.start, p.stop) for p in window])
            if shuffle:
                perm = np.random.default_rng([seed % 2**63, epoch, w + 1]).permutation(n)
                rows = rows[torch.from_numpy(perm)]
            yield rows[max(0, offset - start) :]
            start += n

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int = 2**18,
        start_batch: int = 0,
        dtype: torch.dtype = torch.float32,
        loop: bool = False,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Batches ``[batch_size, d]`` in ``dtype``; see the module docstring for the order.

        ``start_batch=k`` yields exactly what an uninterrupted iteration yields after its first ``k``
        batches. Without ``loop`` one epoch is read, and its last, smaller batch is yielded unless
        ``drop_last``; with ``loop`` batches run on across epochs (each epoch reshuffled) forever.
        Memory: at most ``buffer_tokens`` rows in the storage dtype (or one row range with
        ``shuffle=False``), plus one batch.
        """
        if batch_size < 1 or buffer_tokens < 1 or start_batch < 0:
            raise ValueError("batch_size and buffer_tokens must be >= 1 and start_batch >= 0")
        epoch, offset = divmod(start_batch * batch_size, self.n_tokens)
        carry: torch.Tensor | None = None
        while loop or epoch == 0:
            for block in self._epoch_stream(
                epoch, offset, shuffle=shuffle, seed=seed, buffer_tokens=buffer_tokens
            ):
                i = 0
                if carry is not None:
                    i = batch_size - carry.shape[0]
                    carry = torch.cat([carry, block[:i]])
                    if carry.shape[0] < batch_size:
                        continue
                    yield carry.to(dtype)
                    carry = None
                while i + batch_size <= block.shape[0]:
                    yield block[i : i + batch_size].to(dtype)
                    i += batch_size
                if i < block.shape[0]:
                    carry = block[i:]
            epoch, offset = epoch + 1, 0
        if carry is not None and not drop_last:
            yield carry.to(dtype)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches in one epoch of :meth:`iter_batches` without ``loop``."""
        return self.n_tokens // batch_size if drop_last else math.ceil(self.n_tokens / batch_size)
