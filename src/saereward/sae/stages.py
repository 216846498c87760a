"""The ``train-sae`` and ``eval-sae`` stages: glue between activation shards, the trainer and the evaluator.

``saereward train-sae`` reads the *train* split of a ``saereward collect`` folder through a shuffle
buffer, trains with :class:`~saereward.sae.train.SAETrainer` (resumable checkpoints in the run folder),
evaluates on the folder's *held-out* split at the end, and writes the SAE to ``<out>/sae`` in the native
format with its resolved training config, plus ``<out>/config.json`` (this stage's resolved config) and
``<out>/eval.json``.

``saereward eval-sae`` measures an SAE (any format :func:`~saereward.sae.formats.load_sae` reads) on
held-out activations (FVU, variance explained, NMSE, MSE, L0, dead %, coverage) and, when a model is
available, CE-loss and KL recovered by splicing the reconstruction into the model at the SAE's layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from saereward.config import option, to_dict
from saereward.data.collect import iter_text_documents
from saereward.data.store import ActivationStore, read_manifest
from saereward.errors import RunMismatch, SaeRewardError
from saereward.io import as_json, read_json, write_json
from saereward.lock import folder_lock
from saereward.model.lm import check_device, load_model, require_device, resolve_layer
from saereward.sae.evaluate import ce_kl_recovered, evaluate_sae
from saereward.sae.formats import check_sae_matches_model, load_sae, save_sae
from saereward.sae.train import SAETrainConfig, SAETrainer
from saereward.tasks import format_prompt, load_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSAEStageConfig:
    """Settings of ``saereward train-sae``. Training settings are under ``train`` (flags ``--train-*``)."""

    activations: str = option("runs/activations", "folder written by `saereward collect`")
    layer: int | None = option(None, "collected layer to train on (default: the first one in the manifest)")
    out: str = option("runs/sae", "run folder: checkpoints/, train_log.jsonl, tensorboard/, sae/, eval.json")
    resume: bool = option(True, "continue from the latest checkpoint in --out when there is one")
    buffer_tokens: int = option(2**18, "shuffle-buffer size in tokens")
    eval_tokens: int = option(500_000, "held-out tokens for the end-of-run evaluation (0: skip)")
    threads: int | None = option(
        None, "torch CPU threads (default: torch's choice; a bit-identical resume needs the same number)"
    )
    device: str = option("cpu", "where the SAE trains: cpu, cuda or cuda:N (activations stay on disk)")
    train: SAETrainConfig = option(SAETrainConfig(), "training settings")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.buffer_tokens < 1 or self.eval_tokens < 0:
            raise ValueError("buffer_tokens must be >= 1 and eval_tokens >= 0")


@dataclass(frozen=True)
class EvalSAEStageConfig:
    """Settings of ``saereward eval-sae``."""

    sae: str = option(
        "runs/sae/sae", "SAE to evaluate: a native, SAELens or sparsify folder, or a mechreward .pt"
    )
    activations: str | None = option(None, "collect folder whose held-out split is used (None: skip)")
    eval_tokens: int = option(500_000, "held-out tokens to evaluate on")
    model: str | None = option(
        None, "model for CE/KL recovered (default: the SAE's recorded model; --ce-task none skips CE/KL)"
    )
    layer: int | None = option(None, "layer to splice at (default: the SAE's recorded layer)")
    dtype: str = option("fp32", "model dtype for CE/KL")
    ce_task: str | None = option("chain_sum", "task whose few-shot prompts are the CE/KL text (None: skip)")
    ce_n: int = option(64, "number of task prompts for CE/KL")
    ce_seed: int = option(10_007, "task seed for the CE/KL prompts (differs from collect's default 0)")
    ce_text_paths: tuple[str, ...] = option((), "extra .txt/.jsonl text for CE/KL")
    ce_text_field: str = option("text", "field of ce_text_paths .jsonl rows (comma list: first present)")
    ce_max_docs: int = option(256, "use at most this many documents from ce_text_paths (first ones)")
    max_length: int = option(256, "max tokens per CE/KL sequence")
    skip_first: int | None = option(
        None,
        "CE/KL: keep the clean residual at (and do not score) each sequence's first N positions, which "
        "collect leaves out of SAE training (default: the --activations folder's skip_first, else 1)",
    )
    n_boot: int = option(
        1000,
        "bootstrap resamples of the 95 % CIs of the held-out FVU and of CE/KL recovered, each "
        "drawing whole sequences; seeded by ce_seed. 0: no CIs",
    )
    device: str = option("cpu", "where the SAE and the model run: cpu, cuda or cuda:N")
    out: str | None = option(None, "write eval.json here (default: next to the SAE)")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.n_boot < 0:
            raise ValueError(f"n_boot must be >= 0, got {self.n_boot}")
        if self.skip_first is not None and self.skip_first < 0:
            raise ValueError(f"skip_first must be >= 0, got {self.skip_first}")
        if self.eval_tokens < 0 or self.ce_n < 0 or self.ce_max_docs < 0:
            raise ValueError("eval_tokens, ce_n and ce_max_docs must be >= 0")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a CE needs a next token), got {self.max_length}")


def _store_layer(folder: str, layer: int | None) -> int:
    m = read_manifest(Path(folder))
    return int(m["layers"][0]) if layer is None else layer


def heldout_metrics(
    sae: Any, folder: str, layer: int, eval_tokens: int, n_boot: int = 0, seed: int = 0
) -> dict[str, Any]:
    """:func:`~saereward.sae.evaluate.evaluate_sae` on up to ``eval_tokens`` held-out rows of a collect
    folder, in batches of 4,096 consecutive rows (with ``n_boot``, the FVU's CI resamples whole
    sequences)."""
    store = ActivationStore(folder, layer, "heldout")
    if store.n_tokens == 0:
        raise SaeRewardError(f"{folder} has no held-out tokens: collect with --held-out-fraction > 0")
    bs = 4096
    n_batches = max(1, min(eval_tokens, store.n_tokens) // bs)
    batches = islice(store.iter_batches(bs, shuffle=False), n_batches)
    groups = store.sequences(n_batches * bs).split(bs) if n_boot > 0 else None
    return evaluate_sae(sae, batches, n_boot=n_boot, seed=seed, groups=groups)


def run_train_sae(cfg: TrainSAEStageConfig) -> Path:
    """Train an SAE on a collect folder; returns the folder of the saved SAE (``cfg.out`` is locked)."""
    with folder_lock(cfg.out, "saereward train-sae"):
        return _train_sae(cfg)


def _train_sae(cfg: TrainSAEStageConfig) -> Path:
    """Train an SAE on a collect folder; returns the folder of the saved SAE."""
    require_device(cfg.device)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    manifest = read_manifest(Path(cfg.activations))
    layer = _store_layer(cfg.activations, cfg.layer)
    store = ActivationStore(cfg.activations, layer, "train")
    if store.n_tokens < cfg.train.batch_size:
        raise SaeRewardError(
            f"{cfg.activations} has {store.n_tokens} training tokens at layer {layer}, fewer than one batch "
            f"({cfg.train.batch_size}): collect more or lower --train-batch-size"
        )
    epochs = cfg.train.total_tokens / store.n_tokens
    if epochs > 1:
        log.warning(
            "training on %d tokens = %.1f passes over %d collected tokens",
            cfg.train.total_tokens,
            epochs,
            store.n_tokens,
        )
    out = Path(cfg.out)

    def data(start: int) -> Any:
        return store.iter_batches(
            cfg.train.batch_size,
            seed=cfg.train.seed,
            start_batch=start,
            buffer_tokens=cfg.buffer_tokens,
            loop=True,
        )

    def evaluate(sae: Any) -> dict[str, Any]:
        if cfg.eval_tokens == 0:
            return {}
        return {k: v for k, v in heldout_metrics(sae, cfg.activations, layer, cfg.eval_tokens).items()}

    def save(sae: Any, folder: Path) -> None:
        save_sae(
            sae, folder, train_config={"stage": to_dict(cfg), "activations_manifest": _manifest_ref(manifest)}
        )

    trainer = SAETrainer(
        cfg.train,
        store.d_model,
        device=cfg.device,
        run_dir=out,
        evaluate=evaluate,
        save=save,
        model=str(manifest.get("model")),
        layer=layer,
    )
    activations = {**_manifest_ref(manifest), "sources": manifest.get("sources")}
    data_key = {"activations": activations, "layer": layer, "buffer_tokens": cfg.buffer_tokens}
    if cfg.resume and trainer.resume_latest():  # settings checked before anything is written
        _refuse_other_data(out, data_key)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    write_json(out / DATA_KEY, data_key)
    sae = trainer.fit(data)
    if cfg.eval_tokens:
        write_json(out / "eval.json", {"split": "heldout", "layer": layer, **evaluate(sae)})
    return out / "sae"


def _manifest_ref(manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "layers", "d_model", "n_tokens", "n_train", "n_heldout", "saereward_version")
    return {k: manifest[k] for k in keys if k in manifest}


#: what a train-sae run trains on (the activations' identity, layer, shuffle buffer): a resume must match
DATA_KEY = "data.json"


def _refuse_other_data(out: Path, key: dict[str, Any]) -> None:
    """A run resumes only on the data it started on (the same path may hold a re-collected folder)."""
    f = out / DATA_KEY
    if not f.is_file():
        return  # a run from before the key was written
    old = read_json(f)
    now = as_json(key)
    diff = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    if diff:
        raise RunMismatch(
            f"{out} holds a run trained on other data (differs in: {', '.join(diff)}): resume on the "
            "activations it started on, or train into a new --out"
        )


def run_eval_sae(cfg: EvalSAEStageConfig) -> dict[str, Any]:
    """Evaluate an SAE; writes ``eval.json`` and returns the metrics."""
    require_device(cfg.device)
    sae = load_sae(cfg.sae, device=cfg.device)
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    result: dict[str, Any] = {"sae": cfg.sae, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k}
    model_spec = cfg.model or sae.cfg.model
    texts = _ce_texts(cfg) if model_spec else []
    if not cfg.activations and not texts:
        raise SaeRewardError(
            "eval-sae has nothing to measure: pass --activations (a collect folder, for held-out FVU) "
            "and/or a model with CE/KL text (--model, --ce-task or --ce-text-paths)"
        )
    if texts and layer is None:
        raise SaeRewardError(f"{cfg.sae} records no layer: pass --layer for CE/KL recovered")
    if cfg.activations:
        store_layer = layer if layer is not None else _store_layer(cfg.activations, None)
        result["heldout"] = heldout_metrics(
            sae, cfg.activations, store_layer, cfg.eval_tokens, cfg.n_boot, cfg.ce_seed
        )
    if texts and layer is not None:  # (a missing layer was refused above)
        lm = load_model(model_spec, dtype=cfg.dtype, device=cfg.device)  # type: ignore[arg-type]
        layer = resolve_layer(lm.model, layer)
        check_sae_matches_model(sae, lm.d_model, layer)
        skip = _skip_first(cfg)
        result["ce_kl"] = ce_kl_recovered(
            lm.model,
            lm.tokenizer,
            sae,
            layer,
            texts,
            max_length=cfg.max_length,
            skip_first=skip,
            n_boot=cfg.n_boot,
            seed=cfg.ce_seed,
        )
        result["ce_kl"].update(
            {"model": model_spec, "layer": layer, "n_texts": len(texts), "skip_first": skip}
        )
    result["config"] = to_dict(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.sae) if Path(cfg.sae).is_dir() else Path(cfg.sae).parent
    write_json(out / "eval.json", result)
    return result


def _skip_first(cfg: EvalSAEStageConfig) -> int:
    """Positions at each CE/KL sequence's start left clean: as set, else as the SAE's data skipped them."""
    if cfg.skip_first is not None:
        return cfg.skip_first
    if cfg.activations:
        return int(read_manifest(Path(cfg.activations)).get("skip_first", 0))
    return 1  # collect's default


def _ce_texts(cfg: EvalSAEStageConfig) -> list[str]:
    texts: list[str] = []
    if cfg.ce_task and cfg.ce_task.lower() != "none":
        task = load_task(cfg.ce_task, n=cfg.ce_n, seed=cfg.ce_seed)
        texts += [format_prompt(task, it, "fewshot") + " " + it.gold for it in task.items()]
    if cfg.ce_text_paths:
        docs: list[str] = []
        for path in cfg.ce_text_paths:
            for doc in iter_text_documents(path, text_field=cfg.ce_text_field):
                if len(docs) >= cfg.ce_max_docs:
                    break
                docs.append(doc)
        texts += docs
    return texts


def format_eval(result: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run_eval_sae`'s result."""
    lines = [f"SAE {result['sae']}: d_in {result['d_in']}, d_sae {result['d_sae']}, k {result['k']}"]
    h = result.get("heldout")
    if h:
        lines.append(
            f"held-out ({h['n_tokens']:.0f} tokens): FVU {h['fvu']:.4f}{_ci(h, 'fvu_ci')}  "
            f"var. explained {h['variance_explained']:.4f}  NMSE {h['nmse']:.4f}  L0 {h['l0']:.1f}  "
            f"dead {h['dead_pct']:.2f}%  coverage {h['coverage']:.3f}"
        )
    c = result.get("ce_kl")
    if c:
        lines.append(
            f"CE/KL at layer {c['layer']} ({c['n_tokens']:.0f} tokens, {c['n_sequences']:.0f} sequences): "
            f"CE clean {c['ce_clean']:.4f}  SAE {c['ce_sae']:.4f}  zero {c['ce_zero']:.4f}  "
            f"CE recovered {c['ce_loss_recovered']:.4f}{_ci(c, 'ce_loss_recovered_ci')}  "
            f"KL recovered {c['kl_recovered']:.4f}{_ci(c, 'kl_recovered_ci')}"
        )
    boot = (h or {}).get("n_boot") or (c or {}).get("n_boot")
    if boot:
        lines.append(f"95% CIs: bootstrap, {boot} resamples, seed {result['config']['ce_seed']}")
    return "\n".join(lines)


def _ci(metrics: dict[str, Any], key: str) -> str:
    """`` [lo, hi]`` of ``metrics[key]``, or nothing where there is no CI."""
    if key not in metrics:
        return ""
    lo, hi = metrics[key]
    if lo != lo:  # NaN: fewer than 2 resampling units
        return " [no CI: one batch]" if "n_blocks" in metrics else " [no CI]"
    return f" [{lo:.4f}, {hi:.4f}]"
