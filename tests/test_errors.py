"""Bad input and OS failures end in one clear line, never a traceback."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from saereward.cli import main
from saereward.errors import SaeRewardError
from saereward.io import read_jsonl


def test_truncated_jsonl_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"qid": "a", "correct": true}\n{"qid": "b", "corr')
    with pytest.raises(SaeRewardError, match=r"rollouts.jsonl:2: not valid JSON .*fix that line"):
        read_jsonl(path)
    path.write_text('{"qid": "a"}\n\n{"qid": "b"}\n')
    assert read_jsonl(path) == [{"qid": "a"}, {"qid": "b"}]


def test_json_outputs_are_strict_json(tmp_path: Path) -> None:
    """An undefined statistic (NaN, ±inf) is written as null, so strict parsers (jq, JavaScript)
    read every JSON and JSONL file; nested values and tuples included."""
    from saereward.io import json_text, write_json, write_jsonl

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    obj = {"rho": float("nan"), "ci": (float("-inf"), 0.5), "rows": [{"p": float("inf")}], "n": 3}
    want = {"rho": None, "ci": [None, 0.5], "rows": [{"p": None}], "n": 3}
    write_json(tmp_path / "a.json", obj)
    assert strict((tmp_path / "a.json").read_text()) == want
    write_jsonl(tmp_path / "a.jsonl", [obj, {"x": 1.5}])
    assert [strict(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()] == [want, {"x": 1.5}]
    assert strict(json_text({"p": Path("x")})) == {"p": "x"}  # other objects as their str, as before


def test_an_output_under_a_file_fails_before_the_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output path under a regular file is refused in one line before the command runs."""
    run = tmp_path / "run"
    run.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert main(["report", str(run), "--out", str(blocker / "report.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "blocker is a file, not a folder" in err and "--out" in err
    assert blocker.read_text() == "a file, not a folder"


def _run_tasks_with(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    """Make ``saereward tasks`` call ``run(cfg)`` (a stand-in for any command's work)."""
    import saereward.cli as cli

    commands = tuple(
        cli.Command(c.name, c.help, c.config, run, c.positional) if c.name == "tasks" else c
        for c in cli.COMMANDS
    )
    monkeypatch.setattr(cli, "COMMANDS", commands)


def test_an_os_error_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OS failure during the work (here: the disk fills up) is one line naming the file, exit 1."""

    def full_disk(cfg: object) -> int:
        raise OSError(28, "No space left on device", str(tmp_path / "x.json"))

    _run_tasks_with(monkeypatch, full_disk)
    assert main(["tasks"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No space left on device: ") and "x.json" in err and "\n" not in err
    assert "free space" in err


@pytest.mark.parametrize(
    ("exc", "shown", "hint"),
    [
        (
            ValueError("batch_size must be >= 1, got -1"),
            "error: batch_size must be >= 1, got -1",
            "check that option",
        ),
        (
            RuntimeError("selected index k out of range"),
            "error: RuntimeError: selected index k",
            "please report",
        ),
    ],
)
def test_any_other_exception_is_one_line(
    exc: Exception, shown: str, hint: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that is not one of ours is one line (exit 1); SAEREWARD_TRACEBACK=1 re-raises it."""

    def fails(cfg: object) -> int:
        raise exc

    _run_tasks_with(monkeypatch, fails)
    monkeypatch.delenv("SAEREWARD_TRACEBACK", raising=False)
    assert main(["tasks"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(shown) and hint in err and "\n" not in err and "SAEREWARD_TRACEBACK=1" in err
    monkeypatch.setenv("SAEREWARD_TRACEBACK", "1")
    with pytest.raises(type(exc)):
        main(["tasks"])


def test_foreign_output_folders_are_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train-sae --out`` on the activations, ``eval --out`` on a rollout folder: refused, untouched."""
    acts = tmp_path / "acts"
    acts.mkdir()
    (acts / "manifest.json").write_text("{}")
    (acts / "config.json").write_text('{"keep": 1}')
    assert main(["train-sae", "--activations", str(acts), "--out", str(acts)]) == 2
    assert "holds collect's output (manifest.json)" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "rollouts.jsonl").write_text("")
    assert main(["eval", "--n", "1", "--out", str(ro)]) == 2
    assert "holds rollouts's output (rollouts.jsonl)" in capsys.readouterr().err
    assert (acts / "config.json").read_text() == '{"keep": 1}' and sorted(p.name for p in ro.iterdir()) == [
        "rollouts.jsonl"
    ]


def test_rollouts_refuse_a_folder_made_with_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    out = tmp_path / "ro"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "config.json").write_text(json.dumps({"n": 999}))
    assert main(["rollouts", "--n", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "made with other settings" in err and "pass another --out" in err
    # the library call refuses too, before the task or the model loads
    from saereward.config import to_dict
    from saereward.data.rollouts import RolloutsConfig, run_rollouts

    cfg = RolloutsConfig(n=4, out=str(out), model="no/such-model")
    (out / "config.json").write_text(json.dumps({**to_dict(cfg), "n": 999}))
    with pytest.raises(SaeRewardError, match=r"holds rollouts made with other settings \(n 999 -> 4\)"):
        run_rollouts(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "summary.json"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_output_of_the_wrong_kind_is_refused(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder where a command writes one file, or a file where it writes a folder: refused up front."""
    if kind == "folder":  # discover writes one pack file
        out = tmp_path / "packdir"
        out.mkdir()
        argv = ["discover", "--rollouts", str(tmp_path / "none"), "--out", str(out)]
        want = "is a folder; discover writes one file"
    else:  # rollouts writes a folder
        out = tmp_path / "afile"
        out.write_text("keep me")
        argv = ["rollouts", "--out", str(out)]
        want = "is a file; rollouts writes a folder"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert want in err and "\n" not in err
    if kind == "file":
        assert out.read_text() == "keep me"


def test_check_writable_probes_the_nearest_existing_folder(tmp_path: Path) -> None:
    from saereward.io import check_writable

    check_writable(tmp_path / "a" / "b" / "out.json")  # nothing is created
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(SaeRewardError, match="is a file, not a folder"):
        check_writable(tmp_path / "f" / "out")


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    from saereward.io import write_json

    old = os.umask(0o022)
    try:
        import importlib

        import saereward.io as io_mod

        importlib.reload(io_mod)
        io_mod.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
        importlib.reload(io_mod)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    write_json(tmp_path / "b.json", {})  # the module's own copy still writes


def test_non_utf8_jsonl_and_config_are_one_line(tmp_path: Path) -> None:
    from saereward.config import load_toml

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\n\xff\xfe garbage\n')
    with pytest.raises(SaeRewardError, match=r"bad.jsonl:2: not UTF-8 text"):
        read_jsonl(bad)
    toml = tmp_path / "bad.toml"
    toml.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SaeRewardError, match="not UTF-8 text"):
        load_toml(toml)
    with pytest.raises(SaeRewardError, match="is a folder"):
        load_toml(tmp_path)


def test_a_corrupt_model_folder_is_one_line(tmp_path: Path) -> None:
    """A truncated model.safetensors or a folder without tokenizer files: one line naming the folder."""
    from saereward.model.lm import load_model
    from tiny_models import char_tokenizer, make_tiny

    model, _ = make_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(SaeRewardError, match=r"cannot load the model in .*m .*incomplete or corrupt"):
        load_model(str(tmp_path / "m"))  # no tokenizer files
    char_tokenizer().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SaeRewardError, match=r"cannot load the model in .*SafetensorError"):
        load_model(str(tmp_path / "m"))


def test_truncated_json_and_text_files_are_one_line(tmp_path: Path) -> None:
    from saereward.data.collect import iter_text_documents
    from saereward.io import read_json

    state = tmp_path / "state.json"
    state.write_text('{"step": 3, "lr')
    with pytest.raises(SaeRewardError, match=r"state.json is not valid JSON .*truncated or corrupt"):
        read_json(state)
    txt = tmp_path / "corpus.txt"
    txt.write_bytes(b"fine line\n\xff\xfe\x00 garbage\n")
    with pytest.raises(SaeRewardError, match=r"corpus.txt: not UTF-8 text"):
        list(iter_text_documents(txt))


def test_help_descriptions_show_one_percent_sign(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval-sae", "--help"])
    out = capsys.readouterr().out
    assert "dead %" in out and "%%" not in out


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["serve-reward", "--pack", "p.json", "--port", "99999"], "port must be in 0-65535"),
        (["layers", "--top", "-3"], "top must be >= 1"),
        (["eval-sae", "--max-length", "0"], "max_length must be >= 2"),
        (["train-rl", "--temperature", "0"], "temperature > 0"),
        (["train-rl", "--lora-r", "0"], "lora_r must be >= 1"),
        (["eval", "--sample", "--top-p", "2"], "top_p <= 1"),
        (["rollouts", "--top-p", "0"], "top_p <= 1"),
        (["probe", "--out", "pack.json"], "pass --out NAME.safetensors"),
        (["reasonscore", "--words", "so"], "at least 2 distinct reasoning words"),
        (["token-view", "run", "--max-rollouts", "0"], "max_rollouts must be >= 1"),
        (["tasks", "--set", "foo=1"], "this command takes no settings"),
        (["monitor", "--min-rho", "2"], "min_rho must be in [-1, 1]"),
        (["gate-g3", "--target-accuracy", "1.5"], "target_accuracy is a fraction"),
        (["gate-g3", "--alpha", "0"], "alpha in (0, 1)"),
        (["gate-g2", "--min-seeds", "0"], "min_seeds must be >= 1"),
        (["gate-g2", "--rewards", "outcome", "outcome"], "repeat a reward"),
        (["serve-reward", "--pack", "p.json", "--lam", "-1"], "lam must be >= 0"),
        (["eval-sae", "--eval-tokens", "-1"], "must be >= 0"),
        (["gate-g2", "--rl-out", "x"], "rl.out would be ignored: gate-g2 sets each run's"),
        (["gate-g2", "--rl-seed", "3"], "rl.seed would be ignored"),
        (["train-rl", "--pack", "p.json"], "--pack would be ignored: --reward outcome does not read it"),
        (["token-view", "a", "--run-dir", "b"], "RUN_DIR a and --run-dir b are both given: pass one"),
        (["token-view", "a", "--set", "run_dir=b"], "RUN_DIR a and --set run_dir=b are both given: pass one"),
        (["report", "a", "--set", "run_dir=b"], "RUN_DIR a and --set run_dir=b are both given: pass one"),
        (
            ["train-rl", "--dual-verifier", "p.safetensors"],
            "--dual-verifier would be ignored: --reward outcome",
        ),
        (
            ["train-rl", "--reward", "sae", "--pack", "p.json", "--direction-rollouts", "r"],
            "--direction-rollouts would",
        ),
    ],
)
def test_options_out_of_range_are_refused_before_any_work(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and err.count("\n") == 1


def test_an_unwritable_model_cache_fails_before_the_conversion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("SAEREWARD_CACHE", str(blocker / "cache"))
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "set SAEREWARD_CACHE to a writable folder" in err


def test_a_fraction_for_a_whole_number_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--set", "n=1.5"]) == 2
    assert "n=1.5 is not a whole number" in capsys.readouterr().err


def test_a_missing_math500_dump_is_an_error_not_a_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["eval-suite", "--math500-path", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "none.jsonl is not a file" in capsys.readouterr().err


def test_a_garbage_pt_is_called_corrupt_and_a_bad_host_names_the_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"garbage\n")
    assert main(["eval-sae", "--sae", str(garbage)]) == 2
    assert "not a valid .pt file (truncated or corrupt)" in capsys.readouterr().err
    pack = tmp_path / "p.json"
    pack.write_text("{}")
    assert main(["serve-reward", "--pack", str(pack), "--host", "999.1.1.1"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 999.1.1.1" in err and "check --host" in err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["train-rl", "--reward", "foo"], ["--reward: invalid choice: 'foo'", "saereward train-rl --help"]),
        (["train-rl", "--bogus"], ["unrecognized arguments: --bogus", "saereward train-rl --help"]),
        (["nope"], ["invalid choice: 'nope'", "saereward --help"]),
    ],
)
def test_a_parse_error_is_one_line(
    argv: list[str], names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's errors come without the usage block (fifty flags for train-rl): the problem and
    the command whose --help lists the flags, exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "usage:" not in err
    assert all(n in err for n in names), err


def test_a_layer_the_rollouts_lack_names_why(tmp_path: Path) -> None:
    """A layer past the model's last is out of range (re-running rollouts for it cannot help); a
    layer in range the rollouts did not keep names the rollouts command that keeps it."""
    import torch

    from saereward.data.rollouts import Rollouts

    ro = Rollouts(tmp_path, [], {}, {3: torch.zeros(2, 4)}, None, torch.tensor([0, 2]), {"num_layers": 30})
    assert ro.layer_tokens(3).shape == (2, 4)
    with pytest.raises(SaeRewardError, match=r"--layer 99 is out of range: .* has 30 layers \(0-29\)"):
        ro.layer_tokens(99, "--layer")
    with pytest.raises(
        SaeRewardError, match=r"layers \[3\], not layer 5: re-run `saereward rollouts --token-layers 5`"
    ):
        ro.response_tokens(5, 0)
    # a summary from before num_layers was recorded: the model's own config says how many it has
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2, "hidden_size": 4}')
    old = Rollouts(
        tmp_path, [], {}, {3: torch.zeros(2, 4)}, None, torch.tensor([0, 2]), {"model": str(model)}
    )
    with pytest.raises(SaeRewardError, match=r"--layer 99 is out of range: .* has 2 layers \(0-1\)"):
        old.layer_tokens(99, "--layer")


def test_a_prompt_past_the_context_is_refused() -> None:
    """Prompt plus new tokens past ``max_position_embeddings`` (e.g. ``eval --shots 1000``) is refused
    before the prefill, naming the options that shorten it."""
    from types import SimpleNamespace

    from saereward.model.generate import check_context

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    check_context(model, 8000, 192)  # exactly the context
    with pytest.raises(SaeRewardError, match=r"41449 tokens .* context of 8192 tokens; use fewer --shots"):
        check_context(model, 41449, 4)


def test_an_atomic_write_error_names_the_target_not_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only folder or a full disk while writing is reported on the file asked for (the
    temporary ``.x.json.abc.tmp`` beside it is an implementation detail), and no temp file is left."""
    import errno
    import tempfile

    from saereward.io import atomic_path, write_json

    target = tmp_path / "x.json"

    def read_only(*a: Any, **k: Any) -> Any:
        raise OSError(errno.EACCES, "Permission denied", str(tmp_path / ".x.json.abc.tmp"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(OSError) as exc:
            write_json(target, {})
    assert exc.value.filename == str(target) and exc.value.errno == errno.EACCES
    with pytest.raises(OSError) as exc, atomic_path(target) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert exc.value.filename == str(target) and list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as exc, atomic_path(target):
        raise OSError(errno.ENOENT, "No such file", "/elsewhere")  # another file's error is left as is
    assert exc.value.filename == "/elsewhere"


@pytest.mark.parametrize(
    "text", ["[]", '{"rollouts": 5}', '{"sae": {"config": {}}, "discover": [1]}', "{trunc"]
)
def test_a_stage_record_saereward_did_not_write_is_refused(tmp_path: Path, text: str) -> None:
    """``stages.json`` that is not an object of records (was: a list silently dropped every record
    on the next write; a non-object record an AttributeError)."""
    from saereward.pipeline import _records

    path = tmp_path / "stages.json"
    path.write_text(text)
    with pytest.raises(SaeRewardError, match="is not a stage record saereward wrote: delete it"):
        _records(path)
    assert path.read_text() == text


def test_an_edited_collect_folder_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    """A manifest or config that is not what collect writes (a list, a shard without its file) is one
    line naming the folder, not a KeyError after the model loaded."""
    from saereward.data.collect import CollectConfig, run_collect

    out = tmp_path / "acts"
    out.mkdir()
    (out / "config.json").write_text("{}")
    for manifest in ("[]", '{"shards": [{"n_tokens": 3}]}'):
        (out / "manifest.json").write_text(manifest)
        with pytest.raises(SaeRewardError, match="is not what collect writes"):
            run_collect(CollectConfig(out=str(out), model="no-such-model-is-loaded"))


def test_a_damaged_rl_checkpoint_is_one_line(tmp_path: Path) -> None:
    """A truncated adapter or config in a train-rl checkpoint names the checkpoint and the fix."""
    import json

    from saereward.config import to_dict
    from saereward.rl.checkpoint import restore_checkpoint
    from saereward.rl.config import GRPOConfig

    cfg = GRPOConfig(out=str(tmp_path))
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    (ck / "state.json").write_text(json.dumps({"step": 1}))
    (ck / "config.json").write_text(json.dumps(to_dict(cfg)))  # the same settings
    (ck / "adapter.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(SaeRewardError, match=r"checkpoint .* is unreadable .*--no-resume starts over"):
        restore_checkpoint(tmp_path, cfg, {}, None)  # type: ignore[arg-type]
    (ck / "config.json").write_text('{"lr": 0.1, "lo')
    with pytest.raises(SaeRewardError, match=r"config.json is not valid JSON"):
        restore_checkpoint(tmp_path, cfg, {}, None)  # type: ignore[arg-type]


def test_an_edited_rollout_folder_is_one_line_on_load(tmp_path: Path) -> None:
    """Rows without their fields, offsets past the token rows or a missing ``token_ids`` are refused
    by ``load_rollouts`` (they loaded, then failed in discover as KeyError / index_add_)."""
    import json

    import torch
    from safetensors.torch import save_file

    from saereward.data.rollouts import load_rollouts

    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "summary.json").write_text('{"d_model": 4}')
    save_file({"layer_0": torch.zeros(2, 4)}, str(ro / "pooled.safetensors"))

    def write(rows: list[Any], offsets: list[int], n_ids: int | None) -> None:
        (ro / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        t = {"layer_0": torch.zeros(offsets[-1], 4), "offsets": torch.tensor(offsets)}
        if n_ids is not None:
            t["token_ids"] = torch.zeros(n_ids, dtype=torch.long)
        save_file(t, str(ro / "tokens.safetensors"))

    good = [{"qid": "a", "split": "discovery", "correct": True}] * 2
    write(good, [0, 2, 5], 5)
    assert load_rollouts(ro).offsets[-1] == 5
    write([good[0], {"qid": "b", "split": "discovery"}], [0, 2, 5], 5)
    with pytest.raises(SaeRewardError, match="response 2 lacks qid, split, correct"):
        load_rollouts(ro)
    for offsets, n_ids in (([0, 2, 5], 4), ([0, 2, 5], None), ([0, 3, 2], 2)):
        write(good, offsets, n_ids)
        with pytest.raises(SaeRewardError, match="offsets, token ids and per-token residuals disagree"):
            load_rollouts(ro)


def test_an_adapter_of_another_model_is_refused_before_any_work(tmp_path: Path) -> None:
    """canaries, eval-suite, monitor and G3 check the run's recorded model first (they evaluated the
    base model, minutes of work, before the trained policy's load refused it)."""
    import json

    import torch
    from safetensors.torch import save_file

    from saereward.model.lm import check_adapter

    ck = tmp_path / "run" / "checkpoint"
    ck.mkdir(parents=True)
    save_file({"a": torch.zeros(1)}, str(ck / "adapter.safetensors"))
    (ck / "config.json").write_text(json.dumps({"model": "embedded:smollm2-135m-instruct"}))
    assert check_adapter(tmp_path / "run", "embedded:smollm2-135m-instruct") == ck
    with pytest.raises(
        SaeRewardError, match="was trained on embedded:smollm2-135m-instruct, not other: pass --model"
    ):
        check_adapter(tmp_path / "run", "other")
    with pytest.raises(SaeRewardError, match="no LoRA adapter in"):
        check_adapter(tmp_path, "other")
    assert (
        main(
            ["canaries", "--adapter", str(tmp_path / "run"), "--model", "other", "--out", str(tmp_path / "c")]
        )
        == 2
    )
    assert not (tmp_path / "c").exists()


def test_a_report_of_a_folder_with_no_stage_output_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``report`` on an empty folder, a rollout folder or g2/ wrote an empty report and exited 0."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "rollouts.jsonl").write_text("")
    assert main(["report", str(tmp_path / "ro")]) == 2
    assert "holds no stage output (rollouts/summary.json" in capsys.readouterr().err
    assert not (tmp_path / "ro" / "report.html").exists()


def test_a_cached_evaluation_is_reused_only_for_the_same_adapter_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval-suite and canaries cache evaluations by settings; a run trained again into the same
    folder has the same adapter path but other weights, so its cached evaluation is not reused; a
    moved run folder has other paths but the same weights, so it is."""
    import json

    import saereward.analysis.evaluate as ev
    from saereward.config import to_dict
    from saereward.io import file_sha256

    ck = tmp_path / "run" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "adapter.safetensors").write_bytes(b"weights one")
    (ck / "config.json").write_text("{}")
    cfg = ev.EvalConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "ev"))
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "items.jsonl").write_text('{"correct": true}\n')
    (tmp_path / "ev" / "config.json").write_text(json.dumps(to_dict(cfg)))
    summary = {"adapter_sha256": file_sha256(ck / "adapter.safetensors")}
    (tmp_path / "ev" / "summary.json").write_text(json.dumps(summary))
    ran: list[int] = []
    monkeypatch.setattr(
        ev, "run_eval", lambda c, lm=None: ran.append(1) or ev.EvalResult(summary={}, rows=[])
    )
    assert ev.run_eval_cached(cfg) == [{"correct": True}] and ran == []
    # the run and its evaluation moved together: other paths, the same weights
    import shutil

    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(tmp_path / "run", moved / "run")
    shutil.move(tmp_path / "ev", moved / "ev")
    there = ev.EvalConfig(adapter=str(moved / "run"), out=str(moved / "ev"))
    assert ev.run_eval_cached(there) == [{"correct": True}] and ran == []
    (moved / "run" / "checkpoint" / "adapter.safetensors").write_bytes(b"weights two")
    assert ev.run_eval_cached(there) == [] and ran == [1]


def test_a_data_parallel_rank_ends_with_its_status_and_output(tmp_path: Path) -> None:
    """``exit_rank`` (how the saereward command ends a torchrun / accelerate rank): the exit status
    and everything printed survive skipping the interpreter's teardown."""
    import subprocess
    import sys

    code = "from saereward.cli import exit_rank\nprint('done', flush=False)\nexit_rank(3)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "done\n"


def test_reasonscore_top_past_the_features_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saereward.sae.formats import save_sae
    from tiny_models import random_sae

    save_sae(random_sae(d_sae=16), tmp_path / "sae")
    (tmp_path / "t.txt").write_text("so the answer is 3, therefore 4\n")
    argv = ["reasonscore", "--sae", str(tmp_path / "sae"), "--text-paths", str(tmp_path / "t.txt")]
    assert main([*argv, "--top", "17", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --top 17 is more than the SAE's 16 features: pass --top 16 or less\n"
    assert not (tmp_path / "r.json").exists()


def test_folder_writers_name_the_target_not_their_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SAE folder, an RL snapshot and a probe that cannot be written (read-only folder, full disk)
    report the path asked for, and leave no temporary file or folder behind."""
    import errno
    import tempfile

    import torch

    from saereward.features.probe import LinearProbe
    from saereward.rl.checkpoint import save_snapshot
    from saereward.rl.config import GRPOConfig
    from saereward.sae.formats import save_sae
    from tiny_models import random_sae

    def read_only(*a: Any, prefix: str = "", dir: Any = None, **k: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / f"{prefix}abc"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", read_only)
        with pytest.raises(OSError) as exc:
            save_sae(random_sae(d_sae=16), tmp_path / "sae")
    assert exc.value.filename == str(tmp_path / "sae") and exc.value.errno == errno.EROFS

    def full_disk(tensors: Any, filename: str, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    with monkeypatch.context() as m:
        m.setattr("safetensors.torch.save_file", full_disk)
        with pytest.raises(OSError) as exc:
            save_snapshot(tmp_path / "snap", {"w": torch.zeros(2)}, GRPOConfig(out=str(tmp_path / "rl")))
        assert exc.value.filename == str(tmp_path / "snap")
        probe = LinearProbe(w=torch.zeros(3), b=0.0, mean=torch.zeros(3), scale=torch.ones(3), layer=1)
        with pytest.raises(OSError) as exc:
            probe.save(tmp_path / "probe.safetensors")
        assert exc.value.filename == str(tmp_path / "probe.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_discover_at_a_layer_past_the_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The out-of-range layer is the one thing said: no warning about the SAE's layer comes first."""
    import json

    import torch
    from safetensors.torch import save_file

    from saereward.sae.coder import SAEConfig, TopKSAE
    from saereward.sae.formats import save_sae

    ro, n, t, d = tmp_path / "ro", 8, 4, 8
    ro.mkdir()
    rows = [{"qid": i, "split": "discovery", "correct": i % 2 == 0, "completion": "so"} for i in range(n)]
    (ro / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_file({"layer_3": torch.randn(n, d)}, str(ro / "pooled.safetensors"))
    offsets = torch.arange(0, n * t + 1, t)
    tokens = {"layer_3": torch.randn(n * t, d), "token_ids": torch.arange(n * t), "offsets": offsets}
    save_file(tokens, str(ro / "tokens.safetensors"))
    (ro / "summary.json").write_text(json.dumps({"num_layers": 30, "d_model": d}))
    save_sae(TopKSAE(SAEConfig(d_in=d, d_sae=16, k=2, layer=3)), tmp_path / "sae")
    argv = ["discover", "--rollouts", str(ro), "--sae", str(tmp_path / "sae"), "--layer", "99"]
    assert main([*argv, "--out", str(tmp_path / "pack.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --layer 99 is out of range") and err.count("\n") == 1, err
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_an_out_never_replaces_an_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``discover --out`` on the rollout folder's ``rollouts.jsonl``, ``probe --out`` on its
    ``pooled.safetensors``, ``report --out`` on the run's ``pack.json``: refused before any work, the
    files untouched; the command's own earlier output in that folder may still be replaced."""
    run = tmp_path / "run"
    ro = run / "rollouts"
    ro.mkdir(parents=True)
    files = {ro / "rollouts.jsonl": "{}\n", ro / "pooled.safetensors": "x", run / "pack.json": "{}"}
    for f, text in files.items():
        f.write_text(text)
    sae = tmp_path / "sae"
    sae.mkdir()
    for argv in (
        ["discover", "--rollouts", str(ro), "--sae", str(sae), "--out", str(ro / "rollouts.jsonl")],
        ["probe", "--rollouts", str(ro), "--layer", "1", "--out", str(ro / "pooled.safetensors")],
        ["report", str(run), "--out", str(run / "pack.json")],
        ["gate-g1", "--rollouts", str(ro), "--pack", str(run / "pack.json"), "--out", str(run / "pack.json")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "would replace an input" in err and "pass another --out" in err and "\n" not in err, err
    assert all(f.read_text() == text for f, text in files.items())
    from saereward.cli import check_output
    from saereward.report.html import ReportConfig

    (run / "report.html").write_text("old")  # the report's own file in the run folder: no refusal
    check_output("report", ReportConfig(run_dir=str(run), out=str(run / "report.html")))
    with pytest.raises(SaeRewardError, match="would replace an input"):
        check_output("report", ReportConfig(run_dir=str(run), out=str(ro / "rollouts.jsonl")))
    for target in (run / "pack.json", ro / "rollouts.jsonl"):  # --markdown: the same rule
        with pytest.raises(SaeRewardError, match="--markdown .* would replace an input"):
            check_output("report", ReportConfig(run_dir=str(run), markdown=str(target)))
    (run / "report.md").write_text("old")  # an earlier markdown table of the run: replaced
    check_output("report", ReportConfig(run_dir=str(run), markdown=str(run / "report.md")))
    assert all(f.read_text() == text for f, text in files.items())


def test_a_folder_command_never_writes_into_another_commands_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train-rl --out`` a rollout folder (it replaced the folder's ``config.json`` and
    ``summary.json``, exit 0), ``steer --out`` an activations folder, ``train-sae --out`` a train-rl
    run: refused before any work. A command's own earlier folder is its to resume."""
    import saereward.rl.grpo as grpo
    from saereward.cli import _refuse_foreign_folder

    monkeypatch.setattr(grpo, "load_model", _no_model)
    folders = {
        "ro": "rollouts.jsonl",
        "act": "manifest.json",
        "rl": "train_log.jsonl",
        "pipe": "pipeline.json",
    }
    for name, marker in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}\n")
    cases = [
        (["train-rl", "--steps", "1", "--out", str(tmp_path / "ro")], "holds rollouts's output"),
        (["steer", "--out", str(tmp_path / "act")], "holds collect's output"),
        (
            ["drift", "--run", str(tmp_path / "rl"), "--out", str(tmp_path / "pipe")],
            "holds pipeline's output",
        ),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "pass another --out" in err and "\n" not in err, err
    with pytest.raises(SaeRewardError, match="holds train-rl's output"):
        _refuse_foreign_folder("train-sae", tmp_path / "rl")
    (tmp_path / "rl" / "data.json").write_text("{}")  # a train-sae run keeps a train log too: its own
    _refuse_foreign_folder("train-sae", tmp_path / "rl")
    _refuse_foreign_folder("train-rl", tmp_path / "ro" / "new")  # a new folder, anywhere
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == ["rollouts.jsonl"]


def test_corrupt_adapters_and_token_files_are_one_line_before_the_work(tmp_path: Path) -> None:
    """A truncated adapter fails in :func:`check_adapter`, which monitor, canaries, eval-suite, gate-g3
    and drift call before the base model's work (it failed only when the trained policy loaded, with
    the base pass written); a truncated ``tokens.safetensors`` and a rollout summary without
    ``d_model`` (another command's over it) are one line too (they were internal errors)."""
    import torch
    from safetensors.torch import save_file

    from saereward.data.rollouts import load_rollouts
    from saereward.features.token_view import _read_tokens
    from saereward.model.lm import check_adapter

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": "m"}')
    save_file({"a": torch.zeros(64, 64)}, str(run / "adapter.safetensors"))
    assert check_adapter(run, "m") == run
    data = (run / "adapter.safetensors").read_bytes()
    (run / "adapter.safetensors").write_bytes(data[:1000])
    with pytest.raises(SaeRewardError, match="adapter .* is corrupt"):
        check_adapter(run, "m")
    (tmp_path / "tokens.safetensors").write_bytes(data[:1000])
    with pytest.raises(SaeRewardError, match="cannot read .*tokens.safetensors.*re-run"):
        _read_tokens(tmp_path / "tokens.safetensors", None, 1)
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "rollouts.jsonl").write_text('{"qid": "q", "split": "discovery", "correct": true}\n')
    save_file({"layer_1": torch.zeros(1, 4)}, str(ro / "pooled.safetensors"))
    tokens = {
        "layer_1": torch.zeros(2, 4),
        "offsets": torch.tensor([0, 2]),
        "token_ids": torch.tensor([5, 6]),
    }
    save_file(tokens, str(ro / "tokens.safetensors"))
    (ro / "summary.json").write_text('{"d_model": 4}')
    assert load_rollouts(ro).summary["d_model"] == 4
    (ro / "summary.json").write_text('{"steps": 1}')  # what train-rl --out <rollouts> left there
    with pytest.raises(SaeRewardError, match="records no d_model"):
        load_rollouts(ro)


def test_os_errors_name_the_path_and_the_fitting_check() -> None:
    from saereward.cli import _os_error_line

    missing = _os_error_line(FileNotFoundError(2, "No such file or directory", "in/rollouts.jsonl"))
    assert missing.startswith("No such file or directory: in/rollouts.jsonl; check the path")
    assert "writable" not in missing
    assert "permissions" in _os_error_line(PermissionError(13, "Permission denied", "/x"))
    assert "free space" in _os_error_line(OSError(28, "No space left on device", "/x"))


def test_a_corrupt_rollout_config_names_the_file(tmp_path: Path) -> None:
    from saereward.data.rollouts import Rollouts

    (tmp_path / "config.json").write_text("zz")
    ro = Rollouts(tmp_path, [], {}, {}, None, None, {})
    with pytest.raises(SaeRewardError, match=r"config.json is not valid JSON"):
        _ = ro.generation


def test_report_markdown_path_is_checked_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("file")
    assert main(["report", str(run), "--markdown", str(blocker / "r.md")]) == 2
    err = capsys.readouterr().err
    assert "blocker is a file, not a folder" in err and "--markdown" in err


def test_a_pack_path_that_is_a_folder_says_so(tmp_path: Path) -> None:
    from saereward.features.pack import load_pack

    with pytest.raises(SaeRewardError, match="is a folder: pass the pack's .json file"):
        load_pack(tmp_path)


def _no_model(*a: Any, **k: Any) -> None:
    """A stand-in for ``load_model`` in tests that check the inputs before the model loads."""
    raise AssertionError("the model was loaded")


def test_collect_reads_each_text_files_first_document_before_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A binary ``.txt``, a ``.jsonl`` whose rows lack the text field, or one with no text: one line
    before any model loads (it came after the model load, and in a pipeline after the rollouts)."""
    import saereward.data.collect as collect

    monkeypatch.setattr(collect, "load_model", _no_model)
    cases = {
        "bin.txt": (b"\xff\xfe\x00\x01 binary\n", "not UTF-8 text"),
        "rows.jsonl": (b'{"body": "no text field"}\n', "expected a JSON object with a string field 'text'"),
        "blank.jsonl": (b'{"text": "  "}\n', "holds no text"),
    }
    for name, (data, needle) in cases.items():
        f = tmp_path / name
        f.write_bytes(data)
        out = tmp_path / f"out_{name}"
        assert main(["collect", "--task", "none", "--text-paths", str(f), "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert needle in err and "\n" not in err.strip(), err


def test_train_rl_checks_its_reward_files_before_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing ``--pack`` / ``--reward-baseline`` or a pack that is not JSON: one line before any
    model loads (it came after a model load)."""
    import saereward.rl.grpo as grpo

    monkeypatch.setattr(grpo, "load_model", _no_model)
    garbage = tmp_path / "pack.json"
    garbage.write_text("not json")
    base = ["train-rl", "--reward", "sae", "--steps", "1", "--out", str(tmp_path / "rl")]
    cases = [
        (["--pack", str(tmp_path / "none.json")], "--pack"),
        (["--pack", str(garbage)], "is not valid JSON"),
        (["--pack", str(garbage), "--reward-baseline", str(tmp_path / "nobase.json")], "--reward-baseline"),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err


def test_gate_g2_and_steer_check_their_input_files_before_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """gate-g2's reward files (``--rl-pack``, ``--rl-reward-baseline``, ...) and steer's ``--rollouts``:
    one line before any model loads (they came after a model load), and no output written."""
    import saereward.analysis.steer as steer
    import saereward.gates.g2_rl_ablation as g2

    monkeypatch.setattr(g2, "load_model", _no_model)
    monkeypatch.setattr(steer, "load_model", _no_model)
    garbage = tmp_path / "pack.json"
    garbage.write_text("not json")
    gate = ["gate-g2", "--rewards", "outcome", "sae", "--seeds", "0", "--rl-steps", "1"]
    cases = [
        ([*gate, "--rl-pack", str(tmp_path / "none.json")], "--rl-pack"),
        ([*gate, "--rl-pack", str(garbage)], "is not valid JSON"),
        (
            [*gate, "--rl-pack", str(garbage), "--rl-dual-verifier", str(tmp_path / "v.json")],
            "--rl-dual-verifier",
        ),
        (["steer", "--rollouts", str(tmp_path / "none")], "is not a rollout folder"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main([*args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err, err
        assert not out.exists(), args


def test_a_corrupt_reward_baseline_fails_with_the_reward_files(tmp_path: Path) -> None:
    """The baseline file the fixed-scale forms read is parsed with the other reward files, before the
    model and, under gate-g2, before the truncation audit (it failed after the audit had written)."""
    from saereward.rl.config import GRPOConfig
    from saereward.rl.grpo import check_reward_inputs

    (tmp_path / "ro").mkdir()
    bad = tmp_path / "base.json"
    bad.write_text("[1, 2]")
    cfg = GRPOConfig(reward="direction", direction_rollouts=str(tmp_path / "ro"), reward_baseline=str(bad))
    with pytest.raises(SaeRewardError, match="is not a saereward reward baseline"):
        check_reward_inputs(cfg)
    check_reward_inputs(dataclasses.replace(cfg, reward_form="mechreward"))  # that form reads none
