"""SAE trainer: schedule, learning, logs, checkpoints (incl. a real SIGKILL + bit-identical resume), DDP."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saereward.errors import SaeRewardError
from saereward.sae import kernels
from saereward.sae.coder import SAEConfig, TopKSAE, random_directions, random_rotation
from saereward.sae.train import (
    SAETrainConfig,
    SAETrainer,
    latest_checkpoint,
    lr_at,
    plan,
    resample_dead_latents,
)

D = 16
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synthetic(start: int = 0, *, batch: int = 64, d: int = D, rank: int = 4, seed: int = 0):
    """Deterministic low-rank + noise batches; batch ``i`` depends only on ``(seed, i)`` (resumable)."""
    basis = torch.randn(rank * 4, d, generator=torch.Generator().manual_seed(seed))
    i = start
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        z = torch.randn(batch, rank * 4, generator=g) * (torch.rand(batch, rank * 4, generator=g) < 0.25)
        yield z @ basis + 0.05 * torch.randn(batch, d, generator=g) + 1.0
        i += 1


def _cfg(**kw) -> SAETrainConfig:
    base = dict(
        d_sae=64,
        k=4,
        batch_size=64,
        total_tokens=64 * 60,
        warmup_steps=5,
        log_every=5,
        checkpoint_every=0,
        progress=False,
        k_aux=8,
        dead_tokens=10_000,
    )
    base.update(kw)
    return SAETrainConfig(**base)  # type: ignore[arg-type]


def _weights(sae: TopKSAE) -> dict[str, torch.Tensor]:
    return {n: getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


# -- schedule and config ----------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_floor():
    kw = dict(peak=1.0, warmup=10, total=110, floor=0.3)
    lrs = [lr_at(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.3)
    assert lr_at(60, **kw) == pytest.approx(0.65, abs=0.01)  # halfway through the cosine
    assert lr_at(0, peak=1.0, warmup=0, total=5, floor=0.3) == 1.0


def test_config_validation_and_plan():
    with pytest.raises(SaeRewardError, match="k=32"):
        SAETrainConfig(d_sae=16)
    with pytest.raises(SaeRewardError, match="lr_floor"):
        SAETrainConfig(lr_floor=1.5)
    p = plan(SAETrainConfig(total_tokens=10_000, batch_size=4096), d_in=576)
    assert p.d_sae == 16 * 576 and p.total_steps == 3


# -- training ---------------------------------------------------------------------------------------


def test_training_learns_and_writes_logs(tmp_path):
    cfg = _cfg(total_tokens=64 * 80, dead_tokens=64 * 10, lr=3e-3)
    evals = []
    trainer = SAETrainer(cfg, D, run_dir=tmp_path, evaluate=lambda sae: evals.append(1) or {"probe": 1.5})
    first = next(synthetic(0))
    init = TopKSAE(trainer.sae.cfg, seed=cfg.seed)
    sae = trainer.fit(synthetic)
    assert not torch.equal(sae.W_dec, init.W_dec)
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    metrics = [r for r in rows if "fvu" in r]
    assert [r["step"] for r in metrics] == list(range(5, 81, 5))
    assert {"loss", "mse", "fvu", "auxk", "l0", "dead_pct", "lr", "grad_norm", "tokens", "tok_s"} <= set(
        metrics[0]
    )
    assert metrics[-1]["fvu"] < 0.6 * metrics[0]["fvu"] and metrics[-1]["fvu"] < 0.25
    assert metrics[-1]["l0"] <= 4 and metrics[-1]["tokens"] == 64 * 80
    assert rows[-1] == {"step": 80, "eval/probe": 1.5, "final": True} and evals == [1]
    # b_dec started at the geometric median of the first batch (then moved a little)
    assert (sae.b_dec - first.mean(0)).norm() < 0.5 * first.mean(0).norm()
    assert any((tmp_path / "tensorboard").iterdir())
    from saereward.sae.formats import load_sae

    loaded = load_sae(tmp_path / "sae")
    x = next(synthetic(99))
    assert torch.equal(loaded(x).recon, sae(x).recon)


def test_same_seed_same_weights():
    a = SAETrainer(_cfg(total_tokens=64 * 15), D).fit(synthetic)
    b = SAETrainer(_cfg(total_tokens=64 * 15), D).fit(synthetic)
    for name, t in _weights(a).items():
        assert torch.equal(t, getattr(b, name)), name


def test_same_seed_same_checkpoint_state():
    """The checkpoint's global generator states come from the seed, not from the process."""
    import random

    states = []
    for noise in (1, 2):
        random.seed(noise)
        torch.manual_seed(noise)
        tensors, meta = SAETrainer(_cfg(), D)._trainer_state()
        states.append((tensors["rng.torch"], tensors.get("rng.numpy"), meta["rng_python"]))
    (ta, na, pa), (tb, nb, pb) = states
    assert torch.equal(ta, tb) and pa == pb and (na is None or torch.equal(na, nb))


