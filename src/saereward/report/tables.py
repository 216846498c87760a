"""Tables of a run folder: the cells and tables of the HTML report, and a Markdown summary.

* **Cells** (:func:`fmt`, :func:`fmt3`, :func:`fmt_p`, :func:`fmt_ci`, :func:`fmt_rate`,
  :func:`ci_text`): a value read from a JSON artifact as the text of one table cell, ``—`` when it is
  missing; :class:`Table` and :func:`generic_table` make the report's tables of them.
* **Markdown summary** (:func:`results_markdown`): the headline numbers with n, seed and 95 % CIs.
  ``saereward report RUN --markdown FILE`` writes it; the README's results section is this output
  for a real ``examples/embedded.toml`` run. Reads only the JSON artifacts
  (``docs/run_layout.md``); a stage that did not run is listed as such.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saereward.plots import as_float, fmt_num, fmt_stat

# --------------------------------------------------------------------------------------------------
# Cells and tables of the HTML report
# --------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """A table of the report: its cells are already text."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


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
    if isinstance(v, list | tuple) and all(as_float(x) is not None for x in v) and len(v) <= 8:
        return "[" + ", ".join(fmt(x, digits) for x in v) + "]"
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, default=str)
    return str(v)


def fmt3(v: Any) -> str:
    """A number to 3 decimals (2 significant digits below 0.001); anything else as :func:`fmt`."""
    x = as_float(v)
    if x is None:
        return fmt(v)
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.2g}"
    return f"{x:.3f}"


def fmt_p(v: Any) -> str:
    """A p-value to 3 significant digits."""
    x = as_float(v)
    return "—" if x is None else f"{x:.3g}"


def fmt_ci(lo: Any, hi: Any) -> str:
    """``[lo, hi]`` with :func:`fmt3` bounds; ``—`` when a bound is missing."""
    if as_float(lo) is None or as_float(hi) is None:
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
    if as_float(d.get("k")) is not None and as_float(d.get("n")) is not None:
        out += f" ({fmt(d.get('k'))}/{fmt(d.get('n'))})"
    return out


def ci_text(mean: Any, lo: Any, hi: Any, unit: str = "", scale: float = 1.0) -> str:
    """``0.536 [0.385, 0.654]``, or with a unit ``-0.6 pp [-6.7, +5.0] pp`` (values times ``scale``)."""
    if as_float(mean) is None:
        return "—"
    form = "{:+.1f}" if unit else "{:.3f}"
    text = form.format(mean * scale) + (f" {unit}" if unit else "")
    if as_float(lo) is not None and as_float(hi) is not None:
        text += f" [{form.format(lo * scale)}, {form.format(hi * scale)}]" + (f" {unit}" if unit else "")
    return text


def _table_columns(rows: Sequence[Mapping[str, Any]], first: Sequence[str], rest: bool) -> list[str]:
    """``first`` (those present) then, with ``rest``, every other scalar key; a CI column replaces
    ``ci_low``/``ci_high``, after ``accuracy``."""
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
    return cols


def generic_table(
    title: str, rows: Sequence[Mapping[str, Any]], first: Sequence[str] = (), rest: bool = True
) -> Table | None:
    """A table of dict rows: ``first`` columns in order, then (``rest``) every other scalar key.

    ``ci_low``/``ci_high`` become one CI column after ``accuracy``; keys ending in ``_p`` are p-values.
    """
    if not rows:
        return None
    cols = _table_columns(rows, first, rest)
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


# --------------------------------------------------------------------------------------------------
# Markdown summary
# --------------------------------------------------------------------------------------------------


