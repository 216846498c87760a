"""GRPO step time inside TRL: ``trl.GRPOTrainer`` vs ``saereward.rl.trl.SAEGRPOTrainer``, any device.

What the per-token SAE reward costs a TRL user. Both sides run the same TRL loop on the same
configuration (``benchmarks/grpo_step.py``'s: LoRA r=16, α=32 on q/k/v/o/gate/up/down, 4 prompts × 4
completions, 64 new tokens, temperature 0.9, top-p 0.95, β=0.05, lr 1e-5, TRL's other defaults); the
second adds the SAE advantage (``SAEGRPOTrainer``: hidden states recorded during TRL's reference
forward, a TopK SAE of width 16·d, k=32, and a 20-feature pack at the middle layer, λ=0.1). The SAE's
weights are random: its cost does not depend on their values.

Prompts are two-number sums in mechreward's raw prompt (``Q: {q}\\nA: Let's think step by step.``) and
the reward is 1 when the completion contains the sum: no task package is needed, so this also runs on
machines without reasoning-gym. Each trainer runs in its own child process (one warm-up step, then
``--steps`` timed steps); the report is the median step time, the peak memory (CUDA:
``max_memory_allocated``; CPU: peak RSS) and the mean completion length. The last line is
``sae_overhead_in_trl=<SAEGRPOTrainer / GRPOTrainer - 1>``.

    python benchmarks/trl_sae_step.py --model /tmp/smol-random --device cuda --dtype bf16
    .venv/bin/python benchmarks/trl_sae_step.py --device cpu --dtype fp32 --steps 2   # the embedded model
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
from typing import Any

from bench_out import check_out, write_out
from grpo_step import LORA, N_PROMPTS, json_child, step_timer, trl_config  # the same TRL configuration


def _sums(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append((f"Q: What is {a} + {b}?\nA: Let's think step by step.", a + b))
    return out


def _reward(completions: list[Any], answer: list[int], **_: Any) -> list[float]:
    return [float(str(a) in (c if isinstance(c, str) else str(c))) for c, a in zip(completions, answer)]


def child(which: str, model_path: str, device: str, dtype: str, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    cuda = device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32
    )
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = Dataset.from_list([{"prompt": p, "answer": a} for p, a in _sums(N_PROMPTS)])
    times: list[float] = []
    lengths: list[float] = []
    cfg = trl_config(dtype, steps, use_cpu=not cuda)
    kw: dict[str, Any] = {
        "model": model,
        "reward_funcs": _reward,
        "args": cfg,
        "train_dataset": ds,
        "processing_class": tok,
        "peft_config": LoraConfig(r=16, lora_alpha=32, target_modules=LORA, task_type="CAUSAL_LM"),
        "callbacks": [step_timer(times, lengths, cuda)],
    }
    if which == "trl":
        trainer = GRPOTrainer(**kw)
    else:
        from saereward.features.pack import Feature, FeaturePack
        from saereward.features.scoring import PackScorer
        from saereward.rl.trl import SAEGRPOTrainer
        from saereward.sae.coder import SAEConfig, TopKSAE

        d, layers = model.config.hidden_size, model.config.num_hidden_layers
        layer, m = layers // 2, 16 * d
        sae = TopKSAE(SAEConfig(d_in=d, d_sae=m, k=32, layer=layer), seed=0)
        ids = torch.randperm(m, generator=torch.Generator().manual_seed(0))[:20].tolist()
        pack = FeaturePack(
            "bench", [Feature(i, 1.0) for i in ids[:10]], [Feature(i, -1.0) for i in ids[10:]], layer=layer
        )
        trainer = SAEGRPOTrainer(scorer=PackScorer(sae, pack), layer=layer, lam=0.1, **kw)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = (
        torch.cuda.max_memory_allocated() / 1024**3
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    )
    return {
        "step_times": times[1:],
        "completion_len": statistics.mean(lengths[1:]) if lengths[1:] else None,
        "peak_mem_gb": round(peak, 3),
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF model folder (default: the converted embedded SmolLM2)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per trainer (after 1 warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="run both children this many times, alternating")
    ap.add_argument(
        "--first", default="trl", choices=["trl", "trl+sae"], help="which child runs first in odd rounds"
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=["trl", "trl+sae"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    check_out(args.json, "--json")
    if args.model is None:
        from saereward.model.lm import convert_embedded

        args.model = str(convert_embedded("smollm2-135m-instruct"))
    if args.child:
        print(json.dumps(child(args.child, args.model, args.device, args.dtype, args.steps)))  # noqa: T201
        return
    results: dict[str, list[dict[str, Any]]] = {"trl": [], "trl+sae": []}
    for r in range(args.rounds):
        pair = ("trl", "trl+sae") if args.first == "trl" else ("trl+sae", "trl")
        for which in pair if r % 2 == 0 else pair[::-1]:
            cmd = [sys.executable, __file__, "--child", which, "--model", args.model, "--device", args.device]
            cmd += ["--dtype", args.dtype, "--steps", str(args.steps)]
            res = json_child(cmd, which)
            res["median_step_s"] = statistics.median(res["step_times"])
            results[which].append(res)
            print(  # noqa: T201
                f"{which:8} round {r + 1}: median {res['median_step_s']:.3f} s/step over "
                f"{len(res['step_times'])} steps, peak mem {res['peak_mem_gb']:.2f} GB, "
                f"mean completion {res['completion_len']} tokens, wall {res['wall_s']} s",
                flush=True,
            )
    t = statistics.median(x["median_step_s"] for x in results["trl"])
    s = statistics.median(x["median_step_s"] for x in results["trl+sae"])
    print(  # noqa: T201
        f"\n{results['trl'][0]['device_name']}, {args.dtype}: GRPOTrainer {t:.3f} s/step, "
        f"SAEGRPOTrainer {s:.3f} s/step (median of {args.rounds} round(s) x {args.steps} steps); "
        f"peak mem {results['trl'][0]['peak_mem_gb']:.2f} vs {results['trl+sae'][0]['peak_mem_gb']:.2f} GB"
    )
    write_out(args.json, results)
    print(f"sae_overhead_in_trl={s / t - 1:.3f}")  # noqa: T201


if __name__ == "__main__":
    main()
