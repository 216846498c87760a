"""SAE checkpoint formats: native round trip, atomic writes, parity with the real sparsify and SAELens
packages in both directions, mechreward's ``.pt`` (and refusal of unsafe pickles), and clear errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from saereward.errors import SaeRewardError
from saereward.sae import kernels
from saereward.sae.coder import SAEConfig, TopKSAE
from saereward.sae.formats import (
    FORMATS,
    check_sae_matches_model,
    detect_format,
    load_sae,
    load_train_config,
    save_mechreward_pt,
    save_sae,
    save_saelens,
    save_sparsify,
)

D_IN, D_SAE, K = 16, 64, 4
ATOL = 1e-5


def make_sae(seed: int = 0, **cfg: object) -> TopKSAE:
    """A random TopK SAE with nonzero biases and decoder rows of varied norm (exercises every term)."""
    kw: dict[str, object] = {"d_in": D_IN, "d_sae": D_SAE, "k": K, **cfg}
    sae = TopKSAE(SAEConfig(**kw), seed=seed)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=g))
    return sae


def dense(values: torch.Tensor, indices: torch.Tensor, d_sae: int = D_SAE) -> torch.Tensor:
    """Dense ``[N, d_sae]`` code from top-k values/indices (zero-valued picks vanish)."""
    return torch.zeros(values.shape[0], d_sae, dtype=values.dtype).scatter(-1, indices, values)


def assert_same_sae(a: TopKSAE, b: TopKSAE, x: torch.Tensor) -> None:
    va, ia = a.encode_topk(x)
    vb, ib = b.encode_topk(x)
    torch.testing.assert_close(dense(va, ia), dense(vb, ib), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(a(x).recon, b(x).recon, atol=ATOL, rtol=1e-5)


@pytest.fixture(autouse=True)
def _eager_kernels():  # noqa: ANN202
    """Parity to 1e-5 needs fp32 top-k selection: the fast kernels select in bf16, which may swap
    near-tied latents at the k-th place (by design; see saereward.sae.kernels)."""
    with kernels.use_kernels("eager"):
        yield


@pytest.fixture
def x() -> torch.Tensor:
    return 2.0 * torch.randn(32, D_IN) + 0.5


# --------------------------------------------------------------------------------------------------
# Native
# --------------------------------------------------------------------------------------------------


def test_native_round_trip_is_exact(tmp_path: Path, x: torch.Tensor) -> None:
    sae = make_sae(model="embedded:smollm2-135m-instruct", layer=7)
    folder = save_sae(sae, tmp_path / "sae", train_config={"lr": 2e-4, "k": K})
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "train_config.json",
        "weights.safetensors",
    ]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["format_version"] == 1 and "saereward_version" in cfg
    assert detect_format(folder) == "native"
    back = load_sae(folder)
    assert back.cfg == sae.cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    assert load_train_config(folder) == {"lr": 2e-4, "k": K}
    assert_same_sae(sae, back, x)


def test_loading_draws_nothing_from_the_global_rng_and_keeps_the_trainers_layout(tmp_path: Path) -> None:
    sae = make_sae()
    folder = save_sae(sae, tmp_path / "sae")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    back = load_sae(folder)
    assert torch.equal(torch.get_rng_state(), before)
    # W_enc is a transposed view of a contiguous [d_sae, d_in], as the trainer builds it
    assert back.W_enc.stride() == sae.W_enc.stride() == (1, D_IN)
    assert back.W_dec.is_contiguous() and all(p.requires_grad for p in back.parameters())
    with torch.no_grad():  # its own storage, not the checkpoint's tensors
        back.W_dec.add_(1.0)
    assert not torch.equal(load_sae(folder).W_dec, back.W_dec)


def test_native_keeps_input_normalization(tmp_path: Path, x: torch.Tensor) -> None:
    sae = make_sae(normalize_input="unit_mean_norm", input_scale=0.37)
    back = load_sae(save_sae(sae, tmp_path / "n"))
    assert back.cfg.normalize_input == "unit_mean_norm" and back.cfg.input_scale == pytest.approx(0.37)
    assert_same_sae(sae, back, x)


def test_save_replaces_existing_sae_atomically(tmp_path: Path, x: torch.Tensor) -> None:
    target = tmp_path / "sae"
    save_sae(make_sae(seed=0), target)
    new = make_sae(seed=5)
    save_sae(new, target)
    assert_same_sae(new, load_sae(target), x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp or backup folders left


def test_failed_save_leaves_old_sae_intact(
    tmp_path: Path, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import saereward.sae.formats as formats

    target = tmp_path / "sae"
    old = make_sae(seed=0)
    save_sae(old, target)

    def boom(path: Path, obj: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(formats, "_write_json", boom)  # fails after the weights were written
    with pytest.raises(OSError, match="disk full"):
        save_sae(make_sae(seed=9), target)
    assert_same_sae(old, load_sae(target), x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_save_refuses_to_overwrite_a_non_sae_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep me")
    with pytest.raises(SaeRewardError, match="refusing to overwrite"):
        save_sae(make_sae(), tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------
# sparsify (the real package)
# --------------------------------------------------------------------------------------------------


def _sparsify_coder(seed: int = 0):  # noqa: ANN202
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(seed)
    sc = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K))
    with torch.no_grad():  # random biases so that b_dec handling matters
        sc.b_dec.normal_()
        sc.encoder.bias.normal_(0.0, 0.1)
    return sc


def test_load_real_sparsify_matches_its_encode_and_decode(tmp_path: Path, x: torch.Tensor) -> None:
    sc = _sparsify_coder()
    folder = tmp_path / "run" / "layers.3"
    sc.save_to_disk(folder)
    sae = load_sae(folder)
    assert detect_format(folder) == "sparsify" and sae.cfg.layer == 3
    with torch.no_grad():
        ref = sc.encode(x)
        vals, idx = sae.encode_topk(x)
        torch.testing.assert_close(
            dense(vals, idx), dense(ref.top_acts, ref.top_indices), atol=ATOL, rtol=1e-5
        )
        # the same nonzero latents, and each side's decode of its own code agrees
        assert torch.equal(dense(vals, idx) > 0, dense(ref.top_acts, ref.top_indices) > 0)
        torch.testing.assert_close(
            sae.decode_topk(vals, idx), sc.decode(ref.top_acts, ref.top_indices), atol=ATOL, rtol=1e-5
        )
        torch.testing.assert_close(sae(x).recon, sc(x).sae_out, atol=ATOL, rtol=1e-5)
    # a run folder with a single hookpoint resolves to it
    assert_same_sae(sae, load_sae(tmp_path / "run"), x)


def test_save_sparsify_loads_in_sparsify(tmp_path: Path, x: torch.Tensor) -> None:
    sparsify = pytest.importorskip("sparsify")
    for i, cfg in enumerate(({}, {"normalize_input": "unit_mean_norm", "input_scale": 0.25})):
        sae = make_sae(seed=i, **cfg)  # type: ignore[arg-type]
        folder = save_sparsify(sae, tmp_path / f"r{i}" / "layers.2")
        sc = sparsify.SparseCoder.load_from_disk(folder)
        with torch.no_grad():
            torch.testing.assert_close(sc(x).sae_out, sae(x).recon, atol=ATOL, rtol=1e-5)
            ref = sc.encode(x)
            torch.testing.assert_close(
                dense(*sae.encode_topk(x)), dense(ref.top_acts, ref.top_indices), atol=ATOL, rtol=1e-5
            )
        assert load_sae(folder).cfg.layer == 2


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"transcode": True}, "transcoder"),
        ({"activation": "groupmax"}, "groupmax"),
        ({"skip_connection": True}, "skip"),
    ],
)
def test_sparsify_variants_we_cannot_represent_are_refused(tmp_path: Path, edit: dict, match: str) -> None:
    folder = save_sparsify(make_sae(), tmp_path / "layers.0")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(SaeRewardError, match=match):
        load_sae(folder)


# --------------------------------------------------------------------------------------------------
# SAELens (the real package)
# --------------------------------------------------------------------------------------------------


def _saelens_topk(apply_b_dec_to_input: bool, rescale: bool, seed: int = 0):  # noqa: ANN202
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    cfg = sae_lens.TopKSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        apply_b_dec_to_input=apply_b_dec_to_input,
        rescale_acts_by_decoder_norm=rescale,
        metadata=SAEMetadata(hook_name="blocks.3.hook_resid_post", model_name="tiny"),
    )
    torch.manual_seed(seed)
    sl = sae_lens.TopKSAE(cfg)
    with torch.no_grad():  # random biases, and decoder rows far from unit norm so the rescale matters
        sl.b_dec.normal_()
        sl.b_enc.normal_(0.0, 0.1)
        sl.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.2)
    return sl


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_load_real_saelens_topk_matches_its_outputs(
    tmp_path: Path, x: torch.Tensor, apply_b_dec_to_input: bool, rescale: bool
) -> None:
    sl = _saelens_topk(apply_b_dec_to_input, rescale)
    sl.save_model(tmp_path / "sl")
    sae = load_sae(tmp_path / "sl")
    assert detect_format(tmp_path / "sl") == "saelens"
    assert sae.cfg.layer == 3 and sae.cfg.model == "tiny"
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), sl.encode(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(sae(x).recon, sl(x), atol=ATOL, rtol=1e-5)


def test_save_saelens_loads_in_saelens(tmp_path: Path, x: torch.Tensor) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    for i, cfg in enumerate(
        ({"layer": 5, "model": "m"}, {"normalize_input": "unit_mean_norm", "input_scale": 0.37})
    ):
        sae = make_sae(seed=i, **cfg)  # type: ignore[arg-type]
        folder = save_saelens(sae, tmp_path / f"sl{i}")
        sl = sae_lens.SAE.load_from_disk(folder)
        assert type(sl).__name__ == "TopKSAE"
        with torch.no_grad():
            torch.testing.assert_close(sl.encode(x), sae.encode(x), atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(sl(x), sae(x).recon, atol=ATOL, rtol=1e-5)
        assert_same_sae(sae, load_sae(folder), x)  # and back
    assert sl.cfg.metadata.hook_name is None
    assert load_sae(tmp_path / "sl0").cfg.layer == 5


@pytest.mark.parametrize("arch", ["jumprelu", "standard"])
def test_saelens_non_topk_is_refused(tmp_path: Path, arch: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    cls, cfg_cls = {
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
    }[arch]
    cls(cfg_cls(d_in=D_IN, d_sae=D_SAE)).save_model(tmp_path / arch)
    with pytest.raises(SaeRewardError, match=f"SAELens '{arch}' SAE: saereward supports only TopK"):
        load_sae(tmp_path / arch)


def _edit_cfg(folder: Path, **edit: object) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **edit}))


def test_saelens_normalizations(tmp_path: Path, x: torch.Tensor) -> None:
    sae = make_sae()
    folder = save_saelens(sae, tmp_path / "sl")
    _edit_cfg(folder, normalize_activations="layer_norm")
    with pytest.raises(SaeRewardError, match="layer_norm"):
        load_sae(folder)
    _edit_cfg(folder, normalize_activations="expected_average_only_in")
    with pytest.raises(SaeRewardError, match="norm_scaling_factor"):
        load_sae(folder)
    # with a known factor s the SAE expects s*x and its output is divided by s: our unit_mean_norm
    _edit_cfg(folder, norm_scaling_factor=0.5)
    scaled = load_sae(folder)
    assert scaled.cfg.normalize_input == "unit_mean_norm" and scaled.cfg.input_scale == 0.5
    torch.testing.assert_close(scaled(x).recon, sae(0.5 * x).recon / 0.5, atol=ATOL, rtol=1e-5)


def test_saelens_pre_6_topk_config_loads(tmp_path: Path, x: torch.Tensor) -> None:
    sae = make_sae()
    folder = save_saelens(sae, tmp_path / "old")
    legacy = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "hook_point": "blocks.2.hook_resid_post",
        "model_name": "gpt2",
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
    }
    (folder / "cfg.json").write_text(json.dumps(legacy))
    back = load_sae(folder)
    assert back.cfg.k == K and back.cfg.layer == 2 and back.cfg.model == "gpt2"
    assert_same_sae(sae, back, x)


# --------------------------------------------------------------------------------------------------
# Seed .pt
# --------------------------------------------------------------------------------------------------


def test_mechreward_pt_round_trip(tmp_path: Path, x: torch.Tensor) -> None:
    sae = make_sae(model="m", layer=4, normalize_input="unit_mean_norm", input_scale=2.0)
    path = save_mechreward_pt(sae, tmp_path / "sae_final.pt", step=123)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["target_layer"] == 4 and side["model_name"] == "m"
    back = load_sae(path)
    assert detect_format(path) == "mechreward_pt" and back.cfg.layer == 4 and back.cfg.model == "m"
    assert back.cfg.normalize_input == "none"  # folded into the weights
    assert_same_sae(sae, back, x)


def test_mechreward_pt_handwritten_dict(tmp_path: Path, x: torch.Tensor) -> None:
    sae = make_sae()
    obj = {
        "W_enc": sae.W_enc.detach().clone(),
        "W_dec": sae.W_dec.detach().clone(),
        "b_enc": sae.b_enc.detach().clone(),
        "b_dec": sae.b_dec.detach().clone(),
        "d_model": D_IN,
        "d_sae": D_SAE,
        "k": K,
    }
    torch.save(obj, tmp_path / "seed.pt")
    assert_same_sae(sae, load_sae(tmp_path / "seed.pt"), x)
    torch.save({**obj, "d_model": 32}, tmp_path / "bad.pt")
    with pytest.raises(SaeRewardError, match="shape mismatch.*d_in=32"):
        load_sae(tmp_path / "bad.pt")


class _Evil:
    """Unpickling this runs a shell command: the payload of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pt_is_refused_without_running_it(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"W_enc": torch.zeros(2, 2), "k": 1, "x": _Evil(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    with pytest.raises(SaeRewardError, match="refusing to load .*could run code"):
        load_sae(path)
    assert not marker.exists()
    # control: the payload is live, an unsafe load would have run it
    control = tmp_path / "control"
    torch.save({"x": _Evil(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


# --------------------------------------------------------------------------------------------------
# Errors and detection
# --------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match="does not exist"):
        load_sae(tmp_path / "nope")


def test_unknown_layout_lists_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "model.bin").write_bytes(b"x")
    with pytest.raises(
        SaeRewardError, match=r"unknown SAE layout .*model\.bin.*sae_weights\.safetensors.*\.pt"
    ):
        load_sae(tmp_path / "f")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "cfg.json").write_text("{}")
    with pytest.raises(SaeRewardError, match="cfg.json but no weights file"):
        load_sae(tmp_path / "g")


@pytest.mark.parametrize("save", [save_sae, save_saelens, save_sparsify])
def test_truncated_or_corrupt_safetensors(tmp_path: Path, save) -> None:  # noqa: ANN001
    folder = save(make_sae(), tmp_path / "layers.1")
    (weights,) = folder.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SaeRewardError, match="truncated or corrupt"):
        load_sae(folder)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SaeRewardError, match="truncated or corrupt"):
        load_sae(folder)


def test_truncated_pt(tmp_path: Path) -> None:
    path = save_mechreward_pt(make_sae(), tmp_path / "s.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SaeRewardError, match="truncated or corrupt"):
        load_sae(path)


def test_cfg_weight_shape_mismatch(tmp_path: Path) -> None:
    folder = save_sae(make_sae(), tmp_path / "a")
    _edit_cfg(folder, d_in=D_IN + 1)
    with pytest.raises(SaeRewardError, match="shape mismatch .*d_in=17"):
        load_sae(folder)
    folder = save_saelens(make_sae(), tmp_path / "b")
    _edit_cfg(folder, d_sae=D_SAE * 2)
    with pytest.raises(SaeRewardError, match="shape mismatch .*d_sae=128"):
        load_sae(folder)
    # weights that disagree with each other
    from safetensors.torch import load_file, save_file

    folder = save_sae(make_sae(), tmp_path / "c")
    w = load_file(str(folder / "weights.safetensors"))
    save_file({**w, "W_dec": w["W_dec"][:, :-1].contiguous()}, str(folder / "weights.safetensors"))
    with pytest.raises(SaeRewardError, match=r"W_dec is \[64, 15\]"):
        load_sae(folder)


def test_several_saes_in_one_folder_are_listed(tmp_path: Path) -> None:
    save_sparsify(make_sae(), tmp_path / "run" / "layers.1")
    save_sparsify(make_sae(), tmp_path / "run" / "layers.2")
    with pytest.raises(SaeRewardError, match="several SAEs .*layers.1, layers.2"):
        load_sae(tmp_path / "run")


def test_forced_format(tmp_path: Path) -> None:
    folder = save_sae(make_sae(), tmp_path / "n")
    assert load_sae(folder, format="native").cfg.k == K
    with pytest.raises(SaeRewardError, match="not a saelens SAE"):
        load_sae(folder, format="saelens")
    with pytest.raises(SaeRewardError, match="unknown SAE format"):
        load_sae(folder, format="onnx")
    assert list(FORMATS) == ["native", "saelens", "sparsify", "mechreward_pt"]


def test_check_sae_matches_model() -> None:
    sae = make_sae(layer=2)
    check_sae_matches_model(sae, D_IN, layer=2)
    with pytest.raises(SaeRewardError, match="SAE d_in 16 does not match model width 64 at layer 2"):
        check_sae_matches_model(sae, 64, layer=2)


def test_a_config_or_argument_of_the_wrong_type_is_one_line(tmp_path: Path) -> None:
    """Config fields of the wrong type, integer weights, and a bad device or dtype from a library
    caller are one-line errors (were a TypeError, a RuntimeError, or accepted)."""
    save_sae(make_sae(), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    for key, value in (("layer", "abc"), ("model", [1]), ("input_scale", "x")):
        (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(SaeRewardError, match=rf"SAE config {key}=.* has the wrong type"):
            load_sae(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    for kw, says in (
        ({"device": "bogus"}, "is not cpu, cuda or cuda:N"),
        ({"dtype": "float16"}, "pass a floating torch dtype"),
        ({"dtype": torch.int8}, "pass a floating torch dtype"),
    ):
        with pytest.raises(SaeRewardError, match=says):
            load_sae(tmp_path / "s", **kw)  # type: ignore[arg-type]
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "s" / "weights.safetensors"))
    save_file({**w, "b_dec": w["b_dec"].long()}, str(tmp_path / "s" / "weights.safetensors"))
    with pytest.raises(SaeRewardError, match="b_dec has dtype torch.int64"):
        load_sae(tmp_path / "s")


def test_another_model_of_the_same_width_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from saereward.sae.formats import warn_other_model

    with caplog.at_level("WARNING"):
        warn_other_model("SAE s", "embedded:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
        warn_other_model("SAE s", None, "m")  # nothing recorded: nothing to compare
        assert caplog.text == ""
        warn_other_model("pack p", "embedded:smollm2-135m-instruct", "models/same576")
    assert (
        "pack p was made on embedded:smollm2-135m-instruct, but the residuals here come from models/same576"
        in caplog.text
    )
