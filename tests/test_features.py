"""Feature discovery, packs, the shared pack score, G1 statistics and ReasonScore (pure functions).

The end-to-end stage (rollouts -> discover -> gate-g1 on a tiny model) is in ``test_stage1.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

from saereward import load_pack
from saereward.errors import SaeRewardError
from saereward.features.discover import select_features
from saereward.features.layers import answer_position, contrastive_direction, layer_scores
from saereward.features.pack import Feature, FeaturePack, check_pack, save_pack
from saereward.features.reasonscore import reason_score, word_hits
from saereward.features.scoring import (
    PackScorer,
    masked_mean,
    pack_scores_from_pooled,
    pooled_sae_acts,
    segment_mean,
)
from saereward.gates.g1_correlation import gate_verdict, length_control, verdict
from saereward.stats import association, cohens_d, partial_association, require_both_outcomes
from tiny_models import char_tokenizer, random_sae

# --------------------------------------------------------------------------------------------------
# Cohen's d and selection
# --------------------------------------------------------------------------------------------------


def test_cohens_d_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g) + 0.7, torch.randn(40, 5, generator=g)
    d = cohens_d(x, y)
    xn, yn = x.double().numpy(), y.double().numpy()
    ref = (xn.mean(0) - yn.mean(0)) / np.sqrt((xn.var(0, ddof=1) + yn.var(0, ddof=1)) / 2)
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-5)
    # zero spread -> 0, not inf/nan
    assert cohens_d(torch.zeros(3, 2), torch.zeros(4, 2)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=">= 2 rows"):
        cohens_d(torch.zeros(1, 2), torch.zeros(4, 2))


def planted(n: int = 200, m: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled activations where feature 3 is higher when correct, 7 lower, 11 rare but extreme."""
    g = torch.Generator().manual_seed(seed)
    correct = torch.rand(n, generator=g) < 0.5
    pooled = torch.rand(n, m, generator=g).clamp_min(0.2) - 0.2  # sparse-ish, >= 0
    pooled[:, 3] += 1.5 * correct
    pooled[:, 7] += 1.5 * ~correct
    pooled[:, 11] = 0.0
    pooled[torch.nonzero(correct).flatten()[:3], 11] = 50.0  # active in 1.5 % of responses
    pooled[:, 20] = 0.0  # never active
    return pooled, correct


def test_select_features_finds_planted_and_filters_rare() -> None:
    pooled, correct = planted()
    sel = select_features(pooled, correct, top_n=3, min_active_frac=0.05)
    assert sel.helpful[0] == 3 and sel.harmful[0] == 7
    assert 11 not in sel.helpful and not sel.eligible[11]
    assert sel.d[20] == 0.0 and not sel.eligible[20]
    # without the filter the rare feature is a candidate (and has a positive d)
    sel0 = select_features(pooled, correct, top_n=3, min_active_frac=0.0)
    assert sel0.eligible[11] and sel0.d[11] > 0
    assert all(sel.d[i] > 0 for i in sel.helpful) and all(sel.d[i] < 0 for i in sel.harmful)
    assert set(sel.helpful).isdisjoint(sel.harmful)


def test_require_both_outcomes_says_counts() -> None:
    with pytest.raises(SaeRewardError, match="5 correct and 0 wrong.*raise n"):
        require_both_outcomes(torch.ones(5, dtype=torch.bool), "the discovery split", "raise n")
    assert require_both_outcomes(torch.tensor([1, 1, 0, 0]).bool(), "x", "y") == (2, 2)


# --------------------------------------------------------------------------------------------------
# Packs
# --------------------------------------------------------------------------------------------------

