"""Where a model's weights live: in a file mapping, and how its pages leave the process while a
packed copy stands in for them.

``transformers`` memory-maps a safetensors checkpoint: every weight is a view of a private mapping of
the file, faulted in on first use. Packed decoding (``packed`` of
:func:`saereward.model.fastdecode.decode`) drops those views' resident pages
(``madvise(MADV_DONTNEED)``) while its packed copy exists, so the model is held once; the weights keep
their values, and their pages fault back in from the page cache when next read, several pages per
fault (SmolLM2-135M fp32 on the 2-core VM: 0.54 GB dropped in ~40-55 ms, the next forward ~10k faults
more than a warm one). A page written since the file was mapped is a private copy that dropping would
revert to the file: ``/proc/self/pagemap`` tells them apart, and a weight with any is left alone.
Linux only; elsewhere nothing is dropped.
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


def in_file_mappings(tensors: Iterable[Tensor], ranges: list[tuple[int, int]] | None = None) -> bool:
    """Whether every one of ``tensors`` (CPU) is a view of a private file mapping (Linux); ``ranges``:
    :func:`file_mappings` read once by a caller that asks several times (``/proc/self/maps`` lists
    every loaded library: a few ms to parse)."""
    ranges = file_mappings() if ranges is None else ranges
    if not ranges:
        return False
    return all(t.device.type == "cpu" and _inside(ranges, *_span(t)) for t in tensors)


def _span(t: Tensor) -> tuple[int, int]:
    """The address range ``[lo, hi)`` of a contiguous tensor's bytes."""
    lo = t.data_ptr()
    return lo, lo + t.numel() * t.element_size()


def _inside(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in ranges)


def _page_interior(lo: int, hi: int, page: int) -> tuple[int, int]:
    """The whole pages inside ``[lo, hi)``: ``lo`` rounded up, ``hi`` down (empty: ``start >= end``)."""
    return -(-lo // page) * page, hi // page * page


def _drop_pages(libc: Any, lo: int, hi: int) -> None:
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


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


#: ``/proc/self/pagemap`` entry bit numbers: the page is present, swapped, a file page (or shared anonymous)
_PRESENT, _SWAPPED, _FILE = 63, 62, 61


def _unmodified(entries: Tensor) -> bool:
    """Whether pages of a private file mapping (their ``pagemap`` entries, the bits of each as an int64)
    all still hold the file's bytes: resident as file pages, or not resident and never swapped (a page
    written since the mapping was made is a private anonymous copy: resident without the file bit, or
    swapped out). One vectorised test: 0.54 GB of weights are 132k entries."""

    def bit(b: int) -> Tensor:
        return (entries >> b) & 1 == 1  # arithmetic shift: bit 63 is the sign, masked to one bit

    return bool(torch.where(bit(_PRESENT), bit(_FILE), ~bit(_SWAPPED)).all())


def _pagemap(lo: int, hi: int, page: int) -> Tensor | None:
    """The ``pagemap`` entries of the pages ``[lo, hi)`` (page-aligned) as the bits of an int64 tensor;
    ``None`` where unreadable."""
    n = (hi - lo) // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo // page * 8)
            raw = f.read(n * 8)
    except OSError:
        return None
    if len(raw) != n * 8:
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.int64)  # native byte order, as the kernel writes


def drop_mapped_pages(tensors: Iterable[Tensor], ranges: list[tuple[int, int]] | None = None) -> int:
    """Release the resident pages of each tensor that is a view of a private file mapping, where they
    still hold the file's bytes; returns the bytes released.

    The tensors keep their values: a later read faults each page back in from the page cache (or the
    file), several pages per fault. Pages that were written since the file was mapped (an in-place
    update, a merged adapter) are private copies that ``MADV_DONTNEED`` would revert to the file: a
    tensor with any such page (``/proc/self/pagemap``) is left alone, as is every page it shares with a
    neighbour. Linux only; elsewhere nothing is released. Not while another thread writes to the tensors (a
    write between the check and the release would be lost); a write after it makes a private copy
    of the file's bytes again, as the first one did. ``ranges``: as for :func:`in_file_mappings`."""
    ranges = file_mappings() if ranges is None else ranges
    libc = glibc()
    if not ranges or libc is None:
        return 0
    page, dropped = mmap.PAGESIZE, 0
    for t in tensors:
        if t.device.type != "cpu" or not t.numel():
            continue
        lo, hi = _span(t)
        if not t.is_contiguous() or not _inside(ranges, lo, hi):
            continue
        a, b = _page_interior(lo, hi, page)
        if b <= a:
            continue
        entries = _pagemap(a, b, page)
        if entries is None or not _unmodified(entries):
            continue
        _drop_pages(libc, a, b)
        dropped += b - a
    return dropped


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


__all__ = ["drop_mapped_pages", "file_mappings", "glibc", "in_file_mappings", "return_free_memory"]
