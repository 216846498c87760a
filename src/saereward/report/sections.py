"""The report's sections: what the template renders, and one builder per stage.

A builder reads its stage's artifacts (:mod:`saereward.report.artifacts`) and returns a
:class:`Section` of facts, tables (:mod:`saereward.report.tables`) and plots
(:mod:`saereward.plots`, embedded as ``data:`` URIs), or a "not run" section when its artifact is
missing. The gates' sections are in :mod:`saereward.report.gate_sections`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saereward import plots
from saereward.plots import as_dict, as_float
from saereward.report.artifacts import (
    STAGE_ARTIFACTS,
    drift_rows,
    last,
    read_dict,
    read_log,
    steer_base,
    steer_rows,
)
from saereward.report.tables import Table, fmt, fmt3, fmt_ci, fmt_rate, generic_table

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# What the template renders
# --------------------------------------------------------------------------------------------------


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


def not_run(sid: str, title: str, missing: Path | str, run: Path | None = None) -> Section:
    """A section whose stage left no output; with ``run``, a file that is there but unreadable says so."""
    if run is not None and (run / missing).is_file():
        return Section(
            sid, title, ran=False, reason=f"not shown ({missing} is unreadable or not a JSON object)"
        )
    return Section(sid, title, ran=False, reason=f"not run ({missing} is missing)")


def volatile(value: str) -> Any:
    """A value that measures the machine or the clock (times): marked so two runs' reports can be compared."""
    from markupsafe import Markup, escape

    return Markup('<span class="volatile">{}</span>').format(escape(value))


def make_plot(title: str, make: Callable[[], Any], caption: str = "") -> Plot | None:
    """Run a plot builder; ``None`` (and a log line) if it has nothing to draw or fails on odd data."""
    try:
        fig = make()
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        log.warning("plot %r skipped: %s: %s", title, type(exc).__name__, exc)
        return None
    if fig is None:
        return None
    return Plot(title, plots.png_uri(fig), caption)


def add_plot(sec: Section, title: str, make: Callable[[], Any], caption: str = "") -> bool:
    """Add the plot to ``sec`` when it has something to draw; whether it did."""
    p = make_plot(title, make, caption)
    if p:
        sec.plots.append(p)
    return p is not None


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def section_overview(run: Path) -> Section:
    sec = Section("overview", "Stages and timings")
    records = read_dict(run / "stages.json") or {}
    rows = []
    for stage, rel in STAGE_ARTIFACTS.items():
        rec = as_dict(records.get(stage))
        done = (run / rel).exists()
        seconds = as_float(rec.get("seconds"))
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


def _sae_metrics(held: Mapping[str, Any], ce: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("FVU", held.get("fvu")),
        ("FVU 95 % CI (bootstrap over sequences)", held.get("fvu_ci")),
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
        ("CE loss recovered 95 % CI (bootstrap over texts)", ce.get("ce_loss_recovered_ci")),
        ("KL with SAE", ce.get("kl_sae")),
        ("KL zero-ablated", ce.get("kl_zero")),
        ("KL recovered", ce.get("kl_recovered")),
        ("KL recovered 95 % CI (bootstrap over texts)", ce.get("kl_recovered_ci")),
        ("CE/KL tokens", ce.get("n_tokens")),
    ]


def section_sae(run: Path) -> Section:
    sec = Section("sae", "SAE")
    ev = read_dict(run / "sae" / "sae" / "eval.json")
    flat = read_dict(run / "sae" / "eval.json")
    log_rows = read_log(run / "sae" / "train_log.jsonl")
    if ev is None and flat is None and not log_rows:
        return not_run("sae", "SAE", "sae/sae/eval.json", run)
    held = as_dict(as_dict(ev).get("heldout")) or as_dict(flat)
    ce = as_dict(as_dict(ev).get("ce_kl"))
    for key in ("d_in", "d_sae", "k"):
        if ev and key in ev:
            sec.facts.append((key, fmt(ev[key])))
    layer = held.get("layer", as_dict(flat).get("layer", ce.get("layer")))
    if layer is not None:
        sec.facts.append(("layer", fmt(layer)))
    rows = [[name, fmt(v)] for name, v in _sae_metrics(held, ce) if v is not None]
    if rows:
        sec.tables.append(Table("Held-out metrics", ["metric", "value"], rows))
    if not ce:
        sec.notes.append("CE/KL recovered: not measured (eval-sae ran without a model)")
    add_plot(
        sec,
        "SAE training curves",
        lambda: plots.sae_training_curves(log_rows),
        "FVU (log scale), L0 and dead features % against the step",
    )
    return sec


def section_rollouts(run: Path) -> Section:
    folder = run / "rollouts"
    summ = read_dict(folder / "summary.json")
    if summ is None:
        return not_run("rollouts", "Rollouts", "rollouts/summary.json", run)
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
    lm = read_dict(run / "rollouts" / "layer_map.json")
    if lm is None:
        return not_run("layers", "Layer map", "rollouts/layer_map.json", run)
    sec = Section("layers", "Layer map")
    scores = {int(k): float(v) for k, v in as_dict(lm.get("scores")).items() if as_float(v) is not None}
    for k in ("split", "n_responses", "n_correct", "peak_layer"):
        if lm.get(k) is not None:
            sec.facts.append((k, fmt(lm[k])))
    top = as_dict(lm.get("config")).get("top")
    if scores:
        best = sorted(scores.items(), key=lambda kv: -kv[1])[:5]
        sec.tables.append(
            Table(
                "Top layers",
                ["rank", "layer", f"mean |Cohen's d| of the top {top or '?'} dims"],
                [[str(i + 1), str(L), fmt3(s)] for i, (L, s) in enumerate(best)],
            )
        )
    for plot in (
        make_plot(
            "Layer map",
            lambda: plots.layer_scores(scores, lm.get("peak_layer")),
            "correct-vs-wrong separation of the pooled residual per layer",
        ),
        make_plot(
            "Logit lens",
            lambda: plots.logit_lens(lm),
            "probability of the answer's first token read off each layer",
        ),
    ):
        if plot:
            sec.plots.append(plot)
    return sec


