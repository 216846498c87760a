"""Checkpoints of a GRPO run (safetensors + JSON; no pickle): the LoRA weights and optimizer moments
with the step (:func:`save_checkpoint`), resumed by :func:`restore_checkpoint` after checking that the
saved settings compute the same steps (:func:`settings_diff`), and adapter-only snapshots for drift
(:func:`save_snapshot`, :func:`snapshots`). Folders are written to a temp folder and renamed into
place (a kill between the renames resumes from ``checkpoint.old``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saereward import __version__
from saereward.config import to_dict
from saereward.errors import RunMismatch, SaeRewardError
from saereward.io import file_sha256, naming_target, read_json, write_json
from saereward.rl.config import GRPOConfig


def settings_diff(saved: dict[str, Any], cfg: GRPOConfig, same_content: Iterable[str] = ()) -> list[str]:
    """Settings of ``cfg`` that differ from a run's saved ``config.json``, leaving out those that do not
    change what a step computes (``steps`` too, so a longer run resumes a shorter one's checkpoint,
    unless a linear λ schedule spreads over it). ``same_content`` names the reward inputs
    (:func:`reward_inputs` keys) whose files hash as they did: their paths may differ, as in a moved or
    copied run folder (the pack's score pins its SAE too)."""
    mine = to_dict(cfg)  # JSON-plain, as the saved file
    # options added since the run: what such a run did, else today's default
    default = {**to_dict(GRPOConfig()), **_LEGACY}
    skip: tuple[str, ...] = (
        "out",
        "resume",
        "progress",
        "steps",
        "threads",
        "device",
        "snapshot_every",
        "checkpoint_every",
        "report_to",
        "mmap_large_allocations",  # where memory comes from, not what is computed
        "mmap_threshold_kib",
        "rebuild_norms",  # the same values bit for bit, rebuilt instead of kept
    )
    # what another reward's score would read (a moved run folder changes these paths, not the run)
    skip += {"sae": ("direction_rollouts",), "direction": ("pack", "sae")}.get(cfg.reward, ())
    if cfg.reward == "outcome":  # R0 reads no score: how a score would enter changes nothing
        skip += ("reward_form", "reward_clip", "reward_baseline", "aggregation", "pack", "sae", "lam")
        skip += ("direction_rollouts", "dual_verifier", "lam_schedule", "lam_end")
    elif cfg.lam_schedule == "linear":  # λ falls from lam to lam_end over `steps`: another budget, another λ
        skip = tuple(k for k in skip if k != "steps")
    skip += tuple(k for c in same_content for k in _CONTENT_PATHS.get(c, ()))
    return [k for k in mine if k not in skip and saved.get(k, default.get(k)) != mine[k]]


#: the path settings whose files each :func:`reward_inputs` key hashes
_CONTENT_PATHS: dict[str, tuple[str, ...]] = {
    "pack": ("pack", "sae"),
    "direction_rollouts": ("direction_rollouts",),
    "dual_verifier": ("dual_verifier",),
}


def same_inputs(saved: Any, now: dict[str, str]) -> list[str]:
    """The :func:`reward_inputs` keys whose saved hash (a run's ``reward_inputs``) equals ``now``'s."""
    saved = saved if isinstance(saved, dict) else {}
    return [k for k in now if saved.get(k) == now[k]]


#: runs saved before an option existed behaved like this (the reward form was mechreward's; rollouts
#: decoded with MKL's products on merged weights and the reference forward ran on plain weights, other
#: rounding than packed products)
_LEGACY: dict[str, Any] = {"reward_form": "mechreward", "packed_decode": False, "packed_reference": False}
STEP_SEED = 104_729  # torch is seeded with seed * STEP_SEED + step before each step


def reward_inputs(cfg: GRPOConfig) -> dict[str, str]:
    """sha256 of what ``cfg``'s reward reads from local files (the pack's score, which includes its
    SAE's hash; the direction's rollouts; the dual-verifier probe), so that a resume refuses one
    changed at the same path. A hub path (``hf://``) is left out: the hub cache keeps a revision's
    files fixed. The pack counts by its score (:meth:`FeaturePack.score_sha256`): gate-g1 rewriting
    its validation record changes nothing a step computes."""
    from saereward.features.pack import load_pack

    files: dict[str, list[Path]] = {}
    found: dict[str, str] = {}
    if cfg.reward == "sae" and cfg.pack and Path(cfg.pack).is_file():
        found["pack"] = load_pack(cfg.pack).score_sha256()
    if cfg.reward == "direction" and cfg.direction_rollouts:
        ro = Path(cfg.direction_rollouts)
        files["direction_rollouts"] = [ro / "rollouts.jsonl", ro / "pooled.safetensors"]
    if cfg.reward != "outcome" and cfg.dual_verifier:
        files["dual_verifier"] = [Path(cfg.dual_verifier)]
    found.update(
        {
            k: "+".join(file_sha256(p) for p in paths)
            for k, paths in files.items()
            if all(p.is_file() for p in paths)
        }
    )
    return found


def save_checkpoint(
    folder: Path,
    step: int,
    lora: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    cfg: GRPOConfig,
    inputs: dict[str, str] | None = None,
) -> None:
    """Write the LoRA weights, the optimizer state, ``cfg`` and the reward's ``inputs``
    (:func:`reward_inputs`) to ``folder`` (a temp folder renamed into place)."""
    with _staged(folder) as tmp:
        _write_checkpoint(tmp, step, lora, opt, cfg, inputs)


def _write_checkpoint(
    tmp: Path,
    step: int,
    lora: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    cfg: GRPOConfig,
    inputs: dict[str, str] | None,
) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, str(tmp / "adapter.safetensors"))
    state = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in state["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = val
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    write_json(
        tmp / "state.json",
        {
            "step": step,
            "param_groups": state["param_groups"],
            "scalars": scalars,
            # no generator state to store: fit() reseeds torch before every step from (seed, step)
            "rng": f"torch.manual_seed({cfg.seed} * {STEP_SEED} + step) before each step",
            "saereward_version": __version__,
            "reward_inputs": inputs or {},
        },
    )
    write_json(tmp / "config.json", to_dict(cfg))


@contextmanager
def _staged(folder: Path) -> Iterator[Path]:
    """Yield ``<folder>.tmp`` to fill; then swap it in for ``folder``. A kill between the two renames
    leaves the previous contents in ``<folder>.old`` (a checkpoint resumes from there). An OS error on
    the temporary folder (a read-only file system, a full disk) names ``folder``."""
    tmp = folder.with_name(folder.name + ".tmp")
    with naming_target(folder, tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)


def save_snapshot(folder: Path, lora: dict[str, Tensor], cfg: GRPOConfig) -> None:
    """The adapter alone (no optimizer state), written to a temp folder and renamed into place."""
    from safetensors.torch import save_file

    with _staged(folder) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in lora.items()}, str(tmp / "adapter.safetensors")
        )
        write_json(tmp / "config.json", to_dict(cfg))


