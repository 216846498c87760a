"""Stage Gate 1: does the pack's score predict the outcome on questions discovery never saw?

On the validation split of a rollout folder, each response gets the pack score
``R = Σ helpful pooled_act − Σ harmful pooled_act`` (:mod:`saereward.features.scoring`, the same
code the RL reward uses). Against the binary outcome we report Spearman ρ (mechreward's statistic)
with its p-value, Pearson r, AUROC, and percentile-bootstrap 95 % CIs for ρ and AUROC.

**The bootstrap is clustered by question.** A rollout folder holds several samples per question,
and samples of one question share its difficulty, so their scores and outcomes are correlated.
Every bootstrap resample therefore draws *questions* with replacement and keeps all responses of a
drawn question together (:func:`saereward.stats.cluster_bootstrap_indices`); resampling responses
one by one would treat a question's samples as independent evidence and give CIs that are too
narrow. Resamples with one class only are dropped and counted. The result records ``n_responses``,
``n_questions``, the bootstrap seed and the resampling unit (``bootstrap``).

**Length control.** Longer completions are more often wrong (they ramble, or hit the token limit),
and many activation features simply grow or shrink with length. So on the same responses we report

* the **length baseline**: Spearman ρ of the completion length ``n_tokens`` with correctness, with
  its clustered CI (``length_baseline``);
* the **partial ρ** of each method's score with correctness, length held fixed: ranks of score,
  outcome and length, length ranks regressed out of both, Pearson of the residuals
  (:func:`saereward.stats.partial_spearman`), with its clustered CI (``partial_rho_length``).

Side by side, on the same responses:

* **raw direction**: unit ``mean(correct) − mean(wrong)`` of pooled residuals on the discovery split,
  at the peak layer of the layer map (:mod:`saereward.features.layers`); score = projection;
* **probe**: standardized logistic regression on the same pooled residuals, its L2 strength chosen
  by 5-fold cross-validation on the discovery split (scikit-learn ``LogisticRegressionCV``);
* **random packs**: ``n_random`` packs with as many helpful and harmful features as the pack, drawn
  from the features that pass the pack's activity filter on discovery. We report their median ρ,
  the 2.5–97.5 percentile range, and the share that reach the pack's ρ (an empirical p-value).

**Verdict.** Tiers on the pack's ρ (mechreward's): ≥ 0.50 PASS-EXCELLENT, ≥ 0.30 PASS, ≥ 0.10
WEAK, else FAIL; configurable. On top of the tiers, **the pack must beat length**: if the pack's ρ
does not exceed ``|ρ_length|``, the verdict is FAIL whatever its tier, because a response's token
count alone predicts correctness at least as well, and a reward built on the pack could be gamed by
writing shorter or longer answers. ``rho_tier`` keeps the tier before this rule and
``verdict_reason`` says which rule decided (:func:`gate_verdict`). The verdict is computed here,
never typed in.

Differences from mechreward: mechreward computed ρ in a notebook with no CI, no baselines and no
length control; its validation responses were greedy only (one per question, so there was nothing
to cluster). Nothing else in the statistic differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saereward import __version__
from saereward.config import option, to_dict
from saereward.data.rollouts import load_rollouts
from saereward.errors import SaeRewardError
from saereward.features.discover import resolve_sae_layer
from saereward.features.layers import contrastive_direction, layer_scores
from saereward.features.pack import check_pack_sae, load_pack, save_pack
from saereward.features.probe import fit_logistic
from saereward.features.scoring import PackScorer, pack_scores_from_pooled, pooled_sae_acts
from saereward.io import write_json
from saereward.sae.formats import check_sae_matches_model, load_sae, warn_other_model
from saereward.stats import association, partial_association, require_both_outcomes

log = logging.getLogger(__name__)

TIERS = ("PASS-EXCELLENT", "PASS", "WEAK", "FAIL")


def verdict(rho: float, excellent: float = 0.50, passing: float = 0.30, weak: float = 0.10) -> str:
    """mechreward's tiers on Spearman ρ (NaN fails); :func:`gate_verdict` adds the length rule."""
    if not np.isfinite(rho):
        return "FAIL"
    if rho >= excellent:
        return "PASS-EXCELLENT"
    if rho >= passing:
        return "PASS"
    if rho >= weak:
        return "WEAK"
    return "FAIL"


