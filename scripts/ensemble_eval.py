"""The held-out figure of an ensemble of presets trained by the recipe on the same text.

    python scripts/ensemble_eval.py CORPUS PRESET [PRESET ...] [--backend cuda] [--json FILE]

Each preset's own figure (nats per token and per character, :func:`refopt.recipe.token_log_probs`
over the held-out part named by its ``refopt_training.json``, in windows of its training
``sequence_length``), then the ensemble of the first k presets for every k: the model whose
probability of each token is the mean of its members' (:func:`refopt.recipe.ensemble_loss`).
The ensemble bounds what distilling it into one model can reach.  Every preset must share one
tokenizer (the recipe's BPE is deterministic: the same text and vocabulary size give the same
one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("presets", nargs="+")
    ap.add_argument("--backend", default=None, choices=("numpy", "numba", "cuda"))
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from refopt import recipe
    from refopt.models import OPTCausalLM

    text = recipe.read_text(args.corpus)
    rows, log_probs, vocabulary = [], [], None
    for preset in args.presets:
        report = json.loads((Path(preset) / "refopt_training.json").read_text())
        r = report["recipe"]
        _, val_text = recipe.split_text(text, r["validation_fraction"])
        lm = OPTCausalLM.from_preset(preset, backend=args.backend)
        tok = lm.preprocessor.tokenizer
        if vocabulary is None:
            vocabulary, chars = tok.vocabulary, len(val_text)
        elif tok.vocabulary != vocabulary or len(val_text) != chars:
            print(f"error: {preset}: another tokenizer or split than {args.presets[0]}", file=sys.stderr)
            return 2
        ids = np.asarray(tok(val_text), np.int64)
        lp = recipe.token_log_probs(lm, ids, r["sequence_length"])
        log_probs.append(lp)
        k = len(log_probs)
        ens = recipe.ensemble_loss(log_probs)
        rows.append({"preset": preset, "nats_per_token": float(-lp.mean()),
                     "nats_per_character": float(-lp.sum() / chars),
                     "ensemble_of": k, "ensemble_nats_per_token": ens,
                     "ensemble_nats_per_character": ens * len(ids) / chars})
        print(f"{preset}: {-lp.sum() / chars:.4f} nats/char ({-lp.mean():.4f}/token); ensemble of "
              f"the first {k}: {ens * len(ids) / chars:.4f} nats/char", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
