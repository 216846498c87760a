"""Activation steering: ``saereward steer``, a CAA direction swept over scales with a negative control,
and single-feature SAE steering (add or clamp).

**Direction** (``vector``), unit-normalised:

* ``contrastive`` (CAA, mechreward's Gemma L27 experiment): ``mean(h_L | correct) − mean(h_L | wrong)``
  over the pooled response residuals of a ``saereward rollouts`` folder (``pooled.safetensors`` key
  ``layer_<L>``), using the **discovery split only**, so the direction is never fit on held-out data;
* ``pack``: ``Σ_i signed_weight_i · W_dec[f_i] / ||W_dec[f_i]||`` over the pack's features (helpful
  ``+|w|``, harmful ``−|w|``), read from the pack's SAE.

**Scale.** Each entry of ``scales`` is a fraction of the layer's mean residual norm ``‖h_L‖``: the
hook adds ``scale · ‖h_L‖ · v`` to the output of decoder block ``L`` at every position (prompt and
every generated token: a forward hook fires on the prefill and on each cached decode step). The mean
norm is measured either on the prompts of the evaluation questions (``norm_source = "prompts"``: mean
L2 norm over real prompt tokens, the first token of each prompt excluded because it is an attention
sink whose norm is ~100× the others on SmolLM2) or on the rollouts' pooled response residuals
(``"rollouts"``: mean norm of the per-response mean vectors, discovery split; smaller, as averaging
cancels part of each token's norm). Negative scales are the **negative control** (mechreward's −5 %):
a direction effect should hurt there; a magnitude effect looks the same in both signs.

**Single feature** (``feature`` set), values in the SAE's activation units (decoder row ``W_dec[f]``,
divided by the SAE's input scale so the change is in raw residual units):

* ``add``: ``h + value · W_dec[f]`` at every position;
* ``clamp``: encode ``h`` with the SAE, read feature ``f``'s activation ``a_f`` (0 when it is not in
  the top-k) and add ``(value − a_f) · W_dec[f]``: the reconstruction with ``a_f`` set to ``value``
  plus the SAE's error term ``h − SAE(h)``, i.e. only that feature's contribution changes.

**Runs.** One greedy base evaluation (scale 0) on ``n`` held-out questions (task seed ``seed``,
distinct from the rollouts' seed), then one per condition, each via
:func:`saereward.analysis.evaluate.run_eval` on the hooked model. Per condition: accuracy with a Wilson 95 %
CI, the difference from base, the recovered (base wrong → steered right) and broken (base right →
steered wrong) question ids, net flips and the exact McNemar p on the paired per-question outcomes.
Each finished condition is cached as ``<out>/conditions/<label>.json`` with a key of everything that
determines it (the evaluation settings, layer, the applied perturbation and a hash of the direction or
SAE); a re-run with a matching key reuses it, so a killed sweep resumes. Writes ``steer.json``,
``steer.png`` and ``config.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from saereward import __version__, plots
from saereward.analysis.evaluate import EvalConfig, _load_task, run_eval
from saereward.config import option, refuse_other_settings, to_dict
from saereward.errors import SaeRewardError
from saereward.features.pack import check_pack, check_pack_sae, load_pack
from saereward.io import as_json, read_jsonl, write_json
from saereward.model.capture import block_output, forward_residuals
from saereward.model.lm import (
    LoadedModel,
    check_device,
    decoder_layers,
    load_model,
    resolve_layer,
)
from saereward.options import DeviceOptions, ModelOptions, TaskOptions
from saereward.sae.formats import check_sae_matches_model, load_sae
from saereward.stats import mcnemar, mean_difference, wilson_ci
from saereward.tasks import format_prompt
from saereward.tasks.prompts import PromptFormat

if TYPE_CHECKING:
    import torch
    from torch import nn

    from saereward.analysis.evaluate import EvalConfig
    from saereward.features.pack import FeaturePack
    from saereward.sae.coder import TopKSAE

log = logging.getLogger(__name__)

VectorSource = Literal["contrastive", "pack"]
FeatureMode = Literal["add", "clamp"]
NormSource = Literal["prompts", "rollouts"]
Kind = Literal["base", "vector", "negative_control", "feature_add", "feature_clamp"]


@dataclass(frozen=True)
class SteerConfig(TaskOptions, DeviceOptions, ModelOptions):
    """Settings of ``saereward steer``."""

    adapter: str | None = option(None, "LoRA adapter to merge in: a `saereward train-rl` run folder")
    task: str = option("chain_sum", "task of the held-out questions (see `saereward tasks`)")
    n: int = option(50, "held-out questions")
    seed: int = option(12_345, "task seed of the held-out questions (the rollouts use another)")
    prompt_format: PromptFormat = option("raw", "prompt format: raw (mechreward's Q:/A: CoT), fewshot, chat")
    shots: int = option(2, "few-shot demos for prompt_format=fewshot")
    max_new_tokens: int = option(64, "max tokens per answer (greedy)")
    batch_size: int = option(16, "generation batch size")
    layer: int | None = option(None, "block whose output is steered (None: the pack's / SAE's layer)")
    vector: VectorSource = option(
        "contrastive",
        "steering direction: contrastive (mean correct − mean wrong of the rollouts' pooled residuals, "
        "discovery split) or pack (signed sum of the pack's unit decoder rows)",
    )
    rollouts: str | None = option(None, "a `saereward rollouts` folder (for vector=contrastive)")
    pack: str | None = option(None, "feature pack (for vector=pack; also supplies the layer and SAE)")
    sae: str | None = option(
        None, "SAE for vector=pack and --feature (default: the pack's recorded sae_path)"
    )
    scales: tuple[float, ...] = option(
        (0.02, 0.05, 0.10, 0.15, -0.05),
        "steering scales as fractions of the layer's mean residual norm; negative = negative control",
    )
    norm_source: NormSource = option(
        "prompts",
        "where the mean residual norm is measured: prompts (the eval prompts' tokens, first token "
        "excluded) or rollouts (pooled response residuals, discovery split)",
    )
    feature: int | None = option(None, "also steer one SAE feature (its id); None: no feature rows")
    feature_mode: FeatureMode = option(
        "add", "add: h + value·W_dec[f]; clamp: set the feature's SAE activation to value, keep the SAE error"
    )
    feature_values: tuple[float, ...] = option(
        (5.0, 10.0, 20.0), "feature values in SAE activation units (clamp 0 = ablate the feature)"
    )
    out: str = option("runs/steer", "output folder for steer.json, steer.png and conditions/")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if any(not math.isfinite(s) or s == 0 for s in self.scales):
            raise ValueError(f"scales must be finite and nonzero (0 is the base run), got {self.scales}")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales contain a duplicate: {self.scales}")
        if not self.scales and self.feature is None:
            raise ValueError("nothing to run: give scales or a feature")
        if self.feature is not None:
            if self.feature < 0:
                raise ValueError(f"feature must be a non-negative id, got {self.feature}")
            if not self.feature_values:
                raise ValueError("feature_values must not be empty when feature is set")
            if len(set(self.feature_values)) != len(self.feature_values):
                raise ValueError(f"feature_values contain a duplicate: {self.feature_values}")
            if any(not math.isfinite(v) for v in self.feature_values):
                raise ValueError(f"feature_values must be finite, got {self.feature_values}")


# --------------------------------------------------------------------------------------------------
# The hook
# --------------------------------------------------------------------------------------------------


def replace_block_output(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` of a decoder block with its hidden-state tensor replaced (tensor, tuple/list or ModelOutput)."""
    import torch

    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    if isinstance(getattr(output, "hidden_states", None), torch.Tensor):
        output.hidden_states = hidden
        return output
    raise TypeError(f"unexpected decoder-block output type {type(output).__name__}")


