"""``python -m saereward``: the same as the ``saereward`` command."""

from saereward.cli import entry

raise SystemExit(entry())
