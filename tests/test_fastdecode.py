"""saereward.model.fastdecode: the lean decode loop gives generate()'s tokens and residuals."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import pytest
import torch

from saereward.model import fastdecode, onednn
from saereward.model.capture import ResidualCapture, position_ids_from_mask
from tiny_models import EOS_ID, PAD_ID, make_tiny

ENDS = {EOS_ID, 5, 9, 17, 33, 41, 60, 77}  # many end tokens: rows end at different steps


def _batch(B: int = 20, P: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (B, P), generator=g)
    am = torch.ones_like(ids)
    for r in range(0, B, 3):  # ragged left padding
        am[r, : 1 + r % 4] = 0
    return ids.masked_fill(am == 0, PAD_ID), am


class _StopOn:
    """A stop criterion on generated tokens (stands in for stop strings): stop at token 11."""

    def __call__(self, gen: torch.Tensor) -> torch.Tensor:
        return (gen == 11).any(1)


def _with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with an active, unmerged LoRA adapter on every projection (random, non-zero B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    peft.eval()
    return peft


def _greedy_generate(model: torch.nn.Module, ids: torch.Tensor, am: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``generate()``'s greedy sequences with the test's end and pad ids."""
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=am,
            do_sample=False,
            eos_token_id=sorted(ENDS),
            pad_token_id=PAD_ID,
            **kw,
        )


