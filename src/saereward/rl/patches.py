"""Process and model patches the GRPO trainer applies for speed and memory on the CPU: glibc's mmap
threshold (:func:`mmap_large_allocations`), LoRA merged for sampling (:func:`merged_lora`), few-row
linear layers as ``W @ xᵀ`` while decoding (:func:`skinny_linear`), a leaner LoRA forward
(:func:`install_lean_lora`), the LM head's hidden states in place of its logits for the training
log-probs (:func:`plain_fp32_head`, :func:`head_returns_hidden`), and attention on the grouped key and
value heads (:func:`cpu_sdpa_gqa`), which saves activations for the backward (the activations rebuilt
in the backward instead: :mod:`saereward.rl.rebuild`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from saereward.model import bf16cpu
from saereward.model.lm import plain_linear
from saereward.rl.rebuild import rebuilt_input


def mmap_large_allocations(threshold: int = 4 << 20, trim: int = 64 << 20) -> bool:
    """Ask glibc to serve allocations >= ``threshold`` bytes with ``mmap`` (process-wide).

    glibc raises its mmap threshold dynamically after big frees, after which large tensors come from
    the heap; a step's differently sized logits and activations then fragment it, and peak RSS grows
    from step to step although the live memory does not. With a fixed threshold every large tensor
    is its own mapping, returned to the OS on free. 4 MiB keeps the many small per-token tensors of
    decoding (KV-cache growth) on the heap: on the GRPO benchmark 256 KiB and 1 MiB cost 40-50 % more
    step time for ~0.45 GB less peak RSS; 4 MiB costs ~1 % and saves ~0.65 GB; 16 MiB saves little.
    A fixed mmap threshold also freezes glibc's trim threshold at 128 KiB, so the heap gave back its
    free top after every mid-sized free and page-faulted it in again: ~12k-18k minor faults per
    reference forward or rollout batch of the GRPO benchmark. ``trim`` (64 MiB) keeps that much free
    heap mapped; the faults dropped to ~0 there, peak RSS unchanged (2.00 vs 1.99 GB).
    ``malloc_trim(0)`` after each GRPO phase was tried as well: RssAnon between steps fell from 1.49 to
    0.83 GB, but the peak (the update's) stayed 1.91 GB and steps took ~5 % longer (the pages fault
    back in), so no phase ends with a trim (``packed_in_place``, the lowest-peak setting, trims after
    its rollouts, and inside its packing and unpacking where the freed weights must go back before the
    next ones are touched).
    Returns False where this is not glibc.
    """
    from saereward.model.residency import glibc

    libc = glibc()
    if libc is None:
        return False
    try:
        # -3 = M_MMAP_THRESHOLD, -1 = M_TRIM_THRESHOLD
        return bool(libc.mallopt(-3, int(threshold))) and bool(libc.mallopt(-1, int(trim)))
    except AttributeError:
        return False


@contextmanager
def merged_lora(model: Any, enabled: bool = True) -> Iterator[None]:
    """Merge every LoRA adapter into its base weight for the block; restore the exact base weights after.

    Unmerged adapters add two small matmuls per adapted projection per decoded token, which on a CPU
    cost more than their FLOPs. PEFT's own ``unmerge`` subtracts the delta again, which in bf16 does
    not give the original weights back; we copy them instead. Sampling then uses ``W + BA`` rounded
    to the base dtype (identical in fp32 up to summation order).
    """
    if not enabled:
        yield
        return
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [(m, m.get_base_layer().weight.detach().clone()) for m in layers]  # type: ignore[operator]
    with torch.no_grad():
        model.merge_adapter()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, w in saved:
                m.get_base_layer().weight.copy_(w)  # type: ignore[operator]
                m.merged_adapters.clear()


@contextmanager
def skinny_linear(model: Any, max_rows: int = 64) -> Iterator[None]:
    """During the block, a no-grad ``nn.Linear`` call on at most ``max_rows`` rows computes ``W @ xᵀ``.

    Decoding feeds each projection 16 rows (one token per sequence). For ``x @ Wᵀ`` with so few rows
    the CPU GEMM packs the whole weight on every call; ``W @ xᵀ`` (the weight as the left, large
    operand) does not. On the 2-core AVX2 machine the 210 projections of a SmolLM2 decode step took
    80 ms as ``F.linear`` and 60 ms as ``(W @ xᵀ)ᵀ``, its 49k-row LM head 38 → 23 ms (fp32, cold
    caches; ``benchmarks/grpo_phases.py`` has the step-level effect). Same products, other summation
    order: logits agree to rounding, not bit for bit, so this is used for GRPO rollouts only, never
    for evaluation. fp32 only: in bf16 on the same machine ``W @ xᵀ`` was no faster for the
    projections and slower for the head (84 vs 59 ms). Larger inputs, other dtypes and anything
    under autograd or off the CPU take ``F.linear``.
    """
    from torch import nn
    from torch.nn import functional as F

    patched = []
    for m in model.modules():
        if type(m) is nn.Linear and "forward" not in m.__dict__:

            def forward(x: Tensor, _m: nn.Linear = m) -> Tensor:
                w = _m.weight
                if (
                    torch.is_grad_enabled()
                    or x.device.type != "cpu"
                    or x.numel() > max_rows * w.shape[1]
                    or not (x.dtype == w.dtype == torch.float32)
                ):
                    return F.linear(x, w, _m.bias)
                x2 = x.reshape(-1, w.shape[1]).t()
                y = torch.mm(w, x2) if _m.bias is None else torch.addmm(_m.bias.unsqueeze(1), w, x2)
                return y.t().view(*x.shape[:-1], w.shape[0])  # a transposed view: no copy

            m.forward = forward  # type: ignore[method-assign,assignment]
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# Architectures whose causal-LM forward computes its logits as exactly ``lm_head(hidden[:, keep])``
# (checked in transformers' modeling files: no soft-capping, scaling or bias added after the head)
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "qwen3_5",
        "qwen3_5_text",
        "qwen3_next",
        "phi3",
        "olmo2",
        "smollm3",
    }
)


def plain_fp32_head(model: Any) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` of the LM head when the log-probs can come from the hidden states instead of
    the logits (:func:`saereward.rl.loss.head_log_softmax`): an architecture whose logits are exactly
    ``lm_head(hidden)`` (:data:`PLAIN_HEAD_MODEL_TYPES`), a plain frozen fp32 ``nn.Linear`` head that
    no one else has patched (an accelerate hook, an adapter). ``None`` otherwise."""
    from torch import nn

    from saereward.model.lm import unwrap

    base = unwrap(model)
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or "forward" in head.__dict__:
        return None
    w = head.weight
    if w.dtype != torch.float32 or w.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None
    return w, head.bias