SEED_PACK = {
    "name": "qwen35_4b_gsm8k_l18",
    "version": "1.0",
    "model_name": "Qwen/Qwen3.5-4B",
    "release": "caiovicentino1/Qwen3.5-4B-SAE-L18-topk",
    "sae_id": "layer_18",
    "description": "seed-style pack",
    "helpful_features": [
        {
            "feature_id": 1234,
            "effect_size": 0.61,
            "mean_correct": 0.2,
            "mean_wrong": 0.1,
            "weight": 1.0,
            "validated": True,
        },
        {
            "feature_id": 77,
            "effect_size": 0.55,
            "mean_correct": 0.3,
            "mean_wrong": 0.2,
            "weight": 1.0,
            "validated": True,
        },
    ],
    "harmful_features": [
        {
            "feature_id": 4001,
            "effect_size": -0.58,
            "mean_correct": 0.1,
            "mean_wrong": 0.3,
            "weight": -1.0,
            "validated": True,
        },
    ],
    "validation": {
        "n_questions": 100,
        "n_correct": 64,
        "spearman_rho": 0.54,
        "spearman_p": 1e-8,
        "pearson_r": 0.5,
        "pass_threshold": 0.3,
        "verdict": "PASS-EXCELLENT",
    },
    "metadata": {"d_model": 2560, "d_sae": 40960, "k": 64, "target_layer": 18, "num_hidden_layers": 32},
}


def test_seed_pack_loads_with_all_features(tmp_path: Path) -> None:
    p = tmp_path / "seed.json"
    p.write_text(json.dumps(SEED_PACK))
    pack = load_pack(p)
    assert [f.feature_id for f in pack.helpful] == [1234, 77]
    assert [f.feature_id for f in pack.harmful] == [4001]
    assert pack.layer == 18 and pack.d_sae == 40960 and pack.d_model == 2560
    assert pack.validation["spearman_rho"] == 0.54 and pack.source_format == "mechreward"
    assert pack.signed_weights() == [1.0, 1.0, -1.0]
    # a harmful weight written as +1 scores the same (the sign comes from the list)
    alt = json.loads(json.dumps(SEED_PACK))
    alt["harmful_features"][0]["weight"] = 1.0
    (tmp_path / "alt.json").write_text(json.dumps(alt))
    assert load_pack(tmp_path / "alt.json").signed_weights() == [1.0, 1.0, -1.0]


def test_older_features_list_pack_loads(tmp_path: Path) -> None:
    p = tmp_path / "old.json"
    p.write_text(
        json.dumps(
            {
                "name": "old",
                "layer": 9,
                "features": [
                    # mechreward's older catalog entries carry labels, thresholds and nested metadata
                    {
                        "feature_id": 5,
                        "name": "step_marker",
                        "description": "x",
                        "weight": 0.6,
                        "activation_threshold": 0.1,
                        "validated": False,
                        "metadata": {"source": "y"},
                    },
                    {"id": 6, "direction": "harmful"},
                    {"feature_id": 8, "weight": -0.5},
                ],
                "metadata": {"caveat": "unvalidated", "created_at": "2026-04-14"},
            }
        )
    )
    pack = load_pack(p)
    assert [f.feature_id for f in pack.helpful] == [5]
    assert [f.feature_id for f in pack.harmful] == [6, 8]
    assert pack.layer == 9 and pack.signed_weights() == [0.6, -1.0, -0.5]
    assert pack.helpful[0].name == "step_marker" and pack.source_format == "mechreward-features"