def gate_verdict(
    rho: float,
    rho_length: float,
    excellent: float = 0.50,
    passing: float = 0.30,
    weak: float = 0.10,
) -> tuple[str, str]:
    """The G1 verdict and why: the ρ tier, then FAIL unless ρ exceeds ``|rho_length|``.

    ``rho`` is the pack's Spearman ρ, ``rho_length`` the length baseline's. A pack that does not beat
    the token count is no evidence of anything length does not already tell. When ``rho_length`` is
    undefined (every response has the same length) the length rule cannot apply and the tier stands.
    """
    tier = verdict(rho, excellent, passing, weak)
    if not np.isfinite(rho):
        return "FAIL", "the pack's rho is undefined (one outcome class or a constant score)"
    if not np.isfinite(rho_length):
        return tier, f"rho {rho:.3f} gives tier {tier}; length baseline undefined (constant lengths)"
    if not rho > abs(rho_length):
        return "FAIL", (
            f"rho {rho:.3f} does not exceed |rho_length| {abs(rho_length):.3f}: "
            f"completion length predicts correctness as well as the pack (tier alone: {tier})"
        )
    return tier, f"rho {rho:.3f} gives tier {tier} and exceeds |rho_length| {abs(rho_length):.3f}"


@dataclass(frozen=True)
class GateG1Config:
    """Settings of ``saereward gate-g1``."""

    rollouts: str = option("runs/rollouts", "folder written by `saereward rollouts`")
    pack: str = option("runs/pack.json", "feature pack (ours or mechreward's)")
    sae: str | None = option(None, "SAE the pack indexes (default: the pack's recorded sae_path)")
    layer: int | None = option(None, "layer the SAE reads (default: the pack's / SAE's layer)")
    split: str = option("validation", "split scored (must not share questions with discovery)")
    baseline_layer: int | None = option(
        None, "layer for the raw-direction and probe baselines (default: the layer map's peak on discovery)"
    )
    n_boot: int = option(2000, "bootstrap resamples (of questions) for the CIs")
    n_random: int = option(200, "random-pack controls")
    min_active_frac: float | None = option(
        None, "activity filter for random-pack features (default: the pack's discovery setting, else 0.05)"
    )
    excellent: float = option(0.50, "ρ threshold for PASS-EXCELLENT")
    passing: float = option(0.30, "ρ threshold for PASS")
    weak: float = option(0.10, "ρ threshold for WEAK")
    seed: int = option(0, "random seed for the bootstrap, the probe's CV folds and the random packs")
    update_pack: bool = option(True, "write the validation record into the pack file (atomically)")
    out: str | None = option(None, "gate_g1.json path (default: next to the pack)")

    def __post_init__(self) -> None:
        if not self.excellent >= self.passing >= self.weak:
            raise ValueError("thresholds must satisfy excellent >= passing >= weak")
        if self.n_boot < 100:
            raise ValueError(f"n_boot must be >= 100, got {self.n_boot}")
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, got {self.n_random}")


def _probe_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int
) -> tuple[np.ndarray, dict]:
    clf, info = fit_logistic(x_train, y_train, seed)
    return clf.decision_function(x_test), info


def response_lengths(ro: Any, mask: Any) -> np.ndarray:
    """Completion length in tokens (``n_tokens`` of rollouts.jsonl) of the responses in ``mask``.

    Rows written before ``n_tokens`` was recorded fall back to the token offsets, which count the
    same positions.
    """
    rows = [r for r, m in zip(ro.rows, mask.tolist(), strict=True) if m]
    if all(r.get("n_tokens") is not None for r in rows):
        return np.asarray([float(r["n_tokens"]) for r in rows])
    return np.diff(ro.offsets.numpy()).astype(np.float64)[mask.numpy()]


