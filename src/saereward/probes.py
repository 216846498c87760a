"""Linear probes on residuals: the G1 baseline and the dual verifier of the RL reward.

One fitting routine (:func:`fit_logistic`): standardized logistic regression whose L2 strength is
picked by stratified k-fold cross-validation on AUROC (scikit-learn ``LogisticRegressionCV``). Gate
G1 uses it as a baseline; ``saereward probe`` fits it on the discovery split of a rollout folder
(pooled response residuals at one layer), reports its held-out AUROC on the validation split, and
saves it as a :class:`LinearProbe` (safetensors + JSON) for the dual verifier.

**Dual verifier** (:func:`dual_gate`, the seed's notebook rule). During RL the probe is applied to
every response token's residual at the reward layer (the same residuals the pack reads, so no extra
forward). Both per-token signals, the pack's ``mech(t)`` and the probe's logit, are z-scored over the
batch's response tokens; a token keeps its ``λ·z(mech(t))`` term only where the two z-scores have
the same sign (both say "better than average here" or both "worse"). Where they disagree the
token's mech term is set to 0. The fraction of zeroed tokens is logged as ``gated_frac``. A policy
that learns to light the pack's features without moving the independent probe gains nothing there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saereward import __version__
from saereward.config import option, to_dict
from saereward.errors import SaeRewardError
from saereward.io import write_json

__all__ = [
    "LinearProbe",
    "ProbeConfig",
    "dual_gate",
    "fit_logistic",
    "load_probe",
    "run_probe",
]


def fit_logistic(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[Any, dict[str, Any]]:
    """Fit the standardized, CV-regularised logistic regression; returns (sklearn pipeline, info)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(5, y.sum(), (1 - y).sum()))
    if folds < 2:
        raise SaeRewardError("the probe needs >= 2 correct and >= 2 wrong responses to fit: raise n")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=cv, scoring="roc_auc", max_iter=5000),
    )
    clf.fit(x, y.astype(int))
    lr = clf[-1]
    return clf, {
        "C": float(lr.C_[0]),
        "cv_folds": folds,
        "cv_auroc_discovery": float(np.max(np.mean(lr.scores_[1], axis=0))),
    }


@dataclass
class LinearProbe:
    """``logit(x) = w · (x − mean) / scale + b`` on residuals of ``layer``; ``x [..., d] -> [...]``."""

    w: Tensor
    b: float
    mean: Tensor
    scale: Tensor
    layer: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pipeline(cls, clf: Any, layer: int, metadata: dict[str, Any]) -> LinearProbe:
        sc, lr = clf[0], clf[-1]
        return cls(
            w=torch.as_tensor(lr.coef_[0], dtype=torch.float32),
            b=float(lr.intercept_[0]),
            mean=torch.as_tensor(sc.mean_, dtype=torch.float32),
            scale=torch.as_tensor(sc.scale_, dtype=torch.float32),
            layer=layer,
            metadata=metadata,
        )

    @property
    def d_model(self) -> int:
        return int(self.w.numel())

    def logits(self, x: Tensor) -> Tensor:
        x = x.float()
        return ((x - self.mean.to(x.device)) / self.scale.to(x.device)) @ self.w.to(x.device) + self.b

    def save(self, path: str | Path) -> Path:
        """``<path>`` (safetensors: w, mean, scale, bias) + ``<path>.json`` (layer, metadata); atomic."""
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tensors = {"w": self.w, "mean": self.mean, "scale": self.scale, "bias": torch.tensor([self.b])}
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "saereward-probe"}
        )
        tmp.replace(p)
        write_json(p.with_name(p.name + ".json"), {"layer": self.layer, **self.metadata})
        return p


def load_probe(path: str | Path) -> LinearProbe:
    """Read a probe written by :meth:`LinearProbe.save`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    side = p.with_name(p.name + ".json")
    if not p.is_file() or not side.is_file():
        raise SaeRewardError(f"no probe at {p} (needs {p.name} and {side.name}): run `saereward probe` first")
    try:
        t = load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise SaeRewardError(f"cannot read probe {p}: {exc}; re-run `saereward probe`") from None
    meta = json.loads(side.read_text())
    if not {"w", "mean", "scale", "bias"} <= set(t) or "layer" not in meta:
        raise SaeRewardError(f"{p} is not a saereward probe: re-run `saereward probe`")
    layer = int(meta.pop("layer"))
    return LinearProbe(t["w"], float(t["bias"][0]), t["mean"], t["scale"], layer, meta)


def dual_gate(mech: Tensor, probe_logit: Tensor, mask: Tensor) -> Tensor:
    """``[B, T]`` bool: response tokens where z(mech) and z(probe logit) share a sign (see module doc).

    Positions outside ``mask`` are False. A z-score of exactly 0 agrees with nothing.
    """
    from saereward.rl.reward import masked_zscore

    m = mask.bool()
    zm = masked_zscore(mech.float().where(m, torch.zeros(())), m)
    zp = masked_zscore(probe_logit.float().where(m, torch.zeros(())), m)
    return (torch.sign(zm) * torch.sign(zp) > 0) & m


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of ``saereward probe``."""

    rollouts: str = option("runs/rollouts", "folder written by `saereward rollouts`")
    layer: int | None = option(None, "layer of the pooled residuals (default: the pack's layer with --pack)")
    pack: str | None = option(None, "feature pack whose layer the probe should read (the RL reward layer)")
    seed: int = option(0, "seed for the CV folds and the bootstrap")
    n_boot: int = option(2000, "bootstrap resamples for the AUROC CI")
    out: str = option("runs/probe.safetensors", "probe file (a .json sidecar is written beside it)")


def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Fit on discovery, report held-out AUROC on validation, save the probe; returns the report."""
    from saereward.features.discover import require_both_outcomes
    from saereward.gates.g1 import association
    from saereward.rollouts import load_rollouts

    layer = cfg.layer
    if layer is None and cfg.pack:
        from saereward.features.pack import load_pack

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
        "heldout": {k: assoc[k] for k in ("n", "n_correct", "auroc", "auroc_ci", "spearman_rho", "rho_ci")},
        "fit": info,
        "seed": cfg.seed,
        "rollouts": str(cfg.rollouts),
        "config": to_dict(cfg),
        "saereward_version": __version__,
    }
    probe = LinearProbe.from_pipeline(clf, layer, {k: v for k, v in report.items() if k != "layer"})
    probe.save(cfg.out)
    return report
