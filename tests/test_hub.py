"""``hf://`` sources read through huggingface_hub's cache (offline), and ``saereward push`` short of the
upload: the folder and model card it would send, and one error line without the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from saereward.cli import main
from saereward.errors import SaeRewardError
from saereward.features.pack import Feature, FeaturePack, load_pack, save_pack
from saereward.hub import parse_hf_source, resolve_source
from saereward.report.push import PushConfig, run_push
from saereward.sae.formats import load_sae, save_sae
from tiny_models import D_MODEL, random_sae

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SPEC = "embedded:smollm2-135m-instruct"


def _run(tmp: Path) -> Path:
    """A small run folder: RUN/sae/sae (with eval.json), RUN/pack.json, RUN/gate_g1.json, stages.json."""
    run = tmp / "run"
    sae_dir = save_sae(
        random_sae(d_in=D_MODEL, d_sae=128, k=8, layer=1, model=SPEC),
        run / "sae" / "sae",
        train_config={"total_tokens": 1000, "k": 8, "seed": 3},
    )
    (sae_dir / "eval.json").write_text(json.dumps({"fvu": 0.25, "l0": 8.0, "dead_pct": 1.5, "n_tokens": 500}))
    pack = FeaturePack(
        "t",
        [Feature(1, 1.0)],
        [Feature(2, -1.0)],
        layer=1,
        model_name=SPEC,
        metadata={"d_model": D_MODEL, "d_sae": 128, "sae_path": str(sae_dir), "sae_sha256": "abc"},
    )
    save_pack(pack, run / "pack.json")
    g1 = {
        "verdict": "PASS",
        "n_responses": 40,
        "n_questions": 20,
        "seed": 0,
        "methods": {"pack": {"spearman_rho": 0.31, "rho_ci": [0.12, 0.48]}},
    }
    (run / "gate_g1.json").write_text(json.dumps(g1))
    (run / "stages.json").write_text("{}")
    return run


def _cache(tmp: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    """A hub cache laid out as huggingface_hub lays it out: refs/main -> snapshots/<commit>/..."""
    import huggingface_hub.constants as hc

    repo = tmp / "hub" / "models--alice--smollm-sae"
    snap = repo / "snapshots" / COMMIT
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, snap / rel)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_parse_hf_source() -> None:
    assert parse_hf_source("hf://alice/sae") == ("alice/sae", "", None)
    assert parse_hf_source("hf://alice/sae/layers.6/sae@v1") == ("alice/sae", "layers.6/sae", "v1")
    for bad in ("hf://alice", "hf://alice/sae/../x", "hf://alice/sae@"):
        with pytest.raises(SaeRewardError, match="is not a hub source"):
            parse_hf_source(bad)
    assert resolve_source("plain/path") == "plain/path"


def test_hf_sources_read_the_local_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path)
    _cache(tmp_path, monkeypatch, {"sae": run / "sae" / "sae", "pack.json": run / "pack.json"})
    sae = load_sae("hf://alice/smollm-sae/sae")
    want = load_sae(run / "sae" / "sae")
    assert torch.equal(sae.W_enc, want.W_enc) and sae.cfg.layer == 1
    assert load_pack("hf://alice/smollm-sae/pack.json").helpful[0].feature_id == 1
    with pytest.raises(SaeRewardError, match="not in the local hub cache and the hub is not reachable"):
        load_sae("hf://alice/smollm-sae/other")
    with pytest.raises(SaeRewardError, match="not in the local hub cache"):
        load_pack("hf://bob/missing/pack.json")


def test_push_dry_run_writes_the_folder_and_card(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = Path(
        run_push(
            PushConfig(
                path=str(run / "sae" / "sae"), repo="alice/smollm-sae", dry_run=True, out=str(tmp_path / "up")
            )
        )
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "cfg.json",
        "eval.json",
        "train_config.json",
        "weights.safetensors",
    ]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saereward\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| fvu | 0.25 |" in card and "| total_tokens | 1000 |" in card
    assert "| G1 | PASS | pack Spearman ρ" in card and "0.12" in card and "40 responses" in card
    assert 'load_sae("hf://alice/smollm-sae")' in card
    assert torch.equal(load_sae(out).W_dec, load_sae(run / "sae" / "sae").W_dec)
    with pytest.raises(SaeRewardError, match="exists: pass a new --out"):
        run_push(PushConfig(path=str(run / "sae" / "sae"), repo="alice/x", dry_run=True, out=str(out)))
    pack_out = Path(
        run_push(
            PushConfig(path=str(run / "pack.json"), repo="alice/pack", dry_run=True, out=str(tmp_path / "pk"))
        )
    )
    assert {"README.md", "pack.json"} <= {p.name for p in pack_out.iterdir()}
    assert "1 helpful and 1 harmful SAE features" in (pack_out / "README.md").read_text()
    pk2 = tmp_path / "pk2"  # --run names the gate results; one without any is refused, nothing left
    run_push(PushConfig(path=str(run / "pack.json"), repo="a/p", dry_run=True, out=str(pk2), run=str(run)))
    assert "| G1 | PASS |" in (pk2 / "README.md").read_text()
    for bad in (tmp_path / "nope", run / "sae"):
        with pytest.raises(SaeRewardError, match="holds no gate results"):
            run_push(
                PushConfig(
                    path=str(run / "pack.json"),
                    repo="a/p",
                    dry_run=True,
                    out=str(tmp_path / "pk3"),
                    run=str(bad),
                )
            )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("pk3", ".push-"))) == []


def test_push_without_network_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(run / "sae" / "sae"), "--repo", "alice/smollm-sae"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert (
        len(err) == 1 and "cannot reach the Hugging Face hub" in err[0] and "nothing was uploaded" in err[0]
    )
    assert main(["push", str(run / "sae" / "sae"), "--repo", "not-a-repo"]) == 2
    assert "must look like owner/name" in capsys.readouterr().err
