"""A lean decode loop for Llama-style models: preallocated KV cache and finished rows dropped.

``transformers``' ``generate()`` keeps every row of the batch until the last one ends (finished rows
decode padding), grows its KV cache with a ``torch.cat`` per layer and step, and rebuilds the attention
mask every step. On a 2-core CPU that is a large share of a GRPO rollout: profiled on SmolLM2-135M
with 16 rows, the cache's ``cat`` alone was ~12 % of a decode step, and half of GRPO's completions
end well before ``max_new_tokens``.

:func:`decode` runs the decode steps itself, after a normal HF prefill:

* each layer's keys and values live in one buffer ``[B, H_kv, P + N, D]``, written in place;
* a row that ends (an end token or a stop string) leaves the batch: the buffers are compacted to the
  rows still running (after one more forward of its last token when residuals are captured, so the
  captured positions match ``generate()``'s);
* the block is written out with the model's own weights, rotary embedding and
  ``apply_rotary_pos_emb``, and one ``scaled_dot_product_attention`` per layer on the query heads
  packed by KV head (no ``repeat_kv`` copy);
* ``skinny`` (CPU fp32, GRPO rollouts): every product is ``W @ xᵀ`` (:func:`_skinny`); q, k and v stay
  in that ``[features, rows]`` layout through RoPE (one rotation for all query and key heads), the
  attention is two batched products with the mask as an additive bias built once per step, and the
  LM head runs by vocabulary blocks (:func:`_skinny_head`);
* ``packed`` (on the skinny path): the products go through oneDNN's fp32 linear on weights reordered
  into its blocked layout once per call, each adapter folded in first (``W + s·B A``): one packed copy
  of the weights (SmolLM2: 0.54 GB) for the call, instead of MKL's ``W @ xᵀ``, which runs a few rows
  far below the CPU's GEMM rate (:func:`_pack`, :func:`_packed`). Where the weights are views of the
  checkpoint's file mapping, each block's plain weights' pages are dropped once it is packed
  (:func:`saereward.model.residency.drop_mapped_pages`): the packed copy is the only one, and they
  fault back in from the file when next read;
* ``in_place`` (on the packed path, weights in the process's own memory): the packed copy is the
  only one too. Each projection's plain weight is released as its packed copy is made (the adapters
  then run beside the packed products, not folded in), and comes back from it when the call ends:
  oneDNN's reorder back to the plain layout is exact.

Supported: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` (full attention, SiLU MLP), PEFT-wrapped
with LoRA adapters merged, disabled or active: an active adapter is applied as two small products per
projection (``W x + s·B(A x)``), so sampling from a LoRA policy needs no merged copy of the weights.
:func:`unsupported` says why another model is not; the caller then uses ``generate()``. Same
distribution as ``generate()`` with the same sampler; the random draws differ once a row has left
the batch.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from saereward.model import bf16cpu, onednn, residency
from saereward.model.lm import decoder_layers, unwrap

_ARCHES = ("llama", "qwen2")
_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_PROJ = (*_ATTN_PROJ, "gate_proj", "up_proj", "down_proj")


#: one projection as the decode loop computes it: ``x @ weightᵀ + bias + Σ (x @ Aᵀ) @ (s·B)ᵀ``
_Proj = tuple[Tensor, Tensor | None, tuple[tuple[Tensor, Tensor], ...]]


def _projection(m: Any) -> _Proj | None:
    """``(weight, bias, adapters)`` of what ``m`` computes now, or ``None`` where the loop cannot.

    ``m`` is an ``nn.Linear`` or a PEFT LoRA ``Linear``. Its active adapters that are not merged come
    back as ``(A [r, in], scaling · B [out, r])`` pairs, applied as two small products per step (no
    copy of the base weight, unlike merging). ``None``: an adapter the loop does not compute (a LoRA
    variant such as DoRA, a LoRA bias, dropout in training mode).
    """
    base = getattr(m, "base_layer", None)
    if base is None:
        return m.weight, m.bias, ()
    if getattr(m, "disable_adapters", False):
        return base.weight, base.bias, ()
    merged = set(getattr(m, "merged_adapters", []))
    adapters = []
    for name in getattr(m, "active_adapters", []):
        if name not in getattr(m, "lora_A", {}) or name in merged:
            continue
        drop = m.lora_dropout[name]
        if name in getattr(m, "lora_variant", {}) or m.lora_B[name].bias is not None:
            return None
        if not isinstance(drop, torch.nn.Identity) and drop.training:
            return None
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        dtype = base.weight.dtype
        adapters.append((a.detach().to(dtype), (b.detach() * m.scaling[name]).to(dtype)))
    return base.weight, base.bias, tuple(adapters)


_Linear = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _adapt(linear: _Linear, x: Tensor, y: Tensor, adapters: tuple[tuple[Tensor, Tensor], ...]) -> Tensor:
    """``y`` plus each adapter's ``(x Aᵀ)(s·B)ᵀ``."""
    for a, sb in adapters:
        y = y + linear(linear(x, a, None), sb, None)
    return y


