#!/usr/bin/env bash
# README command 1: set up, then run the main job on the embedded default model.
# Extra arguments go to `saereward baseline` (see `saereward baseline --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/saereward baseline "$@"
