"""The pack score: one implementation for discovery, the G1 gate and the per-token RL reward.

For residuals ``x_t`` at the pack's layer, the SAE's **true TopK** activations ``a(t) = TopK(ReLU(
(x_t − b_dec) W_enc + b_enc))`` (the SAE's own :meth:`~saereward.sae.coder.TopKSAE.encode`, so a
feature outside the top k contributes 0) give the per-token score

    mech(t) = Σ_i w_i · a_i(t)          (w_i = +|w| helpful, −|w| harmful)

and a response's score is its mean over the response's pooled positions (see
:mod:`saereward.data.rollouts`):

    R = mean_t mech(t) = Σ_helpful |w| · pooled_a − Σ_harmful |w| · pooled_a,

which is mechreward's G1 statistic. Encoding here uses the SAE's eager fp32 reference
(``exact=True``, the default), not the training fast path whose top-k selection runs in bf16: a
score that gates a pack and then rewards a policy should not depend on bf16 rounding near ties. The RL reward uses :meth:`PackScorer.token_scores` on residuals
captured during generation and the same mask, so the reward is exactly the quantity G1 validated
(mechreward's RL reward applied ReLU to 20 columns without the TopK mask, which is not).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saereward.features.pack import FeaturePack, check_pack
from saereward.sae.coder import TopKSAE
from saereward.sae.kernels import use_kernels


class PackScorer:
    """Scores residuals with a pack through an SAE. Holds the feature ids and signed weights as tensors."""

    def __init__(
        self,
        sae: TopKSAE,
        pack: FeaturePack,
        *,
        d_model: int | None = None,
        exact: bool = True,
        chunk: int = 8192,
    ) -> None:
        """``chunk``: tokens encoded at a time (each chunk's dense ``[chunk, d_sae]`` pre-activations are
        the memory it takes: 302 MB at 8192 tokens and 9216 features, 9 MB at 256)."""
        cfg = sae.cfg
        check_pack(pack, d_sae=cfg.d_sae, d_model=d_model)
        self.sae = sae
        self.pack = pack
        self.exact = exact
        self.chunk = int(chunk)
        p = next(sae.parameters())
        self.ids = torch.tensor(pack.feature_ids, dtype=torch.long, device=p.device)
        self.weights = torch.tensor(pack.signed_weights(), dtype=torch.float32, device=p.device)

    def to(self, device: torch.device | str) -> PackScorer:
        """Move the SAE and the pack's tensors to ``device`` (in place); returns ``self``."""
        self.sae.to(device)
        self.ids = self.ids.to(device)
        self.weights = self.weights.to(device)
        return self

    @torch.no_grad()
    def feature_acts(self, x: Tensor, chunk: int | None = None) -> Tensor:
        """``[..., d] -> [..., F]`` true-TopK activations of the pack's features (``chunk`` tokens at a
        time, the scorer's own by default)."""
        chunk = self.chunk if chunk is None else int(chunk)
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        p = next(self.sae.parameters())
        with use_kernels("eager" if self.exact else None):
            out = [
                self.sae.encode(flat[i : i + chunk].to(device=p.device, dtype=p.dtype))[:, self.ids].float()
                for i in range(0, flat.shape[0], chunk)
            ]
        acts = torch.cat(out) if out else flat.new_zeros(0, len(self.ids))
        return acts.reshape(*lead, len(self.ids))

    def token_scores(self, x: Tensor) -> Tensor:
        """``mech(t)``: ``[..., d] -> [...]``."""
        return self.feature_acts(x) @ self.weights

    def pooled_scores(self, x: Tensor, mask: Tensor) -> Tensor:
        """``R`` per row: masked mean of ``mech(t)`` over ``mask``; ``x [B, T, d]``, ``mask [B, T]`` -> ``[B]``.

        A row with an empty mask scores 0.
        """
        return masked_mean(self.token_scores(x), mask)

    def response_scores(self, tokens: Tensor, offsets: Tensor) -> Tensor:
        """``R`` per response from packed per-token residuals ``tokens [N, d]`` with ``offsets [R + 1]``."""
        return segment_mean(self.token_scores(tokens), offsets)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``[B, T]`` values, ``[B, T]`` mask -> ``[B]`` mean over the mask (0 where the mask is empty)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def segment_mean(values: Tensor, offsets: Tensor) -> Tensor:
    """Mean of ``values [N, ...]`` over segments ``offsets[r]:offsets[r+1]`` -> ``[R, ...]`` (0 if empty)."""
    lengths = (offsets[1:] - offsets[:-1]).to(values.device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    out = values.new_zeros((len(lengths), *values.shape[1:]))
    out.index_add_(0, seg, values)
    return out / lengths.clamp_min(1).to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))


@torch.no_grad()
def pooled_sae_acts(
    sae: TopKSAE, tokens: Tensor, offsets: Tensor, chunk: int = 8192, *, exact: bool = True
) -> Tensor:
    """Per response, the mean true-TopK activation of every SAE feature: ``[N, d]`` -> ``[R, d_sae]``.

    Discovery's input (Cohen's d per feature on these); chunked so memory stays ``chunk x d_sae``.
    """
    p = next(sae.parameters())
    d_sae = sae.cfg.d_sae
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    out = torch.zeros(len(lengths), d_sae, dtype=torch.float32, device=p.device)
    with use_kernels("eager" if exact else None):
        for i in range(0, tokens.shape[0], chunk):
            acts = sae.encode(tokens[i : i + chunk].to(device=p.device, dtype=p.dtype)).float()
            out.index_add_(0, seg[i : i + chunk].to(p.device), acts)
    return (out / lengths.clamp_min(1).to(out).unsqueeze(1)).cpu()


def pack_scores_from_pooled(pooled: Tensor, ids: Sequence[int], weights: Sequence[float]) -> Tensor:
    """``R`` from already pooled activations ``[R, d_sae]`` (equal to :meth:`PackScorer.response_scores`)."""
    idx = torch.as_tensor(list(ids), dtype=torch.long)
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    return pooled[:, idx].float() @ w
