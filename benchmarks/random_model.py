"""Write a model folder with the embedded model's shape and tokenizer but random weights.

For benchmarks on a machine that cannot hold the real weights (the GPU machine here takes at most
64 MiB of files per call; SmolLM2-135M's weights are 538 MB in fp32): step times depend on the shape,
not on the weights' values. ``SRC`` is a folder with ``config.json`` and the tokenizer files (by
default the converted embedded model, ``saereward.model.lm.convert_embedded``); ``model.safetensors`` in it is
ignored. Weights are drawn with the config's ``initializer_range`` after ``torch.manual_seed(--seed)``.

    python benchmarks/random_model.py --shape-only .gpu/smollm2-shape   # copy config + tokenizer only
    python benchmarks/random_model.py /tmp/smol-random --src .gpu/smollm2-shape
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def copy_shape(src: Path, dst: Path) -> None:
    """Copy the config and tokenizer files of ``src`` (no weights) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SHAPE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if not (dst / "config.json").is_file():
        raise SystemExit(f"{src} has no config.json: pass a model folder as --src")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst", help="the folder to write")
    ap.add_argument("--src", help="config + tokenizer folder (default: the converted embedded model)")
    ap.add_argument("--shape-only", action="store_true", help="copy config and tokenizer, no weights")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.src:
        src = Path(args.src)
    else:
        from saereward.model.lm import convert_embedded

        src = Path(convert_embedded("smollm2-135m-instruct"))
    dst = Path(args.dst)
    copy_shape(src, dst)
    if args.shape_only:
        print(f"wrote {dst} (config and tokenizer of {src})")  # noqa: T201
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(dst)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst}: {config.model_type}, {n / 1e6:.1f}M parameters, random weights (seed {args.seed})")  # noqa: T201


if __name__ == "__main__":
    main()
