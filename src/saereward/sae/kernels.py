"""Fast TopK-SAE kernels, each with the eager reference it must agree with.

The SAE forward is ``pre = (x - b_dec) @ W_enc + b_enc``, keep the top-k of each row, ReLU, then
``recon = acts @ W_dec + b_dec``. Written densely (the *eager* reference below), a training step costs
three ``[N, M]`` matmuls forward and backward plus dense ``[N, M]`` gradients, although only ``k`` of
the ``M`` latents of a row are ever non-zero (k=32 of M=9216 here). The *fast* path exploits that:

* **Selection in bf16.** The encoder matmul is the one unavoidable dense product. It runs in bf16
  (fp32 master weights are cast per call, the product accumulates in fp32; the bias rides in the GEMM
  as an extra column of ones), which this class of CPU (AVX512-BF16) and every recent GPU does 3-4x
  faster than fp32, and is followed by the top-k block by block while the block is still in cache. On
  CPU the blocks multiply a weight packed once per step for oneDNN (:func:`_block_product`) and the
  top-k ranks the values' bits as integers (:func:`topk_rows`). The selected values keep bf16 rounding
  (relative error <= 2^-8, i.e. an FVU change ~1e-5); the choice only differs from fp32 at near-ties
  at the k-th place. Gradients are exact given the choice.
* **Sparse decoder.** ``acts @ W_dec`` is ``F.embedding_bag(idx, W_dec, per_sample_weights=acts)``:
  a gather over the k active rows (as sparsify's ``utils.decoder_impl`` does).
* **Sparse backward.** The gradient w.r.t. the pre-activations is non-zero only at the top-k
  positions, so ``dW_enc = X^T G`` with ``G`` a sparse ``[N, M]`` matrix of ``N*k`` entries. sparsify's
  CPU path (``fused_encoder.py``) materializes ``[N, k, d]`` contributions and ``index_add``-s them;
  we instead *transpose the sparsity pattern once* (a stable argsort of the ``N*k`` latent ids, shared
  by encoder and decoder) so each weight row becomes a bag of the tokens that selected it, and reuse
  the embedding_bag kernel: ``dW[m] = sum_{(n,j): idx[n,j]=m} g[n,j] * X[n]``. ``dW_dec`` is the same
  with ``(acts, grad_recon)``; ``d acts`` are dot products walked latent by latent (each ``W_dec`` row
  read once). ``b_dec`` gets ``-W_enc @ db_enc`` (a mat-vec); ``x`` (when asked) a gather over W_enc.
* **AuxK for (almost) free.** AuxK picks ``k_aux`` (512) pre-activations per row among the ``D``
  *dead* latents. Those pre-activations are read out of the selection's matmul blocks (no second
  encoder pass) into a masked dense ``[N, D]`` matrix; decoding it and its backward are bf16 GEMMs
  over the dead rows only (a gather of 512 rows per token would be 16x the main decoder's work). The
  encoder and decoder Functions take the AuxK part as a second output/input, so ``W_enc`` and
  ``W_dec`` each get one gradient tensor (the dead rows added in place) rather than a second
  zero-filled full-size one. Measured step cost at M=9216: +25% with 512 dead latents.
* **Load-tolerant CPU parallelism.** On a small shared CPU, an OpenMP op splits its work statically
  and then waits at a barrier for the slowest thread; when another process holds a core, every op
  pays a scheduler time slice (we measured ~7 ms per op on a loaded 2-core VM, i.e. small ops 20x
  slower than on one thread). The heavy kernels therefore cut their work into pieces that a small pool
  of single-threaded workers pulls from a shared queue (a worker that lost its core just takes fewer
  pieces), and :func:`cpu_step` runs the rest of a training step on one thread. On the loaded VM the
  step ran ~1.5-2x faster than with OpenMP's split (408 vs 608 ms, 224 vs 404 ms); unloaded, on par.

``W_enc`` is stored transposed (``[M, d]`` memory, exposed as the ``[d, M]`` parameter the API
promises): every sparse kernel reads or writes whole *rows* of it, and the weight gradient comes out of
embedding_bag in exactly that layout, so no step transposes a weight-sized tensor.

Both paths are deterministic on CPU for a given thread count (no atomics; each output element is
computed by exactly one piece, and piece boundaries depend only on the shapes and the worker count),
which the trainer's bit-identical resume relies on.

Switch: ``SAEREWARD_KERNELS=eager|fast`` (default ``fast``), or :func:`use_kernels` in code. The fast
path also runs on CUDA (bf16 cuBLAS selection, the same embedding_bag/argsort kernels, no worker pool)
whenever the tensors live there. ``tests/test_sae_kernels.py`` checks values *and* gradients of every
fast kernel against its eager reference.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saereward.errors import SaeRewardError
from saereward.model import lm, onednn
from saereward.threads import warm_vector_math

KernelMode = Literal["fast", "eager"]
ENV_VAR = "SAEREWARD_KERNELS"
_MODES: tuple[str, ...] = ("fast", "eager")
_local = threading.local()


def kernel_mode() -> KernelMode:
    """The active mode: a :func:`use_kernels` override, else ``$SAEREWARD_KERNELS``, else ``"fast"``."""
    mode = getattr(_local, "mode", None) or os.environ.get(ENV_VAR, "fast").strip().lower() or "fast"
    if mode not in _MODES:
        raise SaeRewardError(f"{ENV_VAR}={mode!r} is not a kernel mode: set it to fast or eager")
    return mode  # type: ignore[return-value]


@contextmanager
def use_kernels(mode: KernelMode | Literal["auto"] | None) -> Iterator[None]:
    """Force ``mode`` inside the block (``None``/``"auto"`` keeps the environment's choice)."""
    if mode in (None, "auto"):
        yield
        return
    if mode not in _MODES:
        raise SaeRewardError(f"kernel mode {mode!r} is unknown: use fast or eager")
    prev = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = prev


def select_dtype(weight: Tensor) -> torch.dtype:
    """Precision of the selection matmul (and of AuxK's matmuls) in the fast path.

    bf16 for fp32 weights on CUDA or on a CPU with native bf16; the weights' own dtype otherwise
    (fp64 weights keep fp64, so exact reference computations stay exact).
    """
    if weight.dtype == torch.float32 and (
        weight.is_cuda or (weight.device.type == "cpu" and lm.cpu_has_fast_bf16())
    ):
        return torch.bfloat16
    return weight.dtype


# --------------------------------------------------------------------------------------------------
# CPU threading: one-thread ops on the calling thread, heavy kernels fanned out to a worker pool
# --------------------------------------------------------------------------------------------------


def _workers() -> int:
    """Workers for fanned-out kernels: the thread count :func:`cpu_step` found, else torch's."""
    return getattr(_local, "workers", None) or torch.get_num_threads()


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run the block's CPU ops on the calling thread only (the pool size is remembered)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    prev = getattr(_local, "workers", None)
    _local.workers = prev or n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _local.workers = prev


@contextmanager
def cpu_step(device: torch.device | str = "cpu") -> Iterator[None]:
    """Context for one training step on CPU: plain ops on one thread, heavy SAE kernels on the pool.

    The trainer wraps forward, backward and optimizer step in it. Without it the fast kernels still
    fan out; only the small surrounding ops (losses, bias adds, Adam) keep torch's own threading.
    """
    with _one_thread(torch.device(device)):
        yield


@contextmanager
def _all_threads() -> Iterator[None]:
    """Undo :func:`cpu_step` inside a block made of a few big GEMMs (AuxK), where OpenMP is fine."""
    n = getattr(_local, "workers", None)
    if not n or torch.get_num_threads() == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


_POOL: dict[int, cf.ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: start afresh
    os.register_at_fork(after_in_child=_POOL.clear)


def _pool(workers: int) -> cf.ThreadPoolExecutor:
    with _POOL_LOCK:
        if workers not in _POOL:
            warm_vector_math()  # the workers' first math calls must not be the process's first
            main = torch.get_num_threads()
            pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="saereward-sae")
            # Each worker runs its ops on one thread. torch.set_num_threads also resets the process
            # default, so restore the caller's afterwards (a worker's own setting is per-thread).
            barrier = threading.Barrier(workers)

            def init() -> None:
                torch.set_num_threads(1)
                barrier.wait()

            for fut in [pool.submit(init) for _ in range(workers)]:
                fut.result()
            torch.set_num_threads(main)
            _POOL[workers] = pool
        return _POOL[workers]


def fanout(fn: Callable[[int], None], pieces: int, device: torch.device) -> None:
    """Call ``fn(i)`` for ``i < pieces``: inline on CUDA or with one worker, else on the worker pool.

    Pieces are handed out one at a time from a shared counter (dynamic scheduling). Each piece must
    write a disjoint part of the output, so the result does not depend on which worker ran it.
    """
    workers = min(_workers(), pieces)
    if device.type != "cpu" or workers <= 1:
        for i in range(pieces):
            fn(i)
        return
    counter = iter(range(pieces))
    lock = threading.Lock()

    def drain() -> None:
        with torch.no_grad():  # grad mode is per thread; pieces never build graphs
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                fn(i)

    for fut in [_pool(workers).submit(drain) for _ in range(workers)]:
        fut.result()


def _bounds(total: int, pieces: int) -> list[int]:
    return [total * i // pieces for i in range(pieces + 1)]


def _pieces(work: int, device: torch.device, min_work: int = 1 << 20) -> int:
    """How many pieces to cut ``work`` (multiply-adds) into: 2 per worker, none for small jobs."""
    if device.type != "cpu" or work < min_work:
        return 1
    return 2 * _workers()


# --------------------------------------------------------------------------------------------------
# Sparsity pattern: token -> latents (as selected) and latent -> tokens (for weight gradients)
# --------------------------------------------------------------------------------------------------


class Transposed(NamedTuple):
    """The ``[N, K]`` index matrix regrouped by latent: the bags that give per-row weight gradients.

    ``tokens[offsets[m] : offsets[m + 1]]`` are the rows ``n`` that selected latent ``m`` (in row
    order), ``latent`` the latent of each sorted entry, and ``order`` maps a sorted position back into
    the flattened row-major ``[N * K]`` layout.
    """

    tokens: Tensor  # [N*K] int64, token (row) ids sorted by latent
    offsets: Tensor  # [M + 1] int64, bag boundaries
    order: Tensor  # [N*K] int64, flat position of each sorted entry
    latent: Tensor  # [N*K] int64, latent id of each sorted entry


def transpose_pattern(indices: Tensor, num_latents: int) -> Transposed:
    """Sort the ``[N, K]`` latent ids by latent (stable, so the result is deterministic)."""
    flat = indices.reshape(-1)
    # ~1e5 keys: a second thread gains nothing and, on a loaded machine, costs a scheduler slice.
    with _one_thread(flat.device):
        # int32 keys sort in about half the time of int64 ones on CPU (the same stable order)
        keys = flat.to(torch.int32) if num_latents <= torch.iinfo(torch.int32).max else flat
        latent, order = torch.sort(keys, stable=True)
        latent = latent.to(torch.int64)
        counts = torch.bincount(flat, minlength=num_latents)
    offsets = torch.zeros(num_latents + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    tokens = torch.div(order, indices.shape[1], rounding_mode="floor")
    return Transposed(tokens, offsets, order, latent)


def _latent_ranges(pattern: Transposed, pieces: int) -> list[tuple[int, int, int, int]]:
    """Split latents into ``pieces`` ranges with about equal entry counts: ``(m0, m1, e0, e1)``."""
    m = pattern.offsets.numel() - 1
    total = pattern.tokens.numel()  # = offsets[-1] (every entry is in one bag), read without a device sync
    if pieces == 1:
        return [(0, m, 0, total)]
    targets = torch.tensor(_bounds(total, pieces)[1:-1], dtype=torch.int64, device=pattern.offsets.device)
    cuts = [0, *torch.searchsorted(pattern.offsets, targets).tolist(), m]
    offs = pattern.offsets[cuts].tolist()
    return [(cuts[i], cuts[i + 1], offs[i], offs[i + 1]) for i in range(pieces) if cuts[i + 1] > cuts[i]]


def scatter_rows(pattern: Transposed, coeffs: Tensor, rows: Tensor) -> Tensor:
    """``out[m] = sum_{(n, j): idx[n, j] = m} coeffs[n, j] * rows[n]`` -> ``[M, d]`` (= ``G^T @ rows``).

    The transpose of a sparse ``[N, M]`` matrix ``G`` (``coeffs`` at ``idx``) times dense ``rows``,
    computed as embedding_bags over the latent-sorted pattern: no ``[N, K, d]`` temporary, no atomics.
    """
    m = pattern.offsets.numel() - 1
    weights = coeffs.reshape(-1).index_select(0, pattern.order).to(rows.dtype)
    out = rows.new_empty(m, rows.shape[1])
    ranges = _latent_ranges(pattern, _pieces(weights.numel() * rows.shape[1], rows.device))

    def piece(i: int) -> None:
        m0, m1, e0, e1 = ranges[i]
        out[m0:m1] = F.embedding_bag(
            pattern.tokens[e0:e1],
            rows,
            pattern.offsets[m0:m1] - e0,
            mode="sum",
            per_sample_weights=weights[e0:e1],
        )

    fanout(piece, len(ranges), rows.device)
    return out


def gather_rows(indices: Tensor, coeffs: Tensor, table: Tensor) -> Tensor:
    """``out[n] = sum_j coeffs[n, j] * table[indices[n, j]]`` -> ``[N, d]`` (= ``G @ table``)."""
    n = indices.shape[0]
    coeffs = coeffs.to(table.dtype)
    pieces = _pieces(indices.numel() * table.shape[1], table.device)
    if pieces == 1:
        return F.embedding_bag(indices, table, mode="sum", per_sample_weights=coeffs)
    out = table.new_empty(n, table.shape[1])
    cuts = _bounds(n, pieces)

    def piece(i: int) -> None:
        lo, hi = cuts[i], cuts[i + 1]
        out[lo:hi] = F.embedding_bag(indices[lo:hi], table, mode="sum", per_sample_weights=coeffs[lo:hi])

    fanout(piece, pieces, table.device)
    return out


def _psw_backward(table: Tensor, rows: Tensor, idx: Tensor, offsets: Tensor, bag_of: Tensor) -> Tensor:
    """ATen's embedding_bag per-sample-weight gradient: ``out[e] = table[bag_of[e]] . rows[idx[e]]``."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(table, rows, idx, offsets, bag_of, 0, -1)


def row_dots(indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """``out[n, j] = table[indices[n, j]] . rows[n]`` -> ``[N, K]`` (reference order, one row at a time)."""
    n, k = indices.shape
    offsets = torch.arange(0, n * k, k, device=indices.device)
    bag_of = torch.arange(n, device=indices.device).repeat_interleave(k)
    return _psw_backward(rows.contiguous(), table, indices.reshape(-1), offsets, bag_of).view(n, k)


def row_dots_sorted(pattern: Transposed, indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """:func:`row_dots` walking the pairs latent by latent (``pattern``), so each ``table`` row is read once.

    Same numbers as :func:`row_dots` (each output is one dot product either way), computed without a
    ``[N, K, d]`` temporary and ~1.3x faster: consecutive dots share their ``table`` row.
    """
    rows = rows.contiguous()
    dots = rows.new_empty(pattern.tokens.numel())
    ranges = _latent_ranges(pattern, _pieces(dots.numel() * rows.shape[1], rows.device))

    def piece(i: int) -> None:
        m0, m1, e0, e1 = ranges[i]
        dots[e0:e1] = _psw_backward(
            table[m0:m1], rows, pattern.tokens[e0:e1], pattern.offsets[m0:m1] - e0, pattern.latent[e0:e1] - m0
        )

    fanout(piece, len(ranges), rows.device)
    out = torch.empty_like(dots)
    out[pattern.order] = dots
    return out.view(indices.shape)


# --------------------------------------------------------------------------------------------------
# Encoder: select the top-k latents; values and gradients touch only the selected entries
# --------------------------------------------------------------------------------------------------


class Encoded(NamedTuple):
    """Top-k selection of one batch (plus the AuxK selection when a dead mask was given).

    ``aux_acts`` ``[N, D]`` holds, for the ``D`` dead latents ``dead_ids``, the ``min(k_aux, D)`` largest
    pre-activations of each row (no ReLU) and zeros elsewhere; ``aux_mask`` marks the chosen entries.
    Both are ``None`` without dead latents. ``pattern`` (fast path, when gradients are needed) is
    ``top_indices`` grouped by latent, shared by the encoder's and the decoder's backward.
    """

    top_acts: Tensor  # [N, k] ReLU of the selected pre-activations
    top_indices: Tensor  # [N, k] int64 latent ids
    dead_ids: Tensor  # [D] int64 ids of the dead latents (empty: AuxK off)
    aux_acts: Tensor | None = None  # [N, D] chosen dead pre-activations, zeros elsewhere
    aux_mask: Tensor | None = None  # [N, D] bool, the chosen entries
    pattern: Transposed | None = None


def _dead_ids(dead_mask: Tensor | None, k_aux: int, device: torch.device) -> Tensor:
    """Ids of the dead latents (empty when AuxK is off)."""
    if dead_mask is None or k_aux <= 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return dead_mask.nonzero().reshape(-1)


def _choose_aux(pre_dead: Tensor, kk: int, mask: Tensor) -> Tensor:
    """Mark the ``kk`` largest entries of each row of ``pre_dead`` in ``mask``; return them, zeros elsewhere."""
    if kk < pre_dead.shape[1]:
        mask.scatter_(1, pre_dead.topk(kk, dim=1, sorted=False).indices, True)
    else:
        mask.fill_(True)
    return torch.where(mask, pre_dead, 0.0)


def _lowp_operands(xc: Tensor, w_rows: Tensor, b_enc: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``a @ b.T == xc @ w_rows.T + b_enc``, cast to ``dtype``.

    The bias rides inside the GEMM as an extra input column of ones (width padded to a multiple of 16):
    ``addmm`` would first broadcast-copy ``b_enc`` into the whole ``[N, M]`` output, one more pass.
    """
    n, d = xc.shape
    width = (d + 1 + 15) // 16 * 16
    a = xc.new_empty(n, width, dtype=dtype)
    a[:, :d] = xc
    a[:, d] = 1
    a[:, d + 1 :] = 0
    b = w_rows.new_empty(w_rows.shape[0], width, dtype=dtype)
    b[:, :d] = w_rows
    b[:, d] = b_enc
    b[:, d + 1 :] = 0
    return a, b


def _block_product(a: Tensor, b: Tensor, rows: int) -> Callable[[int, int], Tensor]:
    """``block(lo, hi) = a[lo:hi] @ b.T``. On CPU, when ``a`` spans several blocks of ``rows`` rows,
    through oneDNN on ``b`` packed once (:mod:`saereward.model.onednn`): a plain GEMM call packs ``b``
    again for every block (a 256 x 9,216 bf16 block took 13.3 ms against 14.5 ms on the Zen 4 VM, the
    same products). A single block gains nothing from packing first."""
    if a.device.type == "cpu" and a.shape[0] > rows and onednn.available(b.dtype):
        packed = onednn.pack(b, rows)
        return lambda lo, hi: onednn.linear(a[lo:hi], packed)
    return lambda lo, hi: a[lo:hi] @ b.t()


#: A float dtype and the signed integer type of its width: for non-negative floats the bits read as that
#: integer order like the values (and stay non-negative); negative floats read as negative integers
_ORDERED_BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def topk_rows(pre: Tensor, k: int, values: Tensor, indices: Tensor) -> None:
    """``torch.topk(pre, k, dim=1, sorted=False)`` written into ``values`` / ``indices`` (contiguous).

    On CPU, bf16 and fp32 rows are ranked by their bits read as integers, which PyTorch's top-k
    compares faster than floats (~18 % less time per 256 x 9,216 bf16 block on the Zen 4 VM): a
    row's top-k by integer is its top-k by value as long as every chosen value is >= 0 (negative
    floats read as negative integers, in reverse order). Rows where a negative value or a NaN was
    chosen (fewer than ``k`` non-negative values) are ranked again as floats. The chosen *values* are
    then exactly ``torch.topk``'s; where values tie at the k-th place the latents kept among them
    can differ (each choice is deterministic). A NaN of negative sign is not ranked first, as
    ``torch.topk`` ranks it (pre-activations are NaN only for NaN inputs or weights, which make the
    training loss non-finite).
    """
    ity = _ORDERED_BITS.get(pre.dtype)
    if ity is None or pre.device.type != "cpu":
        torch.topk(pre, k, dim=1, sorted=False, out=(values, indices))
        return
    torch.topk(pre.view(ity), k, dim=1, sorted=False, out=(values.view(ity), indices))
    redo = ~(values >= 0).all(1)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        v, i = torch.topk(pre.index_select(0, rows), k, dim=1, sorted=False)
        values[rows] = v
        indices[rows] = i


def select_topk(
    xc: Tensor,
    w_rows: Tensor,
    b_enc: Tensor,
    k: int,
    dtype: torch.dtype,
    dead_ids: Tensor | None = None,
    k_aux: int = 0,
    block_elems: int = 1 << 21,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top-k of ``pre = xc @ w_rows.T + b_enc`` per row, with ``pre`` computed in ``dtype`` (no autograd).

    Returns ``(top_pre [N, k], top_indices [N, k], aux_acts [N, D] | None, aux_mask [N, D] | None)``,
    values in ``dtype``; the AuxK part (see :class:`Encoded`) is read from the same ``pre``, so AuxK
    costs no extra encoder matmul.

    On CPU, rows go through in blocks of about ``block_elems`` pre-activations (256 rows at M=9216):
    each block's GEMM output is still in cache when top-k reads it, the full ``[N, M]`` matrix never
    exists, and the blocks are what the worker pool shares out.
    """
    n, m = xc.shape[0], w_rows.shape[0]
    rows = n if xc.device.type != "cpu" else max(64, block_elems // max(m, 1) // 64 * 64)
    block: Callable[[int, int], Tensor]
    if dtype == w_rows.dtype:
        block = lambda lo, hi: torch.addmm(b_enc, xc[lo:hi], w_rows.t())  # noqa: E731
    else:
        block = _block_product(*_lowp_operands(xc, w_rows, b_enc, dtype), rows)
    n_dead = dead_ids.numel() if dead_ids is not None else 0
    kk = min(k_aux, n_dead)
    top_pre = torch.empty(n, k, dtype=dtype, device=xc.device)
    top_idx = torch.empty(n, k, dtype=torch.int64, device=xc.device)
    aux_acts = torch.empty(n, n_dead, dtype=dtype, device=xc.device) if kk else None
    aux_mask = torch.zeros(n, n_dead, dtype=torch.bool, device=xc.device) if kk else None
    starts = list(range(0, n, rows))

    def piece(i: int) -> None:
        lo = starts[i]
        hi = min(n, lo + rows)
        pre = block(lo, hi)
        topk_rows(pre, k, top_pre[lo:hi], top_idx[lo:hi])
        if aux_acts is not None and aux_mask is not None and dead_ids is not None:
            aux_acts[lo:hi] = _choose_aux(pre.index_select(1, dead_ids), kk, aux_mask[lo:hi])

    fanout(piece, len(starts), xc.device)
    return top_pre, top_idx, aux_acts, aux_mask


class _SelectedPreacts(torch.autograd.Function):
    """The chosen pre-activations as differentiable outputs; the backward touches only them.

    Outputs ``relu(pre[n, idx[n, j]])`` (``[N, k]``) and the AuxK pre-activations ``[N, D]`` (zeros
    where not chosen), where ``pre = (x - b_dec) @ W_enc + b_enc``. The values come from the selection
    (``top_pre``, ``aux_acts``); ``xc = x - b_dec`` is handed in so the backward need not recompute it.
    Backward: ``dW_enc`` rows from the sparse top-k part (:func:`scatter_rows`) plus, for the dead rows,
    one ``[D, N] @ [N, d]`` GEMM; ``db_enc`` by index_add; ``db_dec = -W_enc @ db_enc``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        b_dec: Tensor,
        w_rows: Tensor,
        b_enc: Tensor,
        top_pre: Tensor,
        indices: Tensor,
        pattern: Transposed | None,
        xc: Tensor,
        aux_acts: Tensor | None,
        aux_mask: Tensor | None,
        dead_ids: Tensor,
    ) -> tuple[Tensor, Tensor]:
        acts = torch.relu(top_pre)
        ctx.save_for_backward(xc, w_rows, indices, acts, aux_mask, dead_ids)
        ctx.pattern = pattern
        ctx.set_materialize_grads(False)
        aux = aux_acts.clone() if aux_acts is not None else acts.new_zeros(0)
        return acts, aux

    @staticmethod
    def backward(ctx: Any, g_acts: Tensor | None, g_aux: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xc, w_rows, idx, acts, aux_mask, dead_ids = ctx.saved_tensors
        need_x, need_bdec, need_w, need_benc = ctx.needs_input_grad[:4]
        grad_x = grad_bdec = grad_w = db_enc = None
        if aux_mask is None or g_aux is None or g_aux.numel() == 0:
            g_aux = None
        with _one_thread(xc.device):
            g = torch.where(acts > 0, g_acts, 0.0) if g_acts is not None else torch.zeros_like(acts)  # ReLU'
            if need_bdec or need_benc:
                db_enc = torch.zeros(w_rows.shape[0], dtype=g.dtype, device=g.device)
                db_enc.index_add_(0, idx.reshape(-1), g.reshape(-1))
                if g_aux is not None:
                    db_enc.index_add_(0, dead_ids, g_aux.sum(0, dtype=db_enc.dtype))
            if need_w:
                pattern = ctx.pattern or transpose_pattern(idx, w_rows.shape[0])
                grad_w = scatter_rows(pattern, g, xc)
                if g_aux is not None:
                    with _all_threads():
                        grad_w.index_add_(0, dead_ids, (g_aux.t() @ xc.to(g_aux.dtype)).to(grad_w.dtype))
            if need_x:
                grad_x = gather_rows(idx, g, w_rows)
                if g_aux is not None:
                    with _all_threads():
                        w_d = w_rows.index_select(0, dead_ids).to(g_aux.dtype)
                        grad_x += (g_aux @ w_d).to(grad_x.dtype)
            if need_bdec:  # d pre / d b_dec = -W_enc, summed over tokens
                assert db_enc is not None
                grad_bdec = -(db_enc @ w_rows)
        return grad_x, grad_bdec, grad_w, db_enc if need_benc else None, *([None] * 7)


def encode_fast(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    sel_dtype: torch.dtype | None = None,
) -> Encoded:
    """Fast top-k encoder (see module doc). ``x`` ``[N, d]`` must already be input-normalized.

    The selection (matmul + top-k, and AuxK's choice) runs without autograd; :class:`_SelectedPreacts`
    then attaches the sparse backward to the chosen values. ``sel_dtype`` overrides
    :func:`select_dtype` (tests); AuxK values and matmuls use the same precision.
    """
    w_rows = W_enc.t()  # [M, d]: a free view for the transposed storage TopKSAE uses
    if not w_rows.is_contiguous():
        w_rows = w_rows.contiguous()
    dtype = sel_dtype or select_dtype(W_enc)
    with torch.no_grad(), _one_thread(x.device):
        xc = x - b_dec
        dead_ids = _dead_ids(dead_mask, k_aux, x.device)
        top_pre, top_indices, aux_acts, aux_mask = select_topk(xc, w_rows, b_enc, k, dtype, dead_ids, k_aux)
        top_pre = top_pre.to(x.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, b_dec, W_enc, b_enc))
    pattern = transpose_pattern(top_indices, w_rows.shape[0]) if needs_grad else None
    acts, aux = _SelectedPreacts.apply(
        x, b_dec, w_rows, b_enc, top_pre, top_indices, pattern, xc, aux_acts, aux_mask, dead_ids
    )
    aux_out = aux if aux_acts is not None else None
    return Encoded(acts, top_indices, dead_ids, aux_out, aux_mask, pattern)


def encode_eager(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> Encoded:
    """Reference encoder: the dense formula in the weights' dtype, differentiated by autograd."""
    pre = (x - b_dec) @ W_enc + b_enc
    top_pre, top_indices = pre.topk(k, dim=1, sorted=False)
    dead_ids = _dead_ids(dead_mask, k_aux, x.device)
    kk = min(k_aux, dead_ids.numel())
    if kk == 0:
        return Encoded(torch.relu(top_pre), top_indices, dead_ids)
    pre_dead = pre.index_select(1, dead_ids)
    mask = torch.zeros_like(pre_dead, dtype=torch.bool)
    mask.scatter_(1, pre_dead.detach().topk(kk, dim=1, sorted=False).indices, True)
    return Encoded(torch.relu(top_pre), top_indices, dead_ids, torch.where(mask, pre_dead, 0.0), mask)


# --------------------------------------------------------------------------------------------------
# Decoder: acts [N, k] at idx -> [N, d] (+ bias); AuxK: aux_acts [N, D] -> [N, d] (no bias)
# --------------------------------------------------------------------------------------------------


class _SparseDecode(torch.autograd.Function):
    """``recon = gather(W_dec, idx) . acts + bias`` and ``e_hat = aux_acts @ W_dec[dead]``, one ``W_dec`` gradient.

    Taking both reconstructions in one Function gives ``W_dec`` a single gradient tensor: the sparse
    top-k rows from :func:`scatter_rows` plus, for the dead rows, one ``[D, N] @ [N, d]`` GEMM (instead
    of a second full-size gradient that autograd would zero-fill and add).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        values: Tensor,
        indices: Tensor,
        W_dec: Tensor,
        bias: Tensor | None,
        pattern: Transposed | None,
        aux_acts: Tensor | None,
        aux_mask: Tensor | None,
        dead_ids: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(values, indices, W_dec, aux_acts, aux_mask, dead_ids)
        ctx.pattern = pattern
        ctx.set_materialize_grads(False)
        with _one_thread(values.device):
            out = gather_rows(indices, values, W_dec)
            if bias is not None:
                out.add_(bias)
            e_hat = out.new_zeros(0)
            if aux_acts is not None and dead_ids is not None:
                with _all_threads():
                    e_hat = (aux_acts @ W_dec.index_select(0, dead_ids).to(aux_acts.dtype)).to(out.dtype)
        return out, e_hat

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, grad_e: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        values, indices, W_dec, aux_acts, aux_mask, dead_ids = ctx.saved_tensors
        grad_values = grad_w = grad_bias = grad_aux = None
        if aux_acts is None or grad_e is None or grad_e.numel() == 0:
            grad_e = None
        with _one_thread(values.device):
            if grad_out is None:
                grad_out = values.new_zeros(values.shape[0], W_dec.shape[1])
            grad_out = grad_out.contiguous().to(W_dec.dtype)
            pattern = ctx.pattern or transpose_pattern(indices, W_dec.shape[0])
            if ctx.needs_input_grad[0]:
                grad_values = row_dots_sorted(pattern, indices, W_dec, grad_out).to(values.dtype)
            if ctx.needs_input_grad[2]:
                grad_w = scatter_rows(pattern, values, grad_out)
            if ctx.needs_input_grad[3]:
                grad_bias = grad_out.sum(0)
            if grad_e is not None:
                dtype = aux_acts.dtype
                with _all_threads():
                    ge = grad_e.to(dtype)
                    if ctx.needs_input_grad[5]:
                        dec_d = W_dec.index_select(0, dead_ids).to(dtype)
                        grad_aux = torch.where(aux_mask, ge @ dec_d.t(), 0.0)
                    if grad_w is not None:
                        grad_w.index_add_(0, dead_ids, (aux_acts.t() @ ge).to(grad_w.dtype))
        return grad_values, None, grad_w, grad_bias, None, grad_aux, None, None


def decode_fast(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    pattern: Transposed | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``sum_j values[n, j] * W_dec[indices[n, j]] (+ bias)`` as a gather; sparse backward (see module doc).

    ``pattern`` (from :func:`encode_fast`) saves re-sorting ``indices`` in the backward.
    """
    if not W_dec.is_contiguous():
        W_dec = W_dec.contiguous()
    return _SparseDecode.apply(values, indices, W_dec, bias, pattern, None, None, None)[0]


def decode_eager(values: Tensor, indices: Tensor, W_dec: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference decoder: scatter to a dense ``[N, M]`` code, then a dense matmul (+ bias)."""
    dense = values.new_zeros(values.shape[0], W_dec.shape[0]).scatter(1, indices, values)
    return dense @ W_dec + bias if bias is not None else dense @ W_dec


def reconstruct_fast(enc: Encoded, W_dec: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(recon [N, d], e_hat [N, d] | None)`` from :func:`encode_fast`'s output (see :class:`_SparseDecode`)."""
    if not W_dec.is_contiguous():
        W_dec = W_dec.contiguous()
    recon, e_hat = _SparseDecode.apply(
        enc.top_acts, enc.top_indices, W_dec, b_dec, enc.pattern, enc.aux_acts, enc.aux_mask, enc.dead_ids
    )
    return recon, e_hat if enc.aux_acts is not None else None


def reconstruct_eager(enc: Encoded, W_dec: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor | None]:
    """Reference: dense decode of the top-k code (+ ``b_dec``), and ``aux_acts @ W_dec[dead]`` (no bias)."""
    recon = decode_eager(enc.top_acts, enc.top_indices, W_dec, b_dec)
    if enc.aux_acts is None:
        return recon, None
    return recon, enc.aux_acts @ W_dec.index_select(0, enc.dead_ids)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
) -> Encoded:
    """Top-k encode (and AuxK choice, with ``dead_mask``) with the active kernel mode (:func:`kernel_mode`)."""
    if kernel_mode() == "fast":
        return encode_fast(x, W_enc, b_enc, b_dec, k, dead_mask=dead_mask, k_aux=k_aux)
    return encode_eager(x, W_enc, b_enc, b_dec, k, dead_mask=dead_mask, k_aux=k_aux)


def decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    pattern: Transposed | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Sparse decode (``+ bias`` when given) with the active kernel mode."""
    if kernel_mode() == "fast":
        return decode_fast(values, indices, W_dec, pattern, bias)
    return decode_eager(values, indices, W_dec, bias)


def reconstruct(enc: Encoded, W_dec: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(recon, e_hat)`` for an :class:`Encoded` from :func:`encode` (same mode): the decoder output
    with ``b_dec``, and the AuxK reconstruction of the residual (no ReLU, no bias; ``None`` without
    dead latents)."""
    if kernel_mode() == "fast":
        return reconstruct_fast(enc, W_dec, b_dec)
    return reconstruct_eager(enc, W_dec, b_dec)
