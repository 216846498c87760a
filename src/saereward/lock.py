"""Run-folder locks: one process writes into a run or stage folder at a time.

:func:`folder_lock` holds ``<folder>/.saereward.lock`` (created with ``O_EXCL``, holding the owner's
PID, host and command) while a stage writes into the folder. A second process that asks for the same
folder gets one error line naming the holder's PID. The lock is removed when the holder leaves the
``with`` block, on success or error. A lock left by a process killed with ``kill -9`` is *stale*: its
PID no longer runs on this host, so the next process takes the folder over. The same process may
enter the lock of a folder again; only the outermost exit removes it, and a folder the lock created
is removed too when nothing else was written into it. Only rank 0 of a data-parallel job (``RANK``) takes locks, since the ranks share one folder.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saereward.errors import SaeRewardError

__all__ = ["LOCK_NAME", "folder_lock", "lock_holder"]

LOCK_NAME = ".saereward.lock"
_held: dict[Path, int] = {}  # folder -> nesting depth, this process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def lock_holder(folder: str | os.PathLike[str]) -> dict[str, object] | None:
    """The record of the live process holding ``folder``'s lock, or ``None`` (no lock, or a stale one)."""
    path = Path(folder) / LOCK_NAME
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        pid = int(rec["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no lock, or a torn one (its writer died between create and write)
    if rec.get("host") != socket.gethostname():
        return rec  # another machine's process: cannot tell, so respect it
    return rec if _alive(pid) else None


def _acquire(folder: Path, what: str) -> None:
    path = folder / LOCK_NAME
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": what})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(folder)
            if holder is not None:
                raise SaeRewardError(
                    f"{folder} is in use by process {holder['pid']} on {holder.get('host')} "
                    f"({holder.get('command')}): wait for it to finish, or write to another --out"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(record)
        return
    raise SaeRewardError(f"could not take the lock {path}: another process keeps taking it; retry")


@contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block; see the module docstring."""
    root = Path(folder).expanduser().resolve()
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    created = False
    if root in _held:
        _held[root] += 1
    else:
        if root.exists() and not root.is_dir():
            raise SaeRewardError(f"{root} is a file: pass a folder path as out")
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        _acquire(root, what)
        _held[root] = 1
    try:
        yield
    finally:
        _held[root] -= 1
        if _held[root] == 0:
            del _held[root]
            (root / LOCK_NAME).unlink(missing_ok=True)
            if created and not any(root.iterdir()):
                root.rmdir()  # a refused run leaves no folder behind
