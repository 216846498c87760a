"""``saereward probe``: fit a linear probe on residuals for the dual verifier of the RL reward.

One fitting routine (:func:`saereward.features.probe.fit_logistic`): standardized logistic regression whose L2 strength is
picked by stratified k-fold cross-validation on AUROC (scikit-learn ``LogisticRegressionCV``). Gate
G1 uses it as a baseline; ``saereward probe`` fits it on the discovery split of a rollout folder
(pooled response residuals at one layer), reports its held-out AUROC on the validation split, and
saves it as a :class:`~saereward.features.probe.LinearProbe` (safetensors + JSON) for the dual verifier.

**Dual verifier** (:func:`saereward.rl.reward.dual_gate`, mechreward's notebook rule). During RL the probe is applied to
every response token's residual at the reward layer (the same residuals the pack reads, so no extra
forward). Both per-token signals, the pack's ``mech(t)`` and the probe's logit, are z-scored over the
batch's response tokens; a token keeps its ``λ·z(mech(t))`` term only where the two z-scores have
the same sign (both say "better than average here" or both "worse"). Where they disagree the
token's mech term is set to 0. The fraction of zeroed tokens is logged as ``gated_frac``. A policy
that learns to light the pack's features without moving the independent probe gains nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saereward import __version__
from saereward.config import option, to_dict
from saereward.data.rollouts import load_rollouts
from saereward.errors import SaeRewardError
from saereward.features.pack import load_pack
from saereward.features.probe import LinearProbe, fit_logistic
from saereward.stats import association, require_both_outcomes

__all__ = ["ProbeConfig", "run_probe"]


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of ``saereward probe``."""

    rollouts: str = option("runs/rollouts", "folder written by `saereward rollouts`")
    layer: int | None = option(None, "layer of the pooled residuals (default: the pack's layer with --pack)")
    pack: str | None = option(None, "feature pack whose layer the probe should read (the RL reward layer)")
    seed: int = option(0, "seed for the CV folds and the bootstrap")
    n_boot: int = option(2000, "bootstrap resamples for the AUROC CI")
    out: str = option("runs/probe.safetensors", "probe file (a .json sidecar is written beside it)")

    def __post_init__(self) -> None:
        if not str(self.out).endswith(".safetensors"):
            raise ValueError(
                f"out {self.out!r}: the probe is a .safetensors file; pass --out NAME.safetensors"
            )
        if self.n_boot < 100:
            raise ValueError(f"n_boot must be >= 100 for a bootstrap CI, got {self.n_boot}")


def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Fit on discovery, report held-out AUROC on validation, save the probe; returns the report."""
    layer = cfg.layer
    if layer is None and cfg.pack:
        layer = load_pack(cfg.pack).layer
    if layer is None:
        raise SaeRewardError("which layer? pass --layer, or --pack to use the pack's layer")
    ro = load_rollouts(cfg.rollouts)
    if layer not in ro.pooled:
        raise SaeRewardError(
            f"layer {layer} was not captured in {cfg.rollouts}: use one of {sorted(ro.pooled)}"
        )
    disc, val = ro.split_mask("discovery"), ro.split_mask("validation")
    y = ro.correct
    require_both_outcomes(y[disc], "the discovery split", "raise n/samples")
    require_both_outcomes(y[val], "the validation split", "raise n/samples")
    x = ro.pooled[layer].float().numpy()
    clf, info = fit_logistic(x[disc.numpy()], y[disc].numpy(), cfg.seed)
    assoc = association(
        clf.decision_function(x[val.numpy()]), y[val].numpy(), n_boot=cfg.n_boot, seed=cfg.seed
    )
    report = {
        "layer": layer,
        "model": ro.summary.get("model"),
        "d_model": int(x.shape[1]),
        "n_train": int(disc.sum()),
        "heldout": {
            k: assoc[k]
            for k in ("n", "n_correct", "auroc", "auroc_ci", "spearman_rho", "rho_ci", "confidence", "n_boot")
        },
        "fit": info,
        "seed": cfg.seed,
        "rollouts": str(cfg.rollouts),
        "config": to_dict(cfg),
        "saereward_version": __version__,
    }
    probe = LinearProbe.from_pipeline(clf, layer, {k: v for k, v in report.items() if k != "layer"})
    probe.save(cfg.out)
    return report
