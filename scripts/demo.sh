#!/usr/bin/env bash
# README command 1: set up, then run the quick pipeline (every stage, <= 15 min on 2 CPU cores) on
# the embedded default model; it ends with the path of report.html.
# Extra arguments go to `saereward pipeline` (e.g. --config examples/embedded.toml for the full study,
# --force g2 to redo a stage; see `saereward pipeline --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
# cache compiled modules (Python's default) even where PYTHONDONTWRITEBYTECODE is set, so that later
# runs skip compiling ~3,000 source files (15-18 s on a 2-core VM; see scripts/test.sh)
unset PYTHONDONTWRITEBYTECODE
SAEREWARD_EXTRAS= bash scripts/setup.sh  # the pipeline needs no extras
exec .venv/bin/saereward pipeline --config examples/quick.toml "$@"
