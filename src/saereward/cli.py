"""``saereward`` command line: one subcommand per stage.

Every subcommand is declared once in :data:`COMMANDS` with its config dataclass and runner; flags,
``--config FILE.toml`` and ``--set key=value`` are derived from the dataclass (see
:mod:`saereward.config`) and kept in ``cli_schema.json``, so that ``saereward COMMAND --help`` builds its
parser without importing the stage's module or torch. A :class:`~saereward.errors.SaeRewardError` becomes one ``error: ...`` line on
stderr and exit status 2, without a traceback; so does any other exception (status 1), its traceback
shown only with ``SAEREWARD_TRACEBACK=1``. Before a command runs, its ``--out`` is checked: it must be
writable, and a folder where the command writes a folder, a file where it writes one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from saereward import __version__
from saereward.config import add_spec_args, config_from_args, field_specs, option, parse_set
from saereward.errors import SaeRewardError
from saereward.io import check_writable, write_json
from saereward.options import ModelOptions
from saereward.stages import load, step
from saereward.threads import tame_threads, warm_vector_math


@dataclass(frozen=True)
class InfoConfig(ModelOptions):
    """Settings of ``saereward info``."""

    layers: tuple[int, ...] = option((), "capture these layers on --probe text and print residual norms")
    probe: str = option("Q: What is 12 + 30?\nA: 42", "probe text for --layers")


@dataclass(frozen=True)
class TasksConfig:
    """Settings of ``saereward tasks`` (none)."""


def _cmd_eval(cfg: Any) -> int:
    from saereward.analysis.evaluate import format_table, run_eval

    res = run_eval(cfg)
    _echo(format_table([res.summary], title=f"{cfg.model}: accuracy (Wilson 95% CI), seed {cfg.seed}"))
    if cfg.out:
        _echo(f"wrote {cfg.out}/items.jsonl and {cfg.out}/summary.json")
    return 0


def _cmd_baseline(cfg: Any) -> int:
    from saereward.analysis.evaluate import format_table, run_baseline

    summaries = run_baseline(cfg)
    _echo(
        format_table(
            summaries, title=f"{cfg.model}: baseline accuracy, greedy (Wilson 95% CI), seed {cfg.seed}"
        )
    )
    _echo(f"wrote {cfg.out}/baseline.json")
    return 0


def _cmd_info(cfg: Any) -> int:
    from saereward.model.lm import load_model

    lm = load_model(cfg.model, dtype=cfg.dtype)
    n_params = sum(p.numel() for p in lm.model.parameters())
    _echo(
        f"model      {lm.spec}\nsource     {lm.source} ({lm.path})\nclass      {type(lm.model).__name__}\n"
        f"layers     {lm.num_layers} (layer L = output of block L = hidden_states[L+1])\n"
        f"d_model    {lm.d_model}\nvocab      {len(lm.tokenizer)}\nparams     {n_params / 1e6:.1f}M\n"
        f"chat       {'yes' if getattr(lm.tokenizer, 'chat_template', None) else 'no'}"
    )
    if cfg.layers:
        from saereward.model.capture import forward_residuals
        from saereward.model.lm import resolve_layer

        layers = [resolve_layer(lm.model, layer) for layer in cfg.layers]
        enc = lm.tokenizer(cfg.probe, return_tensors="pt")
        res = forward_residuals(lm.model, enc["input_ids"], enc["attention_mask"], layers)
        for layer in layers:
            norms = res[layer][0].norm(dim=-1)
            _echo(f"layer {layer:<4} residual norm per token: mean {norms.mean():.2f}, max {norms.max():.2f}")
    return 0


def _cmd_tasks(cfg: Any) -> int:
    from saereward.tasks import available_tasks

    _echo("\n".join(available_tasks()))
    return 0


def _echo(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cmd_collect(cfg: Any) -> int:
    from saereward.data.collect import run_collect

    out = run_collect(cfg)
    _echo(f"wrote activations to {out} (manifest.json lists shards, tokens and the held-out split)")
    return 0


def _cmd_train_sae(cfg: Any) -> int:
    from saereward.sae.stages import run_train_sae

    out = run_train_sae(cfg)
    _echo(f"wrote SAE to {out}; logs in {cfg.out}/train_log.jsonl, held-out metrics in {cfg.out}/eval.json")
    return 0


def _cmd_eval_sae(cfg: Any) -> int:
    from saereward.sae.stages import format_eval, run_eval_sae

    _echo(format_eval(run_eval_sae(cfg)))
    return 0


def _lazy(module: str, name: str) -> Callable[[], type]:
    """A config class imported on first use (``saereward --help`` stays fast)."""
    return lambda: load(f"{module}:{name}")  # type: ignore[no-any-return]


def _cmd_rollouts(cfg: Any) -> int:
    import json

    from saereward.data.rollouts import run_rollouts

    out = run_rollouts(cfg)
    summary = json.loads((out / "summary.json").read_text())
    for split in ("discovery", "validation"):
        s = summary[split]
        _echo(
            f"{split:10} {s['responses']:>5} responses ({s['questions']} questions): {s['correct']} correct, "
            f"{s['wrong']} wrong, accuracy {s['accuracy']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
        )
    _echo(f"wrote {out}/rollouts.jsonl, pooled.safetensors, tokens.safetensors, splits.json")
    return 0


def _cmd_layers(cfg: Any) -> int:
    from saereward.features.layers import run_layers

    res = run_layers(cfg)
    ranked = sorted(res["scores"].items(), key=lambda kv: -kv[1])[:5]
    _echo(
        f"layer map ({res['split']}, n={res['n_responses']}): peak layer {res['peak_layer']}; top: "
        + ", ".join(f"L{k} {v:.2f}" for k, v in ranked)
    )
    if "logit_lens" in res:
        p = res["logit_lens"]["answer_prob"]
        best = max(range(len(p)), key=p.__getitem__)
        _echo(
            f"logit lens (n={res['logit_lens']['n']}): answer-token probability peaks at L{best} ({p[best]:.3f})"
        )
    _echo(f"wrote {cfg.out or cfg.rollouts}/layer_map.json and layer_map.png")
    return 0


def _cmd_discover(cfg: Any) -> int:
    from saereward.features.discover import format_pack, run_discover

    _echo(format_pack(run_discover(cfg)))
    _echo(f"wrote {cfg.out}")
    return 0


def _cmd_gate_g1(cfg: Any) -> int:
    from saereward.gates.g1_correlation import format_g1, run_gate_g1

    _echo(format_g1(run_gate_g1(cfg)))
    return 0


def _cmd_export_sae(cfg: Any) -> int:
    from saereward.sae.export import run_export

    _echo(f"wrote {run_export(cfg)} ({cfg.format})")
    return 0


def _cmd_push(cfg: Any) -> int:
    from saereward.report.push import run_push

    where = run_push(cfg)
    _echo(f"wrote {where} (dry run: nothing uploaded)" if cfg.dry_run else f"pushed {cfg.path}: {where}")
    return 0


def _cmd_serve_reward(cfg: Any) -> int:
    from saereward.integrations.openrlhf import run_serve_reward

    run_serve_reward(cfg)
    return 0


def _cmd_token_view(cfg: Any) -> int:
    from saereward.features.token_view import format_token_view, run_token_view

    _echo(format_token_view(run_token_view(cfg), cfg.run_dir))
    return 0


def _cmd_train_rl(cfg: Any) -> int:
    from saereward.rl.config import unread_reward_inputs
    from saereward.rl.grpo import run_train_rl

    unread = unread_reward_inputs(cfg)
    if unread:
        flags = " and ".join("--" + k.replace("_", "-") for k in unread)
        raise SaeRewardError(
            f"{flags} would be ignored: --reward {cfg.reward} does not read it; pass the reward that "
            "does (sae: --pack/--sae, direction: --direction-rollouts, either: --dual-verifier) or drop it"
        )
    s = run_train_rl(cfg)
    if s["rank"]:  # data parallel: rank 0 reports
        return 0
    for key in ("eval_first", "eval_last"):
        e = s.get(key)
        if e:
            _echo(
                f"{'before' if key == 'eval_first' else 'after':6} step {e['step']:>4}: held-out accuracy "
                f"{e['eval_accuracy']:.3f} [{e['eval_ci_low']:.3f}, {e['eval_ci_high']:.3f}] "
                f"({e['eval_correct']}/{e['eval_n']})"
            )
    _echo(f"{s['steps']} steps, median {s['seconds_per_step']} s/step; wrote {cfg.out}/")
    return 0


def _cmd_gate_g2(cfg: Any) -> int:
    from saereward.gates.g2_rl_ablation import format_g2, run_gate_g2

    _echo(format_g2(run_gate_g2(cfg)))
    _echo(f"wrote {cfg.out}/gate_g2.json and gate_g2.png")
    return 0


def _cmd_audit_reward(cfg: Any) -> int:
    from saereward.rl.audit import format_audit, run_audit

    _echo(format_audit(run_audit(cfg)))
    _echo(f"wrote {cfg.out}/audit.json and audit.png")
    return 0


def _cmd_reasonscore(cfg: Any) -> int:
    from saereward.features.reasonscore import run_reasonscore

    res = run_reasonscore(cfg)
    _echo(f"ReasonScore over {res['n_tokens']} tokens, {res['n_hits']} reasoning-word hits; top features:")
    for r in res["top"][:10]:
        _echo(f"  {r['feature_id']:>7}  RS {r['reason_score']:.5f}  H {r['entropy']:.3f}")
    return 0


def _cmd_canaries(cfg: Any) -> int:
    from saereward.analysis.hacking import format_canaries, run_canaries

    _echo(format_canaries(run_canaries(cfg)))
    _echo(f"wrote {cfg.out}/canaries.json")
    return 0


def _cmd_probe(cfg: Any) -> int:
    from saereward.features.dual_probe import run_probe

    r = run_probe(cfg)
    h = r["heldout"]
    _echo(
        f"probe at layer {r['layer']}: held-out AUROC {h['auroc']:.3f} [{h['auroc_ci'][0]:.3f}, {h['auroc_ci'][1]:.3f}] "
        f"(n={h['n']}, {h['n_correct']} correct; seed {r['seed']}); trained on {r['n_train']} responses"
    )
    _echo(f"wrote {cfg.out}")
    return 0


def _cmd_monitor(cfg: Any) -> int:
    from saereward.analysis.hacking import format_monitor, run_monitor

    _echo(format_monitor(run_monitor(cfg)))
    _echo(f"wrote {cfg.out}/monitor.json")
    return 0


def _cmd_eval_suite(cfg: Any) -> int:
    from saereward.analysis.evalsuite import format_suite, run_eval_suite

    _echo(format_suite(run_eval_suite(cfg)))
    _echo(f"wrote {cfg.out}/eval_suite.json")
    return 0


def _cmd_gate_g3(cfg: Any) -> int:
    from saereward.gates.g3_safety import format_g3, run_gate_g3

    _echo(format_g3(run_gate_g3(cfg)))
    _echo(f"wrote {cfg.out}/gate_g3.json")
    return 0


def _cmd_steer(cfg: Any) -> int:
    from saereward.analysis.steer import format_steer, run_steer

    _echo(format_steer(run_steer(cfg)))
    _echo(f"wrote {cfg.out}/steer.json and steer.png")
    return 0


def _cmd_drift(cfg: Any) -> int:
    from saereward.analysis.drift import format_drift, run_drift

    _echo(format_drift(run_drift(cfg)))
    _echo(f"wrote {cfg.out}/drift.json and drift.png")
    return 0


def _cmd_report(cfg: Any) -> int:
    from saereward.report.html import run_report

    _echo(f"wrote {run_report(cfg)}")
    return 0


def _cmd_pipeline(cfg: Any) -> int:
    from saereward.pipeline import run_pipeline

    report = run_pipeline(cfg)
    if report.is_file():  # the report stage may not be selected
        _echo(f"report: {report}")
    return 0


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: Callable[[], type]
    run: Callable[[Any], int]
    positional: str | None = None  # a config field also given as the first positional argument


def _stage_command(table: str, run: Callable[[Any], int], positional: str | None = None) -> Command:
    """The subcommand of a pipeline step: name, help and config class from the stage registry."""
    st = step(table)
    return Command(st.command, st.help, lambda: load(st.config), run, positional)  # type: ignore[no-any-return]


COMMANDS: tuple[Command, ...] = (
    Command(
        "baseline",
        "baseline accuracy table of a model (chain_sum prompts + 100 real GSM8K items)",
        _lazy("saereward.analysis.evaluate", "BaselineConfig"),
        _cmd_baseline,
    ),
    Command(
        "eval",
        "evaluate a model on a task: accuracy with a Wilson 95% CI, per-item JSONL",
        _lazy("saereward.analysis.evaluate", "EvalConfig"),
        _cmd_eval,
    ),
    _stage_command("collect", _cmd_collect),
    _stage_command("train_sae", _cmd_train_sae),
    _stage_command("eval_sae", _cmd_eval_sae),
    Command(
        "export-sae",
        "write an SAE as a SAELens, sparsify, mechreward .pt or native checkpoint",
        _lazy("saereward.sae.export", "ExportConfig"),
        _cmd_export_sae,
    ),
    Command(
        "push",
        "upload an SAE folder or a feature pack to the Hugging Face hub, with a generated model card",
        _lazy("saereward.report.push", "PushConfig"),
        _cmd_push,
        positional="path",
    ),
    _stage_command("rollouts", _cmd_rollouts),
    _stage_command("layers", _cmd_layers),
    _stage_command("discover", _cmd_discover),
    _stage_command("gate_g1", _cmd_gate_g1),
    _stage_command("token_view", _cmd_token_view, positional="run_dir"),
    Command(
        "train-rl",
        "GRPO with LoRA: outcome (R0), + per-token SAE pack score (R1) or + raw direction (R2)",
        _lazy("saereward.rl.config", "GRPOConfig"),
        _cmd_train_rl,
    ),
    Command(
        "audit-reward",
        "truncation audit: each reward form's gain from cutting completions after k tokens, or padding them",
        _lazy("saereward.rl.audit", "AuditConfig"),
        _cmd_audit_reward,
    ),
    _stage_command("gate_g2", _cmd_gate_g2),
    _stage_command("probe", _cmd_probe),
    Command(
        "serve-reward",
        "HTTP reward server for OpenRLHF (--reward.remote_url): outcome + lam * mean pack score, per sample",
        _lazy("saereward.integrations.openrlhf", "ServeRewardConfig"),
        _cmd_serve_reward,
    ),
    Command(
        "canaries",
        "reward-hacking canaries (5 patterns): hack/correct/ambiguous rates, base vs trained",
        _lazy("saereward.analysis.hacking", "CanaryConfig"),
        _cmd_canaries,
    ),
    Command(
        "monitor",
        "monitor validity after RL: the G1 statistic on fresh rollouts of base and trained policy",
        _lazy("saereward.analysis.hacking", "MonitorConfig"),
        _cmd_monitor,
    ),
    Command(
        "eval-suite",
        "capability preservation: task, MMLU, MATH-500, GSM8K, base vs trained, paired tests",
        _lazy("saereward.analysis.evalsuite", "EvalSuiteConfig"),
        _cmd_eval_suite,
    ),
    _stage_command("gate_g3", _cmd_gate_g3),
    Command(
        "reasonscore",
        "rank SAE features by ReasonScore (activation around reasoning words, entropy-weighted)",
        _lazy("saereward.features.reasonscore", "ReasonScoreConfig"),
        _cmd_reasonscore,
    ),
    _stage_command("steer", _cmd_steer),
    _stage_command("drift", _cmd_drift),
    _stage_command("report", _cmd_report, positional="run_dir"),
    Command(
        "pipeline",
        "every stage over one run folder from a preset (examples/*.toml); skips finished stages, "
        "resumes killed ones, ends with report.html",
        _lazy("saereward.pipeline", "PipelineConfig"),
        _cmd_pipeline,
    ),
    Command("info", "load a model and print its layers, width and source", lambda: InfoConfig, _cmd_info),
    Command("tasks", "list the available tasks", lambda: TasksConfig, _cmd_tasks),
)


def _chosen(argv: Sequence[str] | None) -> str | None:
    """The subcommand named on the command line (the first word that is one), if any."""
    names = {c.name for c in COMMANDS}
    return next((a for a in (sys.argv[1:] if argv is None else argv) if a in names), None)


#: every subcommand's flags (:func:`saereward.config.field_specs`), so that building a parser imports
#: no stage module (nor torch); ``tests/test_cli.py`` fails when it differs from the config classes
SCHEMA = Path(__file__).with_name("cli_schema.json")


def cli_schema() -> dict[str, list[dict[str, Any]]]:
    """The flags of every subcommand, read from its config class (imports every stage module)."""
    return {cmd.name: field_specs(cmd.config()) for cmd in COMMANDS}


def write_schema() -> Path:
    """Regenerate :data:`SCHEMA` after a config class changed (``python -m saereward.cli_schema``)."""
    write_json(SCHEMA, cli_schema())
    return SCHEMA


def command_specs(cmd: Command) -> list[dict[str, Any]]:
    """``cmd``'s flags from :data:`SCHEMA`, or from its config class when the schema lacks it."""
    try:
        cached = json.loads(SCHEMA.read_text(encoding="utf-8")).get(cmd.name)
    except (OSError, json.JSONDecodeError):
        cached = None
    return cached if cached is not None else field_specs(cmd.config())


