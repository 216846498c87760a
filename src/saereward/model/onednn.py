"""oneDNN's packed linear on CPU: a weight reordered once into oneDNN's blocked layout, then any number
of products ``x @ wᵀ + b`` against it.

A plain GEMM call packs its weight operand into the CPU library's blocked layout on every call; for a
weight multiplied many times between updates (every decode step of a rollout, every row block of an SAE
step's selection) packing it once saves that work. The ops are private to PyTorch
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``), so :func:`available` checks once
per process and dtype that they exist and compute ``F.linear``'s product.

:func:`packed_linears` runs whole ``nn.Linear`` layers on packed weights for a while (the GRPO
reference forward); weights in a file mapping then have their pages dropped meanwhile, so they are
held once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from saereward.model import residency
from saereward.model.lm import plain_linear


def pack(weight: Tensor, rows: int = 16) -> Tensor:
    """``weight`` ``[out, in]`` reordered for products with inputs of about ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ wᵀ + b`` ``[rows, out]`` (contiguous) with ``packed`` from :func:`pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU run :func:`linear` in ``dtype`` and it agrees with ``F.linear``
    (checked once per process on a small product)."""
    ops = torch.ops.mkldnn
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    ):
        return False
    g = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(*s, generator=g).to(dtype) for s in ((24, 40), (24,), (3, 40)))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        with torch.no_grad():
            y = linear(x, pack(w, 4), b)
    except RuntimeError:
        return False
    want = F.linear(x.float(), w.float(), b.float())
    return (
        y.shape == (3, 24) and y.dtype == dtype and bool(torch.allclose(y.float(), want, rtol=tol, atol=tol))
    )


def _packable(lin: Any) -> bool:
    """A plain fp32 CPU ``nn.Linear`` (:func:`saereward.model.lm.plain_linear`)."""
    return plain_linear(lin) and lin.weight.device.type == "cpu" and lin.weight.dtype == torch.float32


def packable(linears: Sequence[Any], maps: list[tuple[int, int]] | None = None) -> bool:
    """Whether :func:`packed_linears` packs ``linears``: :func:`available` holds, every layer is a plain
    fp32 CPU ``nn.Linear`` (:func:`_packable`), and every weight is a view of a private file mapping
    (:func:`saereward.model.residency.in_file_mappings`; ``maps``: the process's file mappings if the
    caller has read them), so that dropping its pages keeps it held once."""
    return bool(
        linears
        and available(torch.float32)
        and all(_packable(lin) for lin in linears)
        and residency.in_file_mappings([lin.weight for lin in linears], maps)
    )


@contextlib.contextmanager
def packed_linears(linears: Sequence[Any], rows: int = 16, release: bool = False) -> Iterator[bool]:
    """While open, each of ``linears`` computes ``x @ wᵀ + b`` through :func:`linear` on its weight
    packed once (no gradient flows to the weight: for forwards under ``no_grad``). Yields whether it
    did, which is where :func:`packable` holds: each weight's pages are then dropped as soon as its
    packed copy exists (:func:`saereward.model.residency.drop_mapped_pages`), so the weights are held
    once, and fault back in from the file when next read after the context. Otherwise nothing changes
    (a second copy of the weights would cost more memory than the products save). ``release``: the
    free heap the packed copy leaves goes back to the OS when the context ends
    (:func:`saereward.model.residency.return_free_memory`; lower peak memory, more page faults later).

    Same products as ``F.linear``, other rounding order. On the 2-core Zen 4 VM a GRPO reference
    forward of SmolLM2-135M ran ~10 % faster on packed weights, packing included (BENCHMARKS.md)."""
    maps = residency.file_mappings()
    if not packable(linears, maps):
        yield False
        return
    patched = []
    try:
        with torch.no_grad():
            for lin in linears:
                p, b = pack(lin.weight.detach(), rows), lin.bias
                lin.forward = functools.partial(linear, packed=p, bias=None if b is None else b.detach())
                patched.append(lin)
                residency.drop_mapped_pages([lin.weight], maps)
        yield True
    finally:
        for lin in patched:
            del lin.forward
        if patched and release:
            residency.return_free_memory()