def _greedy_decode(model: torch.nn.Module, ids: torch.Tensor, am: torch.Tensor, **kw: Any) -> tuple:
    """An HF prefill of ``ids``, then :func:`fastdecode.decode` greedily with the test's end and pad ids."""
    with torch.no_grad():
        pre = model(
            input_ids=ids,
            attention_mask=am,
            position_ids=position_ids_from_mask(am),
            use_cache=True,
            logits_to_keep=1,
        )
        return fastdecode.decode(
            model,
            pre.past_key_values,
            am,
            pre.logits[:, -1],
            pick=lambda s: s.argmax(-1),
            end_ids=ENDS,
            pad_id=PAD_ID,
            **kw,
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("mode", ["plain", "skinny", "packed", "in_place"])
@pytest.mark.parametrize("lora", [False, True])
def test_decode_matches_generate(arch: str, capture: bool, mode: str, lora: bool, monkeypatch) -> None:
    """Greedy tokens as ``generate()``'s, residuals to rounding; with ``lora``, a PEFT model whose active
    adapters the loop applies unmerged is compared with PEFT's own forward. ``in_place``: the model's
    weights are the same bits afterwards, each in its own storage again."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, _ = make_tiny(arch)
    if lora:
        model = _with_lora(model)
        assert fastdecode.unsupported(model) is None
    ids, am = _batch()
    P, N, layer = ids.shape[1], 14, 2

    class HFStop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: object) -> torch.Tensor:
            return _StopOn()(input_ids[:, P:])

    sizes: list[int] = []
    real = fastdecode._batch_size
    monkeypatch.setattr(
        fastdecode, "_batch_size", lambda n, step=16: sizes.append(real(n, step)) or real(n, step)
    )
    with ResidualCapture(model, [layer]) as cap:
        ref = _greedy_generate(
            model, ids, am, max_new_tokens=N, stopping_criteria=StoppingCriteriaList([HFStop()])
        )
        ref_res = cap.sequence(layer, ref.shape[1])[:, P:]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, res = _greedy_decode(
        model,
        ids,
        am,
        max_new_tokens=N,
        stop=_StopOn(),
        capture_layers=[layer] if capture else [],
        skinny=mode != "plain",
        packed=mode in ("packed", "in_place"),
        in_place=mode == "in_place",
    )
    assert torch.equal(new, ref[:, P:])
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    weights = [
        p for n, p in model.named_parameters() if "proj" in n and "lora" not in n and n.endswith("weight")
    ]
    assert len({p.untyped_storage().data_ptr() for p in weights}) == len(weights)
    ended = torch.isin(new, torch.tensor(sorted(ENDS))) | (new == 11)
    first_end = torch.where(ended.any(1), ended.int().argmax(1), N)
    assert len(set(first_end.tolist())) > 3 and int(first_end.min()) < N // 2  # rows end at many steps
    assert min(sizes) < len(ids)  # the batch shrank (20 rows -> 16 -> 4)
    if capture:
        after = torch.arange(new.shape[1])[None, :] > first_end[:, None]  # never fed (post-end)
        valid = ~after
        valid[:, -1] = False  # the last sampled token is not fed
        got = res[layer]
        assert got.shape == (len(ids), new.shape[1], model.config.hidden_size)
        torch.testing.assert_close(got[valid], ref_res[valid], rtol=1e-4, atol=1e-4)
        assert not got[after].any()
    else:
        assert res == {}


@pytest.mark.parametrize("mode", ["plain", "packed"])
def test_min_new_tokens_masks_the_end_tokens_as_generate_does(mode: str) -> None:
    """Greedy tokens equal ``generate(min_new_tokens=)``'s; at ``max_new_tokens`` every row runs the full
    length with no end token (the batch's rows end at many steps without it)."""
    model, _ = make_tiny("llama")
    ids, am = _batch()
    N = 14
    for m in (5, N):
        ref = _greedy_generate(model, ids, am, max_new_tokens=N, min_new_tokens=m)
        new, _ = _greedy_decode(
            model,
            ids,
            am,
            max_new_tokens=N,
            min_new_tokens=m,
            skinny=mode != "plain",
            packed=mode == "packed",
        )
        assert torch.equal(new, ref[:, ids.shape[1] :])
        ends = torch.isin(new, torch.tensor(sorted(ENDS)))
        assert not ends[:, :m].any()
        if m == N:
            assert new.shape[1] == N and not ends.any()


def test_unsupported_models_and_adapters() -> None:
    from peft import LoraConfig, get_peft_model

    gpt2, _ = make_tiny("gpt2")
    assert "gpt2" in (fastdecode.unsupported(gpt2) or "")
    model, _ = make_tiny("llama")
    assert fastdecode.unsupported(model) is None
    peft = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    assert fastdecode.unsupported(peft) is None  # active adapters: applied unmerged
    peft.merge_adapter()
    assert fastdecode.unsupported(peft) is None
    peft.unmerge_adapter()
    with peft.disable_adapter():
        assert fastdecode.unsupported(peft) is None
    dora, _ = make_tiny("llama")
    dora = get_peft_model(dora, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "DoRA" in (fastdecode.unsupported(dora) or "")
    dora.merge_adapter()  # merged, the base weight is what the layer computes
    assert fastdecode.unsupported(dora) is None


@pytest.mark.parametrize("lora", [False, True])
@torch.no_grad()
def test_packed_weights_compute_the_skinny_products(lora: bool) -> None:
    """The packed path is the one taken on this CPU torch build; every projection (adapters folded in;
    q, k and v stacked into one product, gate and up into another) and the LM head give the skinny
    path's products to float rounding, and the model is left as it was."""
    assert fastdecode.packing_available()  # torch 2.13 CPU wheels ship oneDNN
    model, _ = make_tiny("llama")
    if lora:
        model = _with_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    skinny = fastdecode._Weights(model, torch.device("cpu"), skinny=True)
    packed = fastdecode._Weights(model, torch.device("cpu"), skinny=True, packed=True)
    assert packed.packed and packed.head_packed is not None and not skinny.packed
    x = torch.randn(5, model.config.hidden_size)
    h = torch.randn(5, model.config.intermediate_size)
    for bs, bp in zip(skinny.blocks, packed.blocks, strict=True):
        assert bs.qkv is None and bp.qkv is not None and bp.gate_up is not None
        assert bp.qkv[0].is_mkldnn and bp.qkv[2] == () and sorted(bp.w) == ["down_proj", "o_proj"]
        assert len(bs.w["q_proj"][2]) == (1 if lora else 0)
        stacks = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
        for fused, names in stacks.items():
            want = torch.cat([skinny.project(x, bs.w[name]) for name in names], 1)
            got = fastdecode._packed(x, getattr(bp, fused))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for name, inp in (("o_proj", x), ("down_proj", h)):
            want = skinny.project(inp, bs.w[name])
            torch.testing.assert_close(packed.project(inp, bp.w[name]), want, rtol=1e-5, atol=1e-5)
    head = fastdecode._packed(x, packed.head_packed)
    torch.testing.assert_close(head, fastdecode._skinny(x, packed.head.weight, None), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_stacked_pack_biases() -> None:
    """Stacked projections where only some have a bias (Qwen2: q, k and v do, the others not): the
    missing ones count as zeros."""
    torch.manual_seed(0)
    w1, w2, b1 = torch.randn(6, 8), torch.randn(4, 8), torch.randn(6)
    x = torch.randn(3, 8)
    got = fastdecode._packed(x, fastdecode._pack((w1, b1, ()), (w2, None, ())))
    want = torch.cat([x @ w1.T + b1, x @ w2.T], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fastdecode._pack((w1, None, ()), (w2, None, ()))[1] is None


def test_packing_that_fails_or_disagrees_falls_back_to_skinny(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch build whose oneDNN op raises, or computes another product, is not used: the decode loop
    keeps MKL's skinny products (the check runs once per process)."""
    model, _ = make_tiny("llama")

    def broken(x: torch.Tensor, w: object, b: object = None) -> torch.Tensor:
        raise RuntimeError("no oneDNN kernel for this CPU")

    for bad in (broken, lambda x, w, b=None: torch.zeros(x.shape[0], 24)):
        monkeypatch.setattr(onednn, "linear", bad)
        onednn.available.cache_clear()
        try:
            assert not fastdecode.packing_available()
            w = fastdecode._Weights(model, torch.device("cpu"), skinny=True, packed=True)
            assert not w.packed and w.skinny and w.head_packed is None
        finally:
            onednn.available.cache_clear()  # the next call checks the real op again


def test_batch_sizes() -> None:
    assert [fastdecode._batch_size(n) for n in (1, 2, 4, 5, 15, 16, 17, 33)] == [4, 4, 4, 16, 16, 16, 32, 48]
    assert [fastdecode._batch_size(n, 4) for n in (1, 4, 5, 8, 9, 15, 16, 17)] == [4, 4, 8, 8, 12, 16, 16, 20]


@pytest.mark.slow
def test_generate_batch_fast_decode_on_smollm(smollm) -> None:
    """The real model through ``generate_batch``: greedy tokens, completions and captured residuals as
    ``generate()``'s; seeded sampling with the top-k sampler reproducible; stop strings honoured."""
    from saereward.model.generate import SamplingConfig, generate_batch

    prompts = ["Q: What is 2 + 3?\nA:", "Q: Tom has 12 apples and gives away 5. How many are left?\nA:"] * 3
    greedy = SamplingConfig(max_new_tokens=24)
    a = generate_batch(smollm, prompts, greedy, capture_layers=[15])
    b = generate_batch(smollm, prompts, greedy, capture_layers=[15], fast_decode=True, share_prompts=True)
    assert torch.equal(a.sequences, b.sequences) and a.completions == b.completions
    m = a.response_mask.clone()
    m[:, -1] = False
    ra, rb = a.residuals[15], b.residuals[15]
    assert ra.shape == rb.shape
    assert ((ra - rb)[m].abs().max() / ra[m].abs().max()) < 1e-4
    sampling = SamplingConfig(max_new_tokens=16, do_sample=True, sampler="topk", stop=("\nQ:",))
    c = generate_batch(smollm, prompts, sampling, seed=3, fast_decode=True, skinny=True)
    d = generate_batch(smollm, prompts, sampling, seed=3, fast_decode=True, skinny=True)
    assert torch.equal(c.sequences, d.sequences)
    for t in c.completions:  # generation stopped within a few characters of the first stop string
        assert "\nQ:" not in t or len(t) - t.index("\nQ:") <= 8


@pytest.mark.slow
def test_eval_fast_decode_matches_generate(smollm) -> None:
    """``saereward eval --fast-decode``: the same greedy completions and verdicts as ``generate()``
    on chain_sum (raw prompts, stop strings, batches of 4 that end at different lengths)."""
    from saereward.analysis.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(
        task="chain_sum", n=8, prompt_format="raw", max_new_tokens=40, batch_size=4, progress=False
    )
    slow = run_eval(cfg, lm=smollm)
    fast = run_eval(replace(cfg, fast_decode=True), lm=smollm)
    keys = ("id", "completion", "correct", "new_tokens")
    assert [{k: r[k] for k in keys} for r in fast.rows] == [{k: r[k] for k in keys} for r in slow.rows]
    assert fast.summary["accuracy"] == slow.summary["accuracy"]


def test_cached_eval_reused_across_an_added_option(tmp_path, monkeypatch) -> None:
    """A finished evaluation saved before ``fast_decode`` existed (its config lacks the key) is still
    reused when the option is at its default, and run again when it is not."""
    import json

    from saereward.analysis import evaluate
    from saereward.analysis.evaluate import EvalConfig, run_eval_cached
    from saereward.config import to_dict

    cfg = EvalConfig(task="chain_sum", n=2, out=str(tmp_path), progress=False)
    old = to_dict(cfg)
    del old["fast_decode"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "items.jsonl").write_text('{"id": "a", "correct": true}\n')
    ran: list[bool] = []
    monkeypatch.setattr(
        evaluate, "run_eval", lambda c, lm=None: ran.append(c.fast_decode) or evaluate.EvalResult({})
    )
    assert run_eval_cached(cfg) == [{"id": "a", "correct": True}] and not ran
    run_eval_cached(replace(cfg, fast_decode=True))
    assert ran == [True]


def test_skinny_head_equals_one_product() -> None:
    """The LM head by vocabulary blocks = one ``W @ xᵀ`` product, bit for bit, bias or not."""
    torch.manual_seed(0)
    w, b, x = torch.randn(1000, 24), torch.randn(1000), torch.randn(5, 24)
    for bias in (None, b):
        got = fastdecode._skinny_head(x, w, bias, block=96)  # 1000 rows: 10 blocks of 96 and one of 40
        assert got.is_contiguous() and torch.equal(got, fastdecode._skinny(x, w, bias))


@torch.no_grad()
def test_in_place_packing_holds_the_weights_once_and_gives_them_back() -> None:
    """``in_place``: while packed, every projection's plain weight is released and the packed products
    (adapters beside) equal the folded ones to rounding; afterwards the weights are the same bits, also
    when the decode stops on an exception."""
    model = _with_lora(make_tiny("llama")[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fastdecode._Weights(model, torch.device("cpu"), skinny=True, packed=True)
    x = torch.randn(5, model.config.hidden_size)
    with fastdecode._Weights(model, torch.device("cpu"), skinny=True, packed=True, in_place=True) as w:
        assert w.in_place and w.head_packed is None  # the head's weight is the embedding's: not copied
        weights = [
            p for n, p in model.named_parameters() if "proj" in n and "lora" not in n and n.endswith("weight")
        ]
        assert weights and all(p.numel() == 0 for p in weights)
        for bf, bw in zip(folded.blocks, w.blocks, strict=True):
            torch.testing.assert_close(
                fastdecode._packed(x, bw.qkv), fastdecode._packed(x, bf.qkv), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                w.project(x, bw.w["o_proj"]), folded.project(x, bf.w["o_proj"]), rtol=1e-5, atol=1e-5
            )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    ids, am = _batch()
    calls = []

    def pick(s: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return s.argmax(-1)

    pre = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=True)
    with pytest.raises(KeyboardInterrupt):
        fastdecode.decode(
            model,
            pre.past_key_values,
            am,
            pre.logits[:, -1],
            max_new_tokens=8,
            pick=pick,
            end_ids=ENDS,
            pad_id=PAD_ID,
            skinny=True,
            packed=True,
            in_place=True,
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_packed_on_mapped_weights_drops_their_pages_and_decodes_as_in_memory(tmp_path, monkeypatch) -> None:
    """Packed decoding of weights in a checkpoint's file mapping, ``in_place`` or not: the tokens and
    residuals equal packed decoding's of the same weights in the process's own memory, bit for bit
    (the adapters folded in either way); each call hands every projection's and the head's weight to
    ``drop_mapped_pages`` once, releases or replaces none, and leaves the same bits in the same mapped
    storages. The in-memory model's weights are never handed over."""
    from transformers import AutoModelForCausalLM

    from saereward.model import residency

    make_tiny("llama")[0].save_pretrained(tmp_path)
    model = _with_lora(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32))
    own = _with_lora(make_tiny("llama")[0])
    weights = [
        p for n, p in model.named_parameters() if "proj" in n and "lora" not in n and n.endswith("weight")
    ]
    head = model.get_output_embeddings().weight
    assert residency.in_file_mappings([*weights, head]), "from_pretrained no longer memory-maps: revisit"
    assert not residency.in_file_mappings(own.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in own.state_dict().items())  # the same weights
    ptrs = [p.data_ptr() for p in weights]
    dropped: list[int] = []
    real = residency.drop_mapped_pages
    monkeypatch.setattr(
        residency, "drop_mapped_pages", lambda ts, *a: real((t for t in ts if not dropped.append(id(t))), *a)
    )
    ids, am = _batch()
    out = {}
    for name, m, in_place in (
        ("own", own, False),
        ("mapped", model, False),
        ("mapped, in place", model, True),
    ):
        pre = m(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=True)
        out[name] = fastdecode.decode(
            m,
            pre.past_key_values,
            am,
            pre.logits[:, -1],
            max_new_tokens=10,
            pick=lambda s: s.argmax(-1),
            end_ids=ENDS,
            pad_id=PAD_ID,
            capture_layers=[1],
            skinny=True,
            packed=True,
            in_place=in_place,
        )
    for name in ("mapped", "mapped, in place"):
        assert torch.equal(out[name][0], out["own"][0]) and torch.equal(out[name][1][1], out["own"][1][1])
    assert sorted(dropped) == sorted(2 * [id(t) for t in [*weights, head]])
    assert [p.data_ptr() for p in weights] == ptrs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@torch.no_grad()
def test_packed_linears_run_only_where_the_weights_stay_held_once(tmp_path) -> None:
    """``onednn.packed_linears``: layers whose weights view a file mapping compute ``F.linear``'s
    product on packed weights while the context is open (3-D inputs too) and get their own forward
    back after it; layers in the process's own memory (a packed copy would double them) or with a
    patched forward keep computing as before, and the context says it did nothing."""
    from safetensors.torch import load_file, save_file

    if not onednn.available(torch.float32):
        pytest.skip("this torch build has no oneDNN packed linear")
    torch.manual_seed(0)
    own = [torch.nn.Linear(64, 48), torch.nn.Linear(48, 64, bias=False)]
    save_file(
        {f"w{i}": lin.weight.detach().contiguous() for i, lin in enumerate(own)}, tmp_path / "w.safetensors"
    )
    weights = load_file(tmp_path / "w.safetensors")  # views of the file's mapping
    mapped = [torch.nn.Linear(64, 48), torch.nn.Linear(48, 64, bias=False)]
    for i, lin in enumerate(mapped):
        lin.weight = torch.nn.Parameter(weights[f"w{i}"], requires_grad=False)
        if lin.bias is not None:
            lin.bias.copy_(own[i].bias)
    x = torch.randn(2, 5, 64)
    want = own[1](own[0](x))
    with onednn.packed_linears(own) as did:
        assert not did and not any("forward" in lin.__dict__ for lin in own)
    if sys.platform.startswith("linux"):
        with onednn.packed_linears(mapped) as did:
            assert did and all("forward" in lin.__dict__ for lin in mapped)
            torch.testing.assert_close(mapped[1](mapped[0](x)), want, rtol=1e-5, atol=1e-5)
        assert not any("forward" in lin.__dict__ for lin in mapped)
    assert torch.equal(mapped[1](mapped[0](x)), want)  # plain products again, the same weights
    mapped[0].forward = lambda t: t  # a patched forward is never replaced
    with onednn.packed_linears(mapped) as did:
        assert not did
