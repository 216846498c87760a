"""The policy loss of a GRPO update, as pure tensor math (no I/O, no model): log-probs and entropies of
the sampled tokens (:func:`selective_log_softmax`), the per-token KL penalty (:func:`kl_term`) and the
clipped surrogate that turns per-token advantages into the loss (:func:`surrogate_loss`).
:func:`head_log_softmax` takes the final hidden states and the frozen LM head instead of the logits,
which it never stores."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``log softmax(x / T)[id]`` (and, if asked, the entropy) of one chunk, with a hand-written backward.

    The forward makes two ``[.., V]`` fp32 temporaries (the shifted logits and their exponentials)
    and keeps neither: it saves the chunk's logits (alive anyway) and the log-normaliser ``[..]``;
    the backward rebuilds ``softmax = exp(x / T − lse)`` once and returns
    ``(onehot − softmax) · g / T``. Autograd through ``gather − logsumexp`` under activation
    checkpointing would compute the division, the log-sum-exp and the softmax again.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, ids: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Tensor]:
        z = logits.float() / temperature  # a copy: the logits stay as they are for the backward
        top = z.amax(-1, keepdim=True)
        z.sub_(top)  # shifted in place: exp cannot overflow, and one [.., V] pass fewer than logsumexp
        e = torch.exp(z)
        sum_e = e.sum(-1)
        log_sum = sum_e.log()
        lp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - log_sum
        # entropy = log Σe − Σ e·z / Σe (the shift cancels), on e in place
        ent = log_sum - e.mul_(z).sum(-1) / sum_e if entropy else torch.zeros_like(lp)
        ctx.save_for_backward(logits, ids, top.squeeze(-1) + log_sum)  # the log-normaliser of x / T
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g: Tensor, _g_ent: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        logits, ids, lse = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.exp(logits.float() / t - lse.unsqueeze(-1))
        grad.mul_(-g.unsqueeze(-1))
        grad.scatter_add_(-1, ids.unsqueeze(-1), g.unsqueeze(-1))
        if t != 1.0:
            grad.div_(t)
        return grad.to(logits.dtype), None, None, None


def selective_log_softmax(
    logits: Tensor, ids: Tensor, chunk: int = 2, temperature: float = 1.0, entropy: bool = True
) -> tuple[Tensor, Tensor]:
    """``log p(ids)`` and the entropy per position of ``logits / temperature``; ``[B, T, V]`` -> ``[B, T]`` each.

    Row-chunked: the fp32 log-softmax of a large vocabulary never exists for more than ``chunk``
    rows, forward or backward (:class:`_SelectiveLogSoftmax`; with 2 rows × 64 positions × 49k
    vocabulary a chunk's fp32 temporaries are ~25 MB each; 8 rows put ~0.7 GB on the GRPO step's
    peak RSS). Chunks come from ``split`` (its backward concatenates the chunk gradients once;
    slicing would allocate a zero-filled copy of the whole ``[B, T, V]`` gradient per chunk).
    ``entropy=False`` skips the entropy (zeros are returned), e.g. for reference log-probs.
    """
    logps, ents = [], []
    for lg, idx in zip(logits.split(chunk), ids.split(chunk), strict=True):
        lp, ent = _SelectiveLogSoftmax.apply(lg, idx, temperature, entropy)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents)


class HeadWorkspace:
    """The two chunk buffers of :func:`head_log_softmax`, kept from call to call.

    Fresh, they are ~25 MB each at 128 rows of a 49k vocabulary: above the 4 MiB mmap threshold that
    the GRPO trainer fixes, so every call mapped and page-faulted them anew unless the C heap happened
    to hold a free chunk that large. A workspace shared by a phase's calls (the GRPO trainer's
    reference micro-batches) maps them once. Not for two calls at once (a call's buffers are overwritten by the
    next).
    """

    def __init__(self) -> None:
        self._bufs: tuple[Tensor, Tensor] | None = None

    def buffers(self, like: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Two buffers of at least ``n`` elements of ``like``'s dtype and device (grown when short)."""
        b = self._bufs
        if b is None or b[0].numel() < n or b[0].dtype != like.dtype or b[0].device != like.device:
            self._bufs = None  # the old pair goes before the new one is allocated
            b = self._bufs = (like.new_empty(n), like.new_empty(n))
        return b


