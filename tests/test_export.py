"""``saereward export-sae``: each format loads in its own library and encodes as the source does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saereward.cli import main
from saereward.sae.formats import load_sae, save_sae
from saereward.sae.kernels import use_kernels
from test_sae_formats import ATOL, D_IN, dense, make_sae

EMBEDDED = "embedded:smollm2-135m-instruct"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    sae = make_sae(seed=4, model=EMBEDDED, layer=3, normalize_input="unit_mean_norm", input_scale=0.4)
    return save_sae(sae, tmp_path / "src")


def _export(src: Path, fmt: str, out: Path) -> None:
    assert main(["export-sae", "--sae", str(src), "--format", fmt, "--out", str(out)]) == 0


def test_saelens_export_loads_in_saelens_and_names_the_hf_model(source: Path, tmp_path: Path) -> None:
    import sae_lens

    x = 2.0 * torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0)) + 0.5
    _export(source, "saelens", tmp_path / "sl")
    sl = sae_lens.SAE.load_from_disk(tmp_path / "sl")
    ours = load_sae(source)
    with torch.no_grad(), use_kernels("eager"):  # the fp32 reference (the fast path selects in bf16
        assert (sl.encode(x) - ours.encode(x)).abs().max().item() < 1e-5  # on CPUs with bf16 units)
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["hook_name"] == "blocks.3.hook_resid_post"
    back = load_sae(tmp_path / "sl")
    assert back.cfg.model == EMBEDDED and back.cfg.layer == 3  # and back to exactly what it was trained on


def test_sparsify_and_mechreward_exports_encode_alike(source: Path, tmp_path: Path) -> None:
    import sparsify

    x = 2.0 * torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) + 0.5
    ours = load_sae(source)
    _export(source, "sparsify", tmp_path / "sp")
    sc = sparsify.SparseCoder.load_from_disk(tmp_path / "sp" / "layers.3")
    with torch.no_grad(), use_kernels("eager"):  # the fp32 reference on every CPU
        ref = sc.encode(x)
        torch.testing.assert_close(
            dense(ref.top_acts, ref.top_indices), dense(*ours.encode_topk(x)), atol=ATOL, rtol=1e-5
        )
    _export(source, "mechreward-pt", tmp_path / "seed.pt")
    pt = load_sae(tmp_path / "seed.pt")
    with torch.no_grad(), use_kernels("eager"):
        torch.testing.assert_close(pt.encode(x), ours.encode(x), atol=ATOL, rtol=1e-5)


def test_an_export_never_overwrites(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").mkdir()
    assert main(["export-sae", "--sae", str(source), "--out", str(tmp_path / "taken")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exists" in err and err.count("\n") == 1


def test_a_mechreward_export_never_overwrites_its_pt_or_sidecar(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out keep`` writes keep.pt and keep.json: either one existing already is refused, and an
    --out with another suffix is not silently renamed."""
    (tmp_path / "keep.json").write_text('{"mine": true}')
    argv = ["export-sae", "--sae", str(source), "--format", "mechreward-pt", "--out"]
    assert main([*argv, str(tmp_path / "keep")]) == 2
    assert "keep.json exists" in capsys.readouterr().err
    assert (tmp_path / "keep.json").read_text() == '{"mine": true}' and not (tmp_path / "keep.pt").exists()
    assert main([*argv, str(tmp_path / "x.safetensors")]) == 2
    assert "pass --out NAME.pt" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    (tmp_path / "adir").mkdir()  # an existing folder is not a file name: no adir.pt beside it
    assert main([*argv, str(tmp_path / "adir")]) == 2
    assert "pass --out NAME.pt" in capsys.readouterr().err and not (tmp_path / "adir.pt").exists()
    _export(source, "mechreward-pt", tmp_path / "fresh")
    assert (tmp_path / "fresh.pt").is_file() and (tmp_path / "fresh.json").is_file()
