"""The error figures, the tolerance model, family scales and the rounding-noise bound
(refopt.testing.tolerances, refopt.testing.noise)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings

from refopt.config import OPTConfig
from refopt.testing import check_case, random_case
from refopt.testing import reference as R
from refopt.testing import strategies as rst
from refopt.testing.adapter import RefoptAdapter
from refopt.testing.locator import compare_activations
from refopt.testing.sampler_reference import fragile_rows, sampler_distribution
from refopt.testing.tolerances import (MEASURED, NOISE_FACTOR, SAFETY, UNIT_ROUNDOFF, compare,
                                       error_figures, noise_bound, tolerance)


def test_figures_on_known_values():
    ref = np.array([[1.0, -2.0], [4.0, 0.0]])
    cand = ref + np.array([[0.1, 0.0], [-0.2, 1e-7]])
    f = error_figures(cand, ref)
    assert f.max_abs == pytest.approx(0.2)
    assert f.scaled == pytest.approx(0.2 / 4.0)
    # llama.cpp's nmse(a, b) = sum (a - b)^2 / sum a^2 with a the reference
    assert f.nmse == pytest.approx((0.01 + 0.04 + 1e-14) / (1 + 4 + 16))
    # the exact zero is judged against 1e-6 of the largest magnitude, not against 0
    assert f.max_rel == pytest.approx(max(0.1, 0.2 / 4, 1e-7 / 4e-6))


def test_nan_and_shape_mismatch_fail():
    ref = np.ones((2, 3))
    bad = ref.copy()
    bad[0, 1] = np.nan
    assert error_figures(bad, ref).scaled == math.inf
    assert not compare("x", bad, ref, "float32", 1).passed
    c = compare("x", np.ones((2, 4)), ref, "float32", 1)
    assert not c.passed and "shape" in c.name


def test_tolerance_grows_with_depth_and_unit_roundoff():
    for dtype in MEASURED:
        for kind in ("activations", "gradients"):
            tols = [tolerance(dtype, d, kind) for d in range(0, 30, 3)]
            assert all(a.scaled <= b.scaled and a.nmse <= b.nmse for a, b in zip(tols, tols[1:]))
            a, b, c, e = MEASURED[dtype][kind]
            assert tolerance(dtype, 5, kind).scaled == pytest.approx(SAFETY[dtype] * UNIT_ROUNDOFF[dtype] * (a + b * math.log2(6)))
    order = ["float64", "float32", "float16", "bfloat16"]
    scaled = [tolerance(d, 4).scaled for d in order]
    assert scaled == sorted(scaled)



def test_measured_noise_raises_the_tolerance_and_nothing_else():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100)
    calibrated = tolerance("float32", 2)
    noise = rng.standard_normal(100)
    noise *= 3 * calibrated.scaled * np.abs(ref).max() / np.abs(noise).max()   # 3x the tolerance
    assert not compare("t", ref + noise, ref, "float32", 2).passed            # no noise measured
    quiet = error_figures(ref + 0.01 * noise, ref)                             # a quiet input
    c = compare("t", ref + noise, ref, "float32", 2, noise=quiet)
    assert not c.passed and not c.widened and c.tolerance == calibrated
    loud = error_figures(ref + noise / 2, ref)                                 # an ill-conditioned one
    c = compare("t", ref + noise, ref, "float32", 2, noise=loud)
    assert c.passed and c.widened and "rounding noise" in c.describe()
    assert c.tolerance.scaled == pytest.approx(NOISE_FACTOR * loud.scaled)
    assert noise_bound(calibrated, error_figures(np.full(3, np.inf), np.ones(3))) == calibrated


def test_family_scale_judges_a_zero_tensor_by_its_family():
    # a gradient that is zero in exact arithmetic (a key bias: softmax ignores a shift of every
    # score) holds rounding noise the size of its block's other gradients' rounding
    grads = {"layers.0.k_proj.bias": np.zeros(3), "layers.0.k_proj.weight": np.array([[1.0, -2.0]] * 3),
             "layers.0.fc1.weight": np.array([[1e-3]])}
    scales = R.gradient_scales(grads)
    noisy = np.full(3, 1e-9)
    assert error_figures(noisy, grads["layers.0.k_proj.bias"]).scaled == math.inf    # own scale: hopeless
    assert error_figures(noisy, grads["layers.0.k_proj.bias"], scales["layers.0.k_proj.bias"]).scaled \
        == pytest.approx(1e-9 / 2.0)
    assert scales["layers.0.fc1.weight"].scale == 1e-3              # another block: its own scale
    # a branch output that is zero (every ReLU off) is judged against the residual stream it joins
    cfg = OPTConfig(vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=2,
                    max_sequence_length=8, dropout=0.0)
    acts = {n: np.ones((1, 2, 4)) * 5.0 for n in R.activation_names(cfg)}
    acts["layers.0.mlp_output"] = np.zeros((1, 2, 4))
    sc = R.activation_scales(acts, cfg, np.ones((1, 2), bool))
    assert sc["layers.0.attention_output"].scale == 5.0           # the embeddings it joins
    assert sc["layers.0.mlp_output"].scale == 10.0                # embeddings + attention branch
    assert sc["layers.0.output"].scale == 5.0


def test_noise_model_sees_ill_conditioned_inputs():
    # a residual stream offset by 300 that LayerNorm subtracts away: a correct float32 port's error
    # grows with it, and so does the measured noise; on a normal input the noise stays below the
    # calibrated tolerance
    from refopt.testing.cases import CaseSpec

    normal = random_case(3, stress=0.0)
    for name, c in normal.noise("float32").items():
        assert c.scaled < tolerance("float32", R.depth_of(name, normal.config)).scaled, name
    offset = CaseSpec.parse("v64l3h4d32f64p64-w31-s0.2.c300-i32-b3x24").build()
    loud = offset.noise("float32")
    assert loud["logits"].scaled > tolerance("float32", offset.config.num_layers).scaled


@settings(max_examples=12)
@given(case=rst.model_cases(max_layers=4, min_length=2))
def test_refopt_float32_sits_inside_the_tolerance(case):
    # refopt's own float32 forward and backward on drawn models (stress magnitudes included) are
    # within the tolerance of every tensor and gradient
    adapter = RefoptAdapter("numpy", "float32")
    for result in check_case(adapter, case):
        assert result.status != "FAIL", (case, result.name, result.detail)


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_half_precision_emulation_sits_inside_its_tolerance(fmt):
    from refopt.testing.calibration import run_forward_as

    for seed in range(4):
        case = random_case(100 + seed, stress=0.0)
        ref = case.reference()
        half = run_forward_as(case.params, case.config, case.token_ids, case.padding_mask, fmt)
        div = compare_activations(case.config, half, ref.acts, fmt, case.padding_mask, ref.scales,
                                  case.noise(fmt))
        assert div.first is None, div.describe()
        # and float32's tolerance is far too tight for it: the dtype matters
        assert compare_activations(case.config, half, ref.acts, "float32", case.padding_mask, ref.scales,
                                   case.noise("float32")).first is not None


@settings(max_examples=20)
@given(p=rst.probabilities(), spec=rst.sampler_specs())
def test_sampler_conventions_agree_away_from_ties(p, spec):
    fragile = fragile_rows(spec, p, "keras_hub") | fragile_rows(spec, p, "transformers")
    a = sampler_distribution(spec, p, "keras_hub")[~fragile]
    b = sampler_distribution(spec, p, "transformers")[~fragile]
    if spec.name == "top_p" and spec.k is not None:
        # keras_hub does not renormalise between top-k and top-p: the supports may differ
        return
    assert np.array_equal(a > 0, b > 0)
    np.testing.assert_allclose(a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True), rtol=1e-9, atol=1e-15)
