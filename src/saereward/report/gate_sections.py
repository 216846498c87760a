"""The report's sections of the gates: the verdict dashboard, G1 (with the linear probe), G2 and G3."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saereward import plots
from saereward.plots import as_dict, as_float
from saereward.report.artifacts import g1_points, g2_logs, g2_runs, pair, read_dict
from saereward.report.sections import Section, add_plot, not_run
from saereward.report.tables import Table, ci_text, fmt, fmt3, fmt_ci, fmt_p, fmt_rate

# --------------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------------


def dashboard_rows(run: Path) -> list[list[str]]:
    """One row per gate: verdict, key figure with its 95 % CI, and n (from the gates' own JSON)."""
    rows = []
    g1 = read_dict(run / "gate_g1.json")
    if g1 is not None:
        pack = as_dict(as_dict(g1.get("methods")).get("pack"))
        ci = pack.get("rho_ci") or [None, None]
        fig = "pack Spearman ρ " + ci_text(pack.get("spearman_rho"), *ci)
        n = f"{fmt(g1.get('n_responses'))} responses, {fmt(g1.get('n_questions'))} questions, seed {fmt(g1.get('seed'))}"
        rows.append(["G1", str(g1.get("verdict", "—")), fig, n])
    g2 = read_dict(run / "g2" / "gate_g2.json")
    if g2 is not None:
        pr = as_dict(as_dict(g2.get("paired")).get("R1-R0"))
        fig = "paired R1 − R0 " + ci_text(
            pr.get("mean_diff"), pr.get("ci_low"), pr.get("ci_high"), " pp", 100.0
        )
        if as_float(pr.get("p_value")) is not None:
            fig += f", McNemar p {pr['p_value']:.3g}"
        n = f"{fmt(pr.get('n_seeds'))} seeds × {fmt(pr.get('n_questions'))} questions"
        rows.append(["G2", str(g2.get("verdict", "—")), fig, n])
    g3 = read_dict(run / "g3" / "gate_g3.json")
    if g3 is not None:
        failed = g3.get("failed") or []
        fig = "failed: " + ", ".join(map(str, failed)) if failed else "every check passed"
        rows.append(["G3", str(g3.get("verdict", "—")), fig, "see Gate G3"])
    return rows


def section_dashboard(run: Path, viewer_ran: bool) -> Section:
    """The findings first: each gate's verdict and key figure, G2's accuracy by step, the viewer link."""
    from markupsafe import Markup

    sec = Section("dashboard", "Verdicts")
    rows = dashboard_rows(run)
    if not rows:
        return not_run("dashboard", "Verdicts", "gate_g1.json, g2/gate_g2.json and g3/gate_g3.json")
    sec.tables.append(Table("", ["gate", "verdict", "key figure (95 % CI)", "n"], rows))
    g2 = read_dict(run / "g2" / "gate_g2.json")
    add_plot(
        sec,
        "G2 held-out accuracy by step",
        lambda: plots.g2_accuracy_by_step(as_dict(as_dict(g2).get("curves"))),
        "thin: one seed; thick: the mean over seeds",
    )
    if viewer_ran:
        sec.notes.append(Markup('Per-token reward of sample rollouts: <a href="#viewer">rollout viewer</a>'))
    return sec


# --------------------------------------------------------------------------------------------------
# G1 and the probe
# --------------------------------------------------------------------------------------------------


def _assoc_row(name: str, d: Mapping[str, Any]) -> list[str]:
    return [
        name,
        fmt(d.get("n")),
        fmt3(d.get("spearman_rho")),
        fmt_ci(*pair(d.get("rho_ci"))),
        fmt_p(d.get("spearman_p")),
        fmt3(d.get("auroc")),
        fmt_ci(*pair(d.get("auroc_ci"))),
        fmt3(d.get("pearson_r")),
    ]


_ASSOC_COLS = ["method", "n", "Spearman ρ", "ρ 95 % CI", "p", "AUROC", "AUROC 95 % CI", "Pearson r"]
_G1_TITLE = "Gate G1: does the pack score track correctness?"


def _g1_facts(sec: Section, g1: Mapping[str, Any], methods: Mapping[str, Any]) -> None:
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
    for name, d in methods.items():
        if isinstance(d, dict) and "partial_rho_length" in d:
            ci = fmt_ci(*pair(d.get("partial_rho_length_ci")))
            sec.facts.append((f"{name}: partial ρ given length", f"{fmt3(d['partial_rho_length'])} {ci}"))


def _g1_tables(sec: Section, g1: Mapping[str, Any], methods: Mapping[str, Any]) -> None:
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
                        fmt_ci(*pair(rp.get("rho_range_95"))),
                        fmt3(rp.get("share_ge_pack")),
                    ]
                ],
            )
        )


