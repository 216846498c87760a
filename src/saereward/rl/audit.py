"""Truncation audit: can a reward form be won by stopping early, or by padding?

Residuals are causal: the first ``k`` tokens of a completion have exactly the residuals (and so the
per-token scores) they have inside the whole completion. Cutting a completion after ``k`` tokens is
therefore an exact counterfactual for any reward computed from the scores, with no forward pass.
For every form of :mod:`saereward.rl.reward` this module measures, on real rollouts,

* the expected change of the form's mechanistic reward ``M_b`` when each completion longer than
  ``k`` is cut after its ``k``-th token (``k`` in ``cuts``): a cut completion has no end token;
* the change from padding: ``pad`` extra loss positions after the end that carry no score (what a
  batch's padding or extra end tokens add);

in units of ``σ``, the SD over completions of the form's whole reward ``o_b + M_b`` (and, as
``gain_sigma_mech``, of ``M_b`` alone: a stricter unit that shows a small bias). A form whose
best gain from cutting exceeds ``warn_sigma`` (0.1 σ) pays the policy to stop early: ``gate-g2``
warns and refuses it a PASS. The baseline of the fixed-scale forms is measured on the discovery
split and the audit runs on the validation split, so the position means are not fitted to the
very completions they are audited on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saereward import __version__, plots
from saereward.config import option, to_dict
from saereward.data.rollouts import load_rollouts
from saereward.errors import SaeRewardError
from saereward.features.baseline import RewardBaseline, measure_baseline, scored_rows
from saereward.features.pack import check_pack_sae, load_pack
from saereward.features.scoring import PackScorer
from saereward.io import check_writable, write_json
from saereward.model.lm import load_tokenizer
from saereward.rl.reward import REWARD_FORMS, completion_mech_reward
from saereward.sae.formats import load_sae, warn_other_model
from saereward.stats import percentile_ci, resample_indices

log = logging.getLogger(__name__)


def _mech_mask(form: str, full: Tensor, scored: Tensor) -> Tensor:
    """mechreward scores every position with a residual (its own form); the others leave ends out."""
    return full if form == "mechreward" else scored


def truncation_gains(
    form: str,
    mech: Tensor,
    full: Tensor,
    scored: Tensor,
    outcome: Tensor,
    lam: float,
    baseline: RewardBaseline | None,
    cuts: Sequence[int] = (1, 2, 5, 10, 20),
    pad: int = 8,
    clip: float = 3.0,
    resamples: Sequence[np.ndarray] = (),
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Gains of one form from cutting after ``k`` tokens and from padding (pure; see the module doc).

    ``mech [B, T]`` per-token scores, ``full [B, T]`` the response positions with a residual,
    ``scored [B, T]`` those minus end/stop tokens, ``outcome [B]`` 0/1. Returns the gains in reward
    units and in σ units, with the number of completions each cut applies to. With ``resamples``
    (bootstrap index matrices, :func:`saereward.stats.resample_indices`) each gain in σ also gets a
    percentile CI (``gain_sigma_ci``) at ``confidence``: the gain and σ recomputed on every resample.
    """
    B, T = mech.shape
    pos = torch.arange(T + pad, device=mech.device).expand(B, T + pad)
    mech_p = torch.nn.functional.pad(mech.float(), (0, pad))
    full_p = torch.nn.functional.pad(full, (0, pad))
    scored_p = torch.nn.functional.pad(scored, (0, pad))
    mask = _mech_mask(form, full_p, scored_p)
    M = completion_mech_reward(form, mech_p, mask, lam, baseline, clip, loss_mask=full_p)
    total = (outcome.double().to(M.device) + M.double()).cpu().numpy()
    sigma = float(total.std())
    sigma_mech = float(M.double().std(unbiased=False))  # the mech term's own spread (stricter unit)
    lengths = full.sum(1)
    rows: dict[str, Any] = {}
    for k in cuts:
        keep = lengths > k
        n = int(keep.sum())
        if n == 0:
            rows[str(k)] = {"n": 0, "gain": None, "gain_sigma": None}
            continue
        cut = pos < k
        Mk = completion_mech_reward(form, mech_p, mask & cut, lam, baseline, clip, loss_mask=full_p & cut)
        gain = float((Mk - M)[keep].mean())
        rows[str(k)] = {
            "n": n,
            "gain": gain,
            "gain_sigma": _in_sigma(gain, sigma),
            "gain_sigma_ci": _gain_sigma_ci(Mk - M, keep, total, resamples, confidence),
            "gain_sigma_mech": _in_sigma(gain, sigma_mech),
        }
    last = torch.where(full_p, pos, torch.full_like(pos, -1)).max(1).values
    padded = full_p | ((pos > last[:, None]) & (pos <= last[:, None] + pad))
    Mp = completion_mech_reward(form, mech_p, mask, lam, baseline, clip, loss_mask=padded)
    pad_gain = float((Mp - M).mean())
    pad_ci = _gain_sigma_ci(Mp - M, torch.ones(B, dtype=torch.bool), total, resamples, confidence)
    gains = [r["gain_sigma"] for r in rows.values() if r["gain_sigma"] is not None]
    return {
        "sigma": sigma,
        "mech_mean": float(M.mean()),
        "mech_sd": float(M.std(unbiased=False)),
        "cut": rows,
        "pad": {
            "tokens": pad,
            "gain": pad_gain,
            "gain_sigma": _in_sigma(pad_gain, sigma),
            "gain_sigma_ci": pad_ci,
        },
        "max_cut_gain_sigma": max(gains) if gains else None,
    }


