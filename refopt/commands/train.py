"""``refopt train TEXT_FILE``: the bundled model's recipe (:mod:`refopt.recipe`) on any
UTF-8 text file; this module only parses the arguments."""

from __future__ import annotations

import dataclasses
import sys

from refopt.commands import warn_if_simulated


def add_parser(subparsers):
    from refopt.recipe import Recipe

    d = Recipe()
    p = subparsers.add_parser(
        "train", help="train a small OPT and its tokenizer on a text file (the bundled recipe)",
        description="Train a byte-level BPE tokenizer and a small OPT on a UTF-8 text file with the "
                    "recipe of the bundled model (first 90% trains, last 10% validates), show "
                    "progress, and write a KerasHub preset with a model card at the end.")
    p.add_argument("text_file", help="a UTF-8 text file")
    p.add_argument("--out", default="refopt_model", help="output preset directory (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace the preset files in --out if it exists (other files are kept)")
    p.add_argument("--backend", choices=("auto", "numpy", "numba", "cuda"), default=None,
                   help="compute backend (default: REFOPT_BACKEND or the fastest available; cuda "
                        "trains device-resident)")
    g = p.add_argument_group("recipe (defaults: the bundled model's)")
    for field in dataclasses.fields(Recipe):
        default = getattr(d, field.name)
        kind = float if isinstance(default, float) else int
        g.add_argument("--" + field.name.replace("_", "-"), type=kind, default=default,
                       metavar=field.name.upper() if field.name != "max_steps" else "N",
                       help=f"(default: {default})")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from refopt.recipe import Recipe, train

    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    backend = None if args.backend in (None, "auto") else args.backend
    warn_if_simulated("train", backend)
    command = "refopt train " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else None
    report = train(args.text_file, args.out, recipe, backend=backend, command=command,
                   overwrite=args.force)
    v, b = report["validation"], report["baselines"]
    print(f"wrote {args.out}: {report['parameters']:,} parameters, {report['steps']} steps in "
          f"{report['train_seconds']:.0f} s; validation loss {v['loss']:.4f} nats/token, "
          f"{v['nats_per_character']:.4f} nats/character (perplexity {v['perplexity']:.2f}; bigram "
          f"{b['bigram_witten_bell']['perplexity']:.2f}, unigram {b['unigram_add_one']['perplexity']:.2f})")
    return 0