DeltaFn = Callable[["torch.Tensor"], "torch.Tensor"]
"""``h [..., d] -> perturbation`` broadcastable to ``h`` (any float dtype; cast to ``h``'s)."""


class SteeringHook:
    """Context manager: a forward hook on decoder block ``layer`` that returns ``h + delta_fn(h)``.

    Works in a plain forward and in ``generate()`` (prefill and every cached decode step). Keeps the
    mean L2 norm of the perturbation actually applied (:attr:`mean_norm`, over every hooked position,
    left pads included). The hook is removed on exit, also after an exception.
    """

    def __init__(self, model: nn.Module, layer: int, delta_fn: DeltaFn) -> None:
        self.layer = resolve_layer(model, layer)
        self.block = decoder_layers(model)[self.layer]
        self.delta_fn = delta_fn
        self.norm_sum = 0.0
        self.positions = 0
        self._handle: Any = None

    def __enter__(self) -> SteeringHook:
        self._handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / self.positions if self.positions else 0.0

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        import torch

        h = block_output(output)
        with torch.no_grad():
            delta = self.delta_fn(h)
            norms = torch.broadcast_to(delta.float().norm(dim=-1), h.shape[:-1])
            self.norm_sum += float(norms.sum())
            self.positions += int(norms.numel())
        return replace_block_output(output, h + delta.to(device=h.device, dtype=h.dtype))


