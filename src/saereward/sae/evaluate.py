"""Held-out SAE evaluation: reconstruction and sparsity on activations, and CE/KL recovered in the model.

:func:`evaluate_sae` streams over activation batches ``[N, d]`` (or ``[..., d]``) and accumulates sums
only, in float64, so the eval set never has to fit in memory. With ``x̂`` the reconstruction and ``μ``
the per-dimension mean over the *whole* eval set:

* ``fvu = Σ‖x − x̂‖² / Σ‖x − μ‖²`` and ``variance_explained = 1 − fvu``. This is exactly
  ``1 − explained_variance`` of SAELens 6.54 (``evals.py``, ``ExplainedVarianceCalculator``:
  ``1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)``; its ``explained_variance_legacy`` averages per-token ratios and
  differs). sparsify's ``ForwardOutput.fvu`` (and our coder's ``ForwardOutput.fvu``) divides by the
  variance around the *batch* mean, per batch; averaged over batches it is a mean of ratios around
  batch means, which is not what is computed here. To avoid the cancellation in ``E‖x‖² − ‖E x‖²``
  (residual streams have large means) the sums are taken around a fixed shift, the first batch's mean.
* ``mse`` = ``Σ‖x − x̂‖² / (N·d)`` (per element, as the coder's ``ForwardOutput.mse``);
  ``mse_per_token`` = ``Σ‖x − x̂‖² / N`` (SAELens's ``mse``).
* ``nmse`` = mean over tokens of ``‖x − x̂‖² / ‖x‖²`` (tokens with ``x = 0`` are skipped).
* ``cos_sim`` = mean cosine similarity of ``x`` and ``x̂``.
* ``l0`` = mean number of latents with a *nonzero* activation per token: top-k picks that the ReLU
  zeroes do not count, so ``l0 <= k``.
* ``coverage`` = ``alive_frac`` = fraction of latents that fired (> 0) on at least one eval token;
  ``dead_pct = 100·(1 − coverage)``. These are over the eval set only, not the training window.

:func:`ce_kl_recovered` splices the SAE into the model: a forward hook on decoder block ``layer`` (layer
L = output of block L, see :mod:`saereward.model.lm`) replaces the block's hidden state by ``sae(h).recon``
(or by zeros for the ablation baseline), on held-out text. With per-token next-token cross-entropy CE
and ``KL(p_clean ‖ p_other)`` averaged over scored tokens:

* ``ce_loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)`` -- SAELens's ``ce_loss_score``.
* ``kl_recovered = 1 − KL_sae / KL_zero`` -- identical to SAELens's
  ``kl_div_score = (KL_abl − KL_sae) / KL_abl``.

Scored tokens follow SAELens's ``get_recons_loss`` with ``ignore_tokens = {pad, bos}``: pad positions
(``attention_mask == 0``) and, with ``exclude_bos``, BOS positions are not scored, and the SAE splice
keeps the *clean* hidden state there (SAELens's ``torch.where(mask, recons, acts)``); the zero ablation
zeros every position, as in SAELens. A CE term predicts token ``t+1`` from position ``t`` and counts when
position ``t`` is scored and ``t+1`` is a real token; KL counts at every scored position, the last
included, so ``n_tokens_kl >= n_tokens``. Averages are over tokens pooled across all batches
(SAELens concatenates per-token values and takes one mean, so the same).

Memory: three ``[B, T, vocab]`` logit tensors live at once; keep ``batch_size * max_length`` modest for
large vocabularies (SmolLM2: 49,152 entries → 8 × 256 tokens ≈ 400 MB per tensor in fp32).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from saereward.errors import SaeRewardError
from saereward.model.capture import block_output, position_ids_from_mask
from saereward.model.lm import decoder_layers, resolve_layer
from saereward.sae.coder import TopKSAE
from saereward.sae.kernels import use_kernels
from saereward.stats import bootstrap_counts, percentile_ci

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Reconstruction and sparsity on activations
# --------------------------------------------------------------------------------------------------


class _ReconStats:
    """Streaming sums for :func:`evaluate_sae` (float64, on CPU)."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.d_in = d_in
        self.n = 0
        self.shift: Tensor | None = None  # [d] fixed centre: the first batch's mean
        self.sum_dx = torch.zeros(d_in, dtype=torch.float64)  # Σ (x - shift)
        self.sum_sq_dx = 0.0  # Σ ‖x - shift‖²
        self.sse = 0.0  # Σ ‖x - x̂‖²
        self.sum_nmse = 0.0
        self.n_nmse = 0
        self.sum_cos = 0.0
        self.sum_l0 = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.int64)
        # per bootstrap unit (a sequence, else an added batch): [n, Σ‖x − shift‖², SSE, Σ (x − shift)...]
        self.blocks: dict[Any, Tensor] = {}

    def add(
        self, x: Tensor, recon: Tensor, top_acts: Tensor, top_indices: Tensor, groups: Tensor | None = None
    ) -> None:
        """Add a batch; ``groups [N]`` labels each row's bootstrap unit (rows of one label, in any
        batch, form one block), else the batch is one block."""
        x64, r64 = x.detach().to("cpu", torch.float64), recon.detach().to("cpu", torch.float64)
        if self.shift is None:
            self.shift = x64.mean(0)
        dx = x64 - self.shift
        self.sum_dx += dx.sum(0)
        self.sum_sq_dx += float(dx.pow(2).sum())
        err = (x64 - r64).pow(2).sum(-1)  # [N]
        self.sse += float(err.sum())
        if groups is None:
            head = torch.tensor([x64.shape[0], float(dx.pow(2).sum()), float(err.sum())], dtype=torch.float64)
            self.blocks[("batch", len(self.blocks))] = torch.cat([head, dx.sum(0)])
        else:
            if groups.numel() != x64.shape[0]:
                raise ValueError(f"{groups.numel()} group labels for a batch of {x64.shape[0]} rows")
            rows = torch.cat(
                [torch.ones_like(err)[:, None], dx.pow(2).sum(-1, keepdim=True), err[:, None], dx], 1
            )
            labels, inverse = torch.unique(groups.detach().cpu(), return_inverse=True)
            sums = torch.zeros(len(labels), rows.shape[1], dtype=torch.float64).index_add_(0, inverse, rows)
            for label, block in zip(labels.tolist(), sums, strict=True):
                self.blocks[label] = self.blocks[label] + block if label in self.blocks else block
        norm_sq = x64.pow(2).sum(-1)
        nz = norm_sq > 0
        self.sum_nmse += float((err[nz] / norm_sq[nz]).sum())
        self.n_nmse += int(nz.sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x64, r64, dim=-1, eps=1e-12).sum())
        active = top_acts.detach().cpu() > 0
        self.sum_l0 += float(active.sum())
        self.fires += torch.bincount(top_indices.detach().cpu()[active], minlength=self.fires.numel())
        self.n += x64.shape[0]

    def fvu_ci(self, n_boot: int, seed: int, unit: str) -> dict[str, Any]:
        """95 % percentile CI of the FVU, resampling whole blocks (``unit``: sequences, whose tokens
        are not independent, or batches of consecutive rows); NaN with fewer than 2 blocks."""
        blocks = torch.stack(list(self.blocks.values())).numpy()  # [n_blocks, 3 + d]
        if len(blocks) < 2:
            ci = (float("nan"), float("nan"))
        else:
            pooled = bootstrap_counts(len(blocks), n_boot, seed) @ blocks  # [n_boot, 3 + d]
            ci = percentile_ci([_fvu(row[0], row[1], row[2], row[3:]) for row in pooled])
        return {
            "fvu_ci": list(ci),
            "n_blocks": len(blocks),
            "n_boot": n_boot,
            "seed": seed,
            "confidence": 0.95,
            "bootstrap_unit": unit,
        }

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise SaeRewardError("evaluate_sae got no activations: the held-out batches are empty")
        n, d = self.n, self.d_in
        fvu = _fvu(n, self.sum_sq_dx, self.sse, self.sum_dx.numpy())
        coverage = float((self.fires > 0).float().mean())
        return {
            "fvu": fvu,
            "variance_explained": 1.0 - fvu,
            "mse": self.sse / (n * d),
            "mse_per_token": self.sse / n,
            "nmse": self.sum_nmse / self.n_nmse if self.n_nmse else float("nan"),
            "cos_sim": self.sum_cos / n,
            "l0": self.sum_l0 / n,
            "dead_pct": 100.0 * (1.0 - coverage),
            "alive_frac": coverage,
            "coverage": coverage,
            "n_tokens": float(n),
        }


