"""Phase times of one GRPO step with a boolean ``GRPOConfig`` option off and on (an A/B of ours).

The configuration of ``benchmarks/grpo_step.py`` (SmolLM2-135M-Instruct, LoRA r 16, 4 chain_sum
questions × 4 samples, 64 new tokens, fp32, β 0.05). One batch is sampled; then, alternating off / on
for ``--reps`` rounds, the script times the reference forward and the update on that same batch, and
a fresh rollout (step 1's questions, so both settings decode the same prompts; the sampled lengths
differ, so the rollout's time per completion token is printed too). No peer runs here: it measures
one setting of ours against itself (``benchmarks/grpo_phases.py --set OPTION=false`` is the
per-step view of the same A/B).

    .venv/bin/python benchmarks/option_ab.py --option share_prompt --threads 2 --reps 3
    .venv/bin/python benchmarks/option_ab.py --option fast_decode --reps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--option", default="share_prompt", help="a boolean GRPOConfig field")
    args = ap.parse_args()

    from grpo_step import bench_config  # the benchmark's configuration (this folder)
    from saereward.model.lm import load_model
    from saereward.rl.grpo import GRPOTrainer

    torch.set_num_threads(args.threads)
    lm = load_model(dtype="fp32")
    cfg = bench_config("fp32", 4, 10)
    name = args.option
    if not isinstance(getattr(cfg, name, None), bool):
        raise SystemExit(f"--option {name!r}: not a boolean GRPOConfig field")
    tr = GRPOTrainer(dataclasses.replace(cfg, **{name: False}), lm=lm)
    b = tr._rollouts(0)
    print(f"prompt_len {b.prompt_len}, completion lengths {b.response_mask.sum(1).tolist()}")  # noqa: T201
    times: dict[bool, list[tuple[float, float, float, float]]] = {False: [], True: []}
    for _ in range(args.reps):
        for on in (False, True):
            tr.cfg = dataclasses.replace(cfg, **{name: on})
            t0 = time.perf_counter()
            ref, _ = tr.reference(b)
            t1 = time.perf_counter()
            tr.update(b, torch.randn(ref.shape), ref)
            t2 = time.perf_counter()
            r = tr._rollouts(1)
            t3 = time.perf_counter()
            ms_tok = 1000 * (t3 - t2) / max(int(r.response_mask.sum()), 1)
            times[on].append((t1 - t0, t2 - t1, t3 - t2, ms_tok))
            print(  # noqa: T201
                f"{name}={on}: reference {t1 - t0:.2f} s, update {t2 - t1:.2f} s, rollouts {t3 - t2:.2f} s "
                f"({ms_tok:.1f} ms per completion token)",
                flush=True,
            )
    for on in (False, True):
        med = [statistics.median(x[i] for x in times[on]) for i in range(4)]
        print(  # noqa: T201
            f"median {name}={on}: reference {med[0]:.2f} s, update {med[1]:.2f} s, rollouts {med[2]:.2f} s "
            f"({med[3]:.1f} ms per completion token)"
        )


if __name__ == "__main__":
    main()
