"""Read and write TopK SAE checkpoints: saereward's native folder, SAELens, sparsify and mechreward's ``.pt``.

Every loader returns a :class:`~saereward.sae.coder.TopKSAE` whose encode/decode reproduce the source
library's own encode/decode on raw residuals (to float tolerance). Source conventions that our coder
does not have are *folded into the weights* at load time instead of being carried as options:

=================  ==========================================  =============================================
format             files                                        what is folded / refused
=================  ==========================================  =============================================
``native``         ``cfg.json`` + ``weights.safetensors``       nothing: the :class:`SAEConfig` is stored as
                   (+ ``train_config.json``)                    is (input normalization included)
``saelens``        ``cfg.json`` + ``sae_weights.safetensors``   ``apply_b_dec_to_input=false`` ->
                                                                ``b_enc += b_dec @ W_enc``;
                                                                ``rescale_acts_by_decoder_norm`` ->
                                                                ``W_enc, b_enc *= ||W_dec_i||``,
                                                                ``W_dec_i /= ||W_dec_i||``; a legacy
                                                                ``scaling_factor`` -> ``W_dec_i *= s_i``.
                                                                Refused: any architecture but ``topk``
                                                                (jumprelu, standard, gated, ...), per-token
                                                                normalizations (``layer_norm``,
                                                                ``constant_norm_rescale``, whitening),
                                                                ``hook_z`` reshaping.
``sparsify``       ``cfg.json`` + ``sae.safetensors``           ``encoder.weight [M, d]`` is transposed.
                                                                Refused: ``groupmax``, transcoders, skip
                                                                connections, signed activations.
``mechreward_pt``  one ``.pt`` dict (+ sidecar ``.json``)       nothing; read with
                                                                ``torch.load(weights_only=True)`` only
=================  ==========================================  =============================================

**sparsify and b_dec (checked, not assumed).** sparsify 1.3.3 ``sparse_coder.py``
``SparseCoder.encode`` (lines 191-192) reads ``if not self.cfg.transcode: x = x - self.b_dec`` and then
``fused_encoder.py`` line 29 computes ``preacts = F.relu(F.linear(input, weight, bias))`` followed by
``torch.topk``. So a sparsify *autoencoder* always subtracts ``b_dec`` before encoding, exactly like our
coder; only transcoders skip it (and those are refused here). sparsify applies ReLU *before* top-k and
we after; the kept values are identical, only the indices of zero-valued picks (fewer than k positive
pre-activations) can differ, which changes neither the dense code nor the decode.

SAELens's own sparsify converter (sae-lens 6.54.12 ``loading/pretrained_sae_loaders.py``,
``get_sparsify_config_from_disk`` line 1445) sets ``"apply_b_dec_to_input": not
old_cfg_dict.get("normalize_decoder", False)``, i.e. *no* b_dec subtraction for the default
``normalize_decoder=True`` SAEs, contradicting sparsify's encode above; and ``sparsify_disk_loader``
(line 1502) loads ``W_dec = state_dict_loaded["W_dec"].T``, which for sparsify 1.3.3 checkpoints (``W_dec
[M, d]``) gives a ``[d, M]`` matrix that ``SAE.load_from_disk`` rejects with a size mismatch. Measured on
a random sparsify SAE (d=16, M=64, k=4, nonzero b_dec): SAELens's converter fails to load; with the
transpose undone, its outputs differ from sparsify's by up to 1.96, and by 2e-7 once
``apply_b_dec_to_input`` is forced to true. We therefore follow sparsify's source, not that converter.

Layers follow saereward's convention (layer L = output of decoder block L): a SAELens hook
``blocks.L.hook_resid_post`` and a sparsify folder ``layers.L`` both map to layer L; other hook points
load with ``layer=None``.

Writing is atomic for folders too: files go into a temp folder next to the target, are fsynced, and the
folder is renamed into place; an existing SAE there is replaced only once the new one is complete, and a
non-SAE folder is never overwritten. The format registry :data:`FORMATS` is what the CLI offers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saereward import __version__
from saereward.errors import SaeRewardError
from saereward.hub import resolve_source
from saereward.io import atomic_path, file_sha256, json_text, naming_target, write_json
from saereward.model.lm import hf_model_id, require_device
from saereward.sae.coder import PARAM_NAMES, SAEConfig, TopKSAE

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

NATIVE_FORMAT_VERSION = 1
NATIVE_WEIGHTS = "weights.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CFG = "cfg.json"
TRAIN_CONFIG = "train_config.json"
#: SAELens treats configs without ``metadata.sae_lens_version >= 6`` as legacy; we write the 6.x layout.
SAELENS_FORMAT_VERSION = "6.0.0"
_SEED_SUFFIXES = (".pt", ".pth")

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaeFormat:
    """One checkpoint format: how to recognise, load and (where supported) write it."""

    name: str
    description: str  #: one line for ``--help`` and error messages
    detect: Callable[[Path], bool]
    load: Callable[[Path, str | torch.device, torch.dtype], TopKSAE]
    save: Callable[[TopKSAE, Path], Path]  #: writes the SAE at the path, returns it


def detect_format(path: PathLike) -> str | None:
    """Name of the format of ``path`` (a folder or ``.pt`` file), or ``None`` if none matches."""
    p = Path(path)
    for fmt in FORMATS.values():
        if fmt.detect(p):
            return fmt.name
    return None


def _expected_layouts() -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaeRewardError(f"cannot read {path}: {exc}; the file is corrupt or not JSON") from exc
    if not isinstance(data, dict):
        raise SaeRewardError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SaeRewardError(f"{path} is missing: the SAE folder is incomplete")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...: all mean a bad file
        raise SaeRewardError(
            f"cannot read {path}: {type(exc).__name__}: {exc}; the file is truncated or corrupt, "
            "re-download or re-save the SAE"
        ) from exc


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata
    )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json_text(obj, indent=2) + "\n", encoding="utf-8")


def _require(tensors: Mapping[str, torch.Tensor], keys: tuple[str, ...], source: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise SaeRewardError(
            f"{source} lacks the tensor(s) {', '.join(missing)} (found: {', '.join(sorted(tensors)) or 'none'}); "
            "is it really a TopK SAE of this format?"
        )


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _as_int(value: Any, name: str, source: Path) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise SaeRewardError(f"{source}: {name} must be an integer, got {value!r}")
    return int(value)


def _check_cfg_dims(source: Path, W_enc: torch.Tensor, d_in: Any, d_sae: Any) -> None:
    """The config's d_in/d_sae (where given) must agree with the weights ([d_in, d_sae] encoder)."""
    for name, want, got in (("d_in", d_in, W_enc.shape[0]), ("d_sae", d_sae, W_enc.shape[-1])):
        if want is not None and _as_int(want, name, source) != got:
            raise SaeRewardError(
                f"shape mismatch in {source}: the config says {name}={want} but the encoder weight is "
                f"{_shape(W_enc)} (as [d_in, d_sae]); the config and weights belong to different SAEs"
            )


