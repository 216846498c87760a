"""``python -m saereward.cli_schema``: regenerate ``cli_schema.json`` after a config class changed."""

import sys

from saereward.cli import write_schema

if __name__ == "__main__":
    sys.stdout.write(f"wrote {write_schema()}\n")
