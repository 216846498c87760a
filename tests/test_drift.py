"""``saereward drift``: NMSE/ΔNMSE maths, warm-started refits, decoder drift, and a resumable run on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from saereward.analysis.drift import (
    DriftConfig,
    decoder_drift,
    format_drift,
    heldout_eval,
    latent_stats,
    load_corpus,
    nmse_slopes,
    refit_sae,
    run_drift,
    run_stages,
    split_tokens,
    token_mask,
)
from saereward.errors import SaeRewardError
from saereward.features.pack import Feature, FeaturePack, save_pack
from saereward.sae.formats import load_sae, save_sae
from saereward.sae.kernels import use_kernels
from tiny_models import D_MODEL, random_sae

# --------------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------------


def test_heldout_nmse_is_mean_per_token_ratio() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, D_MODEL, generator=g) * 3 + 1
    sae = random_sae(d_in=D_MODEL, d_sae=128, k=8)
    with torch.no_grad(), use_kernels("eager"):  # eval-sae's exact fp32 path
        recon = sae(x).recon.double()
    x64 = x.double()
    want = ((x64 - recon).pow(2).sum(-1) / x64.pow(2).sum(-1)).mean()
    got = heldout_eval(sae, x)
    assert got["nmse"] == pytest.approx(float(want), rel=1e-6)
    assert got["n_tokens"] == 300


def test_nmse_slopes() -> None:
    s = nmse_slopes([0, 2, 4, 10], [0.10, 0.12, 0.16, 0.22])
    assert s["per_step"][0] is None and s["slope"][0] is None
    assert s["per_step"][1:] == pytest.approx([0.01, 0.015, 0.012])
    assert s["slope"][1:] == pytest.approx([0.01, 0.02, 0.01])
    steps, y = torch.tensor([0, 2, 4, 10.0]), torch.tensor([0.10, 0.12, 0.16, 0.22])
    ols = float(((steps - steps.mean()) * (y - y.mean())).sum() / (steps - steps.mean()).pow(2).sum())
    assert s["fit"] == pytest.approx(ols, rel=1e-6)
    assert nmse_slopes([0], [0.3]) == {"per_step": [None], "slope": [None], "fit": None}


def test_decoder_drift_is_one_minus_cos() -> None:
    a = random_sae(d_in=D_MODEL, d_sae=64, k=4, seed=0).W_dec.detach()
    assert torch.equal(decoder_drift(a, a.clone()), torch.zeros(64, dtype=torch.float64))
    b = a.clone()
    b[3] = -a[3]  # opposite: drift 2
    b[5] = 7.0 * a[5]  # rescaled: no drift
    theta = 0.3  # rotate row 7 inside the plane of rows 7 and 8
    e1 = a[7] / a[7].norm()
    e2 = a[8] - (a[8] @ e1) * e1
    e2 = e2 / e2.norm()
    b[7] = a[7].norm() * (e1 * torch.cos(torch.tensor(theta)) + e2 * torch.sin(torch.tensor(theta)))
    d = decoder_drift(b, a)
    assert d[3] == pytest.approx(2.0) and d[5] == pytest.approx(0.0, abs=1e-12)
    assert d[7] == pytest.approx(1 - torch.cos(torch.tensor(theta, dtype=torch.float64)).item(), abs=1e-6)
    want = 1 - torch.nn.functional.cosine_similarity(b.double(), a.double(), dim=-1)
    assert torch.allclose(d, want.clamp_min(0))
    assert decoder_drift(b, a, [3, 7]).tolist() == pytest.approx([d[3].item(), d[7].item()])


def test_latent_stats_and_token_mask() -> None:
    sae = random_sae(d_in=D_MODEL, d_sae=128, k=8)
    x = torch.randn(50, D_MODEL)
    mean_act, fire = latent_stats(sae, x)
    with torch.no_grad(), use_kernels("eager"):
        dense = sae.encode(x).double()
    assert torch.allclose(mean_act, dense.mean(0)) and torch.allclose(fire, (dense > 0).double().mean(0))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert token_mask(mask).tolist() == [
        [False, False, False, True, True],
        [False, True, True, True, True],
        [False, False, False, False, False],
    ]
    train, held = split_tokens(100, 0.2, seed=3)
    assert (
        len(held) == 20 and len(train) == 80 and set(train.tolist()) | set(held.tolist()) == set(range(100))
    )
    assert torch.equal(split_tokens(100, 0.2, seed=3)[1], held)


def test_refit_is_warm_started_from_the_previous_sae() -> None:
    prev = random_sae(d_in=D_MODEL, d_sae=128, k=8, layer=1, model="tiny")
    x = torch.randn(512, D_MODEL) * 2
    kw: dict[str, Any] = {"lr": 1e-3, "batch_size": 64, "seed": 0, "model": "tiny", "layer": 1}
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    for tokens, epochs in ((512, 0), (0, 3)):
        same, info = refit_sae(prev, x, tokens=tokens, epochs=epochs, **kw)
        assert info["refit_steps"] == 0
        assert same is not prev and all(torch.equal(getattr(same, n), getattr(prev, n)) for n in names)
        assert same.cfg == prev.cfg
    _, info = refit_sae(prev, x, tokens=32, epochs=1, **kw)  # fewer tokens than a batch: one step of 32
    assert info == {"refit_tokens": 32, "refit_steps": 1}
    one, info = refit_sae(prev, x, tokens=64, epochs=1, **{**kw, "lr": 1e-6})
    assert info == {"refit_tokens": 64, "refit_steps": 1}
    diff = max(float((getattr(one, n) - getattr(prev, n)).detach().abs().max()) for n in names)
    assert 0 < diff < 1e-4  # one tiny Adam step away from prev (a fresh init would be far)
    many, info = refit_sae(prev, x, tokens=512, epochs=3, **kw)
    assert info == {"refit_tokens": 512, "refit_steps": 24}
    assert heldout_eval(many, x)["nmse"] < heldout_eval(prev, x)["nmse"]
    again, _ = refit_sae(prev, x, tokens=512, epochs=3, **kw)
    assert all(torch.equal(getattr(many, n), getattr(again, n)) for n in names)  # CPU-deterministic


def test_corpus_and_stage_errors(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]
    (tmp_path / "ro" / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_corpus(tmp_path / "ro") == [f"q{i} a{i}" for i in range(10)]
    sample = load_corpus(tmp_path / "ro" / "rollouts.jsonl", max_texts=4, seed=1)
    assert len(sample) == 4 and sample == load_corpus(tmp_path / "ro", 4, 1)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "", "completion": ""}) + "\n")
    with pytest.raises(SaeRewardError, match="empty"):
        load_corpus(tmp_path / "empty.jsonl")
    with pytest.raises(SaeRewardError, match="no rollouts.jsonl"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(SaeRewardError, match="--snapshot-every N"):
        run_stages(tmp_path / "ro")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "tiny"}))
    with pytest.raises(
        SaeRewardError, match="no adapter snapshots or checkpoint: pass a train-rl run folder"
    ):
        run_stages(tmp_path / "run")
    with pytest.raises(SaeRewardError, match="heldout_fraction"):
        from saereward.config import from_dict

        from_dict(DriftConfig, {"heldout_fraction": 1.5})


# --------------------------------------------------------------------------------------------------
# End to end on a tiny model: a train-rl run with 2 snapshots + a final checkpoint
# --------------------------------------------------------------------------------------------------


def fresh_tiny() -> Any:
    from saereward.model.lm import LoadedModel
    from tiny_models import char_tokenizer, make_tiny

    model, _ = make_tiny("llama")
    return LoadedModel(model=model, tokenizer=char_tokenizer(), spec="tiny", source="hf", path="")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import test_rl
    from saereward.rl.grpo import GRPOTrainer

    root = tmp_path_factory.mktemp("drift")
    torch.set_num_threads(1)
    cfg = test_rl.rl_cfg(root / "run", steps=5, snapshot_every=2, checkpoint_every=5, threads=1)
    GRPOTrainer(cfg, lm=fresh_tiny()).fit()
    sae = random_sae(d_in=D_MODEL, d_sae=128, k=8, layer=1, model="tiny")
    save_sae(sae, root / "sae")
    pack = FeaturePack(
        "t",
        [Feature(i, 1.0) for i in range(0, 4)],
        [Feature(i, -0.5) for i in range(4, 7)],
        layer=1,
        model_name="tiny",
        metadata={"d_model": D_MODEL, "d_sae": 128, "sae_path": str(root / "sae")},
    )
    save_pack(pack, root / "pack.json")
    (root / "ro").mkdir()
    rows = [
        {
            "prompt": f"Q: {i}+{i + 1}=? A:",
            "completion": f" {i}+{i + 1}={2 * i + 1}. The answer is {2 * i + 1}.",
        }
        for i in range(40)
    ]
    (root / "ro" / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "root": root,
        "run": root / "run",
        "sae": root / "sae",
        "pack": root / "pack.json",
        "ro": root / "ro",
    }


def drift_cfg(t: dict[str, Path], out: Path, **kw: Any) -> DriftConfig:
    base: dict[str, Any] = {
        "run": str(t["run"]),
        "pack": str(t["pack"]),
        "rollouts": str(t["ro"]),
        "max_texts": 24,
        "batch_size": 8,
        "refit_tokens": 512,
        "refit_epochs": 2,
        "refit_lr": 1e-3,
        "refit_batch_size": 128,
        "threads": 1,
        "progress": False,
        "out": str(out),
    }
    base.update(kw)
    return DriftConfig(**base)


def numbers(result: dict[str, Any]) -> dict[str, Any]:
    """The result without timings and the reuse list (what must be identical across runs)."""
    strip = {k: v for k, v in result.items() if k not in ("sec_total", "reused_stages", "config")}
    strip["stages"] = [{k: v for k, v in r.items() if not k.startswith("sec_")} for r in result["stages"]]
    return strip


def test_run_stages_lists_snapshots_then_final(tiny_run: dict[str, Path]) -> None:
    stages = run_stages(tiny_run["run"])
    assert [s for s, _ in stages] == [0, 2, 4, 5]
    assert stages[0][1] is None and stages[-1][1] == tiny_run["run"] / "checkpoint"
    assert [s for s, _ in run_stages(tiny_run["run"], include_final=False)] == [0, 2, 4]


def test_drift_end_to_end_resume_and_determinism(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "drift"
    res = run_drift(drift_cfg(tiny_run, out), lm=fresh_tiny())
    assert (out / "drift.png").stat().st_size > 0
    on_disk = json.loads((out / "drift.json").read_text())
    assert numbers(on_disk) == numbers(json.loads(json.dumps(res)))
    assert on_disk["config"]["out"] == str(out) and on_disk["seed"] == 0 and on_disk["reused_stages"] == []
    steps = [r["step"] for r in res["stages"]]
    assert steps == [0, 2, 4, 5] and res["steps"] == steps
    n = res["n_tokens"]
    assert n > 100 and res["n_heldout"] == round(0.2 * n) and res["n_train"] + res["n_heldout"] == n
    rows = res["stages"]
    assert all(r["n_tokens"] == n for r in rows)  # the same corpus at every stage
    r0 = rows[0]
    assert (
        r0["nmse_prev"] == r0["nmse_base"] and r0["dnmse_per_step"] is None and r0["resid_norm_change"] == 0
    )
    assert r0["refit_steps"] == 2 * (min(512, res["n_train"]) // 128)
    for prev, r in zip(rows, rows[1:]):
        assert r["dnmse_per_step"] == pytest.approx((r["nmse_base"] - r0["nmse_base"]) / r["step"])
        assert r["dnmse_slope"] == pytest.approx(
            (r["nmse_base"] - prev["nmse_base"]) / (r["step"] - prev["step"])
        )
        assert r["resid_norm_change"] == pytest.approx(r["resid_norm_mean"] - r0["resid_norm_mean"])
        assert r["nmse_prev"] != r["nmse_base"]  # the previous stage's SAE is a refit, not the base SAE
    assert rows[-1]["resid_norm_mean"] != r0["resid_norm_mean"]  # the LoRA moved the policy
    # per-feature rows: one per pack feature, drift = 1 - cos against the base SAE's decoder
    feats = res["features"]
    assert [f["feature"] for f in feats] == list(range(7))
    assert [f["polarity"] for f in feats] == ["helpful"] * 4 + ["harmful"] * 3 and feats[4]["weight"] == -0.5
    base = load_sae(tiny_run["sae"])
    last = load_sae(out / "saes" / "step_00005")
    want = decoder_drift(last.W_dec, base.W_dec, range(7))
    assert [f["dec_drift"][-1] for f in feats] == pytest.approx(want.tolist(), abs=1e-12)
    assert all(f["mean_act_change"][0] == 0 and len(f["mean_act"]) == 4 for f in feats)
    table = format_drift(res)
    assert "NMSE base" in table and "dNMSE/step" in table and len(table.splitlines()) >= 4 + 3 + 7

    # resume: drop the last stage, re-run: the earlier stages are reused (files untouched), same numbers
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "saes").rglob("*.safetensors")}
    shutil.rmtree(out / "saes" / "step_00005")
    for f in (out / "stages").glob("step_00005.*"):
        f.unlink()
    res2 = run_drift(drift_cfg(tiny_run, out), lm=fresh_tiny())
    assert res2["reused_stages"] == [0, 2, 4]
    assert numbers(res2) == numbers(res)
    for p, t in mtimes.items():
        if "step_00005" not in str(p):
            assert p.stat().st_mtime_ns == t
    # everything done: nothing is recomputed, not even the model is needed
    res3 = run_drift(drift_cfg(tiny_run, out), lm=fresh_tiny())
    assert res3["reused_stages"] == [0, 2, 4, 5] and numbers(res3) == numbers(res)

    # a fresh folder with the same seed gives identical numbers (CPU-deterministic)
    res4 = run_drift(drift_cfg(tiny_run, tmp_path / "again"), lm=fresh_tiny())
    assert numbers(res4) == numbers(res)
    # a changed setting is refused in the same folder (one line naming it); a new folder recomputes all
    with pytest.raises(SaeRewardError, match=r"holds drift stages made with other settings \(refit_lr "):
        run_drift(drift_cfg(tiny_run, out, refit_lr=2e-3), lm=fresh_tiny())
    assert numbers(json.loads((out / "drift.json").read_text())) == numbers(res)
    res5 = run_drift(drift_cfg(tiny_run, tmp_path / "lr", refit_lr=2e-3), lm=fresh_tiny())
    assert res5["reused_stages"] == [] and res5["stages"][0]["nmse_refit"] != res["stages"][0]["nmse_refit"]


def test_drift_zero_refit_keeps_the_base_sae(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    res = run_drift(
        drift_cfg(
            tiny_run, tmp_path / "d", refit_epochs=0, include_final=False, pack=None, sae=str(tiny_run["sae"])
        ),
        lm=fresh_tiny(),
    )
    base = load_sae(tiny_run["sae"])
    for r in res["stages"]:
        assert r["refit_steps"] == 0 and r["nmse_refit"] == r["nmse_prev"] == r["nmse_base"]
        assert r["dec_drift_mean"] == 0.0 and r["dec_drift_pack_mean"] is None
        sae = load_sae(tmp_path / "d" / "saes" / f"step_{r['step']:05d}")
        assert torch.equal(sae.W_dec, base.W_dec) and torch.equal(sae.W_enc, base.W_enc)
    assert res["features"] == [] and [r["step"] for r in res["stages"]] == [0, 2, 4]
    assert (tmp_path / "d" / "drift.png").is_file()


def test_drift_refuses_mismatches(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    save_sae(random_sae(d_in=32, d_sae=128, k=8, layer=1), tmp_path / "sae32")
    with pytest.raises(SaeRewardError, match="d_in 32 does not match model width 64"):
        run_drift(
            drift_cfg(tiny_run, tmp_path / "a", pack=None, sae=str(tmp_path / "sae32")), lm=fresh_tiny()
        )
    with pytest.raises(SaeRewardError, match="trained on layer 1 but drift reads layer 2"):
        run_drift(drift_cfg(tiny_run, tmp_path / "b", layer=2), lm=fresh_tiny())
    with pytest.raises(SaeRewardError, match="trained on layer 1 but drift reads layer 9"):
        run_drift(
            drift_cfg(tiny_run, tmp_path / "c", pack=None, sae=str(tiny_run["sae"]), layer=9), lm=fresh_tiny()
        )
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused before any output
    with pytest.raises(SaeRewardError, match="out of range"):  # counted from the end: known once loaded
        run_drift(
            drift_cfg(tiny_run, tmp_path / "c", pack=None, sae=str(tiny_run["sae"]), layer=-9),
            lm=fresh_tiny(),
        )
    with pytest.raises(SaeRewardError, match="pass --sae"):
        run_drift(drift_cfg(tiny_run, tmp_path / "d", pack=None), lm=fresh_tiny())
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "rollouts.jsonl").write_text("\n")
    with pytest.raises(SaeRewardError, match="empty"):
        run_drift(drift_cfg(tiny_run, tmp_path / "e", rollouts=str(tmp_path / "ro")), lm=fresh_tiny())
    with pytest.raises(SaeRewardError, match="--snapshot-every N"):
        run_drift(drift_cfg(tiny_run, tmp_path / "f", run=str(tmp_path)), lm=fresh_tiny())


def test_a_layer_counted_from_the_end_is_checked_from_the_models_config(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the model's config gives its depth (no weights loaded), a negative ``--layer`` is resolved
    and checked before drift writes its ``config.json``."""
    import saereward.analysis.drift as drift

    monkeypatch.setattr(drift, "model_dims", lambda spec: (4, 64))
    with pytest.raises(SaeRewardError, match="trained on layer 1 but drift reads layer 2"):
        run_drift(drift_cfg(tiny_run, tmp_path / "a", layer=-2), lm=fresh_tiny())
    with pytest.raises(SaeRewardError, match="layer -9 is out of range: the model has 4 decoder layers"):
        run_drift(drift_cfg(tiny_run, tmp_path / "b", layer=-9), lm=fresh_tiny())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
