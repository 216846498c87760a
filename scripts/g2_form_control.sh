#!/usr/bin/env bash
# The reward-form control of a finished pipeline run: G2 again with another reward form, everything
# else as the run's own G2 (its resolved settings in RUN/stages.json), into RUN/g2_<FORM>/.
#
#   bash scripts/g2_form_control.sh RUN [FORM] [REWARD ...]
#
# FORM defaults to mechreward (mechreward's length-biased form: the control for the default form);
# REWARDs default to "outcome sae direction". R0 (outcome) reads no score, so its runs do not depend
# on the form: the run's own finished R0 folders are copied in and reused (the gate checks that their
# saved settings match), and only R1/R2 train. It then compares each trained arm under the run's own
# form with the same arm under FORM, paired by seed and question (RUN/g2_<FORM>/form_comparison.json).
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
from saereward.gates.g2_rl_ablation import GateG2Config, format_g2, run_gate_g2
from saereward.gates.paired import paired_compare
from saereward.io import write_json


def final_bits(run: Path) -> str:
    """The run's last held-out correctness string (one '0'/'1' per question)."""
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    bits = [r["eval_bits"] for r in rows if "eval_bits" in r]
    if not bits:
        sys.exit(f"error: {run} logged no eval_bits: re-run it with the current code")
    return bits[-1]


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

# each trained arm under the run's own form against the same arm under FORM: same seeds, same questions
own = g2["rl"].get("reward_form", "mechreward")
comparison = {}
for reward in (r for r in rewards if r != "outcome"):
    pairs = []
    for mine in sorted(Path(g2["out"]).glob(f"R*_{reward}_seed*")):
        other = out / mine.name
        if (other / "summary.json").is_file() and (mine / "summary.json").is_file():
            pairs.append((final_bits(mine), final_bits(other)))
    if pairs:
        res = paired_compare([a for a, _ in pairs], [b for _, b in pairs], seed=g2.get("seed", 0))
        comparison[reward] = res
        print(
            f"{reward}: {own} - {form} = {res['mean_diff']:+.3f} [{res['ci_low']:+.3f}, {res['ci_high']:+.3f}], "
            f"discordant {res['a_only']}/{res['b_only']}, McNemar p={res['p_value']:.3g} "
            f"(n={res['n_seeds']}x{res['n_questions']})"
        )
write_json(out / "form_comparison.json", {"own_form": own, "control_form": form, "arms": comparison})
print(f"wrote {out}/form_comparison.json")
PY
echo "g2_form_control: ${SECONDS}s" >&2
