#!/usr/bin/env bash
# R1 GRPO (outcome + λ·z(per-token SAE pack score)) on the embedded default: the same settings as
# scripts/r0_smollm2.sh plus the stage-1 pack (bash scripts/stage1_smollm2.sh first). Its adapter is
# what the stage-3 checks (canaries, monitor validity, eval-suite, gate-g3) compare with the base
# model. Env: THREADS, SEED, RUN (default runs/r1_smollm2), S1 (default runs/stage1_smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
S1=${S1:-runs/stage1_smollm2}
RUN=${RUN:-runs/r1_smollm2} exec bash scripts/r0_smollm2.sh --reward sae --pack "$S1/pack.json" --lam 0.1 "$@"