def test_eager_and_fast_kernels_train_alike():
    fast = SAETrainer(_cfg(total_tokens=64 * 60, kernels="fast"), D).fit(synthetic)
    eager = SAETrainer(_cfg(total_tokens=64 * 60, kernels="eager"), D).fit(synthetic)
    x = next(synthetic(500))
    with torch.no_grad():
        assert abs(float(fast(x).fvu) - float(eager(x).fvu)) < 0.03


def test_dead_latents_get_auxk_and_unit_mean_norm_is_stored():
    cfg = _cfg(total_tokens=64 * 30, dead_tokens=64 * 3, normalize_input="unit_mean_norm")
    trainer = SAETrainer(cfg, D)
    sae = trainer.fit(synthetic)
    assert sae.cfg.normalize_input == "unit_mean_norm"
    first = next(synthetic(0))
    assert sae.cfg.input_scale == pytest.approx(1.0 / float(first.norm(dim=1).mean()), rel=1e-5)
    assert trainer.dead_mask().any()  # d_sae=64 on rank-16 data: some latents stay dead
    out = sae(next(synthetic(1)), dead_mask=trainer.dead_mask(), k_aux=8)
    assert out.auxk > 0


def test_dead_latent_counter_matches_boolean_indexing():
    """The sync-free counter (scatter-add, masked_fill_) equals the plain boolean-index version,
    with repeated latent ids and zero activations (selected but not fired) in the batch."""
    from types import SimpleNamespace

    trainer = SAETrainer(_cfg(), D)
    g = torch.Generator().manual_seed(3)
    want = trainer.since_fired.clone()
    for step in range(5):
        ids = torch.randint(0, 24, (40, 4), generator=g)  # latents 24..63 never selected
        acts = torch.rand(40, 4, generator=g) * (torch.rand(40, 4, generator=g) > 0.4)
        trainer._update_dead(SimpleNamespace(top_indices=ids, top_acts=acts), n_tokens=40)
        fired = torch.zeros_like(want, dtype=torch.bool)
        fired[ids[acts > 0]] = True
        want += 40
        want[fired] = 0
        assert torch.equal(trainer.since_fired, want), step
    assert (want[24:] == 200).all() and (want[:24] == 0).any()


def test_remove_parallel_grad_and_clip_run():
    sae = SAETrainer(
        _cfg(total_tokens=64 * 10, remove_parallel_grad=True, grad_clip=0.1, renorm_every=1), D
    ).fit(synthetic)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_warm_start_from_module_and_state_dict(tmp_path):
    src = SAETrainer(_cfg(total_tokens=64 * 5), D).fit(synthetic)
    t = SAETrainer(_cfg(total_tokens=64 * 1, lr=1e-12), D, sae=src)
    out = t.fit(synthetic(7))
    torch.testing.assert_close(out.W_dec, src.W_dec)  # tiny lr: weights carried over, not re-initialized
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _weights(src).items()}, str(tmp_path / "w.safetensors"))
    t2 = SAETrainer(_cfg(total_tokens=64, lr=1e-12, warm_start=str(tmp_path / "w.safetensors")), D)
    torch.testing.assert_close(t2.fit(synthetic(7)).b_dec, src.b_dec)
    with pytest.raises(SaeRewardError, match="d_sae=32"):
        SAETrainer(_cfg(), D, sae=TopKSAE(SAEConfig(d_in=D, d_sae=32, k=4)))


