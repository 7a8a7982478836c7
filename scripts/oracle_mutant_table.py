"""Print docs/ORACLE.md's mutant table: every shipped mutant run on its case, the first check that
fails, where it is located, and the figures -- measured now, not written by hand.

    python scripts/oracle_mutant_table.py [--tokenizer ../shared/data/opt]

The cases are tests/test_oracle_mutants.py's: the fixtures' two shapes with random weights (a 2-layer
pre-LN model, a 3-layer OPT-350m-style post-LN model with a projection), the stress cases, OPT's
tokenizer, the sampler cases, and the half-precision mutants' two cases
(:func:`refopt.testing.mutants.half_cases`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from refopt.config import OPTConfig
from refopt.testing import checks as C
from refopt.testing.cases import Magnitudes, make_inputs, random_weights, stress_specs
from refopt.testing.modelcase import ModelCase
from refopt.testing.mutants import MUTANTS, half_cases

PRELN = OPTConfig(vocabulary_size=96, num_layers=2, num_heads=4, hidden_dim=16, intermediate_dim=37,
                  max_sequence_length=64, dropout=0.0)
POSTLN_PROJ = OPTConfig(vocabulary_size=96, num_layers=3, num_heads=3, hidden_dim=24, intermediate_dim=40,
                        max_sequence_length=64, dropout=0.0, do_layer_norm_before=False, word_embed_proj_dim=8)


def _case(name, cfg, seed):
    rng = np.random.default_rng(seed)
    params = random_weights(cfg, rng, magnitudes=Magnitudes(0.2))
    return ModelCase(name, cfg, params, *make_inputs(cfg, rng, 3, 11))


def cases():
    out = {"preln": _case("preln", PRELN, 1), "postln_proj": _case("postln_proj", POSTLN_PROJ, 2)}
    out.update({name: spec.build(name) for name, spec in stress_specs().items()})
    out.update(half_cases())
    return out


def location(result) -> str:
    if "codepoint" in result.data:
        return f"U+{result.data['codepoint']:04X} ({result.data['context']!r})"
    if result.data.get("first_divergence"):
        return result.data["first_divergence"]
    if "position" in result.data:
        return f"batch position {result.data['position']} (row {result.data['row']})"
    return "-"


def figures(result) -> str:
    detail = result.detail.split("first divergence: ")[-1].split("first divergence (backward order): ")[-1]
    for marker in ("scaled ", "first difference", "chose", "raised"):
        if marker in detail:
            start = detail.index(marker)
            text = detail[start:start + 90]
            if marker == "scaled ":
                text = text.split(")")[0] + ")"
            return text.replace("|", "/")
    return detail[:90].replace("|", "/")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "opt"))
    args = p.parse_args(argv)
    models = cases()
    tok = C.TokenizerCase(Path(args.tokenizer) / "vocab.json", Path(args.tokenizer) / "merges.txt")
    print("| mutant | case | bug | first failing check | located at | figures / first mismatch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in MUTANTS:
        adapter = m.cls()
        if m.model == "tokenizer":
            suite = C.tokenizer_checks(adapter, tok)
        elif m.model == "samplers":
            suite = C.sampler_checks(adapter)
        else:
            suite = C.model_checks(adapter, models[m.model])
        first = next((r for r in (c.run() for c in suite) if r.status == C.FAIL), None)
        if first is None:
            print(f"| `{m.cls.__name__}` | {m.model} | {m.cls.bug} | NOT CAUGHT | - | - |")
            continue
        check = first.name.split("/")[-1]
        print(f"| `{m.cls.__name__}` | {m.model} | {m.cls.bug} | `{check}` | `{location(first)}` | "
              f"{figures(first)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
