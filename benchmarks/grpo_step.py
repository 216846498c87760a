"""GRPO step time and peak RSS: saereward's trainer vs TRL's ``GRPOTrainer``, same configuration, one run.

Configuration (both sides): SmolLM2-135M-Instruct (embedded), LoRA r=16 (α=32) on
q/k/v/o/gate/up/down, 4 prompts × 4 completions (TRL: ``per_device_train_batch_size=16,
num_generations=4``), 64 new tokens, temperature 0.9, top-p 0.95, β=0.05, lr 1e-5, mechreward's raw
chain_sum prompt (the same 4 questions every step on both sides unless ``--questions N``), no stop
strings on either side (TRL has none), the same dtype on both sides (TRL's
``bf16`` flag set explicitly). Outcome reward = the task verifier on both sides. Each trainer runs
with its own defaults otherwise: TRL checkpoints the training forward's activations
(``gradient_checkpointing=True``); ours accumulates gradients over length-sorted micro-batches of 4
completions without checkpointing and runs each prompt once per forward pass, its KV cache shared
by the group, and decodes with its own loop (``saereward.model.fastdecode``). ``--grad-checkpointing`` /
``--micro-batch N`` / ``--no-share-prompt`` / ``--set KEY=VALUE`` (any ``GRPOConfig`` field) override ours.
``--fixed-length`` makes every completion 64 tokens long on both sides (end tokens masked until then),
so both trainers do the same work whatever their random draws. ``BENCH_MMAP=0`` runs ours without ``mmap_large_allocations`` (glibc's own malloc policy, as TRL
runs), to measure that setting.

Three trainers run in separate child processes, so each peak RSS is its own; one after the other by
default, or with ``--interleave`` side by side, one step at a time: all load at once, then each round
lets each trainer run one step while the others wait on a pipe (the order rotates), so a drift of the
machine's speed during the run reaches all of them alike (on the 2-core Zen 4 VM our step alone moved
by up to 25 % from one minute to the next; see BENCHMARKS.md):

* ``trl``: ``trl.GRPOTrainer`` with the outcome reward only (TRL has no per-token reward), the
  model loaded with ``AutoModelForCausalLM.from_pretrained`` as a TRL user does;
* ``trl+fix`` (``--trl-fix``): the same, plus the two model-level fixes that ``saereward.model.lm.load_model``
  applies: the ``contiguous_lm_head`` hook and, in bf16 on a CPU without bf16 units,
  ``saereward.model.bf16cpu`` (bf16 products through fp32 GEMM); it shows how much of the difference they are;
* ``ours+sae``: saereward with the per-token SAE reward on (R1, the policy's captured residuals);
* ``ours``: saereward with the outcome reward only (the same run without the SAE reward; skipped
  by ``--quick``, where the reward's share is its own timed seconds inside ``ours+sae``).

The SAE for ``ours+sae`` is a random TopK SAE of the real shape (d=576, M=9216, k=32) with a
20-feature pack: the reward's cost does not depend on the weights' values. Each child runs
``--warmup-steps`` untimed steps (default 1) and then ``--steps`` timed steps; we report the median step
time and print every step's. ``--quick`` runs no warm-up step, to stay within 3 minutes on a slow CPU. On
the 2-core development VM the first step took 6-13 % longer than the second for TRL and 1-23 % for ours
(3 runs), so the quick ratio carries that noise (both sides pay it); the recorded figures come from the
full run. Sampled completion
lengths differ between the trainers (different RNG streams), so the mean completion length is
reported next to each time.

    .venv/bin/python benchmarks/grpo_step.py                 # both dtypes, 5 timed steps each
    .venv/bin/python benchmarks/grpo_step.py --quick         # one dtype, 2 timed steps, no warm-up, no "ours" row
    .venv/bin/python benchmarks/grpo_step.py --quick --dtypes bf16   # bf16 only, on any CPU
    .venv/bin/python benchmarks/grpo_step.py --dtypes fp32 --interleave  # steps taken in turns
    .venv/bin/python benchmarks/grpo_step.py --quick --dtypes fp32 --fixed-length  # 64 tokens each

The default order is bf16, fp32 on a CPU with native bf16 (AVX512-BF16 or AMX) and fp32, bf16 on
others, where PyTorch's bf16 products are slow (TRL's bf16 step took 6 min on 2 AVX2 cores; ours
multiplies through fp32 GEMM there, ``saereward.model.bf16cpu``): ``--quick`` runs the first, so it stays
quick there.

The last line is ``step_time_ratio_vs_trl=<ours+sae / trl>`` (the first dtype run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from bench_out import check_out, write_out

LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_PROMPTS, GROUP, NEW_TOKENS = 4, 4, 64


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KB -> GB on Linux


def trl_config(
    dtype: str, steps: int, *, use_cpu: bool = True, warmup: int = 1, fixed_length: bool = False
) -> Any:
    """TRL's ``GRPOConfig`` for the benchmark's configuration (module docstring): ``steps`` + ``warmup``;
    ``fixed_length``: every completion ``NEW_TOKENS`` long (``min_new_tokens``, EOS masked until then)."""
    from trl import GRPOConfig

    return GRPOConfig(
        generation_kwargs={"min_new_tokens": NEW_TOKENS} if fixed_length else None,
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"),
        per_device_train_batch_size=N_PROMPTS * GROUP,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        temperature=0.9,
        top_p=0.95,
        beta=0.05,
        learning_rate=1e-5,
        max_steps=steps + warmup,
        logging_steps=1,
        report_to=[],
        bf16=dtype == "bf16",
        use_cpu=use_cpu,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )


def step_timer(times: list[float], lengths: list[float], cuda: bool = False) -> Any:
    """A ``TrainerCallback`` appending each step's wall time (after a CUDA sync when ``cuda``) to ``times``
    and each logged mean completion length to ``lengths``."""
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            sync()
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN201
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    return Timer()


class StepGate:
    """The child's side of ``--interleave``: before each step it says it is ready (``r``) and waits for
    its turn (``g``); after the step it says so (``d``); after the last one it waits for leave (``x``),
    so that its teardown runs during no other child's timed step. No gate (``spec=None``): no waits."""

    def __init__(self, spec: str | None) -> None:
        self.inp: Any = None
        self.out: Any = None
        if spec:
            r, w = (int(v) for v in spec.split(","))
            self.inp, self.out = os.fdopen(r, "rb", buffering=0), os.fdopen(w, "wb", buffering=0)

    def begin(self) -> None:
        if self.out is not None:
            self.out.write(b"r")
            _expect(self.inp, b"g", "the benchmark parent")

    def end(self, last: bool) -> None:
        if self.out is not None:
            self.out.write(b"d")
            if last:
                _expect(self.inp, b"x", "the benchmark parent")


