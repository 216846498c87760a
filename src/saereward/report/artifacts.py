"""Reading a run folder's artifacts (the layout of ``docs/run_layout.md``) for the report.

Every reader is defensive: a missing or unreadable file reads as ``None`` (or an empty list), and
keys are read with ``.get``, so a stage that did not run, or wrote an older layout, only leaves its
part of the report out. The readers of ``steer.json`` and ``drift.json`` are small isolated
functions (:func:`steer_rows`, :func:`drift_rows`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saereward.io import json_text
from saereward.plots import as_float
from saereward.stages import STAGES

log = logging.getLogger(__name__)

#: ``{stage: its artifact, relative to the run folder}`` of every stage the report shows.
STAGE_ARTIFACTS: dict[str, str] = {s.name: s.artifact for s in STAGES if s.name != "report"}

#: The folder of one G2 run: ``g2/<label>_<reward>_seed<seed>``.
G2_RUN = re.compile(r"^(R\d+)_(\w+?)_seed(\d+)$")


def read_json(path: Path) -> Any:
    """Parsed JSON, or ``None`` if the file is missing or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def read_dict(path: Path) -> dict[str, Any] | None:
    """:func:`read_json` of a file that should hold a JSON object; ``None`` if it does not."""
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
            if isinstance(row, dict) and as_float(row.get("step")) is not None:
                merged.setdefault(int(row["step"]), {}).update(row)
    return [merged[s] for s in sorted(merged)]


def pair(v: Any) -> tuple[Any, Any]:
    """The two bounds of a JSON ``[lo, hi]``, or ``(None, None)``."""
    if isinstance(v, list | tuple) and len(v) == 2:
        return v[0], v[1]
    return None, None


def last(v: Any) -> Any:
    """The last item of a JSON list, or ``None``."""
    return v[-1] if isinstance(v, list) and v else None


# --------------------------------------------------------------------------------------------------
# G1 and G2
# --------------------------------------------------------------------------------------------------


def g1_points(g1: Mapping[str, Any], view: Mapping[str, Any] | None) -> tuple[list[float], list[bool]] | None:
    """Per-response (score, correct) of the gate's split: from gate_g1.json if it has them, else the view."""
    for key in ("per_response", "responses", "scores"):
        v = g1.get(key)
        if isinstance(v, list) and v and isinstance(v[0], dict):
            pts = [(as_float(r.get("score")), r.get("correct")) for r in v]
            if all(s is not None and isinstance(c, bool) for s, c in pts):
                return [float(s) for s, _ in pts if s is not None], [bool(c) for _, c in pts]
        if isinstance(v, list) and v and isinstance(g1.get("correct"), list) and len(g1["correct"]) == len(v):
            pairs = [
                (float(x), bool(c)) for x, c in zip(v, g1["correct"], strict=True) if as_float(x) is not None
            ]
            return [x for x, _ in pairs], [c for _, c in pairs]
    if not view or not view.get("response_scores"):
        return None
    split = g1.get("split", "validation")
    scores, correct, splits = view["response_scores"], view.get("correct", []), view.get("split", [])
    keep = [i for i in range(len(scores)) if i < len(splits) and (splits[i] == split or split == "all")]
    if not keep:
        keep = list(range(min(len(scores), len(correct))))
    keep = [i for i in keep if as_float(scores[i]) is not None]  # null: an undefined score, not plotted
    return [float(scores[i]) for i in keep], [bool(correct[i]) for i in keep]


def g2_runs(run: Path) -> list[Path]:
    """The run folders of gate G2 (``RUN/g2/<label>_<reward>_seed<seed>``), sorted."""
    g2 = run / "g2"
    if not g2.is_dir():
        return []
    return sorted(p for p in g2.iterdir() if p.is_dir() and G2_RUN.match(p.name))


def g2_logs(runs: Sequence[Path]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """``{(arm label, seed): train log rows}`` of the G2 runs that logged any."""
    logs = {}
    for rd in runs:
        m = G2_RUN.match(rd.name)
        rows = read_log(rd / "train_log.jsonl")
        if m and rows:
            logs[(m.group(1), int(m.group(3)))] = rows
    return logs


# --------------------------------------------------------------------------------------------------
# Steering and drift: isolated readers (keys read with .get; a missing key skips its cell/plot)
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Resolved configs
# --------------------------------------------------------------------------------------------------

#: Config files of the stages, shown whole.
CONFIG_FILES = (
    "sae/config.json",
    "sae/sae/train_config.json",
    "rollouts/config.json",
    "pack.config.json",
    "steer/config.json",
    "drift/config.json",
)
#: Artifacts that embed their stage's config under ``config``.
EMBEDDED_CONFIGS = (
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
)


def _pipeline_configs(run: Path) -> list[tuple[str, Any]]:
    """The pipeline's settings, each stage's recorded config, and the planned configs of stages not run."""
    found: list[tuple[str, Any]] = []
    pipe = read_dict(run / "pipeline.json")
    if pipe is not None:
        found.append(("pipeline.json", pipe.get("pipeline", pipe)))
    records = read_dict(run / "stages.json") or {}
    for stage, rec in records.items():
        if isinstance(rec, dict) and isinstance(rec.get("config"), dict):
            found.append((f"stages.json: {stage}", rec["config"]))
    if pipe is not None and isinstance(pipe.get("stages"), dict):
        for stage, c in pipe["stages"].items():
            if stage not in records:
                found.append((f"pipeline.json: {stage} (planned)", c))
    return found


def collect_configs(run: Path) -> list[tuple[str, str]]:
    """``(title, pretty JSON)`` of every resolved config found, one per distinct content."""
    found = _pipeline_configs(run)
    for rel in CONFIG_FILES:
        d = read_json(run / rel)
        if d is not None:
            found.append((rel, d))
    for rel in EMBEDDED_CONFIGS:
        d = read_dict(run / rel)
        if d is not None and isinstance(d.get("config"), dict):
            found.append((f"{rel}: config", d["config"]))
    for run_dir in g2_runs(run):
        d = read_json(run_dir / "config.json")
        if d is not None:
            found.append((f"g2/{run_dir.name}/config.json", d))
    out, seen = [], set()
    for title, obj in found:
        text = json_text(obj, indent=2)
        if text not in seen:
            seen.add(text)
            out.append((title, text))
    return out


__all__ = [
    "STAGE_ARTIFACTS",
    "collect_configs",
    "drift_rows",
    "g1_points",
    "g2_logs",
    "g2_runs",
    "last",
    "pair",
    "read_dict",
    "read_json",
    "read_log",
    "steer_base",
    "steer_rows",
]
