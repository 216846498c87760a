"""saereward: mechanistic rewards from sparse-autoencoder features.

Pipeline: load a model (:mod:`saereward.model.lm`), capture its residual stream (:mod:`saereward.model.capture`),
run tasks with verifiers (:mod:`saereward.tasks`), evaluate (:mod:`saereward.analysis.evaluate`), train SAEs,
discover contrastive feature packs, gate them statistically, and use them as per-token GRPO rewards.

Importing this package has no side effects: heavy modules are imported lazily by the functions that
need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from saereward.errors import SaeRewardError

# Public API, imported on first use so that `import saereward` stays light (no torch at import).
_LAZY = {
    "load_model": "saereward.model.lm",
    "load_task": "saereward.tasks",
    "load_sae": "saereward.sae.formats",
    "save_sae": "saereward.sae.formats",
    "TopKSAE": "saereward.sae.coder",
    "ResidualCapture": "saereward.model.capture",
    "load_pack": "saereward.features.pack",
    "save_pack": "saereward.features.pack",
    "PackScorer": "saereward.features.scoring",
}

__all__ = ["SaeRewardError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saereward' has no attribute {name!r}")
