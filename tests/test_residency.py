"""saereward.model.residency: weights copied out of a checkpoint's file mapping, held once."""

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


@linux
def test_own_weights_moves_mapped_weights_and_releases_their_pages(tmp_path: Path) -> None:
    """A 16 MB weight read from a memory-mapped safetensors file ends in the process's own memory with
    the same values, and its mapped pages are dropped though the mapping stays (another tensor of the
    file keeps it alive); a second call moves nothing; tied holders keep one copy."""
    g = torch.Generator().manual_seed(0)
    save_file(
        {"big": torch.randn(2048, 2048, generator=g), "other": torch.randn(64, generator=g)},
        str(tmp_path / "w.safetensors"),
    )
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert _in_a_file_mapping(loaded["big"]), "safetensors no longer memory-maps: revisit residency"
    m = torch.nn.Module()
    m.big = torch.nn.Parameter(loaded["big"], requires_grad=False)
    m.register_buffer("same", m.big.data)  # a second holder of the same storage
    keep = loaded["other"]  # keeps the file mapped
    want = m.big.detach().clone()
    float(m.big.sum())  # fault the mapped pages in
    before = _rss_file_kb()
    moved = residency.own_weights(m)
    assert moved >= 2048 * 2048 * 4
    assert torch.equal(m.big, want) and not _in_a_file_mapping(m.big)
    assert m.same.untyped_storage().data_ptr() == m.big.untyped_storage().data_ptr()
    assert before - _rss_file_kb() >= 12 * 1024  # the 16 MB's pages left our RSS
    assert residency.own_weights(m) == 0
    assert torch.equal(keep, load_file(str(tmp_path / "w.safetensors"))["other"])


def test_own_weights_leaves_process_memory_alone() -> None:
    m = torch.nn.Linear(256, 256)
    w = m.weight.data
    assert residency.own_weights(m) == 0
    assert m.weight.data.data_ptr() == w.data_ptr()


def test_return_free_memory_runs() -> None:
    residency.return_free_memory()  # glibc: malloc_trim(0); elsewhere nothing
