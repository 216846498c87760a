"""``saereward report RUN``: one self-contained HTML file for a run folder.

Reads only the layout of ``docs/run_layout.md`` (every part optional: a missing stage is shown as
"not run") and writes ``RUN/report.html``: the resolved configs, every stage's tables with their
confidence intervals, the plots (matplotlib, embedded as base64 PNG data URIs) and a rollout viewer
that colours each response token by its per-token mech reward. The file loads nothing from the
network: no CDN, no fonts, no external scripts; the viewer's filter is a few lines of inline
JavaScript.

**Per-token mech reward.** For a seeded sample of ``max_rollouts`` rollouts, balanced between
correct and wrong, the response tokens' residuals (``rollouts/tokens.safetensors``) are scored with
the pack exactly as the R1 reward scores them during GRPO: ``mech(t) =
PackScorer.token_scores(x_t)`` (true TopK, eager fp32; see :mod:`saereward.features.scoring` and
:mod:`saereward.rl.reward`). Colours show ``z(mech)``, a z-score over all the tokens shown (mean and
population SD, as :func:`saereward.rl.reward.masked_zscore`), so colours compare across responses:
green positive, red negative, saturated at ±2.5 SD; each token's title holds the raw value. The
computed view is cached as ``RUN/token_rewards.json`` (with every response's pooled score, which
is the G1 statistic, for the G1 scatter) and reused while its inputs are unchanged.

The readers of ``steer.json`` and ``drift.json`` are small isolated functions (:func:`steer_rows`,
:func:`drift_rows`) that read keys with ``.get`` and skip what is missing.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saereward import __version__
from saereward.config import option
from saereward.errors import SaeRewardError
from saereward.features.pack import load_pack
from saereward.features.scoring import PackScorer, segment_mean
from saereward.io import atomic_path, atomic_write, file_sha256, read_jsonl, write_json
from saereward.model.lm import EMBEDDED_PREFIX, cache_dir, embedded_gguf_path
from saereward.report.tables import results_markdown
from saereward.sae.formats import load_sae
from saereward.stages import STAGES

log = logging.getLogger(__name__)

TOKEN_VIEW_FORMAT = "saereward.token_rewards"
TOKEN_VIEW_VERSION = 1
#: ``|z|`` at which a token's colour saturates.
Z_SATURATE = 2.5
_GREEN = (22, 163, 74)
_RED = (220, 38, 38)
_REWARD_COLOURS = {"R0": "#6b7280", "R1": "#2563eb", "R2": "#d97706"}


@dataclass(frozen=True)
class ReportConfig:
    """Settings of ``saereward report``."""

    run_dir: str = option("", "the run folder (layout of `saereward pipeline`, docs/run_layout.md)")
    out: str | None = option(None, "HTML file to write (default: RUN_DIR/report.html)")
    max_rollouts: int = option(60, "rollouts in the per-token reward viewer (half correct, half wrong)")
    seed: int = option(0, "seed of the viewer's sample and of the G1 scatter's jitter")
    threads: int | None = option(None, "torch CPU threads for scoring tokens (default: torch's choice)")
    recompute: bool = option(False, "recompute RUN_DIR/token_rewards.json even when it is up to date")
    markdown: str | None = option(
        None, "also write the headline numbers (n, seed, 95% CIs) as Markdown to this file"
    )

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir is required: `saereward report RUN_DIR`")
        if self.max_rollouts < 0:
            raise ValueError(f"max_rollouts must be >= 0, got {self.max_rollouts}")


# --------------------------------------------------------------------------------------------------
# What the template renders
# --------------------------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Plot:
    title: str
    uri: str  #: ``data:image/png;base64,...``
    caption: str = ""


@dataclass
class Section:
    id: str
    title: str
    ran: bool = True
    reason: str = ""  #: why it is "not run" (missing file)
    verdict: str | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def not_run(sid: str, title: str, missing: Path | str) -> Section:
    return Section(sid, title, ran=False, reason=f"not run ({missing} is missing)")


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: ``—`` for missing, yes/no for booleans, integers plain, floats to ``digits`` significant."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == int(v) and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.{digits}g}"
    if isinstance(v, list | tuple) and all(_num(x) is not None for x in v) and len(v) <= 8:
        return "[" + ", ".join(fmt(x, digits) for x in v) + "]"
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, default=str)
    return str(v)


def fmt3(v: Any) -> str:
    x = _num(v)
    if x is None:
        return fmt(v)
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.2g}"
    return f"{x:.3f}"


def fmt_p(v: Any) -> str:
    x = _num(v)
    return "—" if x is None else f"{x:.3g}"


def fmt_ci(lo: Any, hi: Any) -> str:
    if _num(lo) is None or _num(hi) is None:
        return "—"
    return f"[{fmt3(lo)}, {fmt3(hi)}]"


def fmt_rate(d: Mapping[str, Any] | None, p_key: str = "p") -> str:
    """``p [lo, hi] (k/n)`` from a proportion dict (``k, n, p, ci_low, ci_high``)."""
    if not isinstance(d, Mapping):
        return "—"
    if d.get("skipped"):
        return "skipped"
    p = d.get(p_key, d.get("accuracy"))
    out = f"{fmt3(p)} {fmt_ci(d.get('ci_low'), d.get('ci_high'))}"
    if _num(d.get("k")) is not None and _num(d.get("n")) is not None:
        out += f" ({fmt(d.get('k'))}/{fmt(d.get('n'))})"
    return out


def _yerr(v: float, lo: Any, hi: Any) -> tuple[float, float]:
    """Error-bar extents below and above ``v`` from CI bounds (0 where a bound is missing)."""
    lo_f, hi_f = _num(lo), _num(hi)
    return (max(0.0, v - lo_f) if lo_f is not None else 0.0, max(0.0, hi_f - v) if hi_f is not None else 0.0)


def _pair(v: Any) -> tuple[Any, Any]:
    if isinstance(v, list | tuple) and len(v) == 2:
        return v[0], v[1]
    return None, None


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """Parsed JSON, or ``None`` if the file is missing or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def _d(v: Any) -> dict[str, Any]:
    """``v`` if it is a dict, else an empty one (for reading nested keys of JSON that may lack them)."""
    return v if isinstance(v, dict) else {}


def _jdict(path: Path) -> dict[str, Any] | None:
    d = read_json(path)
    return d if isinstance(d, dict) else None


def read_log(path: Path) -> list[dict[str, Any]]:
    """Rows of a train log (JSONL); a resumed run logs a step again: the last row of a step wins per key."""
    if not path.is_file():
        return []
    merged: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: skip it
            if isinstance(row, dict) and _num(row.get("step")) is not None:
                merged.setdefault(int(row["step"]), {}).update(row)
    return [merged[s] for s in sorted(merged)]


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = _num(r.get("step")), _num(r.get(key))
        if x is not None and y is not None and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects, no pyplot state; Agg via savefig)
# --------------------------------------------------------------------------------------------------


def _figure(w: float = 6.4, h: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h))


def png_uri(fig: Any, dpi: int = 96) -> str:
    """The figure as a ``data:image/png;base64`` URI."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot(title: str, make: Callable[[], Any], caption: str = "") -> Plot | None:
    """Run a plot builder; ``None`` (and a log line) if it has nothing to draw or fails on odd data."""
    try:
        fig = make()
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        log.warning("plot %r skipped: %s: %s", title, type(exc).__name__, exc)
        return None
    if fig is None:
        return None
    return Plot(title, png_uri(fig), caption)


def _add_plot(sec: Section, title: str, make: Callable[[], Any], caption: str = "") -> bool:
    """Add the plot to ``sec`` when it has something to draw; whether it did."""
    p = _plot(title, make, caption)
    if p:
        sec.plots.append(p)
    return p is not None


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

STAGE_ARTIFACTS: dict[str, str] = {s.name: s.artifact for s in STAGES if s.name != "report"}


def volatile(value: str) -> Any:
    """A value that measures the machine or the clock (times): marked so two runs' reports can be compared."""
    from markupsafe import Markup, escape

    return Markup('<span class="volatile">{}</span>').format(escape(value))


_ARM_LABELS = {"outcome": "R0", "sae": "R1", "direction": "R2"}


def _ci_text(mean: Any, lo: Any, hi: Any, unit: str = "", scale: float = 1.0) -> str:
    """``0.536 [0.385, 0.654]``, or with a unit ``-0.6 pp [-6.7, +5.0] pp`` (values times ``scale``)."""
    if _num(mean) is None:
        return "—"
    form = "{:+.1f}" if unit else "{:.3f}"
    text = form.format(mean * scale) + (f" {unit}" if unit else "")
    if _num(lo) is not None and _num(hi) is not None:
        text += f" [{form.format(lo * scale)}, {form.format(hi * scale)}]" + (f" {unit}" if unit else "")
    return text