def _expect(pipe: Any, token: bytes, who: str) -> None:
    got = pipe.read(1)
    if got != token:
        raise SystemExit(f"interleave: expected {token!r} from {who}, got {got!r} (it ended?)")


def gate_callbacks(gate: StepGate) -> tuple[Any, Any]:
    """``TrainerCallback`` s that put TRL's steps through ``gate``: the first goes before the step
    timer in the callback list, the second after it."""
    from transformers import TrainerCallback

    class Begin(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            gate.begin()

    class End(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            gate.end(last=state.global_step >= state.max_steps)

    return Begin(), End()


def child_trl(
    dtype: str,
    steps: int,
    threads: int,
    n_questions: int,
    fix: bool = False,
    warmup: int = 1,
    gate: StepGate | None = None,
    fixed_length: bool = False,
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from saereward.model import bf16cpu
    from saereward.model.lm import contiguous_lm_head, convert_embedded
    from saereward.rl.reward import OutcomeReward
    from saereward.tasks import format_prompt, load_task

    torch.set_num_threads(threads)
    # stock loading, as a TRL user does it (not saereward's load_model, which adds the LM-head hook)
    folder = convert_embedded("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if fix:
        contiguous_lm_head(model)
        bf16cpu.install(model)  # bf16 through fp32 GEMM on a CPU without bf16 units (else no-op)
    task = load_task("chain_sum", n=n_questions, seed=0)
    items = list(task.items())
    ds = Dataset.from_list([{"prompt": format_prompt(task, it, "raw"), "qid": it.id} for it in items])
    times: list[float] = []
    lengths: list[float] = []
    cfg = trl_config(dtype, steps, warmup=warmup, fixed_length=fixed_length)
    for p in model.parameters():
        p.requires_grad_(False)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=OutcomeReward(task),
        args=cfg,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=LORA, task_type="CAUSAL_LM"),
        callbacks=[step_timer(times, lengths)],
    )
    if gate is not None and gate.out is not None:  # --interleave
        first, last = gate_callbacks(gate)
        trainer.add_callback(last)
        trainer.callback_handler.callbacks.insert(0, first)  # before the defaults and the step timer
    trainer.train()
    return {
        "step_times": times[warmup:],
        "warmup_s": times[:warmup],
        "completion_len": statistics.mean(lengths[warmup:]) if lengths[warmup:] else None,
    }


def bench_config(dtype: str, n_questions: int, steps: int, **overrides: Any) -> Any:
    """Our ``GRPOConfig`` for the benchmark's configuration (see the module docstring)."""
    from saereward.rl.config import GRPOConfig

    base: dict[str, Any] = {
        "dtype": "bf16" if dtype == "bf16" else "fp32",
        "task": "chain_sum",
        "n_train": n_questions,
        "n_eval": 1,
        "prompt_format": "raw",
        "questions_per_step": N_PROMPTS,
        "group_size": GROUP,
        "max_new_tokens": NEW_TOKENS,
        "stop_strings": False,
        "temperature": 0.9,
        "top_p": 0.95,
        "beta": 0.05,
        "lr": 1e-5,
        "lora_r": 16,
        "lora_alpha": 32,
        "steps": steps,
        "out": tempfile.mkdtemp(prefix="ours_bench_"),
        "progress": False,
    }
    return GRPOConfig(**{**base, **overrides})


def child_ours(
    dtype: str,
    steps: int,
    threads: int,
    sae_reward: bool,
    workdir: str,
    grad_ckpt: bool | None,
    micro_batch: int | None,
    n_questions: int,
    overrides: dict[str, Any] | None = None,
    warmup: int = 1,
    gate: StepGate | None = None,
) -> dict[str, Any]:
    import torch

    from saereward.model.lm import load_model
    from saereward.rl.grpo import GRPOTrainer

    torch.set_num_threads(threads)
    kw: dict[str, Any] = {}
    if sae_reward:
        # mechreward's form needs no reward baseline measured first; per step it costs what the
        # default position form costs (one subtraction and a clip per token more there)
        kw = {
            "reward": "sae",
            "pack": str(Path(workdir) / "pack.json"),
            "layer": 15,
            "reward_form": "mechreward",
        }
    cfg = bench_config(
        dtype,
        n_questions,
        steps + warmup,
        mmap_large_allocations=os.environ.get("BENCH_MMAP", "1") == "1",
        **kw,
        **({} if grad_ckpt is None else {"grad_checkpointing": grad_ckpt}),
        **({} if micro_batch is None else {"micro_batch": micro_batch}),
        **(overrides or {}),
    )
    tr = GRPOTrainer(cfg, lm=load_model(dtype=cfg.dtype))
    gate = gate or StepGate(None)
    rows = []
    for s in range(steps + warmup):
        gate.begin()
        rows.append(tr.step(s))
        gate.end(last=s == steps + warmup - 1)
    return {
        "step_times": [r["sec_step"] for r in rows[warmup:]],
        "warmup_s": [r["sec_step"] for r in rows[:warmup]],
        "reward_seconds": [r["sec_reward"] for r in rows[warmup:]],
        "completion_len": statistics.mean(r["completion_len"] for r in rows[warmup:]),
    }


def make_pack(workdir: Path) -> None:
    import torch

    from saereward.features.pack import Feature, FeaturePack, save_pack
    from saereward.sae.coder import SAEConfig, TopKSAE
    from saereward.sae.formats import save_sae

    sae = TopKSAE(
        SAEConfig(d_in=576, d_sae=9216, k=32, layer=15, model="embedded:smollm2-135m-instruct"), seed=0
    )
    save_sae(sae, workdir / "sae")
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(9216, generator=g)[:20].tolist()
    pack = FeaturePack(
        "bench",
        [Feature(i, 1.0) for i in ids[:10]],
        [Feature(i, -1.0) for i in ids[10:]],
        layer=15,
        model_name="embedded:smollm2-135m-instruct",
        metadata={"d_model": 576, "d_sae": 9216, "sae_path": str(workdir / "sae")},
    )
    save_pack(pack, workdir / "pack.json")


def child_cmd(
    which: str, dtype: str, steps: int, threads: int, workdir: Path, extra: list[str], warmup: int
) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--child",
        which,
        "--dtypes",
        dtype,
        "--steps",
        str(steps),
        "--warmup-steps",
        str(warmup),
        "--threads",
        str(threads),
        "--workdir",
        str(workdir),
        *extra,
    ]


def _child_env() -> dict[str, str]:
    """The environment of a benchmark child: ours, quiet tokenizers and hub progress bars."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class _Kid(NamedTuple):
    label: str
    proc: subprocess.Popen[bytes]
    go: Any  # our end of its "your turn" pipe
    said: Any  # our end of its "ready" / "done" pipe
    out: Any
    err: Any


def _spawn(label: str, cmd: list[str], env: dict[str, str], files: contextlib.ExitStack) -> _Kid:
    go_r, go_w = os.pipe()
    said_r, said_w = os.pipe()
    # closed by ``files`` (an ExitStack) when the run ends
    out = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
    err = files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
    gate = f"{go_r},{said_w}"
    proc = subprocess.Popen([*cmd, "--gate", gate], pass_fds=(go_r, said_w), stdout=out, stderr=err, env=env)
    os.close(go_r)
    os.close(said_w)
    return _Kid(
        label, proc, os.fdopen(go_w, "wb", buffering=0), os.fdopen(said_r, "rb", buffering=0), out, err
    )


def _tail(f: Any, n: int) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")[-n:]


def run_interleaved(cmds: dict[str, list[str]], rounds: int) -> dict[str, dict[str, Any]]:
    """Run the children ``cmds`` (label -> command) side by side, one step at a time (``--interleave``).

    All children load at once; then each round lets each child run one step while the others wait
    (the order rotates from round to round), so a drift of the machine's speed reaches every trainer
    alike. A child's code between two steps also runs while the others wait. Returns each child's
    JSON result, as :func:`json_child` does."""
    env = _child_env()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as files:
        kids = [_spawn(label, cmd, env, files) for label, cmd in cmds.items()]
        try:
            for kid in kids:
                _expect(kid.said, b"r", f"child {kid.label}")  # loaded, at its first step
            for rnd in range(rounds):
                for kid in kids[rnd % len(kids) :] + kids[: rnd % len(kids)]:
                    kid.go.write(b"g")
                    _expect(kid.said, b"d", f"child {kid.label}")
                    if rnd + 1 < rounds:
                        _expect(kid.said, b"r", f"child {kid.label}")
            for kid in kids:
                kid.go.write(b"x")
        except SystemExit:
            for kid in kids:
                kid.proc.kill()
                sys.stderr.write(f"--- {kid.label}\n{_tail(kid.err, 3000)}")
            raise
        results = {}
        for kid in kids:
            if kid.proc.wait() != 0:
                sys.stderr.write(_tail(kid.err, 4000))
                raise SystemExit(f"child {kid.label} failed (exit {kid.proc.returncode})")
            results[kid.label] = json.loads(_tail(kid.out, 1 << 20).strip().splitlines()[-1])
            results[kid.label]["wall_s"] = round(time.perf_counter() - t0, 1)
    return results


def json_child(cmd: list[str], label: str) -> dict[str, Any]:
    """Run a benchmark child process; returns the JSON object on its last stdout line plus ``wall_s``."""
    env = _child_env()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {label} failed (exit {proc.returncode})")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def print_child(which: str, dt: str, r: dict[str, Any]) -> None:
    reward = (
        f", reward {100 * statistics.median(r['reward_seconds']) / r['median_step_s']:.2f} % of the step"
        if r.get("reward_seconds")
        else ""
    )
    print(  # noqa: T201
        f"{which:9} {dt}: median {r['median_step_s']:.2f} s/step over {len(r['step_times'])} steps "
        f"(warm-up {', '.join(f'{w:.2f}' for w in r['warmup_s']) or 'none'}; "
        f"timed {', '.join(f'{w:.2f}' for w in r['step_times'])} s; child {r['wall_s']:.0f} s wall), "
        f"peak RSS {r['peak_rss_gb']:.2f} GB, mean completion {r['completion_len']:.1f} tokens{reward}",
        flush=True,
    )


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as GRPOConfig overrides (JSON values; anything else as a string)."""
    out: dict[str, Any] = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--set {kv!r}: expected KEY=VALUE, e.g. --set fast_decode=false")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Ours' GRPOConfig overrides: ``--share-prompt`` and ``--set``."""
    out = parse_sets(args.set)
    if args.share_prompt is not None:
        out["share_prompt"] = args.share_prompt
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="2 timed steps and no warm-up step, the first of --dtypes only"
    )
    ap.add_argument("--steps", type=int, default=5, help="timed steps per trainer (after the warm-up)")
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="untimed steps before the timed ones (default 1; 0 under --quick)",
    )
    ap.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated, run in this order; --quick runs only the first (default: bf16,fp32 on a "
        "CPU with native bf16, else fp32,bf16: TRL's bf16 is several times slower on AVX2-only CPUs)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ours with / without activation checkpointing of the training forward (default: ours, off)",
    )
    ap.add_argument("--micro-batch", type=int, help="ours: completions per forward (default: ours, 4)")
    ap.add_argument(
        "--share-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ours with / without one prompt forward per question (its KV cache shared by the "
        "group; default: ours, on)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ours: a GRPOConfig override (JSON value), e.g. --set fast_decode=false; repeatable",
    )
    ap.add_argument(
        "--trl-fix",
        action="store_true",
        help="also run TRL with saereward's model fixes: the contiguous LM-head hook, and bf16 products "
        "through fp32 GEMM on a CPU without bf16 units (the trl+fix row)",
    )
    ap.add_argument(
        "--questions",
        type=int,
        default=N_PROMPTS,
        help="both trainers draw each step's 4 prompts from the same first N chain_sum questions "
        "(default 4: the same 4 prompts every step on both sides, so their work differs only by the "
        "sampled completion lengths; 200 was the setting before 2026-11-29)",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="run the trainers side by side, one step at a time, each waiting while another steps "
        "(every trainer sees the same drift of the machine's speed; peak RSS stays per process)",
    )
    ap.add_argument(
        "--fixed-length",
        action="store_true",
        help=f"every completion on both sides {NEW_TOKENS} tokens long (end tokens masked until then: "
        "TRL's generation_kwargs min_new_tokens, our min_new_tokens), so both do the same work whatever "
        "their random draws",
    )
    ap.add_argument("--child", choices=["trl", "trl+fix", "ours", "ours+sae"], help=argparse.SUPPRESS)
    ap.add_argument("--gate", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    return ap


def _run_child(args: argparse.Namespace) -> None:
    """One trainer's child process: its steps, then one JSON line on stdout."""
    if args.child in ("trl", "trl+fix"):
        res = child_trl(
            args.dtypes,
            args.steps,
            args.threads,
            args.questions,
            fix=args.child == "trl+fix",
            warmup=args.warmup_steps,
            gate=StepGate(args.gate),
            fixed_length=args.fixed_length,
        )
    else:
        res = child_ours(
            args.dtypes,
            args.steps,
            args.threads,
            args.child == "ours+sae",
            args.workdir,
            args.grad_checkpointing,
            args.micro_batch,
            args.questions,
            _overrides(args),
            warmup=args.warmup_steps,
            gate=StepGate(args.gate),
        )
    res["peak_rss_gb"] = round(_peak_rss_gb(), 3)
    print(json.dumps(res))  # noqa: T201


def _child_flags(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The flags both trainers' children get, and those ours gets."""
    common = ["--questions", str(args.questions)]  # both trainers
    if args.fixed_length:
        common.append("--fixed-length")
        args.set.append(f"min_new_tokens={NEW_TOKENS}")
    extra = list(common)  # ours only, below
    if args.grad_checkpointing is not None:
        extra.append("--grad-checkpointing" if args.grad_checkpointing else "--no-grad-checkpointing")
    if args.micro_batch is not None:
        extra += ["--micro-batch", str(args.micro_batch)]
    if args.share_prompt is not None:
        extra.append("--share-prompt" if args.share_prompt else "--no-share-prompt")
    for kv in args.set:
        extra += ["--set", kv]
    return common, extra


def _run_trainers(args: argparse.Namespace, dtypes: list[str], steps: int) -> dict[str, dict[str, Any]]:
    """Every trainer's child per dtype (one after the other, or ``--interleave``); ``{"<trainer>/<dtype>": result}``."""
    common, extra = _child_flags(args)
    workdir = Path(tempfile.mkdtemp(prefix="grpo_bench_"))
    make_pack(workdir)
    results: dict[str, dict[str, Any]] = {}
    for dt in dtypes:
        # --quick skips "ours" (the reward off): the reward's own seconds are timed inside ours+sae
        ours_off = () if args.quick else ("ours",)
        trainers = ("trl", "ours+sae", *ours_off, *(("trl+fix",) if args.trl_fix else ()))
        cmds = {
            w: child_cmd(
                w,
                dt,
                steps,
                args.threads,
                workdir,
                extra if w.startswith("ours") else common,
                args.warmup_steps,
            )
            for w in trainers
        }
        if args.interleave:
            print(f"{dt}: {', '.join(trainers)} interleaved, one step at a time", flush=True)  # noqa: T201
            ran = run_interleaved(cmds, steps + args.warmup_steps)
        else:
            ran = {w: json_child(cmds[w], f"{w} ({dt})") for w in trainers}
        for which in trainers:
            r = ran[which]
            r["median_step_s"] = statistics.median(r["step_times"])
            results[f"{which}/{dt}"] = r
            print_child(which, dt, r)
    return results


def _print_summary(results: dict[str, dict[str, Any]], dtypes: list[str], threads: int) -> float:
    """The summary table; returns the first dtype's time ratio (ours+sae / TRL)."""
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {threads}"
    )  # noqa: T201
    print(
        f"{'dtype':6} {'trl s/step':>10} {'ours+sae':>9} {'ours':>7} {'ratio':>6} {'reward %':>9} "  # noqa: T201
        f"{'RSS trl':>8} {'RSS ours':>9} {'RSS ratio':>9} {'tokens trl/ours':>15}"
    )
    first_ratio = None
    for dt in dtypes:
        t, s = results[f"trl/{dt}"], results[f"ours+sae/{dt}"]
        o = results.get(f"ours/{dt}", {"median_step_s": float("nan")})
        ratio = s["median_step_s"] / t["median_step_s"]
        overhead = statistics.median(s["reward_seconds"]) / s["median_step_s"]
        first_ratio = first_ratio if first_ratio is not None else ratio
        print(
            f"{dt:6} {t['median_step_s']:>10.2f} {s['median_step_s']:>9.2f} {o['median_step_s']:>7.2f} "  # noqa: T201
            f"{ratio:>6.2f} {100 * overhead:>8.2f}% {t['peak_rss_gb']:>8.2f} {s['peak_rss_gb']:>9.2f} "
            f"{s['peak_rss_gb'] / t['peak_rss_gb']:>9.2f} "
            f"{t['completion_len']:>7.1f}/{s['completion_len']:<7.1f}"
        )
        if abs(t["completion_len"] - s["completion_len"]) > 0.05 * t["completion_len"]:
            # TRL decodes and trains the padded batch, so its step hardly changes with the lengths; ours
            # does: scaling the ratio by the lengths would misstate it
            print(  # noqa: T201
                f"{dt:6} the trainers sampled completions of different mean length: --fixed-length "
                "compares them at equal work"
            )
        if f"trl+fix/{dt}" in results:
            f = results[f"trl+fix/{dt}"]
            print(  # noqa: T201
                f"{dt:6} trl+fix {f['median_step_s']:.2f} s/step, RSS {f['peak_rss_gb']:.2f} GB; "
                f"ours+sae / trl+fix = {s['median_step_s'] / f['median_step_s']:.2f}"
            )
    return first_ratio if first_ratio is not None else float("nan")


def main() -> None:
    args = _parser().parse_args()
    check_out(args.json, "--json")
    if args.warmup_steps is None:
        args.warmup_steps = 0 if args.quick else 1
    if args.warmup_steps < 0:
        raise SystemExit("--warmup-steps must be 0 or more")
    if args.dtypes is None:
        from saereward.model.lm import resolve_dtype

        args.dtypes = "bf16,fp32" if resolve_dtype("auto") == "bf16" else "fp32,bf16"
    if args.child:
        _run_child(args)
        return
    steps = 2 if args.quick else args.steps
    if steps < 1:
        raise SystemExit("--steps must be at least 1")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes:
        raise SystemExit("--dtypes names no dtype: give e.g. --dtypes fp32")
    dtypes = dtypes[:1] if args.quick else dtypes
    results = _run_trainers(args, dtypes, steps)
    first_ratio = _print_summary(results, dtypes, args.threads)
    write_out(args.json, results)
    print(f"step_time_ratio_vs_trl={first_ratio:.3f}")  # noqa: T201


if __name__ == "__main__":
    main()
