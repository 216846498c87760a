"""TopK sparse autoencoders: the model (:mod:`.coder`), its fast kernels (:mod:`.kernels`), training
(:mod:`.train`), checkpoint formats (:mod:`.formats`) and evaluation (:mod:`.evaluate`).

Names are re-exported lazily, so ``import saereward.sae`` stays cheap and submodules load on first use::

    from saereward.sae import SAEConfig, TopKSAE, SAETrainConfig, SAETrainer
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saereward.sae.coder import ForwardOutput, SAEConfig, TopKSAE, geometric_median
    from saereward.sae.formats import load_sae, save_sae
    from saereward.sae.kernels import kernel_mode, use_kernels
    from saereward.sae.train import SAETrainConfig, SAETrainer, latest_checkpoint, lr_at

_EXPORTS = {
    "SAEConfig": "coder",
    "TopKSAE": "coder",
    "ForwardOutput": "coder",
    "geometric_median": "coder",
    "kernel_mode": "kernels",
    "use_kernels": "kernels",
    "SAETrainConfig": "train",
    "SAETrainer": "train",
    "latest_checkpoint": "train",
    "lr_at": "train",
    "load_sae": "formats",
    "save_sae": "formats",
}

__all__ = [
    "ForwardOutput",
    "SAEConfig",
    "SAETrainConfig",
    "SAETrainer",
    "TopKSAE",
    "geometric_median",
    "kernel_mode",
    "latest_checkpoint",
    "load_sae",
    "lr_at",
    "save_sae",
    "use_kernels",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"saereward.sae.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'saereward.sae' has no attribute {name!r}")
