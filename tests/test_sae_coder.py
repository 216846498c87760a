"""TopKSAE: init, the encode/decode formulas, loss terms, input normalization, geometric median."""

from __future__ import annotations

import pytest
import torch

from saereward.errors import SaeRewardError
from saereward.sae import kernels
from saereward.sae.coder import (
    SAEConfig,
    TopKSAE,
    change_basis,
    fvu,
    geometric_median,
    random_directions,
    random_rotation,
    rotate_state,
    unit_mean_norm_scale,
    unit_rows,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sae(d=16, m=64, k=4, seed=0, dtype=torch.float64, **kw) -> TopKSAE:
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=m, k=k, **kw), seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(d, generator=g, dtype=dtype))
        sae.b_enc.copy_(0.05 * torch.randn(m, generator=g, dtype=dtype))
    return sae


def test_config_validates():
    with pytest.raises(SaeRewardError, match="k=9"):
        SAEConfig(d_in=4, d_sae=8, k=9)
    with pytest.raises(SaeRewardError, match="normalize_input"):
        SAEConfig(d_in=4, d_sae=8, k=2, normalize_input="layer_norm")  # type: ignore[arg-type]
    with pytest.raises(SaeRewardError, match="input_scale"):
        SAEConfig(d_in=4, d_sae=8, k=2, input_scale=0.0)


def test_init_matches_the_recipe():
    sae = TopKSAE(SAEConfig(d_in=8, d_sae=32, k=4), seed=3)
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert torch.equal(sae.b_enc, torch.zeros(32)) and torch.equal(sae.b_dec, torch.zeros(8))
    assert sae.W_enc.t().is_contiguous()  # transposed storage: latent rows are contiguous


