"""Every figure of the package, for the stages (PNG files) and the report (embedded PNGs).

Pure: each figure function takes plain data (rows and dicts as the stages write them to JSON) and
returns a matplotlib ``Figure``, or ``None`` when it has nothing to draw. Figures are
``matplotlib.figure.Figure`` objects, not pyplot state, rendered by matplotlib's Agg renderer when
saved: :func:`save_png` writes a stage's file, :func:`png_uri` makes the report's ``data:`` URI.
matplotlib is imported on first use only. Values read from JSON are read defensively: a missing or
non-numeric value leaves its point (or panel) out rather than failing.

The module also holds the small helpers that read numbers out of JSON artifacts and write them as
text (:func:`as_float`, :func:`as_dict`, :func:`fmt_num`, :func:`fmt_or_dash`), shared by the
figures, the report and the stages' text tables.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saereward.io import save_figure

log = logging.getLogger(__name__)

#: Arm labels of the G2 rewards, and each label's colour.
ARM_LABELS = {"outcome": "R0", "sae": "R1", "direction": "R2"}
REWARD_COLOURS = {"R0": "#6b7280", "R1": "#2563eb", "R2": "#d97706"}
_POLARITY_COLOURS = {"helpful": "#16a34a", "harmful": "#dc2626"}
_VECTOR_KINDS = ("vector", "negative_control")
_FEATURE_KINDS = ("feature_add", "feature_clamp")

# --------------------------------------------------------------------------------------------------
# Numbers read from JSON artifacts, and numbers written as text
# --------------------------------------------------------------------------------------------------


def as_float(v: Any) -> float | None:
    """``v`` as a float if it is a JSON number (a bool is not), else ``None``."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def as_dict(v: Any) -> dict[str, Any]:
    """``v`` if it is a dict, else an empty one (for reading nested keys of JSON that may lack them)."""
    return v if isinstance(v, dict) else {}


def fmt_num(v: Any, digits: int = 3) -> str:
    """A number to ``digits`` decimals; ``—`` for anything that is not a number, ``undefined`` for NaN."""
    if not isinstance(v, int | float):
        return "—"
    return "undefined" if math.isnan(v) else f"{v:.{digits}f}"


def fmt_stat(v: Any, digits: int = 3) -> str:
    """:func:`fmt_num` for a statistic that was computed: ``None`` is one that is undefined (strict JSON
    writes NaN as ``null``), so it prints ``undefined``, not ``—``."""
    return "undefined" if v is None else fmt_num(v, digits)