class _Parser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (the usage of a command with fifty flags fills a screen and
    hides the message): the problem and where the flags are listed."""

    #: the command named on the line, for the top-level parser's "unrecognized arguments" error
    command: str | None = None

    def error(self, message: str) -> NoReturn:
        prog = f"{self.prog} {self.command}" if self.command else self.prog
        self.exit(2, f"error: {message}; see {prog} --help\n")


def build_parser(argv: Sequence[str] | None = None, *, every: bool = False) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's config is imported for its flags (``every``: all), so
    ``saereward --help`` lists the commands without importing a stage module or torch."""
    chosen = _chosen(argv)
    p = _Parser(
        prog="saereward",
        description="Mechanistic rewards: SAEs on the residual stream, contrastive feature packs, "
        "stage gates, and per-token SAE rewards for GRPO.",
    )
    p.command = chosen
    p.add_argument("--version", action="version", version=f"saereward {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="verbose logging (library warnings too)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        h = cmd.help.replace("%", "%%")
        sp = sub.add_parser(cmd.name, help=h, description=h.replace("%%", "%"))
        if cmd.positional:
            sp.add_argument(
                "pos__" + cmd.positional,
                metavar=cmd.positional.upper(),
                nargs="?",
                default=argparse.SUPPRESS,
                help=f"same as --{cmd.positional.replace('_', '-')}",
            )
        if every or cmd.name == chosen:
            add_spec_args(sp, command_specs(cmd))
        sp.set_defaults(_command=cmd)
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("saereward").setLevel(logging.INFO)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars; our own bars stay
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


#: commands whose ``--out`` is one file (the others write a folder; ``export-sae`` either, by format)
_FILE_OUT = frozenset({"discover", "gate-g1", "probe", "reasonscore", "report"})
#: a file each of these commands writes in its output folder, in the order :func:`_owner` tries them
#: (``train-sae`` before ``train-rl``: both keep a ``train_log.jsonl``)
_MARKERS = {
    "pipeline": "pipeline.json",
    "collect": "manifest.json",
    "rollouts": "rollouts.jsonl",
    "eval": "items.jsonl",
    "train-sae": "data.json",
    "train-rl": "train_log.jsonl",
    "steer": "steer.json",
    "drift": "drift.json",
    "monitor": "monitor.json",
    "canaries": "canaries.json",
    "eval-suite": "eval_suite.json",
    "gate-g3": "gate_g3.json",
    "gate-g2": "gate_g2.json",
    "audit-reward": "audit.json",
}
#: commands that write their own config.json / summary.json into --out: never into another's folder
_OWN_FOLDER = frozenset({*_MARKERS, "baseline"})


def _owner(out: Path) -> tuple[str, str] | None:
    """``(command, marker file)`` of the command whose output ``out`` holds, if any."""
    return next(((c, m) for c, m in _MARKERS.items() if (out / m).is_file()), None)


def _refuse_foreign_folder(command: str, out: Path) -> None:
    """A folder holding another command's output is not overwritten (e.g. ``train-sae --out`` set to
    the activations folder, ``train-rl --out`` to a rollout folder)."""
    if command not in _OWN_FOLDER or not out.is_dir():
        return
    owner = _owner(out)
    if owner is not None and owner[0] != command:
        raise SaeRewardError(
            f"--out {out} holds {owner[0]}'s output ({owner[1]}); {command} would overwrite files there: "
            "pass another --out"
        )


#: the file a one-file command writes by default, by name: the one file of an input folder that its
#: ``--out`` may replace there (its own earlier output)
_OWN_FILE = {
    "discover": "pack.json",
    "gate-g1": "gate_g1.json",
    "probe": "probe.safetensors",
    "reasonscore": "reasonscore.json",
    "report": "report.html",
}


def _refuse_input_overwrite(command: str, cfg: Any, out: Path, flag: str = "--out") -> None:
    """An explicit ``--out`` never replaces one of the command's inputs: an input file itself, or an
    existing file inside an input folder other than the command's own earlier output (e.g. ``discover
    --out`` on the rollout folder's ``rollouts.jsonl``, ``report --out`` on the run's ``pack.json``).
    ``flag`` names the option (report's ``--markdown``: its own earlier output is any ``.md`` file)."""
    if not out.is_file():
        return
    own = out.suffix.lower() == ".md" if flag == "--markdown" else out.name == _OWN_FILE.get(command)
    target = out.resolve()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("out", "markdown") or not isinstance(value, str | os.PathLike) or not str(value):
            continue
        given = Path(value)
        if not given.exists():
            continue
        src = given.resolve()
        if target == src or (src.is_dir() and src in target.parents and not own):
            given_flag = "--" + f.name.replace("_", "-")
            raise SaeRewardError(
                f"{flag} {out} would replace an input ({given_flag} {value}): pass another {flag}"
            )


def check_output(command: str, cfg: Any) -> None:
    """Fail before any work when the command's output cannot be written where ``cfg`` says: a folder
    given where it writes one file, a file where it writes a folder, or a place nothing can be written."""
    out = getattr(cfg, "out", None) or getattr(cfg, "run_dir", None)
    if not isinstance(out, str | os.PathLike) or not str(out):
        return
    p = Path(out)
    if command in _FILE_OUT and p.is_dir() and getattr(cfg, "out", None):
        raise SaeRewardError(f"--out {p} is a folder; {command} writes one file: pass a file path")
    if command not in _FILE_OUT | {"export-sae", "token-view"} and p.is_file():
        raise SaeRewardError(f"--out {p} is a file; {command} writes a folder: pass a folder path")
    _refuse_foreign_folder(command, p)
    if command in _FILE_OUT and getattr(cfg, "out", None):
        _refuse_input_overwrite(command, cfg, p)
    check_writable(p)
    markdown = getattr(cfg, "markdown", None)  # report's second output
    if isinstance(markdown, str | os.PathLike) and str(markdown):
        _refuse_input_overwrite(command, cfg, Path(markdown), flag="--markdown")
        check_writable(markdown, fix="pass another --markdown")


def _os_error_line(exc: OSError) -> str:
    """One line for an OS error: the path, and the check that fits its kind."""
    where = f": {exc.filename}" if exc.filename else ""
    if isinstance(exc, FileNotFoundError):
        fix = "check the path (an input must exist; an output's folder is created)"
    elif isinstance(exc, IsADirectoryError | NotADirectoryError):
        fix = "check the path: a file and a folder are swapped"
    elif isinstance(exc, PermissionError):
        fix = "check the permissions of the path"
    else:
        fix = "check that the path exists, is writable and has free space"
    return f"{exc.strerror or exc}{where}; {fix}"


def _internal_error(exc: BaseException) -> int:
    """One line for an exception that is not one of ours (the traceback with ``SAEREWARD_TRACEBACK=1``):
    a ``ValueError`` is most often an option out of range that a stage checked late; anything else
    may be a bug."""
    if os.environ.get("SAEREWARD_TRACEBACK") == "1":
        raise exc
    if isinstance(exc, ValueError):
        sys.stderr.write(
            f"error: {' '.join(str(exc).split())}; check that option (SAEREWARD_TRACEBACK=1 shows where)\n"
        )
        return 1
    sys.stderr.write(
        f"error: {type(exc).__name__}: {exc}; if the input is fine, please report this "
        "(SAEREWARD_TRACEBACK=1 shows the traceback)\n"
    )
    return 1


def _merge_positional(cmd: Command, args: argparse.Namespace) -> None:
    """The positional (e.g. ``report RUN``) as its flag's value; both given and different is an error
    (one of them would be dropped without a word)."""
    if not cmd.positional or not hasattr(args, "pos__" + cmd.positional):
        return
    value = getattr(args, "pos__" + cmd.positional)
    dest, flag = "cfg__" + cmd.positional, "--" + cmd.positional.replace("_", "-")
    given = [(f"{flag} {getattr(args, dest)}", getattr(args, dest))] if hasattr(args, dest) else []
    # --set is applied after the flags: it would replace the positional without a word
    given += [
        (f"--set {k}={v}", v) for k, v in parse_set(getattr(args, "set", None) or []) if k == cmd.positional
    ]
    for spelled, other in given:
        if str(other) != str(value):
            raise SaeRewardError(f"{cmd.positional.upper()} {value} and {spelled} are both given: pass one")
    setattr(args, dest, value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    cmd: Command = args._command
    try:
        _merge_positional(cmd, args)
        cfg: Any = config_from_args(cmd.config(), args)
        check_output(cmd.name, cfg)
        warm_vector_math()  # before any parallel torch op of the command
        return cmd.run(cfg)
    except SaeRewardError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    except OSError as exc:  # unwritable or missing folder, full disk, read-only file system, ...
        sys.stderr.write(f"error: {_os_error_line(exc)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - one line instead of a traceback (see _internal_error)
        return _internal_error(exc)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


def entry() -> int:
    """The ``saereward`` command: :func:`main` after :func:`~saereward.threads.tame_threads`, which
    must see the environment before torch starts its OpenMP threads. A data-parallel rank ends
    through :func:`exit_rank`."""
    tame_threads()
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        exit_rank(rc)
    return rc


def exit_rank(rc: int) -> NoReturn:
    """End a data-parallel rank (``accelerate launch`` / ``torchrun``) at once, after its work and
    ``destroy_process_group``: output flushed, no interpreter teardown.

    Why: once transformers is imported after the gloo group is joined (every rank loads its model
    then), the group's three gloo threads outlive ``destroy_process_group`` (measured in each rank of
    a 2-process run, torch 2.13 / transformers of ``scripts/setup.sh``; a bare all-reduce script ends
    with none), and their teardown at interpreter exit can abort the rank ("terminate called without
    an active exception", SIGABRT) after a run that finished and wrote everything.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
