#!/usr/bin/env bash
# Stage Gate 3 on the embedded default for the R1 run (bash scripts/r1_smollm2.sh first): eval-suite
# (held-out chain_sum, MMLU n=200, GSM8K 100 real items; MATH-500 only with MATH500=<jsonl>),
# canaries (50), monitor validity (150 fresh held-out questions x 2), then the verdict.
# Env: THREADS, ADAPTER (default runs/r1_smollm2), RUN (default runs/g3_smollm2), S1, MATH500.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
S1=${S1:-runs/stage1_smollm2}
EXTRA=()
if [ -n "${MATH500:-}" ]; then EXTRA+=(--math500-path "$MATH500"); fi
SECONDS=0
.venv/bin/saereward gate-g3 --adapter "${ADAPTER:-runs/r1_smollm2}" --pack "$S1/pack.json" \
    --dtype auto --threads "${THREADS:-2}" --task chain_sum --prompt-format raw --max-new-tokens 64 \
    --out "${RUN:-runs/g3_smollm2}" "${EXTRA[@]}" "$@"
echo "gate-g3: ${SECONDS}s" >&2
