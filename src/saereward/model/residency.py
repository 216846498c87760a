"""Where a model's weights live: in a file mapping, or in the process's own memory.

``transformers`` memory-maps a safetensors checkpoint: every weight is a view of a private mapping of
the file, faulted in on first use. That is the cheapest way to load, but a weight held that way cannot
be released on its own: its pages stay resident for as long as the mapping lives, and the mapping lives
while any weight still points into it. Packed decoding that stands in for the plain weights
(``in_place`` of :func:`saereward.model.fastdecode.decode`) needs weights it can release, so
:func:`own_weights` first copies them out of the mapping.

The copy goes weight by weight. After each copy the source pages, whole pages strictly inside that
weight's bytes in a file-backed mapping, are dropped (``madvise(MADV_DONTNEED)``): they are clean or
hold a private copy that is no longer used, and nothing points at them any more. So the two copies
never coexist beyond one weight, and peak memory stays one copy of the model. Once no weight points
into the mapping, it is unmapped. Linux only (``/proc/self/maps``); elsewhere the weights are copied
and the mapping is dropped at the end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

_MADV_DONTNEED = 4


def file_mappings(maps: Iterable[str] | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` of every private file-backed mapping of this process (``/proc/self/maps``
    lines, or ``maps`` in that format); empty where there is no such file."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read().splitlines()
        except OSError:
            return []
    found = []
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/") or "p" not in parts[1]:
            continue  # anonymous, special ([heap], [stack]) or shared: never dropped
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        found.append((lo, hi))
    return found


def _inside(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


def _page_interior(lo: int, hi: int, page: int) -> tuple[int, int]:
    """The whole pages inside ``[lo, hi)``: ``lo`` rounded up, ``hi`` down (empty: ``start >= end``)."""
    return -(-lo // page) * page, hi // page * page


def _drop_pages(libc: Any, lo: int, hi: int) -> None:
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _storages(model: torch.nn.Module) -> dict[int, list[Tensor]]:
    """The model's CPU parameters and buffers grouped by the storage they view (keyed by its address)."""
    groups: dict[int, list[Tensor]] = {}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel() and id(t) not in seen:
            seen.add(id(t))
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    return groups


def own_weights(model: torch.nn.Module) -> int:
    """Copy every CPU parameter and buffer of ``model`` that lives in a file mapping into the process's
    own memory, releasing the mapped pages as it goes (see the module docstring). Tensors that share a
    storage keep sharing one copy (tied weights stay tied). Returns the bytes copied (0: none mapped)."""
    ranges = file_mappings()
    linux = sys.platform.startswith("linux") and bool(ranges)
    libc = glibc() if linux else None
    groups = _storages(model)
    spans = sorted((lo, lo + ts[0].untyped_storage().nbytes()) for lo, ts in groups.items())
    shared = {x for (a, b), (c, d) in zip(spans, spans[1:], strict=False) if c < b for x in (a, c)}
    moved = 0
    for lo, hi in spans:
        if linux and not _inside(ranges, lo, hi):
            continue  # already the process's own memory
        ts = groups[lo]
        whole = all(t.storage_offset() == 0 and t.is_contiguous() and t.shape == ts[0].shape for t in ts)
        whole = whole and ts[0].numel() * ts[0].element_size() == hi - lo
        if whole:  # the storage is exactly this weight: one copy for all its holders
            copy = ts[0].detach().clone()
            for t in ts:
                t.data = copy
        else:  # views into a larger storage: each its own copy; the pages go with the mapping
            for t in ts:
                t.data = t.detach().clone()
        moved += hi - lo
        if libc is not None and whole and lo not in shared:
            _drop_pages(libc, *_page_interior(lo, hi, mmap.PAGESIZE))
    return moved


@functools.cache
def glibc() -> Any:
    """The C library through ``ctypes`` on Linux (``None`` elsewhere or where it does not load);
    callers check for the glibc functions they use (``malloc_trim``, ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; elsewhere nothing).

    Weights of a few MB come from the heap, and memory freed there stays with the process: releasing
    one copy of the weights while another is built lowers peak memory only if the freed pages go back
    before the next ones are touched. Freed pages that are used again fault back in (a minor fault per
    page), so this is called between blocks of such work, not per tensor.
    """
    libc = glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


__all__ = ["file_mappings", "glibc", "own_weights", "return_free_memory"]
