"""saereward.model.bf16cpu: bf16 products through fp32 GEMM on CPUs without bf16 units."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from saereward.errors import SaeRewardError
from saereward.model import bf16cpu, fastdecode
from saereward.model.capture import position_ids_from_mask
from tiny_models import EOS_ID, PAD_ID, make_tiny


def _operands(rows: int, n_in: int, n_out: int, grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, n_in, generator=g).bfloat16()
    w = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).bfloat16()
    b = torch.randn(n_out, generator=g).bfloat16()
    return tuple(t.requires_grad_(grad) for t in (x, w, b))


def test_linear_is_one_rounding_of_the_fp32_product() -> None:
    x, w, b = _operands(3 * 40, 96, 80)
    x = x.view(3, 40, 96)  # leading dims are kept
    got = bf16cpu.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 40, 80)
    assert torch.equal(got, F.linear(x.float(), w.float(), b.float()).bfloat16())
    exact = F.linear(x.double(), w.double(), b.double())
    native = F.linear(x, w, b)  # PyTorch's own bf16 product: the same values up to bf16 rounding
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(native.double(), exact, rtol=2e-2, atol=2e-2)


def test_backward_matches_the_fp64_gradients() -> None:
    x, w, b = _operands(50, 64, 48, grad=True)
    g = torch.randn(50, 48).bfloat16()
    bf16cpu.linear(x, w, b).backward(g)
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    F.linear(xd, wd, bd).backward(g.double())
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        assert got is not None and want is not None and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-2)
    # a frozen weight (the LoRA base layer): only the input's gradient, and the weight gets none
    x2, w2, _ = _operands(50, 64, 48)
    x2.requires_grad_(True)
    bf16cpu.linear(x2, w2).sum().backward()
    assert x2.grad is not None and w2.grad is None


def test_few_rows_on_a_large_weight_keep_the_native_product() -> None:
    """Widening a large weight for a few rows costs more than it saves (an LM head in a decode step)."""
    n_in = 512
    n_out = bf16cpu.SMALL_WEIGHT // n_in + 8
    x, w, _ = _operands(4, n_in, n_out)
    assert torch.equal(bf16cpu.linear(x, w), F.linear(x, w))
    many = torch.randn(bf16cpu.MANY_ROWS, n_in).bfloat16()
    assert torch.equal(bf16cpu.linear(many, w), F.linear(many.float(), w.float()).bfloat16())
    x32 = x.float()  # other dtypes are untouched
    assert torch.equal(bf16cpu.linear(x32, w.float()), F.linear(x32, w.float()))


def test_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).bfloat16()
    monkeypatch.setenv(bf16cpu.ENV, "native")
    assert not bf16cpu.enabled() and bf16cpu.install(model) == 0
    monkeypatch.setenv(bf16cpu.ENV, "fp32")
    assert bf16cpu.enabled() and bf16cpu.install(model) == 2
    assert bf16cpu.install(model) == 0  # idempotent
    x = torch.randn(5, 8).bfloat16()
    want = F.linear(torch.relu(F.linear(x.float(), model[0].weight.float(), model[0].bias.float()).bfloat16()).float(),
                    model[2].weight.float(), model[2].bias.float()).bfloat16()  # fmt: skip
    assert torch.equal(model(x), want)
    monkeypatch.setenv(bf16cpu.ENV, "fast")
    with pytest.raises(SaeRewardError, match="SAEREWARD_BF16_MATMUL='fast' is not a mode"):
        bf16cpu.enabled()
    monkeypatch.delenv(bf16cpu.ENV)
    assert bf16cpu.enabled() == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fastdecode_takes_the_same_products_as_the_installed_model(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 decode: fastdecode's own products go through bf16cpu like the patched modules of
    ``generate()``, so greedy tokens agree."""
    monkeypatch.setenv(bf16cpu.ENV, "fp32")
    model, _ = make_tiny(arch)
    model.to(torch.bfloat16)
    assert bf16cpu.install(model) > 0
    calls = []
    real = bf16cpu.linear
    monkeypatch.setattr(bf16cpu, "linear", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (6, 5), generator=g)
    am = torch.ones_like(ids)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False,
                             eos_token_id=EOS_ID, pad_token_id=PAD_ID)  # fmt: skip
        n_generate = len(calls)
        pre = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        calls.clear()  # from here on: only decode's own products
        new, _ = fastdecode.decode(model, pre.past_key_values, am, pre.logits[:, -1], max_new_tokens=8,
                                   pick=lambda s: s.argmax(-1), end_ids={EOS_ID}, pad_id=PAD_ID)  # fmt: skip
    assert n_generate > 0 and len(calls) > 0  # both generate() and decode() took bf16cpu.linear
    assert torch.equal(new, ref[:, 5:])
    for m in model.modules():  # a model without the patch: decode keeps PyTorch's products, as its forward
        m.__dict__.pop("forward", None)
    calls.clear()
    with torch.no_grad():
        fastdecode.decode(model, pre.past_key_values, am, pre.logits[:, -1], max_new_tokens=8,
                          pick=lambda s: s.argmax(-1), end_ids={EOS_ID}, pad_id=PAD_ID)  # fmt: skip
    assert calls == []