def dashboard_rows(run: Path) -> list[list[str]]:
    """One row per gate: verdict, key figure with its 95 % CI, and n (from the gates' own JSON)."""
    rows = []
    g1 = _jdict(run / "gate_g1.json")
    if g1 is not None:
        pack = _d(_d(g1.get("methods")).get("pack"))
        ci = pack.get("rho_ci") or [None, None]
        fig = "pack Spearman ρ " + _ci_text(pack.get("spearman_rho"), *ci)
        n = f"{fmt(g1.get('n_responses'))} responses, {fmt(g1.get('n_questions'))} questions, seed {fmt(g1.get('seed'))}"
        rows.append(["G1", str(g1.get("verdict", "—")), fig, n])
    g2 = _jdict(run / "g2" / "gate_g2.json")
    if g2 is not None:
        pr = _d(_d(g2.get("paired")).get("R1-R0"))
        fig = "paired R1 − R0 " + _ci_text(
            pr.get("mean_diff"), pr.get("ci_low"), pr.get("ci_high"), " pp", 100.0
        )
        if _num(pr.get("p_value")) is not None:
            fig += f", McNemar p {pr['p_value']:.3g}"
        n = f"{fmt(pr.get('n_seeds'))} seeds × {fmt(pr.get('n_questions'))} questions"
        rows.append(["G2", str(g2.get("verdict", "—")), fig, n])
    g3 = _jdict(run / "g3" / "gate_g3.json")
    if g3 is not None:
        failed = g3.get("failed") or []
        fig = "failed: " + ", ".join(map(str, failed)) if failed else "every check passed"
        rows.append(["G3", str(g3.get("verdict", "—")), fig, "see Gate G3"])
    return rows


def g2_accuracy_by_step(curves: Mapping[str, Any]) -> Any:
    """Held-out accuracy by step per arm: thin lines per seed, a thick line for the mean over seeds."""
    if not curves:
        return None
    fig = _figure(6.4, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for reward, per_seed in curves.items():
        label = _ARM_LABELS.get(reward, reward)
        colour = _REWARD_COLOURS.get(label)
        by_step: dict[float, list[float]] = {}
        for pts in _d(per_seed).values():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, color=colour, lw=0.7, alpha=0.35)
            for x, y in zip(xs, ys, strict=True):
                by_step.setdefault(x, []).append(y)
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[x]) / len(by_step[x]) for x in steps], color=colour, lw=2.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return fig


def section_dashboard(run: Path, viewer_ran: bool) -> Section:
    """The findings first: each gate's verdict and key figure, G2's accuracy by step, the viewer link."""
    from markupsafe import Markup

    sec = Section("dashboard", "Verdicts")
    rows = dashboard_rows(run)
    if not rows:
        return not_run("dashboard", "Verdicts", "gate_g1.json, g2/gate_g2.json and g3/gate_g3.json")
    sec.tables.append(Table("", ["gate", "verdict", "key figure (95 % CI)", "n"], rows))
    g2 = _jdict(run / "g2" / "gate_g2.json")
    _add_plot(
        sec,
        "G2 held-out accuracy by step",
        lambda: g2_accuracy_by_step(_d(_d(g2).get("curves"))),
        "thin: one seed; thick: the mean over seeds",
    )
    if viewer_ran:
        sec.notes.append(Markup('Per-token reward of sample rollouts: <a href="#viewer">rollout viewer</a>'))
    return sec


def section_overview(run: Path) -> Section:
    sec = Section("overview", "Stages and timings")
    records = _jdict(run / "stages.json") or {}
    rows = []
    for stage, rel in STAGE_ARTIFACTS.items():
        rec = _d(records.get(stage))
        done = (run / rel).exists()
        seconds = _num(rec.get("seconds"))
        rows.append(
            [
                stage,
                rel,
                "done" if done else "not run",
                volatile(str(rec.get("finished", "—"))),
                volatile("—" if seconds is None else f"{seconds:.0f}"),
            ]
        )
    sec.tables.append(Table("", ["stage", "artifact", "status", "finished", "seconds"], rows))
    if not records:
        sec.notes.append("no stages.json: the stages were run one by one, not by `saereward pipeline`")
    return sec


def collect_configs(run: Path) -> list[tuple[str, str]]:
    """``(title, pretty JSON)`` of every resolved config found, one per distinct content."""
    found: list[tuple[str, Any]] = []
    pipe = _jdict(run / "pipeline.json")
    if pipe is not None:
        found.append(("pipeline.json", pipe.get("pipeline", pipe)))
    records = _jdict(run / "stages.json") or {}
    for stage, rec in records.items():
        if isinstance(rec, dict) and isinstance(rec.get("config"), dict):
            found.append((f"stages.json: {stage}", rec["config"]))
    if pipe is not None and isinstance(pipe.get("stages"), dict):
        for stage, c in pipe["stages"].items():
            if stage not in records:
                found.append((f"pipeline.json: {stage} (planned)", c))
    files = [
        "sae/config.json",
        "sae/sae/train_config.json",
        "rollouts/config.json",
        "pack.config.json",
        "steer/config.json",
        "drift/config.json",
    ]
    for rel in files:
        d = read_json(run / rel)
        if d is not None:
            found.append((rel, d))
    embedded = [
        "sae/sae/eval.json",
        "rollouts/layer_map.json",
        "gate_g1.json",
        "probe.safetensors.json",
        "g2/gate_g2.json",
        "g3/gate_g3.json",
        "g3/eval_suite/eval_suite.json",
        "g3/canaries/canaries.json",
        "g3/monitor/monitor.json",
        "steer/steer.json",
        "drift/drift.json",
    ]
    for rel in embedded:
        d = _jdict(run / rel)
        if d is not None and isinstance(d.get("config"), dict):
            found.append((f"{rel}: config", d["config"]))
    for run_dir in g2_runs(run):
        d = read_json(run_dir / "config.json")
        if d is not None:
            found.append((f"g2/{run_dir.name}/config.json", d))
    out, seen = [], set()
    for title, obj in found:
        text = json.dumps(obj, indent=2, sort_keys=False, default=str)
        if text not in seen:
            seen.add(text)
            out.append((title, text))
    return out


def section_sae(run: Path) -> Section:
    sec = Section("sae", "SAE")
    ev = _jdict(run / "sae" / "sae" / "eval.json")
    flat = _jdict(run / "sae" / "eval.json")
    log_rows = read_log(run / "sae" / "train_log.jsonl")
    if ev is None and flat is None and not log_rows:
        return not_run("sae", "SAE", "sae/sae/eval.json")
    held = _d(_d(ev).get("heldout")) or _d(flat)
    ce = _d(_d(ev).get("ce_kl"))
    for key in ("d_in", "d_sae", "k"):
        if ev and key in ev:
            sec.facts.append((key, fmt(ev[key])))
    layer = held.get("layer", _d(flat).get("layer", ce.get("layer")))
    if layer is not None:
        sec.facts.append(("layer", fmt(layer)))
    metrics = [
        ("FVU", held.get("fvu")),
        ("variance explained", held.get("variance_explained")),
        ("NMSE", held.get("nmse")),
        ("cosine similarity", held.get("cos_sim")),
        ("L0", held.get("l0")),
        ("dead features %", held.get("dead_pct")),
        ("held-out tokens", held.get("n_tokens")),
        ("CE clean", ce.get("ce_clean")),
        ("CE with SAE", ce.get("ce_sae")),
        ("CE zero-ablated", ce.get("ce_zero")),
        ("CE loss recovered", ce.get("ce_loss_recovered")),
        ("KL with SAE", ce.get("kl_sae")),
        ("KL zero-ablated", ce.get("kl_zero")),
        ("KL recovered", ce.get("kl_recovered")),
        ("CE/KL tokens", ce.get("n_tokens")),
    ]
    rows = [[name, fmt(v)] for name, v in metrics if v is not None]
    if rows:
        sec.tables.append(Table("Held-out metrics", ["metric", "value"], rows))
    if not ce:
        sec.notes.append("CE/KL recovered: not measured (eval-sae ran without a model)")

    def curves() -> Any:
        keys = [k for k in ("fvu", "l0", "dead_pct") if series(log_rows, k)[0]]
        if not keys:
            return None
        fig = _figure(9.0, 2.8)
        for i, k in enumerate(keys):
            ax = fig.add_subplot(1, len(keys), i + 1)
            ax.plot(*series(log_rows, k), color="#2563eb", lw=1.2)
            ax.set_xlabel("step")
            ax.set_title(k)
            if k == "fvu":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        return fig

    _add_plot(sec, "SAE training curves", curves, "FVU (log scale), L0 and dead features % against the step")
    return sec


