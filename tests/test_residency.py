"""saereward.model.residency: a checkpoint's mapped pages released where they still hold the file's bytes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saereward.model import residency

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


def _in_a_file_mapping(t: torch.Tensor) -> bool:
    p = t.untyped_storage().data_ptr()
    return any(lo <= p < hi for lo, hi in residency.file_mappings())


def test_file_mappings_keeps_private_file_backed_ones() -> None:
    maps = [
        "7f00-7f10 rw-p 00000000 fe:00 1 /tmp/model.safetensors",
        "7f10-7f20 r--s 00000000 fe:00 2 /dev/shm/shared",  # shared: never dropped
        "7f20-7f30 rw-p 00000000 00:00 0 ",  # anonymous
        "7f30-7f40 rw-p 00000000 00:00 0 [heap]",
    ]
    assert residency.file_mappings(maps) == [(0x7F00, 0x7F10)]


def test_unmodified_reads_pagemap_bits() -> None:
    """Pages still holding the file's bytes: resident file pages, or never-swapped absent ones; a
    private copy (resident, no file bit) or a swapped page is written data."""
    present, swapped, file = (1 << b for b in (residency._PRESENT, residency._SWAPPED, residency._FILE))

    def entries(*values: int) -> torch.Tensor:  # unsigned 64-bit values as the int64 bits pagemap holds
        return torch.tensor([v - (1 << 64) if v >> 63 else v for v in values], dtype=torch.int64)

    assert residency._unmodified(entries(present | file, 0, present | file | 123, file))
    assert not residency._unmodified(entries(present | file, present))  # a private (written) copy
    assert not residency._unmodified(entries(present | 123))  # resident, no file bit, pfn bits set
    assert not residency._unmodified(entries(swapped))


@linux
def test_drop_mapped_pages_releases_unwritten_pages_and_keeps_every_value(tmp_path: Path) -> None:
    """A 16 MB weight read from a memory-mapped safetensors file: its resident pages leave the RSS and
    its values stay (read back from the file). A tensor of the same file written in place is left
    alone (dropping would revert it to the file); the process's own memory is never touched."""
    g = torch.Generator().manual_seed(0)
    save_file(
        {"big": torch.randn(2048, 2048, generator=g), "written": torch.randn(1024, 1024, generator=g)},
        str(tmp_path / "w.safetensors"),
    )
    loaded = load_file(str(tmp_path / "w.safetensors"))
    big, written = loaded["big"], loaded["written"]
    assert _in_a_file_mapping(big), "safetensors no longer memory-maps: revisit residency"
    assert residency.in_file_mappings([big, written])
    want = big.clone()
    written.mul_(2.0)  # a private copy of every page: no longer the file's bytes
    want_written = written.clone()
    own = torch.randn(1024, 1024)
    assert not residency.in_file_mappings([big, own])
    float(big.sum())  # fault the mapped pages in
    before = _rss_file_kb()
    dropped = residency.drop_mapped_pages([big, written, own])
    assert 2048 * 2048 * 4 - 8192 <= dropped <= 2048 * 2048 * 4  # big's whole pages, nothing else
    assert before - _rss_file_kb() >= 12 * 1024  # the 16 MB's pages left our RSS
    assert torch.equal(big, want) and torch.equal(written, want_written)


def test_return_free_memory_runs() -> None:
    residency.return_free_memory()  # glibc: malloc_trim(0); elsewhere nothing