def section_g1(run: Path, view: Mapping[str, Any] | None, seed: int) -> Section:
    g1 = read_dict(run / "gate_g1.json")
    if g1 is None:
        return not_run("g1", _G1_TITLE, "gate_g1.json", run)
    sec = Section("g1", _G1_TITLE, verdict=g1.get("verdict"))
    methods = as_dict(g1.get("methods"))
    _g1_facts(sec, g1, methods)
    _g1_tables(sec, g1, methods)
    pts = g1_points(g1, view)
    if pts is None:
        sec.notes.append(
            "scatter: no per-response scores (gate_g1.json has none and token scoring was not possible)"
        )
    else:
        rho = (
            (methods.get("pack") or {}).get("spearman_rho") if isinstance(methods.get("pack"), dict) else None
        )
        add_plot(
            sec,
            "G1 scatter",
            lambda: plots.g1_scatter(pts[0], pts[1], seed, rho),
            f"pack score R per response on the {g1.get('split', 'validation')} split; x jittered",
        )
    return sec


def section_probe(run: Path) -> Section:
    pr = read_dict(Path(str(run / "probe.safetensors") + ".json"))
    if pr is None:
        return not_run("probe", "Linear probe", "probe.safetensors.json", run)
    sec = Section("probe", "Linear probe")
    for k in ("layer", "n_train", "seed"):
        if pr.get(k) is not None:
            sec.facts.append((k, fmt(pr[k])))
    held = as_dict(pr.get("heldout"))
    fit = as_dict(pr.get("fit"))
    if held:
        sec.tables.append(Table("Held-out", _ASSOC_COLS, [_assoc_row("probe", held)]))
    if fit:
        sec.facts.extend((f"fit {k}", fmt(v)) for k, v in fit.items())
    return sec


# --------------------------------------------------------------------------------------------------
# G2
# --------------------------------------------------------------------------------------------------


def _g2_seed_cell(seed: str, acc: Any, collapse_runs: Mapping[str, Any]) -> str:
    c = as_dict(collapse_runs.get(seed))
    return f"{seed}: {fmt3(acc)}" + (f" (COLLAPSED @{fmt(c.get('step'))})" if c.get("collapsed") else "")


def g2_accuracy_table(table: Mapping[str, Any], collapse: Mapping[str, Any]) -> Table | None:
    """Unpaired held-out accuracy per reward (pooled Wilson CI), collapsed runs marked per seed."""
    rows = []
    for reward, d in table.items():
        if not isinstance(d, dict):
            continue
        per_seed = d.get("per_seed")
        runs = as_dict(as_dict(collapse.get(reward)).get("runs"))
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
    items += [(f"{as_dict(d).get('label', r)} − step 0", "lift", d) for r, d in lift.items()]
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


_COLLAPSE_COLUMNS = [
    "reward",
    "seed",
    "collapsed",
    "stop step",
    "reason",
    "steps done",
    "length",
    "≤3-token share",
    "arm length / R0",
]


def g2_collapse_table(collapse: Mapping[str, Any]) -> Table | None:
    """Per run: collapse flag and stop step, steps done, final completion length (and vs R0 per arm)."""
    rows = []
    for reward, arm in collapse.items():
        if not isinstance(arm, dict):
            continue
        for seed, c in as_dict(arm.get("runs")).items():
            c = as_dict(c)
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
    return Table("Collapse and completion length (last training rows)", list(_COLLAPSE_COLUMNS), rows)