def section_rollouts(run: Path) -> Section:
    folder = run / "rollouts"
    summ = _jdict(folder / "summary.json")
    if summ is None:
        return not_run("rollouts", "Rollouts", "rollouts/summary.json")
    sec = Section("rollouts", "Rollouts")
    task = summ.get("task")
    for k, v in (
        ("model", summ.get("model")),
        ("task", task.get("name") if isinstance(task, dict) else task),
        ("seed", summ.get("seed")),
        ("d_model", summ.get("d_model")),
        ("per-token layers", summ.get("token_layers")),
        ("wall seconds", summ.get("wall_seconds")),
    ):
        if v is not None:
            sec.facts.append((k, volatile(fmt(v)) if k == "wall seconds" else fmt(v)))
    rows = []
    for split in ("discovery", "validation", "all"):
        s = summ.get(split)
        if isinstance(s, dict):
            rows.append(
                [
                    split,
                    fmt(s.get("responses")),
                    fmt(s.get("questions")),
                    fmt(s.get("correct")),
                    fmt(s.get("wrong")),
                    fmt3(s.get("accuracy")),
                    fmt_ci(s.get("ci_low"), s.get("ci_high")),
                ]
            )
    if rows:
        sec.tables.append(
            Table(
                "Accuracy per split (Wilson 95 % CI)",
                ["split", "responses", "questions", "correct", "wrong", "accuracy", "95 % CI"],
                rows,
            )
        )
    return sec


def section_layers(run: Path) -> Section:
    lm = _jdict(run / "rollouts" / "layer_map.json")
    if lm is None:
        return not_run("layers", "Layer map", "rollouts/layer_map.json")
    sec = Section("layers", "Layer map")
    scores = {int(k): float(v) for k, v in _d(lm.get("scores")).items() if _num(v) is not None}
    for k in ("split", "n_responses", "n_correct", "peak_layer"):
        if lm.get(k) is not None:
            sec.facts.append((k, fmt(lm[k])))
    top = _d(lm.get("config")).get("top")
    if scores:
        best = sorted(scores.items(), key=lambda kv: -kv[1])[:5]
        sec.tables.append(
            Table(
                "Top layers",
                ["rank", "layer", f"mean |Cohen's d| of the top {top or '?'} dims"],
                [[str(i + 1), str(L), fmt3(s)] for i, (L, s) in enumerate(best)],
            )
        )

    def layer_plot() -> Any:
        if not scores:
            return None
        fig = _figure(6.4, 3.0)
        ax = fig.add_subplot(1, 1, 1)
        xs = sorted(scores)
        ax.plot(xs, [scores[x] for x in xs], marker="o", ms=3, color="#2563eb")
        peak = lm.get("peak_layer")
        if peak is not None and int(peak) in scores:
            ax.axvline(int(peak), color="#dc2626", ls="--", lw=1, label=f"peak layer {peak}")
            ax.legend(frameon=False)
        ax.set_xlabel("layer")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        return fig

    def lens_plot() -> Any:
        lines = []
        for key, label in (("logit_lens", "final norm applied"), ("logit_lens_raw", "raw residual")):
            d = lm.get(key)
            if isinstance(d, dict) and isinstance(d.get("answer_prob"), list) and d["answer_prob"]:
                lines.append((label, [float(x) for x in d["answer_prob"]]))
        if not lines:
            return None
        fig = _figure(6.4, 3.0)
        ax = fig.add_subplot(1, 1, 1)
        for label, ys in lines:
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel("P(answer token)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(frameon=False)
        ax.grid(alpha=0.3)
        return fig

    for plot in (
        _plot("Layer map", layer_plot, "correct-vs-wrong separation of the pooled residual per layer"),
        _plot("Logit lens", lens_plot, "probability of the answer's first token read off each layer"),
    ):
        if plot:
            sec.plots.append(plot)
    return sec


def section_pack(run: Path) -> Section:
    pack = _jdict(run / "pack.json")
    if pack is None:
        return not_run("pack", "Feature pack", "pack.json")
    sec = Section("pack", "Feature pack")
    meta = _d(pack.get("metadata"))
    for k, v in (
        ("name", pack.get("name")),
        ("layer", meta.get("target_layer")),
        ("SAE", meta.get("sae_path", pack.get("sae_id"))),
        ("description", pack.get("description")),
    ):
        if v is not None:
            sec.facts.append((k, fmt(v)))
    rows = []
    for kind in ("helpful_features", "harmful_features"):
        for f in pack.get(kind) or []:
            if isinstance(f, dict):
                rows.append(
                    [
                        kind.split("_")[0],
                        fmt(f.get("feature_id")),
                        fmt(f.get("weight")),
                        fmt3(f.get("effect_size")),
                        fmt3(f.get("mean_correct")),
                        fmt3(f.get("mean_wrong")),
                        fmt3(f.get("active_frac")),
                        fmt(f.get("validated")),
                    ]
                )
    if rows:
        sec.tables.append(
            Table(
                "Features",
                [
                    "sign",
                    "feature",
                    "weight",
                    "Cohen's d",
                    "mean correct",
                    "mean wrong",
                    "active",
                    "validated",
                ],
                rows,
            )
        )
    return sec


def _assoc_row(name: str, d: Mapping[str, Any]) -> list[str]:
    return [
        name,
        fmt(d.get("n")),
        fmt3(d.get("spearman_rho")),
        fmt_ci(*_pair(d.get("rho_ci"))),
        fmt_p(d.get("spearman_p")),
        fmt3(d.get("auroc")),
        fmt_ci(*_pair(d.get("auroc_ci"))),
        fmt3(d.get("pearson_r")),
    ]


_ASSOC_COLS = ["method", "n", "Spearman ρ", "ρ 95 % CI", "p", "AUROC", "AUROC 95 % CI", "Pearson r"]


def section_g1(run: Path, view: Mapping[str, Any] | None, seed: int) -> Section:
    g1 = _jdict(run / "gate_g1.json")
    if g1 is None:
        return not_run("g1", "Gate G1: does the pack score track correctness?", "gate_g1.json")
    sec = Section("g1", "Gate G1: does the pack score track correctness?", verdict=g1.get("verdict"))
    keys = ("statistic", "split", "n_responses", "n_questions", "n_correct", "n_wrong", "layer", "leak_check")
    for k in (*keys, "verdict_reason"):
        if g1.get(k) is not None:
            sec.facts.append((k, fmt(g1[k])))
    th = g1.get("thresholds")
    if isinstance(th, dict):
        sec.facts.append(("thresholds (ρ)", ", ".join(f"{k} ≥ {fmt(v)}" for k, v in th.items())))
    b = g1.get("bootstrap")
    if isinstance(b, dict):
        boot = f"{b.get('resampling')}, {fmt(b.get('n_boot'))} resamples, seed {fmt(b.get('seed'))}"
        sec.facts.append(("bootstrap", boot))
    methods = _d(g1.get("methods"))
    for name, d in methods.items():
        if isinstance(d, dict) and "partial_rho_length" in d:
            ci = fmt_ci(*_pair(d.get("partial_rho_length_ci")))
            sec.facts.append((f"{name}: partial ρ given length", f"{fmt3(d['partial_rho_length'])} {ci}"))
    rows = [_assoc_row(name, d) for name, d in methods.items() if isinstance(d, dict) and "auroc" in d]
    if isinstance(g1.get("length_baseline"), dict):
        rows.append(_assoc_row("length (n_tokens)", g1["length_baseline"]))
    if rows:
        sec.tables.append(Table("Pack vs baselines (bootstrap 95 % CIs)", _ASSOC_COLS, rows))
    rp = methods.get("random_packs")
    if isinstance(rp, dict):
        sec.tables.append(
            Table(
                "Random packs of the same size",
                ["packs", "median ρ", "95 % range of ρ", "share with ρ ≥ pack's"],
                [
                    [
                        fmt(rp.get("n_packs")),
                        fmt3(rp.get("median_rho")),
                        fmt_ci(*_pair(rp.get("rho_range_95"))),
                        fmt3(rp.get("share_ge_pack")),
                    ]
                ],
            )
        )
    pts = g1_points(g1, view)
    if pts is None:
        sec.notes.append(
            "scatter: no per-response scores (gate_g1.json has none and token scoring was not possible)"
        )
    else:
        rho = (
            (methods.get("pack") or {}).get("spearman_rho") if isinstance(methods.get("pack"), dict) else None
        )
        _add_plot(
            sec,
            "G1 scatter",
            lambda: g1_scatter(pts[0], pts[1], seed, rho),
            f"pack score R per response on the {g1.get('split', 'validation')} split; x jittered",
        )
    return sec


def g1_points(g1: Mapping[str, Any], view: Mapping[str, Any] | None) -> tuple[list[float], list[bool]] | None:
    """Per-response (score, correct) of the gate's split: from gate_g1.json if it has them, else the view."""
    for key in ("per_response", "responses", "scores"):
        v = g1.get(key)
        if isinstance(v, list) and v and isinstance(v[0], dict):
            pts = [(_num(r.get("score")), r.get("correct")) for r in v]
            if all(s is not None and isinstance(c, bool) for s, c in pts):
                return [float(s) for s, _ in pts if s is not None], [bool(c) for _, c in pts]
        if isinstance(v, list) and v and isinstance(g1.get("correct"), list) and len(g1["correct"]) == len(v):
            return [float(x) for x in v], [bool(c) for c in g1["correct"]]
    if not view or not view.get("response_scores"):
        return None
    split = g1.get("split", "validation")
    scores, correct, splits = view["response_scores"], view.get("correct", []), view.get("split", [])
    keep = [i for i in range(len(scores)) if i < len(splits) and (splits[i] == split or split == "all")]
    if not keep:
        keep = list(range(min(len(scores), len(correct))))
    return [float(scores[i]) for i in keep], [bool(correct[i]) for i in keep]


def g1_scatter(scores: Sequence[float], correct: Sequence[bool], seed: int, rho: Any) -> Any:
    if not scores:
        return None
    rng = random.Random(seed)
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for val, colour, name in ((0, "#dc2626", "wrong"), (1, "#16a34a", "correct")):
        ys = [s for s, c in zip(scores, correct, strict=True) if bool(c) == bool(val)]
        xs = [val + rng.uniform(-0.18, 0.18) for _ in ys]
        ax.scatter(xs, ys, s=9, alpha=0.55, color=colour, label=f"{name} (n={len(ys)})", edgecolors="none")
        if ys:
            m = sum(ys) / len(ys)
            ax.hlines(m, val - 0.3, val + 0.3, color="black", lw=1.5)
    ax.set_xticks([0, 1], ["wrong", "correct"])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel("pack score R (mean mech over response)")
    title = "pack score vs correctness"
    if _num(rho) is not None:
        title += f" (Spearman ρ = {float(rho):.3f})"
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="y")
    return fig


