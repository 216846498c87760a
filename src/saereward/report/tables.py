"""A Markdown summary of a pipeline run folder: the headline numbers with n, seed and 95 % CIs.

``saereward report RUN --markdown FILE`` writes it; the README's results section is this output for
a real ``examples/embedded.toml`` run. Reads only the JSON artifacts (``docs/run_layout.md``); a
stage that did not run is listed as such.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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
    return f"[{_num(ci[0])}, {_num(ci[1])}]"


def _sci(v: Any) -> str:
    return "—" if not isinstance(v, int | float) else f"{v:+.2e}"


def _num(v: Any, digits: int = 3) -> str:
    if not isinstance(v, int | float):
        return "—"
    return "undefined" if math.isnan(v) else f"{v:.{digits}f}"


def _g2_diff(name: str, d: Any) -> str:
    """``R1-R0 +2.5 pp [lo, hi] pp, McNemar p 0.12 (6/1 discordant)`` of a paired G2 record."""
    if not isinstance(d, dict) or "mean_diff" not in d:
        return f"{name} —"
    return (
        f"{name} {100 * d['mean_diff']:+.1f} pp {_ci(d.get('ci_low'), d.get('ci_high'), unit=' pp')}, "
        f"McNemar p {_num(d.get('p_value'))} ({d.get('a_only')}/{d.get('b_only')} discordant)"
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
            f"| SAE ({sae.get('d_sae')} latents, k {sae.get('k')}) | held-out FVU {_num(h.get('fvu'))}, "
            f"NMSE {_num(h.get('nmse'))}, L0 {_num(h.get('l0'), 1)}, dead {_num(h.get('dead_pct'), 1)} % "
            f"(n={int(h.get('n_tokens', 0))} tokens); CE loss recovered {_num(ce.get('ce_loss_recovered'))}, "
            f"KL recovered {_num(ce.get('kl_recovered'))} ({ce.get('n_texts', '—')} texts) |"
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
                    f"{name} ρ {_num(d['spearman_rho'])} {_rci(d.get('rho_ci'))}, "
                    f"AUROC {_num(d.get('auroc'))} {_rci(d.get('auroc_ci'))}"
                )
        pack = m.get("pack") if isinstance(m.get("pack"), dict) else {}
        if "partial_rho_length" in pack:
            parts.append(
                f"pack ρ with length controlled {_num(pack['partial_rho_length'])} "
                f"{_rci(pack.get('partial_rho_length_ci'))}"
            )
        lb = g1.get("length_baseline")
        if isinstance(lb, dict) and "spearman_rho" in lb:
            parts.append(f"length-only baseline ρ {_num(lb['spearman_rho'])} {_rci(lb.get('rho_ci'))}")
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
                    f"(McNemar p {_num(paired.get('p_value'))})"
                )
            elif isinstance(d, dict) and d.get("skipped"):
                parts.append(f"{bench} skipped")
        can = g3.get("canaries", {})
        hack = f"canary hack rate {_prop(can.get('base', {}).get('hack'))} → {_prop(can.get('trained', {}).get('hack'))}"
        mon = g3.get("monitor_verdict", {})
        rho = (g3.get("checks", {}).get("monitor_valid") or {}).get("rho_trained")
        assoc = ((g3.get("monitor") or {}).get("trained") or {}).get("association") or {}
        rho_txt = _num(rho)
        if rho_txt == "undefined" and "n" in assoc:
            rho_txt += f" ({assoc.get('n_correct')} of {assoc['n']} monitored responses correct after RL)"
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
                else f", +{len(r.get('recovered') or [])}/−{len(r.get('broken') or [])}, p {_num(r.get('mcnemar_p'))}"
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
            f"step {s.get('step')}: NMSE {_num(s.get('nmse_base'), 4)}, refit {_num(s.get('nmse_refit'), 4)}"
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


__all__ = ["results_markdown"]
