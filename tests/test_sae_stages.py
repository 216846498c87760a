"""The SAE stages as a user runs them: collect -> train-sae -> eval-sae through the CLI, on the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saereward.cli import main


@pytest.mark.slow
def test_collect_train_eval_cli(tmp_path: Path, smollm, capsys: pytest.CaptureFixture[str]) -> None:
    acts, run = tmp_path / "acts", tmp_path / "sae"
    assert (
        main(
            [
                "collect",
                "--layers",
                "6",
                "--n",
                "24",
                "--max-new-tokens",
                "24",
                "--batch-size",
                "8",
                "--shard-tokens",
                "256",
                "--held-out-fraction",
                "0.25",
                "--out",
                str(acts),
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = json.loads((acts / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] > 500 and len(manifest["shards"]) > 1
    assert (
        main(
            [
                "train-sae",
                "--activations",
                str(acts),
                "--out",
                str(run),
                "--train-k",
                "8",
                "--train-expansion",
                "4",
                "--train-batch-size",
                "128",
                "--train-total-tokens",
                "2048",
                "--train-warmup-steps",
                "2",
                "--train-checkpoint-every",
                "4",
                "--train-log-every",
                "2",
                "--train-init-tokens",
                "128",
                "--no-train-progress",
                "--eval-tokens",
                "4096",
            ]
        )
        == 0
    )
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["layer"]) == (576, 2304, 8, 6)
    assert json.loads((run / "config.json").read_text())["train"]["k"] == 8
    ev = json.loads((run / "eval.json").read_text())
    assert 0.0 < ev["fvu"] < 1.5 and ev["l0"] <= 8
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert any("fvu" in row for row in log)
    capsys.readouterr()
    assert (
        main(
            [
                "eval-sae",
                "--sae",
                str(run / "sae"),
                "--activations",
                str(acts),
                "--ce-n",
                "4",
                "--max-length",
                "64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "FVU" in out and "CE recovered" in out
    res = json.loads((run / "sae" / "eval.json").read_text())
    assert res["ce_kl"]["ce_zero"] > res["ce_kl"]["ce_clean"]
    # the CE splice leaves out the positions the collection left out of the SAE's data
    assert res["ce_kl"]["skip_first"] == json.loads((acts / "manifest.json").read_text())["skip_first"] == 1
    elsewhere = tmp_path / "evals"  # --out is the folder eval.json goes to, an existing one too
    elsewhere.mkdir()
    argv = ["eval-sae", "--sae", str(run / "sae"), "--ce-task", "none"]
    assert main([*argv, "--activations", str(acts), "--out", str(elsewhere)]) == 0
    assert "ce_kl" not in json.loads((elsewhere / "eval.json").read_text())
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "nothing")]) == 2  # neither held-out FVU nor CE/KL
    assert "nothing to measure: pass --activations" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_train_sae_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-sae", "--activations", str(tmp_path / "none")]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert main(["train-sae", "--set", "train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err
    assert main(["eval-sae", "--sae", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