def test_load_model_installs_for_bf16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from saereward.model.lm import load_model

    monkeypatch.setenv(bf16cpu.ENV, "fp32")
    lm = load_model(dtype="bf16")
    linears = [m for m in lm.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(bf16cpu.installed(m) for m in linears)
    ids = lm.tokenizer("Q: What is 2 + 3?\nA:", return_tensors="pt").input_ids
    with torch.no_grad():
        wide = lm.model(ids).logits.float()
        for m in linears:
            del m.forward
        native = lm.model(ids).logits.float()
    # the same next token, and each path's top 3 among the other's top 5: bf16 logits tie often (on an
    # AMX CPU the native path puts ranks 3 and 4 at the same 13.5625, the wide one 0.06 apart)
    w, n = wide[0, -1], native[0, -1]
    assert w.argmax() == n.argmax()
    assert set(w.topk(3).indices.tolist()) <= set(n.topk(5).indices.tolist())
    assert set(n.topk(3).indices.tolist()) <= set(w.topk(5).indices.tolist())
    assert (wide - native).abs().max() < 0.05 * native.abs().max()
    monkeypatch.setenv(bf16cpu.ENV, "native")
    plain = load_model(dtype="bf16")
    assert not any(bf16cpu.installed(m) for m in plain.model.modules())


def test_under_autocast_the_operands_are_cast_as_autocast_would() -> None:
    """The LoRA training forward runs under CPU autocast to bf16 with fp32 adapter weights."""
    x, w, b = _operands(70, 32, 24)
    w32 = w.float().requires_grad_(True)  # an fp32 weight, as LoRA's
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bf16cpu.linear(x, w32, b)
        assert got.dtype == torch.bfloat16
        got.float().square().sum().backward()
    assert torch.equal(got, F.linear(x.float(), w.float(), b.float()).bfloat16())
    assert w32.grad is not None and w32.grad.dtype == torch.float32 and x.grad is not None
    wd = w.double().requires_grad_(True)
    F.linear(x.detach().double(), wd, b.double()).square().sum().backward()
    torch.testing.assert_close(w32.grad.double(), wd.grad, rtol=2e-2, atol=0.5)
    with torch.autocast("cpu", dtype=torch.float16):  # another autocast dtype: left to autocast
        assert bf16cpu.linear(x.detach(), w32.detach()).dtype == torch.float16


def test_large_weight_blocks_and_backward() -> None:
    """A weight over SMALL_WEIGHT is widened block by block (no whole fp32 copy); same values."""
    n_in = 256
    n_out = 2 * bf16cpu.SMALL_WEIGHT // n_in + 40  # three blocks
    assert len(bf16cpu._chunks(n_out, n_in)) == 3
    x, w, b = _operands(bf16cpu.MANY_ROWS, n_in, n_out, grad=True)
    y = bf16cpu.linear(x.view(2, -1, n_in), w, b)
    torch.testing.assert_close(
        y.view(-1, n_out), F.linear(x.float(), w.float(), b.float()).bfloat16(), rtol=0, atol=0
    )
    g = torch.randn(y.shape).bfloat16()
    y.backward(g)
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    F.linear(xd, wd, bd).backward(g.view(-1, n_out).double())
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        assert got is not None and want is not None
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=5e-2)


def test_saves_only_what_the_backward_needs() -> None:
    """A frozen weight (a LoRA base layer): the backward keeps the weight, not the activation."""
    x, w, _ = _operands(80, 64, 32)
    x.requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bf16cpu.linear(x, w).sum().backward()
    assert len(saved) == 1 and saved[0].data_ptr() == w.data_ptr() and saved[0].dtype == torch.bfloat16


def test_installed_models_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    monkeypatch.setenv(bf16cpu.ENV, "fp32")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).bfloat16()
    bf16cpu.install(model)
    copy = pickle.loads(pickle.dumps(model))
    assert bf16cpu.installed(copy[0]) and copy[0].forward.args[0] is copy[0]
    x = torch.randn(3, 8).bfloat16()
    assert torch.equal(copy(x), model(x))


def test_lean_lora_under_autocast_matches_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """GRPO's lean LoRA forward on a patched bf16 base: bf16cpu products, PEFT's function."""
    from peft import LoraConfig, get_peft_model

    from saereward.rl.patches import install_lean_lora
    from tiny_models import LORA_TARGETS

    monkeypatch.setenv(bf16cpu.ENV, "fp32")
    outs, grads = [], []
    for lean in (False, True):
        model, _ = make_tiny("llama")
        model.to(torch.bfloat16).requires_grad_(False)
        bf16cpu.install(model)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"]))
        for n, p in peft.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
                if "lora_B" in n:
                    torch.nn.init.normal_(p, 0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        calls: list[bool] = []
        if lean:
            assert install_lean_lora(peft) > 0
            real = bf16cpu.linear
            monkeypatch.setattr(
                bf16cpu,
                "linear",
                lambda *a, _c=calls, _r=real: (
                    _c.append(a[1].requires_grad and torch.is_autocast_enabled("cpu")) or _r(*a)
                ),
            )
        ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = peft(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()
        outs.append(logits.float())
        grads.append(torch.cat([p.grad.flatten() for p in peft.parameters() if p.requires_grad]))
        assert all(p.grad.dtype == torch.float32 for p in peft.parameters() if p.requires_grad)
        if lean:
            assert sum(calls) == 2 * 4 * len(LORA_TARGETS["llama"])  # A and B of every adapted projection
            monkeypatch.setattr(bf16cpu, "linear", real)
    torch.testing.assert_close(outs[1], outs[0], rtol=0.05, atol=0.1)
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
