"""Stage Gate 1: does the pack's score predict the outcome on questions discovery never saw?

On the validation split of a rollout folder, each response gets the pack score
``R = Σ helpful pooled_act − Σ harmful pooled_act`` (:mod:`saereward.features.scoring`, the same
code the RL reward uses). Against the binary outcome we report Spearman ρ (the seed's statistic)
with its p-value, Pearson r, AUROC, and percentile-bootstrap 95 % CIs for ρ and AUROC (resampling
responses; resamples with one class only are dropped and counted).

Side by side, on the same responses:

* **raw direction**: unit ``mean(correct) − mean(wrong)`` of pooled residuals on the discovery split,
  at the peak layer of the layer map (:mod:`saereward.features.layers`); score = projection;
* **probe**: standardized logistic regression on the same pooled residuals, its L2 strength chosen
  by 5-fold cross-validation on the discovery split (scikit-learn ``LogisticRegressionCV``);
* **random packs**: ``n_random`` packs with as many helpful and harmful features as the pack, drawn
  from the features that pass the pack's activity filter on discovery. We report their median ρ,
  the 2.5–97.5 percentile range, and the share that reach the pack's ρ (an empirical p-value).

Verdict tiers on the pack's ρ (the seed's): ≥ 0.50 PASS-EXCELLENT, ≥ 0.30 PASS, ≥ 0.10 WEAK, else
FAIL; configurable. The verdict is computed here, never typed in.

Differences from the seed: the seed computed ρ in a notebook with no CI and no baselines; its
validation responses were greedy only. Nothing else in the statistic differs.
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
from saereward.errors import SaeRewardError
from saereward.io import write_json

log = logging.getLogger(__name__)

TIERS = ("PASS-EXCELLENT", "PASS", "WEAK", "FAIL")


def verdict(rho: float, excellent: float = 0.50, passing: float = 0.30, weak: float = 0.10) -> str:
    """The seed's tiers on Spearman ρ (NaN fails)."""
    if not np.isfinite(rho):
        return "FAIL"
    if rho >= excellent:
        return "PASS-EXCELLENT"
    if rho >= passing:
        return "PASS"
    if rho >= weak:
        return "WEAK"
    return "FAIL"


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / den, np.nan)


