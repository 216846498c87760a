#!/usr/bin/env bash
# Stage 1 (feature discovery + Stage Gate 1) on the embedded default, SmolLM2-135M-Instruct.
#
#   bash scripts/stage1_smollm2.sh [SAE] [RUN_DIR]
#     SAE      default runs/sae_smollm2/sae/sae (made by scripts/sae_smollm2.sh)
#     RUN_DIR  default runs/stage1_smollm2
#
# 300 chain_sum questions x 2 sampled responses (few-shot prompt), split 50/50 by question:
# ~300 discovery and ~300 validation responses. Residuals at every layer are pooled during
# generation; per-token residuals are kept at the SAE's layer (15). Then the layer map and logit
# lens, contrastive discovery (top 10 helpful + 10 harmful), and G1 with its baselines.
# Env: THREADS (default 2), N (questions, default 300), SEED (default 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
SAE=${1:-runs/sae_smollm2/sae/sae}
RUN=${2:-runs/stage1_smollm2}
THREADS=${THREADS:-2}
N=${N:-300}
SEED=${SEED:-0}
CLI=.venv/bin/saereward
START=$SECONDS
"$CLI" rollouts --out "$RUN/rollouts" --threads "$THREADS" --task chain_sum --n "$N" --seed "$SEED" \
    --prompt-format fewshot --decoding sample --samples 2 --max-new-tokens 64 --batch-size 32 \
    --token-layers 15
echo "rollouts: $((SECONDS - START))s" >&2
"$CLI" layers --rollouts "$RUN/rollouts" --lens-n 32
echo "layers: $((SECONDS - START))s" >&2
"$CLI" discover --rollouts "$RUN/rollouts" --sae "$SAE" --top-n 10 --out "$RUN/pack.json"
"$CLI" gate-g1 --rollouts "$RUN/rollouts" --pack "$RUN/pack.json" --seed "$SEED"
echo "stage 1 total: $((SECONDS - START))s" >&2
