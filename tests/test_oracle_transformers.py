"""transformers' OPT through the oracle's TransformersAdapter (needs the `peers` extra): it conforms
on the fixtures' models and on hypothesis-drawn configs, in float32 and float64."""

import numpy as np
import pytest
from hypothesis import given, settings

pytest.importorskip("torch", reason="needs torch (pip install -e '.[peers]')")
pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[peers]')")

from conftest import shared_path  # noqa: E402
from refopt.testing import checks as C  # noqa: E402
from refopt.testing import strategies as rst  # noqa: E402
from refopt.testing.adapter import RefoptAdapter  # noqa: E402
from refopt.testing.adapters.transformers import TransformersAdapter  # noqa: E402
from refopt.testing.locator import locate_divergence  # noqa: E402
from refopt.testing.reference import activation_names  # noqa: E402

FIXTURES = [("hf", "opt-tiny-preln"), ("hf", "opt-tiny-postln-proj"), ("hf", "opt-tiny-realvocab"),
            ("keras", "opt_tiny_keras")]


@pytest.fixture(scope="module")
def adapter():
    return TransformersAdapter()


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f[1] for f in FIXTURES])
def test_fixture_models_conform(adapter, fixture):
    case = C.case_from_preset(shared_path("fixtures", *fixture))
    for check in C.model_checks(adapter, case):
        result = check.run()
        assert result.status == C.PASS, (result.name, result.detail)


def test_tokenizer_and_samplers_conform(adapter):
    folder = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    tok = C.TokenizerCase(*C.find_tokenizer_files(folder))
    for check in C.tokenizer_checks(adapter, tok) + C.sampler_checks(adapter):
        result = check.run()
        assert result.status == C.PASS, (result.name, result.detail)


def test_sampler_conventions_really_differ_at_ties(adapter):
    # judged by KerasHub's rule, transformers' samplers fail exactly the tie cases (and the
    # un-renormalised top-k + top-p): the tie checks are sensitive, and the conventions are real
    class AsKerasHub(TransformersAdapter):
        sampler_convention = "keras_hub"

    failed = {c.name for c in C.sampler_checks(AsKerasHub()) if c.run().status == C.FAIL}
    assert {"samplers.top_k_tie", "samplers.top_p_tie"} <= failed
    assert failed <= {"samplers.top_k_tie", "samplers.top_p_tie", "samplers.top_k_top_p",
                      "samplers.temperature"}


@settings(max_examples=6)
@given(case=rst.model_cases(min_length=2))
def test_random_configs_conform(adapter, case):
    for fn in (C.check_logits, C.check_activations, C.check_gradients):
        result = fn(adapter, case)
        assert result.status == C.PASS, (fn.__name__, case.config, result.detail)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "sdpa-flash"])
def test_stress_cases_conform(attention):
    # outliers of 500, scores past float16's range, 384 tokens: transformers float32 is right there,
    # whatever its attention kernel, and the oracle says so
    from refopt.testing.cases import stress_specs

    adapter = TransformersAdapter("float32", attention)
    for name, spec in stress_specs().items():
        case = spec.build(name)
        for check in C.model_checks(adapter, case):
            if attention != "sdpa" and ("incremental" in check.name or "generation" in check.name):
                continue
            result = check.run()
            assert result.status == C.PASS, (attention, check.name, result.detail)


def test_float64_transformers_meets_the_float64_tolerance():
    # a checkpoint read by transformers' loader, and float64 parameters handed over (which must not
    # pass through float32 on the way in)
    adapter = TransformersAdapter("float64")
    for case in (C.case_from_preset(shared_path("fixtures", "hf", "opt-tiny-postln-proj")), C.random_case(0)):
        for fn in (C.check_logits, C.check_activations, C.check_gradients):
            result = fn(adapter, case)
            assert result.status == C.PASS, (case.name, fn.__name__, result.detail)
    for check in C.sampler_checks(adapter):
        result = check.run()
        assert result.status == C.PASS, (result.name, result.detail)