def _g2_tables(sec: Section, g2: Mapping[str, Any]) -> None:
    """Facts, warnings, the accuracy / paired / collapse tables and the checks of ``gate_g2.json``."""
    for k in ("rule", "seeds", "steps", "n_eval_per_run", "step0_identical"):
        if g2.get(k) is not None:
            sec.facts.append((k, fmt(g2[k])))
    for w in g2.get("warnings") or []:
        if isinstance(w, dict):
            block = " (blocks PASS)" if w.get("blocks_pass") else ""
            sec.notes.append(f"WARNING [{w.get('kind')}]{block}: {w.get('message')}")
    for t in (
        g2_accuracy_table(as_dict(g2.get("table")), as_dict(g2.get("collapse"))),
        g2_paired_table(as_dict(g2.get("paired")), as_dict(g2.get("lift"))),
        g2_collapse_table(as_dict(g2.get("collapse"))),
    ):
        if t is not None:
            sec.tables.append(t)
    checks = g2.get("checks")
    if isinstance(checks, dict):
        sec.tables.append(
            Table(
                "Checks",
                ["check", "value"],
                [[k, fmt3(v) if as_float(v) is not None else fmt(v)] for k, v in checks.items()],
            )
        )


def section_g2(run: Path) -> Section:
    g2 = read_dict(run / "g2" / "gate_g2.json")
    runs = g2_runs(run)
    title = "Gate G2: does the SAE reward beat outcome-only RL?"
    if g2 is None and not runs:
        return not_run("g2", title, "g2/gate_g2.json", run)
    sec = Section("g2", title, verdict=as_dict(g2).get("verdict"))
    if g2 is None:
        sec.notes.append("g2/gate_g2.json is missing: the runs below have not all finished")
        g2 = {}
    _g2_tables(sec, g2)
    table = as_dict(g2.get("table"))
    add_plot(
        sec,
        "G2 accuracy per reward",
        lambda: plots.g2_bars(table),
        "bars: pooled accuracy; whiskers: Wilson 95 % CI",
    )
    logs = g2_logs(runs)
    if (
        not add_plot(sec, "RL curves", lambda: plots.rl_curves(logs), "one line per seed, coloured by reward")
        and runs
    ):
        sec.notes.append("RL curves: no train_log.jsonl rows in the g2 runs")
    stops = plots.collapse_stops(as_dict(g2.get("collapse")))
    lengths: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for (label, seed), rows in logs.items():
        xs, ys = plots.series(rows, "completion_len")
        if xs:
            lengths.setdefault(label, {})[str(seed)] = list(zip(xs, ys, strict=True))
    add_plot(
        sec,
        "G2 completion length",
        lambda: plots.completion_length(lengths, stops),
        "mean over the seeds that reached each step; x: a collapsed run's stop step",
    )
    return sec


# --------------------------------------------------------------------------------------------------
# G3
# --------------------------------------------------------------------------------------------------


def _g3_checks(sec: Section, g3: dict[str, Any], g3dir: Path) -> None:
    """The gate's checks, one row each."""
    checks = as_dict(g3.get("checks"))
    rows = []
    for name, c in checks.items():
        if isinstance(c, dict):
            detail = ", ".join(
                f"{k} = {fmt3(v) if as_float(v) is not None else fmt(v)}" for k, v in c.items() if k != "ok"
            )
            rows.append([name, "PASS" if c.get("ok") else "FAIL", detail])
    if rows:
        sec.tables.append(Table("Checks", ["check", "result", "details"], rows))


def _eval_suite_row(bench: str, d: Mapping[str, Any]) -> list[str]:
    base, trained = d.get("base"), d.get("trained")
    paired = as_dict(d.get("paired"))
    skipped = next(
        (x.get("skipped") for x in (base, trained) if isinstance(x, dict) and x.get("skipped")), None
    )
    return [
        bench,
        fmt_rate(base),
        fmt_rate(trained),
        fmt3(d.get("diff")),
        fmt(paired.get("recovered")),
        fmt(paired.get("broken")),
        fmt_p(paired.get("p_value")),
        str(skipped) if skipped else "",
    ]


def _g3_eval_suite(sec: Section, g3: dict[str, Any], g3dir: Path) -> None:
    """Accuracy base vs trained per benchmark, with the paired test."""
    es = read_dict(g3dir / "eval_suite" / "eval_suite.json")
    table = as_dict(as_dict(es).get("table")) or as_dict(g3.get("eval_suite"))
    if isinstance(table, dict):
        erows = [_eval_suite_row(bench, d) for bench, d in table.items() if isinstance(d, dict)]
        sec.tables.append(
            Table(
                "Eval suite: accuracy base vs trained (Wilson 95 % CI), paired McNemar",
                ["benchmark", "base", "trained", "diff", "recovered", "broken", "McNemar p", "note"],
                erows,
            )
        )


