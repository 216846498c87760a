"""Activations rebuilt in the backward instead of saved for it, bit for bit.

The training forward of a LoRA model saves, for each adapter's ``A`` weight gradient, the adapted
projection's input. Two kinds of those inputs are cheap to compute again from tensors that autograd
keeps anyway:

* an RMSNorm's output (the input of the q/k/v and gate/up projections), from the norm's input, which
  the norm saves for its own backward (:func:`install_lean_norms`, with the lean LoRA forward of
  :func:`saereward.rl.patches.install_lean_lora` calling :func:`rebuilt_input`);
* a gated MLP's ``silu(g)·u`` (the down projection's input), from ``g`` and ``u``, which
  :class:`_SiluMul` saves (:func:`install_lean_mlp`).

Either way a saved-tensor hook, active only around the one product that saves the input, keeps a
saved view of it as its geometry and a :class:`_Maker`: the same operations on the same inputs, so
the same bits, run once in the backward however many products saved the tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: the attribute under which a lean RMSNorm's output carries its :class:`_Maker`
_TAG = "_saereward_rebuild"

#: MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (checked
#: against transformers' modeling files), for :func:`install_lean_mlp`.
GATED_MLP_CLASSES = frozenset(
    {
        "LlamaMLP",
        "MistralMLP",
        "Olmo2MLP",
        "Qwen2MLP",
        "Qwen3MLP",
        "Qwen3MoeMLP",
        "Qwen3NextMLP",
        "Qwen3_5MLP",
        "SmolLM3MLP",
    }
)


def _storage_key(t: Tensor) -> tuple[int, int] | None:
    """The storage's address and size (not the storage: a reference would keep it alive)."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, a tensor subclass)
        return None
    return s.data_ptr(), s.nbytes()


class _Maker:
    """Computes one registered tensor again, once: the saved views of it share the result."""

    __slots__ = ("fn", "geometry", "tensor")

    def __init__(self, fn: Callable[[], Tensor], t: Tensor) -> None:
        self.fn = fn
        self.tensor: Tensor | None = None
        self.geometry = (tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().nbytes())

    def __call__(self) -> Tensor:
        if self.tensor is not None:
            return self.tensor
        with torch.no_grad():
            t = self.fn()
        if (tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().nbytes()) != self.geometry:
            raise RuntimeError("a rebuilt activation came back with another layout than the forward's")
        self.tensor = t
        return t


class _Rebuild:
    """A saved view of a registered storage, kept as its geometry and the storage's :class:`_Maker`."""

    __slots__ = ("make", "offset", "shape", "stride")

    def __init__(self, t: Tensor, make: _Maker) -> None:
        self.make = make
        self.shape, self.stride, self.offset = tuple(t.shape), t.stride(), t.storage_offset()

    def tensor(self) -> Tensor:
        return self.make().as_strided(self.shape, self.stride, self.offset)


def _rebuild_hooks(x: Tensor, make: _Maker) -> Any:
    """Saved-tensor hooks that keep every saved view of ``x``'s storage as a :class:`_Rebuild` (the
    storage's address and size are compared, not the storage: a reference would keep it alive)."""
    where = _storage_key(x)

    def pack(t: Tensor) -> Tensor | _Rebuild:
        return _Rebuild(t, make) if _storage_key(t) == where else t

    def unpack(t: Tensor | _Rebuild) -> Tensor:
        return t.tensor() if isinstance(t, _Rebuild) else t

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _hooks_free() -> bool:
    """No saved-tensor hooks are active (e.g. a non-reentrant checkpoint's, which must see every
    saved tensor) and hooks are allowed."""
    autograd = torch._C._autograd
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    if top is None or enabled is None:
        return False
    return top(False) is None and bool(enabled())


def _may_hook_saved_tensors(x: Tensor) -> bool:
    """Whether a forward may install its own saved-tensor hooks: none are active already, hooks are
    allowed, and no autocast (the backward's rebuild runs outside it)."""
    return _hooks_free() and not torch.is_autocast_enabled(x.device.type)


def rebuilt_input(x: Tensor) -> Any:
    """Around a product that saves ``x`` for its backward: where ``x`` is a lean RMSNorm's output
    (:func:`install_lean_norms`) and no other saved-tensor hook or autocast is active, the saved
    ``x`` is rebuilt from the norm's input in the backward; otherwise a no-op context."""
    make = getattr(x, _TAG, None)
    if make is None or not _may_hook_saved_tensors(x):
        return contextlib.nullcontext()
    return _rebuild_hooks(x, make)


