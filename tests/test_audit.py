"""``saereward audit-reward`` end to end on a tiny model's rollouts, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saereward.cli import main
from saereward.data.rollouts import run_rollouts
from saereward.features.discover import DiscoverConfig, run_discover
from test_stage1 import rollouts_cfg
from tiny_models import D_MODEL, char_tokenizer, random_sae, tiny_lm


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    run_rollouts(rollouts_cfg(root / "rollouts", n=32, max_new_tokens=8), lm=tiny_lm("llama"))
    from saereward.sae.formats import save_sae

    save_sae(random_sae(d_in=D_MODEL, d_sae=256, k=8, layer=1, model="tiny"), root / "sae")
    run_discover(
        DiscoverConfig(
            rollouts=str(root / "rollouts"),
            sae=str(root / "sae"),
            top_n=3,
            min_active_frac=0.0,
            out=str(root / "pack.json"),
        )
    )
    char_tokenizer().save_pretrained(root / "tok")
    return {"root": root}


def test_audit_reward_cli(audited: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = audited["root"]
    out = root / "audit"
    args = ["audit-reward", "--rollouts", str(root / "rollouts"), "--pack", str(root / "pack.json")]
    rc = main([*args, "--model", str(root / "tok"), "--cuts", "1", "2", "5", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "truncation audit" in text and "shaped" in text and "mechreward" in text
    res = json.loads((out / "audit.json").read_text())
    assert (out / "audit.png").is_file()
    assert set(res["forms"]) == {"mechreward", "decoupled", "position", "shaped"}
    assert res["split"] == "validation" and res["n_completions"] > 0
    for form, r in res["forms"].items():
        assert set(r["cut"]) == {"1", "2", "5"}
        assert abs(r["pad"]["gain"]) < 1e-6, form  # padding adds only unscored positions
        assert r["warn"] == (r["max_cut_gain_sigma"] is not None and r["max_cut_gain_sigma"] > 0.1)
    for v in res["forms"]["shaped"]["cut"].values():  # credits sum to 0 whatever the cut
        assert v["gain"] is None or abs(v["gain"]) < 1e-6
    assert res["baseline"]["meta"]["split"] == "discovery"
    assert res["baseline"]["meta"]["prompt_format"] == "raw"
    assert res["bootstrap"] == {"unit": "question", "n_boot": 1000, "seed": 0, "confidence": 0.95}
    assert 0 < res["n_questions"] <= res["n_completions"]
    for r in res["forms"].values():
        for v in [*r["cut"].values(), r["pad"]]:
            if v["gain_sigma"] is not None:
                lo, hi = v["gain_sigma_ci"]
                assert lo - 1e-9 <= hi, v
    assert "CIs: bootstrap over" in text and "95 % CI" in text


def test_audit_reward_errors(audited: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = audited["root"]
    out = ["--out", str(root / "audit_err")]
    rc = main(["audit-reward", "--rollouts", str(root / "nope"), "--pack", str(root / "pack.json"), *out])
    assert rc == 2
    assert "not a rollout folder" in capsys.readouterr().err
    rc = main(
        [
            "audit-reward",
            "--rollouts",
            str(root / "rollouts"),
            "--pack",
            str(root / "pack.json"),
            "--forms",
            "bogus",
        ]
    )
    assert rc == 2
    assert "unknown reward form" in capsys.readouterr().err
    rc = main(
        ["audit-reward", "--rollouts", str(root / "rollouts"), "--pack", str(root / "pack.json")]
        + ["--model", str(root / "tok"), "--layer", "3", *out]
    )
    assert rc == 2  # a layer the rollouts hold no residuals at: found after the inputs load
    err = capsys.readouterr().err.strip()
    assert "layer" in err and "\n" not in err, err
    assert not (root / "audit_err").exists()  # nothing written for bad input, not even the folder