def constant_delta(vec: torch.Tensor) -> DeltaFn:
    """A perturbation that adds ``vec [d]`` at every position."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        return vec.to(device=h.device)

    return fn


def feature_row(sae: TopKSAE, feature: int) -> torch.Tensor:
    """Decoder row of ``feature`` in raw residual units (``W_dec[f] / input_scale``), fp32, detached."""
    return (sae.W_dec[feature].detach() / sae.scale).float()


def feature_activation(sae: TopKSAE, h: torch.Tensor, feature: int) -> torch.Tensor:
    """The SAE activation of ``feature`` on ``h [..., d]`` -> ``[...]`` fp32 (0 where it is not in the top-k).

    The top-k choice is the SAE's own (:meth:`TopKSAE.encode_topk`); the value is recomputed exactly in
    the weights' precision, since the fast encoder returns bf16-rounded values (relative error 2^-8).
    """
    import torch

    with torch.no_grad():
        _, indices = sae.encode_topk(h)
        selected = (indices == feature).any(-1).reshape(-1)
        xn = sae.flat_input(h)
        pre = (xn - sae.b_dec) @ sae.W_enc[:, feature] + sae.b_enc[feature]
        act = torch.where(selected, pre.clamp_min(0), torch.zeros_like(pre))
        return act.float().reshape(h.shape[:-1])


def clamp_delta(sae: TopKSAE, feature: int, value: float) -> DeltaFn:
    """Perturbation that sets ``feature``'s SAE activation to ``value``: ``(value − a_f) · W_dec[f]``.

    ``h + delta = SAE.decode(codes with a_f := value) + (h − SAE(h))``: the SAE error term is kept.
    """
    row = feature_row(sae, feature)
    on = sae  # the SAE on the model's device: a copy, made on the first call where they differ

    def fn(h: torch.Tensor) -> torch.Tensor:
        nonlocal on
        if on.W_enc.device != h.device:
            on = copy.deepcopy(sae).to(h.device)
        a = feature_activation(on, h, feature).to(h.device)
        return (value - a).unsqueeze(-1) * row.to(h.device)

    return fn


# --------------------------------------------------------------------------------------------------
# Directions
# --------------------------------------------------------------------------------------------------


def unit(v: torch.Tensor, what: str = "steering vector") -> torch.Tensor:
    """``v / ||v||`` in fp32; a zero or non-finite vector is an error."""
    v = v.detach().float()
    n = float(v.norm())
    if not (n > 0 and math.isfinite(n)):
        raise SaeRewardError(f"the {what} has norm {n}: cannot normalise it")
    return v / n


def contrastive_direction(pooled: torch.Tensor, correct: Sequence[bool]) -> torch.Tensor:
    """``mean(pooled | correct) − mean(pooled | wrong)`` (unnormalised, fp32) of ``pooled [R, d]``."""
    import torch

    return mean_difference(pooled, correct, torch.float32)


def check_rollout_folder(rollouts: str | Path) -> Path:
    """``rollouts`` as a path, or one error line when it lacks what steering reads from it."""
    p = Path(rollouts).expanduser()
    need = [f for f in ("rollouts.jsonl", "pooled.safetensors") if not (p / f).is_file()]
    if need:
        raise SaeRewardError(
            f"{p} is not a rollout folder (missing {', '.join(need)}): run `saereward rollouts --out {p}` first"
        )
    return p


def read_pooled(rollouts: str | Path, layer: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``pooled [R, d]`` at ``layer`` and the rows of ``rollouts.jsonl`` of a rollout folder (no token file read)."""
    from safetensors import SafetensorError, safe_open

    p = check_rollout_folder(rollouts)
    rows = read_jsonl(p / "rollouts.jsonl")
    try:
        with safe_open(str(p / "pooled.safetensors"), framework="pt") as fh:
            keys = list(fh.keys())
            key = f"layer_{layer}"
            if key not in keys:
                have = sorted(int(k.split("_")[1]) for k in keys if k.startswith("layer_"))
                raise SaeRewardError(
                    f"rollouts {p} have no pooled residuals at layer {layer} (they have layers {have}): "
                    f"re-run `saereward rollouts` with that layer in --layers or pick --layer from those"
                )
            pooled = fh.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise SaeRewardError(
            f"cannot read {p / 'pooled.safetensors'}: {exc}; re-run `saereward rollouts`"
        ) from None
    if pooled.shape[0] != len(rows):
        raise SaeRewardError(
            f"{p}: rollouts.jsonl has {len(rows)} rows but pooled residuals {pooled.shape[0]}; re-run"
        )
    if rows and not all("split" in r and "correct" in r for r in rows):
        raise SaeRewardError(
            f"{p}: rollouts.jsonl rows lack 'split'/'correct' labels; re-run `saereward rollouts`"
        )
    return pooled, rows