@contextmanager
def head_returns_hidden(model: Any) -> Iterator[None]:
    """During the block the model's LM head returns its input, so ``model(...).logits`` is the final
    hidden states at the kept positions, ``[B, n, d]`` (only where :func:`plain_fp32_head` holds)."""
    from saereward.model.lm import unwrap

    head = unwrap(model).get_output_embeddings()
    head.forward = _identity
    try:
        yield
    finally:
        del head.forward


@contextmanager
def cpu_sdpa_gqa() -> Iterator[None]:
    """During the block, transformers' SDPA attention hands CPU tensors to
    ``scaled_dot_product_attention(..., enable_gqa=True)`` with the grouped key and value heads, instead
    of first repeating them to every query head (``repeat_kv``).

    transformers takes that path only without a mask (on CUDA a mask sends it to the math kernel);
    PyTorch's CPU flash kernel takes grouped heads with a mask. The repeated keys and values are
    neither copied nor saved for the backward: on SmolLM2 (9 query, 3 KV heads) 34 MB less per GRPO
    micro-batch of 4 × 64 tokens. Same outputs and query gradients bit for bit; the key and value
    gradients sum the query heads' contributions in another order (rounding).
    """
    from transformers.integrations import sdpa_attention

    own = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if own is None or _torch_version() < (2, 5):  # enable_gqa came with PyTorch 2.5
        yield
        return

    def use_gqa(attention_mask: Tensor | None, key: Tensor, *args: Any, **kwargs: Any) -> bool:
        return key.device.type == "cpu" or bool(own(attention_mask, key, *args, **kwargs))

    sdpa_attention.use_gqa_in_sdpa = use_gqa
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = own


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _identity(x: Tensor) -> Tensor:
    return x