def _gain_sigma_ci(
    diff: Tensor, keep: Tensor, total: np.ndarray, resamples: Sequence[np.ndarray], confidence: float
) -> list[float] | None:
    """Percentile CI of ``mean(diff[keep]) / σ(total)`` over the bootstrap ``resamples`` (index
    matrices ``[B_k, L]``); None without resamples. A resample with no kept completion is dropped."""
    if not len(resamples):
        return None
    d = diff.double().cpu().numpy()
    kp = keep.cpu().numpy().astype(np.float64)
    ratios = []
    for idx in resamples:
        n_kept = kp[idx].sum(1)
        gain = (d[idx] * kp[idx]).sum(1) / np.where(n_kept > 0, n_kept, np.nan)
        sigma = np.maximum(total[idx].std(1), 1e-6)
        ratios.append(np.where(np.abs(gain) < 1e-7, 0.0, gain / sigma))
    return list(percentile_ci(np.concatenate(ratios), confidence))


def _in_sigma(gain: float, sigma: float) -> float:
    """``gain / σ``; float rounding (|gain| < 1e-7) is 0, and σ is floored so that a constant reward
    cannot turn rounding into a large ratio."""
    if abs(gain) < 1e-7:
        return 0.0
    return gain / max(sigma, 1e-6)