def length_control(
    scores: dict[str, np.ndarray],
    outcome: np.ndarray,
    lengths: np.ndarray,
    qids: list[Any],
    *,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The length baseline and, per method, the partial ρ of its score with length held fixed.

    Returns ``(length_baseline, partial)``: ``length_baseline`` is :func:`association` of the token
    counts with the outcome (plus mean length of correct and wrong responses); ``partial[name]`` has
    ``partial_rho_length``, its CI and the bootstrap count for ``scores[name]``. All bootstraps are
    clustered by ``qids`` with the same seed, so every CI resamples the same questions.
    """
    y = np.asarray(outcome, dtype=bool)
    base = association(lengths, y, n_boot=n_boot, seed=seed, clusters=qids)
    base.update(
        {
            "statistic": "Spearman rho of completion length (n_tokens) vs correctness",
            "mean_tokens_correct": float(lengths[y].mean()) if y.any() else float("nan"),
            "mean_tokens_wrong": float(lengths[~y].mean()) if (~y).any() else float("nan"),
        }
    )
    partial = {}
    for name, sc in scores.items():
        pa = partial_association(sc, y, lengths, n_boot=n_boot, seed=seed, clusters=qids)
        partial[name] = {
            "partial_rho_length": pa["partial_rho"],
            "partial_rho_length_ci": pa["partial_rho_ci"],
            "partial_rho_length_n_boot": pa["n_boot"],
        }
    return base, partial


def _random_packs(
    cfg: GateG1Config,
    sae: Any,
    pack: Any,
    tokens: Any,
    ro: Any,
    disc: Any,
    idx_val: list[int],
    y_val: Any,
    rho_pack: float,
) -> dict[str, Any]:
    """ρ of ``cfg.n_random`` random packs of the pack's size (features active on discovery)."""
    from scipy.stats import spearmanr

    pooled = pooled_sae_acts(sae, tokens, ro.offsets)
    frac = cfg.min_active_frac
    if frac is None:
        frac = float(pack.metadata.get("stats", {}).get("min_active_frac", 0.05))
    active = (pooled[disc] > 0).float().mean(0)
    pool = torch.nonzero((active >= frac) & (active > 0)).flatten()
    nh, nm = len(pack.helpful), len(pack.harmful)
    if len(pool) < nh + nm:
        raise SaeRewardError(
            f"only {len(pool)} features pass the activity filter {frac}: lower min_active_frac"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    pv = pooled[idx_val]
    rhos = []
    for _ in range(cfg.n_random):
        pick = pool[torch.randperm(len(pool), generator=gen)[: nh + nm]].tolist()
        sc = pack_scores_from_pooled(pv, pick, [1.0] * nh + [-1.0] * nm).numpy()
        rhos.append(float(spearmanr(sc, y_val).statistic) if np.ptp(sc) > 0 else 0.0)
    r = np.nan_to_num(np.asarray(rhos))
    return {
        "n_packs": cfg.n_random,
        "features_per_pack": [nh, nm],
        "min_active_frac": frac,
        "eligible_features": len(pool),
        "median_rho": float(np.median(r)),
        "rho_range_95": [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))],
        "share_ge_pack": float(np.mean(r >= rho_pack)) if np.isfinite(rho_pack) else None,
    }


def _baselines(
    cfg: GateG1Config, ro: Any, disc: Any, val: Any, scores: dict[str, np.ndarray]
) -> tuple[int, dict[int, float], dict[str, Any]]:
    """Add the raw-direction and probe scores of the ``val`` responses to ``scores``.

    Both read pooled residuals at ``cfg.baseline_layer`` (default: the layer map's peak on
    discovery) and are fitted on ``disc``. Returns ``(layer, layer map on discovery, probe info)``.
    """
    correct = ro.correct
    scores_by_layer = layer_scores({k: v[disc] for k, v in ro.pooled.items()}, correct[disc])
    base_layer = (
        cfg.baseline_layer
        if cfg.baseline_layer is not None
        else max(scores_by_layer, key=lambda k: scores_by_layer[k])
    )
    if base_layer not in ro.pooled:
        raise SaeRewardError(
            f"baseline_layer {base_layer} was not captured: choose one of {sorted(ro.pooled)}"
        )
    x_disc, x_val = ro.pooled[base_layer][disc], ro.pooled[base_layer][val]
    scores["raw_direction"] = (x_val @ contrastive_direction(x_disc, correct[disc])).numpy()
    scores["probe"], probe_info = _probe_scores(
        x_disc.double().numpy(), correct[disc].numpy(), x_val.double().numpy(), cfg.seed
    )
    return base_layer, scores_by_layer, probe_info


def _check_leak(pack: Any, val_q: set[Any], split: str) -> str:
    if pack.metadata.get("discovery_qids") is None:
        return "not checked (the pack records no discovery question ids)"
    leaked = val_q & set(pack.metadata["discovery_qids"])
    if leaked:
        raise SaeRewardError(
            f"{len(leaked)} of the {len(val_q)} {split} questions were used to discover this pack "
            f"(e.g. {sorted(leaked)[:3]}): validate on questions discovery never saw"
        )
    return "passed: no validation question was used in discovery"


