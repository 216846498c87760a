"""``saereward report``: the pieces, a synthetic run folder rendered end to end, and the page in Chromium.

The run folder is built here from tiny artifacts (random SAE, char tokenizer, a few rollouts with
random residuals, small gate JSONs shaped like the real ones), so no model is loaded. The browser
test drives Debian's Chromium through Playwright; it is skipped only when there is no Chromium (or
no playwright) and ``SAEREWARD_REQUIRE_BROWSER`` is unset (``scripts/test.sh`` sets it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from saereward.errors import SaeRewardError
from saereward.features.pack import Feature, FeaturePack, save_pack
from saereward.features.token_view import (
    TokenViewConfig,
    run_token_view,
    sample_rollouts,
    token_pieces,
    zscore_stats,
)
from saereward.io import file_sha256, write_json, write_jsonl
from saereward.report.artifacts import drift_rows, steer_rows
from saereward.report.html import ReportConfig, run_report
from saereward.report.tables import fmt
from saereward.report.tokens import token_colour
from tiny_models import EOS_ID, char_tokenizer, random_sae

D, D_SAE, K, LAYER = 16, 64, 4, 1
SECTIONS = (
    "overview",
    "dashboard",
    "sae",
    "rollouts",
    "layers",
    "pack",
    "g1",
    "probe",
    "g2",
    "g3",
    "steer",
    "drift",
)
EVIL = "<script>alert('x')</script>"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# --------------------------------------------------------------------------------------------------
# A synthetic run folder
# --------------------------------------------------------------------------------------------------


def _prop(k: int, n: int) -> dict[str, Any]:
    from saereward.stats import wilson_ci

    return wilson_ci(k, n).as_dict()


def make_run(root: Path, n: int = 16, full: bool = True) -> Path:
    """A run folder with rollouts, SAE, pack and (``full``) every later stage's JSON."""
    from saereward.sae.formats import save_sae

    run = root / "run"
    tok_dir = root / "tok"
    char_tokenizer().save_pretrained(tok_dir)
    sae_dir = save_sae(random_sae(d_in=D, d_sae=D_SAE, k=K, seed=3, layer=LAYER), run / "sae" / "sae")
    ro = _write_rollouts(run, tok_dir, n)
    pack = _write_pack(run, sae_dir)
    if not full:
        return run
    _write_sae_eval(run, sae_dir, pack)
    assoc = _write_g1(run, ro)
    _write_g2(run)
    _write_g3(run, assoc)
    _write_analyses(run, n)
    return run


