"""ReasonScore (Galichin et al., 2025): rank SAE features by how specifically they fire around reasoning words.

Given per-token SAE activations ``a [N, M]`` of a text corpus and the occurrences of a vocabulary
``R`` of reasoning words ("wait", "therefore", "perhaps", ...):

* the **window** of an occurrence of word r at position t is positions ``t .. t + window − 1`` of the
  same sequence; ``D_r`` is the union of the windows of r, ``D_R`` the union over all words, and
  ``D_NR`` every other position;
* ``μ_i(D)`` is feature i's mean activation over the positions in D;
* ``p_R(i) = μ_i(D_R) / Σ_j μ_j(D_R)`` and ``p_NR(i) = μ_i(D_NR) / Σ_j μ_j(D_NR)`` are its shares of
  all features' activation inside and outside the windows;
* ``H_i = −Σ_r q_i(r) log q_i(r) / log |R|`` with ``q_i(r) = μ_i(D_r) / Σ_r' μ_i(D_r')`` is the
  normalized entropy of its activation across words: 1 when it fires equally around every word,
  0 when it fires around one word only (a token detector, not a reasoning feature);
* ``RS_i = p_R(i) · H_i^α − p_NR(i)`` with α = 0.7 (mechreward's value).

mechreward ported this ranking and found that on Qwen3.5-4B it picks rhetoric features, not
correctness features; saereward keeps it as an alternative ranking to contrastive discovery.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saereward.config import option, to_dict
from saereward.data.collect import iter_text_documents
from saereward.errors import SaeRewardError
from saereward.io import read_jsonl, write_json
from saereward.model.capture import forward_residuals
from saereward.model.lm import load_model
from saereward.sae.formats import check_sae_matches_model, load_sae

DEFAULT_WORDS = (
    "wait",
    "but",
    "however",
    "therefore",
    "so",
    "perhaps",
    "maybe",
    "alternatively",
    "check",
    "verify",
)


def reason_score(
    acts: Tensor, seq_ids: Tensor, word_ids: Tensor, n_words: int, *, window: int = 8, alpha: float = 0.7
) -> dict[str, Tensor]:
    """ReasonScore of every feature.

    Args:
        acts: ``[N, M]`` non-negative activations, rows in sequence order.
        seq_ids: ``[N]`` sequence index of each row (windows never cross sequences).
        word_ids: ``[N]`` index of the reasoning word starting at that row, ``-1`` where none does.
        n_words: ``|R|`` (>= 2).
    Returns ``{"rs", "p_r", "p_nr", "entropy"}``, each ``[M]``.
    """
    if n_words < 2:
        raise ValueError("ReasonScore needs at least 2 reasoning words (the entropy is over words)")
    N, M = acts.shape
    acts = acts.double()
    in_word = torch.zeros(n_words, N, dtype=torch.bool)
    hits = torch.nonzero(word_ids >= 0).flatten().tolist()
    for t in hits:
        r = int(word_ids[t])
        end = t
        while end < min(N, t + window) and seq_ids[end] == seq_ids[t]:
            end += 1
        in_word[r, t:end] = True
    in_r = in_word.any(0)
    if not in_r.any():
        raise ValueError("no reasoning-word occurrence in the text: add text or words")

    def mean_over(mask: Tensor) -> Tensor:
        return acts[mask].mean(0) if mask.any() else acts.new_zeros(M)

    mu_r = mean_over(in_r)
    mu_nr = mean_over(~in_r)
    p_r = mu_r / mu_r.sum().clamp_min(1e-300)
    p_nr = mu_nr / mu_nr.sum().clamp_min(1e-300)
    per_word = torch.stack([mean_over(in_word[r]) for r in range(n_words)])  # [R, M]
    q = per_word / per_word.sum(0, keepdim=True).clamp_min(1e-300)
    ent = -(torch.where(q > 0, q * q.log(), torch.zeros_like(q))).sum(0) / math.log(n_words)
    rs = p_r * ent.clamp_min(0) ** alpha - p_nr
    return {"rs": rs.float(), "p_r": p_r.float(), "p_nr": p_nr.float(), "entropy": ent.float()}


def word_hits(tokenizer: Any, ids: Sequence[int], words: Sequence[str]) -> list[int]:
    """For each token of ``ids``, the index in ``words`` of the whole word (case-insensitive) that starts there, else -1."""
    pieces = [tokenizer.decode([int(t)]) for t in ids]
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    text = "".join(pieces).lower()
    out = [-1] * len(ids)
    tok_at = {s: i for i, s in reversed(list(enumerate(starts)))}
    for w_i, w in enumerate(words):
        for m in re.finditer(rf"(?<![a-z]){re.escape(w.lower())}(?![a-z])", text):
            # the token whose span contains the word's first character
            s = m.start()
            while s not in tok_at and s > 0:
                s -= 1
            i = tok_at.get(s)
            if i is not None and out[i] == -1:
                out[i] = w_i
    return out


@torch.no_grad()
def rank_features(
    lm: Any,
    sae: Any,
    layer: int,
    texts: Sequence[str],
    words: Sequence[str] = DEFAULT_WORDS,
    *,
    window: int = 8,
    alpha: float = 0.7,
    max_length: int = 256,
    top: int = 20,
) -> dict[str, Any]:
    """Run the model over ``texts``, encode layer ``layer`` with the SAE, and rank features by ReasonScore."""
    acts, seqs, wids = [], [], []
    for s, text in enumerate(texts):
        ids = lm.tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        if not ids:
            continue
        x = torch.tensor([ids])
        res = forward_residuals(lm.model, x, torch.ones_like(x), [layer])[layer][0]
        p = next(sae.parameters())
        acts.append(sae.encode(res.to(p.dtype)).float().cpu())
        seqs.append(torch.full((len(ids),), s))
        wids.append(torch.tensor(word_hits(lm.tokenizer, ids, words)))
    r = reason_score(
        torch.cat(acts), torch.cat(seqs), torch.cat(wids), len(words), window=window, alpha=alpha
    )
    order = torch.argsort(r["rs"], descending=True)[:top]
    return {
        "words": list(words),
        "window": window,
        "alpha": alpha,
        "n_tokens": int(sum(len(a) for a in acts)),
        "n_hits": int((torch.cat(wids) >= 0).sum()),
        "top": [
            {
                "feature_id": int(i),
                "reason_score": float(r["rs"][i]),
                "p_r": float(r["p_r"][i]),
                "p_nr": float(r["p_nr"][i]),
                "entropy": float(r["entropy"][i]),
            }
            for i in order
        ],
    }


@dataclass(frozen=True)
class ReasonScoreConfig:
    """Settings of ``saereward reasonscore``."""

    sae: str = option("runs/sae/sae", "SAE to rank")
    layer: int | None = option(None, "layer the SAE reads (default: the SAE's recorded layer)")
    model: str | None = option(None, "model (default: the SAE's recorded model)")
    rollouts: str | None = option(None, "use the completions of this rollout folder as the text")
    text_paths: tuple[str, ...] = option((), "and/or .txt/.jsonl text files")
    text_field: str = option("text", "field of .jsonl rows (comma list: first present)")
    max_docs: int = option(512, "at most this many texts")
    words: tuple[str, ...] = option(DEFAULT_WORDS, "reasoning vocabulary")
    window: int = option(8, "tokens per window, starting at the word")
    alpha: float = option(0.7, "entropy exponent")
    top: int = option(50, "features to report")
    out: str = option("runs/reasonscore.json", "output JSON")

    def __post_init__(self) -> None:
        if len(set(self.words)) < 2:
            raise ValueError(
                f"words: ReasonScore needs at least 2 distinct reasoning words, got {list(self.words)}"
            )
        if self.window < 1 or self.top < 1 or self.max_docs < 1:
            raise ValueError("window, top and max_docs must be >= 1")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


def run_reasonscore(cfg: ReasonScoreConfig) -> dict[str, Any]:
    """Rank the SAE's features by ReasonScore over the given texts; write ``cfg.out``."""
    sae = load_sae(cfg.sae)
    if cfg.top > sae.cfg.d_sae:
        raise SaeRewardError(
            f"--top {cfg.top} is more than the SAE's {sae.cfg.d_sae} features: pass --top {sae.cfg.d_sae} or less"
        )
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    model = cfg.model or sae.cfg.model
    if layer is None or model is None:
        raise SaeRewardError("the SAE does not record its model/layer: pass --model and --layer")
    texts: list[str] = []
    if cfg.rollouts:
        texts += [
            r["completion"]
            for r in read_jsonl(Path(cfg.rollouts) / "rollouts.jsonl")
            if r["completion"].strip()
        ]
    for p in cfg.text_paths:
        texts += list(iter_text_documents(p, text_field=cfg.text_field))
    texts = texts[: cfg.max_docs]
    if not texts:
        raise SaeRewardError("no text to score: pass --rollouts or --text-paths")
    lm = load_model(model)
    check_sae_matches_model(sae, lm.d_model, layer)
    try:
        res = rank_features(lm, sae, layer, texts, cfg.words, window=cfg.window, alpha=cfg.alpha, top=cfg.top)
    except ValueError as exc:  # no occurrence of any reasoning word in the texts
        raise SaeRewardError(
            f"{exc} ({len(texts)} texts, words {', '.join(cfg.words[:6])}...): pass --text-paths with "
            "reasoning text, or --words that occur in it"
        ) from None
    res.update(
        {"sae": cfg.sae, "layer": layer, "model": model, "n_texts": len(texts), "config": to_dict(cfg)}
    )
    write_json(cfg.out, res)
    return res
