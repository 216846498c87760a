"""Where a benchmark writes its results: checked before the run, written atomically after it.

A benchmark takes minutes; a ``--json`` / ``--out`` path that cannot be written should stop it with
one line at the start, not a traceback at the end. Helpers only (``--help`` prints this).
"""

from __future__ import annotations

import argparse
from typing import Any

from saereward.errors import SaeRewardError
from saereward.io import check_writable, write_json


def check_out(path: str | None, flag: str) -> None:
    """Exit with one line now if ``path`` (the value of ``flag``; ``None``: nothing to write) cannot be
    written."""
    if not path:
        return
    try:
        check_writable(path, f"pass another {flag}")
    except SaeRewardError as exc:
        raise SystemExit(f"error: {exc}") from None


def write_out(path: str | None, obj: Any) -> None:
    """``obj`` as JSON at ``path`` (atomically), if a path was given."""
    if path:
        write_json(path, obj)


if __name__ == "__main__":  # a helper module: --help says so, nothing runs
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
