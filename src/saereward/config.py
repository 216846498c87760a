"""Stage configs: frozen dataclasses, TOML files, ``--set key=value`` overrides, and ``--help`` from field docs.

Each stage declares one frozen dataclass. Every field carries its help text in ``metadata["help"]``
(use :func:`option`); the CLI turns the fields into ``--flags``, reads an optional ``--config FILE.toml``
and applies ``--set a.b=value`` overrides last. Precedence: defaults < TOML < flags < ``--set``.

Unknown keys are an error (one line naming the key and the valid ones), never silently ignored.
``Literal`` fields check their choices. ``__post_init__`` methods only validate; nothing derived is
stored on a config. :func:`to_dict` gives the resolved config that each stage writes beside its artifact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from saereward.errors import RunMismatch, SaeRewardError
from saereward.io import as_json

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with help text. Mutable defaults (dict/list) are wrapped in a factory."""
    md = {"help": help}
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        proto_cfg = default
        return dataclasses.field(default_factory=lambda: proto_cfg, metadata=md, **kw)
    if isinstance(default, dict | list):
        proto = default
        return dataclasses.field(default_factory=lambda: type(proto)(proto), metadata=md, **kw)
    return dataclasses.field(default=default, metadata=md, **kw)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from TOML or a string on the command line) to the field type ``tp``."""
    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
            return None
        return _coerce(name, inner, value)
    origin = get_origin(tp)
    if origin is typing.Literal:
        choices = get_args(tp)
        if value not in choices:
            raise SaeRewardError(
                f"{name}={value!r} is not allowed: choose one of {', '.join(map(str, choices))}"
            )
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise SaeRewardError(f"{name} must be a table of settings, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in {"1", "true", "yes", "on"}:
            return True
        if s in {"0", "false", "no", "off"}:
            return False
        raise SaeRewardError(f"{name}={value!r} is not a boolean: use true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise SaeRewardError(f"{name}={value!r} must be a number")
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise SaeRewardError(f"{name}={value!r} is not a whole number: pass an integer")
        try:
            num = tp(value) if tp is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError, OverflowError):
            raise SaeRewardError(f"{name}={value!r} is not a valid {tp.__name__}") from None
        if not math.isfinite(num):  # NaN passes every `x < 0` check and would reach the results
            raise SaeRewardError(f"{name}={value!r} is not a finite number: pass a finite value")
        return num
    if tp is str:
        return str(value)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise SaeRewardError(f"{name} must be a JSON/TOML table, got {value!r}") from None
        if not isinstance(value, Mapping):
            raise SaeRewardError(f"{name} must be a table, got {value!r}")
        return dict(value)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):  # one value where a list goes: --set layers=15, scales = 0.05
            value = [value]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            # a flag given several values (--layers 3 5) and/or comma lists (--layers 3,5)
            value = [part for v in value for part in v.split(",") if part.strip()]
        (elem,) = get_args(tp)[:1] or (Any,)
        seq = [_coerce(name, elem, v) if elem is not Any else v for v in value]
        return tuple(seq) if origin is tuple or tp is tuple else seq
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build ``cls`` from a mapping; unknown keys raise :class:`SaeRewardError`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SaeRewardError(
            f"unknown config key {prefix + unknown[0]!r}: valid keys are "
            f"{', '.join(prefix + k for k in fields) or '(none: this command takes no settings)'}"
        )
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in data.items()}
    from saereward.model.lm import (  # lazy: lm imports torch; config must not (CLI --help)
        DType,
        resolve_dtype,
    )

    for k, v in kwargs.items():
        if v == "auto" and hints[k] == DType:  # record the dtype the stage really runs in
            device = kwargs.get("device", getattr(fields.get("device"), "default", "cpu"))
            kwargs[k] = resolve_dtype(v, device if isinstance(device, str) else "cpu")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        where = f" [{prefix.rstrip('.')}]" if prefix else ""  # the preset table, when there is one
        raise SaeRewardError(f"invalid config{where}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON/TOML-friendly data."""
    return as_json(dataclasses.asdict(cfg))


def settings_changed(saved: Mapping[str, Any], now: Mapping[str, Any], free: Sequence[str] = ()) -> list[str]:
    """``"key old -> new"`` for each top-level setting that differs between a saved resolved config and
    the one asked for; the ``free`` keys (those that cannot change results) never count."""
    saved, now = as_json(saved), as_json(now)
    keys = sorted(k for k in set(saved) | set(now) if k not in free and saved.get(k) != now.get(k))
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys]