class _HeadLogSoftmax(torch.autograd.Function):
    """``log softmax((h Wᵀ + b) / T)[id]`` (and, if asked, the entropy) from the final hidden states,
    the LM head's ``[N, V]`` logits never stored: they exist one chunk of rows at a time, in two
    ``[V, chunk]`` buffers reused by every chunk.

    The head is frozen (LoRA), so the only gradient is the hidden states'. Per row it is
    ``g / T · (W[id] − softmax · W)``: the forward computes ``softmax · W`` (``[N, d]``) while the chunk's
    softmax is at hand and saves it; the backward is a gather and a product, ``[N, d]``. The eager path
    (the model's logits, then :class:`_SelectiveLogSoftmax`) writes the ``[N, V]`` logits, then in the
    backward rebuilds the softmax and writes a ``[N, V]`` gradient for the head's product: four
    ``[N, V]`` tensors more, each freshly allocated (and page-faulted in) per micro-batch.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ids: Tensor,
        temperature: float,
        entropy: bool,
        chunk: int,
        workspace: HeadWorkspace | None,
    ) -> tuple[Tensor, Tensor]:
        N, V = h.shape[0], weight.shape[0]
        need_grad = bool(ctx.needs_input_grad[0])
        lp = h.new_empty(N)
        ent = h.new_zeros(N)
        sw = h.new_empty(N, h.shape[1]) if need_grad else h.new_empty(0)  # softmax · W per row
        c = max(1, min(int(chunk), N))
        z_buf, e_buf = (workspace or HeadWorkspace()).buffers(h, V * c)
        for lo in range(0, N, c):
            r = min(c, N - lo)
            # vocabulary-major [V, r]: W @ hᵀ and Wᵀ @ eᵀ ran at 150-170 GFLOP/s on the 2-core CPU where
            # h @ Wᵀ and e @ W ran at 90-130 (128 rows, SmolLM2's 49k × 576 head)
            z = torch.mm(weight, h[lo : lo + r].t(), out=z_buf[: V * r].view(V, r))
            if bias is not None:
                z.add_(bias.unsqueeze(1))
            z.div_(temperature)
            z.sub_(z.amax(0, keepdim=True))  # shifted: exp cannot overflow
            e = torch.exp(z, out=e_buf[: V * r].view(V, r))
            sum_e = e.sum(0)
            log_sum = sum_e.log()
            cols = torch.arange(r, device=h.device)
            lp[lo : lo + r] = z[ids[lo : lo + r], cols] - log_sum
            if need_grad:
                sw[lo : lo + r] = torch.mm(weight.t(), e).t() / sum_e.unsqueeze(1)
            if entropy:  # log Σe − Σ e·z / Σe (the shift cancels)
                ent[lo : lo + r] = log_sum - e.mul_(z).sum(0) / sum_e
        ctx.save_for_backward(ids, sw, weight)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g: Tensor, _g_ent: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        ids, sw, weight = ctx.saved_tensors
        grad = (weight[ids] - sw).mul_((g / ctx.temperature).unsqueeze(-1))
        return grad, None, None, None, None, None, None, None


def head_log_softmax(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ids: Tensor,
    temperature: float = 1.0,
    entropy: bool = True,
    chunk: int = 128,
    workspace: HeadWorkspace | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`selective_log_softmax` of ``hidden @ weightᵀ + bias`` without the ``[B, T, V]`` logits.

    ``hidden`` ``[B, T, d]`` (what the frozen LM head reads), ``weight`` ``[V, d]``, ``ids`` ``[B, T]``;
    returns ``log p(ids)`` and the entropy, ``[B, T]`` each (:class:`_HeadLogSoftmax`; ``chunk`` rows of
    logits at a time, in the buffers of ``workspace`` if given: :class:`HeadWorkspace`). fp32 only: the
    caller falls back to the model's logits for other dtypes.
    """
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32 or weight.requires_grad:
        raise ValueError("head_log_softmax: needs fp32 hidden states and a frozen fp32 head")
    B, T, d = hidden.shape
    lp, ent = _HeadLogSoftmax.apply(
        hidden.reshape(B * T, d),
        weight,
        bias,
        ids.reshape(B * T),
        float(temperature),
        entropy,
        chunk,
        workspace,
    )
    return lp.view(B, T), ent.view(B, T)


def kl_term(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL penalty: mechreward's ``(logπ − logπ_ref)²`` or k3 ``exp(r) − r − 1`` with ``r = ref − logπ``."""
    if kind == "sq":
        return (logp - ref_logp) ** 2
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def surrogate_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    beta: float,
    kl: str,
    clip_eps: float,
    n_tokens: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss + β·KL, averaged over masked tokens; ``[B, N]`` inputs.

    ``n_tokens`` overrides the divisor (data-parallel ranks divide by the global token count, so the
    summed gradients equal a single process's).
    """
    m = mask.float()
    n = (m.sum() if n_tokens is None else n_tokens).clamp_min(1)
    ratio = torch.exp(logp - old_logp)
    un = ratio * adv
    cl = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    pg = -torch.minimum(un, cl)
    loss_tok = pg
    stats: dict[str, float] = {}
    if ref_logp is not None and beta > 0:
        k = kl_term(logp, ref_logp, kl)
        loss_tok = loss_tok + beta * k
        stats["kl"] = float((k.detach() * m).sum() / n)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    stats["clip_frac"] = float((clipped.float() * m).sum() / n)
    return (loss_tok * m).sum() / n, stats


__all__ = ["HeadWorkspace", "head_log_softmax", "kl_term", "selective_log_softmax", "surrogate_loss"]
