"""``saereward push``: upload an SAE folder or a feature pack to the Hugging Face hub, with a model card.

The upload folder holds only safe files (``*.json`` and ``*.safetensors``; never a pickle) and a
generated ``README.md`` (:mod:`saereward.report.card`): metrics, training settings, and the gate
verdicts of the pipeline run the artifact came from (found from its place in the run folder, or
``--run``). ``--dry-run`` writes that folder to ``--out`` and uploads nothing; without the network the
command stops with one error line before anything is sent. Pushed artifacts load back with
``load_sae("hf://owner/repo")`` and ``load_pack("hf://owner/repo/pack.json")``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saereward.config import option
from saereward.errors import SaeRewardError
from saereward.features.baseline import baseline_beside
from saereward.features.pack import load_pack
from saereward.hub import hub_offline, hub_reachable
from saereward.model.lm import hf_model_id
from saereward.report.card import pack_card, sae_card
from saereward.report.gate_sections import dashboard_rows
from saereward.sae.formats import NATIVE_WEIGHTS, load_sae, resolve_sae_path

__all__ = ["PushConfig", "run_push", "stage_upload"]


@dataclass(frozen=True)
class PushConfig:
    """Settings of ``saereward push``."""

    path: str = option("", "what to push: a native SAE folder (RUN/sae/sae) or a pack.json (RUN/pack.json)")
    repo: str = option("", "hub repo to push to: owner/name (created if missing)")
    run: str | None = option(
        None, "run folder whose gate results go in the card (default: the one holding path)"
    )
    dry_run: bool = option(False, "write the folder and card that would be uploaded to --out; upload nothing")
    out: str | None = option(None, "where --dry-run writes (default: ./<name>-upload); must not exist yet")
    private: bool = option(False, "create the repo as private")

    def __post_init__(self) -> None:
        if not self.path or not self.repo:
            raise ValueError("path and repo are required: `saereward push PATH --repo owner/name`")
        parts = self.repo.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"repo {self.repo!r} must look like owner/name")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _gate_rows(cfg: PushConfig, artifact: Path) -> list[list[str]]:
    """The card's gate rows: from ``--run``, which must hold gate results, else from the pipeline run
    folder holding ``artifact`` (if it is in one)."""
    if cfg.run:
        rows = dashboard_rows(Path(cfg.run)) if Path(cfg.run).is_dir() else []
        if not rows:
            raise SaeRewardError(
                f"--run {cfg.run} holds no gate results (gate_g1.json, g2/gate_g2.json, g3/gate_g3.json): "
                "pass the run folder of `saereward pipeline`, or leave --run unset"
            )
        return rows
    for cand in (artifact.parent, artifact.parent.parent):
        if (cand / "stages.json").is_file():
            return dashboard_rows(cand)
    return []


def stage_upload(cfg: PushConfig, folder: Path) -> list[str]:
    """Fill ``folder`` with what ``cfg`` pushes and its card; returns the file names."""
    src = Path(cfg.path).expanduser()
    if src.is_file() and src.suffix == ".json":
        pack = load_pack(src)  # validates it
        files = [src, src.with_name(src.stem + ".config.json"), baseline_beside(src)]
        names = ["pack.json", "pack.config.json", "pack.baseline.json"]
        for f, name in zip(files, names, strict=True):
            if f.is_file():
                shutil.copy2(f, folder / name)
        card = pack_card(cfg.repo, _read(src), _gate_rows(cfg, src), hf_model_id(pack.model_name or ""))
    else:
        sae_dir, fmt = resolve_sae_path(src)
        if fmt != "native" or not (sae_dir / NATIVE_WEIGHTS).is_file():
            raise SaeRewardError(
                f"{src} is a {fmt} SAE: push a native folder (saereward export-sae --format native)"
            )
        sae = load_sae(sae_dir)  # validates it: no pickles, shapes and config agree
        for f in sorted(sae_dir.iterdir()):
            if f.is_file() and f.suffix in (".json", ".safetensors"):
                shutil.copy2(f, folder / f.name)
        card = sae_card(
            cfg.repo,
            _read(sae_dir / "cfg.json"),
            _read(sae_dir / "eval.json"),
            _read(sae_dir / "train_config.json"),
            _gate_rows(cfg, sae_dir),
            hf_model_id(sae.cfg.model) if sae.cfg.model else None,
        )
    (folder / "README.md").write_text(card, encoding="utf-8")
    return sorted(p.name for p in folder.iterdir())


def run_push(cfg: PushConfig) -> str:
    """Push (or, with ``dry_run``, write) the upload folder; returns where it went."""
    if cfg.dry_run:
        out = Path(cfg.out or f"{cfg.repo.split('/')[1]}-upload")
        if out.exists():
            raise SaeRewardError(f"{out} exists: pass a new --out (a dry run never overwrites)")
        tmp = Path(tempfile.mkdtemp(prefix=".push-", dir=out.parent if out.parent.exists() else None))
        try:
            stage_upload(cfg, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.move(str(tmp), str(out))
        return str(out)
    if hub_offline() or not hub_reachable()[0]:
        raise SaeRewardError(
            "cannot reach the Hugging Face hub (offline flag set, or no network): nothing was uploaded; "
            "--dry-run writes the folder and card that would be sent"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="saereward-push-") as staging:
        stage_upload(cfg, Path(staging))
        try:
            api = HfApi()
            api.create_repo(cfg.repo, exist_ok=True, private=cfg.private)
            info = api.upload_folder(repo_id=cfg.repo, folder_path=staging, commit_message="saereward push")
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise SaeRewardError(f"push to {cfg.repo} failed: {str(exc).splitlines()[0]}") from None
    return str(getattr(info, "commit_url", cfg.repo))
