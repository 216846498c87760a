"""``saereward export-sae``: write an SAE in another library's format, for the tools researchers use.

Any SAE :func:`~saereward.sae.formats.load_sae` reads (a native folder, SAELens, sparsify or a
mechreward ``.pt``) is written as:

* ``saelens``: a SAELens 6 TopK folder (``sae_lens.SAE.load_from_disk``); its metadata names the Hugging
  Face model id (``HuggingFaceTB/SmolLM2-135M-Instruct`` for the embedded default) and the hook
  ``blocks.<layer>.hook_resid_post``;
* ``sparsify``: an EleutherAI sparsify folder (``SparseCoder.load_from_disk``), named ``layers.<L>``
  inside ``--out`` because sparsify keeps the layer only in the folder name;
* ``mechreward-pt``: mechreward's ``.pt`` dict (read back with ``torch.load(weights_only=True)``) and
  its ``.json`` sidecar;
* ``native``: saereward's own folder.

Input normalization is folded into the weights where the target format has none, so each export
encodes raw residuals as the source does (``tests/test_export.py`` checks it, with the real packages).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saereward.config import option
from saereward.errors import SaeRewardError
from saereward.sae.formats import load_sae, save_mechreward_pt, save_sae, save_saelens, save_sparsify

ExportFormat = Literal["saelens", "sparsify", "mechreward-pt", "native"]


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``saereward export-sae``."""

    sae: str = option(
        "runs/sae/sae", "SAE to export: a native, SAELens or sparsify folder, or a mechreward .pt"
    )
    format: ExportFormat = option("saelens", "saelens, sparsify, mechreward-pt or native")
    out: str = option("", "where to write: a folder (a .pt file for mechreward-pt); must not exist yet")

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out is required: `saereward export-sae --sae S --format F --out PATH`")


def run_export(cfg: ExportConfig) -> Path:
    """Write ``cfg.sae`` in ``cfg.format`` to ``cfg.out``; returns what was written."""
    out = Path(cfg.out)
    written = [out]
    if cfg.format == "mechreward-pt":  # OUT.pt and its OUT.json sidecar
        if out.suffix not in ("", ".pt") or out.is_dir():
            raise SaeRewardError(f"--out {out}: mechreward's format is a .pt file; pass --out NAME.pt")
        out = out.with_suffix(".pt")
        written = [out, out.with_suffix(".json")]
    for path in written:
        if path.exists():
            raise SaeRewardError(f"{path} exists: pass a new --out (an export never overwrites)")
    if not out.parent.exists():
        raise SaeRewardError(f"{out.parent} does not exist: create it or pass another --out")
    sae = load_sae(cfg.sae)
    if cfg.format == "saelens":
        return save_saelens(sae, out)
    if cfg.format == "sparsify":
        if sae.cfg.layer is None:
            raise SaeRewardError(f"{cfg.sae} records no layer, which sparsify keeps in the folder name")
        return save_sparsify(sae, out / f"layers.{sae.cfg.layer}")
    if cfg.format == "mechreward-pt":
        return save_mechreward_pt(sae, out)
    return save_sae(sae, out)


__all__ = ["ExportConfig", "run_export"]
