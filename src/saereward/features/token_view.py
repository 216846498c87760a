"""``saereward token-view RUN``: the per-token mech reward of a sample of rollouts, for the report.

For a seeded sample of ``max_rollouts`` rollouts, balanced between correct and wrong, the response
tokens' residuals (``rollouts/tokens.safetensors``) are scored with the pack exactly as the R1 reward
scores them during GRPO: ``mech(t) = PackScorer.token_scores(x_t)`` (true TopK, eager fp32; see
:mod:`saereward.features.scoring` and :mod:`saereward.rl.reward`). The view records ``z_mean`` and
``z_sd`` over all the tokens shown (mean and population SD, as
:func:`saereward.rl.reward.masked_zscore`), so the report's colours compare across responses, and
every response's pooled score (the G1 statistic) for the G1 scatter. It is written to
``RUN/token_rewards.json`` with a key of its inputs; the pipeline runs it in the g1 stage, and the
report only reads it (:mod:`saereward.report.tokens`).

The SAE is the run's own (``RUN/sae/sae``), checked against the sha256 the pack recorded.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saereward.config import option
from saereward.errors import SaeRewardError
from saereward.features.pack import check_pack_sae, load_pack
from saereward.features.scoring import PackScorer, segment_mean
from saereward.io import file_sha256, read_jsonl, write_json
from saereward.model.lm import EMBEDDED_PREFIX, cache_dir, embedded_gguf_path
from saereward.sae.formats import load_sae

log = logging.getLogger(__name__)

TOKEN_VIEW_FORMAT = "saereward.token_rewards"
TOKEN_VIEW_VERSION = 1
VIEW_FILE = "token_rewards.json"


@dataclass(frozen=True)
class TokenViewConfig:
    """Settings of ``saereward token-view``."""

    run_dir: str = option("", "the run folder (rollouts/, sae/sae and pack.json; docs/run_layout.md)")
    max_rollouts: int = option(60, "rollouts in the view (half correct, half wrong)")
    seed: int = option(0, "seed of the sample")
    threads: int | None = option(None, "torch CPU threads for scoring tokens (default: torch's choice)")
    recompute: bool = option(False, "recompute RUN_DIR/token_rewards.json even when it is up to date")

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir is required: `saereward token-view RUN_DIR`")
        if self.max_rollouts < 1:
            raise ValueError(f"max_rollouts must be >= 1, got {self.max_rollouts}")


def read_json_dict(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; ``None`` if it is missing, unreadable or not an object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


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
        d = read_json_dict(folder / rel)
        if d and isinstance(d.get("model"), str):
            return str(d["model"])
    return None


def _sae_path(run: Path, pack: Any) -> Path:
    """The run's own SAE, ``RUN/sae/sae``, checked against the sha256 the pack recorded.

    Never the path the pack recorded: a copied or moved run must not read the original's SAE. An SAE
    other than the one the pack was discovered on is refused (:func:`check_pack_sae`), since the pack's
    feature indices would then name other latents.
    """
    path = run / "sae" / "sae"
    if not path.exists():
        raise SaeRewardError(f"the run has no SAE at {path}: run the sae stage (saereward pipeline)")
    check_pack_sae(pack, path)
    return path


def view_key(run: Path, max_rollouts: int, seed: int) -> dict[str, Any]:
    """What the view depends on: the sample settings and the pack and token files."""
    tok = run / "rollouts" / "tokens.safetensors"
    st = tok.stat()
    return {
        "format_version": TOKEN_VIEW_VERSION,
        "max_rollouts": max_rollouts,
        "seed": seed,
        "pack_sha256": file_sha256(run / "pack.json"),
        "tokens": {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns},
    }


def _read_tokens(path: Path, layer: int | None, n_rows: int) -> tuple[int, Any, Any, Any]:
    """``(layer, residuals [N, d], offsets [R+1], token ids [N] or None)`` of ``tokens.safetensors``:
    the layer asked for (or the only one kept); checked against the ``n_rows`` responses."""
    from safetensors import SafetensorError, safe_open

    try:
        fh_ctx = safe_open(str(path), "pt")
    except (SafetensorError, OSError) as exc:
        raise SaeRewardError(f"cannot read {path}: {exc}; re-run `saereward rollouts`") from None
    with fh_ctx as fh:
        names = set(fh.keys())
        layers = sorted(int(k.split("_")[1]) for k in names if k.startswith("layer_"))
        if layer is None and len(layers) == 1:
            layer = layers[0]
        if layer is None or f"layer_{layer}" not in names:
            raise SaeRewardError(
                f"rollouts/tokens.safetensors keeps layers {layers}, not the pack's layer {layer}"
            )
        x = fh.get_tensor(f"layer_{layer}")
        offsets = fh.get_tensor("offsets").long()
        token_ids = fh.get_tensor("token_ids").long() if "token_ids" in names else None
    if offsets.shape[0] != n_rows + 1 or int(offsets[-1]) != x.shape[0]:
        raise SaeRewardError(
            "rollouts.jsonl and tokens.safetensors disagree on the responses: re-run rollouts"
        )
    return layer, x, offsets, token_ids


def _shown(
    row: Mapping[str, Any],
    r: int,
    correct: bool,
    score: float,
    ids: list[int],
    text: list[str],
    mech: list[float],
) -> dict[str, Any]:
    """One shown rollout of the view."""
    return {
        "rid": r,
        "qid": row.get("qid"),
        "split": row.get("split"),
        "correct": correct,
        "prompt": row.get("prompt", ""),
        "completion": row.get("completion", ""),
        "extracted": row.get("extracted"),
        "gold": row.get("gold"),
        "score": score,
        "ids": ids,
        "text": text,
        "mech": mech,
    }


def compute_token_view(run: Path, cfg: TokenViewConfig) -> dict[str, Any]:
    """Score every response token with the pack (the R1 per-token reward) and build the viewer's sample."""
    import torch

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    folder = run / "rollouts"
    rows = read_jsonl(folder / "rollouts.jsonl")
    pack = load_pack(run / "pack.json")
    sae_path = _sae_path(run, pack)
    sae = load_sae(sae_path)
    layer = pack.layer if pack.layer is not None else sae.cfg.layer
    layer, x, offsets, token_ids = _read_tokens(folder / "tokens.safetensors", layer, len(rows))
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
        text = token_pieces(tokenizer, ids) if ids else [f"#{t}" for t in range(a, b)]
        mech_r = [round(float(v), 5) for v in mech[a:b].tolist()]
        shown.append(_shown(rows[r], r, correct[r], float(resp[r]), ids, text, mech_r))
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


