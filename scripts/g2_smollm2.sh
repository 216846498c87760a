#!/usr/bin/env bash
# Stage Gate 2 on the embedded default: R0 (outcome), R1 (+ SAE pack, per token), R2 (+ raw direction)
# x 3 seeds, same data, budget and held-out questions. Needs the stage-1 outputs
# (bash scripts/stage1_smollm2.sh). STEPS (default 4) sets the budget per run: 4 steps is a smoke-
# scale run that fits a 2-core machine (~13 min for the 9 runs); the R0 lift needs ~50 (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
S1=${S1:-runs/stage1_smollm2}
SECONDS=0
.venv/bin/saereward gate-g2 --seeds 0 1 2 --out "${RUN:-runs/g2_smollm2}" \
    --rl-dtype auto --rl-threads "${THREADS:-2}" --rl-task chain_sum --rl-prompt-format raw \
    --rl-questions-per-step 4 --rl-group-size 4 --rl-max-new-tokens 48 --rl-steps "${STEPS:-4}" --rl-lr 1e-4 \
    --rl-beta 0.05 --rl-lam 0.1 --rl-n-eval 40 --rl-eval-every 0 --rl-eval-batch-size 40 \
    --rl-pack "$S1/pack.json" --rl-direction-rollouts "$S1/rollouts" --rl-progress "$@"
echo "gate-g2: ${SECONDS}s" >&2