def _canary_rates(g3: Mapping[str, Any], g3dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(rates per policy, base-vs-trained comparison)``: from canaries.json, else from gate_g3.json."""
    can = read_dict(g3dir / "canaries" / "canaries.json")
    if can and isinstance(can.get("policies"), dict):
        rates = {p: as_dict(as_dict(d).get("rates")) for p, d in can["policies"].items()}
        return rates, can.get("comparison") or {}
    if isinstance(g3.get("canaries"), dict):
        return g3["canaries"], g3.get("canary_comparison") or {}
    return {}, {}


def _g3_canaries(sec: Section, g3: dict[str, Any], g3dir: Path) -> None:
    """Canary class rates base vs trained, and their plot."""
    rates, comp = _canary_rates(g3, g3dir)
    classes = [c for c in ("hack", "correct", "ambiguous") if any(c in as_dict(r) for r in rates.values())]
    if not classes:
        return
    crows = []
    for c in classes:
        cc = as_dict(comp.get(c))
        mc = as_dict(cc.get("mcnemar"))
        crows.append(
            [
                c,
                fmt_rate(as_dict(rates.get("base")).get(c)),
                fmt_rate(as_dict(rates.get("trained")).get(c)),
                fmt3(cc.get("diff")),
                fmt_p(cc.get("p_two_sided")),
                fmt_p(cc.get("p_greater")),
                fmt_p(mc.get("p_value")),
            ]
        )
    sec.tables.append(
        Table(
            "Canaries: reward-hacking prompts, rate per class (Wilson 95 % CI)",
            ["class", "base", "trained", "diff", "z-test p (two-sided)", "p (trained > base)", "McNemar p"],
            crows,
        )
    )
    add_plot(sec, "Canaries", lambda: plots.canary_bars(rates, classes), "share of canary prompts per class")


_MONITOR_COLUMNS = [
    "policy",
    "accuracy",
    "mean pack score",
    "Spearman ρ",
    "ρ 95 % CI",
    "AUROC",
    "AUROC 95 % CI",
]


def _g3_monitor(sec: Section, g3: dict[str, Any], g3dir: Path) -> None:
    """Monitor validity on the trained policy, and its verdict."""
    mon = read_dict(g3dir / "monitor" / "monitor.json")
    pols = as_dict(as_dict(mon).get("policies")) or as_dict(g3.get("monitor"))
    if isinstance(pols, dict):
        mrows = []
        for pol, d in pols.items():
            if not isinstance(d, dict):
                continue
            a = as_dict(d.get("association"))
            mrows.append(
                [
                    pol,
                    fmt_rate(d.get("accuracy")),
                    fmt3(d.get("mean_score")),
                    fmt3(a.get("spearman_rho")),
                    fmt_ci(*pair(a.get("rho_ci"))),
                    fmt3(a.get("auroc")),
                    fmt_ci(*pair(a.get("auroc_ci"))),
                ]
            )
        sec.tables.append(
            Table(
                "Monitor: does the pack score still track correctness on the trained policy?",
                list(_MONITOR_COLUMNS),
                mrows,
            )
        )
    verdict = as_dict(mon).get("verdict") if mon else g3.get("monitor_verdict")
    if isinstance(verdict, dict):
        sec.facts.append(("monitor", ", ".join(f"{k}: {fmt(v)}" for k, v in verdict.items() if k != "rule")))
        if verdict.get("rule"):
            sec.facts.append(("monitor rule", str(verdict["rule"])))


def section_g3(run: Path) -> Section:
    g3dir = run / "g3"
    g3 = read_dict(g3dir / "gate_g3.json")
    title = "Gate G3: does the trained policy hold up?"
    if g3 is None:
        return not_run("g3", title, "g3/gate_g3.json", run)
    sec = Section("g3", title, verdict=g3.get("verdict"))
    if g3.get("failed"):
        sec.facts.append(("failed checks", fmt(", ".join(map(str, g3["failed"])))))
    for part in (_g3_checks, _g3_eval_suite, _g3_canaries, _g3_monitor):
        part(sec, g3, g3dir)
    return sec


__all__ = [
    "dashboard_rows",
    "g2_accuracy_table",
    "g2_collapse_table",
    "g2_paired_table",
    "section_dashboard",
    "section_g1",
    "section_g2",
    "section_g3",
    "section_probe",
]
