"""``saereward report RUN``: one self-contained HTML file for a run folder.

Reads only the layout of ``docs/run_layout.md`` (every part optional: a missing stage is shown as
"not run") and writes ``RUN/report.html``: the resolved configs, every stage's tables with their
confidence intervals, the plots (matplotlib, embedded as base64 PNG data URIs) and a rollout viewer
that colours each response token by its per-token mech reward. The file loads nothing from the
network: no CDN, no fonts, no external scripts; the viewer's filter is a few lines of inline
JavaScript.

The parts: :mod:`saereward.report.artifacts` reads the run folder, :mod:`saereward.report.tables`
formats the cells and tables, :mod:`saereward.plots` draws the figures,
:mod:`saereward.report.sections` and :mod:`saereward.report.gate_sections` build one section per
stage and gate, :mod:`saereward.report.tokens` colours the per-token view that the g1 stage wrote
(``RUN/token_rewards.json``, :mod:`saereward.features.token_view`); this module assembles them and
renders the jinja2 template. The report computes nothing from the model, the SAE or the pack.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saereward import __version__
from saereward.config import option
from saereward.errors import SaeRewardError
from saereward.io import atomic_path, atomic_write
from saereward.report.artifacts import collect_configs
from saereward.report.gate_sections import (
    section_dashboard,
    section_g1,
    section_g2,
    section_g3,
    section_probe,
)
from saereward.report.sections import (
    section_drift,
    section_layers,
    section_overview,
    section_pack,
    section_rollouts,
    section_sae,
    section_steer,
)
from saereward.report.tables import fmt3, results_markdown
from saereward.report.tokens import Z_SATURATE, token_colour, token_view, viewer_items
from saereward.stages import STAGES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    """Settings of ``saereward report``."""

    run_dir: str = option("", "the run folder (layout of `saereward pipeline`, docs/run_layout.md)")
    out: str | None = option(None, "HTML file to write (default: RUN_DIR/report.html)")
    seed: int = option(0, "seed of the G1 scatter's jitter")
    markdown: str | None = option(
        None, "also write the headline numbers (n, seed, 95% CIs) as Markdown to this file"
    )

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir is required: `saereward report RUN_DIR`")


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def render(context: Mapping[str, Any]) -> str:
    """The HTML of the report (jinja2, autoescaped)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("saereward", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["verdict_class"] = verdict_class
    env.filters["cell_class"] = cell_class
    return env.get_template("report.html.j2").render(**context)


def cell_class(v: Any) -> str:
    """CSS classes of a table cell: its verdict colour, and ``long`` for text that should wrap."""
    return " ".join(c for c in (verdict_class(v), "long" if len(str(v)) > 60 else "") if c)


def verdict_class(v: Any) -> str:
    s = str(v).upper()
    if s in ("PASS", "EXCELLENT", "DONE"):
        return "pass"
    if s in ("FAIL", "NOT RUN"):
        return "fail"
    if s in ("WEAK", "INCONCLUSIVE"):
        return "warn"
    return ""


def _viewer_context(view: Mapping[str, Any] | None, why: str) -> dict[str, Any]:
    """What the template's rollout viewer renders."""
    items = viewer_items(view) if view else []
    return {
        "ran": view is not None,
        "reason": why,
        "items": items,
        "n_correct": sum(1 for i in items if i["correct"]),
        "n_wrong": sum(1 for i in items if not i["correct"]),
        "layer": (view or {}).get("layer"),
        "model": (view or {}).get("model"),
        "tokenizer": bool((view or {}).get("tokenizer")),
        "z_mean": fmt3((view or {}).get("z_mean")),
        "z_sd": fmt3((view or {}).get("z_sd")),
        "saturate": Z_SATURATE,
        "legend": [(f"{z:+.1f}", token_colour(z)) for z in (-2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5)],
    }


def build_context(run: Path, cfg: ReportConfig) -> dict[str, Any]:
    view, why = token_view(run)
    sections = [
        section_dashboard(run, view is not None),
        section_sae(run),
        section_rollouts(run),
        section_layers(run),
        section_pack(run),
        section_g1(run, view, cfg.seed),
        section_probe(run),
        section_g2(run),
        section_g3(run),
        section_steer(run),
        section_drift(run),
        section_overview(run),
    ]
    return {
        "title": f"saereward report: {run.name}",
        "run_dir": str(run),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": __version__,
        "sections": sections,
        "configs": collect_configs(run),
        "viewer": _viewer_context(view, why),
    }


def run_report(cfg: ReportConfig) -> Path:
    """Write the HTML report of ``cfg.run_dir`` (atomically) and return its path."""
    run = Path(cfg.run_dir).expanduser()
    if not run.is_dir():
        raise SaeRewardError(f"run folder {run} not found: pass the folder `saereward pipeline` wrote")
    markers = [s.artifact for s in STAGES if s.name != "report"]
    if not any((run / m).is_file() for m in (*markers, "pipeline.json", "stages.json")):
        raise SaeRewardError(  # a run just started has pipeline.json: every stage is then "not run"
            f"{run} holds no stage output ({', '.join(markers[:3])}, ...) and no pipeline.json: pass the "
            "folder `saereward pipeline` wrote"
        )
    out = Path(cfg.out).expanduser() if cfg.out else run / "report.html"
    t0 = time.perf_counter()
    text = render(build_context(run, cfg))
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)  # a report is for sharing (mkstemp makes 0600)
    log.info("report written in %.1f s -> %s", time.perf_counter() - t0, out)
    if cfg.markdown:
        atomic_write(cfg.markdown, lambda fh: fh.write(results_markdown(run)))
    return out


__all__ = ["ReportConfig", "build_context", "render", "run_report"]
