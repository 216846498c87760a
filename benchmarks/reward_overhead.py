"""The per-token SAE reward's overhead: whole GRPO steps with the reward on and off, in one process.

``benchmarks/grpo_step.py`` runs ``ours+sae`` and ``ours`` (reward off) in separate processes, whose
step times on a shared 2-core VM differ by ±15 % in either direction from run to run, more than the
overhead being measured. Here one trainer (the ``grpo_step.py`` configuration with the SAE reward,
R1 from the policy's captured residuals) alternates steps with the reward on and off (off = the
scorer detached: no residual capture in the rollouts, no SAE encode, outcome-only advantages), so
both settings see the same process, model and machine state. Each step draws its own samples, so the
step time per completion token is reported next to the step time.

    .venv/bin/python benchmarks/reward_overhead.py --pairs 4
    .venv/bin/python benchmarks/reward_overhead.py --pairs 4 --source reference

``--source reference``: the reward reads the frozen base model's residuals, captured in the reference
forward (which then runs every row's prompt itself instead of sharing the group's prompt cache)
rather than the policy's, captured during generation.

The last line is ``reward_overhead=<(on - off) / on, from the medians of s/step>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4, help="timed (off, on) step pairs after 1 warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument(
        "--source", default="policy", choices=["policy", "reference"], help="GRPOConfig.reward_source"
    )
    args = ap.parse_args()

    import torch

    from grpo_step import bench_config, make_pack  # the benchmark's configuration (this folder)
    from saereward.model.lm import load_model
    from saereward.rl.grpo import GRPOTrainer

    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="reward_overhead_"))
    make_pack(workdir)
    cfg = bench_config(
        args.dtype,
        4,
        2 * args.pairs + 1,
        reward="sae",
        reward_form="mechreward",  # needs no measured reward baseline; per step it costs what position costs
        pack=str(workdir / "pack.json"),
        layer=15,
        reward_source=args.source,
    )
    tr = GRPOTrainer(cfg, lm=load_model(dtype=cfg.dtype))
    scorer = tr.scorer
    tr.step(0)  # warm-up
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(args.pairs):
        for on in (False, True):
            tr.scorer = scorer if on else None
            r = tr.step(1 + 2 * i + int(on))
            rows[on].append(r)
            print(  # noqa: T201
                f"reward {'on ' if on else 'off'}: {r['sec_step']:.2f} s/step (generate {r['sec_generate']:.2f}, "
                f"reference {r['sec_reference']:.2f}, reward {r['sec_reward']:.3f}, train {r['sec_train']:.2f}), "
                f"{r['completion_len']:.1f} tokens per completion",
                flush=True,
            )
    med: dict[bool, tuple[float, float, float]] = {}
    for on in (False, True):
        step = statistics.median(r["sec_step"] for r in rows[on])
        per_tok = statistics.median(r["sec_step"] / r["completion_len"] for r in rows[on])
        reward = statistics.median(r["sec_reward"] for r in rows[on])
        med[on] = (step, per_tok, reward)
        print(  # noqa: T201
            f"median reward {'on ' if on else 'off'}: {step:.2f} s/step, {per_tok:.3f} s per completion token "
            f"(per row), reward computation {reward:.3f} s"
        )
    print(  # noqa: T201
        f"per completion token: {(med[True][1] - med[False][1]) / med[True][1]:+.1%}; "
        f"reward computation alone: {med[True][2] / med[True][0]:.2%} of the step"
    )
    print(f"reward_overhead={(med[True][0] - med[False][0]) / med[True][0]:.3f}")  # noqa: T201


if __name__ == "__main__":
    main()
