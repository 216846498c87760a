#!/usr/bin/env bash
# The CLI stages that take --device, end to end at toy size on one device: collect -> train-sae ->
# eval-sae -> rollouts -> eval -> train-rl -> gate-g3 -> steer -> drift. It checks that they run there
# (exit 0, artifacts written), not what they learn. The task is 40 GSM8K-style items written to a JSONL
# file, so no task package is needed (G3 uses the offline GSM8K/MMLU copies), and the model is any
# folder (on the GPU machine: benchmarks/random_model.py's). The pack is 16 features of the SAE trained
# here, made by hand: a random-weight model gets no answer right, so discovery has nothing to find.
# `layers` is left out for the same reason (it needs right and wrong answers); its logit lens on CUDA is
# tests/test_cuda.py's.
#
#   DEVICE=cuda MODEL=/tmp/smol-random bash benchmarks/cli_device_check.sh     # gpu_session.sh's cli_cuda
#   DEVICE=cpu MODEL=/tmp/smol-random .venv/bin/bash benchmarks/cli_device_check.sh
set -euo pipefail
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:?set MODEL to a model folder}
PY=${PY:-python3}
W=$(mktemp -d /tmp/cli_device_check.XXXX)
$PY - "$W/q.jsonl" <<'EOF'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(40):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        q = f"Tom has {a} apples and buys {b} more. How many apples does he have now?"
        f.write(json.dumps({"question": q, "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
EOF
T=(--task gsm8k --task-source jsonl --task-path "$W/q.jsonl")
run() { echo "--- saereward $1 --device $DEVICE"; $PY -m saereward "$@" --device "$DEVICE"; }
run collect --model "$MODEL" "${T[@]}" --n 40 --layers 15 --max-new-tokens 24 --batch-size 20 \
  --no-progress --out "$W/acts"
run train-sae --activations "$W/acts" --layer 15 --train-d-sae 1152 --train-k 16 --train-batch-size 256 \
  --train-total-tokens 20480 --eval-tokens 512 --out "$W/sae"
run eval-sae --sae "$W/sae/sae" --activations "$W/acts" --eval-tokens 512 --model "$MODEL" --ce-task none \
  --out "$W/sae_eval"
run rollouts --model "$MODEL" "${T[@]}" --n 8 --samples 2 --max-new-tokens 16 --no-progress --out "$W/rollouts"
run eval --model "$MODEL" "${T[@]}" --n 8 --max-new-tokens 16 --no-progress --out "$W/eval"
run train-rl --model "$MODEL" "${T[@]}" --n-train 20 --n-eval 6 --questions-per-step 2 --group-size 2 \
  --max-new-tokens 8 --steps 2 --eval-every 0 --snapshot-every 1 --no-progress --out "$W/rl"
$PY - "$W" "$MODEL" <<'EOF'
import sys
from saereward.features.pack import Feature, FeaturePack, save_pack
from saereward.sae.formats import load_sae
w, model = sys.argv[1], sys.argv[2]
sae = load_sae(f"{w}/sae/sae")
meta = {"d_model": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "sae_path": f"{w}/sae/sae"}
save_pack(FeaturePack("cli", [Feature(i, 1.0) for i in range(8)], [Feature(i, -1.0) for i in range(8, 16)],
                      layer=15, model_name=model, metadata=meta), f"{w}/pack.json")
EOF
run gate-g3 --model "$MODEL" --adapter "$W/rl" --pack "$W/pack.json" --task gsm8k --task-n 4 --mmlu-n 4 \
  --gsm8k-n 2 --per-pattern 1 --monitor-n 4 --max-new-tokens 8 --gsm8k-max-new-tokens 8 \
  --canary-max-new-tokens 8 --batch-size 8 --no-progress --out "$W/g3"
run steer --model "$MODEL" "${T[@]}" --n 4 --max-new-tokens 8 --vector pack --pack "$W/pack.json" \
  --scales 0.05 --feature 3 --feature-mode clamp --feature-values 0 --no-progress --out "$W/steer"
run drift --run "$W/rl" --pack "$W/pack.json" --rollouts "$W/rollouts" --max-texts 8 --refit-tokens 512 \
  --no-progress --out "$W/drift"
ls "$W/sae/sae" "$W/rl/checkpoint" "$W/g3/gate_g3.json" "$W/steer/steer.json" "$W/drift/drift.json" >/dev/null
echo "cli_device_check: every stage ran on $DEVICE ($W)"
