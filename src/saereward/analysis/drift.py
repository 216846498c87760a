"""``saereward drift``: how an SAE's fit and features drift across the checkpoints of one RL run.

mechreward's model-card recipe (Qwen2.5-0.5B strict-reward chain), scaled to one ``train-rl`` run folder:

* **Stages.** Stage 0 is the base model (no adapter), then every adapter snapshot the run kept
  (``train-rl --snapshot-every N`` -> ``RUN/snapshots/step_NNNNN``) in step order, then, with
  ``include_final``, the run's final ``checkpoint/`` when its step is not already a snapshot.
* **Fixed corpus.** The prompt+completion texts of a rollout folder (a seeded sample of
  ``max_texts`` rows) are tokenized once and fed to every stage, so every stage sees the *same tokens*
  and any difference comes from the policy. Residuals are the output of block ``layer`` (the SAE's);
  pad positions and each text's first token (BOS / attention sink) are skipped.
* **Split.** The corpus tokens are split once, seeded, into train and held-out (``heldout_fraction``,
  the card's 80/20); the split is the same token positions at every stage.
* **Per stage**, on held-out tokens: NMSE of the *base* SAE (the one given), NMSE of the previous
  stage's SAE, and NMSE of this stage's SAE, a refit *warm-started from the previous stage's SAE*
  on this stage's train tokens (``refit_*``; base SAE -> stage 0 -> first snapshot -> ...). NMSE is
  eval-sae's (:func:`saereward.sae.evaluate.evaluate_sae`): the mean over tokens of
  ``‖x − x̂‖² / ‖x‖²``, accumulated in float64; FVU is reported beside it.
* **Slopes.** ``dnmse_per_step = (NMSE_base(stage) − NMSE_base(stage 0)) / step`` and the
  stage-to-stage slope ``(NMSE_base(i) − NMSE_base(i−1)) / (step_i − step_{i−1})``; the same for the
  refit chain; and a least-squares slope of NMSE against step over all stages (``*_fit``).
* **Per feature** (``pack``): decoder-direction drift ``1 − cos(W_dec[f] of the stage's SAE,
  W_dec[f] of the base SAE)`` and the mean activation of ``f`` under the *base* SAE on the stage's
  tokens (all of them) against stage 0. ``dec_drift_mean`` in each stage row averages the drift over
  every latent. Also the mean residual norm per stage and its change.

Resumable stage by stage: each stage writes ``<out>/saes/step_NNNNN/`` (the refit SAE, native
safetensors format, :func:`~saereward.sae.formats.save_sae`), ``<out>/stages/step_NNNNN.safetensors``
(per-latent float64 mean activation and firing fraction under the base SAE) and, last,
``<out>/stages/step_NNNNN.json`` (the stage's key and its numbers). A re-run reuses a stage whose files
exist and whose key matches: the key hashes every setting that changes the numbers, the base SAE's and
the corpus file's sha256, the stage's adapter sha256 and the previous stage's key (so a change upstream
recomputes everything after it). The model is only loaded when some stage must be computed.

Outputs: ``<out>/drift.json`` (atomic: resolved config, per-stage rows, per-feature rows, token counts,
seed) and ``<out>/drift.png`` (NMSE vs RL step; per-feature decoder drift vs step; with a pack, the
change of each feature's mean activation).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saereward import __version__, plots
from saereward.config import option, refuse_other_settings, to_dict
from saereward.errors import SaeRewardError
from saereward.features.pack import check_pack, check_pack_sae, load_pack
from saereward.io import atomic_path, file_sha256, iter_jsonl, write_json
from saereward.model.capture import forward_residuals
from saereward.model.lm import (
    DType,
    LoadedModel,
    apply_adapter,
    check_adapter,
    check_device,
    layer_index,
    load_model,
    model_dims,
    resolve_layer,
)
from saereward.options import DeviceOptions
from saereward.plots import fmt_or_dash, fmt_stat
from saereward.rl.checkpoint import snapshots
from saereward.sae.evaluate import evaluate_sae
from saereward.sae.formats import check_sae_matches_model, load_sae, resolve_sae_path, save_sae
from saereward.sae.kernels import use_kernels
from saereward.sae.train import SAETrainConfig, SAETrainer

if TYPE_CHECKING:
    import torch

    from saereward.features.pack import FeaturePack
    from saereward.model.lm import LoadedModel
    from saereward.sae.coder import TopKSAE

log = logging.getLogger(__name__)

DRIFT_FORMAT = "saereward.drift"
STAGE_FORMAT = 1
NEED_SNAPSHOTS = "pass a train-rl run folder trained with --snapshot-every N"
_EVAL_BATCH = 4096


@dataclass(frozen=True)
class DriftConfig(DeviceOptions):
    """Settings of ``saereward drift``."""

    run: str = option(
        "runs/rl",
        "a `saereward train-rl` run folder trained with --snapshot-every N: its snapshots/ (and final "
        "checkpoint/) are the stages after the base model",
    )
    sae: str | None = option(
        None, "the base SAE, any format load_sae reads (default: the SAE recorded in --pack)"
    )
    pack: str | None = option(None, "feature pack: per-feature drift rows for its features (optional)")
    layer: int | None = option(None, "layer to read (default: the SAE's recorded layer)")
    rollouts: str | None = option(
        None,
        "rollout folder (or its rollouts.jsonl) whose prompt+completion texts are the fixed corpus fed to "
        "every stage (default: the rollouts recorded in --pack)",
    )
    max_texts: int = option(64, "texts in the corpus: a seeded sample of the rollout rows (0: all)")
    max_length: int = option(256, "max tokens per text (longer ones are truncated)")
    batch_size: int = option(8, "texts per forward pass")
    dtype: DType = option(
        "fp32", "model dtype (fp32 keeps the merged LoRA deltas; bf16 rounds small ones away)"
    )
    device: str = option(
        "cpu", "where the model runs: cpu, cuda or cuda:N (the SAE statistics stay on the CPU)"
    )
    heldout_fraction: float = option(
        0.2, "fraction of corpus tokens held out for NMSE (seeded split, the same tokens at every stage)"
    )
    refit_tokens: int = option(8192, "train tokens per stage for the warm-started refit (at most)")
    refit_epochs: int = option(
        2, "passes over them (0: no refit, each stage's SAE is the previous stage's unchanged)"
    )
    refit_lr: float = option(1e-4, "Adam learning rate of the refit (the card's 1e-4; no warmup)")
    refit_batch_size: int = option(1024, "tokens per refit step")
    include_final: bool = option(
        True, "also the run's final checkpoint/ when its step is not already a snapshot"
    )
    seed: int = option(0, "seed of the corpus sample, the train/held-out split and the refits")
    progress: bool = option(True, "progress bar over the stages")
    out: str = option("runs/drift", "output folder: drift.json, drift.png, saes/step_NNNNN/, stages/")

    def __post_init__(self) -> None:
        check_device(self.device)
        for name in ("max_length", "batch_size", "refit_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_texts", "refit_tokens", "refit_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be between 0 and 1, got {self.heldout_fraction}")
        if not self.refit_lr > 0:
            raise ValueError(f"refit_lr must be positive, got {self.refit_lr}")


# --------------------------------------------------------------------------------------------------
# Stages of a run, and the corpus
# --------------------------------------------------------------------------------------------------


def run_stages(run: str | Path, *, include_final: bool = True) -> list[tuple[int, Path | None]]:
    """``[(0, None), (step, adapter folder), ...]``: the base model, then the run's snapshots in step order.

    With ``include_final`` the final ``checkpoint/`` is added when its step is not a snapshot. Raises
    when the run has nothing after the base model.
    """
    root = Path(run).expanduser()
    if not (root / "config.json").is_file():
        raise SaeRewardError(f"{run} is not a train-rl run folder (no config.json): {NEED_SNAPSHOTS}")
    found: dict[int, Path] = dict(snapshots(root))
    ck = root / "checkpoint"
    if include_final and (ck / "adapter.safetensors").is_file() and (ck / "state.json").is_file():
        try:
            step = int(json.loads((ck / "state.json").read_text(encoding="utf-8"))["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise SaeRewardError(f"{ck / 'state.json'} is unreadable: re-run or resume train-rl") from None
        found.setdefault(step, ck)
    found.pop(0, None)  # step 0 is the base model itself
    if not found:
        raise SaeRewardError(f"run {run} has no adapter snapshots or checkpoint: {NEED_SNAPSHOTS}")
    if len(found) == 1:
        log.warning(
            "run %s kept no adapter snapshots: drift compares the base model with the final policy only, "
            "so its per-step slope rests on 2 points (train with --snapshot-every N for more)",
            run,
        )
    return [(0, None), *sorted(found.items())]


def _texts_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    f = p / "rollouts.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise SaeRewardError(
            f"no rollouts.jsonl at {path}: pass a `saereward rollouts` folder (or its rollouts.jsonl)"
        )
    return f


def load_corpus(path: str | Path, max_texts: int = 0, seed: int = 0) -> list[str]:
    """Prompt+completion texts of a rollout folder: all, or a seeded sample of ``max_texts`` in file order."""
    f = _texts_file(path)
    texts = []
    for _, row in iter_jsonl(f):
        if isinstance(row, dict):
            text = str(row.get("prompt") or "") + str(row.get("completion") or "")
            if text.strip():
                texts.append(text)
    if not texts:
        raise SaeRewardError(f"the corpus {f} is empty (no prompt/completion text): pass another --rollouts")
    if max_texts and len(texts) > max_texts:
        keep = sorted(random.Random(seed).sample(range(len(texts)), max_texts))
        texts = [texts[i] for i in keep]
    return texts


def token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions used for drift: real tokens except each sequence's first one (BOS / attention sink).

    Works for left and right padding: a position counts once at least one real token precedes it.
    """
    m = attention_mask.long()
    return (m > 0) & (m.cumsum(-1) > 1)


