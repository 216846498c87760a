"""Every fast SAE kernel against its eager reference: values *and* gradients.

float64 makes the fast path's selection exact (it selects in the weights' dtype unless they are fp32),
so fast and eager must agree to rounding. fp32 checks the bf16 selection separately: the same top-k
almost everywhere, and identical gradients once the selection is the same.
"""

from __future__ import annotations

import pytest
import torch

from saereward.errors import SaeRewardError
from saereward.sae import kernels
from saereward.sae.coder import SAEConfig, TopKSAE


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(d, m, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(m, d, generator=g, dtype=dtype)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    w_enc = (w_dec + 0.3 * torch.randn(m, d, generator=g, dtype=dtype)).t().contiguous()
    b_enc = 0.1 * torch.randn(m, generator=g, dtype=dtype)
    b_dec = 0.5 * torch.randn(d, generator=g, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (w_enc, b_enc, w_dec, b_dec)]


def _loss_and_grads(mode, x, params, k, dead=None, k_aux=0, sel_dtype=None):
    """A loss touching every output (top acts, recon, AuxK e_hat); returns outputs and grads."""
    w_enc, b_enc, w_dec, b_dec = params
    for t in (*params, x):
        t.grad = None
    if mode == "fast":
        enc = kernels.encode_fast(x, w_enc, b_enc, b_dec, k, dead_mask=dead, k_aux=k_aux, sel_dtype=sel_dtype)
        recon, e_hat = kernels.reconstruct_fast(enc, w_dec, b_dec)
    else:
        enc = kernels.encode_eager(x, w_enc, b_enc, b_dec, k, dead_mask=dead, k_aux=k_aux)
        recon, e_hat = kernels.reconstruct_eager(enc, w_dec, b_dec)
    g = torch.Generator().manual_seed(7)
    probe = torch.randn(recon.shape, generator=g, dtype=recon.dtype).to(recon.device)
    # weights by latent id, not by slot: top-k's order within a row is unspecified (CUDA's differs from
    # the CPU's), so a slot-weighted loss would differ between devices for the same selection
    slot_w = (enc.top_indices % 7).to(enc.top_acts.dtype)
    loss = (recon * probe).sum() + (enc.top_acts.pow(2) * slot_w).sum()
    if e_hat is not None:
        loss = loss + (e_hat * probe.flip(0)).sum()
    loss.backward()
    order = enc.top_indices.argsort(-1)
    out = {
        "acts": enc.top_acts.gather(-1, order).detach(),
        "idx": enc.top_indices.gather(-1, order),
        "recon": recon.detach(),
        "e_hat": None if e_hat is None else e_hat.detach(),
        "aux_mask": enc.aux_mask,
    }
    grads = {n: t.grad.clone() for n, t in zip(("W_enc", "b_enc", "W_dec", "b_dec", "x"), (*params, x))}
    return out, grads


CASES = [
    dict(n=64, d=16, m=96, k=4),
    dict(n=33, d=24, m=200, k=9, dead_every=3, k_aux=7),  # k_aux < #dead
    dict(n=20, d=8, m=40, k=3, dead_every=13, k_aux=50),  # k_aux > #dead: uses all dead latents
    dict(n=17, d=12, m=48, k=48),  # k = d_sae
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fast_matches_eager_values_and_gradients_float64(case):
    torch.manual_seed(0)
    params = _weights(case["d"], case["m"])
    x = torch.randn(case["n"], case["d"], dtype=torch.float64).requires_grad_()
    dead = None
    if "dead_every" in case:
        dead = torch.zeros(case["m"], dtype=torch.bool)
        dead[:: case["dead_every"]] = True
    kw = dict(dead=dead, k_aux=case.get("k_aux", 0))
    fast, g_fast = _loss_and_grads("fast", x, params, case["k"], **kw)
    eager, g_eager = _loss_and_grads("eager", x, params, case["k"], **kw)
    assert torch.equal(fast["idx"], eager["idx"])
    if eager["aux_mask"] is not None:
        assert torch.equal(fast["aux_mask"], eager["aux_mask"])
    for key in ("acts", "recon", "e_hat"):
        if eager[key] is not None:
            torch.testing.assert_close(fast[key], eager[key], rtol=1e-10, atol=1e-10)
    for name in g_eager:
        torch.testing.assert_close(g_fast[name], g_eager[name], rtol=1e-10, atol=1e-10, msg=name)


def test_fp32_gradients_match_given_the_same_selection():
    params = _weights(32, 256, dtype=torch.float32)
    x = torch.randn(128, 32).requires_grad_()
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::4] = True
    fast, g_fast = _loss_and_grads("fast", x, params, 8, dead=dead, k_aux=16, sel_dtype=torch.float32)
    eager, g_eager = _loss_and_grads("eager", x, params, 8, dead=dead, k_aux=16)
    assert torch.equal(fast["idx"], eager["idx"])
    torch.testing.assert_close(fast["recon"], eager["recon"])
    torch.testing.assert_close(fast["e_hat"], eager["e_hat"])
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "x"):  # same math, different summation order
        scale = float(g_eager[name].abs().max())
        torch.testing.assert_close(g_fast[name], g_eager[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_bf16_auxk_is_close_to_fp32():
    w_enc, b_enc, w_dec, b_dec = _weights(32, 256, dtype=torch.float32)
    x = torch.randn(128, 32)
    dead = torch.arange(256) % 4 == 0
    with torch.no_grad():
        lo = kernels.reconstruct_fast(
            kernels.encode_fast(x, w_enc, b_enc, b_dec, 8, dead_mask=dead, k_aux=16), w_dec, b_dec
        )
        hi = kernels.reconstruct_eager(
            kernels.encode_eager(x, w_enc, b_enc, b_dec, 8, dead_mask=dead, k_aux=16), w_dec, b_dec
        )
    assert lo[1] is not None and hi[1] is not None
    assert float((lo[1] - hi[1]).norm() / hi[1].norm()) < 3e-2


def test_bf16_selection_agrees_with_fp32_almost_everywhere():
    params = _weights(64, 1024, dtype=torch.float32)
    w_enc, b_enc, _, b_dec = params
    x = torch.randn(512, 64)
    with torch.no_grad():
        fast = kernels.encode_fast(x, w_enc, b_enc, b_dec, 16, sel_dtype=torch.bfloat16)
        exact = kernels.encode_eager(x, w_enc, b_enc, b_dec, 16)
    same = (fast.top_indices.sort(-1).values == exact.top_indices.sort(-1).values).float().mean()
    assert same > 0.97  # only near-ties at the k-th place can swap
    pre = (x - b_dec) @ w_enc + b_enc
    kth = pre.topk(16, dim=-1).values[:, -1:]
    chosen = pre.detach().gather(1, fast.top_indices)
    assert (chosen >= kth - 0.02 * kth.abs().clamp_min(1)).all()  # swaps are within bf16 rounding of the cut
    torch.testing.assert_close(fast.top_acts, chosen.relu(), rtol=1e-2, atol=1e-2)


def test_sparse_primitives_match_dense_references():
    g = torch.Generator().manual_seed(1)
    n, k, m, d = 50, 5, 30, 7
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    coeffs = torch.randn(n, k, generator=g, dtype=torch.float64)
    rows = torch.randn(n, d, generator=g, dtype=torch.float64)
    table = torch.randn(m, d, generator=g, dtype=torch.float64)
    dense = torch.zeros(n, m, dtype=torch.float64).scatter(1, idx, coeffs)
    pattern = kernels.transpose_pattern(idx, m)
    assert torch.equal(idx.reshape(-1)[pattern.order], idx.reshape(-1).sort(stable=True).values)
    torch.testing.assert_close(kernels.scatter_rows(pattern, coeffs, rows), dense.t() @ rows)
    torch.testing.assert_close(kernels.gather_rows(idx, coeffs, table), dense @ table)
    want = (table[idx] * rows[:, None, :]).sum(-1)
    torch.testing.assert_close(kernels.row_dots(idx, table, rows), want)
    torch.testing.assert_close(kernels.row_dots_sorted(pattern, idx, table, rows), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_integer_key_topk_keeps_torch_topk_values(dtype):
    """topk_rows ranks bf16/fp32 bits as integers: the chosen values must be torch.topk's in every row,
    including rows with fewer than k non-negative values (ranked again as floats), ±0, ties and NaN."""
    g = torch.Generator().manual_seed(5)
    n, m = 40, 300
    for trial in range(24):
        x = torch.randn(n, m, generator=g)
        if trial % 3 == 0:
            x -= 2.5  # most rows have fewer than k non-negative values
        if trial % 4 == 0:
            x[torch.rand(n, m, generator=g) < 0.3] = 0.0
            x[torch.rand(n, m, generator=g) < 0.3] = -0.0
        if trial % 5 == 0:
            x = x.round()  # ties by the hundred
        if trial == 7:
            x[5, :] = -torch.arange(m, dtype=torch.float32)  # one non-negative value (a zero)
        x = x.to(dtype)
        if trial == 7:  # a NaN of positive sign, which torch.topk ranks first
            x.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[3, 10] = (
                0x7FC0 if dtype == torch.bfloat16 else 0x7FC00000
            )
        k = (1, 7, 32)[trial % 3]
        values = torch.empty(n, k, dtype=dtype)
        indices = torch.empty(n, k, dtype=torch.int64)
        kernels.topk_rows(x, k, values, indices)
        want = torch.topk(x, k, dim=1, sorted=False).values
        key = lambda v: torch.nan_to_num(v.float(), nan=float("inf")).sort(1).values  # noqa: E731
        assert torch.equal(key(values), key(want)), trial
        torch.testing.assert_close(x.gather(1, indices), values, rtol=0, atol=0, equal_nan=True)


def test_fast_backward_is_deterministic():
    params = _weights(32, 512, dtype=torch.float32)
    x = torch.randn(256, 32).requires_grad_()
    _, a = _loss_and_grads("fast", x, params, 16)
    _, b = _loss_and_grads("fast", x, params, 16)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gradcheck_decoder():
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(6)])
    values = torch.randn(6, 3, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(12, 4, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w_: kernels.decode_fast(v, idx, w_), (values, w))


def test_gradcheck_encoder_with_a_stable_selection():
    w_enc, b_enc, _, b_dec = _weights(5, 10)
    x = torch.randn(6, 5, dtype=torch.float64).requires_grad_()

    def f(x_, w_, be_, bd_):
        return kernels.encode_fast(x_, w_, be_, bd_, 3).top_acts

    assert torch.autograd.gradcheck(f, (x, w_enc, b_enc, b_dec), eps=1e-7)


def test_mode_switch(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.kernel_mode() == "fast"
    monkeypatch.setenv(kernels.ENV_VAR, "eager")
    assert kernels.kernel_mode() == "eager"
    with kernels.use_kernels("fast"):
        assert kernels.kernel_mode() == "fast"
    with kernels.use_kernels("auto"):
        assert kernels.kernel_mode() == "eager"
    monkeypatch.setenv(kernels.ENV_VAR, "turbo")
    with pytest.raises(SaeRewardError, match="turbo"):
        kernels.kernel_mode()
    with pytest.raises(SaeRewardError), kernels.use_kernels("turbo"):  # type: ignore[arg-type]
        pass


def test_module_forward_parity_float64():
    sae = TopKSAE(SAEConfig(d_in=16, d_sae=80, k=6), seed=1, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(40, 16, dtype=torch.float64)
    dead = torch.arange(80) % 4 == 0
    outs = {}
    for mode in ("fast", "eager"):
        sae.zero_grad()
        with kernels.use_kernels(mode):
            out = sae(x, dead_mask=dead, k_aux=5)
        (out.fvu + out.auxk).backward()
        outs[mode] = (out, [p.grad.clone() for p in sae.parameters()])
    for a, b in zip(outs["fast"][0], outs["eager"][0]):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(
                a.sort(-1).values if a.dim() == 2 and a.shape[1] == 6 else a,
                b.sort(-1).values if b.dim() == 2 and b.shape[1] == 6 else b,
            )
    for ga, gb in zip(outs["fast"][1], outs["eager"][1]):
        torch.testing.assert_close(ga, gb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_cpu_eager():
    params_cpu = _weights(64, 512, dtype=torch.float32)
    params_gpu = [p.detach().cuda().requires_grad_() for p in params_cpu]
    x = torch.randn(256, 64)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::3] = True
    fast, g_fast = _loss_and_grads(
        "fast", x.cuda().requires_grad_(), params_gpu, 16, dead=dead.cuda(), k_aux=32, sel_dtype=torch.float32
    )
    eager, g_eager = _loss_and_grads("eager", x.clone().requires_grad_(), params_cpu, 16, dead=dead, k_aux=32)
    assert torch.equal(fast["idx"].cpu(), eager["idx"])
    torch.testing.assert_close(fast["recon"].cpu(), eager["recon"], rtol=1e-4, atol=1e-4)
    for name in g_eager:
        torch.testing.assert_close(g_fast[name].cpu(), g_eager[name], rtol=2e-2, atol=2e-3, msg=name)
    with torch.no_grad():  # bf16 selection on the GPU picks (almost) the same latents
        w_enc, b_enc, _, b_dec = params_gpu
        sel = kernels.encode_fast(x.cuda(), w_enc, b_enc, b_dec, 16)
    same = (sel.top_indices.sort(-1).values.cpu() == eager["idx"]).float().mean()
    assert same > 0.95


def test_worker_pool_pieces_give_identical_results(monkeypatch):
    """The heavy kernels cut their work into pieces for the worker pool; the split must not matter."""
    torch.set_num_threads(2)  # restored by the fixture
    g = torch.Generator().manual_seed(3)
    n, k, m, d = 300, 6, 500, 24
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    coeffs = torch.randn(n, k, generator=g)
    rows = torch.randn(n, d, generator=g)
    table = torch.randn(m, d, generator=g).requires_grad_()  # like W_dec in a backward: must not leak grad
    pattern = kernels.transpose_pattern(idx, m)

    def run():
        with torch.no_grad():
            return (
                kernels.scatter_rows(pattern, coeffs, rows),
                kernels.gather_rows(idx, coeffs, table),
                kernels.row_dots_sorted(pattern, idx, table, rows),
            )

    monkeypatch.setattr(kernels, "_pieces", lambda *a, **kw: 1)
    whole = run()
    monkeypatch.setattr(kernels, "_pieces", lambda *a, **kw: 5)
    split = run()
    for a, b in zip(whole, split):
        assert torch.equal(a, b)
    w_enc, b_enc, _, b_dec = _weights(d, m)
    x = torch.randn(n, d, dtype=torch.float64)
    dead = torch.arange(m) % 7 == 0
    dead_ids = dead.nonzero().reshape(-1)
    xc, w_rows = (x - b_dec).detach(), w_enc.detach().t().contiguous()
    one = kernels.select_topk(xc, w_rows, b_enc.detach(), k, torch.float64, dead_ids, 9, block_elems=10**9)
    many = kernels.select_topk(xc, w_rows, b_enc.detach(), k, torch.float64, dead_ids, 9, block_elems=64 * m)
    for a, b in zip(one, many):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)


def test_bf16_selection_on_packed_blocks_is_the_same_on_any_split():
    """The bf16 selection multiplies row blocks against one packed weight, on the worker pool: the same
    values and indices on every run, with one worker or two, and the same values with one block."""
    g = torch.Generator().manual_seed(4)
    n, d, m, k = 700, 48, 2048, 12
    xc, w = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g) / 7
    b = 0.1 * torch.randn(m, generator=g)

    def select(threads, block_elems):
        torch.set_num_threads(threads)  # restored by the fixture
        with kernels.cpu_step():
            return kernels.select_topk(xc, w, b, k, torch.bfloat16, block_elems=block_elems)[:2]

    two, again, one = select(2, 64 * m), select(2, 64 * m), select(1, 64 * m)
    for a, b_, c in zip(two, again, one):
        assert torch.equal(a, b_) and torch.equal(a, c)
    whole = select(2, 10**9)
    assert torch.equal(two[0].sort(-1).values, whole[0].sort(-1).values)


def test_cpu_step_runs_the_step_on_one_thread_and_restores():
    torch.set_num_threads(2)
    params = _weights(16, 64, dtype=torch.float32)
    x = torch.randn(32, 16).requires_grad_()
    with kernels.cpu_step():
        assert torch.get_num_threads() == 1 and kernels._workers() == 2
        _, g_step = _loss_and_grads("fast", x, params, 4)
    assert torch.get_num_threads() == 2
    _, g_plain = _loss_and_grads("fast", x, params, 4)
    for name in g_step:
        torch.testing.assert_close(g_step[name], g_plain[name])
