"""Feature packs: which SAE features count, with which sign, validated how.

Our pack JSON is a superset of mechreward's schema, so mechreward's tools can read ours:

* top level: ``name``, ``version``, ``model_name``, ``release``, ``sae_id``, ``description``,
  ``helpful_features[]``, ``harmful_features[]``, ``validation{}``, ``metadata{}``;
* each feature: ``feature_id``, ``effect_size``, ``mean_correct``, ``mean_wrong``, ``weight``,
  ``validated`` (plus our ``active_frac``);
* ``metadata``: ``d_model``, ``d_sae``, ``k``, ``target_layer``, ``num_hidden_layers`` (mechreward's),
  plus ours: ``format`` = ``saereward.pack``, ``format_version``, ``sae_path``, ``sae_sha256`` (of
  the SAE folder), ``sae_weights_sha256`` (of its weight files alone: :func:`check_pack_sae` refuses
  another SAE), ``rollouts``, ``discovery_qids``, ``validation_qids``, ``stats``. ``sae_path`` and
  ``rollouts`` are relative to the pack's folder (so a moved or copied run reads its own);
  :func:`load_pack` resolves them against the pack's current place.

:func:`load_pack` also reads mechreward's older packs with one ``features[]`` list, where each entry's
sign comes from ``weight`` (or ``direction``/``polarity``/``type`` = helpful/harmful).

Scoring convention (mechreward's G1 statistic): ``R = Σ_helpful |w| a − Σ_harmful |w| a``. A pack's
weights are therefore stored as given but applied with the sign of the list they are in
(:meth:`FeaturePack.signed_weights`), so packs that write harmful weights as ``-1`` and packs that
write them as ``+1`` score the same.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from saereward.errors import SaeRewardError
from saereward.hub import resolve_source
from saereward.io import file_sha256, write_json

__all__ = ["Feature", "FeaturePack", "check_pack", "check_pack_sae", "file_sha256", "load_pack", "save_pack"]

log = logging.getLogger(__name__)

PACK_FORMAT = "saereward.pack"
PACK_VERSION = 1


@dataclass(frozen=True)
class Feature:
    """One feature of a pack."""

    feature_id: int
    weight: float = 1.0
    effect_size: float | None = None
    mean_correct: float | None = None
    mean_wrong: float | None = None
    validated: bool = False
    active_frac: float | None = None
    name: str | None = None  #: a label some packs carry (mechreward's older packs)

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise SaeRewardError(
                f"pack feature {self.feature_id} has weight {self.weight}: pack weights must be finite; "
                "fix the pack file or re-run `saereward discover`"
            )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class FeaturePack:
    """A loaded pack. ``layer`` is the block index the SAE reads (``None`` if the file does not say)."""

    name: str
    helpful: list[Feature]
    harmful: list[Feature]
    layer: int | None = None
    model_name: str | None = None
    sae_id: str | None = None
    description: str = ""
    version: str = "1"
    release: str | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source_format: str = PACK_FORMAT

    @property
    def d_sae(self) -> int | None:
        v = self.metadata.get("d_sae")
        return int(v) if v is not None else None

    @property
    def d_model(self) -> int | None:
        v = self.metadata.get("d_model")
        return int(v) if v is not None else None

    @property
    def feature_ids(self) -> list[int]:
        return [f.feature_id for f in self.helpful] + [f.feature_id for f in self.harmful]

    def signed_weights(self) -> list[float]:
        """``+|w|`` for helpful, ``-|w|`` for harmful, in :attr:`feature_ids` order."""
        return [abs(f.weight) for f in self.helpful] + [-abs(f.weight) for f in self.harmful]

    def __len__(self) -> int:
        return len(self.helpful) + len(self.harmful)

    def score_sha256(self) -> str:
        """sha256 of what the pack's score depends on: its layer, feature ids, signed weights and the
        SAE it indexes (not its name, validation record or statistics, which gate-g1 rewrites)."""
        import hashlib

        sae = self.metadata.get("sae_weights_sha256") or self.metadata.get("sae_sha256")
        key = [self.layer, self.feature_ids, self.signed_weights(), sae]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model_name": self.model_name,
            "release": self.release,
            "sae_id": self.sae_id,
            "description": self.description,
            "helpful_features": [f.to_json() for f in self.helpful],
            "harmful_features": [f.to_json() for f in self.harmful],
            "validation": self.validation,
            "metadata": {
                "format": PACK_FORMAT,
                "format_version": PACK_VERSION,
                **{k: v for k, v in self.metadata.items() if k not in ("format", "format_version")},
                "target_layer": self.layer,
            },
        }


def save_pack(pack: FeaturePack, path: str | Path) -> Path:
    """Write ``pack`` as JSON atomically. Its ``sae_path`` and ``rollouts`` inside the pack's folder are
    written relative to it (:func:`load_pack` made them absolute), so a pack that a stage read and
    wrote back (G1 records its validation) still points into a moved or copied run folder."""
    p = Path(path)
    data = pack.to_json()
    data["metadata"] = _relative_inside(data["metadata"], p)
    write_json(p, data)
    return p


def _relative_inside(meta: dict[str, Any], pack_path: Path) -> dict[str, Any]:
    """``meta`` with each absolute :data:`_PACK_RELATIVE` path under the pack's folder recorded as
    :func:`beside` records it (paths elsewhere, e.g. an SAE outside the run, stay as they are)."""
    folder = os.path.dirname(os.path.abspath(pack_path))
    out = dict(meta)
    for key in _PACK_RELATIVE:
        v = out.get(key)
        if (
            isinstance(v, str)
            and os.path.isabs(v)
            and os.path.commonpath([folder, os.path.normpath(v)]) == folder
        ):
            out[key] = beside(v, pack_path)
    return out


def _feature(entry: Any, where: str) -> Feature:
    if not isinstance(entry, dict):
        raise SaeRewardError(f"{where}: a feature must be a JSON object, got {type(entry).__name__}")
    fid = entry.get("feature_id", entry.get("id", entry.get("index")))
    if isinstance(fid, bool) or not isinstance(fid, int) or fid < 0:
        raise SaeRewardError(f"{where}: feature_id must be a non-negative integer, got {fid!r}")

    def num(key: str) -> float | None:
        v = entry.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    w = num("weight")
    return Feature(
        feature_id=fid,
        weight=1.0 if w is None else w,
        effect_size=num("effect_size") if num("effect_size") is not None else num("cohens_d"),
        mean_correct=num("mean_correct"),
        mean_wrong=num("mean_wrong"),
        validated=bool(entry.get("validated", False)),
        active_frac=num("active_frac"),
        name=entry["name"] if isinstance(entry.get("name"), str) else None,
    )


def _polarity(entry: dict[str, Any], where: str) -> str:
    for key in ("direction", "polarity", "type", "role", "kind"):
        v = entry.get(key)
        if isinstance(v, str) and v.lower() in ("helpful", "harmful", "positive", "negative"):
            return "helpful" if v.lower() in ("helpful", "positive") else "harmful"
    w = entry.get("weight", entry.get("effect_size"))
    if isinstance(w, int | float) and w != 0:
        return "helpful" if w > 0 else "harmful"
    raise SaeRewardError(
        f"{where}: cannot tell whether this feature is helpful or harmful (no direction field, no signed weight)"
    )


def _layer_of(meta: dict[str, Any], top: dict[str, Any]) -> int | None:
    for src in (meta, top):
        for key in ("target_layer", "layer", "hook_layer"):
            v = src.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


#: metadata paths a pack records relative to its own folder (absolute ones, from older packs, are kept)
_PACK_RELATIVE = ("sae_path", "rollouts")


def beside(target: str | os.PathLike[str], pack_path: str | os.PathLike[str]) -> str:
    """``target`` relative to the folder of ``pack_path``, as a pack records it (no symlink resolved, so
    a pack written in a staging folder of links points at the same place once moved into the run)."""
    return os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(pack_path)))


def load_pack(path: str | Path) -> FeaturePack:
    """Read a pack JSON: ours, mechreward's (``helpful_features``/``harmful_features``) or the older ``features[]``.

    Every feature of the file is kept; a malformed one is a one-line error naming it.
    """
    p = Path(resolve_source(path)).expanduser()
    if p.is_dir():
        raise SaeRewardError(f"feature pack {p} is a folder: pass the pack's .json file")
    if not p.is_file():
        raise SaeRewardError(f"feature pack {p} not found: run `saereward discover` or check the path")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaeRewardError(f"feature pack {p} is not valid JSON ({exc}): re-create it") from None
    if not isinstance(data, dict):
        raise SaeRewardError(f"feature pack {p} must be a JSON object")
    meta: dict[str, Any] = data["metadata"] if isinstance(data.get("metadata"), dict) else {}
    validation: dict[str, Any] = data["validation"] if isinstance(data.get("validation"), dict) else {}
    helpful: list[Feature] = []
    harmful: list[Feature] = []
    if "helpful_features" in data or "harmful_features" in data:
        fmt = PACK_FORMAT if meta.get("format") == PACK_FORMAT else "mechreward"
        for key, out in (("helpful_features", helpful), ("harmful_features", harmful)):
            entries = data.get(key) or []
            if not isinstance(entries, list):
                raise SaeRewardError(f"{p}: {key} must be a list")
            out.extend(_feature(e, f"{p}: {key}[{i}]") for i, e in enumerate(entries))
    elif isinstance(data.get("features"), list):
        fmt = "mechreward-features"
        for i, e in enumerate(data["features"]):
            where = f"{p}: features[{i}]"
            f = _feature(e, where)
            (helpful if _polarity(e, where) == "helpful" else harmful).append(f)
    else:
        raise SaeRewardError(
            f"{p} is not a feature pack: expected helpful_features/harmful_features lists or a features list"
        )
    if not helpful and not harmful:
        raise SaeRewardError(f"feature pack {p} has no features: re-run discovery")
    ids = [f.feature_id for f in helpful + harmful]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SaeRewardError(f"feature pack {p} lists feature(s) {dup[:5]} more than once: fix the pack")
    md = dict(meta)
    for key in _PACK_RELATIVE:  # recorded relative to the pack's folder: resolve against where it is now
        v = md.get(key)
        if isinstance(v, str) and v and not os.path.isabs(v) and "://" not in v:
            md[key] = os.path.normpath(os.path.join(os.path.abspath(p.parent), v))
    for key in ("d_model", "d_sae", "k", "num_hidden_layers"):
        if key not in md and isinstance(data.get(key), int):
            md[key] = data[key]
    for key in ("d_model", "d_sae", "k", "num_hidden_layers"):
        v = md.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SaeRewardError(
                f"feature pack {p}: metadata {key}={v!r} is not a positive whole number: fix the pack"
            )
    return FeaturePack(
        name=str(data.get("name") or p.stem),
        helpful=helpful,
        harmful=harmful,
        layer=_layer_of(meta, data),
        model_name=data.get("model_name") or data.get("model"),
        sae_id=data.get("sae_id"),
        description=str(data.get("description") or ""),
        version=str(data.get("version") or "1"),
        release=data.get("release"),
        validation=validation,
        metadata=md,
        source_format=fmt,
    )


def check_pack_sae(pack: FeaturePack, sae_path: str | os.PathLike[str]) -> None:
    """Refuse an SAE whose weights are not those ``pack`` was discovered on (its feature ids would name
    other latents, and every score computed with it would be noise). Packs record the weights' hash
    (``sae_weights_sha256``); an older pack, only its SAE folder's (``sae_sha256``, which an
    ``eval-sae`` rerun also changes), so a difference there is a warning."""
    from saereward.sae.formats import sae_weights_sha256

    want = pack.metadata.get("sae_weights_sha256")
    if want:
        if sae_weights_sha256(sae_path) != want:
            raise SaeRewardError(
                f"the SAE at {sae_path} is not the one pack {pack.name!r} was discovered on (the weights' "
                "sha256 differs): pass that SAE with --sae, or discover a pack on this one"
            )
        return
    legacy = pack.metadata.get("sae_sha256")
    if legacy and Path(sae_path).exists() and file_sha256(sae_path) != legacy:
        log.warning(
            "the SAE at %s may not be the one pack %r was discovered on (its folder's sha256 differs; an "
            "eval-sae rerun changes that too); if it is another SAE, the pack's scores are noise",
            sae_path,
            pack.name,
        )


def check_pack(pack: FeaturePack, *, d_sae: int, d_model: int | None = None, where: str = "") -> None:
    """Raise if the pack cannot be applied to an SAE of width ``d_sae`` on a model of width ``d_model``."""
    tag = f" {where}" if where else ""
    too_big = [i for i in pack.feature_ids if i >= d_sae]
    if too_big:
        raise SaeRewardError(
            f"pack {pack.name!r}: feature id(s) {too_big[:5]} exceed the SAE's width {d_sae}{tag}: "
            "the pack was discovered with a different (larger) SAE; use that SAE or re-run discovery"
        )
    if pack.d_sae is not None and pack.d_sae != d_sae:
        raise SaeRewardError(
            f"pack {pack.name!r} was discovered on an SAE with d_sae {pack.d_sae}, this SAE has {d_sae}{tag}: "
            "use the pack's SAE or re-run discovery"
        )
    if d_model is not None and pack.d_model is not None and pack.d_model != d_model:
        raise SaeRewardError(
            f"pack {pack.name!r} records d_model {pack.d_model}, the model has {d_model}{tag}: "
            "the pack belongs to a different model"
        )
