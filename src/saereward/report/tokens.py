"""The report's rollout viewer: each response token coloured by its per-token mech reward.

The view itself (which rollouts, each token's ``mech(t)``, the z-score's mean and SD) is written by
the g1 stage's ``token-view`` step (:mod:`saereward.features.token_view`); the report only reads it.
Colours show ``z(mech)`` over all the tokens shown, so they compare across responses: green positive,
red negative, saturated at ±2.5 SD; each token's title holds the raw value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saereward.features.token_view import VIEW_FILE, missing_inputs, read_view, view_key
from saereward.report.tables import fmt, fmt3

#: ``|z|`` at which a token's colour saturates.
Z_SATURATE = 2.5
_GREEN = (22, 163, 74)
_RED = (220, 38, 38)


def token_view(run: Path) -> tuple[dict[str, Any] | None, str]:
    """``(the view RUN/token_rewards.json holds, or None; why none)``; a view older than its inputs
    (another pack, other rollouts) is not shown."""
    why = missing_inputs(run)
    if why is not None:
        return None, f"not run ({why})"
    view = read_view(run)
    if view is None:
        return None, f"not run ({VIEW_FILE} is missing: `saereward token-view {run}`)"
    key = view.get("key") or {}
    now = view_key(run, int(key.get("max_rollouts", -1)), int(key.get("seed", 0)))
    if key != now:
        return None, f"out of date (its pack or rollouts changed): `saereward token-view {run}`"
    return view, ""


def token_colour(z: float, saturate: float = Z_SATURATE) -> str:
    """Diverging background for a z-scored reward: green for positive, red for negative, alpha ∝ |z|.

    ``z = 0`` is fully transparent; ``|z| >= saturate`` is the full colour at alpha 0.85.
    """
    if not math.isfinite(z):
        return "rgba(0, 0, 0, 0)"
    a = min(abs(z) / saturate, 1.0) * 0.85
    r, g, b = _GREEN if z > 0 else _RED
    return f"rgba({r}, {g}, {b}, {a:.3f})"


def _num(v: Any) -> float:
    """A JSON number as a float; ``null`` (an undefined value) as NaN, which colours nothing."""
    return float("nan") if v is None else float(v)


def viewer_items(view: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per shown rollout: the token spans (text, colour, tooltip) the template renders."""
    mean, sd = _num(view.get("z_mean", 0.0)), _num(view.get("z_sd", 1.0)) or 1.0
    items = []
    for r in view.get("responses", []):
        spans = []
        ids = r.get("ids") or []
        for j, (text, m) in enumerate(zip(r.get("text", []), r.get("mech", []), strict=False)):
            m = _num(m)
            z = (m - mean) / sd
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


__all__ = ["Z_SATURATE", "token_colour", "token_view", "viewer_items"]
