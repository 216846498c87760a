#!/usr/bin/env bash
# The verl adapter's test venv (./.venv-verl). verl 0.9.1 pins transformers < 5.11 while saereward's
# main venv runs 5.23, so tests/test_verl.py runs in this second venv. Idempotent, like setup.sh.
# Versions: scripts/constraints-verl.txt (verified together). verl's CPU path also imports cachetools,
# uvicorn and fastapi, which it does not declare.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SAEREWARD_VERL_VENV:-.venv-verl}
stamp="$VENV/.saereward-setup"
want=$(cat pyproject.toml scripts/setup_verl.sh scripts/constraints-verl.txt | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "saereward setup: creating $VENV for the verl adapter's test (takes a few minutes)..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --no-compile --upgrade pip
"${PIP[@]}" install --no-compile "torch==${SAEREWARD_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" install --no-compile -c scripts/constraints-verl.txt verl cachetools uvicorn fastapi \
  pytest pytest-timeout reasoning-gym scipy scikit-learn jinja2 matplotlib gguf safetensors peft
"${PIP[@]}" install --no-compile --no-deps -e .
printf '%s\n' "$want" > "$stamp"
echo "saereward setup: done ($VENV)" >&2