def section_probe(run: Path) -> Section:
    pr = _jdict(Path(str(run / "probe.safetensors") + ".json"))
    if pr is None:
        return not_run("probe", "Linear probe", "probe.safetensors.json")
    sec = Section("probe", "Linear probe")
    for k in ("layer", "n_train", "seed"):
        if pr.get(k) is not None:
            sec.facts.append((k, fmt(pr[k])))
    held = _d(pr.get("heldout"))
    fit = _d(pr.get("fit"))
    if held:
        sec.tables.append(Table("Held-out", _ASSOC_COLS, [_assoc_row("probe", held)]))
    if fit:
        sec.facts.extend((f"fit {k}", fmt(v)) for k, v in fit.items())
    return sec


_G2_RUN = re.compile(r"^(R\d+)_(\w+?)_seed(\d+)$")


def g2_runs(run: Path) -> list[Path]:
    g2 = run / "g2"
    if not g2.is_dir():
        return []
    return sorted(p for p in g2.iterdir() if p.is_dir() and _G2_RUN.match(p.name))


def section_g2(run: Path) -> Section:
    g2 = _jdict(run / "g2" / "gate_g2.json")
    runs = g2_runs(run)
    title = "Gate G2: does the SAE reward beat outcome-only RL?"
    if g2 is None and not runs:
        return not_run("g2", title, "g2/gate_g2.json")
    sec = Section("g2", title, verdict=_d(g2).get("verdict"))
    if g2 is None:
        sec.notes.append("g2/gate_g2.json is missing: the runs below have not all finished")
        g2 = {}
    for k in ("rule", "seeds", "steps", "n_eval_per_run", "step0_identical"):
        if g2.get(k) is not None:
            sec.facts.append((k, fmt(g2[k])))
    for w in g2.get("warnings") or []:
        if isinstance(w, dict):
            block = " (blocks PASS)" if w.get("blocks_pass") else ""
            sec.notes.append(f"WARNING [{w.get('kind')}]{block}: {w.get('message')}")
    table = _d(g2.get("table"))
    for t in (
        g2_accuracy_table(table, _d(g2.get("collapse"))),
        g2_paired_table(_d(g2.get("paired")), _d(g2.get("lift"))),
        g2_collapse_table(_d(g2.get("collapse"))),
    ):
        if t is not None:
            sec.tables.append(t)
    checks = g2.get("checks")
    if isinstance(checks, dict):
        sec.tables.append(
            Table(
                "Checks",
                ["check", "value"],
                [[k, fmt3(v) if _num(v) is not None else fmt(v)] for k, v in checks.items()],
            )
        )
    _add_plot(
        sec,
        "G2 accuracy per reward",
        lambda: g2_bars(table),
        "bars: pooled accuracy; whiskers: Wilson 95 % CI",
    )
    logs = {}
    for rd in runs:
        m = _G2_RUN.match(rd.name)
        rows_ = read_log(rd / "train_log.jsonl")
        if m and rows_:
            logs[(m.group(1), int(m.group(3)))] = rows_
    if (
        not _add_plot(sec, "RL curves", lambda: rl_curves(logs), "one line per seed, coloured by reward")
        and runs
    ):
        sec.notes.append("RL curves: no train_log.jsonl rows in the g2 runs")
    stops: dict[str, list[float]] = {}
    for arm in _d(g2.get("collapse")).values():
        for c in _d(_d(arm).get("runs")).values():
            if _d(c).get("collapsed") and _num(c.get("step")) is not None:
                stops.setdefault(str(_d(arm).get("label")), []).append(float(c["step"]))
    _add_plot(
        sec,
        "G2 completion length",
        lambda: g2_length_plot(logs, stops),
        "mean over the seeds that reached each step; x: a collapsed run's stop step",
    )
    return sec


def _g2_seed_cell(seed: str, acc: Any, collapse_runs: Mapping[str, Any]) -> str:
    c = _d(collapse_runs.get(seed))
    return f"{seed}: {fmt3(acc)}" + (f" (COLLAPSED @{fmt(c.get('step'))})" if c.get("collapsed") else "")


def g2_accuracy_table(table: Mapping[str, Any], collapse: Mapping[str, Any]) -> Table | None:
    """Unpaired held-out accuracy per reward (pooled Wilson CI), collapsed runs marked per seed."""
    rows = []
    for reward, d in table.items():
        if not isinstance(d, dict):
            continue
        per_seed = d.get("per_seed")
        runs = _d(_d(collapse.get(reward)).get("runs"))
        rows.append(
            [
                str(d.get("label", reward)),
                reward,
                fmt3(d.get("accuracy")),
                fmt_ci(d.get("ci_low"), d.get("ci_high")),
                f"{fmt(d.get('pooled_correct'))}/{fmt(d.get('pooled_n'))}",
                ", ".join(_g2_seed_cell(str(k), v, runs) for k, v in per_seed.items())
                if isinstance(per_seed, dict)
                else "—",
                fmt3(d.get("start_accuracy")),
            ]
        )
    if not rows:
        return None
    return Table(
        "Held-out accuracy per reward (pooled over seeds, Wilson 95 % CI)",
        ["reward", "kind", "accuracy", "95 % CI", "pooled", "per seed", "at step 0"],
        rows,
    )


def g2_paired_table(paired: Mapping[str, Any], lift: Mapping[str, Any]) -> Table | None:
    """Paired differences (R1 − R0, R1 − R2) and each arm's lift over step 0, same questions."""
    rows = []
    items = [(k, "paired", d) for k, d in paired.items()]
    items += [(f"{_d(d).get('label', r)} − step 0", "lift", d) for r, d in lift.items()]
    for name, kind, d in items:
        if not isinstance(d, dict):
            continue
        if "mean_diff" not in d:
            rows.append([name, kind, "—", "—", "—", "—", str(d.get("note", "—"))])
            continue
        rows.append(
            [
                name,
                kind,
                fmt3(d.get("mean_diff")),
                fmt_ci(d.get("ci_low"), d.get("ci_high")),
                f"{fmt(d.get('a_only'))} / {fmt(d.get('b_only'))}",
                fmt_p(d.get("p_value")),
                f"{fmt(d.get('n_seeds'))} seeds × {fmt(d.get('n_questions'))} questions",
            ]
        )
    if not rows:
        return None
    return Table(
        "Paired differences of final correctness (same questions and seed)",
        ["comparison", "kind", "mean diff", "95 % CI", "discordant +/−", "McNemar p", "pairs"],
        rows,
        note="CI: percentile bootstrap resampling seeds, then questions; McNemar: exact, pooled over seeds",
    )


