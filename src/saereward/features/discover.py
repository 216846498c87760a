"""Contrastive discovery: which SAE features separate correct from wrong responses.

Per response, the mean over its response tokens of the SAE's true-TopK activations
(:func:`saereward.features.scoring.pooled_sae_acts`); per feature, Cohen's d between the correct
and the wrong responses of the **discovery split only**:

    d = (mean_c − mean_w) / sqrt((var_c + var_w) / 2)        (var with ddof = 1)

with d = 0 for a feature that is never active (and for one whose pooled SD is 0). Features active
(pooled activation > 0) in fewer than ``min_active_frac`` of the discovery responses are dropped
first: with a few hundred responses, a feature that fires on three of them gets a large |d| by
chance. The top ``top_n`` by d are helpful (+1), the bottom ``top_n`` harmful (−1).

The pack records the SAE (path and sha256), the rollouts and the discovery/validation question ids,
so :mod:`saereward.gates.g1_correlation` can check that it validates on questions discovery never saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saereward import __version__
from saereward.config import option, to_dict
from saereward.data.rollouts import load_rollouts
from saereward.errors import SaeRewardError
from saereward.features.baseline import baseline_beside, measure_baseline, save_baseline
from saereward.features.pack import Feature, FeaturePack, beside, save_pack
from saereward.features.scoring import PackScorer, pooled_sae_acts
from saereward.io import file_sha256, write_json
from saereward.model.lm import load_tokenizer
from saereward.sae.formats import check_sae_matches_model, load_sae, sae_weights_sha256, warn_other_model
from saereward.stats import cohens_d, require_both_outcomes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """Discovery result: d for every feature and the chosen helpful/harmful features."""

    d: Tensor  #: [d_sae]
    mean_correct: Tensor  #: [d_sae]
    mean_wrong: Tensor  #: [d_sae]
    active_frac: Tensor  #: [d_sae]
    eligible: Tensor  #: [d_sae] bool, passed the activity filter
    helpful: list[int]
    harmful: list[int]


def select_features(pooled: Tensor, correct: Tensor, top_n: int, min_active_frac: float) -> Selection:
    """Cohen's d per feature on ``pooled [R, d_sae]`` with outcomes ``correct [R]``; top/bottom ``top_n``."""
    correct = correct.bool()
    xc, xw = pooled[correct], pooled[~correct]
    d = cohens_d(xc, xw)
    active = (pooled > 0).float().mean(0)
    eligible = (active >= min_active_frac) & (active > 0)
    d = torch.where(pooled.amax(0) > 0, d, torch.zeros_like(d))
    n_el = int(eligible.sum())
    if n_el == 0:
        raise SaeRewardError(
            f"no feature is active in >= {min_active_frac:.1%} of the discovery responses: lower min_active_frac"
        )
    n = min(top_n, n_el // 2) if n_el < 2 * top_n else top_n
    masked_hi = torch.where(eligible, d, torch.full_like(d, -torch.inf))
    masked_lo = torch.where(eligible, d, torch.full_like(d, torch.inf))
    helpful = [int(i) for i in torch.argsort(masked_hi, descending=True, stable=True)[:n] if masked_hi[i] > 0]
    harmful = [int(i) for i in torch.argsort(masked_lo, stable=True)[:n] if masked_lo[i] < 0]
    return Selection(d, xc.mean(0), xw.mean(0), active, eligible, helpful, harmful)


@dataclass(frozen=True)
class DiscoverConfig:
    """Settings of ``saereward discover``."""

    rollouts: str = option("runs/rollouts", "folder written by `saereward rollouts`")
    sae: str = option("runs/sae/sae", "SAE (native, SAELens, sparsify folder or mechreward .pt)")
    layer: int | None = option(None, "layer the SAE reads (default: the SAE's recorded layer)")
    top_n: int = option(10, "helpful and harmful features to keep (each)")
    min_active_frac: float = option(
        0.05, "drop features active in fewer than this fraction of discovery responses"
    )
    name: str = option("contrastive", "pack name")
    out: str = option("runs/pack.json", "pack JSON to write")

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {self.top_n}")
        if not 0.0 <= self.min_active_frac < 1.0:
            raise ValueError(f"min_active_frac must be in [0, 1), got {self.min_active_frac}")


def resolve_sae_layer(sae: Any, layer: int | None, rollouts: Any) -> int:
    """The layer to read: explicit, else the SAE's recorded layer, else the rollouts' only token layer."""
    if layer is None:
        layer = sae.cfg.layer
    if layer is None:
        if len(rollouts.tokens) == 1:
            return next(iter(rollouts.tokens))
        raise SaeRewardError("the SAE does not record its layer: pass --layer")
    return int(layer)


def run_discover(cfg: DiscoverConfig) -> FeaturePack:
    """Discover a pack on the discovery split of ``cfg.rollouts`` and write it to ``cfg.out``."""
    ro = load_rollouts(cfg.rollouts)
    sae = load_sae(cfg.sae)
    layer = resolve_sae_layer(sae, cfg.layer, ro)
    # a layer the rollouts lack is the error to report, before any warning about the SAE's layer
    tokens = ro.layer_tokens(layer, "--layer" if cfg.layer is not None else "the SAE's layer")
    check_sae_matches_model(sae, int(ro.summary["d_model"]), layer)
    warn_other_model(f"SAE {cfg.sae}", sae.cfg.model, ro.summary.get("model"))
    pooled = pooled_sae_acts(sae, tokens, ro.offsets)
    disc = ro.split_mask("discovery")
    correct = ro.correct
    n_c, n_w = require_both_outcomes(
        correct[disc],
        "the discovery split",
        "use a task/prompt where the model is sometimes right and sometimes wrong, or raise n/samples",
    )
    sel = select_features(pooled[disc], correct[disc], cfg.top_n, cfg.min_active_frac)

    def feat(i: int, w: float) -> Feature:
        return Feature(
            feature_id=i,
            weight=w,
            effect_size=round(float(sel.d[i]), 6),
            mean_correct=round(float(sel.mean_correct[i]), 6),
            mean_wrong=round(float(sel.mean_wrong[i]), 6),
            validated=False,
            active_frac=round(float(sel.active_frac[i]), 6),
        )

    splits = {s: sorted({r["qid"] for r in ro.rows if r["split"] == s}) for s in ("discovery", "validation")}
    pack = FeaturePack(
        name=cfg.name,
        helpful=[feat(i, 1.0) for i in sel.helpful],
        harmful=[feat(i, -1.0) for i in sel.harmful],
        layer=layer,
        model_name=ro.summary.get("model"),
        sae_id=str(Path(cfg.sae)),
        description=(
            f"Contrastive SAE features (Cohen's d, true TopK, pooled over response tokens) on "
            f"{ro.summary.get('task', {}).get('name', '?')}: {n_c} correct vs {n_w} wrong discovery responses"
        ),
        metadata={
            "d_model": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "k": sae.cfg.k,
            "num_hidden_layers": ro.summary.get("num_layers"),
            # relative to the pack's folder, so a moved or copied run reads its own SAE and rollouts
            "sae_path": beside(cfg.sae, cfg.out),
            "sae_sha256": file_sha256(cfg.sae),
            "sae_weights_sha256": sae_weights_sha256(cfg.sae),
            "rollouts": beside(cfg.rollouts, cfg.out),
            "task": (ro.summary.get("task") or {}).get("name"),
            "prompt_format": ro.generation.get("prompt_format"),
            "generation": ro.generation,
            "discovery_qids": splits["discovery"],
            "validation_qids": splits["validation"],
            "stats": {
                "n_responses": int(disc.sum()),
                "n_correct": n_c,
                "n_wrong": n_w,
                "n_eligible_features": int(sel.eligible.sum()),
                "min_active_frac": cfg.min_active_frac,
                "top_n": cfg.top_n,
                "max_abs_d": round(float(sel.d[sel.eligible].abs().max()), 6),
            },
            "config": to_dict(cfg),
            "saereward_version": __version__,
        },
    )
    out = save_pack(pack, cfg.out)
    write_json(Path(out).with_suffix(".config.json"), to_dict(cfg))
    _save_reward_baseline(pack, sae, ro, layer, Path(out))
    log.info("wrote pack %s: %d helpful, %d harmful", out, len(pack.helpful), len(pack.harmful))
    return pack


def _save_reward_baseline(pack: FeaturePack, sae: Any, ro: Any, layer: int, out: Path) -> None:
    """The pack's score on the discovery rollouts, position by position, beside the pack: the
    baseline of the fixed-scale reward forms (:mod:`saereward.features.baseline`)."""
    try:
        tok = load_tokenizer(ro.summary.get("model") or "embedded:smollm2-135m-instruct")
    except SaeRewardError as exc:  # train-rl measures it itself, with the model's own tokenizer
        log.warning("no reward baseline beside the pack: %s", exc)
        return
    b = measure_baseline(PackScorer(sae, pack), ro, layer, tok, meta={"scorer": f"pack:{pack.name}"})
    save_baseline(b, baseline_beside(out))


def format_pack(pack: FeaturePack, n: int = 10) -> str:
    """A short table of a pack's strongest features."""
    lines = [
        f"pack {pack.name!r}: {len(pack.helpful)} helpful, {len(pack.harmful)} harmful (layer {pack.layer})"
    ]
    lines.append(f"{'role':8} {'feature':>8} {'d':>8} {'mean_c':>9} {'mean_w':>9} {'active':>7}")
    for role, feats in (("helpful", pack.helpful), ("harmful", pack.harmful)):
        for f in feats[:n]:
            lines.append(
                f"{role:8} {f.feature_id:>8} {f.effect_size or 0:>8.3f} {f.mean_correct or 0:>9.4f} "
                f"{f.mean_wrong or 0:>9.4f} {f.active_frac or 0:>7.2%}"
            )
    return "\n".join(lines)