def _project(linear: _Linear, x: Tensor, p: _Proj) -> Tensor:
    """``x`` through one :data:`_Proj` with ``linear`` as the product."""
    weight, bias, adapters = p
    return _adapt(linear, x, linear(x, weight, bias), adapters)


def unsupported(model: Any) -> str | None:
    """Why :func:`decode` cannot run ``model`` (``None`` when it can)."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in _ARCHES:
        return f"model type {kind!r} (supported: {', '.join(_ARCHES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "a non-SiLU MLP or tensor-parallel pretraining layout"
    if getattr(cfg, "use_sliding_window", False) or any(
        t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])
    ):
        return "sliding-window attention"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(base, "lm_head"):
        return f"unexpected module layout of {type(base).__name__}"
    for block in decoder_layers(model):
        for name in _PROJ:
            if _projection(getattr(block.self_attn if name in _ATTN_PROJ else block.mlp, name)) is None:
                return "LoRA adapters of a kind the loop does not apply (a variant such as DoRA, a LoRA bias)"
    if getattr(base.lm_head, "base_layer", None) is not None:
        return "an adapter on the LM head"
    return None


def _skinny(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ wᵀ + b`` for ``x`` ``[rows, in]`` as ``(w @ xᵀ)ᵀ``, a transposed view (see
    ``saereward.rl.patches.skinny_linear`` for why that is faster on CPU for a few rows)."""
    xt = x.t()
    y = torch.mm(w, xt) if b is None else torch.addmm(b.unsqueeze(1), w, xt)
    return y.t()


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed fp32 linear, which ``packed`` decoding uses, and it
    computes ``F.linear``'s product here (:func:`saereward.model.onednn.available`)."""
    return onednn.available(torch.float32)


def _pack(*ps: _Proj, rows: int = 16, fold: bool = True) -> _Proj:
    """Projections of one input as one oneDNN packed weight: each ``weight + Σ s·B A`` (the adapters
    folded in, in fp32), stacked along the output features (one product computes them all), reordered
    for products of about ``rows`` rows; the biases stacked likewise (zeros where one has none).
    ``fold=False``: the base weights alone are packed and the adapters stay beside the product
    (:func:`_stack_adapters`), so the packed copy unpacks to the base weights exactly. Each folded or
    stacked weight is written once, into its rows of the stack (no per-projection copy to concatenate)."""
    outs = [int(p[0].shape[0]) for p in ps]
    side = () if fold else _stack_adapters(outs, [p[2] for p in ps])
    first = ps[0][0].detach()
    if len(ps) == 1 and not side and not (fold and ps[0][2]):
        w = first  # nothing to fold or stack: packed as it is
    else:  # the adapters' A rows, if beside, ride in the packed product: its last Σr outputs are x Aᵀ
        w = first.new_empty(sum(outs) + (int(side[0][0].shape[0]) if side else 0), first.shape[1])
        lo = 0
        for (weight, _, adapters), n in zip(ps, outs, strict=True):
            _fold_into(w[lo : lo + n], weight.detach(), adapters if fold else ())
            lo += n
        if side:
            w[lo:].copy_(side[0][0])
    bias = None
    if any(p[1] is not None for p in ps):
        bias = torch.cat(
            [w.new_zeros(n) if p[1] is None else p[1].detach() for p, n in zip(ps, outs, strict=True)]
        )
        if side:
            bias = torch.cat([bias, w.new_zeros(int(side[0][0].shape[0]))])
    return onednn.pack(w, rows), bias, side