def _build(
    source: Path,
    *,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    device: str | torch.device,
    dtype: torch.dtype,
    **cfg_fields: Any,
) -> TopKSAE:
    """Validate shapes and values, then make a :class:`TopKSAE` holding these weights."""
    if W_enc.ndim != 2:
        raise SaeRewardError(
            f"shape mismatch in {source}: W_enc must be 2-D [d_in, d_sae], got {_shape(W_enc)}"
        )
    d_in, d_sae = W_enc.shape
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, t in (("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        if tuple(t.shape) != expected[name]:
            raise SaeRewardError(
                f"shape mismatch in {source}: {name} is {_shape(t)} but W_enc {_shape(W_enc)} implies "
                f"[{', '.join(map(str, expected[name]))}]"
            )
    if not 1 <= k <= d_sae:
        raise SaeRewardError(f"{source}: k={k} must be between 1 and d_sae={d_sae}")
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        if not t.is_floating_point():
            raise SaeRewardError(f"{source}: {name} has dtype {t.dtype}; an SAE's weights are floating point")
        if not torch.isfinite(t).all():
            raise SaeRewardError(f"{source}: {name} contains NaN or inf values; the checkpoint is broken")
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    cfg = SAEConfig(
        d_in=int(d_in), d_sae=int(d_sae), k=int(k), **{k_: v for k_, v in cfg_fields.items() if k_ in known}
    )
    # built from the checkpoint's tensors (no random init drawn from the global RNG and thrown away),
    # each copied once, W_enc in the trainer's layout: a transposed view of a contiguous [d_sae, d_in]
    enc = torch.empty(W_enc.shape[1], W_enc.shape[0], dtype=dtype, device=device).t()
    enc.copy_(W_enc.detach())
    state = {"W_enc": enc}
    for name, t in (("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        state[name] = t.detach().to(device=device, dtype=dtype, copy=True).contiguous()
    return TopKSAE.from_state(cfg, state)


def _input_scale(sae: TopKSAE) -> float:
    return float(sae.cfg.input_scale) if sae.cfg.normalize_input != "none" else 1.0


def _raw_space_weights(sae: TopKSAE) -> dict[str, torch.Tensor]:
    """``W_enc, b_enc, W_dec, b_dec`` with input normalization folded in, for formats that lack it.

    With scale ``s`` our coder computes ``pre = (s*x - b_dec) @ W_enc + b_enc`` and
    ``recon = (acts @ W_dec + b_dec) / s``; equivalently ``pre = (x - b_dec/s) @ (s*W_enc) + b_enc`` and
    ``recon = acts @ (W_dec/s) + b_dec/s``.
    """
    s = _input_scale(sae)
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().to("cpu", torch.float64) for n in PARAM_NAMES)
    dtype = sae.W_enc.dtype
    if s != 1.0:
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    return {
        "W_enc": W_enc.to(dtype),
        "b_enc": b_enc.to(dtype),
        "W_dec": W_dec.to(dtype),
        "b_dec": b_dec.to(dtype),
    }


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(folder: PathLike) -> Iterator[Path]:
    """Yield an empty temp folder next to ``folder``; on success it replaces ``folder`` atomically.

    An existing ``folder`` is replaced only if it is empty or an SAE checkpoint, and only after the new
    one is complete. Between the two renames the old SAE sits at ``.<name>.old-*/sae``; a failed second
    rename puts it back.
    """
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise SaeRewardError(f"cannot write an SAE folder at {target}: a file of that name exists")
    if target.is_dir() and any(target.iterdir()) and detect_format(target) is None:
        raise SaeRewardError(
            f"refusing to overwrite {target}: it is a non-empty folder that is not an SAE checkpoint; "
            "choose another path or remove it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with naming_target(target, target.parent / f".{target.name}."):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            _fsync_tree(tmp)
            if target.exists():
                old_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, old_root / "sae")
                try:
                    os.rename(tmp, target)
                except OSError:
                    os.rename(old_root / "sae", target)
                    raise
                shutil.rmtree(old_root, ignore_errors=True)
            else:
                os.rename(tmp, target)
            _fsync_dir(target.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Native
# --------------------------------------------------------------------------------------------------


def _is_native(p: Path) -> bool:
    return p.is_dir() and (p / CFG).is_file() and (p / NATIVE_WEIGHTS).is_file()


def save_sae(sae: TopKSAE, folder: PathLike, *, train_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` as a native folder (``cfg.json`` + ``weights.safetensors`` [+ ``train_config.json``]).

    The :class:`SAEConfig` is stored field by field, input normalization included, so loading gives
    back the identical SAE. Atomic (see :func:`atomic_folder`). Returns the folder.
    """
    target = Path(folder)
    cfg: dict[str, Any] = {
        "architecture": "topk",
        "format": "saereward",
        "format_version": NATIVE_FORMAT_VERSION,
        "saereward_version": __version__,
        **dataclasses.asdict(sae.cfg),
        "dtype": _DTYPE_NAMES.get(sae.W_enc.dtype, str(sae.W_enc.dtype)),
    }
    with atomic_folder(target) as tmp:
        _write_safetensors(
            tmp / NATIVE_WEIGHTS,
            {n: getattr(sae, n) for n in PARAM_NAMES},
            {"format": "pt", "saereward_format": "topk", "saereward_version": __version__},
        )
        _write_json(tmp / CFG, cfg)
        if train_config is not None:
            _write_json(tmp / TRAIN_CONFIG, dict(train_config))
    return target


def _load_native(folder: Path, device: str | torch.device, dtype: torch.dtype) -> TopKSAE:
    cfg = _read_json(folder / CFG)
    version = cfg.get("format_version", 1)
    if not isinstance(version, int) or version > NATIVE_FORMAT_VERSION:
        raise SaeRewardError(
            f"{folder} has format_version {version!r}, newer than this saereward reads "
            f"({NATIVE_FORMAT_VERSION}); upgrade saereward"
        )
    if cfg.get("architecture", "topk") != "topk":
        raise SaeRewardError(
            f"{folder}: architecture {cfg.get('architecture')!r} is not supported, only topk"
        )
    w = _read_safetensors(folder / NATIVE_WEIGHTS)
    _require(w, PARAM_NAMES, folder / NATIVE_WEIGHTS)
    _check_cfg_dims(folder, w["W_enc"], cfg.get("d_in"), cfg.get("d_sae"))
    if "k" not in cfg:
        raise SaeRewardError(f"{folder / CFG} has no k: the file is incomplete")
    fields = {f.name for f in dataclasses.fields(SAEConfig)} - {"d_in", "d_sae", "k"}
    extra = {k: v for k, v in cfg.items() if k in fields}
    return _build(
        folder,
        W_enc=w["W_enc"],
        b_enc=w["b_enc"],
        W_dec=w["W_dec"],
        b_dec=w["b_dec"],
        k=_as_int(cfg["k"], "k", folder),
        device=device,
        dtype=dtype,
        **extra,
    )


def load_train_config(folder: PathLike) -> dict[str, Any] | None:
    """The ``train_config.json`` saved beside a native SAE, or ``None`` if there is none."""
    p = Path(folder) / TRAIN_CONFIG
    return _read_json(p) if p.is_file() else None


# --------------------------------------------------------------------------------------------------
# SAELens
# --------------------------------------------------------------------------------------------------


def _is_saelens(p: Path) -> bool:
    return p.is_dir() and (p / CFG).is_file() and (p / SAELENS_WEIGHTS).is_file()


_HOOK_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_HOOK_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")


def _layer_from_hook(hook: Any) -> int | None:
    """``blocks.L.hook_resid_post`` -> L; ``blocks.L.hook_resid_pre`` -> L-1 (block L-1's output)."""
    if not isinstance(hook, str):
        return None
    if m := _HOOK_RESID_POST.match(hook):
        return int(m.group(1))
    if (m := _HOOK_RESID_PRE.match(hook)) and int(m.group(1)) >= 1:
        return int(m.group(1)) - 1
    log.info("SAE hook point %r is not a residual block output; loading it with layer=None", hook)
    return None


def _saelens_version(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), Mapping) else {}
    raw = cfg.get("sae_lens_version") or (meta or {}).get("sae_lens_version")
    if not isinstance(raw, str):
        return (0,)
    return tuple(int(x) for x in re.findall(r"\d+", raw)[:3]) or (0,)


def _load_saelens(folder: Path, device: str | torch.device, dtype: torch.dtype) -> TopKSAE:
    cfg = _read_json(folder / CFG)
    meta: dict[str, Any] = dict(cfg["metadata"]) if isinstance(cfg.get("metadata"), Mapping) else {}
    k = _saelens_topk_k(folder, cfg, meta)
    normalize_input, input_scale = _saelens_input_scale(folder, cfg, meta)
    if cfg.get("reshape_activations", "none") not in ("none", None) or cfg.get("hook_head_index") is not None:
        raise SaeRewardError(
            f"{folder}: attention-head SAEs (hook_z reshaping) are not supported, only residual ones"
        )
    W_enc, b_enc, W_dec, b_dec = _saelens_weights(folder, cfg)
    return _build(
        folder,
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        k=_as_int(k, "k", folder),
        device=device,
        dtype=dtype,
        normalize_input=normalize_input,
        input_scale=input_scale,
        model=meta.get("saereward_model") or meta.get("model_name"),
        layer=_layer_from_hook(meta.get("hook_name")),
    )


def _saelens_topk_k(folder: Path, cfg: Mapping[str, Any], meta: dict[str, Any]) -> Any:
    """The ``k`` of a SAELens TopK config (an error for other architectures).

    A pre-6.0 config (TopK was ``"standard"`` + ``activation_fn_str "topk"``, as SAELens's
    ``handle_pre_6_0_config`` reads it) also fills ``meta``'s ``hook_name`` and ``model_name`` from its
    top level.
    """
    arch = cfg.get("architecture", "standard")
    k: Any = cfg.get("k")
    if _saelens_version(cfg) < (6,):
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if act == "topk" and isinstance(kwargs, Mapping) and kwargs.get("k") is not None:
            arch, k = "topk", kwargs["k"]
        meta.setdefault("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
        meta.setdefault("model_name", cfg.get("model_name"))
    if arch != "topk":
        raise SaeRewardError(
            f"{folder} is a SAELens {arch!r} SAE: saereward supports only TopK SAEs (architecture 'topk'); "
            "train a TopK SAE or convert this one"
        )
    if k is None:
        raise SaeRewardError(f"{folder / CFG} has no k for its topk architecture: the config is incomplete")
    return k


def _saelens_input_scale(folder: Path, cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[str, float]:
    """``(normalize_input, input_scale)`` for a SAELens config's ``normalize_activations``."""
    norm = cfg.get("normalize_activations", "none")
    norm = {False: "none", None: "none", True: "expected_average_only_in"}.get(norm, norm)
    if norm == "expected_average_only_in":
        factor = cfg.get("norm_scaling_factor", meta.get("norm_scaling_factor"))
        if factor is None:
            raise SaeRewardError(
                f"{folder}: normalize_activations='expected_average_only_in' but cfg.json holds no "
                "norm_scaling_factor, so the input scale is unknown; fold it into the weights with SAELens "
                "(sae.fold_activation_norm_scaling_factor(s)) and save again, or add "
                '"norm_scaling_factor": <s> to cfg.json'
            )
        return "unit_mean_norm", float(factor)
    if norm != "none":
        raise SaeRewardError(
            f"{folder}: normalize_activations={norm!r} (a per-token normalization) is not supported; "
            "only 'none' and 'expected_average_only_in' with a known scale are"
        )
    return "none", 1.0


def _saelens_weights(
    folder: Path, cfg: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_enc, b_enc, W_dec, b_dec)`` in float64 from a SAELens folder, with its options folded in."""
    w = _read_safetensors(folder / SAELENS_WEIGHTS)
    _require(w, ("W_enc", "W_dec", "b_dec"), folder / SAELENS_WEIGHTS)
    W_enc, W_dec, b_dec = (w[n].to(torch.float64) for n in ("W_enc", "W_dec", "b_dec"))
    _check_cfg_dims(folder, W_enc, cfg.get("d_in"), cfg.get("d_sae"))
    b_enc = (
        w["b_enc"].to(torch.float64) if "b_enc" in w else torch.zeros(W_enc.shape[-1], dtype=torch.float64)
    )
    if W_dec.ndim != 2 or W_dec.shape != (W_enc.shape[-1], W_enc.shape[0]):
        raise SaeRewardError(
            f"shape mismatch in {folder}: W_dec is {_shape(W_dec)} but W_enc {_shape(W_enc)} implies "
            f"[{W_enc.shape[-1]}, {W_enc.shape[0]}]"
        )
    scale = w.get("finetuning_scaling_factor", w.get("scaling_factor"))
    folded = _fold_saelens(cfg, W_enc, b_enc, W_dec, b_dec, scale)
    known_extra = set(w) - {"W_enc", "b_enc", "W_dec", "b_dec", "scaling_factor", "finetuning_scaling_factor"}
    if known_extra:
        log.warning("%s: ignoring unexpected tensors %s", folder / SAELENS_WEIGHTS, sorted(known_extra))
    return folded


def _fold_saelens(
    cfg: Mapping[str, Any],
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold SAELens's decoder scale, decoder-norm rescaling and ``apply_b_dec_to_input=false`` into plain
    ``pre = (x - b_dec) @ W_enc + b_enc``, ``recon = acts @ W_dec + b_dec`` weights."""
    if scale is not None:  # legacy: decode used (acts * s) @ W_dec
        W_dec = W_dec * scale.to(torch.float64)[:, None]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # encode: pre = (x_in @ W_enc + b_enc) * n; decode: (acts / n) @ W_dec -- exactly SAELens's own fold
        n = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n[None, :], b_enc * n, W_dec / n[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = b_enc + b_dec @ W_enc
    return W_enc, b_enc, W_dec, b_dec


def save_saelens(sae: TopKSAE, folder: PathLike) -> Path:
    """Write ``sae`` as a SAELens 6 TopK folder that ``sae_lens.SAE.load_from_disk`` loads.

    Written with ``apply_b_dec_to_input=true``, ``rescale_acts_by_decoder_norm=false`` and
    ``normalize_activations='none'`` (input normalization is folded into the weights), so SAELens's
    encode/decode equal ours on raw residuals. The hook is ``blocks.<layer>.hook_resid_post``.
    """
    target = Path(folder)
    meta: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "saereward_version": __version__}
    if sae.cfg.model is not None:
        meta["model_name"] = hf_model_id(sae.cfg.model)  # a name SAELens and Neuronpedia resolve
        meta["saereward_model"] = sae.cfg.model  # exactly what it was trained on (embedded: a GGUF)
    if sae.cfg.layer is not None:
        meta["hook_name"] = f"blocks.{sae.cfg.layer}.hook_resid_post"
    cfg = {
        "architecture": "topk",
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "k": sae.cfg.k,
        "dtype": _DTYPE_NAMES.get(sae.W_enc.dtype, "float32"),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "rescale_acts_by_decoder_norm": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    with atomic_folder(target) as tmp:
        _write_safetensors(tmp / SAELENS_WEIGHTS, _raw_space_weights(sae), {"format": "pt"})
        _write_json(tmp / CFG, cfg)
    return target


# --------------------------------------------------------------------------------------------------
# sparsify
# --------------------------------------------------------------------------------------------------


def _is_sparsify(p: Path) -> bool:
    return p.is_dir() and (p / CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file()


_SPARSIFY_LAYER = re.compile(r"(?:^|\.)layers[._](\d+)$")


def _load_sparsify(folder: Path, device: str | torch.device, dtype: torch.dtype) -> TopKSAE:
    cfg = _read_json(folder / CFG)
    problems = []
    if cfg.get("activation", "topk") != "topk":
        problems.append(f"activation={cfg.get('activation')!r}")
    if cfg.get("transcode"):
        problems.append("transcode=true (a transcoder, not an autoencoder)")
    if cfg.get("skip_connection"):
        problems.append("skip_connection=true")
    if cfg.get("signed"):
        problems.append("signed=true")
    if problems:
        raise SaeRewardError(
            f"{folder} is a sparsify coder with {', '.join(problems)}: only plain TopK autoencoders are supported"
        )
    if "k" not in cfg or "d_in" not in cfg:
        raise SaeRewardError(f"{folder / CFG} lacks d_in or k: not a complete sparsify config")
    w = _read_safetensors(folder / SPARSIFY_WEIGHTS)
    _require(w, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder / SPARSIFY_WEIGHTS)
    W_enc = w["encoder.weight"].T  # nn.Linear stores [M, d]
    d_sae = cfg.get("num_latents") or None
    if d_sae is None and cfg.get("expansion_factor"):
        d_sae = _as_int(cfg["d_in"], "d_in", folder) * _as_int(
            cfg["expansion_factor"], "expansion_factor", folder
        )
    _check_cfg_dims(folder, W_enc, cfg.get("d_in"), d_sae)
    m = _SPARSIFY_LAYER.search(folder.name)
    model = None
    parent_cfg = folder.parent / "config.json"
    if parent_cfg.is_file():
        try:
            model = json.loads(parent_cfg.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            model = None
    return _build(
        folder,
        W_enc=W_enc,
        b_enc=w["encoder.bias"],
        W_dec=w["W_dec"],
        b_dec=w["b_dec"],
        k=_as_int(cfg["k"], "k", folder),
        device=device,
        dtype=dtype,
        model=model if isinstance(model, str) else None,
        layer=int(m.group(1)) if m else None,
    )


def save_sparsify(sae: TopKSAE, folder: PathLike) -> Path:
    """Write ``sae`` as a sparsify folder (``SparseCoder.load_from_disk`` loads it).

    Name the folder ``layers.<L>`` to keep the layer: sparsify stores it only in the folder name.
    """
    target = Path(folder)
    w = _raw_space_weights(sae)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.cfg.d_sae // sae.cfg.d_in),
        "normalize_decoder": True,
        "num_latents": sae.cfg.d_sae,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.cfg.d_in,
    }
    tensors = {
        "encoder.weight": w["W_enc"].T,
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }
    with atomic_folder(target) as tmp:
        _write_safetensors(tmp / SPARSIFY_WEIGHTS, tensors, {"format": "pt"})
        _write_json(tmp / CFG, cfg)
    return target


# --------------------------------------------------------------------------------------------------
# mechreward .pt
# --------------------------------------------------------------------------------------------------


def _is_mechreward_pt(p: Path) -> bool:
    return p.is_file() and p.suffix in _SEED_SUFFIXES


def _mechreward_sidecar(path: Path) -> dict[str, Any]:
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("ignoring unreadable sidecar %s", side)
        return {}
    return data if isinstance(data, dict) else {}


#: what the weights-only unpickler says of bytes that are not a pickle (anything else it refuses is an
#: object that unpickling would construct: reported as such)
_CORRUPT_PICKLE = (
    "Unsupported operand",
    "invalid load key",
    "could not find MARK",
    "pickle data was truncated",
)


def _load_mechreward_pt(path: Path, device: str | torch.device, dtype: torch.dtype) -> TopKSAE:
    try:
        # weights_only=True: the unpickler accepts tensors and plain containers only, so a checkpoint
        # that would construct arbitrary objects (and run code doing so) is refused before anything runs.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if any(m in str(exc) for m in _CORRUPT_PICKLE):  # bytes that are no pickle at all: refused too
            raise SaeRewardError(f"cannot read {path}: not a valid .pt file (truncated or corrupt)") from exc
        raise SaeRewardError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain values, and "
            "unpickling them could run code; re-save it as a dict of tensors and numbers"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise SaeRewardError(
            f"cannot read {path}: {type(exc).__name__}: {exc}; the file is truncated or corrupt"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "W_enc" not in obj:
        obj = {**obj, **obj["state_dict"]}
    if not isinstance(obj, dict):
        raise SaeRewardError(
            f"{path} holds a {type(obj).__name__}, expected mechreward's dict of SAE tensors"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    _require(tensors, PARAM_NAMES, path)
    W_enc = tensors["W_enc"]
    _check_cfg_dims(path, W_enc, obj.get("d_model"), obj.get("d_sae"))
    if "k" not in obj:
        raise SaeRewardError(f"{path} has no k: the mechreward checkpoint is incomplete")
    side = _mechreward_sidecar(path)
    model = side.get("model", side.get("model_name"))
    layer = next((side[key] for key in ("layer", "target_layer", "hook_layer") if key in side), None)
    if "step" in obj:
        log.info("loading mechreward SAE %s from step %s", path, obj["step"])
    return _build(
        path,
        W_enc=W_enc,
        b_enc=tensors["b_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        k=_as_int(obj["k"], "k", path),
        device=device,
        dtype=dtype,
        model=model if isinstance(model, str) else None,
        layer=_as_int(layer, "layer", path) if layer is not None else None,
    )


def save_mechreward_pt(sae: TopKSAE, path: PathLike, *, step: int | None = None) -> Path:
    """Write mechreward's ``.pt`` dict (+ sidecar ``.json`` with model and layer), atomically."""
    target = Path(path)
    w = _raw_space_weights(sae)
    obj: dict[str, Any] = {**w, "d_model": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k}
    if step is not None:
        obj["step"] = int(step)
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    write_json(
        target.with_suffix(".json"),
        {
            "d_model": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "k": sae.cfg.k,
            "model_name": sae.cfg.model,
            "target_layer": sae.cfg.layer,
            "saereward_version": __version__,
        },
    )
    return target


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

FORMATS: dict[str, SaeFormat] = {
    f.name: f
    for f in (
        SaeFormat("native", "folder with cfg.json + weights.safetensors", _is_native, _load_native, save_sae),
        SaeFormat(
            "saelens",
            "folder with cfg.json + sae_weights.safetensors",
            _is_saelens,
            _load_saelens,
            save_saelens,
        ),
        SaeFormat(
            "sparsify", "folder with cfg.json + sae.safetensors", _is_sparsify, _load_sparsify, save_sparsify
        ),
        SaeFormat(
            "mechreward_pt",
            "a .pt/.pth file holding mechreward's dict of tensors",
            _is_mechreward_pt,
            _load_mechreward_pt,
            save_mechreward_pt,
        ),
    )
}


def _sae_subfolders(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".") and detect_format(c))


def sae_weights_sha256(path: PathLike) -> str:
    """sha256 of an SAE checkpoint's weight files alone (its ``*.safetensors`` / ``*.pt``, by name), not
    of the JSON beside them that later commands rewrite (``eval-sae``'s ``eval.json``): the identity a
    pack records of the SAE it was discovered on."""
    p, _ = resolve_sae_path(resolve_source(path))
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".pt"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def resolve_sae_path(path: PathLike) -> tuple[Path, str]:
    """Find the checkpoint ``path`` points at and its format; errors name what was expected.

    A folder holding exactly one SAE subfolder (e.g. a sparsify run with one hookpoint ``layers.6/``)
    resolves to that subfolder; several are listed so the user can pick one.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SaeRewardError(f"SAE path {p} does not exist: check the path")
    if p.is_file() and p.suffix == ".safetensors" and (p.parent / CFG).is_file():
        p = p.parent
    name = detect_format(p)
    if name is not None:
        return p, name
    if p.is_dir():
        subs = _sae_subfolders(p)
        if len(subs) == 1:
            return subs[0], detect_format(subs[0]) or ""
        if subs:
            raise SaeRewardError(
                f"{p} holds several SAEs ({', '.join(s.name for s in subs)}): pass the one you want, e.g. {subs[0]}"
            )
        if (p / CFG).is_file():
            raise SaeRewardError(
                f"{p} has cfg.json but no weights file: expected {NATIVE_WEIGHTS} (native), "
                f"{SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)"
            )
        found = ", ".join(sorted(c.name for c in p.iterdir())[:8]) or "nothing"
    else:
        found = f"a {p.suffix or 'suffix-less'} file"
    raise SaeRewardError(f"unknown SAE layout at {p} (found {found}); expected one of: {_expected_layouts()}")


def load_sae(
    path: PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    format: str | None = None,
) -> TopKSAE:
    """Load a TopK SAE from any supported checkpoint, auto-detecting its format (see module docstring).

    ``format`` forces one of :data:`FORMATS` instead of detecting. Every problem a user can cause
    (missing path, unknown layout, corrupt or truncated file, config/weights shape mismatch, a non-TopK
    architecture, an unsafe pickle) is a one-line :class:`SaeRewardError`.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SaeRewardError(f"load_sae dtype={dtype!r}: pass a floating torch dtype, e.g. torch.float32")
    require_device(str(device))
    path = resolve_source(path)
    if format is not None:
        if format not in FORMATS:
            raise SaeRewardError(f"unknown SAE format {format!r}: choose one of {', '.join(FORMATS)}")
        p = Path(path).expanduser()
        if not p.exists():
            raise SaeRewardError(f"SAE path {p} does not exist: check the path")
        if not FORMATS[format].detect(p):
            raise SaeRewardError(f"{p} is not a {format} SAE: expected a {FORMATS[format].description}")
        name = format
    else:
        p, name = resolve_sae_path(path)
    sae = FORMATS[name].load(p, device, dtype)
    log.info("loaded %s SAE from %s: d_in=%d d_sae=%d k=%d", name, p, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k)
    return sae


def warn_other_model(thing: str, recorded: str | None, used: str | None) -> None:
    """Warn when ``thing`` (an SAE, a pack) records another model than ``used``: at the same width no
    shape check can tell, and its features then describe another model's residual stream. A warning,
    not an error: one model may be named two ways (a hub id, a local folder)."""
    if recorded and used and hf_model_id(recorded) != hf_model_id(used):
        log.warning(
            "%s was made on %s, but the residuals here come from %s: its features describe another model",
            thing,
            recorded,
            used,
        )


def check_sae_matches_model(sae: TopKSAE, d_model: int, layer: int | None = None) -> None:
    """Raise if the SAE cannot read this model's residual stream (``d_in != d_model``).

    A layer different from the one the SAE was trained on is allowed (layer-transfer experiments) but
    logged as a warning.
    """
    where = f" at layer {layer}" if layer is not None else ""
    if sae.cfg.d_in != d_model:
        trained = f" (it was trained on {sae.cfg.model})" if sae.cfg.model else ""
        raise SaeRewardError(
            f"SAE d_in {sae.cfg.d_in} does not match model width {d_model}{where}: the SAE was trained on a "
            f"different model{trained}; use an SAE trained on this model's residual stream"
        )
    if layer is not None and sae.cfg.layer is not None and sae.cfg.layer != layer:
        log.warning("SAE was trained on layer %d but is applied at layer %d", sae.cfg.layer, layer)