def _pack_rows(pack: Mapping[str, Any]) -> list[list[str]]:
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
    return rows


_PACK_COLUMNS = [
    "sign",
    "feature",
    "weight",
    "Cohen's d",
    "mean correct",
    "mean wrong",
    "active",
    "validated",
]


def section_pack(run: Path) -> Section:
    pack = read_dict(run / "pack.json")
    if pack is None:
        return not_run("pack", "Feature pack", "pack.json", run)
    sec = Section("pack", "Feature pack")
    meta = as_dict(pack.get("metadata"))
    for k, v in (
        ("name", pack.get("name")),
        ("layer", meta.get("target_layer")),
        ("SAE", meta.get("sae_path", pack.get("sae_id"))),
        ("description", pack.get("description")),
    ):
        if v is not None:
            sec.facts.append((k, fmt(v)))
    rows = _pack_rows(pack)
    if rows:
        sec.tables.append(Table("Features", list(_PACK_COLUMNS), rows))
    return sec


# --------------------------------------------------------------------------------------------------
# Steering and drift
# --------------------------------------------------------------------------------------------------

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


def _steer_facts(sec: Section, steer: Mapping[str, Any], base: Mapping[str, Any] | None) -> None:
    task = steer.get("task")
    rn, vec, feat = (
        as_dict(steer.get("residual_norm")),
        as_dict(steer.get("vector")),
        as_dict(steer.get("feature")),
    )
    for k, v in (
        ("layer", steer.get("layer")),
        ("questions", steer.get("n")),
        ("task", as_dict(task).get("name", task if isinstance(task, str) else None)),
        ("seed", steer.get("seed")),
        ("direction", vec.get("source")),
        ("mean residual norm", rn.get("value")),
        ("feature", f"{feat.get('id')} ({feat.get('mode')})" if feat else None),
    ):
        if v is not None:
            sec.facts.append((k, fmt(v)))
    if base is not None:
        sec.facts.append(("unsteered accuracy", fmt_rate(base)))


def section_steer(run: Path) -> Section:
    title = "Steering"
    steer = read_dict(run / "steer" / "steer.json")
    if steer is None:
        return not_run("steer", title, "steer/steer.json", run)
    sec = Section("steer", title)
    rows = steer_rows(steer)
    base = steer_base(rows)
    _steer_facts(sec, steer, base)
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
    add_plot(
        sec,
        "Steering sweep",
        lambda: plots.steer_sweep(rows, base),
        "accuracy against the scale (vector: fraction of the mean residual norm; feature: SAE activation units); "
        "grey band: unsteered accuracy with its CI",
    )
    return sec


def drift_feature_table(feats: Sequence[Mapping[str, Any]], steps: Sequence[Any]) -> Table | None:
    """Per pack feature: decoder drift and activation at the first and last stage."""
    if not feats:
        return None
    first, final = (steps[0], steps[-1]) if steps else ("first", "last")
    rows = [
        [
            fmt(f.get("feature")),
            fmt(f.get("polarity")),
            fmt(f.get("weight")),
            fmt3(last(f.get("dec_drift"))),
            fmt3((f.get("mean_act") or [None])[0]),
            fmt3(last(f.get("mean_act"))),
            fmt3(last(f.get("mean_act_change"))),
            fmt3((f.get("fire_frac") or [None])[0]),
            fmt3(last(f.get("fire_frac"))),
        ]
        for f in feats
    ]
    cols = [
        "feature",
        "polarity",
        "weight",
        f"decoder drift @{final}",
        f"mean act @{first}",
        f"mean act @{final}",
        "change",
        f"fire frac @{first}",
        f"fire frac @{final}",
    ]
    return Table("Per pack feature (base SAE; decoder drift = 1 − cos to the base decoder)", cols, rows)


def _drift_facts(sec: Section, drift: Mapping[str, Any]) -> None:
    for k in ("run", "model", "layer", "n_tokens", "n_train", "n_heldout", "nmse_definition"):
        if drift.get(k) is not None and not isinstance(drift.get(k), dict | list):
            sec.facts.append((k, fmt(drift[k])))
    for k, label in (
        ("dnmse_per_step_fit", "ΔNMSE/step (base SAE, fit)"),
        ("dnmse_refit_per_step_fit", "ΔNMSE/step (refits, fit)"),
    ):
        if as_float(drift.get(k)) is not None:
            sec.facts.append((label, f"{float(drift[k]):+.3e}"))


def section_drift(run: Path) -> Section:
    title = "SAE drift across RL checkpoints"
    drift = read_dict(run / "drift" / "drift.json")
    if drift is None:
        return not_run("drift", title, "drift/drift.json", run)
    sec = Section("drift", title)
    stages, feats = drift_rows(drift)
    _drift_facts(sec, drift)
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
    add_plot(
        sec,
        "Drift",
        lambda: plots.drift(stages, feats),
        "held-out NMSE per checkpoint; decoder drift of the pack's features (green helpful, red harmful)",
    )
    return sec


__all__ = [
    "Plot",
    "Section",
    "add_plot",
    "make_plot",
    "not_run",
    "section_drift",
    "section_layers",
    "section_overview",
    "section_pack",
    "section_rollouts",
    "section_sae",
    "section_steer",
    "volatile",
]