def contrastive_vector(rollouts: str | Path, layer: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Unit CAA direction at ``layer`` from the discovery split of a rollout folder, and what it was fit on."""
    pooled, rows = read_pooled(rollouts, layer)
    disc = [i for i, r in enumerate(rows) if r["split"] == "discovery"]
    if not disc:
        raise SaeRewardError(f"rollouts {rollouts} have no discovery split rows: re-run `saereward rollouts`")
    correct = [bool(rows[i]["correct"]) for i in disc]
    raw = contrastive_direction(pooled[disc], correct)
    info = {
        "source": "contrastive",
        "rollouts": str(rollouts),
        "split": "discovery",
        "n_responses": len(disc),
        "n_correct": sum(correct),
        "n_wrong": len(correct) - sum(correct),
        "raw_norm": float(raw.norm()),
    }
    return unit(raw, "contrastive vector (mean correct − mean wrong)"), info


def pack_vector(pack: FeaturePack, sae: TopKSAE) -> torch.Tensor:
    """Unit ``Σ signed_weight · W_dec[f] / ||W_dec[f]||`` over the pack's features."""
    import torch

    ids = torch.tensor(pack.feature_ids, dtype=torch.long)
    w = torch.tensor(pack.signed_weights(), dtype=torch.float32)
    rows = sae.W_dec.detach().float()[ids]
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit((w[:, None] * rows).sum(0), f"pack {pack.name!r} direction")


def _sha(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Residual norm
# --------------------------------------------------------------------------------------------------


def prompt_residual_norm(
    lm: LoadedModel, prompts: Sequence[str], layer: int, batch_size: int = 16
) -> tuple[float, int]:
    """Mean L2 norm of the block-``layer`` output over the prompts' real tokens, each prompt's first token excluded.

    Returns ``(mean norm, number of positions)``. The first token is an attention sink on most models
    (norm ~100× the rest on SmolLM2), which would dominate a plain mean.
    """
    import torch

    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        enc = lm.tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        h = forward_residuals(lm.model, ids, mask, [layer])[layer].float()
        keep = mask.bool().clone()
        first = mask.long().argmax(dim=1)  # first real position under left padding
        keep[torch.arange(keep.shape[0]), first] = False
        norms = h.norm(dim=-1).cpu()[keep]
        total += float(norms.sum())
        count += int(norms.numel())
    if count == 0:
        raise SaeRewardError("the prompts have no tokens besides the first: cannot measure the residual norm")
    return total / count, count


# --------------------------------------------------------------------------------------------------
# Conditions and bookkeeping
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One steering condition: ``scale`` is a fraction of the mean norm (vector) or a feature value."""

    label: str
    kind: Kind
    scale: float = 0.0

    @property
    def display(self) -> str:
        return f"{self.label} (negative control)" if self.kind == "negative_control" else self.label


def conditions(cfg: SteerConfig) -> list[Condition]:
    """Base, then each vector scale, then each feature value."""
    out = [Condition("base", "base")]
    for s in cfg.scales:
        out.append(Condition(f"vec{s:+g}", "vector" if s > 0 else "negative_control", s))
    if cfg.feature is not None:
        kind: Kind = "feature_add" if cfg.feature_mode == "add" else "feature_clamp"
        for v in cfg.feature_values:
            out.append(Condition(f"f{cfg.feature}_{cfg.feature_mode}{v:+g}", kind, v))
    return out


def _filename(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9+\-._]", "_", label) + ".json"


def paired_comparison(base: list[dict[str, Any]], steered: list[dict[str, Any]]) -> dict[str, Any]:
    """Recovered / broken ids, net flips, accuracy difference and exact McNemar p of ``steered`` vs ``base``.

    Rows are matched by ``id``; both runs must hold the same ids.
    """
    b = {r["id"]: bool(r["correct"]) for r in base}
    s = {r["id"]: bool(r["correct"]) for r in steered}
    if set(b) != set(s) or len(b) != len(base) or len(s) != len(steered):
        raise SaeRewardError(
            "base and steered runs hold different questions: delete the conditions folder and re-run"
        )
    ids = [r["id"] for r in base]
    before = [b[i] for i in ids]
    after = [s[i] for i in ids]
    mc = mcnemar(before, after)
    recovered = [i for i in ids if not b[i] and s[i]]
    broken = [i for i in ids if b[i] and not s[i]]
    n = len(ids)
    return {
        "diff": (sum(after) - sum(before)) / n if n else float("nan"),
        "recovered": recovered,
        "broken": broken,
        "net_flips": len(recovered) - len(broken),
        "mcnemar_p": float(mc["p_value"]),
    }


#: settings a sweep may resume with changed: they do not change a finished condition. The inputs'
#: contents are in each condition's cache key, so their paths may change; the scales and feature
#: values only choose which conditions run, so a sweep can be extended.
_RESUME_FREE = ("progress", "out", "threads", "device", "rollouts", "pack", "sae", "scales", "feature_values")


def _cache_read(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("key") != as_json(key):
        return None
    return saved


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def eval_config(cfg: SteerConfig) -> EvalConfig:
    """The greedy :class:`EvalConfig` every condition is evaluated with (nothing written by it)."""
    return EvalConfig(
        model=cfg.model,
        dtype=cfg.dtype,
        adapter=cfg.adapter,
        threads=cfg.threads,
        device=cfg.device,
        task=cfg.task,
        task_source=cfg.task_source,
        task_path=cfg.task_path,
        task_params=dict(cfg.task_params),
        n=cfg.n,
        seed=cfg.seed,
        prompt_format=cfg.prompt_format,
        shots=cfg.shots,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        sample=False,
        out=None,
        progress=cfg.progress,
    )


@dataclass
class _Setup:
    layer: int
    pack: FeaturePack | None = None
    sae: TopKSAE | None = None
    sae_path: str | None = None
    rollouts_cfg: dict[str, Any] = field(default_factory=dict)


def _rollouts_config(path: str) -> dict[str, Any]:
    p = Path(path).expanduser() / "config.json"
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _resolve(cfg: SteerConfig) -> _Setup:
    """Check the inputs (before the model is loaded) and settle the layer, pack and SAE."""
    if cfg.vector == "contrastive" and cfg.scales and not cfg.rollouts:
        raise SaeRewardError(
            "vector=contrastive needs --rollouts (a `saereward rollouts` folder), or use --vector pack"
        )
    if cfg.norm_source == "rollouts" and not cfg.rollouts:
        raise SaeRewardError("norm_source=rollouts needs --rollouts, or use --norm-source prompts")
    if cfg.vector == "pack" and cfg.scales and not cfg.pack:
        raise SaeRewardError("vector=pack needs --pack (a feature pack JSON)")
    if cfg.rollouts:
        check_rollout_folder(cfg.rollouts)
    pack = load_pack(cfg.pack) if cfg.pack else None
    need_sae = (cfg.vector == "pack" and bool(cfg.scales)) or cfg.feature is not None
    sae_path = cfg.sae or (str(pack.metadata["sae_path"]) if pack and pack.metadata.get("sae_path") else None)
    sae = None
    if need_sae:
        if not sae_path:
            why = "--feature" if cfg.feature is not None else "vector=pack"
            raise SaeRewardError(f"{why} needs an SAE: pass --sae (the pack records no sae_path)")
        if pack is not None:
            check_pack_sae(pack, sae_path)
        sae = load_sae(sae_path)
        sae.requires_grad_(False)
        if (
            pack is not None
            and pack.layer is not None
            and sae.cfg.layer is not None
            and pack.layer != sae.cfg.layer
        ):
            raise SaeRewardError(
                f"pack {cfg.pack} is at layer {pack.layer} but SAE {sae_path} was trained at layer {sae.cfg.layer}: "
                "use the pack's SAE"
            )
        if pack is not None:
            check_pack(pack, d_sae=sae.d_sae, d_model=sae.d_in, where=f"(SAE {sae_path})")
        if cfg.feature is not None and cfg.feature >= sae.d_sae:
            raise SaeRewardError(
                f"feature {cfg.feature} is out of range: SAE {sae_path} has {sae.d_sae} features (0..{sae.d_sae - 1})"
            )
    ro_cfg = _rollouts_config(cfg.rollouts) if cfg.rollouts else {}
    layer = cfg.layer
    if layer is None:
        if pack is not None and pack.layer is not None:
            layer = pack.layer
        elif sae is not None and sae.cfg.layer is not None:
            layer = sae.cfg.layer
        elif len(ro_cfg.get("token_layers") or ()) == 1:
            layer = int(ro_cfg["token_layers"][0])
        else:
            raise SaeRewardError(
                "cannot tell which layer to steer: pass --layer (or a --pack that records one)"
            )
    if cfg.rollouts and ro_cfg:
        if ro_cfg.get("task") == cfg.task and ro_cfg.get("seed") == cfg.seed:
            raise SaeRewardError(
                f"--seed {cfg.seed} is the rollouts' task seed: the held-out questions would be the ones the "
                "vector was fit on; pass another --seed (default 12345)"
            )
        if ro_cfg.get("model") not in (None, cfg.model):
            log.warning(
                "rollouts %s were generated by %s, steering %s", cfg.rollouts, ro_cfg.get("model"), cfg.model
            )
    return _Setup(layer=layer, pack=pack, sae=sae, sae_path=sae_path, rollouts_cfg=ro_cfg)


def _check_layer(cfg: SteerConfig, setup: _Setup, layer: int) -> None:
    """The resolved steering ``layer`` must be the one the SAE reads (SAE directions) and the pack's (vector=pack)."""
    sae_layer = setup.sae.cfg.layer if setup.sae is not None else None
    if sae_layer is not None and sae_layer != layer:
        raise SaeRewardError(
            f"layer {layer} differs from the layer {sae_layer} SAE {setup.sae_path} reads: its features "
            f"(vector=pack / --feature) only mean something there; pass --layer {sae_layer}"
        )
    pack = setup.pack
    if (
        cfg.vector == "pack"
        and cfg.scales
        and pack is not None
        and pack.layer is not None
        and pack.layer != layer
    ):
        raise SaeRewardError(
            f"layer {layer} differs from the pack's layer {pack.layer}: pass --layer {pack.layer}"
        )


def _steering_vector(cfg: SteerConfig, setup: Any, layer: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The CAA vector of the scale sweep (``None`` without scales) and where it came from."""
    if not cfg.scales:
        return None, {}
    if cfg.vector == "contrastive":
        assert cfg.rollouts is not None
        vec, vec_info = contrastive_vector(cfg.rollouts, layer)
    else:
        assert setup.pack is not None and setup.sae is not None
        vec = pack_vector(setup.pack, setup.sae)
        vec_info = {"source": "pack", "pack": cfg.pack, "sae": setup.sae_path, "n_features": len(setup.pack)}
    if setup.pack is not None and setup.sae is not None and cfg.vector == "contrastive":
        vec_info["cosine_with_pack_direction"] = float(vec @ pack_vector(setup.pack, setup.sae))
    return vec, vec_info


def _residual_norm(
    cfg: SteerConfig, lm: LoadedModel, prompts: list[str], layer: int
) -> tuple[float, dict[str, Any]]:
    """The residual norm the scales are fractions of, and how it was measured."""
    if cfg.norm_source == "prompts":
        mean_norm, n_pos = prompt_residual_norm(lm, prompts, layer, cfg.batch_size)
        return mean_norm, {
            "value": mean_norm,
            "source": "prompts",
            "positions": n_pos,
            "how": "mean L2 norm of the layer output over the eval prompts' tokens, each prompt's first token "
            "(attention sink) excluded",
        }
    assert cfg.rollouts is not None
    pooled, rows = read_pooled(cfg.rollouts, layer)
    disc = [i for i, r in enumerate(rows) if r["split"] == "discovery"]
    mean_norm = float(pooled[disc].float().norm(dim=-1).mean())
    return mean_norm, {
        "value": mean_norm,
        "source": "rollouts",
        "positions": len(disc),
        "how": "mean L2 norm of the rollouts' pooled (per-response mean) residuals, discovery split",
    }


def _condition_delta(
    cond: Condition,
    cfg: SteerConfig,
    setup: Any,
    vec: torch.Tensor | None,
    mean_norm: float,
    key: dict[str, Any],
) -> DeltaFn | None:
    """The residual edit of one condition (``None`` for the base run); adds its identity to ``key``."""
    if cond.kind in ("vector", "negative_control"):
        assert vec is not None
        alpha = cond.scale * mean_norm
        key.update({"alpha": round(alpha, 6), "vector_sha": _sha(vec)})
        return constant_delta(alpha * vec)
    if cond.kind in ("feature_add", "feature_clamp"):
        assert setup.sae is not None and cfg.feature is not None
        sae_sha = _sha(setup.sae.W_enc, setup.sae.b_enc, setup.sae.W_dec, setup.sae.b_dec)
        key.update({"feature": cfg.feature, "sae_sha": sae_sha})
        if cond.kind == "feature_add":
            return constant_delta(cond.scale * feature_row(setup.sae, cfg.feature))
        return clamp_delta(setup.sae, cfg.feature, cond.scale)
    return None


def _run_conditions(
    cfg: SteerConfig,
    setup: Any,
    lm: LoadedModel,
    ec: Any,
    layer: int,
    vec: torch.Tensor | None,
    mean_norm: float,
) -> dict[str, dict[str, Any]]:
    """Evaluate every condition (a finished one is read back from its cache file); ``{label: record}``."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    # where it ran does not change what was asked: device is not part of a condition's cache key
    eval_key = {k: v for k, v in to_dict(ec).items() if k not in ("progress", "out", "threads", "device")}
    common_key = {"eval": eval_key, "layer": layer, "saereward_version": __version__}
    results: dict[str, dict[str, Any]] = {}
    refuse_other_settings(
        out, cfg, _RESUME_FREE, cache="conditions", holds="steering conditions", stage="steer"
    )
    (out / "conditions").mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    bar = tqdm(conditions(cfg), desc="steer", unit="cond", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for cond in bar:
            bar.set_postfix_str(cond.label)
            key: dict[str, Any] = {**common_key, "kind": cond.kind, "scale": cond.scale}
            delta = _condition_delta(cond, cfg, setup, vec, mean_norm, key)
            path = out / "conditions" / _filename(cond.label)
            cached = _cache_read(path, key)
            if cached is None and path.is_file():
                log.warning("%s was computed from other inputs (SAE, pack or rollouts): recomputing it", path)
            if cached is not None:
                log.info("reusing the finished condition %s from %s", cond.label, path)
                results[cond.label] = {**cached, "cached": True}
                continue
            tc = time.perf_counter()
            if delta is None:
                res = run_eval(ec, lm=lm)
                pert = 0.0
            else:
                with SteeringHook(lm.model, layer, delta) as hook:
                    res = run_eval(ec, lm=lm)
                pert = hook.mean_norm
            record = {
                "key": key,
                "label": cond.label,
                "kind": cond.kind,
                "scale": cond.scale,
                "perturbation_norm": pert,
                "rows": [{k: v for k, v in r.items() if k != "prompt"} for r in res.rows],
                "seconds": round(time.perf_counter() - tc, 3),
            }
            write_json(path, record)
            results[cond.label] = {**as_json(record), "cached": False}
    finally:
        bar.close()
    return results


def _steer_table(
    conds: list[Condition], results: dict[str, dict[str, Any]], mean_norm: float
) -> list[dict[str, Any]]:
    """One row per condition: accuracy with its Wilson CI, the perturbation, and the paired test vs base."""
    base_rows = results["base"]["rows"]
    table: list[dict[str, Any]] = []
    for cond in conds:
        r = results[cond.label]
        k = sum(bool(x["correct"]) for x in r["rows"])
        ci = wilson_ci(k, len(r["rows"]))
        row: dict[str, Any] = {
            "label": cond.label,
            "kind": cond.kind,
            "negative_control": cond.kind == "negative_control",
            "scale": cond.scale,
            "perturbation_norm": r["perturbation_norm"],
            "perturbation_frac": r["perturbation_norm"] / mean_norm if mean_norm > 0 else float("nan"),
            "n": ci.n,
            "correct": k,
            "accuracy": ci.p,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "confidence": ci.confidence,
            "cached": r["cached"],
        }
        if cond.kind != "base":
            row.update(paired_comparison(base_rows, r["rows"]))
        table.append(row)
    return table


def _check_inputs(
    cfg: SteerConfig, setup: Any, lm: LoadedModel, layer: int, vec: torch.Tensor | None
) -> None:
    """The vector, SAE and prompt format fit the model, or one error line says why not."""
    d_model = lm.d_model
    if vec is not None and vec.shape[0] != d_model:
        raise SaeRewardError(
            f"the {cfg.vector} vector has width {vec.shape[0]} but {cfg.model} has d_model {d_model}: "
            "the rollouts/pack belong to a different model"
        )
    if setup.sae is not None:
        check_sae_matches_model(setup.sae, d_model, layer)
    if cfg.prompt_format == "chat" and not getattr(lm.tokenizer, "chat_template", None):
        raise SaeRewardError(f"model {cfg.model} has no chat template: use --prompt-format raw or fewshot")


def run_steer(cfg: SteerConfig, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Base run, then each steering condition; compare; write ``steer.json``, ``steer.png``, ``config.json``."""
    import torch

    t0 = time.perf_counter()
    setup = _resolve(cfg)
    ec = eval_config(cfg)
    task = _load_task(ec)  # validate the task before paying for the model
    items = list(task.items())
    if lm is None:
        lm = load_model(
            cfg.model, dtype=cfg.dtype, threads=cfg.threads, adapter=cfg.adapter, device=cfg.device
        )
    elif cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    layer = resolve_layer(lm.model, setup.layer)
    _check_layer(cfg, setup, layer)
    vec, vec_info = _steering_vector(cfg, setup, layer)
    _check_inputs(cfg, setup, lm, layer, vec)
    prompts = [
        format_prompt(task, it, cfg.prompt_format, tokenizer=lm.tokenizer, shots=cfg.shots) for it in items
    ]
    mean_norm, norm_info = _residual_norm(cfg, lm, prompts, layer)
    results = _run_conditions(cfg, setup, lm, ec, layer, vec, mean_norm)
    result: dict[str, Any] = {
        "n": len(items),
        "seed": cfg.seed,
        "task": task.describe(),
        "layer": layer,
        "residual_norm": norm_info,
        "vector": vec_info or None,
        "feature": (
            {"id": cfg.feature, "mode": cfg.feature_mode, "sae": setup.sae_path, "units": "SAE activation"}
            if cfg.feature is not None
            else None
        ),
        "rows": _steer_table(conditions(cfg), results, mean_norm),
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "config": to_dict(cfg),
        "saereward_version": __version__,
    }
    out = Path(cfg.out)
    base = next((r for r in result["rows"] if r["kind"] == "base"), None)
    plots.save_png(plots.steer_sweep(result["rows"], base), out / "steer.png")
    write_json(out / "steer.json", result)
    return result


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _ids(ids: list[str], limit: int = 12) -> str:
    if not ids:
        return "-"
    prefix = re.sub(r"\d+$", "", ids[0])
    short = [i[len(prefix) :] if i.startswith(prefix) else i for i in ids]
    more = f" +{len(ids) - limit}" if len(ids) > limit else ""
    return ",".join(short[:limit]) + more


def format_steer(result: dict[str, Any]) -> str:
    """A text table of the sweep, then the recovered/broken ids of each condition."""
    rn = result["residual_norm"]
    v = result.get("vector") or {}
    head = [f"steering at layer {result['layer']}: n={result['n']} held-out questions, seed {result['seed']}"]
    head.append(f"mean residual norm {rn['value']:.2f} ({rn['source']}: {rn['how']})")
    if v.get("source") == "contrastive":
        line = (
            f"vector: contrastive from {v['rollouts']} ({v['split']} split: {v['n_correct']} correct / "
            f"{v['n_wrong']} wrong responses)"
        )
        if "cosine_with_pack_direction" in v:
            line += f"; cosine with the pack direction {v['cosine_with_pack_direction']:+.3f}"
        head.append(line)
    elif v:
        head.append(f"vector: pack {v['pack']} ({v['n_features']} features, SAE {v['sae']})")
    cols = (
        f"{'condition':28} {'scale':>8} {'|Δh|':>8} {'Δh/‖h‖':>7} {'acc':>6} {'95% CI':>13} "
        f"{'diff':>7} {'rec':>4} {'brk':>4} {'net':>4} {'McNemar p':>9}"
    )
    lines = [*head, cols, "-" * len(cols)]
    for r in result["rows"]:
        label = f"{r['label']} (neg control)" if r["negative_control"] else r["label"]
        if r["kind"] in ("vector", "negative_control"):
            scale = f"{r['scale'] * 100:+.1f}%"
        elif r["kind"] == "base":
            scale = "0"
        else:
            scale = f"{r['scale']:g}"
        ci = f"[{r['ci_low']:.2f},{r['ci_high']:.2f}]"
        if r["kind"] == "base":
            tail = f"{'-':>7} {'-':>4} {'-':>4} {'-':>4} {'-':>9}"
        else:
            tail = (
                f"{r['diff'] * 100:>+6.1f}p {len(r['recovered']):>4} {len(r['broken']):>4} "
                f"{r['net_flips']:>+4d} {r['mcnemar_p']:>9.3f}"
            )
        lines.append(
            f"{label:28} {scale:>8} {r['perturbation_norm']:>8.2f} {r['perturbation_frac'] * 100:>6.1f}% "
            f"{r['accuracy']:>6.3f} {ci:>13} {tail}"
        )
    lines.append(
        "recovered = base wrong -> steered right; broken = base right -> steered wrong (question ids)"
    )
    for r in result["rows"][1:]:
        lines.append(f"  {r['label']:26} recovered {_ids(r['recovered'])}; broken {_ids(r['broken'])}")
    cached = sum(bool(r.get("cached")) for r in result["rows"])
    if cached:
        lines.append(
            f"({cached} of {len(result['rows'])} conditions reused from {result['config']['out']}/conditions)"
        )
    return "\n".join(lines)
