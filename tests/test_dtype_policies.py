"""Dtype policies: KerasHub's names and dtypes, the rounding helpers, the emulated ops (where
KerasHub rounds), outputs and weights in the policy's dtypes, loading, training and generation."""

import numpy as np
import pytest

from refopt import dtype_policies as dp
from refopt import ops as numpy_ops
from refopt.errors import ConfigError, TrainingError
from refopt.models import OPTBackbone, OPTCausalLM
from refopt.model import init_params

ml_dtypes = pytest.importorskip("ml_dtypes", reason="the reference bfloat16 rounding is ml_dtypes'")


def test_policies_are_kerass():
    assert [(p, dp.DTypePolicy(p).variable_dtype, dp.DTypePolicy(p).compute_dtype) for p in dp.NAMES] == [
        ("float32", "float32", "float32"), ("float64", "float64", "float64"),
        ("bfloat16", "bfloat16", "bfloat16"), ("float16", "float16", "float16"),
        ("mixed_bfloat16", "float32", "bfloat16"), ("mixed_float16", "float32", "float16")]
    assert dp.get(None).name == "float32"
    assert dp.get(dp.DTypePolicy("mixed_float16").serialize()).name == "mixed_float16"
    with pytest.raises(ConfigError, match="dtype='int8': expected a dtype policy"):
        dp.get("int8")
    with pytest.raises(ConfigError, match="DTypePolicyMap"):
        dp.get({"class_name": "DTypePolicyMap", "config": {}})


def test_round_to_matches_ml_dtypes_and_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(10000) * 10.0 ** rng.integers(-8, 8, 10000)).astype(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40,
                                  1.00390625, 1.01171875], np.float32)])   # ties to even, both ways
    bf = dp.round_to(x, "bfloat16")
    expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(bf, expected)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(dp.round_to(x, "float16"), x.astype(np.float16).astype(np.float32))
    assert dp.round_to(x, "float32") is x
    assert dp.to_public(bf, "bfloat16").dtype == ml_dtypes.bfloat16


def _ops(policy, fused):
    return dp.ops_for(policy, numpy_ops, fused_attention=fused)


def test_float_policies_use_the_plain_ops():
    assert _ops("float32", True) is numpy_ops and _ops("float64", False) is numpy_ops


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dense_rounds_the_product_then_the_sum_with_the_bias(dtype):
    rng = np.random.default_rng(1)
    R = lambda v: dp.round_to(v, dtype)                                     # noqa: E731
    x, w, b = R(rng.standard_normal((3, 8)).astype(np.float32)), rng.standard_normal((5, 8)).astype(np.float32), \
        rng.standard_normal(5).astype(np.float32)
    ops = _ops(dtype, False)
    expected = R(R(x @ R(w).T) + R(b))                     # the kernel and bias autocast, two roundings
    np.testing.assert_array_equal(ops.linear_forward(x, w, b), expected)
    np.testing.assert_array_equal(ops.linear_relu_forward(x, w, b), np.maximum(expected, 0))
    np.testing.assert_array_equal(ops.add(x, x[::-1]), R(x + x[::-1]))
    # LayerNorm: float32 inside, gamma and beta as they are (Keras does not autocast them)
    g = (1 + rng.standard_normal(8)).astype(np.float32)
    np.testing.assert_array_equal(ops.layernorm_forward(x, g, g, 1e-5),
                                  R(numpy_ops.layernorm_forward(x, g, g, 1e-5)))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_attention_paths(dtype, fused):
    rng = np.random.default_rng(2)
    R = lambda v: dp.round_to(v, dtype)                                     # noqa: E731
    B, H, S, K = 2, 2, 5, 8
    q, k, v = (R(rng.standard_normal((B, H, S, K)).astype(np.float32)) for _ in range(3))
    mask = numpy_ops.attention_mask(np.array([[1] * 5, [1, 1, 1, 0, 0]], bool), np.arange(S))
    out, probs = _ops(dtype, fused).attention_forward(q * np.float32(K ** -0.5), k, v, mask)
    assert np.array_equal(out, R(out)) and np.array_equal(probs, R(probs))
    ref_out, _ = numpy_ops.attention_forward(q * np.float32(K ** -0.5), k, v, mask)
    real = np.broadcast_to(mask.any(-1)[..., None], out.shape) & np.array([[1] * 5, [1, 1, 1, 0, 0]], bool)[:, None, :, None]
    tol = 2.0 ** (-6 if dtype == "bfloat16" else -9) * np.abs(ref_out).max()
    assert np.abs(out - ref_out)[real].max() <= tol
    if not fused:      # Keras's explicit path zeroes masked probabilities, padding queries too
        assert not probs[~np.broadcast_to(mask, probs.shape)].any()


