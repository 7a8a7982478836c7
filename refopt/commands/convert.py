"""``refopt convert SRC DST --format keras|huggingface``: rewrite a preset in the other layout.

SRC is anything ``from_preset`` accepts (a KerasHub preset, a transformers checkpoint directory, a
built-in name, ``bundled``); DST gets the preset's files, tokenizer included, written as
:mod:`refopt.io.saving` writes (a kill at any instant leaves DST's old preset or the new one).  An
existing DST needs ``--force``; even then only preset files are written or replaced there.
Weights keep float32 precision (stored float16 / bfloat16 weights are widened); ``--dtype
float64`` keeps float64 checkpoints exact.  A model KerasHub cannot build (post-LayerNorm, a
projection, no biases ...) is written in KerasHub's layout as a refopt preset, and said so.
"""

from __future__ import annotations

import os
from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a preset between the KerasHub and transformers layouts",
        description="Read a preset (KerasHub, transformers, a built-in name, or 'bundled') and "
                    "write it in the KerasHub or transformers layout, tokenizer included.")
    p.add_argument("src", help="the preset to read ('bundled' for the default model)")
    p.add_argument("dst", help="the directory to write (must not exist, unless --force)")
    p.add_argument("--format", required=True, choices=("keras", "huggingface"),
                   help="the layout to write: keras (config.json, model.weights.h5, tokenizer "
                        "assets) or huggingface (config.json, model.safetensors, vocab.json, "
                        "merges.txt)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="precision of the written weights (default: float32)")
    p.add_argument("--force", action="store_true",
                   help="write into DST even if it exists: its preset files are replaced, other "
                        "files are kept")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from refopt.errors import DestinationError
    from refopt.io import presets
    from refopt.models import OPTCausalLM

    src = presets.bundled_preset_dir() if args.src == "bundled" else args.src
    dst = Path(args.dst).expanduser()
    if os.path.lexists(dst) and not args.force:
        raise DestinationError(f"{dst} already exists; pass --force to write the preset files "
                               "there (other files are kept)")
    source = presets.resolve(src)
    if dst.is_dir() and os.path.samefile(source, dst):
        raise DestinationError(f"{dst} is the source preset itself; choose another destination")
    lm = OPTCausalLM.from_preset(source, dtype=args.dtype)
    lm.save_to_preset(dst, format=args.format, overwrite=args.force)
    tokenizer = "with its tokenizer" if lm.preprocessor is not None else "without a tokenizer"
    print(f"wrote {dst} ({presets.layout_label(lm.backbone.config, args.format)}, "
          f"{lm.backbone.count_params():,} parameters, {tokenizer})")
    return 0