def test_init_directions_follow_their_distribution():
    """Uniform draws are flat (entry kurtosis 1.8), normal ones Gaussian (3); both unit rows, seeded."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kurtosis = {}
    for dist in ("uniform", "normal"):
        w = random_directions(400, 500, dist, gen())
        torch.testing.assert_close(w.norm(dim=1), torch.ones(400, dtype=torch.float64))
        assert torch.equal(w, random_directions(400, 500, dist, gen()))
        z = w * 500**0.5
        kurtosis[dist] = float(z.pow(4).mean() / z.pow(2).mean() ** 2)
    assert kurtosis["uniform"] == pytest.approx(1.8, abs=0.05)
    assert kurtosis["normal"] == pytest.approx(3.0, abs=0.1)
    assert torch.equal(
        random_directions(3, 4, "normal", gen()),
        unit_rows(torch.randn(3, 4, generator=gen(), dtype=torch.float64)),
    )
    a = TopKSAE(SAEConfig(d_in=8, d_sae=32, k=4), seed=3, init_dist="uniform")
    b = TopKSAE(SAEConfig(d_in=8, d_sae=32, k=4), seed=3)
    assert torch.equal(b.W_dec, random_directions(32, 8, "normal", torch.Generator().manual_seed(3)).float())
    assert not torch.equal(a.W_dec, b.W_dec)
    with pytest.raises(SaeRewardError, match="init_dist='cauchy' is unknown: use one of uniform, normal"):
        random_directions(2, 2, "cauchy", None)  # type: ignore[arg-type]


def test_change_basis_gives_the_sae_of_rotated_inputs():
    """``change_basis(sae, R)`` reads ``x @ R`` as ``sae`` reads ``x``: same codes, rotated recon; R.T undoes it."""
    rot = random_rotation(16, 3)
    torch.testing.assert_close(rot @ rot.t(), torch.eye(16, dtype=torch.float64))
    assert torch.equal(rot, random_rotation(16, 3)) and not torch.equal(rot, random_rotation(16, 4))
    sae = _sae(normalize_input="unit_mean_norm", input_scale=0.5)
    x = torch.randn(40, 16, dtype=torch.float64)
    rng = torch.get_rng_state()
    new = change_basis(sae, rot)
    assert torch.equal(torch.get_rng_state(), rng)  # no random init drawn and thrown away
    assert new.W_enc.stride() == sae.W_enc.stride() and new.b_enc.data_ptr() != sae.b_enc.data_ptr()
    state = {n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    for name, value in rotate_state(state, rot, block=3).items():  # blocks of rows: the same products
        torch.testing.assert_close(value, getattr(new, name))
    a, b = sae(x), new(x @ rot)
    assert torch.equal(a.top_indices.sort(1).values, b.top_indices.sort(1).values)
    torch.testing.assert_close(b.top_acts.sort(1).values, a.top_acts.sort(1).values)
    torch.testing.assert_close(b.recon, a.recon @ rot)
    torch.testing.assert_close(b.fvu, a.fvu)
    assert new.cfg == sae.cfg
    back = change_basis(new, rot.t())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(back, name), getattr(sae, name))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = TopKSAE(SAEConfig(d_in=8, d_sae=32, k=4), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = TopKSAE(SAEConfig(d_in=8, d_sae=32, k=4), seed=5)
    c = TopKSAE(SAEConfig(d_in=8, d_sae=32, k=4), seed=6)
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)


def test_state_dict_round_trip_and_dtype_moves():
    a = _sae(dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in a.state_dict().items()}
    b = TopKSAE(a.cfg, seed=99)
    b.load_state_dict(sd)
    x = torch.randn(10, 16)
    assert torch.equal(a(x).recon, b(x).recon)
    d = b.double()
    assert d.W_enc.dtype == torch.float64 and d.W_enc.t().is_contiguous()


@pytest.mark.parametrize("mode", ["eager", "fast"])
def test_encode_decode_follow_the_formulas(mode):
    sae = _sae()
    x = torch.randn(20, 16, dtype=torch.float64)
    with kernels.use_kernels(mode):
        pre = sae.pre_acts(x)
        torch.testing.assert_close(pre, (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        values, indices = sae.encode_topk(x)
        ref_vals, ref_idx = pre.topk(4, dim=-1)
        assert torch.equal(indices.sort(-1).values, ref_idx.sort(-1).values)
        torch.testing.assert_close(values.sort(-1).values, ref_vals.relu().sort(-1).values)
        dense = sae.encode(x)
        assert ((dense != 0).sum(-1) <= 4).all()
        torch.testing.assert_close(dense.gather(-1, indices), values)
        recon = sae.decode(dense)
        torch.testing.assert_close(recon, dense @ sae.W_dec + sae.b_dec)
        torch.testing.assert_close(sae.decode_topk(values, indices), recon)
        torch.testing.assert_close(sae(x).recon, recon)


def test_leading_dims_are_kept():
    sae = _sae()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out = sae(x)
    assert out.recon.shape == (2, 5, 16) and out.top_acts.shape == (2, 5, 4)
    assert sae.encode(x).shape == (2, 5, 64)
    torch.testing.assert_close(out.recon.reshape(10, 16), sae(x.reshape(10, 16)).recon)


def test_wrong_width_is_a_user_error():
    with pytest.raises(SaeRewardError, match="d_in=16"):
        _sae()(torch.randn(3, 8, dtype=torch.float64))


def test_loss_terms():
    sae = _sae()
    x = torch.randn(50, 16, dtype=torch.float64)
    out = sae(x)
    err = x - out.recon
    torch.testing.assert_close(out.mse, err.pow(2).mean())
    torch.testing.assert_close(out.fvu, err.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    torch.testing.assert_close(out.fvu, fvu(x, out.recon))
    assert out.auxk.item() == 0.0


@pytest.mark.parametrize("mode", ["eager", "fast"])
def test_auxk_is_the_dead_latents_fit_to_the_residual(mode):
    sae = _sae()
    x = torch.randn(40, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::5] = True  # 13 dead latents
    with kernels.use_kernels(mode):
        out = sae(x, dead_mask=dead, k_aux=6)
    pre = sae.pre_acts(x)
    masked = pre.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(6, dim=-1)  # no ReLU
    e_hat = torch.zeros(40, 64, dtype=torch.float64).scatter(1, idx, vals) @ sae.W_dec  # no bias
    resid = x - out.recon
    want = (e_hat - resid).pow(2).sum() / (resid - resid.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.auxk, want)


def test_auxk_uses_at_most_the_dead_latents_and_trains_them():
    sae = _sae()
    x = torch.randn(40, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 7]] = True
    out = sae(x, dead_mask=dead, k_aux=512)
    out.auxk.backward()
    assert out.auxk > 0
    touched = sae.W_dec.grad.abs().sum(1) > 0
    assert touched[[3, 7]].all() and touched.sum() == 2  # residual is detached: only the dead rows learn


def test_input_normalization_is_undone_on_output():
    plain = _sae()
    s = 0.25
    scaled = TopKSAE(
        SAEConfig(d_in=16, d_sae=64, k=4, normalize_input="unit_mean_norm", input_scale=s),
        dtype=torch.float64,
    )
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(30, 16, dtype=torch.float64) * 4
    out = scaled(x)
    ref = plain(x * s)
    torch.testing.assert_close(out.recon, ref.recon / s)
    torch.testing.assert_close(out.fvu, ref.fvu)
    torch.testing.assert_close(scaled.decode(scaled.encode(x)), out.recon)
    torch.testing.assert_close(scaled.decode_topk(*scaled.encode_topk(x)), out.recon)


def test_unit_mean_norm_scale():
    x = torch.randn(100, 8) * 7
    s = unit_mean_norm_scale(x)
    assert abs(float((x * s).norm(dim=1).mean()) - 1.0) < 1e-5
    with pytest.raises(SaeRewardError):
        unit_mean_norm_scale(torch.zeros(3, 4))


def test_geometric_median_is_robust_and_optimal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(201, 3, generator=g, dtype=torch.float64)
    x[:20] += 1000.0  # outliers drag the mean, not the median
    med = geometric_median(x)
    assert med.norm() < 0.5 < x.mean(0).norm()

    def cost(y):
        return (x - y).norm(dim=1).sum()

    for _ in range(20):  # a local minimum of a convex function: no random nudge improves it
        assert cost(med) <= cost(med + 1e-3 * torch.randn(3, generator=g, dtype=torch.float64))
    one_d = torch.tensor([[0.0], [1.0], [2.0], [10.0], [50.0]], dtype=torch.float64)
    torch.testing.assert_close(
        geometric_median(one_d, iters=500), torch.tensor([2.0], dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_geometric_median_rejects_empty():
    with pytest.raises(SaeRewardError):
        geometric_median(torch.zeros(0, 4))


def test_decoder_maintenance():
    sae = _sae()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64, dtype=torch.float64))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(64, dtype=torch.float64))
    torch.testing.assert_close(unit_rows(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_encoder_only_copy_encodes_the_same_and_refuses_to_decode():
    sae = _sae()
    enc = sae.encoder_only()
    x = torch.randn(7, 16, dtype=torch.float64)
    assert enc.W_enc.data_ptr() == sae.W_enc.data_ptr() and enc.W_dec.numel() == 0
    assert torch.equal(enc.encode(x), sae.encode(x))
    assert all(
        a is not b and torch.equal(a, b) for a, b in zip(enc.encode_topk(x), sae.encode_topk(x), strict=True)
    )
    for decode in (
        lambda: enc.decode(sae.encode(x)),
        lambda: enc.decode_topk(*sae.encode_topk(x)),
        lambda: enc(x),
    ):
        with pytest.raises(SaeRewardError, match="no decoder"):
            decode()