def test_locator_between_two_backends_finds_nothing(adapter):
    case = C.case_from_preset(shared_path("fixtures", "hf", "opt-tiny-preln"))
    reference = RefoptAdapter("numpy", "float64")
    reference.load(case.config, case.params)
    adapter.load(case.config, case.params)
    div = locate_divergence(reference, adapter, case.token_ids, case.padding_mask)
    assert div.first is None and not div.missing, div.describe()
    assert len(div.compared) == len(activation_names(case.config))


def test_locator_names_a_broken_transformers_module():
    # a bug planted in transformers itself (layer 1's fc1 bias zeroed after loading): the locator
    # names layer 1's MLP output, everything before it agrees
    import torch

    case = C.case_from_preset(shared_path("fixtures", "hf", "opt-tiny-preln"))
    broken = TransformersAdapter()
    broken.load(case.config, case.params)
    with torch.no_grad():
        broken.model.model.decoder.layers[1].fc1.bias.zero_()
    reference = RefoptAdapter("numpy", "float64")
    reference.load(case.config, case.params)
    div = locate_divergence(reference, broken, case.token_ids, case.padding_mask)
    assert div.name == "layers.1.mlp_output"
    assert all(c.passed for c in div.compared[:div.compared.index(div.first)])
    assert np.isfinite(div.first.figures.scaled)


def test_spilled_gradients_equal_the_held_ones():
    # the same backward, the gradients handed over one by one to a GradientSpill as autograd
    # produces them (as for a real-size model) or held by PyTorch: the same arrays, bit for bit,
    # and the spilled port's check passes exactly as the held one's
    from refopt.testing.cases import stress_specs
    from refopt.testing.spill import GradientSpill

    case = stress_specs()["stress-outliers"].build("stress-outliers")
    held, spilled = TransformersAdapter(spill_gradients=False), TransformersAdapter(spill_gradients=True)
    for a in (held, spilled):
        C.ensure_loaded(a, case)
    ids, mask = case.batch()
    loss_h, g_h = held.loss_and_gradients(ids, mask)
    loss_s, g_s = spilled.loss_and_gradients(ids, mask)
    assert isinstance(g_s._theirs, GradientSpill) and not isinstance(g_h._theirs, GradientSpill)
    assert loss_h == loss_s and sorted(g_h) == sorted(g_s)
    for name in g_h:
        np.testing.assert_array_equal(np.asarray(g_s[name]), np.asarray(g_h[name]), err_msg=name)
    assert all(p.grad is None for p in spilled.model.parameters())      # nothing left in PyTorch
    assert C.check_gradients(spilled, case).status == C.PASS


def test_the_tied_tables_shares_summed_outside_autograd_are_pytorchs_sum():
    # spilled, the LM head's use of the token table gets a leaf of its own over the same storage, so
    # that each use's share leaves autograd as soon as it is produced; summed in the parameter's
    # dtype, the table's gradient is PyTorch's own sum of the two shares, bit for bit -- in
    # bfloat16 too, where the sum rounds -- and the tie is back afterwards
    from refopt.testing.cases import stress_specs

    case = stress_specs()["stress-outliers"].build("stress-outliers")
    ids, mask = case.batch()
    for dtype in ("float32", "bfloat16"):
        held = TransformersAdapter(dtype=dtype, spill_gradients=False)
        spilled = TransformersAdapter(dtype=dtype, spill_gradients=True)
        for a in (held, spilled):
            C.ensure_loaded(a, case)
        _, g_h = held.loss_and_gradients(ids, mask)
        _, g_s = spilled.loss_and_gradients(ids, mask)
        np.testing.assert_array_equal(np.asarray(g_s["embed_tokens"]), np.asarray(g_h["embed_tokens"]),
                                      err_msg=dtype)
        m = spilled.model
        assert m.lm_head.weight is m.model.decoder.embed_tokens.weight
        assert len(list(m.parameters())) == len(list(held.model.parameters()))
