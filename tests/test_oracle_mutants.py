"""Evidence that the oracle catches real bugs: every mutant adapter (refopt.testing.mutants) fails,
first at the check it should, and the divergence locator names the right tensor (or position, or
byte); the correct adapters pass the same checks."""

import numpy as np
import pytest

from conftest import shared_path
from refopt.config import OPTConfig
from refopt.testing import checks as C
from refopt.testing.adapter import RefoptAdapter
from refopt.testing.cases import Magnitudes, make_inputs, random_weights, stress_specs
from refopt.testing.modelcase import ModelCase
from refopt.testing.mutants import MUTANTS, half_cases

# the shapes of the transformers fixtures (../shared/fixtures/hf): a pre-LN model and an
# OPT-350m-style post-LN model with project_in/out, random weights of the fixtures' scale
PRELN = OPTConfig(vocabulary_size=96, num_layers=2, num_heads=4, hidden_dim=16, intermediate_dim=37,
                  max_sequence_length=64, dropout=0.0)
POSTLN_PROJ = OPTConfig(vocabulary_size=96, num_layers=3, num_heads=3, hidden_dim=24, intermediate_dim=40,
                        max_sequence_length=64, dropout=0.0, do_layer_norm_before=False,
                        word_embed_proj_dim=8)


def _case(name, cfg, seed):
    rng = np.random.default_rng(seed)
    params = random_weights(cfg, rng, magnitudes=Magnitudes(0.2))
    ids, right, ids_left, left = make_inputs(cfg, rng, 3, 11)
    return ModelCase(name, cfg, params, ids, right, ids_left, left)


@pytest.fixture(scope="module")
def cases():
    out = {"preln": _case("preln", PRELN, 1), "postln_proj": _case("postln_proj", POSTLN_PROJ, 2)}
    out.update({name: spec.build(name) for name, spec in stress_specs().items()
                if name in ("stress-scores", "stress-outliers")})
    out.update(half_cases())
    return out


@pytest.fixture(scope="module")
def tokenizer_case():
    opt = shared_path("data", "opt")
    return C.TokenizerCase(opt / "vocab.json", opt / "merges.txt")


def _suite(adapter, kind, cases, request):
    if kind == "tokenizer":
        return C.tokenizer_checks(adapter, request.getfixturevalue("tokenizer_case"))
    if kind == "samplers":
        return C.sampler_checks(adapter)
    return C.model_checks(adapter, cases[kind])


def _location(result):
    return result.data.get("first_divergence") or (
        f"U+{result.data['codepoint']:04X}" if "codepoint" in result.data else None)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.cls.__name__ for m in MUTANTS])
def test_mutant_fails_at_the_right_place(mutant, cases, request):
    results = [c.run() for c in _suite(mutant.cls(), mutant.model, cases, request)]
    failed = [r for r in results if r.status == C.FAIL]
    assert failed, f"{mutant.cls.__name__} passed every check: {[(r.name, r.status) for r in results]}"
    first = failed[0]
    assert first.name.endswith("/" + mutant.check) or first.name == mutant.check, (first.name, first.detail)
    if mutant.location is not None:
        assert _location(first) == mutant.location, first.detail
        assert mutant.location in first.detail
    # every check before the first failure ran and passed (none was silently skipped)
    before = results[:results.index(first)]
    assert all(r.status == C.PASS for r in before), [(r.name, r.status, r.detail) for r in before]


@pytest.mark.parametrize("backend,dtype", [("numpy", "float32"), ("numpy", "float64"), ("numba", "float32"),
                                           ("numpy", "bfloat16"), ("numpy", "float16")])
def test_correct_adapters_pass(backend, dtype, cases, request):
    adapter = RefoptAdapter(backend, dtype)
    for kind in ("preln", "postln_proj", "stress-scores", "stress-outliers", "samplers"):
        for result in (c.run() for c in _suite(adapter, kind, cases, request)):
            assert result.status == C.PASS, (result.name, result.detail)


def test_correct_tokenizer_passes(tokenizer_case):
    for result in (c.run() for c in C.tokenizer_checks(RefoptAdapter("numpy"), tokenizer_case)):
        assert result.status == C.PASS, (result.name, result.detail)


def test_model_mutants_also_fail_on_a_random_config():
    # the bugs are not artefacts of the two shapes above: a fresh pre-LN config catches them too
    cfg = OPTConfig(vocabulary_size=40, num_layers=3, num_heads=2, hidden_dim=12, intermediate_dim=20,
                    max_sequence_length=24, dropout=0.0)
    case = _case("other", cfg, 7)
    for m in MUTANTS:
        if m.model != "preln":
            continue
        check = {"gradients": C.check_gradients, "logits": C.check_logits,
                 "logits.left_padding": lambda a, c: C.check_logits(a, c, left=True),
                 "incremental": C.check_incremental,
                 "incremental.left_padding": lambda a, c: C.check_incremental(a, c, left=True)}[m.check]
        result = check(m.cls(), case)
        assert result.status == C.FAIL, m.cls.__name__
        expected = {"layers.0.fc2.weight": "layers.1.fc2.weight",
                    "layers.1.q_proj.weight": "layers.2.q_proj.weight"}.get(m.location, m.location)
        if not expected.startswith("position"):
            assert expected in result.detail, (m.cls.__name__, result.detail)


def test_gradient_mutant_is_located_in_a_post_ln_model(cases):
    # post-LN: the layer below the broken block is wrong from its last LayerNorm on (backward order)
    from refopt.testing.mutants import GradientMissingResidual

    result = C.check_gradients(GradientMissingResidual(), cases["postln_proj"])
    assert result.status == C.FAIL
    assert result.data["first_divergence"] == "layers.1.mlp_layer_norm.gamma", result.detail


@pytest.mark.parametrize("kind", ["half-wide", "half-long"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_correct_half_adapters_pass_the_half_cases(dtype, kind, cases, request):
    # the cases the half-precision mutants fail on: refopt's own policy models pass them (the
    # forward checks, which those mutants fail; the gradients are held to float64 as before)
    adapter = RefoptAdapter("numpy", dtype)
    for result in (c.run() for c in _suite(adapter, kind, cases, request) if c.group != "gradients"):
        assert result.status == C.PASS, (result.name, result.detail)