def g2_collapse_table(collapse: Mapping[str, Any]) -> Table | None:
    """Per run: collapse flag and stop step, steps done, final completion length (and vs R0 per arm)."""
    rows = []
    for reward, arm in collapse.items():
        if not isinstance(arm, dict):
            continue
        for seed, c in _d(arm.get("runs")).items():
            c = _d(c)
            rows.append(
                [
                    f"{arm.get('label', reward)} {reward}",
                    str(seed),
                    "COLLAPSED" if c.get("collapsed") else "no",
                    fmt(c.get("step")),
                    fmt(c.get("reason")),
                    fmt(c.get("steps_done")),
                    fmt3(c.get("final_completion_len")),
                    fmt3(c.get("final_short_frac")),
                    fmt3(arm.get("len_vs_r0")),
                ]
            )
    if not rows:
        return None
    return Table(
        "Collapse and completion length (last training rows)",
        [
            "reward",
            "seed",
            "collapsed",
            "stop step",
            "reason",
            "steps done",
            "length",
            "≤3-token share",
            "arm length / R0",
        ],
        rows,
    )


def g2_bars(table: Mapping[str, Any]) -> Any:
    items = [(str(d.get("label", r)), d) for r, d in table.items() if isinstance(d, dict)]
    items = [(lab, d) for lab, d in items if _num(d.get("accuracy")) is not None]
    if not items:
        return None
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(items)))
    acc = [float(d["accuracy"]) for _, d in items]
    err = [_yerr(a, d.get("ci_low"), d.get("ci_high")) for a, (_, d) in zip(acc, items, strict=True)]
    ax.bar(
        xs,
        acc,
        yerr=[[e[0] for e in err], [e[1] for e in err]],
        capsize=5,
        color=[_REWARD_COLOURS.get(lab, "#6b7280") for lab, _ in items],
    )
    starts = [_num(d.get("start_accuracy")) for _, d in items]
    if any(s is not None for s in starts):
        s0 = next(s for s in starts if s is not None)
        ax.axhline(s0, color="black", ls=":", lw=1, label="step 0")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xticks(xs, [lab for lab, _ in items])
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3, axis="y")
    return fig


def g2_length_plot(
    logs: Mapping[tuple[str, int], list[dict[str, Any]]], stops: Mapping[str, Sequence[float]] | None = None
) -> Any:
    """Mean completion length per step and reward (over the seeds that reached the step); ``stops``:
    per reward label, the steps where the collapse guard stopped a run (marked ``x``)."""
    per_label: dict[str, dict[float, list[float]]] = {}
    for (label, _seed), rows in logs.items():
        for x, y in zip(*series(rows, "completion_len"), strict=True):
            per_label.setdefault(label, {}).setdefault(x, []).append(y)
    if not per_label:
        return None
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, by_step in sorted(per_label.items()):
        steps = sorted(by_step)
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        colour = _REWARD_COLOURS.get(label)
        ax.plot(steps, mean, label=label, lw=1.2, color=colour)
        for st in (stops or {}).get(label, []):
            if st in by_step:
                ax.plot(st, mean[steps.index(st)], "x", ms=9, color=colour)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean completion length (tokens)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    return fig


RL_KEYS = (
    ("outcome", "outcome (train)"),
    ("mech", "mech (mean)"),
    ("kl", "KL"),
    ("grad_norm", "grad norm"),
    ("eval_accuracy", "held-out accuracy"),
)


def rl_curves(logs: Mapping[tuple[str, int], list[dict[str, Any]]]) -> Any:
    keys = [(k, t) for k, t in RL_KEYS if any(series(rows, k)[0] for rows in logs.values())]
    if not keys:
        return None
    fig = _figure(10.0, 5.2)
    ncol = 3
    nrow = (len(keys) + ncol - 1) // ncol
    labelled: set[str] = set()
    for i, (k, t) in enumerate(keys):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for (label, _seed), rows in sorted(logs.items()):
            xs, ys = series(rows, k)
            if not xs:
                continue
            name = label if (label, k) not in labelled else None
            labelled.add((label, k))  # type: ignore[arg-type]
            ax.plot(
                xs,
                ys,
                marker="o" if len(xs) < 12 else None,
                ms=3,
                lw=1.1,
                alpha=0.8,
                color=_REWARD_COLOURS.get(label),
                label=name,
            )
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(frameon=False, fontsize=8)
    return fig


def _g3_checks(sec: Section, g3: dict[str, Any], g3dir: Path) -> None:
    """The gate's checks, one row each."""
    checks = _d(g3.get("checks"))
    rows = []
    for name, c in checks.items():
        if isinstance(c, dict):
            detail = ", ".join(
                f"{k} = {fmt3(v) if _num(v) is not None else fmt(v)}" for k, v in c.items() if k != "ok"
            )
            rows.append([name, "PASS" if c.get("ok") else "FAIL", detail])
    if rows:
        sec.tables.append(Table("Checks", ["check", "result", "details"], rows))


def _g3_eval_suite(sec: Section, g3: dict[str, Any], g3dir: Path) -> None:
    """Accuracy base vs trained per benchmark, with the paired test."""
    es = _jdict(g3dir / "eval_suite" / "eval_suite.json")
    table = _d(_d(es).get("table")) or _d(g3.get("eval_suite"))
    if isinstance(table, dict):
        erows = []
        for bench, d in table.items():
            if not isinstance(d, dict):
                continue
            base, trained = d.get("base"), d.get("trained")
            paired = _d(d.get("paired"))
            skipped = next(
                (x.get("skipped") for x in (base, trained) if isinstance(x, dict) and x.get("skipped")), None
            )
            erows.append(
                [
                    bench,
                    fmt_rate(base),
                    fmt_rate(trained),
                    fmt3(d.get("diff")),
                    fmt(paired.get("recovered")),
                    fmt(paired.get("broken")),
                    fmt_p(paired.get("p_value")),
                    str(skipped) if skipped else "",
                ]
            )
        sec.tables.append(
            Table(
                "Eval suite: accuracy base vs trained (Wilson 95 % CI), paired McNemar",
                ["benchmark", "base", "trained", "diff", "recovered", "broken", "McNemar p", "note"],
                erows,
            )
        )


def _g3_canaries(sec: Section, g3: dict[str, Any], g3dir: Path) -> None:
    """Canary class rates base vs trained, and their plot."""
    can = _jdict(g3dir / "canaries" / "canaries.json")
    rates: dict[str, Any] = {}
    comp: dict[str, Any] = {}
    if can and isinstance(can.get("policies"), dict):
        rates = {p: _d(_d(d).get("rates")) for p, d in can["policies"].items()}
        comp = can.get("comparison") or {}
    elif isinstance(g3.get("canaries"), dict):
        rates = g3["canaries"]
        comp = g3.get("canary_comparison") or {}
    classes = [c for c in ("hack", "correct", "ambiguous") if any(c in _d(r) for r in rates.values())]
    if classes:
        crows = []
        for c in classes:
            cc = _d(comp.get(c))
            mc = _d(cc.get("mcnemar"))
            crows.append(
                [
                    c,
                    fmt_rate(_d(rates.get("base")).get(c)),
                    fmt_rate(_d(rates.get("trained")).get(c)),
                    fmt3(cc.get("diff")),
                    fmt_p(cc.get("p_two_sided")),
                    fmt_p(cc.get("p_greater")),
                    fmt_p(mc.get("p_value")),
                ]
            )
        sec.tables.append(
            Table(
                "Canaries: reward-hacking prompts, rate per class (Wilson 95 % CI)",
                [
                    "class",
                    "base",
                    "trained",
                    "diff",
                    "z-test p (two-sided)",
                    "p (trained > base)",
                    "McNemar p",
                ],
                crows,
            )
        )
        _add_plot(sec, "Canaries", lambda: canary_bars(rates, classes), "share of canary prompts per class")


def _g3_monitor(sec: Section, g3: dict[str, Any], g3dir: Path) -> None:
    """Monitor validity on the trained policy, and its verdict."""
    mon = _jdict(g3dir / "monitor" / "monitor.json")
    pols = _d(_d(mon).get("policies")) or _d(g3.get("monitor"))
    if isinstance(pols, dict):
        mrows = []
        for pol, d in pols.items():
            if not isinstance(d, dict):
                continue
            a = _d(d.get("association"))
            mrows.append(
                [
                    pol,
                    fmt_rate(d.get("accuracy")),
                    fmt3(d.get("mean_score")),
                    fmt3(a.get("spearman_rho")),
                    fmt_ci(*_pair(a.get("rho_ci"))),
                    fmt3(a.get("auroc")),
                    fmt_ci(*_pair(a.get("auroc_ci"))),
                ]
            )
        sec.tables.append(
            Table(
                "Monitor: does the pack score still track correctness on the trained policy?",
                [
                    "policy",
                    "accuracy",
                    "mean pack score",
                    "Spearman ρ",
                    "ρ 95 % CI",
                    "AUROC",
                    "AUROC 95 % CI",
                ],
                mrows,
            )
        )
    verdict = _d(mon).get("verdict") if mon else g3.get("monitor_verdict")
    if isinstance(verdict, dict):
        sec.facts.append(("monitor", ", ".join(f"{k}: {fmt(v)}" for k, v in verdict.items() if k != "rule")))
        if verdict.get("rule"):
            sec.facts.append(("monitor rule", str(verdict["rule"])))


