"""saereward: mechanistic rewards from sparse-autoencoder features.

Pipeline: load a model (:mod:`saereward.lm`), capture its residual stream (:mod:`saereward.capture`),
run tasks with verifiers (:mod:`saereward.tasks`), evaluate (:mod:`saereward.evaluate`), train SAEs,
discover contrastive feature packs, gate them statistically, and use them as per-token GRPO rewards.

Importing this package has no side effects: heavy modules are imported lazily by the functions that
need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from saereward.errors import SaeRewardError

__all__ = ["SaeRewardError", "__version__"]
