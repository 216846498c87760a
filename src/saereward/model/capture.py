"""Capture the residual stream at decoder-block outputs, in a plain forward or during ``generate()``.

``with ResidualCapture(model, layers=[12]) as cap: model(**batch)`` records the output of block 12
(= ``hidden_states[13]``, see :mod:`saereward.model.lm`) as ``cap.sequence(12) -> [B, T, d]``.

During ``model.generate()`` the hook fires once for the prefill (``[B, P, d]``, every prompt position,
left pads included) and once per decode step (``[B, 1, d]``, the token sampled at the previous step).
Concatenating them along time gives the residual at sequence positions ``0 .. P + n - 2`` of the
returned ``[B, P + n]`` ids: every position except the very last sampled token, which generate never
feeds back through the model. :meth:`ResidualCapture.sequence` pads that last position with zeros when
asked for the full length, and :meth:`ResidualCapture.valid_length` says how many positions are real.
Left padding needs no special handling: generate keeps the pads at the front, so positions line up.

This is what lets rewards and discovery read hidden states without a second forward pass. Beam search
reorders the batch between steps and is not supported (sampling and greedy are).

The hooks store detached copies (optionally cast and moved to ``store_device``) unless ``keep_grad``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from saereward.model.lm import decoder_layers, resolve_layer


def block_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder block's output (tensor, tuple or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return output[0]
    hs = getattr(output, "hidden_states", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"unexpected decoder-block output type {type(output).__name__}")


class ResidualCapture:
    """Context manager that records decoder-block outputs at ``layers``.

    Args:
        model: any model :func:`saereward.model.lm.decoder_layers` understands (PEFT-wrapped too).
        layers: block indices; negative counts from the end.
        store_dtype: cast stored tensors to this dtype (``None`` keeps the model's).
        store_device: move stored tensors here (``None`` keeps them where they are).
        keep_grad: store the live tensors (for a training forward) instead of detached copies.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int],
        *,
        store_dtype: torch.dtype | None = None,
        store_device: str | torch.device | None = None,
        keep_grad: bool = False,
    ) -> None:
        self.model = model
        self.layers: list[int] = sorted({resolve_layer(model, int(layer)) for layer in layers})
        if not self.layers:
            raise ValueError("ResidualCapture needs at least one layer")
        self.store_dtype = store_dtype
        self.store_device = store_device
        self.keep_grad = keep_grad
        self._chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- context manager ----------------------------------------------------------------------------
    def __enter__(self) -> ResidualCapture:
        blocks = decoder_layers(self.model)
        for layer in self.layers:
            self._handles.append(blocks[layer].register_forward_hook(self._make_hook(layer)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            h = block_output(output)
            if not self.keep_grad:
                h = h.detach()
            if self.store_dtype is not None or self.store_device is not None:
                # copy=True: ``.to`` returns the live tensor itself when dtype and device already match
                h = h.to(
                    device=self.store_device or h.device,
                    dtype=self.store_dtype or h.dtype,
                    copy=not self.keep_grad,
                )
            elif not self.keep_grad:
                h = h.clone()  # decoder blocks may reuse buffers in later steps
            self._chunks[layer].append(h)

        return hook

    # -- results ------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget everything recorded (hooks stay registered)."""
        for chunks in self._chunks.values():
            chunks.clear()

    def chunks(self, layer: int) -> list[torch.Tensor]:
        """The raw per-call tensors for ``layer``: one per forward (prefill, then each decode step)."""
        return self._chunks[resolve_layer(self.model, layer)]

    def valid_length(self, layer: int | None = None) -> int:
        """Number of sequence positions recorded so far for ``layer`` (default: the first layer)."""
        chunks = self.chunks(self.layers[0] if layer is None else layer)
        return sum(c.shape[1] for c in chunks)

    def sequence(self, layer: int, total_len: int | None = None) -> torch.Tensor:
        """Residuals at ``layer`` as ``[B, T, d]`` aligned with sequence positions.

        After a plain forward ``T`` is the input length. After ``generate()`` pass
        ``total_len = output_ids.shape[1]``: positions never fed through the model (the last sampled
        token) are zero. Raises if nothing was recorded or if ``total_len`` is shorter than the record.
        """
        chunks = self.chunks(layer)
        if not chunks:
            raise RuntimeError(f"no activations recorded at layer {layer}: run a forward inside the context")
        seq = torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]
        if total_len is not None:
            if total_len < seq.shape[1]:
                raise ValueError(f"total_len {total_len} < recorded length {seq.shape[1]}")
            if total_len > seq.shape[1]:
                pad = seq.new_zeros(seq.shape[0], total_len - seq.shape[1], seq.shape[2])
                seq = torch.cat([seq, pad], dim=1)
        return seq


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as ``generate()`` computes them: ``cumsum(mask) - 1``, >= 0.

    Use them when re-forwarding a left-padded sequence so that it matches what generation saw.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


class _StopForward(Exception):
    """Raised by the hook on the deepest captured block to skip the rest of the model."""


@torch.no_grad()
def forward_residuals(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
    *,
    store_dtype: torch.dtype | None = None,
    stop_early: bool = True,
) -> dict[int, torch.Tensor]:
    """One forward over (left-padded) ``input_ids``; return ``{layer: [B, T, d]}`` block outputs.

    With ``stop_early`` (the default) a hook on the deepest requested block raises once its output
    is recorded, so the blocks above it and the unembedding never run: capturing layer 15 of
    SmolLM2's 30 costs about half a forward. Blocks run in order in every HF decoder, so everything
    requested has been recorded by then; the result is identical to a full forward (tested).
    The inputs are moved to the model's device; the outputs stay there.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with ResidualCapture(model, layers, store_dtype=store_dtype) as cap:
        handle = None
        if stop_early:

            def stop(_module: nn.Module, _inputs: Any, _output: Any) -> None:
                raise _StopForward

            # registered after the capture hook on the same block, so it fires after the record
            handle = decoder_layers(model)[cap.layers[-1]].register_forward_hook(stop)
        try:
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
        except _StopForward:
            pass
        finally:
            if handle is not None:
                handle.remove()
        return {layer: cap.sequence(layer) for layer in cap.layers}