def test_rotate_basis_is_training_on_rotated_data_folded_back(tmp_path):
    """``rotate_basis`` trains exactly as a plain run on ``x @ Q`` would, and every SAE it hands out
    (returned, saved, evaluated) is that run's SAE folded back into the model's basis."""
    seen = []
    cfg = _cfg(total_tokens=64 * 20, rotate_basis=True, eval_every=10)
    trainer = SAETrainer(cfg, D, run_dir=tmp_path, evaluate=lambda sae: seen.append(sae) or {})
    out = trainer.fit(synthetic)
    q = trainer.basis
    assert q is not None and torch.equal(q, random_rotation(D, cfg.seed).float())

    def rotated(start):
        for x in synthetic(start):
            yield x @ q

    plain = SAETrainer(_cfg(total_tokens=64 * 20), D).fit(rotated)
    for name, t in _weights(plain).items():
        assert torch.equal(t, getattr(trainer.sae, name)), name
    x = next(synthetic(99))
    with kernels.use_kernels("eager"):  # exact selection: no bf16 near-ties that rounding could flip
        want = copy.deepcopy(plain).double()((x @ q).double()).recon @ q.t().double()
        got = copy.deepcopy(out).double()(x.double()).recon
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.W_dec.norm(dim=1), trainer.sae.W_dec.norm(dim=1))
    from saereward.sae.formats import load_sae

    assert torch.equal(load_sae(tmp_path / "sae").W_dec, out.W_dec)
    assert len(seen) == 2 and torch.equal(seen[-1].W_dec, out.W_dec)
    warm = SAETrainer(_cfg(total_tokens=64, lr=1e-12, rotate_basis=True), D, sae=out)
    torch.testing.assert_close(warm.fit(synthetic(7)).W_dec, out.W_dec, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotate_new", [False, True])
def test_warm_start_from_a_rotate_basis_checkpoint_folds_it_back(tmp_path, rotate_new):
    """A rotate_basis checkpoint's weights are in the training basis; as a warm start they are read in
    the model's basis (the basis seed travels in the file's metadata), whatever the new run's basis."""
    cfg = _cfg(total_tokens=64 * 20, rotate_basis=True, checkpoint_every=20, seed=3)
    out = SAETrainer(cfg, D, run_dir=tmp_path).fit(synthetic)
    ckpt = tmp_path / "checkpoints" / "step-000000020" / "sae.safetensors"
    new = _cfg(total_tokens=64, lr=1e-12, rotate_basis=rotate_new, warm_start=str(ckpt))
    torch.testing.assert_close(SAETrainer(new, D).fit(synthetic(7)).W_dec, out.W_dec, atol=1e-5, rtol=1e-5)


def test_resample_dead_latents_points_them_at_bad_inputs():
    sae = TopKSAE(SAEConfig(d_in=D, d_sae=64, k=4), seed=0)
    x = next(synthetic(0))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    before = _weights(sae)
    ids = resample_dead_latents(sae, x, dead, torch.Generator().manual_seed(0))
    assert ids.tolist() == [1, 5, 9]
    torch.testing.assert_close(sae.W_dec[ids].norm(dim=1), torch.ones(3))
    assert torch.equal(sae.W_dec[~dead], before["W_dec"][~dead])
    assert (sae.b_enc[ids] == 0).all()
    trainer = SAETrainer(_cfg(total_tokens=64 * 12, dead_tokens=64, resample_dead=True, resample_every=5), D)
    trainer.fit(synthetic)
    assert trainer.state.step == 12


@pytest.mark.parametrize("rotate", [False, True])
def test_in_process_resume_is_bit_identical(tmp_path, rotate):
    full = SAETrainer(_cfg(total_tokens=64 * 30, dead_tokens=64 * 4, rotate_basis=rotate), D).fit(synthetic)

    def stops_after(n):
        def source(start):
            gen = synthetic(start)
            for _ in range(n - start):
                yield next(gen)

        return source

    cfg = _cfg(total_tokens=64 * 30, dead_tokens=64 * 4, checkpoint_every=10, rotate_basis=rotate)
    SAETrainer(cfg, D, run_dir=tmp_path).fit(stops_after(17))  # data "dies" at batch 17
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 10
    resumed_trainer = SAETrainer(cfg, D, run_dir=tmp_path)
    resumed = resumed_trainer.fit(synthetic, resume=True)
    assert resumed_trainer.state.step == 30 and resumed_trainer.state.batches == 30
    for name, t in _weights(full).items():
        assert torch.equal(t, getattr(resumed, name)), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # rows after the checkpoint were replaced


def test_a_lost_latest_pointer_resumes_from_the_newest_complete_checkpoint(tmp_path):
    """Without ``latest.json`` (or with it naming a deleted folder) the run resumes from the newest
    ``step-*`` that was written in full, instead of starting over and rotating the checkpoints away."""

    def nine_batches(start):
        gen = synthetic(start)
        for _ in range(9 - start):
            yield next(gen)

    cfg = _cfg(total_tokens=64 * 12, checkpoint_every=4)
    SAETrainer(cfg, D, run_dir=tmp_path).fit(nine_batches)  # data ends at batch 9: checkpoints 4 and 8
    root = tmp_path / "checkpoints"
    (root / "latest.json").unlink()
    (root / "step-000000012").mkdir()  # a save killed before its trainer.json: not complete
    assert latest_checkpoint(tmp_path) == root / "step-000000008"
    (root / "latest.json").write_text(json.dumps({"step": 12, "path": "step-000000099"}))
    assert latest_checkpoint(tmp_path) == root / "step-000000008"
    shutil.rmtree(root / "step-000000012")
    resumed = SAETrainer(cfg, D, run_dir=tmp_path)
    assert resumed.resume_latest() and resumed.state.step == 8


def test_an_unreadable_latest_checkpoint_resumes_from_the_older_one(tmp_path):
    """A truncated newest checkpoint (a full disk, a kill the atomic writes did not cover) falls back
    to the one before it; with none before it, it is the usual one-line error."""
    cfg = _cfg(total_tokens=64 * 8, checkpoint_every=4)
    SAETrainer(cfg, D, run_dir=tmp_path).fit(synthetic)  # checkpoints at steps 4 and 8
    newest = latest_checkpoint(tmp_path)
    assert newest is not None and newest.name == "step-000000008"
    (newest / "sae.safetensors").write_bytes(b"garbage")
    resumed = SAETrainer(cfg, D, run_dir=tmp_path)
    assert resumed.resume_latest() and resumed.state.step == 4
    shutil.rmtree(tmp_path / "checkpoints" / "step-000000004")
    with pytest.raises(SaeRewardError, match="unreadable"):
        SAETrainer(cfg, D, run_dir=tmp_path).resume_latest()


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    cfg = _cfg(total_tokens=64 * 5, checkpoint_every=5)
    SAETrainer(cfg, D, run_dir=tmp_path).fit(synthetic)
    folder = latest_checkpoint(tmp_path)
    assert folder is not None
    (folder / "trainer.safetensors").write_bytes(b"garbage")
    with pytest.raises(SaeRewardError, match="unreadable"):
        SAETrainer(cfg, D, run_dir=tmp_path).fit(synthetic, resume=True)


def test_resume_refuses_other_settings_but_not_logging_ones(tmp_path):
    """A checkpoint resumes only into the settings it started with (k, expansion, seed, ...); the
    error lists what differs. Logging, checkpoint cadence and progress bars may change."""
    cfg = _cfg(total_tokens=64 * 10, checkpoint_every=5)
    SAETrainer(cfg, D, run_dir=tmp_path).fit(synthetic)
    for change, shown in (
        ({"k": 8}, "k 4 -> 8"),
        ({"d_sae": 128}, "d_sae 64 -> 128"),
        ({"seed": 3}, "seed 0 -> 3"),
    ):
        other = _cfg(total_tokens=64 * 10, checkpoint_every=5, **change)
        with pytest.raises(SaeRewardError, match=rf"other settings \({shown}\).*new --out"):
            SAETrainer(other, D, run_dir=tmp_path).fit(synthetic, resume=True)
    same = _cfg(total_tokens=64 * 10, checkpoint_every=2, log_every=1, progress=False)
    resumed = SAETrainer(same, D, run_dir=tmp_path)
    resumed.fit(synthetic, resume=True)
    assert resumed.state.step == 10


def test_init_dist_reaches_the_sae_and_old_checkpoints_resume_as_normal(tmp_path):
    """``init_dist`` picks the fresh directions; a checkpoint saved before the setting existed was
    trained from normal directions, so it resumes with ``init_dist="normal"`` and refuses ``uniform``."""
    for dist in ("uniform", "normal"):
        sae = SAETrainer(_cfg(init_dist=dist), D).sae
        want = random_directions(64, D, dist, torch.Generator().manual_seed(0)).float()
        assert torch.equal(sae.W_dec, want), dist
    cfg = _cfg(total_tokens=64 * 10, checkpoint_every=5, init_dist="normal")
    SAETrainer(cfg, D, run_dir=tmp_path).fit(synthetic)
    meta_path = latest_checkpoint(tmp_path) / "trainer.json"
    meta = json.loads(meta_path.read_text())
    del meta["train_config"]["init_dist"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SaeRewardError, match=r"other settings \(init_dist 'normal' -> 'uniform'\)"):
        SAETrainer(replace(cfg, init_dist="uniform"), D, run_dir=tmp_path).fit(synthetic, resume=True)
    resumed = SAETrainer(cfg, D, run_dir=tmp_path)
    resumed.fit(synthetic, resume=True)
    assert resumed.state.step == 10


# -- a real kill ------------------------------------------------------------------------------------

SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from saereward.sae.train import SAETrainConfig, SAETrainer
sys.path.insert(0, sys.argv[4])
from test_sae_train import synthetic

run_dir, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])

