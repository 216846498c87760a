"""bf16 matrix products on CPUs without bf16 units: fp32 GEMM on bf16 operands, bf16 results.

PyTorch multiplies bf16 matrices on the CPU with oneDNN only where the CPU has AVX512 (BW/VL/DQ)
or AMX (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``). Elsewhere, on AVX2-only CPUs, it falls
back to a generic loop that is several times slower than an fp32 GEMM of the same shape. On a
2-core AVX2 EPYC, a SmolLM2-135M forward of 16 x 64 tokens took 17.5 s that way and 3.5 s through
this module, a forward + backward 23x longer (``benchmarks/bf16_cpu.py``, BENCHMARKS.md, "bf16 on a CPU without bf16 units").

:func:`linear` computes the same product through an fp32 GEMM: the bf16 operands are widened
(exactly: every bf16 value is an fp32 value), multiplied and summed in fp32, and the result is
rounded to bf16 once. That is what a bf16 GEMM with fp32 accumulation computes (oneDNN's and
cuBLAS's semantics), up to the order of summation. Weights and activations stay bf16 in memory;
the fp32 copies are transient, one product (or one block of a large weight's rows) at a time, and the
backward saves only the bf16 operands it needs.

:func:`install` gives every ``nn.Linear`` of a model this forward; :func:`saereward.model.lm.load_model`
calls it for bf16 models on such CPUs. Set ``SAEREWARD_BF16_MATMUL=native`` to keep PyTorch's own
bf16 product (for example to compare the two).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from saereward.errors import SaeRewardError

#: a weight up to this many elements is widened on every call even for a few rows (a decode step):
#: widening SmolLM2's 0.9 M-element projections costs less than the slow bf16 product it replaces,
#: widening its 28 M-element LM head for 16 rows costs more (104 ms against 65 ms native).
SMALL_WEIGHT = 4_000_000
#: from this many rows on, every product is widened (the product then outweighs the widening)
MANY_ROWS = 64

ENV = "SAEREWARD_BF16_MATMUL"


@functools.cache
def _cpu_bf16_is_slow() -> bool:
    try:
        return not bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: bf16 has no fast path either
        return True


def enabled() -> bool:
    """True when bf16 CPU products should go through fp32 GEMM here (slow CPU bf16, not opted out)."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode == "native":
        return False
    if mode == "fp32":
        return True
    if mode != "auto":
        raise SaeRewardError(f"{ENV}={mode!r} is not a mode: use auto, native or fp32")
    return _cpu_bf16_is_slow()


def _wide(x: Tensor, w: Tensor) -> bool:
    """Whether ``x @ wᵀ`` should be widened (both bf16 on the CPU; enough rows or a small weight)."""
    return (
        x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and (w.numel() <= SMALL_WEIGHT or x.numel() >= MANY_ROWS * w.shape[-1])
    )


def _chunks(n_out: int, n_in: int) -> list[slice]:
    """Output-feature blocks of ``w`` of at most :data:`SMALL_WEIGHT` elements each: a large weight (an
    LM head) is widened one block at a time, so no fp32 copy of it, nor of the fp32 output, exists
    whole (SmolLM2's 49k x 576 head: 8 blocks)."""
    step = max(1, SMALL_WEIGHT // max(1, n_in))
    return [slice(i, min(i + step, n_out)) for i in range(0, n_out, step)]


def _product(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ wᵀ + b`` through fp32 GEMM, rounded to ``x``'s dtype, block by block over ``w``'s rows."""
    x32 = x.float()
    parts = _chunks(*w.shape)
    if len(parts) == 1:
        return F.linear(x32, w.float(), None if b is None else b.float()).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    for c in parts:
        out[..., c] = F.linear(x32, w[c].float(), None if b is None else b[c].float())
    return out


class _Fp32Linear(torch.autograd.Function):
    """``x @ wᵀ + b`` in fp32 from bf16 operands, rounded to ``x``'s dtype; the backward likewise.

    Saves only what the backward needs (``w`` for the input's gradient, ``x`` for the weight's), as
    bf16: a frozen base weight keeps no activation alive.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # noqa: ANN401
        need_x, need_w = x.requires_grad, w.requires_grad
        ctx.save_for_backward(x if need_w else None, w if need_x else None)
        ctx.has_bias = b is not None
        ctx.x_dtype, ctx.w_dtype, ctx.w_shape = x.dtype, w.dtype, tuple(w.shape)
        return _product(x, w, b)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN401
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        blocks = _chunks(*ctx.w_shape)
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:
                gx = g.new_zeros(*g.shape[:-1], ctx.w_shape[1], dtype=torch.float32)
                for c in blocks:
                    gx += g[..., c].float() @ w[c].float()
                gx = gx.to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                g2 = g.reshape(-1, g.shape[-1])
                x2 = x.reshape(-1, x.shape[-1]).float()
                gw = g.new_empty(ctx.w_shape, dtype=ctx.w_dtype)
                for c in blocks:
                    gw[c] = g2[:, c].float().t() @ x2
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g.reshape(-1, g.shape[-1]).float().sum(0).to(g.dtype)
        return gx, gw, gb


def _bf16(t: Tensor | None) -> Tensor | None:
    """Autocast's cast: floating tensors other than fp64 become bf16."""
    if t is None or t.dtype in (torch.bfloat16, torch.float64) or not t.is_floating_point():
        return t
    return t.to(torch.bfloat16)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)``; bf16 operands on the CPU go through fp32 GEMM (module docstring).

    Call it only where :func:`enabled` holds; it checks the operands' dtypes and device itself.
    Under CPU autocast to bf16 it first casts the operands to bf16 as autocast would (the casts are
    differentiable: an fp32 weight gets an fp32 gradient), then computes the same way.
    """
    if torch.is_autocast_enabled("cpu"):
        if x.device.type != "cpu" or torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return F.linear(x, w, b)
        with torch.autocast("cpu", enabled=False):
            return linear(_bf16(x), _bf16(w), _bf16(b))  # type: ignore[arg-type]
    if not _wide(x, w) or (b is not None and b.dtype != torch.bfloat16):
        return F.linear(x, w, b)
    if torch.is_grad_enabled() and (
        x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
    ):
        return _Fp32Linear.apply(x, w, b)
    return _product(x, w, b)


def _forward(self: torch.nn.Linear, x: Tensor) -> Tensor:
    return linear(x, self.weight, self.bias)


def installed(module: Any) -> bool:
    """Whether :func:`install` gave ``module`` (an ``nn.Linear``) the :func:`linear` forward."""
    f = getattr(module, "__dict__", {}).get("forward")
    return isinstance(f, functools.partial) and f.func is _forward


def install(model: Any) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the :func:`linear` forward when :func:`enabled`;
    returns how many were patched (0 when not enabled). Idempotent; a module whose forward is
    already replaced is left alone."""
    if not enabled():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and "forward" not in m.__dict__:
            m.forward = functools.partial(_forward, m)  # type: ignore[method-assign]  # picklable
            n += 1
    return n