def tokenize_corpus(
    tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(input_ids [B, T], attention_mask [B, T])]`` batches of the corpus, tokenized once."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def collect_residuals(model: Any, batches: Sequence[tuple[Any, Any]], layer: int) -> torch.Tensor:
    """Block-``layer`` outputs at the :func:`token_mask` positions of every batch, ``[N, d]`` float32, in order."""
    import torch

    chunks = []
    for ids, mask in batches:  # forward_residuals moves them to the model's device
        h = forward_residuals(model, ids, mask, [layer], store_dtype=torch.float32)[layer]
        chunks.append(h[token_mask(mask).to(h.device)].cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def split_tokens(n: int, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(train_idx, heldout_idx)`` of ``n`` tokens; at least one token on each side."""
    import torch

    if n < 2:
        raise SaeRewardError(f"the corpus has {n} usable token(s): raise --max-texts or --max-length")
    n_held = min(n - 1, max(1, round(n * heldout_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


# --------------------------------------------------------------------------------------------------
# Pure per-stage maths
# --------------------------------------------------------------------------------------------------


def heldout_eval(sae: TopKSAE, x: torch.Tensor) -> dict[str, float]:
    """eval-sae's metrics (``nmse``, ``fvu``, ...) of ``sae`` on ``x`` ``[N, d]`` (float64 sums)."""
    return {k: float(v) for k, v in evaluate_sae(sae, x.split(_EVAL_BATCH)).items()}


def latent_stats(sae: TopKSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean activation, firing fraction)`` per latent over the rows of ``x``, float64 ``[d_sae]``."""
    import torch

    sums = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    with torch.no_grad(), use_kernels("eager"):
        for chunk in x.split(_EVAL_BATCH):
            vals, idx = sae.encode_topk(chunk)
            vals, idx = vals.detach().cpu().double().reshape(-1), idx.detach().cpu().reshape(-1)
            sums.index_add_(0, idx, vals)
            fires.index_add_(0, idx[vals > 0], torch.ones_like(vals[vals > 0]))
    n = max(1, x.shape[0])
    return sums / n, fires / n


def decoder_drift(w_dec: torch.Tensor, w_ref: torch.Tensor, ids: Sequence[int] | None = None) -> torch.Tensor:
    """``1 − cos(w_dec[f], w_ref[f])`` per latent (rows of ``[d_sae, d_in]`` decoders), float64, in [0, 2]."""
    import torch

    a, b = w_dec.detach().double().cpu(), w_ref.detach().double().cpu()
    if ids is not None:
        index = torch.as_tensor(list(ids), dtype=torch.long)
        a, b = a[index], b[index]
    drift = (1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)).clamp(0.0, 2.0)
    return drift.masked_fill((a == b).all(dim=-1), 0.0)  # identical rows: exactly 0, not rounding noise


def nmse_slopes(steps: Sequence[int], nmse: Sequence[float | None]) -> dict[str, Any]:
    """ΔNMSE per RL step: against the first stage, stage to stage, and a least-squares fit over all stages.

    ``per_step[i] = (nmse[i] − nmse[0]) / (steps[i] − steps[0])`` and
    ``slope[i] = (nmse[i] − nmse[i−1]) / (steps[i] − steps[i−1])`` (``None`` for the first stage);
    ``fit`` is the OLS slope of ``nmse`` on ``steps`` (``None`` with fewer than two distinct steps).
    """
    s = [float(v) for v in steps]
    y = [float("nan") if v is None else float(v) for v in nmse]  # None: undefined (null in a cached stage)
    per_step: list[float | None] = [None]
    slope: list[float | None] = [None]
    for i in range(1, len(s)):
        per_step.append((y[i] - y[0]) / (s[i] - s[0]) if s[i] != s[0] else None)
        slope.append((y[i] - y[i - 1]) / (s[i] - s[i - 1]) if s[i] != s[i - 1] else None)
    fit: float | None = None
    if len(set(s)) >= 2:
        ms, my = math.fsum(s) / len(s), math.fsum(y) / len(y)
        sxx = math.fsum((a - ms) ** 2 for a in s)
        fit = math.fsum((a - ms) * (b - my) for a, b in zip(s, y)) / sxx
    return {"per_step": per_step, "slope": slope, "fit": fit}


def refit_sae(
    prev: TopKSAE,
    x_train: torch.Tensor,
    *,
    tokens: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    model: str | None = None,
    layer: int | None = None,
) -> tuple[TopKSAE, dict[str, int]]:
    """Fine-tune a copy of ``prev`` on ``x_train`` with :class:`~saereward.sae.train.SAETrainer` (warm start).

    Uses a seeded subset of at most ``tokens`` rows, ``epochs`` seeded passes over it in batches of
    ``batch_size`` (the last partial batch of a pass is dropped), Adam at ``lr`` without warmup, cosine
    to 0.3 lr. Zero steps (``epochs`` or ``tokens`` 0) return the warm start itself: ``prev``'s weights.
    """
    import torch

    n_use = min(tokens, x_train.shape[0])
    pick = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))[:n_use]
    xs = x_train[pick]
    bs = min(batch_size, n_use) if n_use else batch_size
    per_epoch = n_use // bs
    steps = per_epoch * epochs
    tcfg = SAETrainConfig(
        d_sae=prev.cfg.d_sae,
        k=prev.cfg.k,
        lr=lr,
        warmup_steps=0,
        batch_size=bs,
        total_tokens=max(1, steps * bs),
        normalize_input=prev.cfg.normalize_input,
        checkpoint_every=0,
        log_every=max(1, steps),
        seed=seed,
        progress=False,
    )

    def batches() -> Iterator[torch.Tensor]:
        for epoch in range(epochs):
            order = torch.randperm(
                n_use, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
            )
            for b in range(per_epoch):
                yield xs[order[b * bs : (b + 1) * bs]]

    trainer = SAETrainer(tcfg, prev.cfg.d_in, sae=prev, model=model, layer=layer)
    sae = trainer.fit(batches())
    sae.requires_grad_(False)
    return sae, {"refit_tokens": n_use, "refit_steps": steps}


def stage_metrics(
    base: TopKSAE,
    prev: TopKSAE,
    x: torch.Tensor,
    train_idx: torch.Tensor,
    heldout_idx: torch.Tensor,
    cfg: DriftConfig,
    *,
    model: str | None = None,
    layer: int | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], TopKSAE]:
    """One stage on its residuals ``x``: ``(row, per-latent stats, refit SAE)`` (see the module docstring)."""
    x_held, x_train = x[heldout_idx], x[train_idx]
    ev_base = heldout_eval(base, x_held)
    ev_prev = ev_base if prev is base else heldout_eval(prev, x_held)
    t0 = time.perf_counter()
    sae, info = refit_sae(
        prev,
        x_train,
        tokens=cfg.refit_tokens,
        epochs=cfg.refit_epochs,
        lr=cfg.refit_lr,
        batch_size=cfg.refit_batch_size,
        seed=cfg.seed,
        model=model,
        layer=layer,
    )
    sec_refit = time.perf_counter() - t0
    ev_refit = heldout_eval(sae, x_held)
    mean_act, fire_frac = latent_stats(base, x)
    row: dict[str, Any] = {
        "n_tokens": int(x.shape[0]),
        "n_train": int(x_train.shape[0]),
        "n_heldout": int(x_held.shape[0]),
        **info,
        "nmse_base": ev_base["nmse"],
        "fvu_base": ev_base["fvu"],
        "l0_base": ev_base["l0"],
        "nmse_prev": ev_prev["nmse"],
        "fvu_prev": ev_prev["fvu"],
        "nmse_refit": ev_refit["nmse"],
        "fvu_refit": ev_refit["fvu"],
        "l0_refit": ev_refit["l0"],
        "resid_norm_mean": float(x.double().norm(dim=-1).mean()),
        "sec_refit": sec_refit,
    }
    return row, {"mean_act": mean_act, "fire_frac": fire_frac}, sae


# --------------------------------------------------------------------------------------------------
# Stage files (resume)
# --------------------------------------------------------------------------------------------------


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _stage_paths(out: Path, step: int) -> tuple[Path, Path, Path]:
    name = f"step_{step:05d}"
    return out / "saes" / name, out / "stages" / f"{name}.safetensors", out / "stages" / f"{name}.json"


def _load_stage(
    out: Path, step: int, key_hash: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], TopKSAE] | None:
    from safetensors.torch import load_file

    sae_dir, stats_file, json_file = _stage_paths(out, step)
    if not (json_file.is_file() and stats_file.is_file() and sae_dir.is_dir()):
        return None
    try:
        saved = json.loads(json_file.read_text(encoding="utf-8"))
        if saved.get("key_hash") != key_hash:
            log.warning(
                "stage step %d: computed from other inputs (adapter, SAE or corpus), recomputing", step
            )
            return None
        stats = load_file(str(stats_file))
        sae = load_sae(sae_dir)
    except (OSError, ValueError, SaeRewardError) as exc:
        log.warning("stage step %d: stored files unreadable (%s), recomputing", step, exc)
        return None
    sae.requires_grad_(False)
    return dict(saved["row"]), stats, sae


def _save_stage(
    out: Path,
    step: int,
    key: dict[str, Any],
    row: dict[str, Any],
    stats: dict[str, torch.Tensor],
    sae: TopKSAE,
) -> None:
    from safetensors.torch import save_file

    sae_dir, stats_file, json_file = _stage_paths(out, step)
    json_file.unlink(missing_ok=True)  # the json marks a complete stage: it goes last
    save_sae(sae, sae_dir, train_config={"drift_stage": key})
    with atomic_path(stats_file) as tmp:
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp))
    write_json(json_file, {"format": STAGE_FORMAT, "key_hash": _key_hash(key), "key": key, "row": row})


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class _Policies:
    """Loads the base model once (lazily), tokenizes the corpus with it, and merges each stage's adapter."""

    def __init__(
        self,
        cfg: DriftConfig,
        spec: str,
        texts: list[str],
        layer: int,
        base_sae: TopKSAE,
        pack: FeaturePack | None,
        lm: LoadedModel | None,
    ) -> None:
        self.cfg, self.spec, self.texts, self.layer = cfg, spec, texts, layer
        self.base_sae, self.pack = base_sae, pack
        self._lm = lm
        self._checked = False
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def base(self) -> LoadedModel:
        if self._lm is None:
            self._lm = load_model(self.spec, dtype=self.cfg.dtype, device=self.cfg.device)
        if not self._checked:
            self._check(self._lm)
            self.batches = tokenize_corpus(
                self._lm.tokenizer, self.texts, max_length=self.cfg.max_length, batch_size=self.cfg.batch_size
            )
            self._checked = True
        return self._lm

    def _check(self, lm: LoadedModel) -> None:
        layer = resolve_layer(lm.model, self.layer)
        _check_layer(layer, self.base_sae, self.pack)
        check_sae_matches_model(self.base_sae, lm.d_model, layer)
        self.layer = layer

    def residuals(self, adapter: Path | None) -> torch.Tensor:
        base = self.base()
        if adapter is None:
            return collect_residuals(base.model, self.batches, self.layer)
        stage = LoadedModel(
            model=copy.deepcopy(base.model),
            tokenizer=base.tokenizer,
            spec=base.spec,
            source=base.source,
            path=base.path,
        )
        apply_adapter(stage, adapter)
        try:
            return collect_residuals(stage.model, self.batches, self.layer)
        finally:
            del stage


def _run_model(run: Path) -> str:
    try:
        model = json.loads((run / "config.json").read_text(encoding="utf-8")).get("model")
    except (OSError, json.JSONDecodeError):
        raise SaeRewardError(f"{run / 'config.json'} is unreadable: {NEED_SNAPSHOTS}") from None
    if not model:
        raise SaeRewardError(f"{run / 'config.json'} records no model: {NEED_SNAPSHOTS}")
    return str(model)


#: the settings that change a stage's numbers (its cache key, beside the model, SAE and corpus)
_KEY_FIELDS = (
    "max_texts",
    "max_length",
    "batch_size",
    "heldout_fraction",
    "refit_tokens",
    "refit_epochs",
    "refit_lr",
    "refit_batch_size",
    "seed",
)


#: settings a killed analysis may resume with changed: they do not change a stage's numbers (the
#: contents of the run's adapters, the SAE and the corpus are in each stage's cache key)
_RESUME_FREE = ("progress", "out", "threads", "device", "run", "sae", "pack", "rollouts")


def _check_layer(layer: int, base_sae: Any, pack: Any) -> None:
    """``layer`` (counted from 0) must be the one the SAE and the pack record, where they record one."""
    sae_layer = base_sae.cfg.layer
    if sae_layer is not None and sae_layer != layer:
        raise SaeRewardError(
            f"the SAE was trained on layer {sae_layer} but drift reads layer {layer}: "
            f"drop --layer or pass --layer {sae_layer}"
        )
    if pack is not None and pack.layer is not None and pack.layer != layer:
        raise SaeRewardError(
            f"pack {pack.name!r} was discovered at layer {pack.layer}, drift reads layer {layer}: "
            "use the pack's SAE and layer"
        )


def _drift_inputs(cfg: DriftConfig) -> tuple[Any, str, Any, int, Path, list[str]]:
    """``(pack, SAE path, base SAE, layer, corpus file, corpus texts)``, checked against each other."""
    pack = load_pack(cfg.pack) if cfg.pack else None
    sae_path = cfg.sae or (pack.metadata.get("sae_path") if pack is not None else None)
    if not sae_path:
        raise SaeRewardError("pass --sae (the base SAE) or a --pack that records its SAE")
    if pack is not None:
        check_pack_sae(pack, sae_path)
    base_sae = load_sae(sae_path)
    base_sae.requires_grad_(False)
    layer = cfg.layer if cfg.layer is not None else base_sae.cfg.layer
    if layer is None:
        raise SaeRewardError(f"SAE {sae_path} records no layer: pass --layer")
    if pack is not None:
        check_pack(pack, d_sae=base_sae.cfg.d_sae, d_model=base_sae.cfg.d_in, where=f"(SAE {sae_path})")
    rollouts = cfg.rollouts or (pack.metadata.get("rollouts") if pack is not None else None)
    if not rollouts:
        raise SaeRewardError("pass --rollouts (the corpus) or a --pack that records its rollouts")
    texts_file = _texts_file(rollouts)
    texts = load_corpus(texts_file, cfg.max_texts, cfg.seed)

    return pack, str(sae_path), base_sae, int(layer), texts_file, texts


def run_drift(cfg: DriftConfig, lm: LoadedModel | None = None) -> dict[str, Any]:
    """Run (or resume) the drift analysis; writes ``drift.json`` and ``drift.png`` and returns the result.

    ``lm``: the run's base model already loaded (tests); by default the run's recorded ``model`` is
    loaded with ``cfg.dtype``, only if some stage has to be computed.
    """
    import torch

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.run).expanduser()
    stages = run_stages(run, include_final=cfg.include_final)
    for _step, adapter in stages:
        if adapter is not None:
            check_adapter(adapter, None)  # a corrupt snapshot fails before any stage is written
    spec = _run_model(run)
    if lm is not None and lm.spec != spec:
        raise SaeRewardError(f"run {cfg.run} was trained on {spec}, the model given is {lm.spec}")
    pack, sae_path, base_sae, layer, texts_file, texts = _drift_inputs(cfg)
    # before any output; a negative layer counts from the end, so it needs the model's depth (from its
    # config, no weights; where that is unknown, the check comes once the model is loaded)
    dims = model_dims(spec) if layer < 0 else None
    early = layer if layer >= 0 else layer_index(layer, dims[0]) if dims is not None else None
    if early is not None:
        _check_layer(early, base_sae, pack)
    out = Path(cfg.out)
    refuse_other_settings(out, cfg, _RESUME_FREE, cache="stages", holds="drift stages", stage="drift")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    common = {
        "format": STAGE_FORMAT,
        "model": spec,
        "dtype": cfg.dtype if lm is None else "given",
        "layer": layer,
        "sae_sha256": file_sha256(resolve_sae_path(sae_path)[0]),
        "corpus_sha256": file_sha256(texts_file),
        **{k: getattr(cfg, k) for k in _KEY_FIELDS},
    }
    policies = _Policies(cfg, spec, texts, layer, base_sae, pack, lm)
    rows, stats_per_stage, drift_all, reused = _drift_stages(
        cfg, stages, policies, base_sae, common, out, spec=spec, texts_file=texts_file
    )
    result = _summarize(cfg, rows, stats_per_stage, drift_all, pack, spec=spec, layer=policies.layer)
    result.update(
        {
            "sae": str(sae_path),
            "rollouts": str(texts_file),
            "n_texts": len(texts),
            "reused_stages": reused,
            "sec_total": time.perf_counter() - t_start,
        }
    )
    write_json(out / "drift.json", result)
    plots.save_png(plots.drift(result["stages"], result["features"], activation=True), out / "drift.png")
    return result


def _drift_stages(
    cfg: DriftConfig,
    stages: list[tuple[int, Path | None]],
    policies: _Policies,
    base_sae: TopKSAE,
    common: dict[str, Any],
    out: Path,
    *,
    spec: str,
    texts_file: Path,
) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]], list[torch.Tensor], list[int]]:
    """Every stage in order, reused from ``out`` when its key (chained to the previous stage's) matches,
    else computed and saved: ``(rows, latent stats, decoder drift per stage, reused steps)``."""
    from tqdm.auto import tqdm

    split: tuple[torch.Tensor, torch.Tensor] | None = None
    prev_sae, prev_hash = base_sae, _key_hash(common)
    rows: list[dict[str, Any]] = []
    stats_per_stage: list[dict[str, torch.Tensor]] = []
    drift_all: list[torch.Tensor] = []
    reused: list[int] = []
    bar = tqdm(stages, desc="drift", unit="stage", disable=not cfg.progress, dynamic_ncols=True)
    for step, folder in bar:
        adapter_sha = file_sha256(folder / "adapter.safetensors") if folder is not None else None
        key = {**common, "step": step, "adapter_sha256": adapter_sha, "prev": prev_hash}
        key_hash = _key_hash(key)
        done = _load_stage(out, step, key_hash)
        if done is not None:
            row, stats, sae = done
            reused.append(step)
            log.info("stage step %d: reusing %s", step, _stage_paths(out, step)[2])
        else:
            row, stats, sae, split = _compute_stage(
                cfg, policies, step, folder, split, base_sae, prev_sae, spec=spec, texts_file=texts_file
            )
            _save_stage(out, step, key, row, stats, sae)
        rows.append(row)
        stats_per_stage.append(stats)
        drift_all.append(decoder_drift(sae.W_dec, base_sae.W_dec))
        prev_sae, prev_hash = sae, key_hash
        bar.set_postfix(
            step=step, nmse_base=fmt_stat(row["nmse_base"], 4), nmse_refit=fmt_stat(row["nmse_refit"], 4)
        )
    bar.close()
    return rows, stats_per_stage, drift_all, reused


