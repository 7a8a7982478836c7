"""Reproduce refopt's bundled model, ``data/refopt_shakespeare``.

    python scripts/train_bundled.py --out data/refopt_shakespeare [--corpus PATH] [--backend numba]

Runs :func:`refopt.recipe.train` (the recipe ``refopt train`` uses; every setting is the
default of :class:`refopt.recipe.Recipe`, seed included) on
``../shared/data/corpus/tinyshakespeare.txt``: a byte-level BPE of 512 tokens, then a 7-layer,
256-wide OPT trained on the first 90% of the characters (but their first 5%, kept to fit a
temperature) for 4,000 steps of 32 windows of 256 tokens, validated on the last 10% after every
epoch, with an average of the epochs' parameters; the best validated parameters are shipped, the
temperature folded into them and the position table cut to the 256 positions trained.
``--backend cuda`` trains it on refopt's GPU kernels (its training time is in the preset's card);
the CPU runs the same recipe, slowly.  The preset
(KerasHub layout, tokenizer and preprocessor included), ``MODEL_CARD.md`` and
``refopt_training.json`` replace the preset files in ``--out`` (nothing changes there until the run
has finished).  The same seed gives the same model, up to the floating-point summation order of
the BLAS and the kernels across machines and thread counts.  Progress: ``fit``'s bar on a
terminal, a line per epoch otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "tinyshakespeare.txt"

SUMMARY = ("It writes Shakespeare-flavoured text and knows nothing else: refopt's default model "
           "(`OPTCausalLM.from_preset()` with no argument, and the `refopt` command), for "
           "demonstrations, tests and teaching.")
LIMITS = ("The text is public domain (Shakespeare, via char-rnn's tinyshakespeare). A model of "
          "this size trained on about a megabyte of plays imitates their surface (speaker names in "
          "capitals, verse lines, archaic words) without sense, and reproduces fragments of its "
          "training text. It is reproduced with `python scripts/train_bundled.py --out "
          "data/refopt_shakespeare --backend cuda` from the refopt source tree (`--backend numba` runs "
          "the same recipe on the CPU, slowly).")
USAGE = """```bash
refopt generate "ROMEO:"                        # the default model of the refopt command
refopt generate "ROMEO:" --sampler greedy --max-length 64
```
```python
import refopt
lm = refopt.models.OPTCausalLM.from_preset()     # no argument: this preset
print(lm.generate("ROMEO:", max_length=64))
```"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "data" / "refopt_shakespeare"))
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--backend", default=None, choices=("numpy", "numba", "cuda"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))   # run from a source tree without installing
    from refopt.recipe import Recipe, train
    from refopt.errors import RefoptError

    if not Path(args.corpus).exists():
        print(f"error: {args.corpus} is missing (the project's ../shared data)", file=sys.stderr)
        return 2
    try:
        report = train(args.corpus, args.out, Recipe(), backend=args.backend, overwrite=True,
                       command="python scripts/train_bundled.py --out data/refopt_shakespeare"
                               + (f" --backend {args.backend}" if args.backend else ""),
                       card={"summary": SUMMARY, "limits": LIMITS, "usage": USAGE})
    except RefoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    v = report["validation"]
    print(f"wrote {args.out}: validation loss {v['loss']:.4f} nats/token, perplexity "
          f"{v['perplexity']:.2f}, {report['train_seconds']:.0f} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