def refuse_other_settings(
    out: Path, cfg: Any, free: Sequence[str], *, cache: str, holds: str, stage: str
) -> None:
    """Raise one error line when ``out/cache`` holds finished results (``*.json``) and ``out/config.json``
    records result-changing settings that differ from ``cfg``'s: a stage resumes only into the settings
    it began with. ``holds`` names the results, ``stage`` the pipeline stage to force."""
    if not any((out / cache).glob("*.json")):
        return
    fix = f"pass another --out, or delete {out / cache} to start over (in a pipeline: --force {stage})"
    config_file = out / "config.json"
    if not config_file.is_file():
        return
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SaeRewardError(f"{config_file} is unreadable ({exc}): {fix}") from None
    changes = settings_changed(saved if isinstance(saved, dict) else {}, to_dict(cfg), free)
    if changes:
        raise RunMismatch(f"{out} holds {holds} made with other settings ({', '.join(changes[:6])}): {fix}")


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ``ValueError`` unless ``temperature > 0`` and ``0 < top_p <= 1``: what sampling needs."""
    if not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


def check_new_tokens(min_new_tokens: int, max_new_tokens: int) -> None:
    """Raise ``ValueError`` unless ``0 <= min_new_tokens <= max_new_tokens``."""
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"min_new_tokens must be in 0..max_new_tokens ({max_new_tokens}), got {min_new_tokens}"
        )


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise SaeRewardError(f"config file {path} is a folder: pass a .toml file")
    if not p.is_file():
        raise SaeRewardError(f"config file {path} not found: check the path")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SaeRewardError(f"config file {path} is not UTF-8 text: pass a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SaeRewardError(f"config file {path} is not valid TOML: {exc}") from exc


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Assign ``value`` at ``a.b.c`` inside nested dicts (creating tables as needed)."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise SaeRewardError(f"--set {dotted}: {k} is not a table")
        cur = nxt
    cur[keys[-1]] = value


def parse_set(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "name=x"]`` -> ``[("a.b", 3), ("name", "x")]`` (values parsed as TOML when possible)."""
    out: list[tuple[str, Any]] = []
    for item in items:
        if "=" not in item:
            raise SaeRewardError(f"--set {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.append((key.strip(), value))
    return out


# --------------------------------------------------------------------------------------------------
# argparse integration
# --------------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config``, ``--set`` and one flag per scalar field of ``cls`` (help from field metadata).

    Fields of a nested config dataclass get prefixed flags: field ``train.k`` becomes ``--train-k``.
    """
    add_spec_args(parser, field_specs(cls))


def add_spec_args(parser: argparse.ArgumentParser, specs: Sequence[Mapping[str, Any]]) -> None:
    """:func:`add_config_args` from :func:`field_specs` (which need not import the config's module)."""
    grp = parser.add_argument_group("settings (also settable in --config TOML or with --set key=value)")
    for spec in specs:
        kw: dict[str, Any] = {"dest": "cfg__" + "__".join(spec["path"]), "default": argparse.SUPPRESS}
        if spec["choices"] is not None:
            kw["choices"] = spec["choices"]
        if spec["nargs"]:
            kw["nargs"] = "+"
        flag = _flag("_".join(spec["path"]))
        if spec["bool"]:
            grp.add_argument(flag, action=argparse.BooleanOptionalAction, help=spec["help"], **kw)
        else:
            grp.add_argument(flag, metavar="_".join(spec["path"]).upper(), help=spec["help"], **kw)
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any setting, nested ones with dots (repeatable), e.g. --set task_params.min_terms=3",
    )


def field_specs(cls: type, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One JSON-plain flag description per scalar field of ``cls`` (nested dataclasses flattened):
    ``path``, ``bool``, ``choices``, ``nargs`` (a list) and the final ``help`` text."""
    hints = _hints(cls)
    out: list[dict[str, Any]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        _, inner = _is_optional(hints[f.name])
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(inner) and isinstance(inner, type):
            out += field_specs(inner, path)
            continue
        if get_origin(inner) in (dict, Mapping) or inner in (dict,):
            continue
        default: Any = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_ = f.metadata.get("help", "").replace("%", "%%")
        choices = list(get_args(inner)) if get_origin(inner) is typing.Literal else None
        if choices is not None:
            help_ += f" {{{','.join(map(str, choices))}}}"
        nargs = isinstance(default, tuple | list)
        if nargs:
            default = ",".join(map(str, default))
        if "default" not in help_:
            help_ = f"{help_} (default: {default})"
        spec = {"path": list(path), "bool": inner is bool, "choices": choices, "nargs": nargs, "help": help_}
        out.append(spec)
    return out


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Resolve defaults < ``--config`` < flags < ``--set`` into an instance of ``cls``."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = load_toml(args.config)
    for k, v in vars(args).items():
        if k.startswith("cfg__"):
            set_path(data, ".".join(k[5:].split("__")), v)
    for key, value in parse_set(getattr(args, "set", []) or []):
        set_path(data, key, value)
    return from_dict(cls, data)
