"""Stage 1 end to end on a tiny model: rollouts -> layer map -> discover -> gate-g1, and its errors.

The tiny random models cannot do arithmetic, so a test task judges a completion by a hash of its
text: outcomes are then a deterministic mix of correct and wrong, which is all the statistics need.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from saereward.cli import main
from saereward.data.rollouts import RolloutsConfig, load_rollouts, run_rollouts
from saereward.errors import SaeRewardError
from saereward.features.discover import DiscoverConfig, run_discover
from saereward.features.layers import LayersConfig, logit_lens, run_layers
from saereward.features.pack import load_pack, save_pack
from saereward.gates.g1_correlation import GateG1Config, gate_verdict, run_gate_g1
from saereward.sae.formats import save_sae
from saereward.tasks import register_task
from saereward.tasks.base import DemoTask, TaskItem
from tiny_models import D_MODEL, N_LAYERS, random_sae, tiny_lm


class HashTask(DemoTask):
    """Items ``"1+2"``...; a completion is correct when its md5 is even (or always, with ``always``)."""

    def __init__(self, n: int, always: bool, seed: int = 0) -> None:
        self.name = "hash_always" if always else "hash_test"
        self.always = always
        ids = range(1000 * seed, 1000 * seed + n)
        items = [TaskItem(id=f"q{i:04d}", question=f"{i}+{i + 1}", gold=str(2 * i + 1)) for i in ids]
        super().__init__(items, [("1+1", "2")], {"name": self.name, "n": n})

    def extract(self, item: TaskItem, completion: str) -> str | None:
        return completion.strip() or None

    def verify(self, item: TaskItem, completion: str) -> bool:
        return self.always or int(hashlib.md5(completion.encode()).hexdigest(), 16) % 2 == 0


for _name, _always in (("hash_test", False), ("hash_always", True)):
    with contextlib.suppress(ValueError):  # registered by an earlier import of this module
        register_task(
            _name,
            lambda n=None, seed=0, source="auto", path=None, _a=_always, **kw: HashTask(n or 20, _a, seed),
        )


def rollouts_cfg(out: Path, **kw: Any) -> RolloutsConfig:
    base: dict[str, Any] = {
        "model": "tiny",
        "task": "hash_test",
        "n": 24,
        "prompt_format": "raw",
        "decoding": "greedy+sample",
        "samples": 3,
        "max_new_tokens": 6,
        "batch_size": 8,
        "token_layers": (1,),
        "out": str(out),
        "progress": False,
    }
    base.update(kw)
    return RolloutsConfig(**base)


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage1")
    lm = tiny_lm("llama")
    run_rollouts(rollouts_cfg(root / "rollouts"), lm=lm)
    sae = random_sae(d_in=D_MODEL, d_sae=256, k=8, layer=1, model="tiny")
    save_sae(sae, root / "sae")
    return {"root": root, "rollouts": root / "rollouts", "sae": root / "sae"}


def test_rollouts_folder(stage: dict[str, Path]) -> None:
    ro = load_rollouts(stage["rollouts"])
    assert len(ro.rows) == 24 * 3
    assert sorted(ro.pooled) == list(range(N_LAYERS)) and sorted(ro.tokens) == [1]
    assert [r["decoding"] for r in ro.rows[:24]] == ["greedy"] * 24
    # splits are by question and disjoint; every response of a question is in one split
    splits = json.loads((stage["rollouts"] / "splits.json").read_text())
    assert set(splits["discovery"]).isdisjoint(splits["validation"])
    by_q: dict[str, set[str]] = {}
    for r in ro.rows:
        by_q.setdefault(r["qid"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_q.values()) and len(by_q) == 24
    # pooled = mean of the per-token residuals over the same positions
    for r in (0, 30, 71):
        toks = ro.response_tokens(1, r)
        assert toks.shape[0] == ro.rows[r]["n_tokens"]
        if len(toks):
            torch.testing.assert_close(ro.pooled[1][r], toks.mean(0))
    summary = json.loads((stage["rollouts"] / "summary.json").read_text())
    assert summary["all"]["responses"] == 72 and 0 < summary["all"]["correct"] < 72
    assert json.loads((stage["rollouts"] / "config.json").read_text())["samples"] == 3


def test_rollout_residuals_equal_a_reforward(stage: dict[str, Path]) -> None:
    """Captured during generation == a forward over prompt + response (no second pass was needed)."""
    from saereward.model.capture import forward_residuals

    lm = tiny_lm("llama")
    ro = load_rollouts(stage["rollouts"])
    r = 0  # greedy response
    row = ro.rows[r]
    prompt_ids = lm.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    resp_ids = ro.token_ids[int(ro.offsets[r]) : int(ro.offsets[r + 1])].tolist()
    ids = torch.tensor([prompt_ids + resp_ids])
    ref = forward_residuals(lm.model, ids, torch.ones_like(ids), [1])[1][0, len(prompt_ids) :]
    torch.testing.assert_close(ro.response_tokens(1, r), ref, rtol=1e-4, atol=1e-4)


def test_discover_and_gate(stage: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pack_path = stage["root"] / "pack.json"
    rc = main(
        [
            "discover",
            "--rollouts",
            str(stage["rollouts"]),
            "--sae",
            str(stage["sae"]),
            "--top-n",
            "3",
            "--min-active-frac",
            "0.0",
            "--out",
            str(pack_path),
        ]
    )
    assert rc == 0
    pack = load_pack(pack_path)
    assert len(pack.helpful) == 3 and len(pack.harmful) == 3 and pack.layer == 1
    assert pack.metadata["d_sae"] == 256 and len(pack.metadata["sae_sha256"]) == 64
    assert set(pack.metadata["discovery_qids"]).isdisjoint(pack.metadata["validation_qids"])
    assert all(f.effect_size > 0 for f in pack.helpful) and all(f.effect_size < 0 for f in pack.harmful)

    rc = main(
        [
            "gate-g1",
            "--rollouts",
            str(stage["rollouts"]),
            "--pack",
            str(pack_path),
            "--n-boot",
            "200",
            "--n-random",
            "20",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    labels = ("SAE pack", "raw dir L", "probe L", "length (tokens)", "random packs", "verdict:", "reason:")
    assert all(label in out for label in labels)
    assert "clustered by question" in out
    g1 = json.loads((stage["root"] / "gate_g1.json").read_text())
    assert g1["verdict"] in ("PASS-EXCELLENT", "PASS", "WEAK", "FAIL")
    assert g1["n_responses"] == sum(
        1 for r in load_rollouts(stage["rollouts"]).rows if r["split"] == "validation"
    )
    assert g1["leak_check"].startswith("passed")
    for m in ("pack", "raw_direction", "probe"):
        a = g1["methods"][m]
        assert a["rho_ci"][0] <= a["spearman_rho"] <= a["rho_ci"][1]
        assert a["bootstrap_unit"] == "cluster" and a["n_clusters"] == g1["n_questions"]
        assert "partial_rho_length" in a and len(a["partial_rho_length_ci"]) == 2
    # CIs resample questions, recorded with n, the number of questions and the seed
    ro = load_rollouts(stage["rollouts"])
    val_q = {r["qid"] for r in ro.rows if r["split"] == "validation"}
    assert g1["n_questions"] == len(val_q) < g1["n_responses"]
    boot = g1["bootstrap"]
    assert boot["resampling"] == "clustered by question" and boot["seed"] == 0 and boot["n_boot"] == 200
    assert (boot["n_responses"], boot["n_questions"]) == (g1["n_responses"], g1["n_questions"])
    # the length baseline, and the verdict's length rule
    lb = g1["length_baseline"]
    assert lb["n"] == g1["n_responses"] and lb["bootstrap_unit"] == "cluster"
    rho, rho_len = g1["methods"]["pack"]["spearman_rho"], lb["spearman_rho"]
    assert g1["verdict"] == gate_verdict(rho, rho_len)[0] and g1["verdict_reason"]
    if g1["verdict"] != "FAIL":
        assert rho > abs(rho_len)
    # the pack now carries its validation record
    assert load_pack(pack_path).validation["verdict"] == g1["verdict"]


def test_gate_rejects_leaks_and_mismatched_packs(stage: dict[str, Path]) -> None:
    pack_path = stage["root"] / "pack2.json"
    run_discover(
        DiscoverConfig(
            rollouts=str(stage["rollouts"]),
            sae=str(stage["sae"]),
            top_n=2,
            min_active_frac=0.0,
            out=str(pack_path),
        )
    )
    pack = load_pack(pack_path)
    pack.metadata["discovery_qids"] = pack.metadata["discovery_qids"] + pack.metadata["validation_qids"][:1]
    save_pack(pack, pack_path)
    cfg = GateG1Config(rollouts=str(stage["rollouts"]), pack=str(pack_path), n_boot=200, n_random=0)
    with pytest.raises(SaeRewardError, match="were used to discover this pack"):
        run_gate_g1(cfg)
    pack.metadata["discovery_qids"] = pack.metadata["discovery_qids"][:-1]
    pack.helpful[0] = type(pack.helpful[0])(feature_id=999)
    save_pack(pack, pack_path)
    with pytest.raises(SaeRewardError, match="exceed the SAE's width 256"):
        run_gate_g1(cfg)
    wrong = random_sae(d_in=32, d_sae=256, k=8, layer=1)
    save_sae(wrong, stage["root"] / "sae32")
    other = GateG1Config(
        rollouts=str(stage["rollouts"]),
        pack=str(pack_path),
        sae=str(stage["root"] / "sae32"),
        n_boot=200,
        n_random=0,
    )
    free = next(i for i in range(256) if i not in pack.feature_ids[1:])
    pack.helpful[0] = type(pack.helpful[0])(feature_id=free)  # in range again
    save_pack(pack, pack_path)
    before = pack_path.read_bytes()
    with pytest.raises(SaeRewardError, match="is not the one pack 'contrastive' was discovered on"):
        run_gate_g1(other)  # the pack records its SAE's weights: another SAE is refused
    assert pack_path.read_bytes() == before  # a refused gate writes nothing (its validation record too)
    del pack.metadata["sae_weights_sha256"]  # a pack from before that record: the shapes still decide
    save_pack(pack, pack_path)
    with pytest.raises(SaeRewardError, match="d_in 32 does not match model width 64"):
        run_gate_g1(other)


def test_discovery_without_wrong_answers_says_counts(tmp_path: Path) -> None:
    run_rollouts(
        rollouts_cfg(tmp_path / "ro", task="hash_always", n=6, decoding="greedy", samples=1),
        lm=tiny_lm("llama"),
    )
    save_sae(random_sae(d_in=D_MODEL, d_sae=64, k=4, layer=1), tmp_path / "sae")
    with pytest.raises(SaeRewardError, match=r"discovery split has \d+ correct and 0 wrong responses"):
        run_discover(
            DiscoverConfig(
                rollouts=str(tmp_path / "ro"), sae=str(tmp_path / "sae"), out=str(tmp_path / "p.json")
            )
        )
    assert not (tmp_path / "p.json").exists()


def test_layer_map_and_logit_lens(stage: dict[str, Path]) -> None:
    res = run_layers(LayersConfig(rollouts=str(stage["rollouts"]), lens_n=0, out=str(stage["root"] / "lm")))
    assert set(res["scores"]) == {str(i) for i in range(N_LAYERS)} and res["peak_layer"] in range(N_LAYERS)
    assert (stage["root"] / "lm" / "layer_map.png").stat().st_size > 1000
    other = LayersConfig(
        rollouts=str(stage["rollouts"]), lens_n=2, model="other", out=str(stage["root"] / "lm2")
    )
    with pytest.raises(SaeRewardError, match="were made by tiny, --model is other: the logit lens must read"):
        run_layers(other)  # the map and the lens of two models in one file
    lens = logit_lens(tiny_lm("llama"), [("Q: 1+2\nA:", " it is 3", "3"), ("Q:", "none", "7")], norm=True)
    assert lens["n"] == 1 and len(lens["answer_prob"]) == N_LAYERS
    assert all(0.0 <= p <= 1.0 for p in lens["answer_prob"]) and len(lens["top_tokens"][0]) == 5


def test_load_rollouts_errors(tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match="not a rollout folder"):
        load_rollouts(tmp_path)