def _fvu(n: float, sum_sq_dx: float, sse: float, sum_dx: np.ndarray) -> float:
    """``Σ‖x − x̂‖² / Σ‖x − μ‖²`` from sums about a fixed shift (0 or 1 for constant inputs, as SAELens)."""
    total_var = sum_sq_dx - float(np.square(sum_dx).sum()) / n  # Σ‖x − μ‖²
    if total_var <= 1e-12 * max(sum_sq_dx, 1.0):
        return 0.0 if sse <= 1e-12 else 1.0
    return sse / total_var


@torch.no_grad()
def evaluate_sae(
    sae: TopKSAE,
    batches: Iterable[Tensor],
    *,
    return_fire_counts: bool = False,
    kernels: Literal["fast", "eager", "auto"] = "eager",
    n_boot: int = 0,
    seed: int = 0,
    groups: Iterable[Tensor] | None = None,
) -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``sae`` on held-out activations (see module docstring).

    Args:
        sae: the SAE; batches are moved to its device and dtype.
        batches: an iterable of ``[N, d_in]`` (or ``[..., d_in]``) residual tensors, consumed once.
        return_fire_counts: also return ``fire_counts``, an int64 ``[d_sae]`` tensor of how many eval
            tokens each latent fired on.

    ``kernels`` defaults to the exact fp32 (eager) SAE path: metrics must not carry the bf16 rounding of
    the fast training kernels.

    Returns a dict of floats: ``fvu``, ``variance_explained``, ``mse``, ``mse_per_token``, ``nmse``,
    ``cos_sim``, ``l0``, ``dead_pct``, ``alive_frac``, ``coverage``, ``n_tokens``; with ``n_boot > 0``
    also the FVU's 95 % CI (``fvu_ci``, ``n_blocks``, ``n_boot``, ``seed``, ``confidence``,
    ``bootstrap_unit``): a bootstrap that draws whole sequences when ``groups`` (one ``[N]`` label
    tensor per batch, e.g. its rows' sequence) is given, else whole batches; ``n_boot`` resamples
    from ``seed``.
    """
    stats = _ReconStats(sae.cfg.d_in, sae.cfg.d_sae)
    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    labels = iter(groups) if groups is not None else None
    for batch in batches:
        group = None if labels is None else next(labels, None)
        if labels is not None and group is None:
            raise ValueError("groups holds fewer label tensors than there are batches")
        if batch.shape[-1] != sae.cfg.d_in:
            raise SaeRewardError(
                f"activation batch has width {batch.shape[-1]} but the SAE's d_in is {sae.cfg.d_in}: "
                "the activations come from a different model or layer"
            )
        x = batch.reshape(-1, sae.cfg.d_in)
        if x.shape[0] == 0:
            continue
        with use_kernels(kernels):  # exact fp32 reference path by default: metrics, not speed
            out = sae(x.to(device=device, dtype=dtype))
        stats.add(x, out.recon, out.top_acts, out.top_indices, None if group is None else group.reshape(-1))
    result: dict[str, Any] = stats.result()
    if n_boot > 0:
        result.update(stats.fvu_ci(n_boot, seed, "batch" if groups is None else "sequence"))
    if return_fire_counts:
        result["fire_counts"] = stats.fires.clone()
    return result


# --------------------------------------------------------------------------------------------------
# CE / KL recovered with the SAE spliced into the model
# --------------------------------------------------------------------------------------------------


def _replaceblock_output(output: Any, new: Tensor) -> Any:
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise TypeError(f"cannot replace decoder-block output of type {type(output).__name__}")


class _Splice:
    """Forward hook on one decoder block that swaps its hidden state via ``fn(h) -> h'``."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.fn: Callable[[Tensor], Tensor] | None = None
        self._handle = block.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        if self.fn is None:
            return None
        return _replaceblock_output(output, self.fn(block_output(output)))

    def remove(self) -> None:
        self._handle.remove()


def _batches(tokenizer: Any, data: Any, batch_size: int, max_length: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(input_ids [B, T], attention_mask [B, T])`` from texts, id tensors or tokenizer outputs."""
    if isinstance(data, Tensor):
        data = list(data.split(batch_size)) if data.ndim == 2 else [data]
    elif isinstance(data, Mapping):
        data = [data]
    items = list(data) if isinstance(data, Sequence) else data
    if isinstance(items, list) and items and all(isinstance(t, str) for t in items):
        if tokenizer is None:
            raise SaeRewardError(
                "ce_kl_recovered got texts but no tokenizer: pass one, or pass token-id batches"
            )
        for i in range(0, len(items), batch_size):
            enc = tokenizer(
                items[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            yield enc["input_ids"], enc["attention_mask"]
        return
    for item in items:
        if isinstance(item, Tensor):
            ids = item if item.ndim == 2 else item[None]
            yield ids, torch.ones_like(ids)
        elif isinstance(item, Mapping) and "input_ids" in item:
            ids = torch.as_tensor(item["input_ids"])
            mask = item.get("attention_mask")
            yield ids, torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        else:
            raise SaeRewardError(
                f"ce_kl_recovered cannot read a batch of type {type(item).__name__}: pass texts, [B, T] "
                "token-id tensors, or mappings with input_ids and attention_mask"
            )


@torch.no_grad()
def ce_kl_recovered(
    model: nn.Module,
    tokenizer: Any,
    sae: TopKSAE,
    layer: int,
    data: Any,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    exclude_bos: bool = True,
    bos_token_id: int | None = None,
    skip_first: int = 0,
    kernels: Literal["fast", "eager", "auto"] = "eager",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """CE-loss and KL recovered when ``sae``'s reconstruction replaces the output of block ``layer``.

    Args:
        model: an HF causal LM (PEFT-wrapped too); run in its current mode, usually eval.
        tokenizer: used only when ``data`` holds texts; ``None`` for token ids.
        sae: the SAE; hidden states are cast to its dtype and back.
        layer: decoder block index (negative counts from the end).
        data: a list of texts (tokenized in batches of ``batch_size``, truncated to ``max_length``), a
            ``[B, T]`` id tensor (split into ``batch_size`` rows; no padding), or an iterable of ``[B, T]``
            id tensors or mappings with ``input_ids`` and ``attention_mask`` (left or right padding).
        exclude_bos: neither splice nor score positions holding ``bos_token_id`` (default: the
            tokenizer's, else ``model.config.bos_token_id``), as SAELens's evals do.
        skip_first: neither splice nor score the first ``skip_first`` real positions of each sequence
            either: the positions ``saereward collect`` leaves out of an SAE's training data (its
            ``skip_first``, the attention sink), so the SAE is measured where it was trained. With 0 the
            SAE replaces the sink too, whose out-of-domain reconstruction can dominate the CE. The zero
            ablation zeroes every position, these included, as SAELens's does.

        n_boot, seed: the 95 % CIs of the two recovered scores are percentile bootstraps that draw
            whole sequences (a sequence's tokens are not independent), ``n_boot`` resamples from
            ``seed``; ``n_boot=0``: no CIs.

    Returns ``ce_clean``, ``ce_sae``, ``ce_zero``, ``ce_loss_recovered``, ``kl_sae``, ``kl_zero``,
    ``kl_recovered``, ``n_tokens`` (CE terms), ``n_tokens_kl``, ``n_sequences``, and with ``n_boot``
    ``ce_loss_recovered_ci``, ``kl_recovered_ci``, ``n_boot``, ``seed``, ``confidence``,
    ``bootstrap_unit``. A recovered score is NaN when its denominator is zero (zero ablation does not
    change the model).
    """
    if skip_first < 0:
        raise SaeRewardError(f"skip_first must be >= 0, got {skip_first}")
    layer = resolve_layer(model, layer)
    exclude = _bos_token_id(model, tokenizer, bos_token_id) if exclude_bos else None
    device = next(model.parameters()).device
    recon = _SaeRecon(sae, layer, kernels)
    rows: list[Tensor] = []  # per batch [B, 7]: one row of _ROW_SUMS per sequence
    splice = _Splice(decoder_layers(model)[layer])
    try:
        for ids, mask in _batches(tokenizer, data, batch_size, max_length):
            ids, mask = ids.to(device), mask.to(device).long()
            rows.append(_score_batch(model, splice, recon, ids, mask, exclude, skip_first))
    finally:
        splice.remove()
    per_seq = torch.cat(rows).numpy() if rows else np.zeros((0, len(_ROW_SUMS)))
    totals = dict(zip(_ROW_SUMS, per_seq.sum(0).tolist(), strict=True))
    if totals["n_ce"] == 0 or totals["n_kl"] == 0:
        raise SaeRewardError(
            "ce_kl_recovered found no tokens to score: the held-out data is empty or all padding"
        )
    res: dict[str, Any] = {**_recovered(per_seq.sum(0)), "n_sequences": float(len(per_seq))}
    if n_boot > 0:
        res.update(_recovered_cis(per_seq, n_boot, seed))
    return res


def _bos_token_id(model: nn.Module, tokenizer: Any, bos_token_id: int | None) -> int | None:
    """``bos_token_id`` if given, else the tokenizer's, else ``model.config.bos_token_id`` (or ``None``)."""
    if bos_token_id is None:
        bos_token_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        if bos_token_id is None:
            bos_token_id = getattr(getattr(model, "config", None), "bos_token_id", None)
    return bos_token_id


class _SaeRecon:
    """The splice function ``h -> sae(h).recon``, in the SAE's device and dtype and back; positions where
    ``keep_clean [B, T]`` is True (set per batch) keep the clean state ``h``."""

    def __init__(self, sae: TopKSAE, layer: int, kernels: Literal["fast", "eager", "auto"]) -> None:
        self.sae, self.layer, self.kernels = sae, layer, kernels
        self.device, self.dtype, self.d_in = sae.W_enc.device, sae.W_enc.dtype, sae.cfg.d_in
        self.keep_clean: Tensor | None = None

    def __call__(self, h: Tensor) -> Tensor:
        d_in = self.d_in
        if h.shape[-1] != d_in:
            raise SaeRewardError(
                f"SAE d_in {d_in} does not match model width {h.shape[-1]} at layer {self.layer}"
            )
        flat = h.reshape(-1, d_in).to(device=self.device, dtype=self.dtype)
        with use_kernels(self.kernels):
            recon = self.sae(flat).recon.reshape(h.shape).to(device=h.device, dtype=h.dtype)
        if self.keep_clean is not None:
            recon = torch.where(self.keep_clean[..., None].to(h.device), h, recon)
        return recon


def _score_batch(
    model: nn.Module,
    splice: _Splice,
    recon: _SaeRecon,
    ids: Tensor,
    mask: Tensor,
    exclude: int | None,
    skip_first: int,
) -> Tensor:
    """Run one batch clean, with the SAE spliced in and zero-ablated; its per-sequence sums.

    Positions holding the token id ``exclude`` (BOS), and each row's first ``skip_first`` real
    positions, are neither spliced nor scored. Returns ``[B, 7]`` float64: per row, the sums named
    by :data:`_ROW_SUMS` (CE over its CE terms, KL over its scored tokens, and the two counts).
    """
    real = mask.bool()
    scored = real & (ids != exclude) if exclude is not None else real
    if skip_first > 0:
        scored &= position_ids_from_mask(mask) >= skip_first
    recon.keep_clean = ~scored
    ce_pos = scored[:, :-1] & real[:, 1:]  # [B, T-1]
    targets = ids[:, 1:]
    kw = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids_from_mask(mask),
        "use_cache": False,
    }

    def run(fn: Callable[[Tensor], Tensor] | None) -> Tensor:
        splice.fn = fn
        try:
            return torch.log_softmax(model(**kw).logits.float(), dim=-1)
        finally:
            splice.fn = None

    lp_clean = run(None)
    p_clean = lp_clean.exp()
    out = {"ce_clean": _ce_rows(lp_clean, targets, ce_pos)}
    for name, fn in (("sae", recon), ("zero", torch.zeros_like)):
        lp = run(fn)
        out[f"ce_{name}"] = _ce_rows(lp, targets, ce_pos)
        kl = (p_clean * (lp_clean - lp)).sum(-1)  # [B, T] KL(clean || spliced)
        out[f"kl_{name}"] = torch.where(scored, kl.double(), 0.0).sum(-1)
        del lp
    out["n_ce"], out["n_kl"] = ce_pos.sum(-1).double(), scored.sum(-1).double()
    return torch.stack([out[k].cpu() for k in _ROW_SUMS], dim=1)


#: the per-sequence sums of :func:`_score_batch`, in column order
_ROW_SUMS = ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "n_ce", "n_kl")


def _recovered_cis(per_seq: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """95 % percentile CIs of the recovered scores, resampling whole sequences (rows of ``per_seq``)."""
    boot = bootstrap_counts(len(per_seq), n_boot, seed) @ per_seq  # [n_boot, 7]: each resample's sums
    scores = [_recovered(row) for row in boot]
    return {
        "ce_loss_recovered_ci": list(percentile_ci([r["ce_loss_recovered"] for r in scores])),
        "kl_recovered_ci": list(percentile_ci([r["kl_recovered"] for r in scores])),
        "n_boot": n_boot,
        "seed": seed,
        "confidence": 0.95,
        "bootstrap_unit": "sequence",
    }


def _recovered(pooled: np.ndarray) -> dict[str, float]:
    """Mean CE and KL over the scored tokens, and the recovered scores, from the pooled sums
    (:data:`_ROW_SUMS` order)."""
    sums = dict(zip(_ROW_SUMS, (float(v) for v in pooled), strict=True))
    n_ce, n_kl = sums.pop("n_ce"), sums.pop("n_kl")
    m = {k: v / (n_ce if k.startswith("ce") else n_kl) for k, v in sums.items()}
    return {
        "ce_clean": m["ce_clean"],
        "ce_sae": m["ce_sae"],
        "ce_zero": m["ce_zero"],
        "ce_loss_recovered": _ratio(m["ce_zero"] - m["ce_sae"], m["ce_zero"] - m["ce_clean"]),
        "kl_sae": m["kl_sae"],
        "kl_zero": m["kl_zero"],
        "kl_recovered": 1.0 - _ratio(m["kl_sae"], m["kl_zero"]),
        "n_tokens": n_ce,
        "n_tokens_kl": n_kl,
    }


def _ce_rows(logprobs: Tensor, targets: Tensor, positions: Tensor) -> Tensor:
    """Per row, Σ −log p(target) over ``positions`` ([B, T-1]) of ``logprobs`` ([B, T, V]): ``[B]`` float64."""
    nll = -logprobs[:, :-1].gather(-1, targets[..., None]).squeeze(-1)
    return torch.where(positions, nll.double(), 0.0).sum(-1)


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and math.isfinite(den) else float("nan")
