"""Checkpoints of a GRPO run (safetensors + JSON; no pickle): the LoRA weights and optimizer moments
with the step (:func:`save_checkpoint`), resumed by :func:`restore_checkpoint` after checking that the
saved settings compute the same steps (:func:`settings_diff`), and adapter-only snapshots for drift
(:func:`save_snapshot`, :func:`snapshots`). Folders are written to a temp folder and renamed into
place (a kill between the renames resumes from ``checkpoint.old``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saereward import __version__
from saereward.config import to_dict
from saereward.errors import SaeRewardError
from saereward.io import read_json, write_json
from saereward.rl.config import GRPOConfig


def settings_diff(saved: dict[str, Any], cfg: GRPOConfig) -> list[str]:
    """Settings of ``cfg`` that differ from a run's saved ``config.json``, leaving out those that do not
    change what a step computes (``steps`` too: a longer run resumes a shorter one's checkpoint)."""
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
    )
    if cfg.reward == "outcome":  # R0 reads no score: how a score would enter changes nothing
        skip += ("reward_form", "reward_clip", "reward_baseline", "aggregation", "pack", "sae", "lam")
    return [k for k in mine if k not in skip and saved.get(k, default.get(k)) != mine[k]]


#: runs saved before an option existed behaved like this (the reward form was mechreward's)
_LEGACY: dict[str, Any] = {"reward_form": "mechreward"}
STEP_SEED = 104_729  # torch is seeded with seed * STEP_SEED + step before each step


def save_checkpoint(
    folder: Path, step: int, lora: dict[str, Tensor], opt: torch.optim.Optimizer, cfg: GRPOConfig
) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
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
        },
    )
    write_json(tmp / "config.json", to_dict(cfg))
    if folder.exists():  # a kill between the two renames leaves the previous checkpoint in .old
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

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, str(tmp / "adapter.safetensors"))
    write_json(tmp / "config.json", to_dict(cfg))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


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


def restore_checkpoint(
    out: Path, cfg: GRPOConfig, lora: dict[str, Tensor], opt: torch.optim.Optimizer
) -> int:
    """Load the run's checkpoint in ``out`` into the LoRA weights ``lora`` and ``opt``; returns its step
    (0 when there is none or ``cfg.resume`` is off). A checkpoint made with settings that change what
    a step computes (:func:`settings_diff`) or with another LoRA setup is refused."""
    from safetensors.torch import load_file

    ck = out / "checkpoint"
    if not (ck / "state.json").is_file():  # killed between save_checkpoint's two renames
        ck = ck.with_name("checkpoint.old")
    if not (cfg.resume and (ck / "state.json").is_file()):
        return 0
    diff = settings_diff(json.loads((ck / "config.json").read_text()), cfg)
    if diff:
        raise SaeRewardError(
            f"the checkpoint in {ck} was made with different settings ({', '.join(diff[:4])}): "
            "use another --out or --no-resume"
        )
    weights = load_file(str(ck / "adapter.safetensors"))
    missing = set(lora) ^ set(weights)
    if missing:
        raise SaeRewardError(f"checkpoint {ck} does not match this LoRA setup: use another --out")
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(weights[n])
    return load_optimizer(ck, opt)


__all__ = [
    "STEP_SEED",
    "load_optimizer",
    "restore_checkpoint",
    "save_checkpoint",
    "save_snapshot",
    "settings_diff",
    "snapshots",
]
