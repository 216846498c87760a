"""User-facing errors.

Every failure a user can cause (a bad path, an unknown task, an out-of-range layer) is raised as
:class:`SaeRewardError` with a one-line message that names the problem *and* the fix. The CLI prints
that line and exits with status 2, without a traceback. The CLI shows any other exception in one line
too (exit status 1; ``SAEREWARD_TRACEBACK=1`` shows its traceback), since it may be a bug.
"""

from __future__ import annotations


class SaeRewardError(Exception):
    """A problem with the user's input or environment; the message is shown as-is, on one line."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class RunMismatch(SaeRewardError):
    """A folder holds work made with other settings or inputs than asked, so resuming into it would
    mix two runs (the pipeline adds its own fix: ``--force <stage>``)."""
