"""oneDNN's packed linear on CPU: a weight reordered once into oneDNN's blocked layout, then any number
of products ``x @ wᵀ + b`` against it.

A plain GEMM call packs its weight operand into the CPU library's blocked layout on every call; for a
weight multiplied many times between updates (every decode step of a rollout, every row block of an SAE
step's selection) packing it once saves that work. The ops are private to PyTorch
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``), so :func:`available` checks once
per process and dtype that they exist and compute ``F.linear``'s product.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn import functional as F


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
