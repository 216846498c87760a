"""Where in the stack the outcome is readable: the layer map and the logit lens.

**Layer map.** Per layer, Cohen's d of every residual dimension between correct and wrong responses
(pooled response residuals, discovery split); the layer score is the mean of the ten largest |d|
(``top``), so it reads in the units of Cohen's d. The peak layer is where a raw contrastive direction
(and the G1 baselines) is taken. Older ``layer_map.json`` files may hold the sum instead (``top``
times the mean, e.g. 11.86 at layer 17 in BENCHMARKS.md); the peak layer is the same either way.

**Logit lens.** For each layer, the residual at the position that predicts the response's final
answer is passed through the final norm and the unembedding (``norm=False`` skips the norm, the
"raw" lens). Per layer we report the mean probability of the answer's first token and the top tokens
of the mean distribution. Positions come from a forward over prompt + completion for up to ``n``
correct responses (this is analysis, not the reward path, so a forward pass is fine here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saereward import plots
from saereward.config import option, to_dict
from saereward.data.rollouts import load_rollouts
from saereward.errors import SaeRewardError
from saereward.io import write_json
from saereward.model.capture import forward_residuals
from saereward.model.lm import (
    DEFAULT_MODEL,
    DType,
    check_device,
    decoder_layers,
    hf_model_id,
    load_model,
    unwrap,
)
from saereward.stats import cohens_d, mean_difference, require_both_outcomes


def layer_scores(pooled: dict[int, Tensor], correct: Tensor, top: int = 10) -> dict[int, float]:
    """``{layer: mean of the ``top`` largest |d| over residual dimensions}`` (Cohen's d units)."""
    correct = correct.bool()
    return {
        layer: float(cohens_d(x[correct], x[~correct]).abs().topk(min(top, x.shape[1])).values.mean())
        for layer, x in sorted(pooled.items())
    }


def contrastive_direction(x: Tensor, correct: Tensor) -> Tensor:
    """Unit-norm ``mean(correct) − mean(wrong)`` of pooled residuals ``x [R, d]``."""
    v = mean_difference(x, correct)
    n = v.norm()
    if not n > 0:
        raise SaeRewardError("correct and wrong responses have identical mean residuals: no direction")
    return (v / n).float()


def _final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    m = unwrap(model)
    blocks = decoder_layers(m)
    for name, mod in m.named_modules():
        if mod is blocks:
            parent = m.get_submodule(name.rpartition(".")[0]) if "." in name else m
            for attr in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
                if isinstance(getattr(parent, attr, None), torch.nn.Module):
                    return getattr(parent, attr)
    return None


def answer_position(
    tokenizer: Any, prompt: str, completion: str, answer: str
) -> tuple[Tensor, int, int] | None:
    """Token ids of ``prompt + completion`` cut before the answer, and the answer's first token id.

    The answer is the last occurrence of ``answer`` in the completion. Returns ``(ids, pos, token)``
    where ``ids[pos]`` is the last token before the answer, or ``None`` if the answer is not found.
    """
    at = completion.rfind(answer)
    if not answer or at < 0:
        return None
    head = tokenizer(prompt + completion[:at], add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + completion[:at] + answer, add_special_tokens=False)["input_ids"]
    if len(full) <= len(head) or full[: len(head)] != head:
        # the answer merged with the preceding text into one token: use the text before it
        common = 0
        while common < min(len(head), len(full)) and head[common] == full[common]:
            common += 1
        if common == 0 or common >= len(full):
            return None
        head = full[:common]
    return torch.tensor(full[: len(head)]), len(head) - 1, int(full[len(head)])


@torch.no_grad()
def logit_lens(
    lm: Any, examples: Sequence[tuple[str, str, str]], *, norm: bool = True, top: int = 5
) -> dict[str, Any]:
    """Per-layer answer-token probability and top tokens; ``examples`` are (prompt, completion, answer)."""
    model, tok = lm.model, lm.tokenizer
    head = model.get_output_embeddings()
    fnorm = _final_norm(model) if norm else None
    if norm and fnorm is None:
        raise SaeRewardError("could not find the model's final norm: use the raw lens (norm=False)")
    L = lm.num_layers
    probs_answer = torch.zeros(L, dtype=torch.float64)
    mean_dist = torch.zeros(L, head.weight.shape[0], dtype=torch.float64)
    used = 0
    for prompt, completion, answer in examples:
        found = answer_position(tok, prompt, completion, answer)
        if found is None:
            continue
        ids, pos, target = found
        # raw block outputs (HF's last hidden_states entry is already normalized, so not those)
        res = forward_residuals(model, ids.unsqueeze(0), torch.ones(1, len(ids), dtype=torch.long), range(L))
        for layer in range(L):
            h = res[layer][0, pos]
            if fnorm is not None:
                h = fnorm(h)
            p = torch.softmax(head(h.to(head.weight.dtype)).double(), -1).cpu()
            probs_answer[layer] += p[target]
            mean_dist[layer] += p
        used += 1
    if used == 0:
        raise SaeRewardError("logit lens: no example contains its answer in the completion")
    probs_answer /= used
    mean_dist /= used
    tops = []
    for layer in range(L):
        v, i = mean_dist[layer].topk(top)
        tops.append([[tok.decode([int(t)]), round(float(pv), 5)] for pv, t in zip(v, i, strict=True)])
    return {
        "norm": norm,
        "n": used,
        "answer_prob": [round(float(x), 6) for x in probs_answer],
        "top_tokens": tops,
    }


@dataclass(frozen=True)
class LayersConfig:
    """Settings of ``saereward layers``."""

    rollouts: str = option("runs/rollouts", "folder written by `saereward rollouts`")
    split: str = option("discovery", "split whose responses are used")
    top: int = option(10, "layer score = mean of the top-N |Cohen's d| over residual dimensions")
    lens_n: int = option(32, "correct responses used by the logit lens (0: skip the lens)")
    model: str | None = option(None, "model for the logit lens (default: the rollouts' model)")
    dtype: DType = option("fp32", "model dtype for the logit lens")
    device: str = option("cpu", "where the logit lens's model runs: cpu, cuda or cuda:N")
    out: str | None = option(None, "output folder (default: the rollouts folder)")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.top < 1 or self.lens_n < 0:
            raise ValueError(f"top must be >= 1 and lens_n >= 0, got top={self.top}, lens_n={self.lens_n}")


def run_layers(cfg: LayersConfig) -> dict[str, Any]:
    """Layer map (+ logit lens) of a rollout folder; writes ``layer_map.json`` and plots."""
    ro = load_rollouts(cfg.rollouts)
    mask = ro.split_mask(cfg.split)
    correct = ro.correct[mask]
    require_both_outcomes(correct, f"the {cfg.split} split", "raise n/samples or use another task")
    scores = layer_scores({k: v[mask] for k, v in ro.pooled.items()}, correct, cfg.top)
    peak = max(scores, key=lambda k: scores[k])
    result: dict[str, Any] = {
        "split": cfg.split,
        "n_responses": int(mask.sum()),
        "n_correct": int(correct.sum()),
        "scores": {str(k): round(v, 6) for k, v in scores.items()},
        "peak_layer": peak,
        "config": to_dict(cfg),
    }
    made_by = ro.summary.get("model")
    if cfg.lens_n > 0 and cfg.model and made_by and hf_model_id(cfg.model) != hf_model_id(made_by):
        raise SaeRewardError(  # the map and the lens would describe two models in one file
            f"the rollouts at {cfg.rollouts} were made by {made_by}, --model is {cfg.model}: the logit lens "
            f"must read the same model; drop --model (or pass --model {made_by})"
        )
    if cfg.lens_n > 0:
        lm = load_model(cfg.model or made_by or DEFAULT_MODEL, dtype=cfg.dtype, device=cfg.device)
        ex = [
            (r["prompt"], r["completion"], str(r["gold"]))
            for r, m in zip(ro.rows, mask.tolist(), strict=True)
            if m and r["correct"]
        ][: cfg.lens_n]
        result["logit_lens"] = logit_lens(lm, ex, norm=True)
        result["logit_lens_raw"] = logit_lens(lm, ex, norm=False)
    out = Path(cfg.out or cfg.rollouts)
    write_json(out / "layer_map.json", result)
    plots.save_png(plots.layer_map(scores, peak, result), out / "layer_map.png")
    return result
