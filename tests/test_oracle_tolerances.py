"""The error figures, the tolerance model and the float64 tie-break (refopt.testing.tolerances)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings

from refopt.testing import reference as R
from refopt.testing import strategies as rst
from refopt.testing.locator import compare_activations, compare_gradients
from refopt.testing.tolerances import (GRADIENT_FLOOR, MEASURED, SAFETY, UNIT_ROUNDOFF, compare,
                                       error_figures, tolerance)


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


def test_tie_break_accepts_no_worse_than_refopt_in_the_same_dtype():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100)
    tol = tolerance("float32", 2)
    noise = rng.standard_normal(100)
    noise *= 3 * tol.scaled * np.abs(ref).max() / np.abs(noise).max()      # 3x the tolerance
    refopt32 = ref + 1.5 * noise                                           # refopt itself further off
    c = compare("t", ref + noise, ref, "float32", 2, refopt32)
    assert c.passed and c.tie_break and "tie-break" in c.describe()
    c = compare("t", ref + noise, ref, "float32", 2, ref + 0.5 * noise)    # refopt closer: no excuse
    assert not c.passed and not c.tie_break
    assert not compare("t", ref + noise, ref, "float32", 2).passed         # no same-dtype result


def test_gradient_floor():
    cfg_grads = {"a": np.array([1.0, -2.0]), "b": np.zeros(3)}              # b is zero in exact arithmetic
    noisy = {"a": cfg_grads["a"] * (1 + 1e-8), "b": np.full(3, 1e-9)}
    floor = GRADIENT_FLOOR * 2.0
    assert error_figures(noisy["b"], cfg_grads["b"]).scaled == math.inf     # no floor: hopeless
    assert error_figures(noisy["b"], cfg_grads["b"], floor).scaled == pytest.approx(1e-9 / floor)


@settings(max_examples=12)
@given(case=rst.model_cases(max_layers=4, min_length=2))
def test_refopt_float32_sits_inside_the_tolerance(case):
    # the model is calibrated on refopt's own float32 error: on new random models every tensor and
    # gradient of refopt's float32 run is within it without any tie-break
    ref = case.activations(case.padding_mask)
    f32 = case.activations(case.padding_mask, "float32")
    div = compare_activations(case.config, f32, ref, "float32", case.padding_mask)
    assert div.first is None, div.describe()
    assert not any(c.tie_break for c in div.compared)
    ids, _ = case.gradient_batch("float32")            # no ReLU input within rounding of its kink
    loss64, g64 = case.gradients("float64", ids)
    _, g32 = case.gradients("float32", ids)
    gdiv = compare_gradients(case.config, g32, g64, "float32")
    assert gdiv.first is None, gdiv.describe()


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_half_precision_emulation_sits_inside_its_tolerance(fmt):
    from refopt.testing.checks import random_case

    for seed in range(4):
        case = random_case(100 + seed)
        ref = case.activations(case.padding_mask)
        half = R.run_forward_as(case.params, case.config, case.token_ids, case.padding_mask, fmt)
        div = compare_activations(case.config, half, ref, fmt, case.padding_mask)
        assert div.first is None, div.describe()
        # and float32's tolerance is far too tight for it: the dtype matters
        assert compare_activations(case.config, half, ref, "float32", case.padding_mask).first is not None


@settings(max_examples=20)
@given(p=rst.probabilities(), spec=rst.sampler_specs())
def test_sampler_conventions_agree_away_from_ties(p, spec):
    fragile = R.fragile_rows(spec, p, "keras_hub") | R.fragile_rows(spec, p, "transformers")
    a = R.sampler_distribution(spec, p, "keras_hub")[~fragile]
    b = R.sampler_distribution(spec, p, "transformers")[~fragile]
    if spec.name == "top_p" and spec.k is not None:
        # keras_hub does not renormalise between top-k and top-p: the supports may differ
        return
    assert np.array_equal(a > 0, b > 0)
    np.testing.assert_allclose(a / a.sum(-1, keepdims=True), b / b.sum(-1, keepdims=True), rtol=1e-9, atol=1e-15)
