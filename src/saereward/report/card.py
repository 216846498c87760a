"""Model cards for SAEs and feature packs pushed to the Hugging Face hub (pure: dicts in, text out).

A card opens with the hub's YAML metadata (``library_name``, ``tags``, ``base_model``), then says what
the artifact is, its held-out metrics, the settings it was trained or discovered with, the gate
verdicts of the run it came from (each with its key figure), and how to load it with saereward.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["gate_lines", "pack_card", "sae_card"]

_TRAIN_KEYS = (
    "total_tokens",
    "batch_size",
    "lr",
    "expansion",
    "d_sae",
    "k",
    "auxk_alpha",
    "warmup_steps",
    "seed",
)
_METRIC_KEYS = ("fvu", "l0", "dead_pct", "cos_sim", "ce_recovered", "kl_div", "n_tokens")


def _front(model_id: str | None, tags: list[str]) -> str:
    lines = ["---", "library_name: saereward", "tags:"] + [f"- {t}" for t in tags]
    if model_id and "/" in model_id and not model_id.startswith(("/", ".", "embedded:")):
        lines.append(f"base_model: {model_id}")
    return "\n".join(lines + ["---", ""])


def _table(rows: Mapping[str, Any]) -> str:
    if not rows:
        return "_none recorded_\n"
    out = ["| setting | value |", "|---|---|"]
    out += [
        f"| {k} | {json.dumps(v) if isinstance(v, dict | list) else '—' if v is None else v} |"
        for k, v in rows.items()
    ]
    return "\n".join(out) + "\n"


def gate_lines(rows: Sequence[Sequence[str]]) -> str:
    """The run's gate verdicts as a table: gate, verdict, key figure with its 95 % CI, n
    (:func:`saereward.report.gate_sections.dashboard_rows`, the report's own dashboard)."""
    if not rows:
        return "No gate results travel with this artifact (it was not pushed from a pipeline run folder).\n"
    out = ["| gate | verdict | key figure (95 % CI) | n |", "|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def sae_card(
    repo: str,
    cfg: Mapping[str, Any],
    metrics: Mapping[str, Any],
    train: Mapping[str, Any],
    gates: Sequence[Sequence[str]],
    model_id: str | None,
) -> str:
    """The card of a TopK SAE folder (``cfg.json``, ``eval.json``, ``train_config.json``)."""
    layer = cfg.get("layer")
    head = (
        f"# TopK SAE on {model_id or 'an unrecorded model'}, layer {layer}\n\n"
        f"A TopK sparse autoencoder on the residual stream (output of decoder block {layer}): "
        f"d_in {cfg.get('d_in')}, {cfg.get('d_sae')} latents, k = {cfg.get('k')}. Trained with saereward.\n\n"
    )
    body = (
        "## Held-out metrics\n\n"
        + _table({k: metrics[k] for k in _METRIC_KEYS if k in metrics})
        + "\n## Training settings\n\n"
        + _table({k: train[k] for k in _TRAIN_KEYS if k in train})
        + "\n## Gates of the run it came from\n\n"
        + gate_lines(gates)
        + f'\n## Use\n\n```python\nfrom saereward.sae.formats import load_sae\n\nsae = load_sae("hf://{repo}")\n```\n'
    )
    return _front(model_id, ["sparse-autoencoder", "topk-sae", "saereward"]) + head + body


def pack_card(
    repo: str, pack: Mapping[str, Any], gates: Sequence[Sequence[str]], model_id: str | None
) -> str:
    """The card of a feature pack (``pack.json`` with its config and reward baseline)."""
    helpful, harmful = pack.get("helpful_features", []), pack.get("harmful_features", [])
    meta = pack.get("metadata", {})
    head = (
        f"# Feature pack on {model_id or 'an unrecorded model'}, layer {pack.get('layer')}\n\n"
        f"{len(helpful)} helpful and {len(harmful)} harmful SAE features whose activation predicts a "
        "correct answer, found by saereward's contrastive discovery; their weighted activation is the "
        f"per-token mech reward. The SAE it indexes: sha256 `{meta.get('sae_sha256', 'not recorded')}`.\n\n"
    )
    body = (
        "## Gates of the run it came from\n\n"
        + gate_lines(gates)
        + f'\n## Use\n\n```python\nfrom saereward.features.pack import load_pack\n\npack = load_pack("hf://{repo}/pack.json")\n```\n'
    )
    return _front(model_id, ["feature-pack", "saereward", "mechanistic-reward"]) + head + body