def install_lean_lora(model: Any) -> int:
    """Give every PEFT LoRA ``Linear`` of ``model`` a leaner forward; returns how many were patched.

    PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: a multiply and an add over the
    whole ``[tokens, out]`` output per adapted projection, in the forward and again in the backward
    (210 projections on SmolLM2). Here the scale multiplies the ``[tokens, r]`` activations and the
    add is the ``beta = 1`` of one ``addmm``, into the base layer's output where that is a plain
    ``nn.Linear``'s: the same function (rounding aside). The input that ``A``
    saves for its weight gradient is rebuilt in the backward where it is a lean RMSNorm's output
    (:func:`saereward.rl.rebuild.rebuilt_input`). Any case this does
    not cover (adapters disabled or merged, several adapters, dropout, LoRA variants such as DoRA,
    extra arguments, mixed dtypes outside autocast) falls back to PEFT's own forward.
    """
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for m in model.modules():
        if not isinstance(m, LoraLinear) or getattr(m, "_saereward_lean", False):
            continue
        m.forward = _lean_lora_forward(m, m.forward)  # type: ignore[method-assign]
        m._saereward_lean = True  # type: ignore[assignment]
        n += 1
    return n


def _lean_lora_forward(m: Any, peft_forward: Any) -> Any:
    from torch import nn
    from torch.nn import functional as F

    wide = bf16cpu.installed(m.base_layer)  # bf16 products through fp32 GEMM (CPU without bf16 units)

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs or m.disable_adapters or m.merged or len(m.active_adapters) != 1:
            return peft_forward(x, *args, **kwargs)
        name = m.active_adapters[0]
        if (
            name not in m.lora_A
            or name in getattr(m, "lora_variant", {})
            or not isinstance(m.lora_dropout[name], nn.Identity)
        ):
            return peft_forward(x, *args, **kwargs)
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        lead = x.shape[:-1]
        result = m.base_layer(x.reshape(-1, x.shape[-1]))  # 2-D: the sum below can go into it
        xin = m._cast_input_dtype(x, a.dtype)
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and not (result.dtype == xin.dtype == b.dtype):
            return peft_forward(x, *args, **kwargs)
        xin2 = xin.reshape(-1, xin.shape[-1])
        if wide and result.dtype == torch.bfloat16:
            out = result + bf16cpu.linear(bf16cpu.linear(xin2, a) * m.scaling[name], b)
            return out.view(*lead, out.shape[-1])
        with rebuilt_input(x) if xin is x else contextlib.nullcontext():
            h = F.linear(xin2, a)  # saves its input, rebuilt in the backward where a lean norm made it
        h = h * m.scaling[name]
        # the sum goes into the base output in place only where no one else holds it (a plain
        # nn.Linear's fresh output); autocast casts addmm's operands, not addmm_'s
        if autocast or not plain_linear(m.base_layer):
            out = torch.addmm(result, h, b.t())
        else:  # the same product, into the base output (no [tokens, out] copy first)
            out = result.addmm_(h, b.t())
        return out.view(*lead, out.shape[-1]).to(result.dtype)

    return forward


__all__ = [
    "cpu_sdpa_gqa",
    "install_lean_lora",
    "merged_lora",
    "mmap_large_allocations",
    "skinny_linear",
]