def _row_auroc(score_ranks: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mann–Whitney AUROC per row from average ranks of the scores (ties count 1/2)."""
    n1 = y.sum(1)
    n0 = y.shape[1] - n1
    r1 = (score_ranks * y).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), (r1 - n1 * (n1 + 1) / 2) / (n1 * n0), np.nan)


def association(
    score: Any, outcome: Any, *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """Spearman ρ (+p, bootstrap CI), Pearson r (+p), AUROC (+bootstrap CI) of ``score`` vs binary ``outcome``."""
    from scipy.stats import pearsonr, rankdata, spearmanr

    s = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(outcome, dtype=np.float64).ravel()
    n = len(s)
    if n != len(y) or n < 3:
        raise SaeRewardError(f"association needs >= 3 paired values, got {n} scores and {len(y)} outcomes")
    if not np.isfinite(s).all():
        raise SaeRewardError("scores contain NaN or inf: check the SAE and the rollouts")
    both = 0 < y.sum() < n
    const = bool(np.ptp(s) == 0)
    res: dict[str, Any] = {"n": n, "n_correct": int(y.sum()), "seed": seed, "confidence": confidence}
    if not both or const:
        res.update(
            {
                "spearman_rho": float("nan"),
                "spearman_p": float("nan"),
                "pearson_r": float("nan"),
                "pearson_p": float("nan"),
                "auroc": float("nan"),
                "rho_ci": [float("nan")] * 2,
                "auroc_ci": [float("nan")] * 2,
                "n_boot": 0,
                "note": "one outcome class only" if not both else "constant score",
            }
        )
        return res
    sp = spearmanr(s, y)
    pr = pearsonr(s, y)
    ranks = rankdata(s)
    auc = float(_row_auroc(ranks[None], y[None])[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    bs, by = s[idx], y[idx]
    bsr = rankdata(bs, axis=1)
    byr = rankdata(by, axis=1)
    rho_b = _row_pearson(bsr, byr)
    auc_b = _row_auroc(bsr, by)
    ok = np.isfinite(rho_b) & np.isfinite(auc_b)
    a = (1 - confidence) / 2
    res.update(
        {
            "spearman_rho": float(sp.statistic),
            "spearman_p": float(sp.pvalue),
            "pearson_r": float(pr.statistic),
            "pearson_p": float(pr.pvalue),
            "auroc": auc,
            "rho_ci": [float(np.quantile(rho_b[ok], a)), float(np.quantile(rho_b[ok], 1 - a))],
            "auroc_ci": [float(np.quantile(auc_b[ok], a)), float(np.quantile(auc_b[ok], 1 - a))],
            "n_boot": int(ok.sum()),
        }
    )
    return res


@dataclass(frozen=True)
class GateG1Config:
    """Settings of ``saereward gate-g1``."""

    rollouts: str = option("runs/rollouts", "folder written by `saereward rollouts`")
    pack: str = option("runs/pack.json", "feature pack (ours or the seed's)")
    sae: str | None = option(None, "SAE the pack indexes (default: the pack's recorded sae_path)")
    layer: int | None = option(None, "layer the SAE reads (default: the pack's / SAE's layer)")
    split: str = option("validation", "split scored (must not share questions with discovery)")
    baseline_layer: int | None = option(
        None, "layer for the raw-direction and probe baselines (default: the layer map's peak on discovery)"
    )
    n_boot: int = option(2000, "bootstrap resamples for the CIs")
    n_random: int = option(200, "random-pack controls")
    min_active_frac: float | None = option(
        None, "activity filter for random-pack features (default: the pack's discovery setting, else 0.05)"
    )
    excellent: float = option(0.50, "ρ threshold for PASS-EXCELLENT")
    passing: float = option(0.30, "ρ threshold for PASS")
    weak: float = option(0.10, "ρ threshold for WEAK")
    seed: int = option(0, "seed for the bootstrap, the probe's CV folds and the random packs")
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
    from saereward.probes import fit_logistic

    clf, info = fit_logistic(x_train, y_train, seed)
    return clf.decision_function(x_test), info


def run_gate_g1(cfg: GateG1Config) -> dict[str, Any]:
    """Score the pack and the baselines on ``cfg.split``; write ``gate_g1.json``; return the result."""
    from saereward.features.discover import require_both_outcomes, resolve_sae_layer
    from saereward.features.layers import contrastive_direction, layer_scores
    from saereward.features.pack import load_pack, save_pack
    from saereward.features.scoring import PackScorer, pack_scores_from_pooled, pooled_sae_acts
    from saereward.rollouts import load_rollouts
    from saereward.sae.formats import check_sae_matches_model, load_sae

    pack = load_pack(cfg.pack)
    ro = load_rollouts(cfg.rollouts)
    sae_path = cfg.sae or pack.metadata.get("sae_path")
    if not sae_path:
        raise SaeRewardError(f"pack {cfg.pack} records no SAE path: pass --sae")
    sae = load_sae(sae_path)
    layer = cfg.layer if cfg.layer is not None else pack.layer
    layer = resolve_sae_layer(sae, layer, ro)
    d_model = int(ro.summary["d_model"])
    check_sae_matches_model(sae, d_model, layer)
    scorer = PackScorer(sae, pack, d_model=d_model)

    val = ro.split_mask(cfg.split)
    disc = ro.split_mask("discovery") if cfg.split != "discovery" else ~val
    correct = ro.correct
    val_q = {r["qid"] for r, m in zip(ro.rows, val.tolist(), strict=True) if m}
    leak_check = "not checked (the pack records no discovery question ids)"
    if pack.metadata.get("discovery_qids") is not None:
        leaked = val_q & set(pack.metadata["discovery_qids"])
        if leaked:
            raise SaeRewardError(
                f"{len(leaked)} of the {len(val_q)} {cfg.split} questions were used to discover this pack "
                f"(e.g. {sorted(leaked)[:3]}): validate on questions discovery never saw"
            )
        leak_check = "passed: no validation question was used in discovery"
    n_c, n_w = require_both_outcomes(
        correct[val], f"the {cfg.split} split", "raise n/samples or use a task with a mix of outcomes"
    )
    require_both_outcomes(correct[disc], "the discovery split", "raise n/samples")
    y_val = correct[val].numpy()
    idx_val = torch.nonzero(val).flatten().tolist()

    # -- the pack: per-token scores pooled per response, the RL reward's code path ----------------
    tokens = ro.tokens.get(layer)
    if tokens is None:
        raise SaeRewardError(
            f"rollouts kept per-token residuals for layers {sorted(ro.tokens)}, not the pack's layer {layer}: "
            f"re-run `saereward rollouts --token-layers {layer}`"
        )
    pack_score = scorer.response_scores(tokens, ro.offsets)[val].numpy()
    methods: dict[str, dict[str, Any]] = {}
    methods["pack"] = association(pack_score, y_val, n_boot=cfg.n_boot, seed=cfg.seed)
    methods["pack"]["n_features"] = len(pack)

    # -- raw contrastive direction and probe at the layer map's peak --------------------------------
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
    v = contrastive_direction(x_disc, correct[disc])
    methods["raw_direction"] = association((x_val @ v).numpy(), y_val, n_boot=cfg.n_boot, seed=cfg.seed)
    methods["raw_direction"]["layer"] = base_layer
    probe_score, probe_info = _probe_scores(
        x_disc.double().numpy(), correct[disc].numpy(), x_val.double().numpy(), cfg.seed
    )
    methods["probe"] = association(probe_score, y_val, n_boot=cfg.n_boot, seed=cfg.seed)
    methods["probe"].update({"layer": base_layer, **probe_info})

    # -- random packs ---------------------------------------------------------------------------------
    if cfg.n_random:
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
        from scipy.stats import spearmanr

        for _ in range(cfg.n_random):
            pick = pool[torch.randperm(len(pool), generator=gen)[: nh + nm]].tolist()
            sc = pack_scores_from_pooled(pv, pick, [1.0] * nh + [-1.0] * nm).numpy()
            rhos.append(float(spearmanr(sc, y_val).statistic) if np.ptp(sc) > 0 else 0.0)
        r = np.nan_to_num(np.asarray(rhos))
        rho_pack = methods["pack"]["spearman_rho"]
        methods["random_packs"] = {
            "n_packs": cfg.n_random,
            "features_per_pack": [nh, nm],
            "min_active_frac": frac,
            "eligible_features": len(pool),
            "median_rho": float(np.median(r)),
            "rho_range_95": [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))],
            "share_ge_pack": float(np.mean(r >= rho_pack)) if np.isfinite(rho_pack) else None,
        }

    thresholds = {"excellent": cfg.excellent, "passing": cfg.passing, "weak": cfg.weak}
    rho = methods["pack"]["spearman_rho"]
    result: dict[str, Any] = {
        "gate": "G1",
        "verdict": verdict(rho, cfg.excellent, cfg.passing, cfg.weak),
        "statistic": "Spearman rho of the pack score vs correctness",
        "thresholds": thresholds,
        "split": cfg.split,
        "n_responses": int(val.sum()),
        "n_questions": len(val_q),
        "n_correct": n_c,
        "n_wrong": n_w,
        "seed": cfg.seed,
        "layer": layer,
        "pack": str(Path(cfg.pack).resolve()),
        "pack_name": pack.name,
        "pack_format": pack.source_format,
        "sae": str(sae_path),
        "rollouts": str(Path(cfg.rollouts).resolve()),
        "leak_check": leak_check,
        "layer_map_discovery": {str(k): round(s, 6) for k, s in scores_by_layer.items()},
        "methods": methods,
        "config": to_dict(cfg),
        "saereward_version": __version__,
    }
    out = Path(cfg.out) if cfg.out else Path(cfg.pack).with_name("gate_g1.json")
    write_json(out, result)
    if cfg.update_pack:
        m = methods["pack"]
        pack.validation = {
            "n_questions": len(val_q),
            "n_responses": int(val.sum()),
            "n_correct": n_c,
            "spearman_rho": m["spearman_rho"],
            "spearman_p": m["spearman_p"],
            "spearman_rho_ci95": m["rho_ci"],
            "pearson_r": m["pearson_r"],
            "auroc": m["auroc"],
            "pass_threshold": cfg.passing,
            "verdict": result["verdict"],
            "split": cfg.split,
            "seed": cfg.seed,
            "gate_file": str(out.resolve()),
        }
        passed = result["verdict"].startswith("PASS")
        pack.helpful = [_validated(f, passed) for f in pack.helpful]
        pack.harmful = [_validated(f, passed) for f in pack.harmful]
        save_pack(pack, cfg.pack)
    return result


def _validated(f: Any, ok: bool) -> Any:
    from dataclasses import replace

    return replace(f, validated=ok)


def format_g1(result: dict[str, Any]) -> str:
    """The G1 table: one row per method, CIs included."""
    m = result["methods"]
    lines = [
        f"Stage Gate 1 on {result['split']}: n={result['n_responses']} responses ({result['n_questions']} questions, "
        f"{result['n_correct']} correct), seed {result['seed']}, layer {result['layer']}",
        f"{'method':16} {'rho':>7} {'95% CI':>17} {'p':>9} {'pearson':>8} {'AUROC':>6} {'95% CI':>15}",
    ]
    for key, label in (
        ("pack", "SAE pack"),
        ("raw_direction", f"raw dir L{m['raw_direction']['layer']}"),
        ("probe", f"probe L{m['probe']['layer']}"),
    ):
        a = m[key]
        lines.append(
            f"{label:16} {a['spearman_rho']:>7.3f} [{a['rho_ci'][0]:>6.3f}, {a['rho_ci'][1]:>6.3f}] "
            f"{a['spearman_p']:>9.2g} {a['pearson_r']:>8.3f} {a['auroc']:>6.3f} "
            f"[{a['auroc_ci'][0]:.3f}, {a['auroc_ci'][1]:.3f}]"
        )
    if "random_packs" in m:
        r = m["random_packs"]
        share = "n/a" if r["share_ge_pack"] is None else f"{r['share_ge_pack']:.3f}"
        lines.append(
            f"{'random packs':16} {r['median_rho']:>7.3f} [{r['rho_range_95'][0]:>6.3f}, {r['rho_range_95'][1]:>6.3f}]"
            f"  (median and 95% range of {r['n_packs']} packs; share >= pack: {share})"
        )
    lines.append(f"verdict: {result['verdict']}  (thresholds {result['thresholds']})")
    return "\n".join(lines)