def source(start):
    for x in synthetic(start):
        time.sleep(delay)
        yield x

cfg = SAETrainConfig(d_sae=64, k=4, batch_size=64, total_tokens=64 * 60, warmup_steps=5, log_every=5,
                     checkpoint_every=5, dead_tokens=64 * 4, k_aux=8, renorm_every=3, resample_dead=True,
                     resample_every=25, progress=False)
SAETrainer(cfg, 16, run_dir=run_dir).fit(source, resume=resume)
"""


def _run(script: Path, run_dir: Path, resume: bool, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [
        sys.executable,
        str(script),
        str(run_dir),
        "1" if resume else "0",
        str(delay),
        str(Path(__file__).parent),
    ]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _run(script, killed, resume=False, delay=0.1)
    reference = _run(script, clean, resume=False, delay=0.0)
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 10:
            break
        assert proc.poll() is None, proc.communicate()[0].decode()
        time.sleep(0.02)
    else:
        pytest.fail("no checkpoint appeared")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "sae").exists()  # it really died mid-run
    resumed = _run(script, killed, resume=True, delay=0.0)
    out_resumed = resumed.communicate(timeout=180)[0].decode()
    out_ref = reference.communicate(timeout=180)[0].decode()
    assert resumed.returncode == 0, out_resumed
    assert reference.returncode == 0, out_ref
    a = load_file(str(killed / "sae" / "weights.safetensors"))
    b = load_file(str(clean / "sae" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- DDP --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_cfg(recon_loss: str) -> SAETrainConfig:
    return _cfg(total_tokens=128, batch_size=64, warmup_steps=0, lr=1e-2, recon_loss=recon_loss)


def _ddp_init() -> dict[str, torch.Tensor]:
    sae = TopKSAE(SAEConfig(d_in=D, d_sae=64, k=4), seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(next(synthetic(0)).mean(0))
    return {k: v.contiguous() for k, v in _weights(sae).items()}


def _after_step(sae: TopKSAE) -> dict[str, torch.Tensor]:
    """Weights and the (all-reduced) gradients the step used."""
    out = {k: v.contiguous() for k, v in _weights(sae).items()}
    out.update({f"grad.{k}": getattr(sae, k).grad.contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
    return out


def _ddp_worker(rank: int, world: int, port: int, out: str, recon_loss: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = next(synthetic(3, batch=128))
        trainer = SAETrainer(_ddp_cfg(recon_loss), D, sae=_ddp_init())
        assert trainer.plan.world_size == world
        trainer.train_step(full[rank * 64 : (rank + 1) * 64])
        if rank == 0:
            from safetensors.torch import save_file

            save_file(_after_step(trainer.sae), out)
        # both ranks done before either tears down: a rank that left while gloo's threads in the other
        # still talked to it aborted that one (SIGABRT, ~1 run in 8 on the 2-core VM)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("recon_loss", ["fvu", "mse"])
def test_ddp_two_shards_equal_one_big_batch(tmp_path, recon_loss):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, recon_loss), nprocs=2, join=True)
    single = SAETrainer(_ddp_cfg(recon_loss), D, sae=_ddp_init())
    single.train_step(next(synthetic(3, batch=128)))
    ddp, ref, init = load_file(out), _after_step(single.sae), _ddp_init()
    for name in init:
        grad = ref[f"grad.{name}"]
        scale = float(grad.abs().max())
        torch.testing.assert_close(ddp[f"grad.{name}"], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert not torch.equal(ref[name], init[name])  # the step did something
        # Adam's first step is lr * sign(g) wherever |g| >> eps; entries whose gradient is rounding
        # noise around 0 may legitimately move the other way, so compare where the sign is clear.
        clear = grad.abs() > 1e-4 * scale
        torch.testing.assert_close(ddp[name][clear], ref[name][clear], rtol=1e-5, atol=1e-6, msg=name)


def test_non_finite_loss_stops_before_any_update(tmp_path):
    """A NaN batch (here at step 12) stops training with one error line; the weights are those after
    step 11 and the checkpoint of step 10 is still the latest, so the run can resume from it."""

    def batches(start, *, poison_at=None, stop_at=None):
        for i, x in enumerate(synthetic(start), start):
            if i == stop_at:
                return
            if i == poison_at:
                x = x.clone()
                x[0] = float("nan")
            yield x

    cfg = _cfg(total_tokens=64 * 30, checkpoint_every=10)
    trainer = SAETrainer(cfg, D, run_dir=tmp_path)
    with pytest.raises(
        SaeRewardError, match=r"diverged at step 12: the loss is nan.*last checkpoint is kept"
    ):
        trainer.fit(lambda start: batches(start, poison_at=12))
    assert trainer.state.step == 12
    assert all(torch.isfinite(w).all() for w in _weights(trainer.sae).values())
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 10
    clean = SAETrainer(_cfg(total_tokens=64 * 30), D).fit(lambda start: batches(start, stop_at=12))
    for name, t in _weights(clean).items():  # steps 0..11 ran exactly as without the bad batch
        assert torch.equal(t, getattr(trainer.sae, name)), name


def _wandb_values(run_file, key):
    """The values of ``key`` in an offline W&B run file, in order (its records are protobuf: a key as
    field 2, the value as JSON in field 16)."""
    import re

    pat = re.compile(rb"\x12[\x01-\x7f]" + re.escape(key.encode()) + rb"\x82\x01[\x01-\x7f]([-+0-9.eE]+)")
    return [float(m) for m in pat.findall(run_file.read_bytes())]


def test_wandb_logging_is_optional_and_offline(tmp_path, monkeypatch):
    """``report_to=("wandb",)`` logs the same rows to a W&B run, here in offline mode (no network),
    with no TensorBoard folder; the JSONL log is written either way."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(total_tokens=64 * 10, dead_tokens=64 * 10, lr=3e-3, report_to=("wandb",))
    SAETrainer(cfg, D, run_dir=tmp_path).fit(synthetic)
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "train_log.jsonl").is_file()
    rid = (tmp_path / "wandb_id.txt").read_text().strip()
    (run,) = (tmp_path / "wandb").glob(f"offline-run-*-{rid}")
    logged = _wandb_values(run / f"run-{rid}.wandb", "fvu")
    rows = [json.loads(r) for r in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    fvu = [r["fvu"] for r in rows if "fvu" in r]
    assert fvu and logged and logged[-1] == pytest.approx(fvu[-1]) and set(fvu) <= set(logged)


def test_a_missing_sink_package_is_said_once_per_process(tmp_path, monkeypatch, caplog):
    """A pipeline trains several runs in one process: the default TensorBoard sink, when its package
    is not installed, warns once, not once per run."""
    import sys

    from saereward import metrics

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(metrics, "_MISSING_SAID", set())
    for name in ("a", "b", "c"):
        sinks = metrics.MetricSinks(tmp_path / name, ["tensorboard"], name=name, config={})
        sinks.log({"loss": 1.0}, 1)
        sinks.close()
    said = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert said == ["tensorboard is not installed (pip install 'saereward[tensorboard]'): not logging to it"]
