"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

A crash mid-write leaves the previous artifact intact; readers never see half a file. The file gets
the permissions a plain ``open`` would give it (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
:func:`check_writable` fails a command before its work when its output cannot be written. JSON is
written strict (:func:`json_text`): an undefined statistic is ``null``, never a bare ``NaN``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from saereward.errors import SaeRewardError


def _file_mode() -> int:
    """``0o666`` less the process umask (read without changing it for long: set and restored)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


def check_writable(path: str | os.PathLike[str], fix: str = "pass another --out") -> None:
    """Raise a one-line :class:`SaeRewardError` now when nothing can be written at ``path`` (a file or
    folder a command will create or replace), so the command fails before its work, not after it.

    The nearest existing folder at or above ``path`` must accept a new file: a probe file is created
    there and removed again. Nothing else is created. ``fix`` ends the message.
    """
    p = Path(path)
    d = p if p.is_dir() else p.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise SaeRewardError(f"cannot write {p}: {d} is a file, not a folder; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".saereward-write-check.", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SaeRewardError(f"cannot write {p}: {exc.strerror or exc} in {d}; {fix}") from None


@contextmanager
def naming_target(target: str | os.PathLike[str], tmp_prefix: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an OS error on a temporary path (one that starts with ``tmp_prefix``: a read-only folder,
    a full disk) as the same error on ``target``, the path the user asked for; others pass unchanged."""
    try:
        yield
    except OSError as exc:
        if not str(exc.filename or "").startswith(str(tmp_prefix)):
            raise
        raise OSError(exc.errno, exc.strerror, str(target)) from None


@contextmanager
def atomic_path(path: str | os.PathLike[str]):
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``. An OS error
    on the temporary file (a read-only folder, a full disk) names ``path``, the file the user asked for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_target(path, path.parent / f".{path.name}."):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, _MODE)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[str]], object]) -> None:
    """Write text through ``write(fh)`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        write(fh)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf: an undefined statistic) replaced by ``None``,
    through dicts, lists and tuples (a tuple becomes a list, as JSON has it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON: non-finite floats as ``null`` (:func:`finite`), so jq, JavaScript and
    other strict parsers read every file saereward writes; other objects as their ``str``."""
    return json.dumps(finite(obj), indent=indent, default=str, allow_nan=False)


def as_json(obj: Any) -> Any:
    """``obj`` as it reads back from a file :func:`write_json` wrote (tuples as lists, non-finite
    floats as ``None``, other objects as their ``str``): compare a saved record with this."""
    return json.loads(json_text(obj))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (:func:`json_text`), atomically."""
    text = json_text(obj, indent=2) + "\n"
    atomic_write(path, lambda fh: fh.write(text))


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write one strict JSON object per line (:func:`json_text`), atomically."""

    def _w(fh: IO[str]) -> None:
        for r in rows:
            fh.write(json_text(r) + "\n")

    atomic_write(path, _w)


def read_json(path: str | os.PathLike[str], expect: type | None = None) -> Any:
    """The JSON value in ``path``; a truncated, corrupt or non-UTF-8 file is a one-line
    :class:`SaeRewardError` naming it (a missing one stays ``FileNotFoundError``), and so is a value
    that is not an ``expect`` (e.g. ``dict``: a list where saereward writes an object)."""
    raw = Path(path).read_bytes()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise SaeRewardError(
            f"{path} is not valid JSON ({why}): it is truncated or corrupt; rerun the stage that wrote it"
        ) from None
    if expect is not None and not isinstance(value, expect):
        kinds: dict[type, str] = {dict: "an object", list: "a list"}
        raise SaeRewardError(
            f"{path} holds {kinds.get(type(value), type(value).__name__)} where saereward writes "
            f"{kinds.get(expect, expect.__name__)}: it is not this file or it was edited; rerun the stage that wrote it"
        )
    return value


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSONL file (blank lines skipped); a line that is not JSON is a one-line error."""
    return [row for _, row in iter_jsonl(path)]


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSONL file, read lazily.

    A line that is not valid JSON is a one-line :class:`SaeRewardError` naming the file and line.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SaeRewardError(f"{path}:{lineno}: not UTF-8 text; pass a UTF-8 JSONL file") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise SaeRewardError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix that line") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of every file under a folder (sorted by relative path)."""
    p = Path(path)
    h = hashlib.sha256()
    # os.walk follows linked folders (rglob does not): a folder hashes the same read through links
    files = (
        [p]
        if p.is_file()
        else sorted(
            x
            for d, _, names in os.walk(p, followlinks=True)
            for x in (Path(d) / n for n in names)
            if x.is_file()
        )
    )
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)