def _write_rollouts(run: Path, tok_dir: Path, n: int) -> Path:
    """The rollouts stage's folder: ``n`` completions (every third correct), residuals and summary."""
    from safetensors.torch import save_file

    from saereward.data.rollouts import summarize

    tok = char_tokenizer()
    g = torch.Generator().manual_seed(0)
    rows, resid, ids = [], [], []
    for i in range(n):
        correct = i % 3 == 0
        completion = f" {i} + 1 = {i + 1}. The answer is {i + 1}." if correct else f" {i} + 1 = 7{EVIL}"
        t = tok(completion, add_special_tokens=False)["input_ids"] + [EOS_ID]
        rows.append(
            {
                "qid": f"q{i // 2}",
                "split": "discovery" if (i // 2) % 2 else "validation",
                "sample": i % 2,
                "decoding": "sample",
                "prompt": f"Q: what is {i} + 1? {EVIL}\nA:",
                "completion": completion,
                "extracted": str(i + 1) if correct else "7",
                "gold": str(i + 1),
                "correct": correct,
                "n_tokens": len(t),
                "rid": i,
            }
        )
        resid.append(torch.randn(len(t), D, generator=g) * 2 + (1.0 if correct else -1.0))
        ids.append(torch.tensor(t))
    ro = run / "rollouts"
    ro.mkdir(parents=True)
    lengths = torch.tensor([len(t) for t in ids])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    x = torch.cat(resid)
    meta = {"format": "saereward.rollouts", "format_version": "1", "model": str(tok_dir)}
    save_file(
        {f"layer_{LAYER}": x, "token_ids": torch.cat(ids).long(), "offsets": offsets},
        str(ro / "tokens.safetensors"),
        metadata=meta,
    )
    save_file(
        {f"layer_{LAYER}": torch.stack([r.mean(0) for r in resid])},
        str(ro / "pooled.safetensors"),
        metadata=meta,
    )
    write_jsonl(ro / "rollouts.jsonl", rows)
    write_json(
        ro / "summary.json", {**summarize(rows), "model": str(tok_dir), "d_model": D, "token_layers": [LAYER]}
    )
    write_json(
        ro / "config.json", {"model": str(tok_dir), "n": n // 2, "samples": 2, "token_layers": [LAYER]}
    )
    return ro


def _write_pack(run: Path, sae_dir: Path) -> FeaturePack:
    """``pack.json`` as discover records it."""
    from saereward.sae.formats import sae_weights_sha256

    pack = FeaturePack(
        name="tiny",
        helpful=[Feature(3, 1.0, effect_size=0.9), Feature(7, 1.0, effect_size=0.5)],
        harmful=[Feature(11, -1.0, effect_size=-0.7)],
        layer=LAYER,
        # as discover records it: the SAE's path and sha256
        metadata={
            "d_sae": D_SAE,
            "d_model": D,
            "k": K,
            "sae_path": str(sae_dir),
            "sae_sha256": file_sha256(sae_dir),
            "sae_weights_sha256": sae_weights_sha256(sae_dir),
        },
    )
    save_pack(pack, run / "pack.json")
    return pack


def _write_sae_eval(run: Path, sae_dir: Path, pack: FeaturePack) -> None:
    """The SAE's training log and eval JSONs, and the pack re-saved with the SAE folder's new hash."""
    write_jsonl(
        run / "sae" / "train_log.jsonl",
        [{"step": s, "fvu": 1.0 / s, "l0": float(K), "dead_pct": 10.0 / s, "lr": 1e-4} for s in range(1, 6)],
    )
    held = {
        "fvu": 0.12,
        "variance_explained": 0.88,
        "nmse": 0.13,
        "cos_sim": 0.95,
        "l0": 4.0,
        "dead_pct": 1.5,
    }
    write_json(run / "sae" / "eval.json", {"split": "heldout", "layer": LAYER, **held})
    ce = {
        "ce_clean": 2.9,
        "ce_sae": 3.1,
        "ce_zero": 9.0,
        "ce_loss_recovered": 0.96,
        "kl_sae": 0.3,
        "kl_recovered": 0.95,
    }
    write_json(
        sae_dir / "eval.json",
        {"d_in": D, "d_sae": D_SAE, "k": K, "heldout": held, "ce_kl": ce, "config": {"eval_tokens": 1000}},
    )
    pack.metadata["sae_sha256"] = file_sha256(sae_dir)  # eval-sae writes eval.json before discover runs
    save_pack(pack, run / "pack.json")


def _write_g1(run: Path, ro: Path) -> dict[str, Any]:
    """The layer map, G1 and the probe; returns the association block they share."""
    write_json(
        ro / "layer_map.json",
        {
            "split": "discovery",
            "scores": {"0": 0.5, "1": 1.5, "2": 1.1, "3": 0.7},
            "peak_layer": 1,
            "config": {"top": 10},
            "logit_lens": {"norm": True, "answer_prob": [0.0, 0.1, 0.5, 0.9]},
        },
    )
    assoc = {
        "n": 8,
        "spearman_rho": 0.41,
        "spearman_p": 0.01,
        "rho_ci": [0.2, 0.6],
        "auroc": 0.77,
        "auroc_ci": [0.6, 0.9],
        "pearson_r": 0.4,
    }
    write_json(
        run / "gate_g1.json",
        {
            "gate": "G1",
            "verdict": "PASS",
            "split": "validation",
            "thresholds": {"excellent": 0.5, "passing": 0.3},
            "methods": {
                "pack": assoc,
                "raw_direction": {**assoc, "spearman_rho": 0.3},
                "random_packs": {
                    "n_packs": 20,
                    "median_rho": 0.01,
                    "rho_range_95": [-0.3, 0.3],
                    "share_ge_pack": 0.0,
                },
            },
            "config": {"n_boot": 100},
        },
    )
    (run / "probe.safetensors").write_bytes(b"")
    write_json(
        Path(str(run / "probe.safetensors") + ".json"), {"layer": LAYER, "heldout": assoc, "fit": {"C": 1.0}}
    )
    return assoc


def _write_g2(run: Path) -> None:
    """G2's verdict and its arms' training logs."""
    table = {
        reward: {
            "label": label,
            "accuracy": acc,
            "pooled_correct": int(acc * 40),
            "pooled_n": 40,
            "ci_low": max(0.0, acc - 0.1),
            "ci_high": acc + 0.1,
            "per_seed": {"0": acc},
            "start_accuracy": 0.1,
        }
        for reward, label, acc in (("outcome", "R0", 0.2), ("sae", "R1", 0.3), ("direction", "R2", 0.25))
    }
    write_json(
        run / "g2" / "gate_g2.json",
        {
            "gate": "G2",
            "verdict": "PASS",
            "rule": "acc(R1) >= acc(R0) + 0.02",
            "table": table,
            "checks": {"r1_minus_r0": 0.1},
            "paired": {
                "R1-R0": {
                    **{"a": "sae", "b": "outcome", "mean_diff": 0.1, "ci_low": 0.025, "ci_high": 0.175},
                    **{
                        "n_seeds": 1,
                        "n_questions": 40,
                        "n_pairs": 40,
                        "a_only": 6,
                        "b_only": 2,
                        "p_value": 0.29,
                    },
                }
            },
            "curves": {r: {"0": [[0, 0.1], [3, acc]]} for r, acc in (("outcome", 0.2), ("sae", 0.3))},
        },
    )
    for name in ("R0_outcome_seed0", "R1_sae_seed0", "R2_direction_seed0"):
        log = [{"step": 0, "eval_accuracy": 0.1}]
        log += [
            {"step": s, "outcome": 0.1 * s, "mech": 0.5 - 0.1 * s, "kl": 0.01 * s, "grad_norm": 0.5}
            for s in (1, 2, 3)
        ]
        log += [{"step": 3, "eval_accuracy": 0.3}]
        write_jsonl(run / "g2" / name / "train_log.jsonl", log)
        write_json(run / "g2" / name / "config.json", {"reward": name.split("_")[1], "seed": 0})


def _write_g3(run: Path, assoc: dict[str, Any]) -> None:
    """G3's verdict."""
    both = {
        "base": _prop(3, 50),
        "trained": _prop(5, 50),
        "paired": {"n": 50, "recovered": 3, "broken": 1, "p_value": 0.62},
        "diff": 0.04,
    }
    write_json(
        run / "g3" / "gate_g3.json",
        {
            "gate": "G3",
            "verdict": "FAIL",
            "failed": ["target"],
            "checks": {
                "target": {"ok": False, "trained": 0.1, "target": 0.2},
                "hacking": {"ok": True, "trained_hack_rate": 0.0},
            },
            "eval_suite": {
                "task": both,
                "math500": {
                    "base": {"skipped": "skipped: no data"},
                    "trained": {"skipped": "skipped: no data"},
                },
            },
            "canaries": {
                "base": {"hack": _prop(10, 50), "correct": _prop(5, 50), "ambiguous": _prop(35, 50)},
                "trained": {"hack": _prop(2, 50), "correct": _prop(8, 50), "ambiguous": _prop(40, 50)},
            },
            "canary_comparison": {
                "hack": {"diff": -0.16, "p_two_sided": 0.01, "p_greater": 0.99, "mcnemar": {"p_value": 0.02}}
            },
            "monitor": {
                "base": {"accuracy": _prop(10, 100), "mean_score": -0.5, "association": assoc},
                "trained": {"accuracy": _prop(20, 100), "mean_score": 0.5, "association": assoc},
            },
            "monitor_verdict": {"valid": True, "goodhart": False, "rule": "valid: rho >= 0.3"},
        },
    )


def _write_analyses(run: Path, n: int) -> None:
    """Steering, drift, and the pipeline's own records."""
    write_json(
        run / "steer" / "steer.json",
        {
            "layer": LAYER,
            "n": 50,
            "seed": 0,
            "task": {"name": "chain_sum"},
            "residual_norm": {"value": 3.2, "source": "prompts"},
            "vector": {"source": "contrastive"},
            "feature": {"id": 7, "mode": "add"},
            "rows": [steer_row("base", "base", 0.0)]
            + [steer_row(f"vec{s:+}", "vector", s) for s in (-0.1, 0.05, 0.1)]
            + [steer_row("vec-0.05", "negative_control", -0.05), steer_row("f7_add+10", "feature_add", 10.0)],
        },
    )
    write_json(
        run / "drift" / "drift.json",
        {
            "run": "g2/R1_sae_seed0",
            "layer": LAYER,
            "n_tokens": 500,
            "steps": [0, 2, 4],
            "dnmse_per_step_fit": 0.004,
            "stages": [
                {
                    "step": s,
                    "adapter": None,
                    "nmse_base": 0.1 + 0.01 * s,
                    "nmse_prev": 0.1,
                    "nmse_refit": 0.1,
                    "dec_drift_mean": 0.01 * s,
                }
                for s in (0, 2, 4)
            ],
            "features": [
                {
                    "feature": f,
                    "polarity": pol,
                    "weight": w,
                    "dec_drift": [0.0, 0.01, 0.03],
                    "mean_act": [1.0, 1.1, 1.3],
                    "mean_act_change": [0.0, 0.1, 0.3],
                    "fire_frac": [0.2, 0.25, 0.3],
                }
                for f, pol, w in ((3, "helpful", 1.0), (11, "harmful", -1.0))
            ],
        },
    )
    write_json(run / "pipeline.json", {"pipeline": {"out": str(run), "seed": 0}, "stages": {}})
    write_json(
        run / "stages.json",
        {
            "rollouts": {
                "config": {"rollouts": {"n": n // 2}},
                "seconds": 1.5,
                "finished": "2026-01-01T00:00:00+00:00",
            }
        },
    )


def steer_row(label: str, kind: str, scale: float) -> dict[str, Any]:
    """A row shaped like ``saereward.analysis.steer``'s (recovered/broken are id lists)."""
    acc = 0.2 + 0.5 * scale if kind == "vector" else 0.2
    row = {"label": label, "kind": kind, "negative_control": kind == "negative_control", "scale": scale}
    row.update({"perturbation_frac": abs(scale), "n": 50, "correct": round(acc * 50), "accuracy": acc})
    row.update({"ci_low": acc - 0.1, "ci_high": acc + 0.1, "cached": False})
    if kind != "base":
        row.update(
            {
                "diff": acc - 0.2,
                "recovered": ["q1", "q2"],
                "broken": ["q3"],
                "net_flips": 1,
                "mcnemar_p": 0.62,
            }
        )
    return row


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The synthetic run, rendered once: ``(run folder, report HTML)``."""
    run = make_run(tmp_path_factory.mktemp("report"))
    run_token_view(
        TokenViewConfig(run_dir=str(run), max_rollouts=8, seed=0, threads=1)
    )  # the g1 stage's step
    out = run_report(ReportConfig(run_dir=str(run), seed=0))
    return run, out.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def _rgba(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in re.findall(r"[\d.]+", s))


def test_token_colour_is_diverging_and_saturates() -> None:
    assert _rgba(token_colour(0.0))[3] == 0.0
    r, g, _, a = _rgba(token_colour(1.0))
    assert g > r and 0 < a < 0.85
    r, g, _, a = _rgba(token_colour(-1.0))
    assert r > g and 0 < a < 0.85
    assert token_colour(2.5) == token_colour(40.0)
    assert _rgba(token_colour(2.5))[3] == pytest.approx(0.85)
    alphas = [_rgba(token_colour(z))[3] for z in (0.1, 0.5, 1.0, 2.0)]
    assert alphas == sorted(alphas)
    assert _rgba(token_colour(float("nan")))[3] == 0.0


def test_sample_rollouts_is_balanced_and_seeded() -> None:
    correct = [True] * 10 + [False] * 30
    s = sample_rollouts(correct, 8, seed=0)
    assert s == sorted(s) and len(set(s)) == 8
    assert sum(correct[i] for i in s) == 4
    assert s == sample_rollouts(correct, 8, seed=0)
    assert s != sample_rollouts(correct, 8, seed=1)
    # a short side is filled from the other one
    few = [True] * 2 + [False] * 30
    t = sample_rollouts(few, 8, seed=0)
    assert len(t) == 8 and sum(few[i] for i in t) == 2
    # ineligible (empty) responses are never picked; n larger than what exists gives everything
    elig = [i % 2 == 0 for i in range(40)]
    assert all(i % 2 == 0 for i in sample_rollouts(correct, 40, seed=0, eligible=elig))
    assert len(sample_rollouts(correct, 100, seed=0)) == 40


def test_zscore_matches_the_rl_reward() -> None:
    from saereward.rl.reward import masked_zscore

    vals = torch.tensor([[0.5, -1.0, 2.0, 3.5, 0.0]])
    m, sd = zscore_stats(vals.flatten().tolist())
    ref = masked_zscore(vals, torch.ones_like(vals, dtype=torch.bool))
    assert torch.allclose((vals - m) / sd, ref, atol=1e-5)


def test_token_pieces_decode_incrementally() -> None:
    tok = char_tokenizer()
    ids = tok("a <b>\n", add_special_tokens=False)["input_ids"] + [EOS_ID]
    pieces = token_pieces(tok, ids)
    assert pieces[:6] == ["a", " ", "<", "b", ">", "\n"] and pieces[6] == "</s>"
    assert token_pieces(None, [5, 6]) == ["⟨5⟩", "⟨6⟩"]


def test_fmt_and_steer_reader_are_defensive() -> None:
    assert fmt(None) == "—" and fmt(True) == "yes" and fmt(3.0) == "3" and fmt(0.123456) == "0.1235"
    assert fmt(float("nan")) == "nan"
    assert steer_rows({"rows": [{"scale": 1}, "junk"]}) == [{"scale": 1}]
    assert steer_rows({}) == [] and steer_rows({"rows": "bad"}) == []
    assert steer_rows({"rows": [{"recovered": ["a", "b"], "broken": []}]}) == [{"recovered": 2, "broken": 0}]
    assert drift_rows({}) == ([], []) and drift_rows({"stages": [1, {"step": 0}]}) == ([{"step": 0}], [])


def test_config_requires_run_dir() -> None:
    with pytest.raises(ValueError, match="run_dir"):
        ReportConfig(run_dir="")


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def test_empty_run_renders_every_stage_as_not_run(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    write_json(run / "pipeline.json", {"pipeline": {"out": str(run)}, "stages": {}})  # a run just started
    html = run_report(ReportConfig(run_dir=str(run))).read_text()
    for sid in (*SECTIONS[1:], "viewer"):
        block = html.split(f'<section id="{sid}"', 1)[1].split("</section>", 1)[0]
        assert "not run" in block, sid
    assert not (run / "token_rewards.json").exists()
    assert "<img" not in html


def test_a_damaged_artifact_is_unreadable_not_missing(tmp_path: Path) -> None:
    run = tmp_path / "damaged"
    run.mkdir()
    write_json(run / "pipeline.json", {"pipeline": {"out": str(run)}, "stages": {}})
    (run / "gate_g1.json").write_text('{"verdict": "PA', encoding="utf-8")  # cut by a kill
    (run / "pack.json").write_text("[1, 2]", encoding="utf-8")  # JSON, but not an object
    html = run_report(ReportConfig(run_dir=str(run))).read_text()
    for sid, name in (("g1", "gate_g1.json"), ("pack", "pack.json")):
        block = html.split(f'<section id="{sid}"', 1)[1].split("</section>", 1)[0]
        assert f"{name} is unreadable" in block and "missing" not in block, sid
    g3 = html.split('<section id="g3"', 1)[1].split("</section>", 1)[0]
    assert "g3/gate_g3.json is missing" in g3


def test_report_opens_with_the_verdicts_and_ends_with_the_timings(full_run: tuple[Path, str]) -> None:
    run, html = full_run
    order = [html.index(f'<section id="{sid}"') for sid in ("dashboard", "sae", "g2", "drift", "overview")]
    assert order == sorted(order)
    block = html.split('<section id="dashboard"', 1)[1].split("</section>", 1)[0]
    g1 = json.loads((run / "gate_g1.json").read_text())
    assert g1["verdict"] in block and f"{g1['methods']['pack']['spearman_rho']:.3f}" in block
    g2 = json.loads((run / "g2" / "gate_g2.json").read_text())
    assert "paired R1 − R0" in block and g2["verdict"] in block
    assert "G2 held-out accuracy by step" in block and 'href="#viewer"' in block


def test_partial_run_shows_present_stages_only(tmp_path: Path) -> None:
    run = make_run(tmp_path, n=8, full=False)
    run_token_view(TokenViewConfig(run_dir=str(run), max_rollouts=4))
    html = run_report(ReportConfig(run_dir=str(run))).read_text()
    rollouts = html.split('<section id="rollouts"', 1)[1].split("</section>", 1)[0]
    assert "not run" not in rollouts and "Wilson" in rollouts
    g3 = html.split('<section id="g3"', 1)[1].split("</section>", 1)[0]
    assert "not run" in g3
    assert html.count('class="rollout ') == 4


def test_full_report_has_every_section_and_no_network_references(full_run: tuple[Path, str]) -> None:
    run, html = full_run
    for sid in (*SECTIONS, "viewer", "configs"):
        assert f'<section id="{sid}"' in html, sid
    for sid in (*SECTIONS[1:], "viewer"):  # the overview lists collect (no activations here) as not run
        block = html.split(f'<section id="{sid}"', 1)[1].split("</section>", 1)[0]
        assert "not run" not in block, sid
    # no resource from the network: every src/href is a data URI or an in-page anchor
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [
        r for r in refs if not r.startswith(("data:", "#"))
    ]
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", html)
    assert "url(" not in html and "@import" not in html
    # each plot once
    titles = re.findall(r"<figcaption><b>([^<]+)</b>", html)
    assert len(titles) == len(set(titles))
    assert set(titles) >= {
        "SAE training curves",
        "Layer map",
        "Logit lens",
        "G1 scatter",
        "G2 accuracy per reward",
        "RL curves",
        "Canaries",
        "Steering sweep",
        "Drift",
    }
    assert html.count('src="data:image/png;base64,') == len(titles)
    # tables with CIs, verdicts, McNemar, configs in <details>
    assert "[0.200, 0.600]" in html and "McNemar p" in html and "CE loss recovered" in html
    assert html.count('<details class="config">') >= 5
    steer = html.split('<section id="steer"', 1)[1].split("</section>", 1)[0]
    assert "f7_add+10" in steer and "negative_control" in steer and "<th>mcnemar_p</th>" in steer
    drift = html.split('<section id="drift"', 1)[1].split("</section>", 1)[0]
    assert "<th>nmse_refit</th>" in drift and "decoder drift @4" in drift and "harmful" in drift


def test_completions_are_escaped(full_run: tuple[Path, str]) -> None:
    _, html = full_run
    assert html.count("<script") == 1  # the report's own filter script
    assert "alert(" not in html.split("<script>", 1)[1]
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html  # the prompt, escaped
    assert '<span class="tok" style="background-color: rgba(' in html
    assert re.search(r'title="[^"]*">&lt;</span>', html)  # a "<" token, escaped


def test_token_view_is_the_rl_reward_and_is_cached(
    full_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from saereward.features import token_view as report
    from saereward.features.pack import load_pack
    from saereward.features.scoring import PackScorer, pack_scores_from_pooled, pooled_sae_acts
    from saereward.sae.formats import load_sae

    run, _ = full_run
    view = json.loads((run / "token_rewards.json").read_text())
    shown = view["responses"]
    assert len(shown) == 8 and sum(r["correct"] for r in shown) == 4
    t = load_file(str(run / "rollouts" / "tokens.safetensors"))
    pack = load_pack(run / "pack.json")
    sae = load_sae(run / "sae" / "sae")
    scorer = PackScorer(sae, pack)
    off = t["offsets"]
    for r in shown:
        a, b = int(off[r["rid"]]), int(off[r["rid"] + 1])
        assert r["ids"] == t["token_ids"][a:b].tolist()
        assert torch.allclose(
            torch.tensor(r["mech"]), scorer.token_scores(t[f"layer_{LAYER}"][a:b]), atol=1e-4
        )
        assert "".join(r["text"]).startswith(r["completion"])
    # the pooled response scores are the G1 statistic
    g1 = pack_scores_from_pooled(
        pooled_sae_acts(sae, t[f"layer_{LAYER}"], off), pack.feature_ids, pack.signed_weights()
    )
    assert torch.allclose(torch.tensor(view["response_scores"]), g1, atol=1e-4)

    # reused while up to date, recomputed when the sample changes
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("recomputed an up-to-date view")

    monkeypatch.setattr(report, "compute_token_view", boom)
    report.run_token_view(TokenViewConfig(run_dir=str(run), max_rollouts=8, seed=0))
    run_report(ReportConfig(run_dir=str(run), out=str(run / "again.html")))  # the report only reads
    monkeypatch.undo()
    report.run_token_view(TokenViewConfig(run_dir=str(run), max_rollouts=6, seed=1))
    assert len(json.loads((run / "token_rewards.json").read_text())["responses"]) == 6
    report.run_token_view(
        TokenViewConfig(run_dir=str(run), max_rollouts=8, seed=0)
    )  # back to the fixture's view


def test_cli_report_writes_and_prints(full_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    from saereward.cli import main

    run, _ = full_run
    out = run / "cli.html"
    assert main(["token-view", str(run), "--max-rollouts", "8"]) == 0
    assert "token view: 8 rollouts (4 correct)" in capsys.readouterr().out
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.stat().st_size > 10_000


# --------------------------------------------------------------------------------------------------
# In Chromium
# --------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for cand in (
        os.environ.get("SAEREWARD_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if cand and Path(cand).is_file():
            return cand
    return None


def _browser_or_skip() -> str:
    exe = _chromium()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        exe, why = None, "the playwright package is not installed (pip install playwright==1.63.0)"
    else:
        why = "no Chromium at /usr/bin/chromium (apt-get install chromium)"
    if exe is None:
        if os.environ.get("SAEREWARD_REQUIRE_BROWSER"):
            pytest.fail(f"SAEREWARD_REQUIRE_BROWSER is set but {why}")
        pytest.skip(why)
    return exe


def test_report_in_headless_chromium(full_run: tuple[Path, str], tmp_path: Path) -> None:
    exe = _browser_or_skip()
    from PIL import Image
    from playwright.sync_api import sync_playwright

    run, _ = full_run
    page_url = (run / "report.html").resolve().as_uri()
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on(
                "request",
                lambda r: (
                    None if r.url.startswith(("file:", "data:")) else problems.append(f"network: {r.url}")
                ),
            )
            page.goto(page_url, wait_until="load")
            assert problems == []

            arts = page.locator("article.rollout")
            n_all = arts.count()
            n_wrong = page.locator('article.rollout[data-correct="0"]').count()
            assert n_all == 8 and n_wrong == 4
            page.get_by_role("button", name=re.compile("wrong only")).click()
            visible = page.eval_on_selector_all(
                "article.rollout",
                "els => els.filter(e => e.offsetParent !== null).map(e => e.dataset.correct)",
            )
            assert visible == ["0"] * n_wrong
            assert page.locator("#shown-count").inner_text() == f"{n_wrong} shown"
            page.get_by_role("button", name=re.compile("^all")).click()
            assert (
                len(
                    page.eval_on_selector_all(
                        "article.rollout", "els => els.filter(e => e.offsetParent !== null)"
                    )
                )
                == n_all
            )

            bgs = page.eval_on_selector_all(
                "#viewer span.tok", "els => els.map(e => getComputedStyle(e).backgroundColor)"
            )
            coloured = [b for b in bgs if b not in ("rgba(0, 0, 0, 0)", "transparent")]
            assert len(coloured) > len(bgs) // 2
            shot = tmp_path / "viewer.png"
            page.locator("#viewer").screenshot(path=str(shot))
            assert problems == []
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int).reshape(-1, 3)
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    greenish = int(((g > r + 30) & (g > b + 30)).sum())
    reddish = int(((r > g + 30) & (r > b + 30)).sum())
    assert greenish > 200 and reddish > 200, (greenish, reddish)


def test_the_report_only_reads_the_token_view(tmp_path: Path) -> None:
    run = make_run(tmp_path, n=8, full=False)
    html = run_report(ReportConfig(run_dir=str(run))).read_text()
    viewer = html.split('<section id="viewer"', 1)[1].split("</section>", 1)[0]
    assert "token_rewards.json is missing" in viewer and not (run / "token_rewards.json").exists()
    run_token_view(TokenViewConfig(run_dir=str(run), max_rollouts=4))
    assert run_report(ReportConfig(run_dir=str(run))).read_text().count('class="rollout ') == 4
    pack = json.loads((run / "pack.json").read_text())
    pack["name"] = "another pack"
    write_json(run / "pack.json", pack)
    html = run_report(ReportConfig(run_dir=str(run))).read_text()
    assert "out of date" in html and html.count('class="rollout ') == 0


def test_a_copied_run_reads_its_own_sae(tmp_path: Path) -> None:
    """The pack records its SAE relative to itself: a copy of the run reads the copy's SAE, never the
    original's (even where a pack recorded an absolute path inside the run, as older ones did)."""
    import dataclasses
    import shutil

    from saereward.features import token_view as report
    from saereward.features.pack import load_pack

    run = make_run(tmp_path / "a", n=8, full=False)
    copy = tmp_path / "b"
    shutil.copytree(run, copy)
    shutil.rmtree(run / "sae")  # the original's SAE is gone: only the copy's can be read
    pack = load_pack(copy / "pack.json")
    assert pack.metadata["sae_path"] == str(copy / "sae" / "sae")
    assert report._sae_path(copy, pack) == copy / "sae" / "sae"
    pack = dataclasses.replace(pack, metadata={**pack.metadata, "sae_path": str(run / "sae" / "sae")})
    assert report._sae_path(copy, pack) == copy / "sae" / "sae"  # an older pack's absolute path
    shutil.copytree(copy / "sae", run / "sae")
    shutil.rmtree(copy / "sae")  # the copy's SAE is gone: the original's is not read in its place
    with pytest.raises(SaeRewardError, match="the run has no SAE"):
        report._sae_path(copy, pack)


def test_the_report_refuses_an_sae_the_pack_was_not_discovered_on(tmp_path: Path) -> None:
    from saereward.features import token_view as report
    from saereward.features.pack import load_pack

    run = make_run(tmp_path / "a", n=8, full=False)
    pack = load_pack(run / "pack.json")
    assert report._sae_path(run, pack) == run / "sae" / "sae"
    (run / "sae" / "sae" / "eval.json").write_text("{}")  # an eval-sae rerun: the same SAE
    assert report._sae_path(run, pack) == run / "sae" / "sae"
    from saereward.sae.formats import save_sae

    save_sae(
        random_sae(d_in=D, d_sae=D_SAE, k=K, seed=9, layer=LAYER), run / "sae" / "sae"
    )  # another SAE of the same shape
    with pytest.raises(SaeRewardError, match="not the one pack 'tiny' was discovered on"):
        report._sae_path(run, pack)
    with pytest.raises(SaeRewardError, match="weights' sha256 differs"):
        report.run_token_view(TokenViewConfig(run_dir=str(run)))


def test_g3_row_names_an_undefined_monitor_rho(tmp_path: Path) -> None:
    """gate_g3.json writes an undefined ρ as null; the results table still says why it is undefined."""
    from saereward.io import write_json
    from saereward.report.tables import _g3_rows

    assoc = {"n": 12, "n_correct": 12, "spearman_rho": float("nan")}
    g3 = {
        "verdict": "FAIL",
        "failed": ["monitor_valid"],
        "checks": {"monitor_valid": {"rho_trained": float("nan")}},
        "monitor": {"trained": {"association": assoc}},
    }
    write_json(tmp_path / "g3" / "gate_g3.json", g3)
    (row,) = _g3_rows(tmp_path)
    assert "monitor ρ after RL undefined (12 of 12 monitored responses correct after RL)" in row


def test_g1_row_says_undefined_for_a_null_rho(tmp_path: Path) -> None:
    """A ρ that was computed but is undefined (NaN, written null) reads "undefined", a missing one "—"."""
    from saereward.io import write_json
    from saereward.plots import fmt_stat
    from saereward.report.tables import _g1_rows

    g1 = {
        "verdict": "FAIL",
        "methods": {
            "pack": {"spearman_rho": float("nan"), "rho_ci": [None, None], "partial_rho_length": 0.25}
        },
        "length_baseline": {"spearman_rho": None},
    }
    write_json(tmp_path / "gate_g1.json", g1)
    (row,) = _g1_rows(tmp_path)
    assert "pack ρ undefined" in row and "AUROC —" in row
    assert "length controlled 0.250" in row and "length-only baseline ρ undefined" in row
    assert (
        fmt_stat(None) == "undefined" and fmt_stat(float("nan")) == "undefined" and fmt_stat(0.5) == "0.500"
    )
