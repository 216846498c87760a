#!/usr/bin/env bash
# README command 2: set up, then lint (ruff), type-check (mypy) and run the whole test suite,
# slow end-to-end tests included. Exits non-zero on any failure, and when no test ran (pytest exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
# Python's default: compiled modules are cached (.pyc, in .venv and beside src/ and tests/, all
# git-ignored). Where PYTHONDONTWRITEBYTECODE is set, as on our 2-core development VMs, every Python
# process of the suite (the pytest run, each pipeline and CLI child, each accelerate worker) compiled
# the ~3,000 source files it imports anew: 15-18 s a process there (BENCHMARKS.md, test suite time).
unset PYTHONDONTWRITEBYTECODE
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# The report's browser test (tests/test_report.py) drives Debian's Chromium through playwright; it
# fails, rather than skips, when SAEREWARD_REQUIRE_BROWSER is set and no browser is there.
if [ ! -x /usr/bin/chromium ]; then
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; }; then
    echo "scripts/test.sh: could not install Debian chromium (apt-get install -y chromium, as root): the report's browser test will fail" >&2
  fi
fi
export SAEREWARD_REQUIRE_BROWSER=1
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy
# the verl adapter's test, through verl's own code, in its own venv (verl pins transformers < 5.11)
if [ "$#" -eq 0 ]; then
  bash scripts/setup_verl.sh
  SAEREWARD_REQUIRE_VERL=1 .venv-verl/bin/python -m pytest -p no:cacheprovider -W ignore::DeprecationWarning \
    -W ignore::UserWarning tests/test_verl.py
fi
exec pytest -p no:cacheprovider "$@"