def _compute_stage(
    cfg: DriftConfig,
    policies: _Policies,
    step: int,
    folder: Path | None,
    split: tuple[torch.Tensor, torch.Tensor] | None,
    base_sae: TopKSAE,
    prev_sae: TopKSAE,
    *,
    spec: str,
    texts_file: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], TopKSAE, tuple[torch.Tensor, torch.Tensor]]:
    """One stage's residuals and metrics: ``(row, latent stats, refit SAE, token split)``; the split is
    drawn at the first computed stage and passed on to the next."""
    t0 = time.perf_counter()
    x = policies.residuals(folder)
    if x.shape[0] == 0:
        raise SaeRewardError(f"the corpus {texts_file} gave no tokens: pass another --rollouts")
    if split is None:
        split = split_tokens(x.shape[0], cfg.heldout_fraction, cfg.seed)
    sec_collect = time.perf_counter() - t0
    row, stats, sae = stage_metrics(
        base_sae, prev_sae, x, split[0], split[1], cfg, model=spec, layer=policies.layer
    )
    row = {
        "step": step,
        "adapter": str(folder) if folder is not None else None,
        **row,
        "sec_collect": sec_collect,
    }
    return row, stats, sae, split


def _summarize(
    cfg: DriftConfig,
    rows: list[dict[str, Any]],
    stats: list[dict[str, torch.Tensor]],
    drift_all: list[torch.Tensor],
    pack: FeaturePack | None,
    *,
    spec: str,
    layer: int,
) -> dict[str, Any]:
    steps = [int(r["step"]) for r in rows]
    base = nmse_slopes(steps, [r["nmse_base"] for r in rows])
    refit = nmse_slopes(steps, [r["nmse_refit"] for r in rows])
    norm0 = rows[0]["resid_norm_mean"]
    ids = pack.feature_ids if pack is not None else []
    for i, r in enumerate(rows):
        r["dnmse_per_step"] = base["per_step"][i]
        r["dnmse_slope"] = base["slope"][i]
        r["dnmse_refit_per_step"] = refit["per_step"][i]
        r["dnmse_refit_slope"] = refit["slope"][i]
        r["resid_norm_change"] = r["resid_norm_mean"] - norm0
        r["resid_norm_change_prev"] = r["resid_norm_mean"] - rows[i - 1]["resid_norm_mean"] if i else 0.0
        r["dec_drift_mean"] = float(drift_all[i].mean())
        r["dec_drift_pack_mean"] = float(drift_all[i][ids].mean()) if ids else None
    features = []
    if pack is not None:
        polarity = {f.feature_id: "helpful" for f in pack.helpful} | {
            f.feature_id: "harmful" for f in pack.harmful
        }
        for fid, w in zip(pack.feature_ids, pack.signed_weights()):
            acts = [float(s["mean_act"][fid]) for s in stats]
            features.append(
                {
                    "feature": fid,
                    "polarity": polarity[fid],
                    "weight": w,
                    "dec_drift": [float(d[fid]) for d in drift_all],
                    "mean_act": acts,
                    "mean_act_change": [a - acts[0] for a in acts],
                    "fire_frac": [float(s["fire_frac"][fid]) for s in stats],
                }
            )
    return {
        "format": DRIFT_FORMAT,
        "saereward_version": __version__,
        "run": cfg.run,
        "model": spec,
        "layer": layer,
        "pack": cfg.pack,
        "seed": cfg.seed,
        "n_tokens": rows[0]["n_tokens"],
        "n_train": rows[0]["n_train"],
        "n_heldout": rows[0]["n_heldout"],
        "nmse_definition": "mean over held-out tokens of |x - x_hat|^2 / |x|^2 (as eval-sae), float64 sums",
        "steps": steps,
        "dnmse_per_step_fit": base["fit"],
        "dnmse_refit_per_step_fit": refit["fit"],
        "stages": rows,
        "features": features,
        "config": to_dict(cfg),
    }


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------


