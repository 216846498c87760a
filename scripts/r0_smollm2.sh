#!/usr/bin/env bash
# R0 GRPO (outcome reward only) on the embedded default with mechreward's raw prompt: the base-model
# lift check. Held-out greedy accuracy on 100 chain_sum questions (disjoint from training)
# at steps 0, 25 and 50. Env: THREADS (default 2), SEED (default 0), RUN (default runs/r0_smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
RUN=${RUN:-runs/r0_smollm2}
SECONDS=0
.venv/bin/saereward train-rl --dtype auto --threads "${THREADS:-2}" --reward outcome --task chain_sum \
    --prompt-format raw --questions-per-step 4 --group-size 8 --max-new-tokens 64 --steps 50 --lr 1e-4 \
    --beta 0.05 --eval-every 25 --n-eval 100 --eval-batch-size 50 --checkpoint-every 5 \
    --seed "${SEED:-0}" --out "$RUN" "$@"
echo "train-rl: ${SECONDS}s" >&2
