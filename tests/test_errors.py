"""Bad input and OS failures end in one clear line, never a traceback."""

from __future__ import annotations

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