def snapshots(run: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every adapter snapshot a train-rl run kept, in step order."""
    root = Path(run) / "snapshots"
    found = []
    for d in root.glob("step_*") if root.is_dir() else ():
        if d.name[5:].isdigit() and (d / "adapter.safetensors").is_file():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def load_optimizer(folder: Path, opt: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file

    st = read_json(folder / "state.json")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    for name, v in st["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": st["param_groups"]})
    return int(st["step"])


def _checkpoint_folder(out: Path) -> Path:
    """``out/checkpoint``, or ``checkpoint.old`` where a kill came between save_checkpoint's two renames."""
    ck = out / "checkpoint"
    return ck if (ck / "state.json").is_file() else ck.with_name("checkpoint.old")


def checkpointed_steps(out: str | Path) -> int:
    """How many steps the checkpoint in the run folder ``out`` holds (0: none)."""
    ck = _checkpoint_folder(Path(out))
    if not (ck / "state.json").is_file():
        return 0
    return int(read_json(ck / "state.json", expect=dict).get("step", 0))


def saved_inputs(out: str | Path) -> dict[str, Any]:
    """The :func:`reward_inputs` that the checkpoint in the run folder ``out`` was trained with ({}: none)."""
    ck = _checkpoint_folder(Path(out))
    if not (ck / "state.json").is_file():
        return {}
    saved = read_json(ck / "state.json", expect=dict).get("reward_inputs")
    return saved if isinstance(saved, dict) else {}


def restore_checkpoint(
    out: Path,
    cfg: GRPOConfig,
    lora: dict[str, Tensor],
    opt: torch.optim.Optimizer,
    inputs: dict[str, str] | None = None,
) -> int:
    """Load the run's checkpoint in ``out`` into the LoRA weights ``lora`` and ``opt``; returns its step
    (0 when there is none or ``cfg.resume`` is off). A checkpoint made with settings that change what
    a step computes (:func:`settings_diff`), with reward input files whose content changed since
    (``inputs``, :func:`reward_inputs`) or with another LoRA setup is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ck = _checkpoint_folder(out)
    if not (cfg.resume and (ck / "state.json").is_file()):
        return 0
    state = read_json(ck / "state.json", expect=dict)
    saved = state.get("reward_inputs") or {}
    diff = settings_diff(read_json(ck / "config.json", expect=dict), cfg, same_inputs(saved, inputs or {}))
    if diff:
        raise RunMismatch(
            f"the checkpoint in {ck} was made with different settings ({', '.join(diff[:4])}): "
            "use another --out or --no-resume"
        )
    done = int(state.get("step", 0))
    if done > cfg.steps:
        raise RunMismatch(
            f"the checkpoint in {ck} holds {done} steps, more than steps = {cfg.steps}: pass --steps {done} "
            "or more to finish it, or use another --out"
        )
    changed = sorted(k for k in set(saved) & set(inputs or {}) if saved[k] != (inputs or {})[k])
    if changed:
        raise RunMismatch(
            f"the checkpoint in {ck} was trained with other content in {', '.join(changed)} (the file changed "
            "since, at the same path): use another --out, --no-resume, or the files it started with"
        )
    try:
        weights = load_file(str(ck / "adapter.safetensors"))
        missing = set(lora) ^ set(weights)
        if missing:
            raise SaeRewardError(f"checkpoint {ck} does not match this LoRA setup: use another --out")
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(weights[n])
        return load_optimizer(ck, opt)
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise SaeRewardError(
            f"checkpoint {ck} is unreadable ({type(exc).__name__}: {exc}): --no-resume starts over (or use "
            "another --out)"
        ) from None


__all__ = [
    "STEP_SEED",
    "checkpointed_steps",
    "load_optimizer",
    "restore_checkpoint",
    "reward_inputs",
    "same_inputs",
    "saved_inputs",
    "save_checkpoint",
    "save_snapshot",
    "settings_diff",
    "snapshots",
]
