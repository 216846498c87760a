#!/usr/bin/env bash
# README command 2: set up, then lint (ruff), type-check (mypy) and run the whole test suite,
# slow end-to-end tests included. Exits non-zero on any failure, and when no test ran (pytest exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy
exec pytest -p no:cacheprovider "$@"