def _fold_into(out: Tensor, weight: Tensor, adapters: tuple[tuple[Tensor, Tensor], ...]) -> None:
    """``out = weight + Σ s·B A``, the same products and sums as ``torch.addmm`` one adapter at a time."""
    if not adapters:
        out.copy_(weight)
        return
    (a, sb), *rest = adapters
    torch.addmm(weight, sb, a, out=out)
    for a, sb in rest:
        out.addmm_(sb, a)


def _stack_adapters(
    outs: Sequence[int], adapters: Sequence[tuple[tuple[Tensor, Tensor], ...]]
) -> tuple[tuple[Tensor, Tensor], ...]:
    """The adapters of projections stacked along their outputs (``outs`` features each) as one
    ``(A, s·B)`` pair: every ``A`` ``[r, in]`` stacked into ``[Σr, in]``, every ``s·B`` ``[out, r]`` placed
    block-diagonally in ``[Σout, Σr]``: one more product for the whole stack (:func:`_packed`)."""
    pairs = [(i, a, sb) for i, ads in enumerate(adapters) for a, sb in ads]
    if not pairs:
        return ()
    a_all = torch.cat([a for _, a, _ in pairs])
    sb_all = a_all.new_zeros(sum(outs), a_all.shape[0])
    starts = [sum(outs[:i]) for i in range(len(outs))]
    col = 0
    for i, a, sb in pairs:
        sb_all[starts[i] : starts[i] + outs[i], col : col + a.shape[0]] = sb
        col += a.shape[0]
    return ((a_all, sb_all),)


def _packed(x: Tensor, p: _Proj) -> Tensor:
    """``x @ wᵀ + b`` ``[rows, out]`` with ``p`` from :func:`_pack` (contiguous when the adapters are
    folded in). With the adapters beside (``fold=False``) the packed product also gives ``x Aᵀ`` in its
    last ``Σr`` columns, and ``(x Aᵀ)(s·B)ᵀ`` is added to the first ``out`` (a view of the product)."""
    y = onednn.linear(x, p[0], p[1])
    for _, sb in p[2]:
        r = sb.shape[1]
        y, t = y[:, :-r], y[:, -r:]
        y.addmm_(t, sb.t())
    return y


def _skinny_project(x: Tensor, p: _Proj, out: Tensor | None = None) -> Tensor:
    """:func:`_project` with :func:`_skinny` products, each adapter's ``s·B (A xᵀ)`` added in place;
    with ``out`` (``[out_features, rows]``, contiguous) the product ``yᵀ`` is written there."""
    weight, bias, adapters = p
    xt = x.t()
    y = x.new_empty(weight.shape[0], x.shape[0]) if out is None else out
    if bias is None:
        torch.mm(weight, xt, out=y)
    else:
        torch.addmm(bias.unsqueeze(1), weight, xt, out=y)
    for a, sb in adapters:
        y.addmm_(sb, torch.mm(a, xt))
    return y.t()


class _Block:
    """One decoder block's weights, read once per decode call."""

    def __init__(self, block: Any) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.w: dict[str, _Proj] = {}
        for name in _PROJ:
            p = _projection(getattr(attn if name in _ATTN_PROJ else mlp, name))
            if p is None:
                raise ValueError("fastdecode: a LoRA adapter of a kind the loop does not apply")
            self.w[name] = p
        self.qkv_sizes = tuple(int(self.w[name][0].shape[0]) for name in ("q_proj", "k_proj", "v_proj"))
        self.ffn = int(self.w["gate_proj"][0].shape[0])
        #: ``packed`` decoding: q, k and v as one packed product, gate and up as another
        self.qkv: _Proj | None = None
        self.gate_up: _Proj | None = None
        self.ln1 = (block.input_layernorm.weight, block.input_layernorm.variance_epsilon)
        self.ln2 = (block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon)
        self.scaling = float(attn.scaling)
        self.head_dim = int(attn.head_dim)
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb


#: ``in_place``: the C heap's free pages go back to the OS after every this many blocks packed or
#: unpacked (each call costs ~2 ms on the 2-core VM; the copies overlap by at most these blocks)
_TRIM_EVERY = 3


def _batch_size(n: int, step: int = 16) -> int:
    """Rows to decode when ``n`` are needed: ``n`` rounded up to a multiple of ``step``, or 4 for ``n <= 4``.

    On the 2-core AVX2 machine, MKL's few-row products over a decode step's 210 weights (fp32, skinny,
    weights not in cache) took ~33 ms for 2-4 rows, 51 ms for 1, 65-87 ms for 6-12 and 68 ms for 16:
    so the skinny batch shrinks only to 4 rows, keeping ended rows as padding in between. oneDNN's
    packed products grow with the rows instead (Zen 4 VM, the embedded model's weights: 25.9, 30.9,
    31.6 and 34.8 ms for 4, 8, 12 and 16 rows), so packed decoding shrinks in steps of 4.
    """
    return 4 if n <= 4 else -(-n // step) * step


def _rms(x: Tensor, norm: tuple[Tensor, float]) -> Tensor:
    """The HF Llama RMSNorm: normalise in fp32, cast back, then scale."""
    w, eps = norm
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class _Weights:
    """What a decode step reads of the model, gathered once per :func:`decode` call, and the product
    ``linear(x, w, b)`` it computes with. A context manager: leaving it gives back the projection
    weights that ``in_place`` packing released (:meth:`restore`)."""

    def __init__(
        self, model: Any, device: torch.device, skinny: bool, packed: bool = False, in_place: bool = False
    ) -> None:
        base = unwrap(model)
        inner = base.model
        self.blocks = [_Block(b) for b in decoder_layers(model)]
        if getattr(base.lm_head, "base_layer", None) is not None:
            raise ValueError(f"fastdecode cannot run this model: {unsupported(model)}")
        self.head: Any = base.lm_head
        self.emb: Tensor = inner.embed_tokens.weight
        self.rotary_emb: Any = inner.rotary_emb
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.linear: _Linear = F.linear
        self.skinny = skinny and device.type == "cpu" and self.emb.dtype == torch.float32
        self.packed = packed and self.skinny and packing_available()
        self.in_place = in_place and self.packed
        #: ``packed`` with every projection and the head viewing a file mapping: the plain weights'
        #: pages are dropped once packed (:meth:`_pack_weights`), ``in_place`` or not
        self.mapped = self.packed and residency.in_file_mappings(self._plain_weights(), self._maps)
        #: ``in_place``, not ``mapped``: per block, each packed group whose plain weights were released:
        #: its key and ``(parameter, output rows)`` per projection
        self.released: list[list[tuple[str, list[tuple[Tensor, int]]]]] = [[] for _ in self.blocks]
        self.head_packed: _Proj | None = None
        if self.packed:
            try:
                self._pack_weights()
            except BaseException:
                self.restore()
                raise
        elif self.skinny:
            self.linear = _skinny
        elif bf16cpu.installed(self.head):
            # bf16 through fp32 GEMM, as the model's own (patched) nn.Linear forwards
            self.linear = bf16cpu.linear

    def __enter__(self) -> _Weights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    @functools.cached_property
    def _maps(self) -> list[tuple[int, int]]:
        """This process's file mappings, read once per call (the weights' mapping outlives the call)."""
        return residency.file_mappings()

    def _plain_weights(self) -> list[Tensor]:
        """The projections' and the LM head's weights, as the model holds them."""
        return [p[0] for blk in self.blocks for p in blk.w.values()] + [self.head.weight]

    def _pack_weights(self) -> None:
        """Every projection and the LM head as oneDNN packed weights (:func:`_pack`), for this call; q,
        k and v stacked into one, gate and up into another (one product each, fewer small calls).

        Weights in a file mapping (``mapped``): the adapters are folded in, and each block's plain
        weights' pages, then the head's, are dropped as soon as their packed copy exists
        (:func:`saereward.model.residency.drop_mapped_pages`): they fault back in from the file when
        next read. Otherwise, ``in_place``: the adapters stay beside the packed products, each
        projection's plain weight is released as soon as its packed copy exists, and the LM head is not
        packed (its weight is the embedding's too, which stays). Either way the model's weights are
        held once; without either, twice."""
        swap = self.in_place and not self.mapped
        groups = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
        groups |= {"o_proj": ("o_proj",), "down_proj": ("down_proj",)}
        for i, (blk, released) in enumerate(zip(self.blocks, self.released, strict=True)):
            w = blk.w
            weights = [w[n][0] for n in _PROJ]
            for key, names in groups.items():
                plain = [w[n] for n in names]
                p = _pack(*plain, fold=not swap)
                if key in ("qkv", "gate_up"):
                    setattr(blk, key, p)
                else:
                    w[key] = p  # its plain _Proj is no longer needed
                if swap:
                    params = [(q[0], int(q[0].shape[0])) for q in plain]
                    released.append((key, params))
                    for prm, _ in params:
                        prm.data = prm.data.new_empty(0)
            if self.mapped:  # the block's plain weights, now packed
                residency.drop_mapped_pages(weights, self._maps)
            blk.w = {"o_proj": w["o_proj"], "down_proj": w["down_proj"]}
            if swap and (i % _TRIM_EVERY == _TRIM_EVERY - 1 or i == len(self.blocks) - 1):
                residency.return_free_memory()  # the released weights' pages, before more are packed
        if not swap:  # the head is tied to the embedding, whose rows the loop reads: a second copy
            self.head_packed = _pack((self.head.weight, self.head.bias, ()))
            if self.mapped:  # the rows the loop reads come back page by page
                residency.drop_mapped_pages([self.head.weight], self._maps)

    def restore(self) -> None:
        """Give every projection that ``in_place`` packing released its weight back, unpacked from the
        packed copy (oneDNN's reorder is exact: the same bits), block by block, each block's packed
        copy dropped as its weights return (the two copies never coexist beyond one block). ``mapped``:
        the packed copy is dropped (the plain weights fault back in from the file as they are read);
        ``in_place``, the free heap it leaves goes back to the OS too, for the lowest peak (the next
        phases fault those pages in again: on the GRPO benchmark's defaults ~10 % of the step), else
        it stays for them to reuse."""
        if self.mapped:
            for blk in self.blocks:
                blk.qkv = blk.gate_up = None
                blk.w = {}
            self.head_packed = None
            if self.in_place:
                residency.return_free_memory()
            return
        for i, (blk, released) in enumerate(zip(self.blocks, self.released, strict=True)):
            if not released:
                continue
            while released:
                key, params = released.pop()
                stacked = key in ("qkv", "gate_up")
                holder = getattr(blk, key) if stacked else blk.w.pop(key)
                if stacked:
                    setattr(blk, key, None)
                dense = holder[0].to_dense()
                del holder
                lo = 0
                for prm, rows in params:  # beyond the weights' rows: the adapters' A (not kept)
                    whole = len(params) == 1 and dense.shape[0] == rows
                    prm.data = dense if whole else dense[lo : lo + rows].clone()
                    lo += rows
                del dense
            if i % _TRIM_EVERY == _TRIM_EVERY - 1 or i == len(self.blocks) - 1:
                residency.return_free_memory()  # the packed copies' pages, before more weights return

    def project(self, x: Tensor, p: _Proj) -> Tensor:
        """``x`` through one projection (with its adapters) as this decode call computes it."""
        if self.packed:
            return _packed(x, p)
        return _skinny_project(x, p) if self.skinny else _project(self.linear, x, p)


def _kv_buffers(cache: Any, B: int, P: int, T: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, key and value buffers ``[B, H_kv, T, D]`` whose first ``P`` positions are the prefill's."""
    keys, values = [], []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        kb = k.new_empty(B, k.shape[1], T, k.shape[3])
        vb = v.new_empty(B, v.shape[1], T, v.shape[3])
        kb[:, :, :P] = k
        vb[:, :, :P] = v
        keys.append(kb)
        values.append(vb)
    return keys, values


class _StepTables:
    """What every layer of one skinny decode step shares: the rotary tables ``[D, n]`` (the sign of
    ``rotate_half`` folded into the sine) and the attention mask as an additive bias ``[n·H_kv, 1, L]``."""

    def __init__(self, w: _Weights, x: Tensor, pos: Tensor, mask: Tensor, L: int, kv_heads: int) -> None:
        cos, sin = w.rotary_emb(x, pos.unsqueeze(1))  # [n, 1, D]
        half = cos.shape[-1] // 2
        self.cos = cos[:, 0].t()
        sin = sin[:, 0].t()
        self.sin = torch.cat([-sin[:half], sin[half:]])
        bias = torch.zeros(mask.shape[0], L, dtype=x.dtype, device=x.device).masked_fill_(
            ~mask[:, :L], float("-inf")
        )
        self.bias = bias[:, None, None, :].expand(-1, kv_heads, 1, L).reshape(-1, 1, L)


def _attend_skinny(
    blk: _Block, h: Tensor, tab: _StepTables, slot: int, k_buf: Tensor, v_buf: Tensor
) -> Tensor:
    """One block's attention on the skinny path, ``[n, H·D]``: q, k and v computed as ``Wᵀ``-side
    products into one ``[(H + 2 H_kv)·D, n]`` buffer, RoPE on the query and key heads at once in that
    layout, the new key and value written at ``slot``, then ``softmax(q kᵀ · scale + bias) v`` per KV
    head with its query heads packed (two batched products, no ``repeat_kv`` copy). Same math as the
    model's block (HF's ``rotate_half`` RoPE and ``scaled_dot_product_attention``), other rounding order."""
    n, D = h.shape[0], blk.head_dim
    sizes = blk.qkv_sizes
    qkv = h.new_empty(sum(sizes), n)
    if blk.qkv is not None:  # packed: one product for q, k and v
        qkv.copy_(_packed(h, blk.qkv).t())
    else:
        lo = 0
        for name, size in zip(("q_proj", "k_proj", "v_proj"), sizes, strict=True):
            _skinny_project(h, blk.w[name], out=qkv[lo : lo + size])
            lo += size
    heads, kv_heads = sizes[0] // D, sizes[1] // D
    qk = qkv[: sizes[0] + sizes[1]].view(-1, D, n)
    half = D // 2
    qk = torch.addcmul(qk * tab.cos, torch.cat([qk[:, half:], qk[:, :half]], 1), tab.sin)  # RoPE
    k_buf[:, :, slot] = qk[heads:].permute(2, 0, 1)
    v_buf[:, :, slot] = qkv[sizes[0] + sizes[1] :].view(kv_heads, D, n).permute(2, 0, 1)
    L = slot + 1
    q = qk[:heads].view(kv_heads, heads // kv_heads, D, n).permute(3, 0, 1, 2).reshape(n * kv_heads, -1, D)
    k = k_buf[:, :, :L].reshape(n * kv_heads, L, D)
    scores = torch.baddbmm(tab.bias, q, k.transpose(1, 2), alpha=blk.scaling)
    return torch.bmm(scores.softmax(-1), v_buf[:, :, :L].reshape(n * kv_heads, L, D)).view(n, -1)


def _attend(
    w: _Weights,
    blk: _Block,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    slot: int,
    k_buf: Tensor,
    v_buf: Tensor,
) -> Tensor:
    """One block's attention with the model's own ``apply_rotary_pos_emb`` and one
    ``scaled_dot_product_attention`` on the query heads packed by their KV head, ``[n, H·D]``."""
    n, D = h.shape[0], blk.head_dim
    q, k, v = (w.project(h, blk.w[name]).reshape(n, -1, 1, D) for name in ("q_proj", "k_proj", "v_proj"))
    q, k = blk.rope(q, k, cos, sin)
    kv_heads = k.shape[1]
    k_buf[:, :, slot] = k[:, :, 0]
    v_buf[:, :, slot] = v[:, :, 0]
    L = slot + 1
    a = F.scaled_dot_product_attention(
        q.reshape(n, kv_heads, -1, D),  # query heads packed by their KV head
        k_buf[:, :, :L],
        v_buf[:, :, :L],
        attn_mask=mask[:, None, None, :L],
        scale=blk.scaling,
    )
    return a.reshape(n, -1)


def _forward_token(
    w: _Weights,
    tok: Tensor,
    pos: Tensor,
    P: int,
    t: int,
    keys: list[Tensor],
    values: list[Tensor],
    mask: Tensor,
    res: dict[int, Tensor],
    rows: Tensor,
    fed: Tensor,
) -> Tensor:
    """Decode step ``t`` (after a ``P``-token prefill): feed ``tok [n]`` (position ids ``pos [n]``) through
    every block, writing its keys and values at cache position ``P + t`` and the residuals of the ``fed``
    rows at step ``t``; return the next logits ``[n, V]``."""
    slot = P + t
    x = F.embedding(tok, w.emb)
    if w.skinny:
        tab = _StepTables(w, x, pos, mask, slot + 1, keys[0].shape[1])
    else:
        cos, sin = w.rotary_emb(x, pos.unsqueeze(1))
    for li, blk in enumerate(w.blocks):
        h = _rms(x, blk.ln1)
        if w.skinny:
            a = _attend_skinny(blk, h, tab, slot, keys[li], values[li])
        else:
            a = _attend(w, blk, h, cos, sin, mask, slot, keys[li], values[li])
        x = x + w.project(a, blk.w["o_proj"])
        h = _rms(x, blk.ln2)
        if blk.gate_up is not None:  # packed: one product for gate and up
            g, u = _packed(h, blk.gate_up).split(blk.ffn, 1)
        else:
            g, u = (w.project(h, blk.w[name]) for name in ("gate_proj", "up_proj"))
        x = x + w.project(F.silu(g) * u, blk.w["down_proj"])
        if li in res:
            res[li][rows[fed], t] = x[fed].to(res[li].dtype)
    h = _rms(x, w.final_norm)
    if w.head_packed is not None:
        return _packed(h, w.head_packed)
    if w.skinny:
        return _skinny_head(h, w.head.weight, w.head.bias)
    return w.linear(h, w.head.weight, w.head.bias).contiguous()


def _skinny_head(x: Tensor, weight: Tensor, bias: Tensor | None, block: int = 4096) -> Tensor:
    """The LM head's logits ``[n, V]`` (contiguous, for the sampler) as :func:`_skinny` products, ``block``
    vocabulary rows at a time, each block's ``[block, n]`` result transposed into place while it is in
    cache. The same products as one ``W @ xᵀ`` (equal bit for bit); on the 2-core AVX2 machine with
    SmolLM2's 49k × 576 head and 16 rows: 11.9 ms, against 17.0 for the whole product and its
    transposed copy (13.6 for the product alone)."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    for lo in range(0, weight.shape[0], block):
        b = None if bias is None else bias[lo : lo + block]
        out[:, lo : lo + block] = _skinny(x, weight[lo : lo + block], b)
    return out


@torch.no_grad()
def decode(
    model: Any,
    cache: Any,
    attention_mask: Tensor,
    first_logits: Tensor,
    *,
    max_new_tokens: int,
    pick: Callable[[Tensor], Tensor],
    end_ids: set[int],
    pad_id: int,
    min_new_tokens: int = 0,
    stop: Callable[[Tensor], Tensor] | None = None,
    capture_layers: Sequence[int] = (),
    capture_dtype: torch.dtype | None = None,
    skinny: bool = False,
    packed: bool = False,
    in_place: bool = False,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Decode after a prefill; returns ``(new tokens [B, n], {layer: residuals [B, n, d]})``.

    ``cache``: the prefill's ``DynamicCache`` (``[B, H_kv, P, D]`` per layer); ``attention_mask``
    ``[B, P]``; ``first_logits`` ``[B, V]``: the prefill's logits at the last prompt position.
    ``pick(logits [r, V]) -> [r]`` chooses the next tokens (a sampler or ``argmax``); for the first
    ``min_new_tokens`` tokens it sees the end tokens' logits at ``-inf`` (``generate(min_new_tokens=)``).
    ``stop(gen [r, t]) -> [r]`` bool: rows whose generated tokens so far contain a stop string. ``n`` is the
    step at which the last row ended (or ``max_new_tokens``), as ``generate()`` returns; tokens after a
    row's end are ``pad_id``. ``residuals[layer][:, j]`` is block ``layer``'s output (``capture_layers``
    are non-negative block indices) when new token ``j`` was fed (zero where it never was: after the row's end, and the last step's token).
    ``skinny``: the ``(w @ xᵀ)ᵀ`` products (CPU fp32; other rounding order than ``F.linear``). A model whose
    linear layers :func:`saereward.model.bf16cpu.install` patched (bf16 ``load_model`` models on a CPU without
    bf16 units) decodes with :func:`saereward.model.bf16cpu.linear` too. ``packed`` (with ``skinny``,
    where :func:`packing_available`): the products through oneDNN on packed weights, adapters folded in;
    weights in a file mapping have their pages dropped meanwhile. ``in_place`` (with ``packed``, weights
    in the process's own memory): the packed copy stands in for the weights during the call, each
    released and unpacked back into, bit for bit, when the call ends (on an exception too; :class:`_Weights`).
    """
    device = first_logits.device
    with _Weights(model, device, skinny, packed, in_place) as w:
        B, P = attention_mask.shape
        keys, values = _kv_buffers(cache, B, P, P + max_new_tokens)
        mask = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
        mask[:, :P] = attention_mask.bool()
        pos = attention_mask.long().sum(1)  # the next token's position id, per row
        rows = torch.arange(B, device=device)  # original index of each running row
        out = torch.full((B, max_new_tokens), int(pad_id), dtype=torch.long, device=device)
        dtype = capture_dtype or w.emb.dtype
        res = {
            int(i): w.emb.new_zeros(B, max_new_tokens, w.emb.shape[1], dtype=dtype) for i in capture_layers
        }
        ends = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)  # per batch row: not ended yet
        logits = first_logits
        n_steps = 0
        for t in range(max_new_tokens):
            tok = torch.full((len(rows),), int(pad_id), dtype=torch.long, device=device)
            if t < min_new_tokens:
                logits.index_fill_(1, ends, float("-inf"))
            tok[alive] = pick(logits[alive] if not bool(alive.all()) else logits)
            out[rows[alive], t] = tok[alive]
            n_steps = t + 1
            done = alive & torch.isin(tok, ends)
            if stop is not None:
                done[alive] |= stop(out[rows[alive], : t + 1])
            fed = alive  # rows whose token at step t is real: their residual at t is recorded
            alive = alive & ~done
            if t + 1 == max_new_tokens or not bool(alive.any()):
                break  # as in generate(): the last sampled tokens are not fed
            need = fed if res else alive
            size = _batch_size(int(need.sum()), 4 if w.packed else 16)
            if size < len(rows):  # shrink the batch: the needed rows, padded with ended ones
                idx = torch.cat([need.nonzero().squeeze(1), (~need).nonzero().squeeze(1)])[:size]
                rows, tok, pos, mask, alive, fed = (x[idx] for x in (rows, tok, pos, mask, alive, fed))
                keys = [k[idx] for k in keys]
                values = [v[idx] for v in values]
            mask[:, P + t] = True
            logits = _forward_token(w, tok, pos, P, t, keys, values, mask, res, rows, fed)
            pos = pos + 1
        return out[:, :n_steps], {layer: r[:, :n_steps] for layer, r in res.items()}
