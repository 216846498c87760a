#!/usr/bin/env bash
# The reward-form control of a finished pipeline run: G2 again with another reward form, everything
# else as the run's own G2 (its resolved settings in RUN/stages.json), into RUN/g2_<FORM>/.
#
#   bash scripts/g2_form_control.sh RUN [FORM] [REWARD ...]
#
# FORM defaults to mechreward (mechreward's length-biased form: the control for the default form);
# REWARDs default to "outcome sae direction". R0 (outcome) reads no score, so its runs do not depend
# on the form: the run's own finished R0 folders are copied in and reused (the gate checks that their
# saved settings match), and only R1/R2 train. Env: THREADS is not needed (the run's own setting).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
RUN=${1:?usage: g2_form_control.sh RUN [FORM] [REWARD ...]}
FORM=${2:-mechreward}
shift $(( $# >= 2 ? 2 : 1 ))
REWARDS=("${@:-outcome sae direction}")
SECONDS=0
.venv/bin/python - "$RUN" "$FORM" ${REWARDS[*]} <<'PY'
import json
import shutil
import sys
from pathlib import Path

from saereward.config import from_dict
from saereward.errors import SaeRewardError
from saereward.gates.g2 import GateG2Config, format_g2, run_gate_g2

run, form, rewards = Path(sys.argv[1]), sys.argv[2], tuple(sys.argv[3:])
stages = run / "stages.json"
try:
    g2 = json.loads(stages.read_text())["g2"]["config"]["gate_g2"]
except (OSError, KeyError, json.JSONDecodeError):
    sys.exit(f"error: {run} has no finished G2 stage in stages.json: run the pipeline's g2 stage first")
out = run / f"g2_{form}"
for r0 in sorted(Path(g2["out"]).glob("R0_outcome_seed*")):
    if "outcome" in rewards and not (out / r0.name).exists():
        shutil.copytree(r0, out / r0.name)
cfg = from_dict(GateG2Config, {**g2, "rewards": rewards, "out": str(out), "rl": {**g2["rl"], "reward_form": form}})
try:
    print(format_g2(run_gate_g2(cfg)))
except SaeRewardError as exc:
    sys.exit(f"error: {exc}")
print(f"wrote {out}/gate_g2.json")
PY
echo "g2_form_control: ${SECONDS}s" >&2
