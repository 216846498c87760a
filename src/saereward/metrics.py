"""Where training metrics go besides ``train_log.jsonl``: TensorBoard and Weights & Biases.

``report_to`` (as in TRL) names the sinks: ``tensorboard`` (the default; the ``tensorboard`` extra),
``wandb`` (the ``wandb`` extra; off by default) or ``none``. Each logged row's finite numbers are
sent as scalars at its step. W&B follows its own environment (``WANDB_PROJECT``, ``WANDB_MODE``:
``offline`` writes the run locally and never touches the network); a sink whose package is missing
is skipped with one warning per process (a pipeline trains several runs), and the JSONL log is always
written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

ReportTo = Literal["tensorboard", "wandb", "none"]
__all__ = ["MetricSinks", "ReportTo"]


_MISSING_SAID: set[str] = set()


def _missing(package: str) -> None:
    """Say once per process that ``package``'s sink is skipped."""
    if package not in _MISSING_SAID:
        _MISSING_SAID.add(package)
        log.warning("%s is not installed (pip install 'saereward[%s]'): not logging to it", package, package)


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class MetricSinks:
    """The sinks of one run folder; ``log(row, step)`` sends a row to each, ``close()`` flushes them."""

    def __init__(
        self,
        run_dir: Path,
        report_to: Sequence[str],
        *,
        name: str,
        config: Mapping[str, Any],
        resume_step: int = 0,
    ) -> None:
        self.tb: Any = None
        self.wandb: Any = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                _missing("tensorboard")
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                _missing("wandb")
            else:
                self.wandb = wandb.init(
                    name=name,
                    dir=str(run_dir),
                    config=dict(config),
                    job_type=name.split(":")[0],
                    resume="allow",  # the folder's id: a resumed or re-entered run continues it
                    id=_wandb_id(run_dir),
                )

    def log(self, row: Mapping[str, Any], step: int) -> None:
        values = _scalars(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """One W&B run per run folder, kept in ``wandb_id.txt`` so a resumed run continues the same one."""
    import uuid

    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_dir.mkdir(parents=True, exist_ok=True)
    rid = uuid.uuid4().hex[:12]
    path.write_text(rid + "\n", encoding="utf-8")
    return rid