def test_pack_round_trip_and_is_a_seed_superset(tmp_path: Path) -> None:
    pack = FeaturePack(
        name="p",
        helpful=[Feature(3, 1.0, 0.9, 0.5, 0.1, False, 0.4)],
        harmful=[Feature(7, -1.0, -0.8)],
        layer=2,
        metadata={"d_model": 64, "d_sae": 256, "k": 8, "stats": {"n_correct": 3}},
    )
    save_pack(pack, tmp_path / "p.json")
    raw = json.loads((tmp_path / "p.json").read_text())
    for key in SEED_PACK:
        assert key in raw, key
    assert {"feature_id", "effect_size", "mean_correct", "mean_wrong", "weight", "validated"} <= set(
        raw["helpful_features"][0]
    )
    back = load_pack(tmp_path / "p.json")
    assert back.helpful == pack.helpful and back.harmful[0].feature_id == 7 and back.layer == 2
    assert back.source_format == "saereward.pack"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"helpful_features": [{"feature_id": -1}]}, "non-negative"),
        ({"helpful_features": [{"feature_id": 1}, {"feature_id": 1}]}, "more than once"),
        ({"helpful_features": [], "harmful_features": []}, "no features"),
        ({"something": 1}, "not a feature pack"),
        ({"features": [{"feature_id": 1}]}, "helpful or harmful"),
        ({"helpful_features": [{"feature_id": 1, "weight": float("nan")}]}, "weights must be finite"),
    ],
)
def test_malformed_packs_are_rejected(tmp_path: Path, bad: dict, match: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(SaeRewardError, match=match):
        load_pack(p)


def test_check_pack_rejects_wrong_sae_or_model(tmp_path: Path) -> None:
    p = tmp_path / "seed.json"
    p.write_text(json.dumps(SEED_PACK))
    pack = load_pack(p)
    with pytest.raises(SaeRewardError, match=r"feature id\(s\) \[40960|exceed the SAE's width 1024"):
        check_pack(pack, d_sae=1024)
    with pytest.raises(SaeRewardError, match="d_model 2560, the model has 576"):
        check_pack(pack, d_sae=40960, d_model=576)
    check_pack(pack, d_sae=40960, d_model=2560)
    with pytest.raises(SaeRewardError, match="not found"):
        load_pack(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{nope")
    with pytest.raises(SaeRewardError, match="not valid JSON"):
        load_pack(tmp_path / "junk.json")


# --------------------------------------------------------------------------------------------------
# The shared pack score
# --------------------------------------------------------------------------------------------------


def small_pack(helpful: list[int], harmful: list[int]) -> FeaturePack:
    return FeaturePack("t", [Feature(i, 1.0) for i in helpful], [Feature(i, -1.0) for i in harmful])


def test_pack_score_is_true_topk_and_consistent_across_paths() -> None:
    torch.manual_seed(0)
    sae = random_sae(d_in=16, d_sae=64, k=4)
    tokens = torch.randn(37, 16) * 2
    offsets = torch.tensor([0, 5, 5, 20, 37])  # one empty response
    pack = small_pack([1, 2, 3], [10, 11])
    scorer = PackScorer(sae, pack)
    r = scorer.response_scores(tokens, offsets)
    # reference: dense TopK by hand (keep the k largest pre-activations, ReLU), then means
    pre = (tokens - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(4, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    mech = dense[:, [1, 2, 3]].sum(-1) - dense[:, [10, 11]].sum(-1)
    ref = torch.stack(
        [
            mech[a:b].mean() if b > a else torch.tensor(0.0)
            for a, b in zip(offsets[:-1], offsets[1:], strict=True)
        ]
    )
    torch.testing.assert_close(r, ref.detach(), rtol=1e-5, atol=1e-6)
    # a feature whose pre-activation is positive but outside the top k contributes nothing
    outside = (pre > 0) & (dense == 0)
    assert outside.any()
    # pooled path (discovery, random controls) and the padded [B, T] path (RL reward) agree
    pooled = pooled_sae_acts(sae, tokens, offsets)
    torch.testing.assert_close(
        pack_scores_from_pooled(pooled, pack.feature_ids, pack.signed_weights()), r, rtol=1e-5, atol=1e-6
    )
    B, T = 4, 17
    x = torch.zeros(B, T, 16)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (a, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        x[b, T - (e - a) :] = tokens[a:e]
        mask[b, T - (e - a) :] = True
    torch.testing.assert_close(scorer.pooled_scores(x, mask), r, rtol=1e-5, atol=1e-6)
    # a scorer that encodes a few tokens at a time (the GRPO trainer's) scores the same
    chunked = PackScorer(sae, pack, chunk=5)
    torch.testing.assert_close(chunked.token_scores(x), scorer.token_scores(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.response_scores(tokens, offsets), r, rtol=1e-5, atol=1e-6)


def test_scorer_checks_the_pack_against_the_sae() -> None:
    sae = random_sae(d_in=16, d_sae=64, k=4)
    with pytest.raises(SaeRewardError, match="exceed the SAE's width 64"):
        PackScorer(sae, small_pack([1, 64], []))


def test_masked_and_segment_means() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert masked_mean(v, torch.tensor([[0, 1, 1], [0, 0, 0]]).bool()).tolist() == [2.5, 0.0]
    assert segment_mean(torch.arange(6.0), torch.tensor([0, 2, 2, 6])).tolist() == [0.5, 0.0, 3.5]


# --------------------------------------------------------------------------------------------------
# G1 statistics
# --------------------------------------------------------------------------------------------------


def test_association_matches_scipy_and_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = y * 0.8 + rng.normal(size=300)
    a = association(s, y, n_boot=1000, seed=1)
    assert a["spearman_rho"] == pytest.approx(spearmanr(s, y).statistic, abs=1e-12)
    assert a["pearson_r"] == pytest.approx(pearsonr(s, y).statistic, abs=1e-12)
    assert a["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    lo, hi = a["rho_ci"]
    assert lo < a["spearman_rho"] < hi and 0.05 < hi - lo < 0.35
    assert a["auroc_ci"][0] < a["auroc"] < a["auroc_ci"][1]
    assert a["n"] == 300 and a["n_boot"] == 1000 and a["seed"] == 1
    # same seed, same CI; another seed, a different one
    assert association(s, y, n_boot=1000, seed=1)["rho_ci"] == a["rho_ci"]
    assert association(s, y, n_boot=1000, seed=2)["rho_ci"] != a["rho_ci"]


def test_association_degenerate_inputs() -> None:
    a = association(np.arange(10.0), np.ones(10), n_boot=100)
    assert np.isnan(a["spearman_rho"]) and a["note"] == "one outcome class only"
    with pytest.raises(SaeRewardError, match="NaN or inf"):
        association(np.array([1.0, np.nan, 2.0]), np.array([0, 1, 1]), n_boot=100)


def _questions(n_q: int, k: int, rng: np.random.Generator, shared: bool) -> tuple[np.ndarray, ...]:
    """``n_q`` questions × ``k`` samples; with ``shared`` a question's samples are copies of one draw."""
    qid = np.repeat(np.arange(n_q), k)
    if shared:
        y = np.repeat(rng.random(n_q) < 0.5, k)
        s = np.repeat(rng.normal(size=n_q), k) + 0.8 * y
    else:
        y = rng.random(n_q * k) < 0.5
        s = rng.normal(size=n_q * k) + 0.8 * y
    return s, y, qid


def _width(ci: list[float]) -> float:
    return ci[1] - ci[0]


def test_cluster_bootstrap_widens_the_ci_when_samples_of_a_question_agree() -> None:
    s, y, qid = _questions(40, 4, np.random.default_rng(0), shared=True)
    flat = association(s, y, n_boot=2000, seed=0)
    clustered = association(s, y, n_boot=2000, seed=0, clusters=qid)
    # the point statistics do not depend on the resampling
    assert clustered["spearman_rho"] == flat["spearman_rho"] and clustered["auroc"] == flat["auroc"]
    assert clustered["n_clusters"] == 40 and clustered["bootstrap_unit"] == "cluster"
    assert flat["n_clusters"] == 160 and flat["bootstrap_unit"] == "response"
    # 160 responses but only 40 independent questions: the honest CI is about sqrt(4) = 2 times wider
    assert _width(clustered["rho_ci"]) / _width(flat["rho_ci"]) > 1.5
    assert _width(clustered["auroc_ci"]) / _width(flat["auroc_ci"]) > 1.5


def test_cluster_bootstrap_matches_the_row_bootstrap_for_independent_samples() -> None:
    s, y, qid = _questions(40, 4, np.random.default_rng(1), shared=False)
    flat = association(s, y, n_boot=2000, seed=0)
    clustered = association(s, y, n_boot=2000, seed=0, clusters=qid)
    assert 0.8 < _width(clustered["rho_ci"]) / _width(flat["rho_ci"]) < 1.25
    # one response per cluster is exactly the per-response bootstrap of the same seed
    same = association(s, y, n_boot=500, seed=4, clusters=[f"q{i}" for i in range(len(s))])
    assert same["rho_ci"] == association(s, y, n_boot=500, seed=4)["rho_ci"]


def test_cluster_bootstrap_with_unequal_question_sizes() -> None:
    rng = np.random.default_rng(2)
    qid = np.repeat(np.arange(30), rng.integers(1, 6, size=30))
    y = rng.random(len(qid)) < 0.5
    s = rng.normal(size=len(qid)) + y
    a = association(s, y, n_boot=400, seed=0, clusters=qid)
    assert a["rho_ci"][0] < a["spearman_rho"] < a["rho_ci"][1] and 350 < a["n_boot"] <= 400
    with pytest.raises(SaeRewardError, match="clusters has 3 labels"):
        association(s, y, n_boot=100, clusters=[1, 2, 3])


def test_partial_association_point_and_ci() -> None:
    from saereward.stats import partial_spearman

    rng = np.random.default_rng(3)
    qid = np.repeat(np.arange(50), 3)
    length = rng.integers(10, 90, size=150).astype(float)
    y = rng.random(150) < 1 / (1 + np.exp((length - 50) / 10))
    s = -length + rng.normal(0, 20, size=150) + 15 * y
    pa = partial_association(s, y, length, n_boot=1000, seed=0, clusters=qid)
    assert pa["partial_rho"] == partial_spearman(s, y, length)
    lo, hi = pa["partial_rho_ci"]
    assert lo < pa["partial_rho"] < hi and pa["n_boot"] == 1000
    # a score that is a function of length has nothing left once length is held fixed
    assert np.isnan(partial_association(-length, y, length, n_boot=100)["partial_rho"])


def test_gate_verdict_requires_beating_length() -> None:
    assert gate_verdict(0.55, 0.2) == ("PASS-EXCELLENT", gate_verdict(0.55, 0.2)[1])
    assert "exceeds |rho_length| 0.200" in gate_verdict(0.55, -0.2)[1]
    # a pack that merely matches (or trails) the length baseline fails, whatever its tier
    for rho, rho_len in ((0.4, -0.4), (0.4, 0.45), (0.6, -0.7), (0.12, 0.12)):
        decided, reason = gate_verdict(rho, rho_len)
        assert decided == "FAIL" and "does not exceed |rho_length|" in reason
    assert gate_verdict(0.35, float("nan"))[0] == "PASS"  # constant lengths: the rule cannot apply
    assert gate_verdict(float("nan"), 0.1)[0] == "FAIL"
    # the tiers themselves are unchanged
    assert [gate_verdict(r, 0.0)[0] for r in (0.5, 0.3, 0.1, 0.09)] == [
        "PASS-EXCELLENT",
        "PASS",
        "WEAK",
        "FAIL",
    ]


def test_a_length_only_pack_fails_the_gate() -> None:
    """Correctness tracks length (short answers are right); a 'pack' scoring −length looks like a PASS."""
    rng = np.random.default_rng(5)
    qid = [f"q{i}" for i in np.repeat(np.arange(60), 4)]
    length = rng.integers(10, 97, size=240).astype(float)
    y = rng.random(240) < 1 / (1 + np.exp((length - 50) / 8))
    honest = -length + rng.normal(0, 10, size=240) + 40 * y  # knows something beyond length
    scores = {"pack": -length, "honest": honest}
    base, partial = length_control(scores, y, length, qid, n_boot=500, seed=0)
    assert base["spearman_rho"] < -0.3 and base["rho_ci"][1] < 0 and base["bootstrap_unit"] == "cluster"
    assert base["mean_tokens_correct"] < base["mean_tokens_wrong"]
    rho = association(-length, y, n_boot=100)["spearman_rho"]
    assert rho == pytest.approx(-base["spearman_rho"]) and verdict(rho) in ("PASS", "PASS-EXCELLENT")
    assert gate_verdict(rho, base["spearman_rho"])[0] == "FAIL"
    assert np.isnan(partial["pack"]["partial_rho_length"])
    # the honest score beats length and keeps a clearly positive partial rho
    rho_h = association(honest, y, n_boot=100)["spearman_rho"]
    assert gate_verdict(rho_h, base["spearman_rho"])[0].startswith("PASS")
    assert partial["honest"]["partial_rho_length_ci"][0] > 0.1


@pytest.mark.parametrize(
    "rho, tier",
    [
        (0.54, "PASS-EXCELLENT"),
        (0.5, "PASS-EXCELLENT"),
        (0.3, "PASS"),
        (0.12, "WEAK"),
        (0.05, "FAIL"),
        (-0.6, "FAIL"),
        (float("nan"), "FAIL"),
    ],
)
def test_verdict_tiers(rho: float, tier: str) -> None:
    assert verdict(rho) == tier


def test_layer_scores_and_direction() -> None:
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(100, generator=g) < 0.5
    pooled = {L: torch.randn(100, 8, generator=g) for L in range(3)}
    pooled[1][:, 2] += 2.0 * correct
    s = layer_scores(pooled, correct, top=3)
    assert max(s, key=s.get) == 1
    v = contrastive_direction(pooled[1], correct)
    assert v.norm().item() == pytest.approx(1.0) and v.abs().argmax().item() == 2


def test_answer_position_finds_the_last_occurrence() -> None:
    tok = char_tokenizer()
    ids, pos, target = answer_position(tok, "Q: 1+2\nA:", " 1+2 = 3. The answer is 3.", "3")
    text = tok.decode(ids.tolist())
    assert text.endswith("The answer is ") and tok.decode([target]) == "3" and pos == len(ids) - 1
    assert answer_position(tok, "Q", "no answer here", "42") is None


# --------------------------------------------------------------------------------------------------
# ReasonScore
# --------------------------------------------------------------------------------------------------


def test_reason_score_ranks_broad_reasoning_features_first() -> None:
    g = torch.Generator().manual_seed(0)
    N, M, W = 4000, 6, 4
    seq = torch.arange(N) // 200
    words = torch.full((N,), -1)
    hit_pos = torch.randperm(N, generator=g)[:300]
    words[hit_pos] = torch.arange(300) % 3  # three reasoning words, 100 hits each
    in_win = torch.zeros(N, 3, dtype=torch.bool)
    for t in hit_pos.tolist():
        for u in range(t, min(N, t + W)):
            if seq[u] == seq[t]:
                in_win[u, int(words[t])] = True
    acts = 0.05 * torch.rand(N, M, generator=g)
    acts[:, 0] += 2.0 * in_win.any(1)  # fires around every reasoning word
    acts[:, 1] += 2.0 * in_win[:, 0]  # fires around one word only
    acts[:, 2] += 1.0  # fires everywhere
    r = reason_score(acts, seq, words, 3, window=W)
    order = torch.argsort(r["rs"], descending=True).tolist()
    assert order[0] == 0 and order.index(1) < order.index(2)
    assert r["entropy"][0] > 0.95 and r["entropy"][1] < 0.6
    assert r["rs"][2] < r["rs"][0] / 3
    with pytest.raises(ValueError, match="at least 2"):
        reason_score(acts, seq, words, 1)


def test_word_hits_marks_whole_words_only() -> None:
    tok = char_tokenizer()
    ids = tok("so wait, Therefore also", add_special_tokens=False)["input_ids"]
    hits = word_hits(tok, ids, ["wait", "therefore", "so"])
    marked = {i: h for i, h in enumerate(hits) if h >= 0}
    assert marked == {0: 2, 3: 0, 9: 1}  # "also" does not contain the word "so"


def test_a_pack_records_its_sae_and_rollouts_relative_to_itself(tmp_path: Path) -> None:
    """A copied run folder's pack points at the copy's SAE and rollouts, not the original's."""
    import shutil

    from saereward.features.pack import Feature, FeaturePack, beside, load_pack, save_pack

    run = tmp_path / "run"
    (run / "sae" / "sae").mkdir(parents=True)
    (run / "rollouts").mkdir()
    meta = {
        "sae_path": beside(run / "sae" / "sae", run / "pack.json"),
        "rollouts": beside(run / "rollouts", run / "pack.json"),
    }
    assert meta == {"sae_path": "sae/sae", "rollouts": "rollouts"}
    save_pack(FeaturePack("t", [Feature(1, 1.0)], [], layer=1, metadata=meta), run / "pack.json")
    shutil.copytree(run, tmp_path / "copy")
    shutil.rmtree(run)
    pack = load_pack(tmp_path / "copy" / "pack.json")
    assert pack.metadata["sae_path"] == str(tmp_path / "copy" / "sae" / "sae")
    assert pack.metadata["rollouts"] == str(tmp_path / "copy" / "rollouts")
    old = FeaturePack("t", [Feature(1, 1.0)], [], layer=1, metadata={"sae_path": "/abs/sae"})
    assert load_pack(save_pack(old, tmp_path / "old.json")).metadata["sae_path"] == "/abs/sae"  # older packs
    # a stage that reads the pack and writes it back (G1) keeps the paths relative
    save_pack(pack, tmp_path / "copy" / "pack.json")
    raw = json.loads((tmp_path / "copy" / "pack.json").read_text())["metadata"]
    assert (raw["sae_path"], raw["rollouts"]) == ("sae/sae", "rollouts")
    shutil.copytree(tmp_path / "copy", tmp_path / "copy2")
    assert load_pack(tmp_path / "copy2" / "pack.json").metadata["sae_path"] == str(
        tmp_path / "copy2" / "sae" / "sae"
    )


def test_a_pack_with_a_width_that_is_not_a_number_is_one_line(tmp_path: Path) -> None:
    from saereward.features.pack import load_pack

    path = save_pack(
        FeaturePack("t", [Feature(1, 1.0)], [Feature(2, -1.0)], metadata={"d_sae": 64}), tmp_path / "p.json"
    )
    data = json.loads(path.read_text())
    data["metadata"]["d_sae"] = "abc"
    path.write_text(json.dumps(data))
    with pytest.raises(SaeRewardError, match=r"metadata d_sae='abc' is not a positive whole number"):
        load_pack(path)


def test_a_pack_is_applied_only_with_the_sae_it_was_discovered_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The weights' hash the pack records decides (the SAE folder's eval.json may be rewritten); an
    older pack with only the folder's hash gets a warning, not an error."""
    from saereward.features.pack import check_pack_sae
    from saereward.io import file_sha256
    from saereward.sae.formats import sae_weights_sha256, save_sae
    from tiny_models import random_sae

    a = save_sae(random_sae(seed=1), tmp_path / "a")
    b = save_sae(random_sae(seed=2), tmp_path / "b")
    pack = FeaturePack(
        "t", [Feature(1, 1.0)], [Feature(2, -1.0)], metadata={"sae_weights_sha256": sae_weights_sha256(a)}
    )
    check_pack_sae(pack, a)
    (a / "eval.json").write_text("{}")
    check_pack_sae(pack, a)
    with pytest.raises(SaeRewardError, match="not the one pack 't' was discovered on"):
        check_pack_sae(pack, b)
    old = FeaturePack("t", [Feature(1, 1.0)], [Feature(2, -1.0)], metadata={"sae_sha256": file_sha256(a)})
    with caplog.at_level("WARNING"):
        check_pack_sae(old, a)
        assert "may not be" not in caplog.text
        check_pack_sae(old, b)
    assert "may not be the one pack 't' was discovered on" in caplog.text