def _result(
    cfg: GateG1Config, counts: dict[str, int], length: dict[str, Any], methods: dict[str, Any]
) -> dict[str, Any]:
    """The verdict and the counts of ``gate_g1.json`` (the caller adds where everything came from)."""
    rho = methods["pack"]["spearman_rho"]
    decided, reason = gate_verdict(rho, length["spearman_rho"], cfg.excellent, cfg.passing, cfg.weak)
    return {
        "gate": "G1",
        "verdict": decided,
        "verdict_reason": reason,
        "rho_tier": verdict(rho, cfg.excellent, cfg.passing, cfg.weak),
        "statistic": "Spearman rho of the pack score vs correctness",
        "rule": "verdict = rho tier, but FAIL unless the pack's rho exceeds |rho_length|",
        "thresholds": {"excellent": cfg.excellent, "passing": cfg.passing, "weak": cfg.weak},
        "split": cfg.split,
        **counts,
        "seed": cfg.seed,
        "bootstrap": {
            "resampling": "clustered by question",
            "unit": "question",
            "method": "percentile; each resample draws questions with replacement and keeps all their responses",
            "n_boot": cfg.n_boot,
            "seed": cfg.seed,
            "n_responses": counts["n_responses"],
            "n_questions": counts["n_questions"],
        },
        "length_baseline": length,
    }


def _gate_inputs(cfg: GateG1Config) -> tuple[Any, Any, str, Any, int]:
    """``(pack, rollouts, SAE path, SAE, layer)``, checked against each other."""
    pack = load_pack(cfg.pack)
    ro = load_rollouts(cfg.rollouts)
    sae_path = cfg.sae or pack.metadata.get("sae_path")
    if not sae_path:
        raise SaeRewardError(f"pack {cfg.pack} records no SAE path: pass --sae")
    check_pack_sae(pack, sae_path)
    sae = load_sae(sae_path)
    layer = resolve_sae_layer(sae, cfg.layer if cfg.layer is not None else pack.layer, ro)
    check_sae_matches_model(sae, int(ro.summary["d_model"]), layer)
    warn_other_model(f"pack {cfg.pack}", pack.model_name, ro.summary.get("model"))
    warn_other_model(f"SAE {sae_path}", sae.cfg.model, ro.summary.get("model"))
    return pack, ro, str(sae_path), sae, layer


def run_gate_g1(cfg: GateG1Config) -> dict[str, Any]:
    """Score the pack and the baselines on ``cfg.split``; write ``gate_g1.json``; return the result."""
    pack, ro, sae_path, sae, layer = _gate_inputs(cfg)
    scorer = PackScorer(sae, pack, d_model=int(ro.summary["d_model"]))
    val = ro.split_mask(cfg.split)
    disc = ro.split_mask("discovery") if cfg.split != "discovery" else ~val
    correct = ro.correct
    # clusters are questions by text: generators repeat a question under a new id (the splits do the same)
    val_rows = [r for r, m in zip(ro.rows, val.tolist(), strict=True) if m]
    qids = [q for q, m in zip(ro.questions, val.tolist(), strict=True) if m]
    leak_check = _check_leak(pack, {r["qid"] for r in val_rows}, cfg.split)
    n_c, n_w = require_both_outcomes(
        correct[val], f"the {cfg.split} split", "raise n/samples or use a task with a mix of outcomes"
    )
    require_both_outcomes(correct[disc], "the discovery split", "raise n/samples")
    y_val = correct[val].numpy()
    boot: dict[str, Any] = {"n_boot": cfg.n_boot, "seed": cfg.seed, "clusters": qids}

    # -- the pack: per-token scores pooled per response, the RL reward's code path ----------------
    tokens = ro.layer_tokens(layer, "the pack's layer")
    scores = {"pack": scorer.response_scores(tokens, ro.offsets)[val].numpy()}

    # -- raw contrastive direction and probe at the layer map's peak --------------------------------
    base_layer, scores_by_layer, probe_info = _baselines(cfg, ro, disc, val, scores)
    methods = {k: association(v, y_val, **boot) for k, v in scores.items()}
    methods["pack"]["n_features"] = len(pack)
    methods["raw_direction"]["layer"] = base_layer
    methods["probe"].update({"layer": base_layer, **probe_info})
    length, partial = length_control(
        scores, y_val, response_lengths(ro, val), qids, n_boot=cfg.n_boot, seed=cfg.seed
    )
    for k, v in partial.items():
        methods[k].update(v)

    if cfg.n_random:
        idx_val = torch.nonzero(val).flatten().tolist()
        rho_pack = methods["pack"]["spearman_rho"]
        methods["random_packs"] = _random_packs(cfg, sae, pack, tokens, ro, disc, idx_val, y_val, rho_pack)

    counts = {"n_responses": int(val.sum()), "n_questions": len(set(qids)), "n_correct": n_c, "n_wrong": n_w}
    result = _result(cfg, counts, length, methods)
    result.update(
        {
            "layer": layer,
            "pack": str(Path(cfg.pack).resolve()),
            "pack_name": pack.name,
            "pack_format": pack.source_format,
            "sae": sae_path,
            "rollouts": str(Path(cfg.rollouts).resolve()),
            "leak_check": leak_check,
            "layer_map_discovery": {str(k): round(s, 6) for k, s in scores_by_layer.items()},
            "methods": methods,
            "config": to_dict(cfg),
            "saereward_version": __version__,
        }
    )
    out = Path(cfg.out) if cfg.out else Path(cfg.pack).with_name("gate_g1.json")
    write_json(out, result)
    if cfg.update_pack:
        _record_validation(pack, cfg, result, out)
    return result


