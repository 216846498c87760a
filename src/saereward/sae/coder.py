"""The TopK sparse autoencoder: pure encode/decode math plus the ``nn.Module`` that holds the weights.

Algorithm (mechreward's, matching Gao et al. 2024 "Scaling and evaluating sparse autoencoders"):

* encode: ``pre = (x - b_dec) @ W_enc + b_enc``; keep the ``k`` largest entries of each row; ReLU.
* decode: ``recon = acts @ W_dec + b_dec``.
* init: ``W_dec`` has random unit-norm rows (seeded; isotropic directions by default, see
  :func:`random_directions`), ``W_enc = W_dec.T``, ``b_enc = 0``; the trainer
  then sets ``b_dec`` to the geometric median of a data sample (:func:`geometric_median`) and, by
  default, shrinks ``W_enc`` to ``0.577 * W_dec.T`` (``SAETrainConfig.init_enc_scale``; see
  :mod:`.train` for why and for the measurement).
* loss terms (:class:`ForwardOutput`): ``mse`` (mean squared error per element), ``fvu`` (fraction
  of variance unexplained) and ``auxk``:

  AuxK (Gao et al. App. B.1): take the ``k_aux`` largest *pre-activations among dead latents only*
  (no ReLU), decode them *without* ``b_dec``, and regress that on the detached residual
  ``e = x - recon``. We normalize by the residual's own total variance,
  ``auxk = sum((e_hat - e)^2) / sum((e - mean(e))^2)``, i.e. the fraction of the residual's variance
  the dead latents fail to explain: it is scale-free and near 1 while they explain nothing. (Gao et al.
  divide by the residual's uncentered mean square; sparsify divides by the variance of ``x`` instead
  and rescales by ``min(#dead / k_aux, 1)``; we keep mechreward's fixed ``k_aux = min(512, #dead)``.)

Input normalization (``SAEConfig.normalize_input``): with ``"unit_mean_norm"`` inputs are multiplied
by ``input_scale`` (chosen by the trainer so the mean L2 norm of a sample is 1) before encoding, and
decoder outputs are divided by it, so callers always pass and receive raw residuals. ``mse`` and
``auxk`` are measured in the normalized space the SAE sees; ``fvu`` is the same in either space.

``W_enc`` is stored transposed (memory layout ``[d_sae, d_in]``) while its shape is the API's
``[d_in, d_sae]``: the sparse kernels read and write whole latent rows (see :mod:`.kernels`).
``state_dict`` values therefore may be non-contiguous; call ``.contiguous()`` before safetensors.

The heavy lifting is in :mod:`saereward.sae.kernels` (fast sparse path + eager reference, switched by
``SAEREWARD_KERNELS``); this module only composes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saereward.config import option
from saereward.errors import SaeRewardError
from saereward.sae import kernels

NormalizeInput = Literal["none", "unit_mean_norm"]
#: distribution of a fresh SAE's random directions (each row scaled to unit norm after the draw)
InitDist = Literal["uniform", "normal"]
INIT_DISTS: tuple[InitDist, ...] = ("uniform", "normal")


@dataclass(frozen=True)
class SAEConfig:
    """Architecture of a TopK SAE (training settings live in :class:`saereward.sae.train.SAETrainConfig`)."""

    d_in: int = option(help="width of the residual stream the SAE reads (d_model)")
    d_sae: int = option(help="number of latents (dictionary size M)")
    k: int = option(help="number of active latents per token (TopK)")
    normalize_input: NormalizeInput = option(
        "none", help="input normalization: none, or unit_mean_norm (x * input_scale before encoding)"
    )
    input_scale: float = option(
        1.0,
        help="resolved multiplier for unit_mean_norm (1 / mean L2 norm of a sample), stored with the weights",
    )
    model: str | None = option(
        None, help="model spec the SAE was trained on, e.g. embedded:smollm2-135m-instruct"
    )
    layer: int | None = option(None, help="block index: layer L = output of block L = hidden_states[L+1]")

    def __post_init__(self) -> None:
        kinds = {"layer": (int, type(None)), "model": (str, type(None)), "normalize_input": (str,)}
        for name, ok in (*kinds.items(), ("input_scale", (int, float))):
            value = getattr(self, name)
            if not isinstance(value, ok) or isinstance(value, bool):
                raise SaeRewardError(f"SAE config {name}={value!r} has the wrong type: the config is corrupt")
        if self.d_in < 1 or self.d_sae < 1:
            raise SaeRewardError(f"SAE sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if not 1 <= self.k <= self.d_sae:
            raise SaeRewardError(f"SAE k={self.k} must be between 1 and d_sae={self.d_sae}: lower k")
        if self.normalize_input not in ("none", "unit_mean_norm"):
            raise SaeRewardError(
                f"normalize_input={self.normalize_input!r} is unknown: use none or unit_mean_norm"
            )
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise SaeRewardError(f"input_scale={self.input_scale} must be a positive finite number")


class ForwardOutput(NamedTuple):
    """Everything one forward pass produces; the trainer only weights and sums the loss terms."""

    recon: Tensor  # [N, d_in] reconstruction in the caller's (raw) space
    top_acts: Tensor  # [N, k] post-ReLU values of the top-k pre-activations
    top_indices: Tensor  # [N, k] int64 latent ids
    mse: Tensor  # scalar: sum of squared error / (N * d), in the normalized space
    fvu: Tensor  # scalar: sum((x - recon)^2) / sum((x - x.mean(0))^2)
    auxk: Tensor  # scalar AuxK loss (0 when no latent is dead)


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")  # a TopK SAE's parameters, in checkpoint order


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Geometric median of ``points`` ``[N, d]`` by Weiszfeld's algorithm -> ``[d]``.

    The point minimizing the sum of Euclidean distances: a robust center that, unlike the mean, is not
    dragged by the few huge-norm tokens (BOS, attention sinks) residual streams contain. Each iteration
    is the mean weighted by inverse distances; distances are floored to avoid division by zero when the
    estimate lands on a data point. Stops after ``iters`` iterations or when the step is below ``tol``
    times the scale of the data. Computed in at least fp32.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise SaeRewardError(
            f"geometric_median needs a non-empty [N, d] sample, got shape {tuple(points.shape)}"
        )
    x = points.float() if points.dtype in (torch.float16, torch.bfloat16) else points
    y = x.mean(0)
    scale = float((x - y).norm(dim=1).mean()) or 1.0
    floor = 1e-12 * scale
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(floor)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        step = float((y_new - y).norm())
        y = y_new
        if step <= tol * scale:
            break
    return y


def unit_mean_norm_scale(points: Tensor) -> float:
    """``input_scale`` for ``"unit_mean_norm"``: ``1 / mean_n ||x_n||`` over a sample ``[N, d]``."""
    mean_norm = float(points.float().norm(dim=-1).mean())
    if not (mean_norm > 0 and math.isfinite(mean_norm)):
        raise SaeRewardError(
            "cannot normalize inputs: the sample's mean norm is 0 or not finite; check the data"
        )
    return 1.0 / mean_norm


def unit_rows(w: Tensor) -> Tensor:
    """``w`` with every row scaled to unit L2 norm (rows of norm 0 stay 0)."""
    return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def random_directions(rows: int, cols: int, dist: InitDist, gen: torch.Generator | None) -> Tensor:
    """``[rows, cols]`` float64 unit rows: entries drawn i.i.d. ``U(-1, 1)`` (``"uniform"``, the
    directions of ``nn.Linear``'s kaiming-uniform init, which sparsify uses) or ``N(0, 1)``
    (``"normal"``: isotropic directions), then each row scaled to unit norm."""
    if dist == "uniform":
        w = torch.rand(rows, cols, generator=gen, dtype=torch.float64).mul_(2).sub_(1)
    elif dist == "normal":
        w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    else:
        raise SaeRewardError(f"init_dist={dist!r} is unknown: use one of {', '.join(INIT_DISTS)}")
    return unit_rows(w)


def random_rotation(d: int, seed: int) -> Tensor:
    """A seeded ``[d, d]`` float64 orthogonal matrix, uniform over the orthogonal group (the Q of a
    Gaussian matrix's QR, its columns' signs fixed by R's diagonal). Its own stream: ``2**32 + seed``."""
    gen = torch.Generator().manual_seed(2**32 + seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def change_basis(sae: TopKSAE, rot: Tensor) -> TopKSAE:
    """The SAE that reads ``x @ rot`` as ``sae`` reads ``x`` (``rot`` orthogonal ``[d_in, d_in]``).

    ``W_enc -> rot.T @ W_enc``, ``W_dec -> W_dec @ rot``, ``b_dec -> b_dec @ rot``; ``b_enc`` and the
    config stay. Codes are unchanged and reconstructions come out rotated: ``new(x @ rot).recon ==
    sae(x).recon @ rot`` up to rounding. ``change_basis(change_basis(sae, rot), rot.T)`` is ``sae``.
    The products run in float64 over blocks of rows, so the copy is the only full-size allocation.
    """
    state = rotate_state(_weights(sae), rot)
    state["b_enc"] = state["b_enc"].clone()
    return TopKSAE.from_state(sae.cfg, state)


def rotate_state(state: Mapping[str, Tensor], rot: Tensor, block: int = 8192) -> dict[str, Tensor]:
    """:func:`change_basis` on a state dict (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
    ``b_dec``): new tensors in each input's dtype, device and strides; ``b_enc`` is passed through."""
    r = rot.to(state["W_dec"].device, torch.float64)
    out = {"b_enc": state["b_enc"], "b_dec": (state["b_dec"].double() @ r).to(state["b_dec"].dtype)}
    for name in ("W_enc", "W_dec"):
        src = state[name].t() if name == "W_enc" else state[name]  # [d_sae, d_in] either way
        dst = torch.empty_like(src)
        for i in range(0, src.shape[0], block):
            dst[i : i + block].copy_(src[i : i + block].double() @ r)
        out[name] = dst.t() if name == "W_enc" else dst
    return out


def _weights(sae: TopKSAE) -> dict[str, Tensor]:
    return {n: getattr(sae, n).detach() for n in PARAM_NAMES}


def _total_variance(x: Tensor) -> Tensor:
    """``sum((x - x.mean(0))^2)`` of ``[N, d]``, floored to stay a valid divisor.

    Centered first (residual streams have large means, so ``sum(x^2) - N mean^2`` would cancel badly);
    written as three plain ops because ``Tensor.var`` is ~8x slower on one CPU thread.
    """
    return (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)


def fvu(x: Tensor, recon: Tensor) -> Tensor:
    """Fraction of variance unexplained: ``sum((x - recon)^2) / sum((x - mean(x))^2)``."""
    x2 = x.reshape(-1, x.shape[-1])
    return (x2 - recon.reshape(x2.shape)).pow(2).sum() / _total_variance(x2)


# --------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------


class TopKSAE(nn.Module):
    """TopK SAE with parameters ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``.

    Args:
        cfg: architecture.
        seed: seeds the random init of ``W_dec`` (a private generator; the global RNG is untouched).
            ``None`` draws from the global torch RNG.
        init_dist: distribution of the random directions (:func:`random_directions`).
        device, dtype: where and in which precision the weights live (fp32 for training).

    All methods accept ``[..., d_in]`` inputs of any float dtype and return the same leading shape.
    """

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        init_dist: InitDist = "normal",
    ) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = random_directions(cfg.d_sae, cfg.d_in, init_dist, gen).to(dtype)
        w = w.to(device)
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.clone().t())  # shape [d_in, d_sae], storage [d_sae, d_in]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))

    @classmethod
    def from_state(cls, cfg: SAEConfig, state: Mapping[str, Tensor]) -> TopKSAE:
        """The SAE whose parameters are ``state``'s tensors themselves (not copied; no random draw)."""
        sae = cls.__new__(cls)
        nn.Module.__init__(sae)
        sae.cfg = cfg
        for name in PARAM_NAMES:
            setattr(sae, name, nn.Parameter(state[name]))
        return sae

    def encoder_only(self) -> TopKSAE:
        """An SAE that shares this one's encoder (``W_enc``, ``b_enc``, ``b_dec``) and holds no decoder
        weights (``W_dec`` empty): it encodes as this one does; decoding raises. For callers that only
        read activations (a reward), so the ``[d_sae, d_in]`` decoder need not stay in memory."""
        sae = self.from_state(
            self.cfg,
            {
                "W_enc": self.W_enc.data,
                "b_enc": self.b_enc.data,
                "W_dec": self.W_dec.data.new_empty(0, self.cfg.d_in),
                "b_dec": self.b_dec.data,
            },
        )
        for p in sae.parameters():
            p.requires_grad_(self.W_enc.requires_grad)
        return sae

    def _decoder(self) -> Tensor:
        if self.W_dec.shape[0] != self.cfg.d_sae:
            raise SaeRewardError(
                "this SAE holds no decoder (an encoder-only copy): decode with the SAE it was made from"
            )
        return self.W_dec

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def scale(self) -> float:
        """Multiplier applied to inputs (1.0 unless ``normalize_input`` is on)."""
        return self.cfg.input_scale if self.cfg.normalize_input != "none" else 1.0

    def flat_input(self, x: Tensor) -> Tensor:
        """``[..., d_in]`` raw input -> ``[N, d_in]`` as the SAE sees it: normalized, in the weights' dtype."""
        if x.shape[-1] != self.cfg.d_in:
            raise SaeRewardError(
                f"input width {x.shape[-1]} does not match the SAE's d_in={self.cfg.d_in}: "
                "use an SAE trained on this model and layer"
            )
        x = x.reshape(-1, self.cfg.d_in).to(self.W_dec.dtype)
        s = self.scale
        return x * s if s != 1.0 else x

    def _out(self, y: Tensor, lead: tuple[int, ...]) -> Tensor:
        s = self.scale
        y = y / s if s != 1.0 else y
        return y.reshape(*lead, self.cfg.d_in)

    # -- API --------------------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense pre-activations ``(x - b_dec) @ W_enc + b_enc`` -> ``[..., d_sae]`` (fp32 reference)."""
        xn = self.flat_input(x)
        pre = (xn - self.b_dec) @ self.W_enc + self.b_enc
        return pre.reshape(*x.shape[:-1], self.cfg.d_sae)

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(values [..., k] after ReLU, indices [..., k] int64)`` of the top-k latents."""
        enc = kernels.encode(self.flat_input(x), self.W_enc, self.b_enc, self.b_dec, self.cfg.k)
        lead = tuple(x.shape[:-1])
        return enc.top_acts.reshape(*lead, self.cfg.k), enc.top_indices.reshape(*lead, self.cfg.k)

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes ``[..., d_sae]``: the top-k values in place, zeros elsewhere ("true TopK")."""
        values, indices = self.encode_topk(x)
        return values.new_zeros(*values.shape[:-1], self.cfg.d_sae).scatter(-1, indices, values)

    def decode_topk(self, values: Tensor, indices: Tensor) -> Tensor:
        """Reconstruction ``[..., d_in]`` from top-k ``values``/``indices`` (``[..., k']``, any ``k'``)."""
        lead = tuple(values.shape[:-1])
        v = values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype)
        i = indices.reshape(-1, indices.shape[-1])
        return self._out(kernels.decode(v, i, self._decoder()) + self.b_dec, lead)

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruction from dense codes ``[..., d_sae]``: ``acts @ W_dec + b_dec``."""
        lead = tuple(acts.shape[:-1])
        a = acts.reshape(-1, self.cfg.d_sae).to(self.W_dec.dtype)
        return self._out(a @ self._decoder() + self.b_dec, lead)

    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, k_aux: int = 512) -> ForwardOutput:
        """Encode, decode and measure (see :class:`ForwardOutput`); ``dead_mask`` ``[d_sae]`` bool enables AuxK."""
        lead = tuple(x.shape[:-1])
        xn = self.flat_input(x)
        enc = kernels.encode(
            xn, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, dead_mask=dead_mask, k_aux=k_aux
        )
        recon, e_hat = kernels.reconstruct(enc, self._decoder(), self.b_dec)
        sse = F.mse_loss(recon, xn, reduction="sum")  # one fused kernel forward and backward
        total_var = _total_variance(xn)
        if e_hat is not None:
            resid = (xn - recon).detach()
            auxk = F.mse_loss(e_hat, resid, reduction="sum") / _total_variance(resid)
        else:
            auxk = sse.new_zeros(())
        return ForwardOutput(
            recon=self._out(recon, lead),
            top_acts=enc.top_acts.reshape(*lead, self.cfg.k),
            top_indices=enc.top_indices.reshape(*lead, self.cfg.k),
            mse=sse / xn.numel(),
            fvu=sse / total_var,
            auxk=auxk,
        )

    # -- weight maintenance -----------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every ``W_dec`` row to unit norm (in place)."""
        self.W_dec.copy_(unit_rows(self.W_dec))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of ``W_dec.grad`` the component parallel to each (unit) decoder row.

        With unit-norm rows, a gradient step along the row only changes its norm, which the next
        re-normalization undoes; removing it lets Adam spend its step on the direction (sparsify does this).
        """
        if self.W_dec.grad is None:
            return
        w = self.W_dec
        parallel = (self.W_dec.grad * w).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel * w)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, normalize_input={c.normalize_input}"