@dataclass(frozen=True)
class AuditConfig:
    """Settings of ``saereward audit-reward``."""

    rollouts: str = option("runs/rollouts", "rollout folder (base model, per-token residuals at the layer)")
    pack: str = option("runs/pack.json", "feature pack whose per-token score is audited")
    sae: str | None = option(None, "SAE of the pack (default: the pack's recorded sae_path)")
    layer: int | None = option(None, "layer (default: the pack's)")
    model: str | None = option(None, "model whose tokenizer finds end/stop tokens (default: the rollouts')")
    forms: tuple[str, ...] = option(tuple(REWARD_FORMS), "reward forms to audit")
    lam: float = option(0.1, "λ of the mech term")
    clip: float = option(3.0, "clip of the fixed-scale forms, in reference SDs")
    cuts: tuple[int, ...] = option((1, 2, 5, 10, 20), "cut each completion after k tokens, for each k")
    pad: int = option(8, "unscored loss positions appended for the padding check")
    warn_sigma: float = option(0.1, "a form whose gain from cutting exceeds this many σ is flagged")
    n_boot: int = option(1000, "bootstrap resamples (by question) for the gains' CIs; 0 for none")
    seed: int = option(0, "seed of the bootstrap")
    confidence: float = option(0.95, "confidence level of the CIs")
    out: str = option("runs/audit", "folder for audit.json and audit.png")

    def __post_init__(self) -> None:
        bad = [f for f in self.forms if f not in REWARD_FORMS]
        if bad:
            raise ValueError(f"unknown reward form(s) {bad}: choose from {', '.join(REWARD_FORMS)}")
        if not self.cuts or min(self.cuts) < 1:
            raise ValueError("cuts must be positive token counts")
        if self.pad < 0 or self.lam < 0 or self.clip <= 0:
            raise ValueError("pad and lam must be >= 0, clip > 0")
        if self.n_boot < 0 or not 0 < self.confidence < 1:
            raise ValueError("n_boot must be >= 0 and confidence in (0, 1)")


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Audit every form in ``cfg.forms`` on the validation split of ``cfg.rollouts``; write JSON + plot."""
    ro = load_rollouts(cfg.rollouts)
    pack = load_pack(cfg.pack)
    out = Path(cfg.out)
    check_writable(out)  # an unwritable output fails before the work; the folder comes with the results
    sae_path = cfg.sae or pack.metadata.get("sae_path")
    if not sae_path:
        raise SaeRewardError(f"pack {cfg.pack} records no SAE: pass --sae")
    check_pack_sae(pack, sae_path)
    scorer = PackScorer(load_sae(sae_path), pack)
    warn_other_model(f"pack {cfg.pack}", pack.model_name, ro.summary.get("model"))
    layer = cfg.layer if cfg.layer is not None else pack.layer
    if layer is None:
        raise SaeRewardError("the pack records no layer: pass --layer")
    tok = load_tokenizer(cfg.model or ro.summary.get("model") or "embedded:smollm2-135m-instruct")
    baseline = measure_baseline(
        scorer, ro, layer, tok, split="discovery", meta={"scorer": f"pack:{pack.name}"}
    )
    rows = [i for i, r in enumerate(ro.rows) if r.get("split") == "validation"] or list(range(len(ro.rows)))
    mech, full, scored = scored_rows(scorer, ro, layer, tok, rows)
    outcome = torch.tensor([float(ro.rows[i]["correct"]) for i in rows])
    all_questions = ro.questions
    questions = [all_questions[i] for i in rows]
    boot = resample_indices(len(rows), questions, cfg.n_boot, cfg.seed) if cfg.n_boot else []
    forms = {
        f: truncation_gains(
            f,
            mech,
            full,
            scored,
            outcome,
            cfg.lam,
            baseline,
            cfg.cuts,
            cfg.pad,
            cfg.clip,
            boot,
            cfg.confidence,
        )
        for f in cfg.forms
    }
    for r in forms.values():
        worst = r["max_cut_gain_sigma"]
        r["warn"] = bool(worst is not None and worst > cfg.warn_sigma)
    profile = baseline_profile(mech, scored)
    result = {
        "n_completions": len(rows),
        "n_questions": len(set(questions)),
        "bootstrap": {
            "unit": "question",
            "n_boot": cfg.n_boot,
            "seed": cfg.seed,
            "confidence": cfg.confidence,
        },
        "split": "validation",
        "layer": layer,
        "lam": cfg.lam,
        "warn_sigma": cfg.warn_sigma,
        "position_profile": profile,
        "baseline": baseline.to_dict(),
        "forms": forms,
        "config": to_dict(cfg),
        "saereward_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "audit.json", result)
    plots.save_png(plots.truncation_audit(forms, cfg.warn_sigma, len(rows), profile), out / "audit.png")
    return result


def baseline_profile(mech: Tensor, scored: Tensor, upto: int = 30) -> list[float | None]:
    """Mean score at each response position ``0 .. upto−1`` (None where no completion reaches it)."""
    out: list[float | None] = []
    for t in range(min(upto, mech.shape[1])):
        m = scored[:, t]
        out.append(float(mech[m, t].mean()) if m.any() else None)
    return out


def format_audit(result: dict[str, Any]) -> str:
    cuts = list(next(iter(result["forms"].values()))["cut"])
    boot = result.get("bootstrap") or {}
    pct = f"{100 * boot.get('confidence', 0.95):g} %"
    lines = [
        f"truncation audit: gain of each form's reward from cutting after k tokens, in σ "
        f"(n={result['n_completions']} {result['split']} completions, λ {result['lam']})",
        f"{'form':12} "
        + " ".join(f"{'k=' + k:>8}" for k in cuts)
        + f" {'pad':>8}  {'best cut [' + pct + ' CI]':>26}  flag",
    ]
    for form, r in result["forms"].items():
        cells = " ".join(
            f"{'-':>8}" if v["gain_sigma"] is None else f"{v['gain_sigma']:>+8.3f}" for v in r["cut"].values()
        )
        flag = f"WARN: > {result['warn_sigma']} σ" if r["warn"] else "ok"
        lines.append(f"{form:12} {cells} {r['pad']['gain_sigma']:>+8.3f}  {_best_cut(r):>26}  {flag}")
    if boot.get("n_boot"):
        lines.append(
            f"CIs: bootstrap over {result.get('n_questions', '?')} questions, {boot['n_boot']} resamples, "
            f"seed {boot['seed']}"
        )
    return "\n".join(lines)


def _best_cut(form: dict[str, Any]) -> str:
    """The cut with the largest gain in σ, as ``k=K +g [lo, hi]`` (no CI without a bootstrap)."""
    cuts = [(k, v) for k, v in form["cut"].items() if v["gain_sigma"] is not None]
    if not cuts:
        return "-"
    k, v = max(cuts, key=lambda kv: kv[1]["gain_sigma"])
    ci = v.get("gain_sigma_ci")
    text = f"k={k} {v['gain_sigma']:+.3f}"
    return text if not ci else f"{text} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