def missing_inputs(run: Path) -> str | None:
    """Why the view cannot be made for ``run`` (a missing input), or ``None``."""
    need = [run / "rollouts" / "rollouts.jsonl", run / "rollouts" / "tokens.safetensors", run / "pack.json"]
    missing = [p for p in need if not p.is_file()]
    return f"{missing[0].relative_to(run)} is missing" if missing else None


def read_view(run: Path) -> dict[str, Any] | None:
    """The view written for ``run``, if there is one of this format."""
    view = read_json_dict(run / VIEW_FILE)
    return view if view and view.get("format") == TOKEN_VIEW_FORMAT else None


def run_token_view(cfg: TokenViewConfig) -> dict[str, Any]:
    """Write ``RUN/token_rewards.json`` unless it is up to date; return the view."""
    run = Path(cfg.run_dir)
    why = missing_inputs(run)
    if why is not None:
        raise SaeRewardError(
            f"cannot score the tokens of {run}: {why} (run the rollouts and discover stages)"
        )
    key = view_key(run, cfg.max_rollouts, cfg.seed)
    old = read_view(run)
    if old and not cfg.recompute and old.get("key") == key:
        log.info("token view: %s is up to date", run / VIEW_FILE)
        return old
    t0 = time.perf_counter()
    view = compute_token_view(run, cfg)
    view["key"] = key
    view["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(run / VIEW_FILE, view)
    return view


def format_token_view(view: Mapping[str, Any], run: str) -> str:
    shown = view.get("responses", [])
    n_ok = sum(bool(r.get("correct")) for r in shown)
    return (
        f"token view: {len(shown)} rollouts ({n_ok} correct) scored per token at layer {view.get('layer')}; "
        f"wrote {Path(run) / VIEW_FILE}"
    )


__all__ = [
    "TokenViewConfig",
    "compute_token_view",
    "format_token_view",
    "load_tokenizer",
    "read_view",
    "run_token_view",
    "sample_rollouts",
    "token_pieces",
    "view_key",
    "zscore_stats",
]