def fmt_or_dash(v: Any, spec: str) -> str:
    """``format(v, spec)``, or ``-`` for a missing value (``None``): a cell of a fixed-width text table."""
    return "-" if v is None else format(v, spec)


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` over log rows: rows without a numeric step or a finite value are skipped."""
    xs, ys = [], []
    for r in rows:
        x, y = as_float(r.get("step")), as_float(r.get(key))
        if x is not None and y is not None and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _yerr(v: float, lo: Any, hi: Any) -> tuple[float, float]:
    """Error-bar extents below and above ``v`` from CI bounds (0 where a bound is missing)."""
    lo_f, hi_f = as_float(lo), as_float(hi)
    return (max(0.0, v - lo_f) if lo_f is not None else 0.0, max(0.0, hi_f - v) if hi_f is not None else 0.0)


# --------------------------------------------------------------------------------------------------
# Figures in and out
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


def save_png(fig: Any, path: str | Path) -> Path | None:
    """Write the figure as a PNG file (atomically); ``None`` (logged) when there was nothing to draw."""
    if fig is None:
        log.info("no plot written to %s: nothing to draw", path)
        return None
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# SAE and layers
# --------------------------------------------------------------------------------------------------


def sae_training_curves(log_rows: Sequence[Mapping[str, Any]]) -> Any:
    """FVU (log scale), L0 and dead features % of an SAE train log against the step, one panel each."""
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


def _draw_layer_scores(ax: Any, scores: Mapping[int, float], peak: Any) -> None:
    xs = sorted(scores)
    ax.plot(xs, [scores[x] for x in xs], marker="o", ms=3, color="#2563eb")
    if peak is not None and int(peak) in scores:
        ax.axvline(int(peak), color="#dc2626", ls="--", lw=1, label=f"peak layer {peak}")
        ax.legend(frameon=False)
    ax.set_xlabel("layer")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)


def lens_lines(layer_map: Mapping[str, Any]) -> list[tuple[str, list[float]]]:
    """``(label, P(answer token) per layer)`` of the logit lenses a ``layer_map.json`` holds."""
    lines = []
    for key, label in (("logit_lens", "final norm applied"), ("logit_lens_raw", "raw residual")):
        d = layer_map.get(key)
        if isinstance(d, dict) and isinstance(d.get("answer_prob"), list) and d["answer_prob"]:
            lines.append((label, [float(x) for x in d["answer_prob"]]))
    return lines


def _draw_logit_lens(ax: Any, lines: Sequence[tuple[str, Sequence[float]]]) -> None:
    for label, ys in lines:
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("P(answer token)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)


def layer_scores(scores: Mapping[int, float], peak: Any) -> Any:
    """Correct-vs-wrong separation per layer, the peak layer marked."""
    if not scores:
        return None
    fig = _figure(6.4, 3.0)
    _draw_layer_scores(fig.add_subplot(1, 1, 1), scores, peak)
    return fig


def logit_lens(layer_map: Mapping[str, Any]) -> Any:
    """Probability of the answer's first token read off each layer (with and without the final norm)."""
    lines = lens_lines(layer_map)
    if not lines:
        return None
    fig = _figure(6.4, 3.0)
    _draw_logit_lens(fig.add_subplot(1, 1, 1), lines)
    return fig


def layer_map(scores: Mapping[int, float], peak: Any, lm: Mapping[str, Any]) -> Any:
    """:func:`layer_scores` and, when the layer map ``lm`` has one, :func:`logit_lens`, side by side."""
    lines = lens_lines(lm)
    if not scores and not lines:
        return None
    n = int(bool(scores)) + int(bool(lines))
    fig = _figure(6.4 * n, 3.0)
    if scores:
        _draw_layer_scores(fig.add_subplot(1, n, 1), scores, peak)
    if lines:
        _draw_logit_lens(fig.add_subplot(1, n, n), lines)
    return fig


# --------------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------------


def g1_scatter(scores: Sequence[float], correct: Sequence[bool], seed: int, rho: Any) -> Any:
    """Pack score per response, wrong vs correct (x jittered, seeded), each group's mean as a bar."""
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
    if as_float(rho) is not None:
        title += f" (Spearman ρ = {float(rho):.3f})"
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="y")
    return fig


def g2_accuracy_by_step(curves: Mapping[str, Any]) -> Any:
    """Held-out accuracy by step per arm: thin lines per seed, a thick line for the mean over seeds.

    ``curves``: ``{reward: {seed: [(step, accuracy), ...]}}`` (``gate_g2.json``'s ``curves``).
    """
    if not curves:
        return None
    fig = _figure(6.4, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for reward, per_seed in curves.items():
        label = ARM_LABELS.get(reward, reward)
        colour = REWARD_COLOURS.get(label)
        by_step: dict[float, list[float]] = {}
        for pts in as_dict(per_seed).values():
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


def g2_bars(table: Mapping[str, Any]) -> Any:
    """Pooled held-out accuracy per reward (``gate_g2.json``'s ``table``), Wilson CI whiskers, step 0 dotted."""
    items = [(str(d.get("label", r)), d) for r, d in table.items() if isinstance(d, dict)]
    items = [(lab, d) for lab, d in items if as_float(d.get("accuracy")) is not None]
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
        color=[REWARD_COLOURS.get(lab, "#6b7280") for lab, _ in items],
    )
    starts = [as_float(d.get("start_accuracy")) for _, d in items]
    if any(s is not None for s in starts):
        s0 = next(s for s in starts if s is not None)
        ax.axhline(s0, color="black", ls=":", lw=1, label="step 0")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xticks(xs, [lab for lab, _ in items])
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3, axis="y")
    return fig


def collapse_stops(collapse: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per arm label, the steps where the collapse guard stopped a run (``gate_g2.json``'s ``collapse``)."""
    stops: dict[str, list[float]] = {}
    for arm in collapse.values():
        for c in as_dict(as_dict(arm).get("runs")).values():
            if as_dict(c).get("collapsed") and as_float(c.get("step")) is not None:
                stops.setdefault(str(as_dict(arm).get("label")), []).append(float(c["step"]))
    return stops


def completion_length(curves: Mapping[str, Any], stops: Mapping[str, Sequence[float]] | None = None) -> Any:
    """Mean completion length per step and arm, over the seeds that reached the step.

    ``curves``: ``{reward or label: {seed: [(step, length), ...]}}``; ``stops``: per arm label, the
    steps where the collapse guard stopped a run (marked ``x``).
    """
    per_label: dict[str, dict[float, list[float]]] = {}
    for reward, per_seed in curves.items():
        label = ARM_LABELS.get(reward, reward)
        for pts in as_dict(per_seed).values():
            for x, y in pts:
                per_label.setdefault(label, {}).setdefault(x, []).append(y)
    if not per_label:
        return None
    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, by_step in sorted(per_label.items()):
        steps = sorted(by_step)
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        colour = REWARD_COLOURS.get(label)
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


def rl_curves(logs: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]]) -> Any:
    """One panel per train-log key of :data:`RL_KEYS`; ``logs``: ``{(arm label, seed): rows}``."""
    keys = [(k, t) for k, t in RL_KEYS if any(series(rows, k)[0] for rows in logs.values())]
    if not keys:
        return None
    fig = _figure(10.0, 5.2)
    ncol = 3
    nrow = (len(keys) + ncol - 1) // ncol
    labelled: set[tuple[str, str]] = set()
    for i, (k, t) in enumerate(keys):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for (label, _seed), rows in sorted(logs.items()):
            xs, ys = series(rows, k)
            if not xs:
                continue
            name = label if (label, k) not in labelled else None
            labelled.add((label, k))
            ax.plot(
                xs,
                ys,
                marker="o" if len(xs) < 12 else None,
                ms=3,
                lw=1.1,
                alpha=0.8,
                color=REWARD_COLOURS.get(label),
                label=name,
            )
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(frameon=False, fontsize=8)
    return fig


def canary_bars(rates: Mapping[str, Any], classes: Sequence[str]) -> Any:
    """Share of canary prompts per class, base vs trained policy, Wilson CI whiskers."""
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
            d = as_dict(rates[pol].get(c))
            v = as_float(d.get("p")) or 0.0
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


def truncation_audit(
    forms: Mapping[str, Any], warn_sigma: float, n_completions: int, profile: Sequence[float | None]
) -> Any:
    """Each reward form's gain from cutting after ``k`` tokens (in σ, with its CI band where the audit
    has one; the ±warn band in grey), and the mean per-token score per response position."""
    fig = _figure(9, 3.4)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for form, r in forms.items():
        ks = [int(k) for k, v in r["cut"].items() if v["gain_sigma"] is not None]
        line = ax.plot(ks, [r["cut"][str(k)]["gain_sigma"] for k in ks], marker="o", label=form)[0]
        cis = [r["cut"][str(k)].get("gain_sigma_ci") for k in ks]
        if ks and all(cis):
            ax.fill_between(ks, [c[0] for c in cis], [c[1] for c in cis], color=line.get_color(), alpha=0.15)
    ax.axhspan(-warn_sigma, warn_sigma, color="0.9", zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("cut after k tokens")
    ax.set_ylabel("reward gain from cutting (σ)")
    ax.set_title(f"truncation audit (n={n_completions})")
    ax.legend(fontsize=8)
    ax2.plot(range(len(profile)), [float("nan") if p is None else p for p in profile], marker=".")
    ax2.set_xlabel("response position")
    ax2.set_ylabel("mean per-token score")
    ax2.set_title("the score's position profile")
    return fig


# --------------------------------------------------------------------------------------------------
# Steering and drift
# --------------------------------------------------------------------------------------------------


def _steer_panels(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """``(vector | feature | other, rows)`` of the steered rows that have a scale and an accuracy."""
    pts = [
        r for r in rows if as_float(r.get("scale")) is not None and as_float(r.get("accuracy")) is not None
    ]
    pts = [r for r in pts if r.get("kind") != "base"]
    panels = [
        (name, [r for r in pts if r.get("kind") in kinds])
        for name, kinds in (("vector", _VECTOR_KINDS), ("feature", _FEATURE_KINDS))
    ]
    other = [r for r in pts if r.get("kind") not in _VECTOR_KINDS + _FEATURE_KINDS]
    return [(n, rs) for n, rs in panels if rs] + ([("other", other)] if other else [])


def _draw_steer_panel(
    ax: Any, name: str, rs: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None
) -> None:
    if base is not None and as_float(base.get("accuracy")) is not None:
        ax.axhline(float(base["accuracy"]), color="gray", lw=1.2, label="unsteered")
        lo, hi = as_float(base.get("ci_low")), as_float(base.get("ci_high"))
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


def steer_sweep(rows: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None) -> Any:
    """Accuracy (Wilson CI whiskers) against the scale, one panel per kind of steering (vector,
    feature, other), the unsteered accuracy as a grey line with its CI band; ``rows``: ``steer.json``'s."""
    panels = _steer_panels(rows)
    if not panels:
        return None
    fig = _figure(5.2 * len(panels), 3.4)
    for i, (name, rs) in enumerate(panels):
        _draw_steer_panel(fig.add_subplot(1, len(panels), i + 1), name, rs, base)
    return fig


_NMSE_NAMES = {
    "nmse_base": "base SAE",
    "nmse_prev": "previous stage's SAE",
    "nmse_refit": "warm-started refit",
}


def _draw_drift_nmse(ax: Any, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    for k in keys:
        ax.plot(*series(rows, k), marker="o", ms=4, label=_NMSE_NAMES[k])
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out NMSE")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)


def _draw_drift_decoder(
    ax: Any, rows: Sequence[Mapping[str, Any]], steps: Sequence[Any], feats: Sequence[Mapping[str, Any]]
) -> None:
    for f in feats:
        ax.plot(
            steps,
            f["dec_drift"],
            color=_POLARITY_COLOURS.get(str(f.get("polarity")), "#6b7280"),
            alpha=0.7,
            lw=1,
        )
    xs, ys = series(rows, "dec_drift_mean")
    if xs:
        ax.plot(xs, ys, "k--", lw=1.5, label="mean over all latents")
        ax.legend(frameon=False, fontsize=8)
    ax.set_xlabel("RL step")
    ax.set_ylabel("1 − cos(W_dec, base W_dec)")
    ax.set_title("decoder drift of pack features", fontsize=10)
    ax.grid(alpha=0.3)


def _draw_drift_activation(ax: Any, steps: Sequence[Any], feats: Sequence[Mapping[str, Any]]) -> None:
    for f in feats:
        colour = _POLARITY_COLOURS.get(str(f.get("polarity")), "#6b7280")
        ax.plot(steps, f["mean_act_change"], color=colour, alpha=0.7, lw=1)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean activation − stage 0 (base SAE)")
    ax.set_title("activation of pack features", fontsize=10)
    ax.grid(alpha=0.3)


def drift(
    rows: Sequence[Mapping[str, Any]], feats: Sequence[Mapping[str, Any]] = (), activation: bool = False
) -> Any:
    """Held-out NMSE per RL checkpoint (base SAE, previous stage's SAE, refit) and the decoder drift of
    the pack's features (green helpful, red harmful; dashed: the mean over all latents); with
    ``activation``, also each pack feature's mean-activation change. ``drift.json``'s ``stages`` and
    ``features``."""
    keys = [k for k in ("nmse_base", "nmse_prev", "nmse_refit") if series(rows, k)[0]]
    steps = [as_float(r.get("step")) for r in rows]
    lines = [
        f
        for f in feats
        if isinstance(f.get("dec_drift"), list) and len(f["dec_drift"]) == len(steps) and None not in steps
    ]
    act = [f for f in lines if isinstance(f.get("mean_act_change"), list)] if activation else []
    act = [f for f in act if len(f["mean_act_change"]) == len(steps)]
    if not keys and not lines:
        return None
    n = int(bool(keys)) + int(bool(lines)) + int(bool(act))
    fig = _figure(5.2 * n, 3.2)
    i = 0
    if keys:
        i += 1
        _draw_drift_nmse(fig.add_subplot(1, n, i), rows, keys)
    if lines:
        i += 1
        _draw_drift_decoder(fig.add_subplot(1, n, i), rows, steps, lines)
    if act:
        i += 1
        _draw_drift_activation(fig.add_subplot(1, n, i), steps, act)
    return fig


__all__ = [
    "ARM_LABELS",
    "REWARD_COLOURS",
    "as_dict",
    "as_float",
    "canary_bars",
    "collapse_stops",
    "completion_length",
    "drift",
    "fmt_num",
    "fmt_or_dash",
    "g1_scatter",
    "g2_accuracy_by_step",
    "g2_bars",
    "layer_map",
    "layer_scores",
    "logit_lens",
    "png_uri",
    "rl_curves",
    "sae_training_curves",
    "save_png",
    "series",
    "steer_sweep",
    "truncation_audit",
]