def install_lean_norms(model: Any) -> int:
    """Let the output of every RMSNorm of ``model`` be rebuilt in the backward; returns how many norms
    were patched.

    Under autograd (no autocast, no other saved-tensor hook) the norm's output carries a
    :class:`_Maker` (the norm's own forward on its input); a LoRA ``A`` product that would save it for
    its weight gradient saves that instead (:func:`rebuilt_input`), and the backward computes it once
    from the norm's input, which the norm saves for its own backward: two ``[tokens, hidden]`` tensors
    less per decoder layer (q/k/v's input and gate/up's). Otherwise the norm runs as it is.
    """
    n = 0
    for m in model.modules():
        if not type(m).__name__.endswith("RMSNorm") or "forward" in m.__dict__:
            continue
        m.forward = _lean_norm_forward(m.forward)  # type: ignore[method-assign]
        n += 1
    return n


def _lean_norm_forward(own_forward: Any) -> Any:
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = own_forward(x, *args, **kwargs)
        if args or kwargs or not isinstance(out, Tensor) or not torch.is_grad_enabled():
            return out
        if not _may_hook_saved_tensors(x):
            return out
        version = x._version

        def again() -> Tensor:
            if x._version != version:
                raise RuntimeError("an RMSNorm input was modified in place before the backward")
            return own_forward(x)

        setattr(out, _TAG, _Maker(again, out))
        return out

    return forward


def _silu_mul(g: Tensor, u: Tensor) -> Tensor:
    """``silu(g) * u``: the one expression both :class:`_SiluMul` and its rebuild in the backward
    compute, so the two agree bit for bit."""
    return torch.nn.functional.silu(g) * u


class _SiluMul(torch.autograd.Function):
    """``silu(g) * u`` saving only ``g`` and ``u`` for the backward, which recomputes ``silu(g)``.

    Autograd saves ``silu(g)`` as well (for the product's gradient): one ``[tokens, intermediate]``
    tensor per layer more. The forward and both gradients are the same operations autograd runs
    (``silu``, ``mul``, ``silu_backward``), so the results are equal bit for bit. ``share`` (optional,
    a dict): where the backward finds ``silu(g)`` if the rebuild of the product, which runs just before
    it, has computed it (:func:`_silu_mul_sharing`); it is computed again otherwise.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, u: Tensor, share: dict[str, Tensor] | None = None) -> Tensor:
        ctx.save_for_backward(g, u)
        ctx.share = share
        return _silu_mul(g, u)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        g, u = ctx.saved_tensors
        s = ctx.share.pop("silu", None) if ctx.share is not None else None
        dg = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            du = grad * (torch.nn.functional.silu(g) if s is None else s)
        else:
            du = None
        return dg, du, None


def _silu_mul_sharing(g: Tensor, u: Tensor, share: dict[str, Tensor]) -> Tensor:
    """:func:`_silu_mul`, leaving ``silu(g)`` in ``share`` for :class:`_SiluMul`'s backward."""
    s = share["silu"] = torch.nn.functional.silu(g)
    return s * u


def install_lean_mlp(model: Any) -> int:
    """Give every gated SiLU MLP of ``model`` (:data:`GATED_MLP_CLASSES`) a forward that, under
    autograd, saves two ``[tokens, intermediate]`` tensors less per layer; returns how many were patched.

    * the activation keeps ``g`` and ``u`` only, not ``silu(g)`` (:class:`_SiluMul`);
    * the down projection's input ``silu(g)·u``, which a LoRA adapter's ``A`` saves for its weight
      gradient, is rebuilt from ``g`` and ``u`` in the backward (:func:`_rebuild_hooks` around the
      down projection), and the activation's backward, which runs next, reuses that ``silu(g)``. On the GRPO
      benchmark's micro-batch of 4 × 64 tokens that is 47 MB of the 272 MB the update saves.
      Skipped under another saved-tensor hook (a non-reentrant checkpoint's) and under autocast.

    Same values and gradients bit for bit. Anything else (another activation, a patched activation
    or MLP forward, no gradient needed) keeps the module's own forward.
    """
    from torch import nn
    from transformers.activations import SiLUActivation

    silu_forwards = (nn.SiLU.forward, SiLUActivation.forward)
    n = 0
    for m in model.modules():
        act = getattr(m, "act_fn", None)
        if (
            type(m).__name__ not in GATED_MLP_CLASSES
            or "forward" in m.__dict__
            or act is None
            or "forward" in act.__dict__
            or type(act).forward not in silu_forwards
        ):
            continue
        m.forward = _lean_mlp_forward(m, m.forward)  # type: ignore[method-assign]
        n += 1
    return n


def _lean_mlp_forward(m: Any, own_forward: Any) -> Any:
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs or not torch.is_grad_enabled():
            return own_forward(x, *args, **kwargs)
        g, u = m.gate_proj(x), m.up_proj(x)
        if not _may_hook_saved_tensors(x):
            return m.down_proj(_SiluMul.apply(g, u))
        share: dict[str, Tensor] = {}
        h = _SiluMul.apply(g, u, share)
        with _rebuild_hooks(h, _Maker(lambda: _silu_mul_sharing(g, u, share), h)):
            return m.down_proj(h)

    return forward


__all__ = ["GATED_MLP_CLASSES", "install_lean_mlp", "install_lean_norms", "rebuilt_input"]
