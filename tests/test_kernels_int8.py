"""int8 weights with activations quantised per row (``activations="int8"``): the Numba kernel
(:mod:`refopt.kernels.cpu.int8`, VNNI) against its NumPy reference (:func:`refopt.quant.int8_matmul`).
The integer sums are exact and the float steps are the same IEEE operations in the same order, so
the products must agree bit for bit, for any activations: ordinary, all equal, one huge outlier,
zeros, denormals, inf and NaN."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numba import njit

import refopt.kernels.cpu as nb
import refopt.ops as ref
from refopt.errors import ConfigError
from refopt.kernels.cpu import int8 as k8
from refopt.quant import QuantizedMatrix, int8_matmul, quantize_activations, quantize_params, set_activations
from tests_support import arrays, random_config

EXAMPLES = int(os.environ.get("REFOPT_INT8_EXAMPLES", 30))
ROW_KINDS = ["normal", "equal", "outlier", "zeros", "denormal", "tiny", "huge", "inf", "nan"]


def activation_rows(rng, M, I, kinds):
    """``x [M, I]`` float32, row m drawn as ``kinds[m % len(kinds)]`` says."""
    x = rng.standard_normal((M, I)).astype(np.float32)
    for m in range(M):
        kind = kinds[m % len(kinds)]
        j = rng.integers(0, I)
        if kind == "equal":
            x[m] = np.float32(rng.standard_normal())             # x / scale lands on +-127 exactly
        elif kind == "outlier":
            x[m, j] = np.float32(1e30)                           # the rest of the row rounds to 0
        elif kind == "zeros":
            x[m] = 0
        elif kind == "denormal":
            x[m] *= np.float32(1e-39)                            # all subnormal, scale too
        elif kind == "tiny":
            x[m] = 0
            x[m, j] = np.float32(1e-44)                          # scale underflows to 0
        elif kind == "huge":
            x[m] *= np.float32(1e37)
        elif kind == "inf":
            x[m, j] = np.float32(-np.inf)
        elif kind == "nan":
            x[m, j] = np.float32(np.nan)
    return x


def w8a8(rng, O, I):
    return QuantizedMatrix.quantize(arrays(rng, (O, I), np.float32), "int8").with_activations("int8")


@settings(max_examples=EXAMPLES, deadline=None)
@given(M=st.integers(1, 11), I=st.integers(1, 300), O=st.integers(1, 150), bias=st.booleans(),
       relu=st.booleans(), kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_products_match_the_reference_bit_for_bit(M, I, O, bias, relu, kinds, seed):
    # M up to 11: blocks of four rows and the rows left over; I up to 300: whole 64-byte steps and
    # the inputs past them; O past CHUNK (64)
    rng = np.random.default_rng(seed)
    x = activation_rows(rng, M, I, kinds)
    w = w8a8(rng, O, I)
    b = arrays(rng, (O,), np.float32) if bias else None
    fn, rfn = (nb.linear_relu_forward, ref.linear_relu_forward) if relu else (nb.linear_forward, ref.linear_forward)
    with np.errstate(over="ignore", invalid="ignore"):                # "huge" rows overflow to inf
        got, want = fn(x, w, b), rfn(x, w, b)
        head = nb.lm_head_forward(x[None], w)
        want_head = ref.lm_head_forward(x[None], w)
    assert got.dtype == want.dtype == np.float32
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(head, want_head, equal_nan=True)
    # the documented behaviours: a row with inf or NaN gives NaN everywhere, a row of zeros zeros
    for m in range(M):
        kind = kinds[m % len(kinds)]
        if kind in ("inf", "nan"):
            assert np.isnan(head[0, m]).all()
        elif kind in ("zeros", "tiny"):
            assert not head[0, m].any()


@settings(max_examples=EXAMPLES, deadline=None)
@given(M=st.integers(1, 6), I=st.integers(1, 200), kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_activation_quantisation_matches_and_bounds_the_error(M, I, kinds, seed):
    rng = np.random.default_rng(seed)
    x = activation_rows(rng, M, I, kinds)
    q, scale = quantize_activations(x)
    xu, sx = np.empty((M, I), np.uint8), np.empty(M, np.float32)
    k8.quantize_rows(x, xu, sx)
    assert np.array_equal(xu.astype(np.int16) - 128, q) and np.array_equal(sx, scale, equal_nan=True)
    assert np.abs(q).max(initial=0) <= 127
    finite = np.isfinite(scale)
    assert np.array_equal(finite, np.isfinite(x).all(axis=1))
    err = np.abs(q[finite] * scale[finite, None].astype(np.float64) - x[finite])
    # half a step at most; plus, where the scale is subnormal or underflows to 0, the scale's own
    # rounding (at most 2^-150, times up to 127 steps)
    assert (err <= 0.5 * scale[finite, None] * (1 + 1e-6) + 127 * 2.0**-150).all()


@pytest.mark.parametrize("vnni", [True, False])
def test_tiles_sum_unsigned_by_signed_bytes(vnni):
    # the VNNI instruction and the plain-IR definition it stands for, on every extreme byte
    if vnni and not k8.HAVE_VNNI:
        pytest.skip("this CPU has no AVX-512 VNNI")
    tile = k8._tile(2, 3, 2, vnni, ahead=True)

    @njit
    def run(xu, m, w, o, k0, k1):
        return tile(xu, m, w, o, k0, k1, 4096)

    rng = np.random.default_rng(0)
    xu = rng.integers(0, 256, (3, 640), dtype=np.uint8)
    w = rng.integers(-128, 128, (5, 640), dtype=np.int8)
    xu[0, :256], w[1, :256] = 255, -128                      # the largest products, many of them
    want = [int((xu[r].astype(np.int64) * w[1 + c])[128:640].sum()) for r in range(2) for c in range(3)]
    assert list(run(xu, 0, w, 1, 128, 640)) == want


def test_int32_blocks_do_not_overflow():
    # a row longer than BLOCK at the largest products: 255 * 127 per input would pass 2^31 in one
    # int32 sum; in blocks of BLOCK it is exact
    I = k8.BLOCK + 1000
    x = np.full((1, I), 3.0, np.float32)                     # q = 127, u = 255 everywhere
    data = np.full((2, I), 127, np.int8)
    data[1, ::2] = -127
    m = QuantizedMatrix(data, "int8", np.ones(2, np.float32), "int8")
    got = nb.linear_forward(x, m)
    assert 255 * 127 * I > 2**31 - 1                         # the unsigned form, in one int32 sum
    assert got[0, 0] == np.float32(127 * 127 * I) * (np.float32(3) / np.float32(127))
    assert np.array_equal(got, int8_matmul(x, m))


@settings(max_examples=int(os.environ.get("REFOPT_DECODE_EXAMPLES", 8)), deadline=None)
@given(cfg=random_config(max_len=12), B=st.integers(1, 6), S=st.sampled_from([1, 1, 3]), extra=st.integers(0, 6),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_decode_step(cfg, B, S, extra, threads, seed):
    # the compiled step (one token per row, or S: a prompt's) against the reference forward with
    # the same int8 numerics.  The two paths'
    # float32 activations differ by rounding (~1e-7 relative) and an activation sitting on a
    # rounding boundary of its row's int8 grid may round the other way: the logits agree to
    # within a few steps of that grid, checked against the int8-activation error itself
    from dataclasses import replace

    from refopt.kernels.cpu.decode import decode_step
    from refopt.model import init_params, logits_forward

    cfg = replace(cfg, dtype="float32")
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed, std=0.5)
    exact = quantize_params(params, "int8")
    params = set_activations(exact, "int8")
    S = min(S, 32 // B)                                       # within the rows the step takes
    index = min(extra, cfg.max_sequence_length - S)
    mask = np.ones((B, index + S), bool)
    T = index + S
    cache = arrays(rng, (B, cfg.num_layers, 2, T, cfg.num_heads, cfg.head_dim), np.float32)
    ids = rng.integers(0, cfg.vocabulary_size, (B, S))
    want = logits_forward(params, cfg, ids, mask, cache=cache.copy(), cache_index=index, ops=ref)
    floats = logits_forward(exact, cfg, ids, mask, cache=cache.copy(), cache_index=index, ops=ref)
    logits, _ = decode_step(params, cfg, ids, mask, cache, index, threads=threads, min_bytes=0)
    spread = np.abs(want - floats).max() + 1e-6 * np.abs(want).max()   # int8 activations' own error
    assert np.abs(logits - want).max() <= spread, (np.abs(logits - want).max(), spread)


def test_choosing_it():
    from refopt.models import OPTBackbone, OPTCausalLM

    backbone = OPTBackbone(vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=8,
                           intermediate_dim=16, max_sequence_length=16)
    with pytest.raises(ConfigError, match="needs weights_dtype='int8'"):
        backbone.set_activations("int8")
    with pytest.raises(ConfigError, match="needs weights_dtype='int8'"):
        backbone.quantize("bfloat16", activations="int8")
    backbone.quantize("int8", activations="int8")
    assert backbone.activations == "int8"
    assert all(v.activations == "int8" for v in backbone.params.values() if isinstance(v, QuantizedMatrix))
    with pytest.raises(ConfigError, match="activations='int4'"):
        backbone.set_activations("int4")
    with pytest.raises(ConfigError, match="needs weights_dtype='int8'"):
        OPTCausalLM.from_preset(preprocessor=None, activations="int8")
    lm = OPTCausalLM.from_preset(weights_dtype="int8", activations="int8", backend="numba")
    exact = OPTCausalLM.from_preset(weights_dtype="int8", backend="numba")
    assert lm.backbone.activations == "int8" and exact.backbone.activations is None
    ids = {"token_ids": np.array([[2, 100, 200, 300]]), "padding_mask": np.ones((1, 4), bool)}
    a, b = lm.predict(ids), exact.predict(ids)
    assert a.shape == b.shape and not np.array_equal(a, b)           # different numerics, chosen
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()
    lm.backbone.set_activations(None)
    assert np.array_equal(lm.predict(ids), b)                         # back to the exact path