def _tiny(policy, **kwargs):
    bb = OPTBackbone(vocabulary_size=37, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=12,
                     max_sequence_length=16, dropout=0.0, dtype=policy, **kwargs)
    return bb


X = {"token_ids": np.array([[2, 5, 9, 11, 3], [2, 4, 6, 1, 1]]),
     "padding_mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16", "float16", "mixed_float16"])
def test_outputs_weights_and_configs_follow_the_policy(policy, tmp_path):
    bb = _tiny(policy)
    p = dp.DTypePolicy(policy)
    assert bb.compute_dtype == p.compute_dtype and bb.variable_dtype == p.variable_dtype
    assert bb.dtype == p.variable_dtype and bb.dtype_policy == p
    assert dp.standardize(bb(X).dtype) == p.compute_dtype
    assert dp.standardize(OPTCausalLM(bb)(X).dtype) == p.compute_dtype
    assert dp.standardize(bb.token_embedding([[1, 2]]).dtype) == p.compute_dtype
    assert {dp.standardize(w.dtype) for w in bb.weights} == {p.variable_dtype}
    for v in bb.params.values():                  # stored as float32 holding the variable dtype's values
        assert v.dtype == np.float32 and np.array_equal(v, p.round_variable(v))
    assert OPTBackbone.from_config(bb.get_config()).dtype_policy == p
    bb.save_to_preset(tmp_path / "p")
    assert OPTBackbone.from_preset(tmp_path / "p").dtype_policy.name == "float32"     # KerasHub's rule
    assert OPTBackbone.from_preset(tmp_path / "p", dtype=policy).dtype_policy == p


def test_a_half_policy_is_close_to_float32_and_generates():
    ref = _tiny(None)
    ref.params = init_params(ref.config, seed=3, std=0.3)
    for policy, spacing in (("mixed_bfloat16", 2 ** -7), ("mixed_float16", 2 ** -10)):
        bb = _tiny(policy)
        bb.set_params(ref.params)
        a, b = np.asarray(bb(X), np.float32), ref(X)
        real = X["padding_mask"].astype(bool)
        assert 0 < np.abs(a - b)[real].max() <= 8 * spacing * np.abs(b).max()
        lm = OPTCausalLM(bb)
        lm.compile(sampler="greedy")
        out = lm.generate({"token_ids": np.array([[2, 5, 9, 0, 0, 0]]), "padding_mask": np.array([[1, 1, 1, 0, 0, 0]])},
                          stop_token_ids=None)
        assert out["token_ids"].shape == (1, 6)


def test_training_under_policies():
    x = {"token_ids": X["token_ids"], "padding_mask": X["padding_mask"]}
    y, sw = np.roll(X["token_ids"], -1, axis=1), X["padding_mask"]
    lm = OPTCausalLM(_tiny("mixed_bfloat16"))
    lm.compile(optimizer="adam")
    before = {k: v.copy() for k, v in lm.backbone.params.items()}
    lm.fit(x, y, sample_weight=sw, batch_size=2, verbose=0)
    assert any(not np.array_equal(before[k], v) for k, v in lm.backbone.params.items())
    assert all(v.dtype == np.float32 for v in lm.backbone.params.values())
    with pytest.raises(TrainingError, match="mixed_bfloat16"):
        OPTCausalLM(_tiny("bfloat16")).fit(x, y, sample_weight=sw, verbose=0)
