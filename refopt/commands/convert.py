"""``refopt convert SRC DST --format keras|huggingface``: rewrite a preset in the other layout.

SRC is anything ``from_preset`` accepts (a KerasHub preset, a transformers checkpoint directory, a
built-in name, ``bundled``); DST is written atomically (a temporary sibling directory renamed into
place), with the tokenizer when SRC has one.  Weights keep float32 precision (stored float16 /
bfloat16 weights are widened); ``--dtype float64`` keeps float64 checkpoints exact.
"""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a preset between the KerasHub and transformers layouts",
        description="Read a preset (KerasHub, transformers, a built-in name, or 'bundled') and "
                    "write it in the KerasHub or transformers layout, tokenizer included.")
    p.add_argument("src", help="the preset to read ('bundled' for the default model)")
    p.add_argument("dst", help="the directory to write (replaced atomically)")
    p.add_argument("--format", required=True, choices=("keras", "huggingface"),
                   help="the layout to write: keras (config.json, model.weights.h5, tokenizer "
                        "assets) or huggingface (config.json, model.safetensors, vocab.json, "
                        "merges.txt)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="precision of the written weights (default: float32)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from refopt.errors import ConfigError
    from refopt.io import presets
    from refopt.models import OPTCausalLM

    src = presets.bundled_preset_dir() if args.src == "bundled" else args.src
    dst = Path(args.dst).expanduser()
    if dst.exists() and not args.force:
        raise ConfigError(f"{dst} already exists; pass --force to replace it")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"{dst} exists and is not a directory")
    if presets.resolve(src).resolve() == dst.resolve():
        raise ConfigError(f"{dst} is the source preset itself; choose another destination")
    lm = OPTCausalLM.from_preset(src, dtype=args.dtype)
    lm.save_to_preset(dst, format=args.format)
    kind = {"keras": "KerasHub preset", "huggingface": "transformers checkpoint"}[args.format]
    tokenizer = "with its tokenizer" if lm.preprocessor is not None else "without a tokenizer"
    print(f"wrote {dst} ({kind}, {lm.backbone.count_params():,} parameters, {tokenizer})")
    return 0
