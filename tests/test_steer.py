"""``saereward steer``: the steering hook, clamp math, the contrastive vector, flip bookkeeping, errors, and runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from saereward.analysis.steer import (
    SteerConfig,
    SteeringHook,
    clamp_delta,
    conditions,
    constant_delta,
    contrastive_vector,
    feature_activation,
    feature_row,
    format_steer,
    pack_vector,
    paired_comparison,
    replace_block_output,
    run_steer,
)
from saereward.errors import SaeRewardError
from saereward.features.pack import Feature, FeaturePack, save_pack
from saereward.sae.coder import SAEConfig, TopKSAE
from saereward.sae.formats import save_sae
from saereward.stats import mcnemar
from tiny_models import D_MODEL, random_sae, tiny_lm

# ---------------------------------------------------------------------------------------------------
# The hook
# ---------------------------------------------------------------------------------------------------


def test_hook_adds_exactly_scale_norm_v_and_removal_restores_bit_exactly() -> None:
    from saereward.model.capture import ResidualCapture

    lm = tiny_lm("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    layer = 1
    with torch.no_grad(), ResidualCapture(lm.model, [layer - 1, layer]) as cap:
        before = lm.model(input_ids=ids).logits
    v = torch.randn(D_MODEL)
    v = v / v.norm()
    scale, norm = 0.1, 37.5
    # hooks run in registration order: the capture entered second sees the steered output
    with (
        torch.no_grad(),
        SteeringHook(lm.model, layer, constant_delta(scale * norm * v)) as hook,
        ResidualCapture(lm.model, [layer - 1, layer]) as cap2,
    ):
        steered = lm.model(input_ids=ids).logits
    diff = cap2.sequence(layer) - cap.sequence(layer)
    torch.testing.assert_close(diff, (scale * norm * v).expand_as(diff), atol=2e-5, rtol=0)
    assert torch.equal(cap2.sequence(layer - 1), cap.sequence(layer - 1))  # blocks below are untouched
    assert hook.positions == ids.numel() and hook.mean_norm == pytest.approx(scale * norm, rel=1e-5)
    assert not torch.equal(steered, before)
    with torch.no_grad():
        after = lm.model(input_ids=ids).logits
    assert torch.equal(after, before)
    assert not lm.model.model.layers[layer]._forward_hooks


def test_hook_is_removed_after_an_exception() -> None:
    lm = tiny_lm("llama")

    def boom(h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), SteeringHook(lm.model, 0, boom):
        lm.model(input_ids=torch.tensor([[5, 6]]))
    assert not lm.model.model.layers[0]._forward_hooks


def test_replace_block_output_tuple_tensor_and_list() -> None:
    h, new = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    extra = object()
    assert replace_block_output(h, new) is new
    out = replace_block_output((h, extra), new)
    assert isinstance(out, tuple) and out[0] is new and out[1] is extra
    assert replace_block_output([h, extra], new)[0] is new

    class TupleBlock(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
            return (x * 2, "cache")

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([TupleBlock()])

    w = Wrapper()
    with SteeringHook(w, 0, constant_delta(torch.full((3,), 0.5))):
        y, tag = w.model.layers[0](torch.ones(1, 2, 3))
    assert tag == "cache" and torch.equal(y, torch.full((1, 2, 3), 2.5))


def test_hook_fires_on_every_generated_position() -> None:
    lm = tiny_lm("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    kw: dict[str, Any] = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        base = lm.model.generate(ids, **kw)
    with torch.no_grad(), SteeringHook(lm.model, 2, constant_delta(torch.full((D_MODEL,), 50.0))) as hook:
        steered = lm.model.generate(ids, **kw)
    # prefill (4 positions) + one cached step per new token but the last
    assert hook.positions == 4 + 5 - 1
    assert not torch.equal(base, steered)


# ---------------------------------------------------------------------------------------------------
# Clamp and feature math
# ---------------------------------------------------------------------------------------------------


def orthogonal_sae(d_in: int = 16, d_sae: int = 8, k: int = 3, **cfg: Any) -> TopKSAE:
    """Orthonormal decoder rows, tied encoder: encoding is exact, so clamping is exact too."""
    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg))
    q, _ = torch.linalg.qr(torch.randn(d_in, d_sae))
    with torch.no_grad():
        sae.W_dec.copy_(q.t())
        sae.W_enc.copy_(q)
        sae.b_dec.copy_(0.1 * torch.randn(d_in))
    return sae.requires_grad_(False)


@pytest.mark.parametrize("normalize", ["none", "unit_mean_norm"])
@pytest.mark.parametrize("value", [0.0, 7.0])
def test_clamp_sets_the_feature_activation(normalize: str, value: float) -> None:
    sae = orthogonal_sae(normalize_input=normalize, input_scale=0.25 if normalize != "none" else 1.0)
    h = 4.0 * torch.randn(2, 50, 16)
    f = 3
    a = feature_activation(sae, h, f)
    active = a > 0
    assert active.sum() > 5
    steered = h + clamp_delta(sae, f, value)(h)
    got = feature_activation(sae, steered, f)
    torch.testing.assert_close(got[active], torch.full_like(got[active], value), atol=1e-4, rtol=0)
    # only feature f's pre-activation moved (to exactly value where it was active); the others are kept
    pre, pre2 = sae.pre_acts(h), sae.pre_acts(steered)
    torch.testing.assert_close(pre2[active][:, f], torch.full_like(got[active], value), atol=1e-4, rtol=0)
    others = torch.ones(sae.d_sae, dtype=torch.bool)
    others[f] = False
    torch.testing.assert_close(pre2[..., others], pre[..., others], atol=1e-4, rtol=0)
    # and the change is exactly (value - a_f) times the decoder row in raw units
    torch.testing.assert_close(
        steered - h, (value - a).unsqueeze(-1) * feature_row(sae, f), atol=1e-5, rtol=0
    )


def test_clamp_on_a_random_sae_lands_near_the_value() -> None:
    sae = random_sae(d_in=D_MODEL, d_sae=128, k=8).requires_grad_(False)
    h = 3.0 * torch.randn(200, D_MODEL)
    f = int(sae.encode(h).gt(0).sum(0).argmax())  # the most often active feature
    active = feature_activation(sae, h, f) > 0
    got = feature_activation(sae, h + clamp_delta(sae, f, 6.0)(h), f)[active]
    assert (got - 6.0).abs().median() < 0.6


def test_feature_add_row_is_in_raw_units() -> None:
    sae = orthogonal_sae(normalize_input="unit_mean_norm", input_scale=0.5)
    torch.testing.assert_close(feature_row(sae, 2), sae.W_dec[2] / 0.5)


def test_pack_vector_is_the_signed_unit_sum() -> None:
    sae = random_sae(d_in=D_MODEL, d_sae=64, k=4)
    with torch.no_grad():
        sae.W_dec[1] *= 3.0  # pack_vector uses unit rows
    pack = FeaturePack("p", [Feature(1, 2.0)], [Feature(5, -1.0)])
    rows = sae.W_dec.detach()
    want = 2.0 * rows[1] / rows[1].norm() - rows[5] / rows[5].norm()
    torch.testing.assert_close(pack_vector(pack, sae), want / want.norm())


# ---------------------------------------------------------------------------------------------------
# Contrastive vector
# ---------------------------------------------------------------------------------------------------


def write_rollouts(
    folder: Path, layer: int = 1, d: int = D_MODEL, seed: int = 0, task: str = "hash_test"
) -> Path:
    """A synthetic rollout folder: pooled.safetensors + rollouts.jsonl + config.json."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, pooled = [], []
    for i in range(40):
        split = "discovery" if i % 2 == 0 else "validation"
        correct = (i // 2) % 3 == 0
        x = torch.randn(d, generator=g)
        if split == "validation":
            x = x + 1000.0 * (1 if correct else -1)  # would dominate the vector if it leaked in
        rows.append({"rid": i, "qid": f"q{i}", "split": split, "correct": correct})
        pooled.append(x)
    save_file({f"layer_{layer}": torch.stack(pooled)}, str(folder / "pooled.safetensors"))
    (folder / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.json").write_text(json.dumps({"task": task, "seed": seed, "token_layers": [layer]}))
    return folder


def test_contrastive_vector_uses_the_discovery_split_only(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ro = write_rollouts(tmp_path / "ro", layer=2)
    vec, info = contrastive_vector(ro, 2)
    x = load_file(str(ro / "pooled.safetensors"))["layer_2"]
    rows = [json.loads(line) for line in (ro / "rollouts.jsonl").read_text().splitlines()]
    pos = [i for i, r in enumerate(rows) if r["split"] == "discovery" and r["correct"]]
    neg = [i for i, r in enumerate(rows) if r["split"] == "discovery" and not r["correct"]]
    want = x[pos].mean(0) - x[neg].mean(0)
    torch.testing.assert_close(vec, want / want.norm())
    assert float(vec.norm()) == pytest.approx(1.0)
    assert info["n_correct"] == len(pos) and info["n_wrong"] == len(neg) and info["split"] == "discovery"
    with pytest.raises(SaeRewardError, match=r"no pooled residuals at layer 3 \(they have layers \[2\]\)"):
        contrastive_vector(ro, 3)
    with pytest.raises(SaeRewardError, match="not a rollout folder"):
        contrastive_vector(tmp_path / "nothing", 2)


def test_contrastive_vector_needs_both_classes(tmp_path: Path) -> None:
    ro = write_rollouts(tmp_path / "ro")
    rows = [json.loads(line) for line in (ro / "rollouts.jsonl").read_text().splitlines()]
    (ro / "rollouts.jsonl").write_text("".join(json.dumps({**r, "correct": True}) + "\n" for r in rows))
    with pytest.raises(SaeRewardError, match="needs correct and wrong responses, got 20 correct and 0 wrong"):
        contrastive_vector(ro, 1)


# ---------------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------------


def test_recovered_broken_and_mcnemar_on_hand_made_lists() -> None:
    base_ok = [True, True, False, False, False, True, False, True]
    steer_ok = [True, False, True, True, False, True, True, True]
    base = [{"id": f"q{i}", "correct": c} for i, c in enumerate(base_ok)]
    steered = [{"id": f"q{i}", "correct": c} for i, c in reversed(list(enumerate(steer_ok)))]  # order-free
    res = paired_comparison(base, steered)
    assert res["recovered"] == ["q2", "q3", "q6"]
    assert res["broken"] == ["q1"]
    assert res["net_flips"] == 2
    assert res["diff"] == pytest.approx((6 - 4) / 8)
    assert res["mcnemar_p"] == pytest.approx(mcnemar(base_ok, steer_ok)["p_value"])
    assert res["mcnemar_p"] == pytest.approx(0.625)  # 3 vs 1 discordant: exact binomial
    with pytest.raises(SaeRewardError, match="different questions"):
        paired_comparison(base, steered[:-1])


def test_conditions_label_the_negative_control() -> None:
    cfg = SteerConfig(scales=(0.05, -0.05), feature=7, feature_mode="clamp", feature_values=(0.0, 4.0))
    got = [(c.label, c.kind) for c in conditions(cfg)]
    assert got == [
        ("base", "base"),
        ("vec+0.05", "vector"),
        ("vec-0.05", "negative_control"),
        ("f7_clamp+0", "feature_clamp"),
        ("f7_clamp+4", "feature_clamp"),
    ]
    assert SteerConfig().scales == (0.02, 0.05, 0.10, 0.15, -0.05) and SteerConfig().seed == 12345
    assert SteerConfig().out == "runs/steer"
    for bad in ({"scales": (0.0,)}, {"scales": (0.1, 0.1)}, {"n": 0}, {"feature": -1}):
        with pytest.raises(ValueError):
            SteerConfig(**bad)


# ---------------------------------------------------------------------------------------------------
# Errors (all raised before the model is loaded)
# ---------------------------------------------------------------------------------------------------


def tiny_pack(folder: Path, *, pack_layer: int = 1, sae_layer: int = 1, d_sae: int = 128) -> Path:
    sae = random_sae(d_in=D_MODEL, d_sae=d_sae, k=8, layer=sae_layer, model="tiny")
    save_sae(sae, folder / "sae")
    pack = FeaturePack(
        "t",
        [Feature(i, 1.0) for i in range(0, 5)],
        [Feature(i, -1.0) for i in range(5, 10)],
        layer=pack_layer,
        model_name="tiny",
        metadata={"d_model": D_MODEL, "d_sae": 128, "sae_path": str(folder / "sae")},
    )
    return save_pack(pack, folder / "pack.json")


def test_error_lines(tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match="vector=contrastive needs --rollouts"):
        run_steer(SteerConfig(model="tiny", task="hash_test", out=str(tmp_path / "o")))
    bad_layer = tiny_pack(tmp_path / "a", pack_layer=1, sae_layer=2)
    with pytest.raises(SaeRewardError, match="pack .* is at layer 1 but SAE .* at layer 2"):
        run_steer(SteerConfig(model="tiny", vector="pack", pack=str(bad_layer), out=str(tmp_path / "o")))
    bad_width = tiny_pack(tmp_path / "b", d_sae=64)
    with pytest.raises(SaeRewardError, match="d_sae 128, this SAE has 64"):
        run_steer(SteerConfig(model="tiny", vector="pack", pack=str(bad_width), out=str(tmp_path / "o")))
    good = tiny_pack(tmp_path / "c")
    with pytest.raises(SaeRewardError, match=r"feature 128 is out of range: .* has 128 features \(0..127\)"):
        run_steer(
            SteerConfig(model="tiny", vector="pack", pack=str(good), feature=128, out=str(tmp_path / "o"))
        )
    ro = write_rollouts(tmp_path / "ro", seed=12345)
    with pytest.raises(SaeRewardError, match="is the rollouts' task seed"):
        run_steer(SteerConfig(model="tiny", task="hash_test", rollouts=str(ro), out=str(tmp_path / "o")))


def cli_main() -> Any:
    """``saereward.cli.main``."""
    from saereward.cli import main

    return main


def test_cli_error_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    main = cli_main()
    assert main(["steer", "--vector", "pack", "--out", str(tmp_path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "vector=pack needs --pack" in err[0]


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------


def test_run_steer_on_the_tiny_model_and_resume(tmp_path: Path) -> None:
    import test_stage1  # noqa: F401  (registers the hash_test task)

    lm = tiny_lm("llama")
    ro = write_rollouts(tmp_path / "ro", layer=1)
    pack = tiny_pack(tmp_path / "p")
    cfg = SteerConfig(
        model="tiny",
        task="hash_test",
        n=6,
        max_new_tokens=4,
        batch_size=6,
        rollouts=str(ro),
        pack=str(pack),
        scales=(0.5, -0.5),
        feature=3,
        feature_mode="clamp",
        feature_values=(0.0, 20.0),
        out=str(tmp_path / "steer"),
        progress=False,
    )
    res = run_steer(cfg, lm=lm)
    out = tmp_path / "steer"
    assert (out / "steer.json").is_file() and (out / "steer.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["feature"] == 3
    saved = json.loads((out / "steer.json").read_text())
    assert saved["n"] == 6 and saved["seed"] == 12345 and saved["layer"] == 1
    assert saved["residual_norm"]["source"] == "prompts" and saved["residual_norm"]["value"] > 0
    assert saved["vector"]["source"] == "contrastive" and "cosine_with_pack_direction" in saved["vector"]
    labels = [r["label"] for r in saved["rows"]]
    assert labels == ["base", "vec+0.5", "vec-0.5", "f3_clamp+0", "f3_clamp+20"]
    rows = {r["label"]: r for r in saved["rows"]}
    assert rows["vec-0.5"]["negative_control"] and not rows["vec+0.5"]["negative_control"]
    for lab in ("vec+0.5", "vec-0.5"):  # a constant shift: the applied norm is exactly scale * ‖h‖
        assert rows[lab]["perturbation_frac"] == pytest.approx(0.5, rel=1e-4)
    for r in saved["rows"][1:]:
        assert {"recovered", "broken", "net_flips", "mcnemar_p", "diff", "ci_low", "ci_high"} <= set(r)
        assert r["net_flips"] == len(r["recovered"]) - len(r["broken"])
    assert all(not r["cached"] for r in saved["rows"])
    text = format_steer(res)
    assert "vec-0.5 (neg control)" in text and "McNemar p" in text
    # a re-run reuses every condition; a changed scale only reruns that condition
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "conditions").iterdir()}
    again = run_steer(cfg, lm=lm)
    assert all(r["cached"] for r in again["rows"])
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in saved["rows"]]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "conditions").iterdir()} == stamps
    from dataclasses import replace

    third = run_steer(replace(cfg, scales=(0.5, -0.25)), lm=lm)
    assert [r["cached"] for r in third["rows"]] == [True, True, False, True, True]
    # a setting that changes every condition is refused (one line naming it), never mixed in
    before = {p.name: p.read_bytes() for p in (out / "conditions").iterdir()}
    with pytest.raises(
        SaeRewardError, match=r"holds steering conditions made with other settings \(n 6 -> 5\)"
    ):
        run_steer(replace(cfg, n=5), lm=lm)
    assert {p.name: p.read_bytes() for p in (out / "conditions").iterdir()} == before


@pytest.mark.slow
def test_steer_cli_on_the_embedded_model(
    tmp_path: Path, smollm: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    main = cli_main()
    spec = "embedded:smollm2-135m-instruct"
    sae = random_sae(d_in=576, d_sae=256, k=8, layer=3, model=spec)
    save_sae(sae, tmp_path / "sae")
    pack = FeaturePack(
        "t",
        [Feature(i, 1.0) for i in range(5)],
        [Feature(i, -1.0) for i in range(5, 10)],
        layer=3,
        model_name=spec,
        metadata={"d_model": 576, "d_sae": 256, "sae_path": str(tmp_path / "sae")},
    )
    save_pack(pack, tmp_path / "pack.json")
    args = ["steer", "--vector", "pack", "--pack", str(tmp_path / "pack.json"), "--n", "3", "--max-new-tokens", "6",
            "--scales", "0.1,-0.05", "--feature", "7", "--feature-values", "10", "--threads", "1",
            "--out", str(tmp_path / "steer"), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "vec-0.05 (neg control)" in printed and "steer.json and steer.png" in printed
    res = json.loads((tmp_path / "steer" / "steer.json").read_text())
    assert [r["label"] for r in res["rows"]] == ["base", "vec+0.1", "vec-0.05", "f7_add+10"]
    assert (tmp_path / "steer" / "steer.png").is_file()
    assert main(args) == 0
    assert "4 of 4 conditions reused" in capsys.readouterr().out