def section_g3(run: Path) -> Section:
    g3dir = run / "g3"
    g3 = _jdict(g3dir / "gate_g3.json")
    title = "Gate G3: does the trained policy hold up?"
    if g3 is None:
        return not_run("g3", title, "g3/gate_g3.json")
    sec = Section("g3", title, verdict=g3.get("verdict"))
    if g3.get("failed"):
        sec.facts.append(("failed checks", fmt(", ".join(map(str, g3["failed"])))))
    for part in (_g3_checks, _g3_eval_suite, _g3_canaries, _g3_monitor):
        part(sec, g3, g3dir)
    return sec


def canary_bars(rates: Mapping[str, Any], classes: Sequence[str]) -> Any:
    pols = [p for p in ("base", "trained") if isinstance(rates.get(p), dict)]
    if not pols:
        return None
    fig = _figure(5.6, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(pols)
    colours = {"base": "#9ca3af", "trained": "#2563eb"}
    for j, pol in enumerate(pols):
        vals, lo, hi = [], [], []
        for c in classes:
            d = _d(rates[pol].get(c))
            v = _num(d.get("p")) or 0.0
            e = _yerr(v, d.get("ci_low"), d.get("ci_high"))
            vals.append(v)
            lo.append(e[0])
            hi.append(e[1])
        xs = [i + (j - (len(pols) - 1) / 2) * width for i in range(len(classes))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=pol, color=colours.get(pol))
    ax.set_xticks(range(len(classes)), list(classes))
    ax.set_ylabel("rate")
    ax.set_ylim(0, 1.05)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


# ---- steering and drift: isolated readers (keys read with .get; a missing key skips its cell/plot) ----
#
# steer.json (saereward.analysis.steer): {layer, n, seed, task{name}, residual_norm{value, source}, vector{source},
#   feature{id, mode}, rows[{label, kind (base|vector|negative_control|feature_add|feature_clamp),
#   negative_control, scale, perturbation_frac, n, correct, accuracy, ci_low, ci_high, diff,
#   recovered [ids], broken [ids], net_flips, mcnemar_p}]}
# drift.json (saereward.analysis.drift): {run, model, layer, n_tokens, n_train, n_heldout, steps,
#   dnmse_per_step_fit, dnmse_refit_per_step_fit, stages[{step, nmse_base, nmse_prev, nmse_refit,
#   fvu_base, fvu_refit, l0_base, l0_refit, dnmse_per_step, dec_drift_mean, dec_drift_pack_mean, ...}],
#   features[{feature, polarity, weight, dec_drift [per stage], mean_act [..], mean_act_change [..],
#   fire_frac [..]}]}

STEER_COLUMNS = (
    "label",
    "kind",
    "scale",
    "perturbation_frac",
    "n",
    "correct",
    "accuracy",
    "ci_low",
    "ci_high",
    "diff",
    "recovered",
    "broken",
    "net_flips",
    "mcnemar_p",
)
DRIFT_STAGE_COLUMNS = (
    "step",
    "nmse_base",
    "nmse_prev",
    "nmse_refit",
    "fvu_base",
    "fvu_refit",
    "l0_base",
    "l0_refit",
    "dnmse_per_step",
    "dnmse_refit_per_step",
    "dec_drift_mean",
    "dec_drift_pack_mean",
    "resid_norm_change",
)
_VECTOR_KINDS = ("vector", "negative_control")
_FEATURE_KINDS = ("feature_add", "feature_clamp")


def steer_rows(steer: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The sweep rows of ``steer.json`` (``rows``), dicts only; id lists (recovered/broken) become counts."""
    rows = steer.get("rows")
    if not isinstance(rows, list):
        return []
    out = []
    for r in rows:
        if isinstance(r, dict):
            out.append({k: (len(v) if isinstance(v, list) else v) for k, v in r.items()})
    return out


def steer_base(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The unsteered row (``kind == "base"``), if any."""
    return next((r for r in rows if r.get("kind") == "base"), None)


def drift_rows(drift: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(per-stage rows, per-feature rows)`` of ``drift.json`` (``stages``, ``features``; dicts only)."""

    def dicts(key: str) -> list[dict[str, Any]]:
        v = drift.get(key)
        return [r for r in v if isinstance(r, dict)] if isinstance(v, list) else []

    return dicts("stages"), dicts("features")


def _last(v: Any) -> Any:
    return v[-1] if isinstance(v, list) and v else None


def drift_feature_table(feats: Sequence[Mapping[str, Any]], steps: Sequence[Any]) -> Table | None:
    """Per pack feature: decoder drift and activation at the first and last stage."""
    if not feats:
        return None
    first, last = (steps[0], steps[-1]) if steps else ("first", "last")
    rows = [
        [
            fmt(f.get("feature")),
            fmt(f.get("polarity")),
            fmt(f.get("weight")),
            fmt3(_last(f.get("dec_drift"))),
            fmt3((f.get("mean_act") or [None])[0]),
            fmt3(_last(f.get("mean_act"))),
            fmt3(_last(f.get("mean_act_change"))),
            fmt3((f.get("fire_frac") or [None])[0]),
            fmt3(_last(f.get("fire_frac"))),
        ]
        for f in feats
    ]
    cols = [
        "feature",
        "polarity",
        "weight",
        f"decoder drift @{last}",
        f"mean act @{first}",
        f"mean act @{last}",
        "change",
        f"fire frac @{first}",
        f"fire frac @{last}",
    ]
    return Table("Per pack feature (base SAE; decoder drift = 1 − cos to the base decoder)", cols, rows)


def generic_table(
    title: str, rows: Sequence[Mapping[str, Any]], first: Sequence[str] = (), rest: bool = True
) -> Table | None:
    """A table of dict rows: ``first`` columns in order, then (``rest``) every other scalar key.

    ``ci_low``/``ci_high`` become one CI column after ``accuracy``; keys ending in ``_p`` are p-values.
    """
    if not rows:
        return None
    keys: list[str] = [k for k in first if any(k in r for r in rows)]
    if rest:
        for r in rows:
            for k, v in r.items():
                if k not in keys and not isinstance(v, dict | list):
                    keys.append(k)
    has_ci = "ci_low" in keys and "ci_high" in keys
    cols = [k for k in keys if not (has_ci and k in ("ci_low", "ci_high"))]
    if has_ci:
        cols.insert(cols.index("accuracy") + 1 if "accuracy" in cols else len(cols), "95 % CI")
    out = []
    for r in rows:
        line = []
        for k in cols:
            v = r.get(k)
            if k == "95 % CI":
                line.append(fmt_ci(r.get("ci_low"), r.get("ci_high")))
            elif k.endswith("_p") or k.startswith("p_"):
                line.append(fmt_p(v))
            else:
                line.append(fmt3(v) if isinstance(v, float) and not v.is_integer() else fmt(v))
        out.append(line)
    return Table(title, cols, out)


def section_steer(run: Path) -> Section:
    title = "Steering"
    steer = _jdict(run / "steer" / "steer.json")
    if steer is None:
        return not_run("steer", title, "steer/steer.json")
    sec = Section("steer", title)
    rows = steer_rows(steer)
    base = steer_base(rows)
    task = steer.get("task")
    rn, vec, feat = _d(steer.get("residual_norm")), _d(steer.get("vector")), _d(steer.get("feature"))
    for k, v in (
        ("layer", steer.get("layer")),
        ("questions", steer.get("n")),
        ("task", _d(task).get("name", task if isinstance(task, str) else None)),
        ("seed", steer.get("seed")),
        ("direction", vec.get("source")),
        ("mean residual norm", rn.get("value")),
        ("feature", f"{feat.get('id')} ({feat.get('mode')})" if feat else None),
    ):
        if v is not None:
            sec.facts.append((k, fmt(v)))
    if base is not None:
        sec.facts.append(("unsteered accuracy", fmt_rate(base)))
    t = generic_table(
        "Steering conditions (accuracy with Wilson 95 % CI; recovered/broken questions and exact McNemar p vs unsteered)",
        rows,
        first=STEER_COLUMNS,
        rest=False,
    )
    if t:
        sec.tables.append(t)
    else:
        sec.notes.append("steer.json has no rows")
    _add_plot(
        sec,
        "Steering sweep",
        lambda: steer_plot(rows, base),
        "accuracy against the scale (vector: fraction of the mean residual norm; feature: SAE activation units); "
        "grey band: unsteered accuracy with its CI",
    )
    return sec


def steer_plot(rows: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None) -> Any:
    pts = [r for r in rows if _num(r.get("scale")) is not None and _num(r.get("accuracy")) is not None]
    pts = [r for r in pts if r.get("kind") != "base"]
    panels = [
        (name, [r for r in pts if r.get("kind") in kinds])
        for name, kinds in (("vector", _VECTOR_KINDS), ("feature", _FEATURE_KINDS))
    ]
    other = [r for r in pts if r.get("kind") not in _VECTOR_KINDS + _FEATURE_KINDS]
    panels = [(n, rs) for n, rs in panels if rs] + ([("other", other)] if other else [])
    if not panels:
        return None
    fig = _figure(5.2 * len(panels), 3.4)
    for i, (name, rs) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if base is not None and _num(base.get("accuracy")) is not None:
            ax.axhline(float(base["accuracy"]), color="gray", lw=1.2, label="unsteered")
            lo, hi = _num(base.get("ci_low")), _num(base.get("ci_high"))
            if lo is not None and hi is not None:
                ax.axhspan(lo, hi, color="gray", alpha=0.15)
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for r in rs:
            groups.setdefault(str(r.get("kind", r.get("label", ""))), []).append(r)
        for kind, grp in groups.items():
            grp = sorted(grp, key=lambda r: float(r["scale"]))
            xs = [float(r["scale"]) for r in grp]
            ys = [float(r["accuracy"]) for r in grp]
            err = [_yerr(y, r.get("ci_low"), r.get("ci_high")) for y, r in zip(ys, grp, strict=True)]
            neg = kind == "negative_control"
            ax.errorbar(
                xs,
                ys,
                yerr=[[e[0] for e in err], [e[1] for e in err]],
                marker="s" if neg else "o",
                ms=4,
                capsize=3,
                color="#dc2626" if neg else None,
                label=kind.replace("_", " "),
            )
        ax.set_xlabel("scale" if name != "feature" else "feature value")
        ax.set_ylabel("accuracy")
        ax.set_title(name, fontsize=10)
        ax.legend(frameon=False, fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def section_drift(run: Path) -> Section:
    title = "SAE drift across RL checkpoints"
    drift = _jdict(run / "drift" / "drift.json")
    if drift is None:
        return not_run("drift", title, "drift/drift.json")
    sec = Section("drift", title)
    stages, feats = drift_rows(drift)
    for k in ("run", "model", "layer", "n_tokens", "n_train", "n_heldout", "nmse_definition"):
        if drift.get(k) is not None and not isinstance(drift.get(k), dict | list):
            sec.facts.append((k, fmt(drift[k])))
    for k, label in (
        ("dnmse_per_step_fit", "ΔNMSE/step (base SAE, fit)"),
        ("dnmse_refit_per_step_fit", "ΔNMSE/step (refits, fit)"),
    ):
        if _num(drift.get(k)) is not None:
            sec.facts.append((label, f"{float(drift[k]):+.3e}"))
    t = generic_table(
        "Per RL checkpoint (held-out NMSE of the base SAE, the previous stage's SAE and the refit)",
        stages,
        first=DRIFT_STAGE_COLUMNS,
        rest=False,
    )
    if t:
        sec.tables.append(t)
    steps = [r.get("step") for r in stages]
    t = drift_feature_table(feats, steps)
    if t:
        sec.tables.append(t)
    if not stages and not feats:
        sec.notes.append("drift.json has no stages")
    _add_plot(
        sec,
        "Drift",
        lambda: drift_plot(stages, feats),
        "held-out NMSE per checkpoint; decoder drift of the pack's features (green helpful, red harmful)",
    )
    return sec


def drift_plot(rows: Sequence[Mapping[str, Any]], feats: Sequence[Mapping[str, Any]] = ()) -> Any:
    keys = [k for k in ("nmse_base", "nmse_prev", "nmse_refit") if series(rows, k)[0]]
    steps = [_num(r.get("step")) for r in rows]
    feat_lines = [
        f
        for f in feats
        if isinstance(f.get("dec_drift"), list) and len(f["dec_drift"]) == len(steps) and None not in steps
    ]
    if not keys and not feat_lines:
        return None
    n = int(bool(keys)) + int(bool(feat_lines))
    fig = _figure(5.2 * n, 3.2)
    i = 0
    if keys:
        i += 1
        ax = fig.add_subplot(1, n, i)
        names = {
            "nmse_base": "base SAE",
            "nmse_prev": "previous stage's SAE",
            "nmse_refit": "warm-started refit",
        }
        for k in keys:
            ax.plot(*series(rows, k), marker="o", ms=4, label=names[k])
        ax.set_xlabel("RL step")
        ax.set_ylabel("held-out NMSE")
        ax.legend(frameon=False, fontsize=8)
        ax.grid(alpha=0.3)
    if feat_lines:
        i += 1
        ax = fig.add_subplot(1, n, i)
        colours = {"helpful": "#16a34a", "harmful": "#dc2626"}
        for f in feat_lines:
            ax.plot(
                steps, f["dec_drift"], color=colours.get(str(f.get("polarity")), "#6b7280"), alpha=0.7, lw=1
            )
        xs, ys = series(rows, "dec_drift_mean")
        if xs:
            ax.plot(xs, ys, "k--", lw=1.5, label="mean over all latents")
            ax.legend(frameon=False, fontsize=8)
        ax.set_xlabel("RL step")
        ax.set_ylabel("1 − cos(W_dec, base W_dec)")
        ax.set_title("decoder drift of pack features", fontsize=10)
        ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------------------------------
# Per-token mech reward view
# --------------------------------------------------------------------------------------------------


def token_colour(z: float, saturate: float = Z_SATURATE) -> str:
    """Diverging background for a z-scored reward: green for positive, red for negative, alpha ∝ |z|.

    ``z = 0`` is fully transparent; ``|z| >= saturate`` is the full colour at alpha 0.85.
    """
    if not math.isfinite(z):
        return "rgba(0, 0, 0, 0)"
    a = min(abs(z) / saturate, 1.0) * 0.85
    r, g, b = _GREEN if z > 0 else _RED
    return f"rgba({r}, {g}, {b}, {a:.3f})"


def sample_rollouts(
    correct: Sequence[bool], n: int, seed: int, eligible: Sequence[bool] | None = None
) -> list[int]:
    """Indices of up to ``n`` rollouts, half correct and half wrong (the other side fills a short one).

    Seeded: the same inputs give the same sample. Returned in index order.
    """
    ok = eligible if eligible is not None else [True] * len(correct)
    pos = [i for i, (c, e) in enumerate(zip(correct, ok, strict=True)) if c and e]
    neg = [i for i, (c, e) in enumerate(zip(correct, ok, strict=True)) if not c and e]
    n = min(n, len(pos) + len(neg))
    n_pos = min(len(pos), max(n // 2, n - len(neg)))
    n_neg = min(len(neg), n - n_pos)
    rng = random.Random(seed)
    return sorted(rng.sample(pos, n_pos) + rng.sample(neg, n_neg))


def zscore_stats(values: Iterable[float], eps: float = 1e-6) -> tuple[float, float]:
    """Mean and population SD (+ ``eps``), as :func:`saereward.rl.reward.masked_zscore` normalizes."""
    vals = [float(v) for v in values]
    if not vals:
        return 0.0, 1.0
    m = sum(vals) / len(vals)
    var = sum((v - m) ** 2 for v in vals) / len(vals) if len(vals) > 1 else 0.0
    return m, math.sqrt(var) + eps


def load_tokenizer(spec: str | None) -> Any | None:
    """Just the tokenizer of a model spec, as cheaply as possible; ``None`` (logged) if it cannot be had.

    ``embedded:<key>``: the converted cache folder if it exists (about 1 s), else the tokenizer alone
    from the package's GGUF (a few seconds; the weights are not read). A ``.gguf`` file likewise; a
    folder or a hub id: ``AutoTokenizer`` from local files only.
    """
    if not spec:
        return None
    try:
        from transformers import AutoTokenizer

        if spec.startswith(EMBEDDED_PREFIX):
            key = spec[len(EMBEDDED_PREFIX) :]
            folder = cache_dir() / "models" / key
            if (folder / "saereward_source.json").is_file():
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            gguf = embedded_gguf_path(key)
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        p = Path(spec).expanduser()
        if p.is_file():
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(str(p) if p.is_dir() else spec, local_files_only=True)
    except Exception as exc:  # any loader failure only degrades the viewer to token ids
        log.warning("tokenizer of %s unavailable (%s: %s): showing token ids", spec, type(exc).__name__, exc)
        return None


def token_pieces(tokenizer: Any | None, ids: Sequence[int]) -> list[str]:
    """The text each token adds, by incremental decoding (multi-byte characters land on their last token)."""
    if tokenizer is None:
        return [f"⟨{i}⟩" for i in ids]
    out: list[str] = []
    prev = ""
    for j in range(len(ids)):
        cur = tokenizer.decode(
            list(ids[: j + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if cur.startswith(prev) and (not cur.endswith("\ufffd") or j == len(ids) - 1):
            out.append(cur[len(prev) :])
            prev = cur
        elif cur.startswith(prev):
            out.append("")  # an incomplete UTF-8 sequence: the next token shows the character
        else:
            out.append(tokenizer.decode([ids[j]], skip_special_tokens=False))
            prev = cur
    return out


def _model_spec(folder: Path) -> str | None:
    for rel in ("config.json", "summary.json"):
        d = _jdict(folder / rel)
        if d and isinstance(d.get("model"), str):
            return str(d["model"])
    return None


def _sae_path(run: Path, pack: Any) -> Path | None:
    """The SAE the pack indexes: the run's own ``sae/sae`` first (a copied or moved run must not read
    the original's), else the path the pack recorded. A hash that differs from the one the pack
    recorded is logged (the pack may have been discovered on another SAE)."""
    for cand in (run / "sae" / "sae", pack.metadata.get("sae_path"), pack.sae_id):
        if not cand or not Path(cand).expanduser().exists():
            continue
        path = Path(cand).expanduser()
        want = pack.metadata.get("sae_sha256")
        if want and file_sha256(path) != want:
            log.warning("the SAE at %s differs from the one the pack was discovered on (sha256)", path)
        return path
    return None


def view_key(run: Path, cfg: ReportConfig) -> dict[str, Any]:
    """What the cached view depends on: the sample settings and the pack and token files."""
    tok = run / "rollouts" / "tokens.safetensors"
    st = tok.stat()
    return {
        "format_version": TOKEN_VIEW_VERSION,
        "max_rollouts": cfg.max_rollouts,
        "seed": cfg.seed,
        "pack_sha256": file_sha256(run / "pack.json"),
        "tokens": {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
    }


def compute_token_view(run: Path, cfg: ReportConfig) -> dict[str, Any]:
    """Score every response token with the pack (the R1 per-token reward) and build the viewer's sample."""
    import torch
    from safetensors import safe_open

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    folder = run / "rollouts"
    rows = read_jsonl(folder / "rollouts.jsonl")
    pack = load_pack(run / "pack.json")
    sae_path = _sae_path(run, pack)
    if sae_path is None:
        raise SaeRewardError(
            f"the pack's SAE is not found (tried {pack.metadata.get('sae_path')}, {run}/sae/sae)"
        )
    sae = load_sae(sae_path)
    with safe_open(str(folder / "tokens.safetensors"), "pt") as fh:
        names = set(fh.keys())
        layers = sorted(int(k.split("_")[1]) for k in names if k.startswith("layer_"))
        layer = pack.layer if pack.layer is not None else sae.cfg.layer
        if layer is None and len(layers) == 1:
            layer = layers[0]
        if layer is None or f"layer_{layer}" not in names:
            raise SaeRewardError(
                f"rollouts/tokens.safetensors keeps layers {layers}, not the pack's layer {layer}"
            )
        x = fh.get_tensor(f"layer_{layer}")
        offsets = fh.get_tensor("offsets").long()
        token_ids = fh.get_tensor("token_ids").long() if "token_ids" in names else None
    if offsets.shape[0] != len(rows) + 1 or int(offsets[-1]) != x.shape[0]:
        raise SaeRewardError(
            "rollouts.jsonl and tokens.safetensors disagree on the responses: re-run rollouts"
        )
    scorer = PackScorer(sae, pack, d_model=int(x.shape[1]))
    mech = scorer.token_scores(x).float()  # [N]: mech(t), exactly the R1 reward's per-token score
    resp = segment_mean(mech, offsets)  # [R]: the G1 statistic
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    correct = [bool(r.get("correct")) for r in rows]
    idx = sample_rollouts(correct, cfg.max_rollouts, cfg.seed, [n > 0 for n in lengths])
    spec = _model_spec(folder)
    tokenizer = load_tokenizer(spec) if token_ids is not None else None
    shown = []
    for r in idx:
        a, b = int(offsets[r]), int(offsets[r + 1])
        ids = token_ids[a:b].tolist() if token_ids is not None else []
        row = rows[r]
        shown.append(
            {
                "rid": r,
                "qid": row.get("qid"),
                "split": row.get("split"),
                "correct": correct[r],
                "prompt": row.get("prompt", ""),
                "completion": row.get("completion", ""),
                "extracted": row.get("extracted"),
                "gold": row.get("gold"),
                "score": float(resp[r]),
                "ids": ids,
                "text": token_pieces(tokenizer, ids) if ids else [f"#{t}" for t in range(a, b)],
                "mech": [round(float(v), 5) for v in mech[a:b].tolist()],
            }
        )
    mean, sd = zscore_stats(v for s in shown for v in s["mech"])
    return {
        "format": TOKEN_VIEW_FORMAT,
        "layer": int(layer),
        "model": spec,
        "tokenizer": tokenizer is not None,
        "sae": str(sae_path),
        "pack": str(run / "pack.json"),
        "z_mean": mean,
        "z_sd": sd,
        "response_scores": [round(float(v), 6) for v in resp.tolist()],
        "correct": correct,
        "split": [r.get("split") for r in rows],
        "responses": shown,
    }


def token_view(run: Path, cfg: ReportConfig) -> tuple[dict[str, Any] | None, str]:
    """The cached view if it is up to date, else a fresh one (written to ``RUN/token_rewards.json``).

    Returns ``(view or None, why none)``.
    """
    folder = run / "rollouts"
    need = [folder / "rollouts.jsonl", folder / "tokens.safetensors", run / "pack.json"]
    missing = [p for p in need if not p.is_file()]
    if missing:
        return None, f"not run ({missing[0].relative_to(run)} is missing)"
    key = view_key(run, cfg)
    cache = run / "token_rewards.json"
    old = _jdict(cache)
    if old and not cfg.recompute and old.get("key") == key and old.get("format") == TOKEN_VIEW_FORMAT:
        log.info("token view: reusing %s", cache)
        return old, ""
    t0 = time.perf_counter()
    try:
        view = compute_token_view(run, cfg)
    except SaeRewardError as exc:
        log.warning("token view unavailable: %s", exc)
        return None, str(exc)
    except Exception as exc:  # a corrupt tensor file etc.: the rest of the report still renders
        log.exception("token view failed")
        return None, f"failed: {type(exc).__name__}: {exc}"
    view["key"] = key
    view["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(cache, view)
    return view, ""


def viewer_items(view: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per shown rollout: the token spans (text, colour, tooltip) the template renders."""
    mean, sd = float(view.get("z_mean", 0.0)), float(view.get("z_sd", 1.0)) or 1.0
    items = []
    for r in view.get("responses", []):
        spans = []
        ids = r.get("ids") or []
        for j, (text, m) in enumerate(zip(r.get("text", []), r.get("mech", []), strict=False)):
            z = (float(m) - mean) / sd
            tid = f"id {ids[j]}, " if j < len(ids) else ""
            spans.append({"text": text, "bg": token_colour(z), "title": f"{tid}mech {m:+.4f}, z {z:+.2f}"})
        prompt = str(r.get("prompt") or "")
        items.append(
            {
                "rid": r.get("rid"),
                "qid": r.get("qid"),
                "split": r.get("split"),
                "correct": bool(r.get("correct")),
                "score": fmt3(r.get("score")),
                "extracted": fmt(r.get("extracted")),
                "gold": fmt(r.get("gold")),
                "prompt": prompt,
                "question": " ".join([ln for ln in prompt.splitlines() if ln.strip()][-2:])[-200:],
                "spans": spans,
            }
        )
    return items


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


def build_context(run: Path, cfg: ReportConfig) -> dict[str, Any]:
    view, why = token_view(run, cfg)
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
    items = viewer_items(view) if view else []
    return {
        "title": f"saereward report: {run.name}",
        "run_dir": str(run),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": __version__,
        "sections": sections,
        "configs": collect_configs(run),
        "viewer": {
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
        },
    }


def run_report(cfg: ReportConfig) -> Path:
    """Write the HTML report of ``cfg.run_dir`` (atomically) and return its path."""
    run = Path(cfg.run_dir).expanduser()
    if not run.is_dir():
        raise SaeRewardError(f"run folder {run} not found: pass the folder `saereward pipeline` wrote")
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


__all__ = [
    "ReportConfig",
    "compute_token_view",
    "fmt",
    "load_tokenizer",
    "run_report",
    "sample_rollouts",
    "token_colour",
    "token_pieces",
]