def _record_validation(pack: Any, cfg: GateG1Config, result: dict[str, Any], out: Path) -> None:
    """Write the gate's summary into the pack file and mark its features validated (or not)."""
    from dataclasses import replace

    m = result["methods"]["pack"]
    pack.validation = {
        "n_questions": result["n_questions"],
        "n_responses": result["n_responses"],
        "n_correct": result["n_correct"],
        "spearman_rho": m["spearman_rho"],
        "spearman_p": m["spearman_p"],
        "spearman_rho_ci95": m["rho_ci"],
        "ci_resampling": "clustered by question",
        "pearson_r": m["pearson_r"],
        "auroc": m["auroc"],
        "length_rho": result["length_baseline"]["spearman_rho"],
        "partial_rho_length": m["partial_rho_length"],
        "pass_threshold": cfg.passing,
        "verdict": result["verdict"],
        "verdict_reason": result["verdict_reason"],
        "split": cfg.split,
        "seed": cfg.seed,
        "gate_file": str(out.resolve()),
    }
    passed = result["verdict"].startswith("PASS")
    pack.helpful = [replace(f, validated=passed) for f in pack.helpful]
    pack.harmful = [replace(f, validated=passed) for f in pack.harmful]
    save_pack(pack, cfg.pack)


def format_g1(result: dict[str, Any]) -> str:
    """The G1 table: one row per method (ρ, partial ρ given length, AUROC, with CIs), then the verdict."""
    m = result["methods"]
    boot = result.get("bootstrap") or {}
    unit = boot.get("resampling", "by response")
    lines = [
        f"Stage Gate 1 on {result['split']}: n={result['n_responses']} responses ({result['n_questions']} questions, "
        f"{result['n_correct']} correct), seed {result['seed']}, layer {result['layer']}",
        f"95% CIs: percentile bootstrap, {boot.get('n_boot', '?')} resamples, {unit}",
        f"{'method':16} {'rho':>7} {'95% CI':>17} {'p':>9} {'pearson':>8} {'AUROC':>6} {'95% CI':>15}"
        f"  {'rho|len':>7} {'95% CI':>17}",
    ]

    def ci(pair: Any, w: int = 6) -> str:
        return f"[{pair[0]:>{w}.3f}, {pair[1]:>{w}.3f}]"

    for key, label in (
        ("pack", "SAE pack"),
        ("raw_direction", f"raw dir L{m['raw_direction']['layer']}"),
        ("probe", f"probe L{m['probe']['layer']}"),
    ):
        a = m[key]
        row = (
            f"{label:16} {a['spearman_rho']:>7.3f} {ci(a['rho_ci'])} "
            f"{a['spearman_p']:>9.2g} {a['pearson_r']:>8.3f} {a['auroc']:>6.3f} {ci(a['auroc_ci'], 5)}"
        )
        if "partial_rho_length" in a:
            row += f"  {a['partial_rho_length']:>7.3f} {ci(a['partial_rho_length_ci'])}"
        lines.append(row)
    if "length_baseline" in result:
        a = result["length_baseline"]
        lines.append(
            f"{'length (tokens)':16} {a['spearman_rho']:>7.3f} {ci(a['rho_ci'])} "
            f"{a['spearman_p']:>9.2g} {a['pearson_r']:>8.3f} {a['auroc']:>6.3f} {ci(a['auroc_ci'], 5)}"
            f"  (mean tokens: correct {a['mean_tokens_correct']:.1f}, wrong {a['mean_tokens_wrong']:.1f})"
        )
    if "random_packs" in m:
        r = m["random_packs"]
        share = "n/a" if r["share_ge_pack"] is None else f"{r['share_ge_pack']:.3f}"
        lines.append(
            f"{'random packs':16} {r['median_rho']:>7.3f} {ci(r['rho_range_95'])}"
            f"  (median and 95% range of {r['n_packs']} packs; share >= pack: {share})"
        )
    lines.append("rho|len: Spearman partial rho given completion length (tokens)")
    lines.append(
        f"verdict: {result['verdict']}  (thresholds {result['thresholds']}; the pack must also beat |rho_length|)"
    )
    if result.get("verdict_reason"):
        lines.append(f"reason: {result['verdict_reason']}")
    return "\n".join(lines)