def _j(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _pct(p: Any) -> str:
    return "—" if not isinstance(p, int | float) else f"{100 * p:.1f} %"


def _ci(lo: Any, hi: Any, scale: float = 100.0, unit: str = " %") -> str:
    if not isinstance(lo, int | float) or not isinstance(hi, int | float):
        return "—"
    return f"[{scale * lo:.1f}, {scale * hi:.1f}]{unit}"


def _prop(d: Any) -> str:
    """``k/n = p [lo, hi]`` of a :meth:`saereward.stats.Proportion.as_dict`."""
    if not isinstance(d, dict) or "n" not in d:
        return "—"
    return f"{d.get('k')}/{d['n']} = {_pct(d.get('p'))} {_ci(d.get('ci_low'), d.get('ci_high'))}"


def _rci(ci: Any) -> str:
    """``[lo, hi]`` of a correlation/AUROC interval."""
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return "—"
    return f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def _opt_ci(d: Mapping[str, Any], key: str, name: str = "") -> str:
    """`` [lo, hi]`` of the CI ``d[key]`` (``, FVU [lo, hi]`` with ``name``) where both bounds are
    finite; nothing where eval.json has none (written without a bootstrap, or one batch only)."""
    ci = d.get(key)
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return ""
    lo, hi = as_float(ci[0]), as_float(ci[1])
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f", {name} 95 % CI {_rci(ci)}" if name else f" {_rci(ci)}"


def _sci(v: Any) -> str:
    return "—" if not isinstance(v, int | float) else f"{v:+.2e}"


def _g2_diff(name: str, d: Any) -> str:
    """``R1-R0 +2.5 pp [lo, hi] pp, McNemar p 0.12 (6/1 discordant)`` of a paired G2 record."""
    if not isinstance(d, dict) or as_float(d.get("mean_diff")) is None:
        return f"{name} —"
    return (
        f"{name} {100 * d['mean_diff']:+.1f} pp {_ci(d.get('ci_low'), d.get('ci_high'), unit=' pp')}, "
        f"McNemar p {fmt_num(d.get('p_value'))} ({d.get('a_only')}/{d.get('b_only')} discordant)"
    )


def _g2_row(run: Path) -> str:
    """The G2 row: accuracies per arm, paired differences and lifts with CIs, collapses, warnings."""
    g2 = _j(run / "g2" / "gate_g2.json")
    if not g2:
        return "| G2 | not run |"
    parts = [
        f"{d.get('label')} {d.get('pooled_correct')}/{d.get('pooled_n')} = {_pct(d.get('accuracy'))} "
        f"{_ci(d.get('ci_low'), d.get('ci_high'))} (start {_pct(d.get('start_accuracy'))})"
        for d in (g2.get("table") or {}).values()
        if isinstance(d, dict)
    ]
    text = f"held-out accuracy after {g2.get('steps')} steps, seeds {g2.get('seeds')}: {'; '.join(parts)}"
    paired = g2.get("paired") or {}
    if paired:
        text += "; paired " + "; ".join(_g2_diff(k, d) for k, d in paired.items())
    lift = g2.get("lift") or {}
    if lift:
        text += "; lift over step 0 " + "; ".join(
            _g2_diff(str(d.get("label", r)), d) for r, d in lift.items() if isinstance(d, dict)
        )
    collapsed = [
        f"{arm.get('label', r)} seed {s} at step {c.get('step')}"
        for r, arm in (g2.get("collapse") or {}).items()
        if isinstance(arm, dict)
        for s, c in (arm.get("runs") or {}).items()
        if isinstance(c, dict) and c.get("collapsed")
    ]
    if collapsed:
        text += f"; COLLAPSED: {', '.join(collapsed)}"
    for w in g2.get("warnings") or []:
        if isinstance(w, dict):
            text += f"; WARNING {w.get('kind')}{' (blocks PASS)' if w.get('blocks_pass') else ''}"
    note = (g2.get("checks") or {}).get("note")
    return f"| G2 **{g2.get('verdict')}** | {text}{f' ({note})' if note else ''} |"


def _header(run: Path) -> list[str]:
    """The run's model, task, layer and seed, and its stage wall times."""
    out: list[str] = []
    pipe = _j(run / "pipeline.json") or {}
    p = pipe.get("pipeline", {})
    out.append(
        f"Run folder `{run}`: model {p.get('model', '?')}, {p.get('dtype', '?')}, task {p.get('task', '?')}, "
        f"layer {p.get('layer', '?')}, seed {p.get('seed', '?')}."
    )
    stages = _j(run / "stages.json") or {}
    if stages:
        total = sum(float(r.get("seconds", 0)) for r in stages.values() if isinstance(r, dict))
        out.append(
            "Stage wall times (s): "
            + ", ".join(
                f"{k} {float(v.get('seconds', 0)):.0f}" for k, v in stages.items() if isinstance(v, dict)
            )
            + f"; total {total / 60:.1f} min."
        )
    out.append("")
    return out


def _rollouts_rows(run: Path) -> list[str]:
    """Accuracy of the rollouts per split."""
    rows: list[str] = []
    ro = _j(run / "rollouts" / "summary.json")
    if ro:
        for split in ("discovery", "validation"):
            s = ro.get(split, {})
            rows.append(
                f"| rollouts, {split} | {s.get('correct')}/{s.get('responses')} correct = {_pct(s.get('accuracy'))} "
                f"{_ci(s.get('ci_low'), s.get('ci_high'))} ({s.get('questions')} questions) |"
            )
    else:
        rows.append("| rollouts | not run |")
    return rows


def _sae_rows(run: Path) -> list[str]:
    """The SAE's held-out reconstruction and CE/KL recovered."""
    rows: list[str] = []
    sae = _j(run / "sae" / "sae" / "eval.json")
    if sae:
        h, ce = sae.get("heldout", {}), sae.get("ce_kl", {})
        rows.append(
            f"| SAE ({sae.get('d_sae')} latents, k {sae.get('k')}) | held-out FVU {fmt_num(h.get('fvu'))}, "
            f"NMSE {fmt_num(h.get('nmse'))}, L0 {fmt_num(h.get('l0'), 1)}, dead {fmt_num(h.get('dead_pct'), 1)} % "
            f"(n={int(h.get('n_tokens', 0))} tokens){_opt_ci(h, 'fvu_ci', 'FVU')}; CE loss recovered "
            f"{fmt_num(ce.get('ce_loss_recovered'))}{_opt_ci(ce, 'ce_loss_recovered_ci')}, "
            f"KL recovered {fmt_num(ce.get('kl_recovered'))}{_opt_ci(ce, 'kl_recovered_ci')} "
            f"({ce.get('n_texts', '—')} texts) |"
        )
    else:
        rows.append("| SAE | not run |")
    return rows


def _layer_rows(run: Path) -> list[str]:
    """The layer map's peak."""
    rows: list[str] = []
    lm = _j(run / "rollouts" / "layer_map.json")
    if lm:
        rows.append(
            f"| layer map | peak layer {lm.get('peak_layer')} (Cohen's d, {lm.get('split', 'discovery')}) |"
        )
    return rows


def _g1_rows(run: Path) -> list[str]:
    """G1: the pack and baselines with CIs."""
    rows: list[str] = []
    g1 = _j(run / "gate_g1.json")
    if g1:
        m = g1.get("methods", {})
        parts = []
        for key, name in (("pack", "pack"), ("raw_direction", "raw direction"), ("probe", "probe")):
            d = m.get(key)
            if isinstance(d, dict) and "spearman_rho" in d:
                parts.append(
                    f"{name} ρ {fmt_stat(d['spearman_rho'])} {_rci(d.get('rho_ci'))}, "
                    f"AUROC {fmt_num(d.get('auroc'))} {_rci(d.get('auroc_ci'))}"
                )
        pack = m.get("pack") if isinstance(m.get("pack"), dict) else {}
        if "partial_rho_length" in pack:
            parts.append(
                f"pack ρ with length controlled {fmt_stat(pack['partial_rho_length'])} "
                f"{_rci(pack.get('partial_rho_length_ci'))}"
            )
        lb = g1.get("length_baseline")
        if isinstance(lb, dict) and "spearman_rho" in lb:
            parts.append(f"length-only baseline ρ {fmt_stat(lb['spearman_rho'])} {_rci(lb.get('rho_ci'))}")
        boot = g1.get("bootstrap") or {}
        clustered = (
            f", {boot['n_questions']} questions, CIs clustered by question" if "n_questions" in boot else ""
        )
        rows.append(
            f"| G1 **{g1.get('verdict')}** | {'; '.join(parts)} (n={g1.get('n_responses')} held-out responses, "
            f"{g1.get('n_correct')} correct{clustered}, seed {g1.get('seed')}) |"
        )
    else:
        rows.append("| G1 | not run |")
    return rows


def _g3_rows(run: Path) -> list[str]:
    """G3: capability, canaries and monitor."""
    rows: list[str] = []
    g3 = _j(run / "g3" / "gate_g3.json")
    if g3:
        es = g3.get("eval_suite", {})
        parts = []
        for bench, d in es.items():
            if isinstance(d, dict) and isinstance(d.get("base"), dict) and "skipped" in d["base"]:
                parts.append(
                    f"{bench} skipped (no offline copy)"
                    if "offline" in str(d["base"]["skipped"])
                    else f"{bench} skipped"
                )
            elif isinstance(d, dict) and "base" in d:
                paired = d.get("paired") or {}
                parts.append(
                    f"{bench} {_prop(d.get('base'))} → {_prop(d.get('trained'))} "
                    f"(McNemar p {fmt_num(paired.get('p_value'))})"
                )
            elif isinstance(d, dict) and d.get("skipped"):
                parts.append(f"{bench} skipped")
        can = g3.get("canaries", {})
        hack = f"canary hack rate {_prop(can.get('base', {}).get('hack'))} → {_prop(can.get('trained', {}).get('hack'))}"
        mon = g3.get("monitor_verdict", {})
        rho = (g3.get("checks", {}).get("monitor_valid") or {}).get("rho_trained")
        assoc = ((g3.get("monitor") or {}).get("trained") or {}).get("association") or {}
        rho_txt = fmt_num(rho)
        rho_f = as_float(rho)
        if (rho_f is None or math.isnan(rho_f)) and "n" in assoc:  # undefined (null): one outcome class
            rho_txt = (
                f"undefined ({assoc.get('n_correct')} of {assoc['n']} monitored responses correct after RL)"
            )
        rows.append(
            f"| G3 **{g3.get('verdict')}** (failed: {', '.join(g3.get('failed', [])) or 'none'}) | "
            f"{'; '.join(parts)}; {hack}; monitor ρ after RL {rho_txt}, Goodhart flag {mon.get('goodhart')} |"
        )
    else:
        rows.append("| G3 | not run |")
    return rows


def _steer_rows(run: Path) -> list[str]:
    """Steering conditions."""
    rows: list[str] = []
    st = _j(run / "steer" / "steer.json")
    if st:
        parts = [
            f"{r.get('label')} {r.get('correct')}/{r.get('n')} = {_pct(r.get('accuracy'))} "
            f"{_ci(r.get('ci_low'), r.get('ci_high'))}"
            + (
                ""
                if r.get("kind") == "base"
                else f", +{len(r.get('recovered') or [])}/−{len(r.get('broken') or [])}, p {fmt_num(r.get('mcnemar_p'))}"
            )
            for r in st.get("rows", [])
        ]
        rows.append(
            f"| steering (layer {st.get('layer')}, n={st.get('n')}, seed {st.get('seed')}) | {'; '.join(parts)} |"
        )
    else:
        rows.append("| steering | not run |")
    return rows


def _drift_rows(run: Path) -> list[str]:
    """SAE drift per RL stage."""
    rows: list[str] = []
    dr = _j(run / "drift" / "drift.json")
    if dr:
        parts = [
            f"step {s.get('step')}: NMSE {fmt_stat(s.get('nmse_base'), 4)}, refit {fmt_stat(s.get('nmse_refit'), 4)}"
            for s in dr.get("stages", [])
        ]
        rows.append(
            f"| SAE drift ({dr.get('n_tokens')} tokens per stage) | base-SAE NMSE {'; '.join(parts)}; "
            f"ΔNMSE/step (least squares) {_sci(dr.get('dnmse_per_step_fit'))} |"
        )
    else:
        rows.append("| SAE drift | not run |")
    return rows


def results_markdown(run: str | Path) -> str:
    """The summary of ``run`` as Markdown (tables; every number with its n and CI where it has one)."""
    run = Path(run)
    rows = ["| stage | result |", "|---|---|"]
    rows += _rollouts_rows(run) + _sae_rows(run) + _layer_rows(run) + _g1_rows(run)
    rows.append(_g2_row(run))
    rows += _g3_rows(run) + _steer_rows(run) + _drift_rows(run)
    return "\n".join(_header(run) + rows) + "\n"


__all__ = [
    "Table",
    "ci_text",
    "fmt",
    "fmt3",
    "fmt_ci",
    "fmt_p",
    "fmt_rate",
    "generic_table",
    "results_markdown",
]