def format_drift(result: dict[str, Any]) -> str:
    """A text table of :func:`run_drift`'s result: one line per stage, then the pack features."""
    lines = [
        f"SAE drift over {result['run']} ({result['model']}, layer {result['layer']}): "
        f"{result['n_tokens']} tokens per stage ({result['n_train']} train / {result['n_heldout']} held-out), "
        f"seed {result['seed']}",
        f"{'step':>6} {'NMSE base':>10} {'dNMSE/step':>11} {'slope':>11} {'NMSE prev':>10} {'NMSE refit':>10} "
        f"{'refit/step':>11} {'|x| mean':>9} {'d|x|':>8} {'dec drift':>9} {'pack drift':>10}",
    ]
    for r in result["stages"]:
        lines.append(
            f"{r['step']:>6} {r['nmse_base']:>10.5f} {fmt_or_dash(r['dnmse_per_step'], '+.3e'):>11} "
            f"{fmt_or_dash(r['dnmse_slope'], '+.3e'):>11} {r['nmse_prev']:>10.5f} {r['nmse_refit']:>10.5f} "
            f"{fmt_or_dash(r['dnmse_refit_per_step'], '+.3e'):>11} {r['resid_norm_mean']:>9.3f} "
            f"{r['resid_norm_change']:>+8.4f} {r['dec_drift_mean']:>9.2e} {fmt_or_dash(r['dec_drift_pack_mean'], '.2e'):>10}"
        )
    lines.append(
        f"dNMSE/step, least squares over stages: base SAE {fmt_or_dash(result['dnmse_per_step_fit'], '+.3e')}, "
        f"refit chain {fmt_or_dash(result['dnmse_refit_per_step_fit'], '+.3e')}"
    )
    feats = result.get("features") or []
    if feats:
        last = result["steps"][-1]
        lines.append(f"pack features at step {last} vs step {result['steps'][0]} (base SAE activations):")
        lines.append(
            f"{'feature':>8} {'polarity':>8} {'weight':>8} {'dec drift':>10} {'act stage0':>11} "
            f"{'act last':>10} {'change':>10} {'fires last':>10}"
        )
        for f in sorted(feats, key=lambda f: -f["dec_drift"][-1]):
            lines.append(
                f"{f['feature']:>8} {f['polarity']:>8} {f['weight']:>+8.3f} {f['dec_drift'][-1]:>10.2e} "
                f"{f['mean_act'][0]:>11.4f} {f['mean_act'][-1]:>10.4f} {f['mean_act_change'][-1]:>+10.4f} "
                f"{f['fire_frac'][-1]:>10.3f}"
            )
    if result.get("reused_stages"):
        lines.append(f"reused finished stages: {', '.join(map(str, result['reused_stages']))}")
    return "\n".join(lines)
