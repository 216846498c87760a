"""Linear probes on residuals: a standardized, CV-regularised logistic regression and its saved form.

:func:`fit_logistic` picks the L2 strength by stratified k-fold cross-validation on AUROC
(scikit-learn ``LogisticRegressionCV``); gate G1 uses it as a baseline, ``saereward probe`` fits the
dual verifier with it. :class:`LinearProbe` applies a fitted probe to residuals and saves it
(safetensors + JSON); :func:`load_probe` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saereward.errors import SaeRewardError
from saereward.io import atomic_path, write_json

__all__ = ["LinearProbe", "fit_logistic", "load_probe"]


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
        tensors = {"w": self.w, "mean": self.mean, "scale": self.scale, "bias": torch.tensor([self.b])}
        with atomic_path(p) as tmp:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata={"format": "saereward-probe"},
            )
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
