"""Every Numba CPU kernel against the NumPy reference op of the same name (hypothesis): float64
within 1e-12 relative, float32 within 1e-5, sampler choices identical."""

import functools
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refopt.kernels.cpu as nb
import refopt.ops as ref
from refopt import philox
from refopt.kernels.cpu.attention import BLAS_QUERIES
from refopt.quant import QuantizedMatrix
from refopt.ops.sampling import top_k_mask as ref_top_k_mask
from kernel_checks import check_cross_entropy, check_embedding, check_layernorm, probabilities
from tests_support import DTYPES, arrays, close, random_config


@settings(max_examples=40)
@given(dtype=DTYPES, B=st.integers(1, 3), H=st.integers(1, 3), S=st.integers(1, 20), extra=st.integers(0, 5),
       K=st.integers(1, 9), seed=st.integers(0, 2**16), left=st.booleans())
def test_attention(dtype, B, H, S, extra, K, seed, left):
    rng = np.random.default_rng(seed)
    T = S + extra                                              # queries are the last S of T keys
    q, k, v = arrays(rng, (B, H, S, K), dtype), arrays(rng, (B, H, T, K), dtype), arrays(rng, (B, H, T, K), dtype)
    lengths = rng.integers(0, T + 1, B)                        # 0: a row of padding only
    cols = np.arange(T)
    key_mask = np.stack([(cols >= T - n) if left else (cols < n) for n in lengths])
    mask = ref.attention_mask(key_mask, np.arange(extra, T))
    out, probs = nb.attention_forward(q, k, v, mask)
    r_out, r_probs = ref.attention_forward(q, k, v, mask)
    assert np.isfinite(out).all()
    close(probs, r_probs, dtype, "probs")
    close(out, r_out, dtype, "out")
    # strided key/value views (how decode reads the cache) give the same result
    kt = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    close(nb.attention_forward(q, kt, v, mask)[0], r_out, dtype, "strided out")
    # S up to 20 draws both paths: the fused kernel below BLAS_QUERIES queries, BLAS from there
    assert BLAS_QUERIES <= 20


@functools.cache
def _lanes_run():
    from numba import njit

    from refopt.kernels.cpu.lanes import axpy, dot, prefetch

    @njit
    def run(x, y, w, o, n):
        prefetch(x, (0, o), n)
        d = dot(x, (0, o), y, (1, 0), n)
        axpy(w, x, (0, o), y, (1, 0), n)
        return d
    return run


@settings(max_examples=60)
@given(dtype=DTYPES, n=st.integers(0, 100), offset=st.integers(0, 3), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_lanes_dot_and_axpy(dtype, n, offset, strided, seed):
    # lanes.dot (vector IR) gives the bits of its plain-loop statement, dot_reference, from
    # C-contiguous arrays and (a plain path) strided ones; axpy is y + w * x value by value;
    # prefetch changes nothing
    from refopt.kernels.cpu.lanes import dot_reference

    run = _lanes_run()
    rng = np.random.default_rng(seed)
    x = arrays(rng, (1, offset + n), dtype)
    y = arrays(rng, (2, n), dtype)
    if strided:
        x = np.repeat(x, 2, axis=1)[:, ::2]
    x0, y0 = x.copy(), y.copy()
    w = dtype(rng.standard_normal())
    got = run(x, y, w, offset, n)
    want = dot_reference(np.ascontiguousarray(x0[0, offset:]), np.ascontiguousarray(y0[1]))
    assert got == want or np.isnan(got) and np.isnan(want)
    assert np.array_equal(x, x0)
    assert np.array_equal(y[1], y0[1] + w * x0[0, offset:]) and np.array_equal(y[0], y0[0])
    if n >= 2 and np.all(np.isfinite(x0)) and np.all(np.isfinite(y0)):   # the reference itself
        L = 64 // np.dtype(dtype).itemsize
        lane = np.zeros(L, dtype)
        whole = n // L * L
        for k in range(whole):
            lane[k % L] += x0[0, offset + k] * y0[1, k]
        w_ = L
        while w_ > 1:
            w_ //= 2
            lane[:w_] += lane[w_:2 * w_]
        total = lane[0]
        for k in range(whole, n):
            total += x0[0, offset + k] * y0[1, k]
        assert total == want


@functools.cache
def _blocks_run():
    from numba import njit

    from refopt.kernels.cpu.lanes import BLOCK, axpy, axpys, dot, dots

    @njit
    def blocked(q, keys, t0, n, w, y):
        # BLOCK keys' scores into w[1, t0:], then y[1] += those weights times BLOCK values
        stride = keys.shape[1] * keys.shape[2]
        dots(q, (0, 1), keys, (t0, 1, 0), n, stride, w, (1, t0))
        axpys(w, (1, t0), keys, (t0, 0, 0), stride, y, (1, 0), n)

    @njit
    def one_by_one(q, keys, t0, n, w, y):
        for k in range(BLOCK):
            w[1, t0 + k] = dot(q, (0, 1), keys, (t0 + k, 1, 0), n)
        for k in range(BLOCK):
            wt = w[1, t0 + k]
            if wt != 0:
                axpy(wt, keys, (t0 + k, 0, 0), y, (1, 0), n)
    return blocked, one_by_one, BLOCK


@settings(max_examples=60)
@given(dtype=DTYPES, n=st.integers(0, 100), heads=st.integers(2, 4), t0=st.integers(0, 3),
       special=st.sampled_from(["none", "zero weight", "negative zero", "inf", "nan", "tiny"]),
       seed=st.integers(0, 2**16))
def test_lanes_blocks(dtype, n, heads, t0, special, seed):
    # dots and axpys (BLOCK keys a call, the decode attention's) give exactly the bits of BLOCK
    # calls of dot and axpy -- every score, every context value -- for every length (whole blocks
    # of lanes and the values past them), zero weights skipped as axpy's callers skip them
    blocked, one_by_one, BLOCK = _blocks_run()
    rng = np.random.default_rng(seed)
    q = arrays(rng, (1, n + 1), dtype)
    keys = arrays(rng, (t0 + BLOCK + 1, heads, n), dtype)
    y = arrays(rng, (2, n), dtype)
    if special != "none" and n > 0:                  # one key's score or one of its values special
        k, v = int(rng.integers(t0, t0 + BLOCK)), int(rng.integers(0, n))
        if special in ("zero weight", "negative zero"):
            keys[k, 1, :] = 0.0                      # a score, so a weight, of 0: skipped, so
            keys[k, 0, v] = np.inf if special == "zero weight" else 0.0   # no 0 * inf = nan,
            y[1, v] = -0.0                           # and -0 stays -0 (-0 + 0 * 0 is +0)
        else:
            keys[k, 0, v] = {"inf": np.inf, "nan": np.nan, "tiny": 1e-40}[special]
    w1, w2 = np.full((2, t0 + BLOCK + 2), np.nan, dtype), np.full((2, t0 + BLOCK + 2), np.nan, dtype)
    y1, y2 = y.copy(), y.copy()
    blocked(q, keys, t0, n, w1, y1)
    one_by_one(q, keys, t0, n, w2, y2)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    assert np.array_equal(w1.view(bits), w2.view(bits))
    assert np.array_equal(y1.view(bits), y2.view(bits))


@settings(max_examples=40)
@given(dtype=DTYPES, B=st.integers(1, 3), H=st.integers(1, 13), K=st.integers(1, 70), index=st.integers(0, 40),
       groups=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_decode_attention_heads(dtype, B, H, K, index, groups, seed):
    # the decode step's attention (one new query per row against the cache, heads walked in
    # groups, four at a time, keys in memory order) against the reference attention, with key
    # padding, the query at the last key or (a prompt's token) before it, and its row of qkv
    # apart from its cache row; the random configurations of test_decode_step have at most 3 heads
    from refopt.kernels.cpu.decode import _attend_heads

    rng = np.random.default_rng(seed)
    L, layer, T = 2, int(rng.integers(0, 2)), index + 1 + int(rng.integers(0, 3))
    cache = arrays(rng, (B, L, 2, T, H, K), dtype)
    qkv = arrays(rng, (B, 3 * H * K), dtype)
    key_mask = rng.random((B, T)) < 0.8
    key_mask[0, :] = False                               # row 0: no allowed key (uniform)
    probs = np.full((B * H, T), np.nan, dtype)
    ctx = np.full((B, H * K), np.nan, dtype)
    G = min(groups, H)
    at = index if rng.random() < 0.5 else int(rng.integers(0, index + 1))   # the query's own index
    rows = rng.permutation(B)                            # cache row b's query at qkv row rows[b]
    for b in range(B):
        for g in range(G):
            _attend_heads(qkv, cache, layer, index, at, key_mask, probs, ctx, rows[b], b, g * H // G,
                          (g + 1) * H // G)
    qkv, ctx = qkv[rows], ctx[rows]
    probs = probs.reshape(B, H, T)[rows].reshape(B * H, T)
    q = qkv[:, :H * K].reshape(B, H, 1, K)
    k = cache[:, layer, 0, :index + 1].transpose(0, 2, 1, 3)
    v = cache[:, layer, 1, :index + 1].transpose(0, 2, 1, 3)
    mask = ref.attention_mask(key_mask[:, :index + 1], np.array([at]))
    want, want_probs = ref.attention_forward(q, k, v, mask)
    close(ctx, want.reshape(B, H * K), dtype, "ctx")
    close(probs[:, :index + 1], want_probs.reshape(B * H, index + 1), dtype, "probs")


@settings(max_examples=40)
@given(dtype=DTYPES, N=st.integers(1, 9), D=st.integers(1, 33), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_layernorm_forward_backward(dtype, N, D, affine, seed):
    check_layernorm(nb, dtype, N, D, affine, seed)


@settings(max_examples=30)
@given(dtype=DTYPES, B=st.integers(1, 3), S=st.integers(1, 5), V=st.integers(2, 300), seed=st.integers(0, 2**16))
def test_cross_entropy(dtype, B, S, V, seed):
    check_cross_entropy(nb, dtype, B, S, V, seed)


@settings(max_examples=30)
@given(dtype=DTYPES, V=st.integers(1, 40), E=st.integers(1, 70), N=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_embedding_gather_scatter(dtype, V, E, N, seed):
    check_embedding(nb, dtype, V, E, N, seed, exact_backward=False)


@settings(max_examples=40)
@given(dtype=DTYPES, M=st.integers(1, 20), I=st.integers(1, 70), O=st.integers(1, 600), bias=st.booleans(),
       relu=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_and_head(dtype, M, I, O, bias, relu, seed):
    rng = np.random.default_rng(seed)
    x, w = arrays(rng, (M, I), dtype), arrays(rng, (O, I), dtype)
    b = arrays(rng, (O,), dtype) if bias else None
    fn, rfn = (nb.linear_relu_forward, ref.linear_relu_forward) if relu else (nb.linear_forward, ref.linear_forward)
    close(fn(x, w, b), rfn(x, w, b), dtype, "linear")
    table = arrays(rng, (O, I), dtype)
    close(nb.lm_head_forward(x[None], table), ref.lm_head_forward(x[None], table), dtype, "head")


@settings(max_examples=40)
@given(kind=st.sampled_from(["bfloat16", "float16", "int8"]), M=st.integers(1, 20), I=st.integers(1, 70),
       O=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_quantized_products(kind, M, I, O, seed):
    # the kernels read the stored bytes; the reference multiplies by the dequantised float32 matrix
    rng = np.random.default_rng(seed)
    x = arrays(rng, (M, I), np.float32)
    kernel = QuantizedMatrix.quantize(arrays(rng, (O, I), np.float32), kind)
    b = arrays(rng, (O,), np.float32)
    close(nb.linear_forward(x, kernel, b), ref.linear_forward(x, np.asarray(kernel), b), np.float32, "linear")
    table = QuantizedMatrix.quantize(arrays(rng, (O, I), np.float32), kind)
    close(nb.lm_head_forward(x[None], table), x[None] @ np.asarray(table).T, np.float32, "head")
    ids = rng.integers(0, O, (1, 5))
    assert np.array_equal(nb.embedding_forward(table, ids), np.asarray(table)[ids])


@settings(max_examples=40)
@given(kind=st.sampled_from(["bfloat16", "float16", "int8"]), M=st.integers(1, 3), I=st.integers(1, 400),
       O=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_streamed_rows(kind, M, I, O, seed):
    # rows below four take the weight rows four at a time through matmul's streaming tile (16 inputs
    # a step, the rest one by one) and the outputs past a multiple of four one at a time: rows 1-400
    # wide cover its steps and the inputs past them.  The error is measured against the sum of
    # |terms|, the scale a float32 dot product's rounding has
    rng = np.random.default_rng(seed)
    x = arrays(rng, (M, I), np.float32)
    kernel = QuantizedMatrix.quantize(arrays(rng, (O, I), np.float32), kind)
    w = np.asarray(kernel).astype(np.float64)
    want = x.astype(np.float64) @ w.T
    scale = (np.abs(x) @ np.abs(w).T).max()
    close(nb.linear_forward(x, kernel, None), want, np.float32, "rows", scale=scale)
    # the tile itself, on each kind it widens (batch-1 rows take it for every stored kind): four
    # rows side by side give each output the bits one row alone gives
    data = kernel.data.view(np.int16) if kind == "float16" else kernel.data
    one, four = _tiles(np.ascontiguousarray(x), np.ascontiguousarray(data))
    raw = kernel.data.astype(np.float64) if kind == "int8" else w      # int8: before its scale
    close(one, x.astype(np.float64) @ raw.T, np.float32, "tile", scale=(np.abs(x) @ np.abs(raw).T).max())
    whole = O - O % 4
    assert np.array_equal(four[:, :whole], one[:, :whole])
    # and the product of rows below four is the tile's, bit for bit, for every stored kind (its
    # fixed lane order, not LLVM's fastmath choice for the CPU at hand)
    tiled = one * kernel.scale[None] if kind == "int8" else one
    assert np.array_equal(nb.linear_forward(x, kernel, None), tiled)


@functools.cache
def _tiles_compiled():
    from numba import njit
    from refopt.kernels.cpu.matmul import _tile, _tile1

    @njit
    def run(x, w):
        M, O = x.shape[0], w.shape[0]
        one, four = np.zeros((M, O), np.float32), np.zeros((M, O), np.float32)
        for m in range(M):
            for o in range(O):
                one[m, o] = _tile1(x, m, w, o)[0]
            for o in range(0, O - 3, 4):
                t = _tile(x, m, w, o)
                for r in range(4):
                    four[m, o + r] = t[r]
        return one, four
    return run


def _tiles(x, w):
    """Every output of ``x @ widen(w).T`` through the streaming tile one weight row at a time and
    four at a time (the outputs past a multiple of four: zero)."""
    return _tiles_compiled()(x, w)


@settings(max_examples=40)
@given(kind=st.sampled_from(["float32", "bfloat16", "float16", "int8"]), M=st.integers(1, 9),
       O=st.integers(1, 90), I=st.sampled_from([96, 97, 4100]), seed=st.integers(0, 2**16))
def test_products_do_not_depend_on_the_cut(kind, M, O, I, seed):
    # an output's bits are the same whatever range of outputs it is computed in (the threads of a
    # product and the chunks of the decode step cut them differently): rows four at a time (two
    # outputs by four rows), the rows left over through the streaming tile (stored kinds), four
    # float32 outputs side by side
    from refopt.kernels.cpu.matmul import float_range, readonly, split
    rng = np.random.default_rng(seed)
    x = arrays(rng, (M, I), np.float32)
    wf = arrays(rng, (O, I), np.float32)
    if kind == "float32":
        w, sc = readonly(wf), readonly(np.zeros(0, np.float32))
    else:
        kernel = QuantizedMatrix.quantize(wf, kind)
        data = kernel.data.view(np.int16) if kind == "float16" else kernel.data
        w = readonly(data)
        sc = readonly(kernel.scale if kind == "int8" else np.zeros(0, np.float32))
    nobias = readonly(np.zeros(0, np.float32))
    outs = []
    for parts in (1, 2, 3, 5, 7):
        out = np.zeros((M, O), np.float32)
        for c in range(parts):
            o0, o1 = split(O, parts, c)
            if o0 < o1:
                float_range(x, w, sc, nobias, out, 0, np.int64(0), np.float32(1), o0, o1,
                            np.empty((M, 64), np.float32))
        outs.append(out)
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])


def test_quantization_error_is_small():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 96)).astype(np.float32)
    for kind, bound in (("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 1e-2)):
        err = np.abs(np.asarray(QuantizedMatrix.quantize(a, kind)) - a).max() / np.abs(a).max()
        assert err <= bound, (kind, err)


# ---------------------------------------------------------------------------------- sampling
@settings(max_examples=40)
@given(seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=5), step=st.integers(0, 2**32 - 1),
       stream=st.integers(0, 3))
def test_philox_uniforms(seeds, step, stream):
    assert np.array_equal(nb.uniform(seeds, step, stream), philox.uniform(seeds, step, stream))


@settings(max_examples=50)
@given(B=st.integers(1, 4), V=st.integers(1, 200), ties=st.booleans(), seed=st.integers(0, 2**16),
       k=st.integers(1, 250), top_p=st.floats(1e-6, 1.0), min_p=st.floats(0.0, 1.0), keep=st.integers(1, 4))
def test_selection_steps(B, V, ties, seed, k, top_p, min_p, keep):
    rng = np.random.default_rng(seed)
    p = probabilities(rng, B, V, ties)
    assert np.array_equal(nb.top_k_mask(p, k), ref_top_k_mask(p, k))
    for kk in (None, k):
        assert np.array_equal(nb.top_p_distribution(p, top_p, kk), ref.top_p_distribution(p, top_p, kk))
    assert np.array_equal(nb.min_p_distribution(p, min_p, keep), ref.min_p_distribution(p, min_p, keep))
    u = rng.random(B)
    w = np.where(nb.top_k_mask(p, k), p, 0.0)
    assert np.array_equal(nb.choose(w, u), philox.choose(w, u))
    assert np.array_equal(nb.choose(p, np.zeros(B)), philox.choose(p, np.zeros(B)))


def test_choose_rejects_bad_weights():
    from refopt.errors import SamplerError

    with pytest.raises(SamplerError, match="row 1"):
        nb.choose(np.array([[0.5, 0.5], [np.nan, 1.0]]), np.array([0.1, 0.2]))


# ---------------------------------------------------------------------------------- decode step
@settings(max_examples=int(os.environ.get("REFOPT_DECODE_EXAMPLES", 12)))
@given(cfg=random_config(max_len=12), dtype=DTYPES, kind=st.sampled_from([None, "bfloat16", "float16", "int8"]),
       B=st.integers(1, 6), S=st.sampled_from([1, 1, 2, 3, 5]), extra=st.integers(0, 6), padded=st.booleans(),
       threads=st.sampled_from([1, 2]), logits=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_step(cfg, dtype, kind, B, S, extra, padded, threads, logits, seed):
    # the compiled step (every layer, final norm, LM head) against the reference forward + head
    # with the KV cache (logits=False: the hidden states alone), for one token per row (a decode
    # step) or S tokens (a prompt's prefill: each attends to the keys up to its own, written by
    # the same call); B up to 6 takes the blocks of four rows and the remainder; min_bytes 0
    # sends every stage to the threads when threads == 2
    from dataclasses import replace

    from refopt.kernels.cpu.decode import decode_step
    from refopt.model import forward, init_params
    from refopt.quant import quantize_params

    cfg = replace(cfg, dtype=np.dtype(dtype).name)
    kind = kind if dtype == np.float32 else None
    # the parallel region (_step_parallel) runs the same _step_work for every dtype: threads == 2
    # with float32 weights only, the signature generation compiles anyway (the notebooks, the CLI),
    # where each other one would cost ~16 CPU-seconds of compiling (test_kernels_int8 runs it with
    # int8 activations); every dtype and storage kind still runs _step_work at threads == 1
    threads = threads if dtype == np.float32 and kind is None else 1
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed, std=0.5)
    if kind:
        params = quantize_params(params, kind)
    S = min(S, 32 // B)                               # rows the step takes (STEP_ROWS)
    index = min(extra, cfg.max_sequence_length - S)
    mask = np.ones((B, index + S), bool)
    if padded:                                        # left padding: rows start later
        for b in range(B):
            mask[b, :rng.integers(0, index + S)] = False
    T = index + S + int(rng.integers(0, 3))
    cache = arrays(rng, (B, cfg.num_layers, 2, T, cfg.num_heads, cfg.head_dim), dtype)
    ids = rng.integers(0, cfg.vocabulary_size, (B, S))
    want_cache = cache.copy()
    want_hidden = forward(params, cfg, ids, mask, cache=want_cache, cache_index=index, ops=ref)
    got, hidden = decode_step(params, cfg, ids, mask, cache, index, threads=threads, min_bytes=0,
                              logits=logits)
    if logits:
        close(got, ref.lm_head_forward(want_hidden, params["embed_tokens"]), dtype, "logits")
    else:
        assert got is None
    close(hidden, want_hidden, dtype, "hidden")
    close(cache, want_cache, dtype, "cache")


def test_decode_step_declines_what_it_cannot_take():
    # None (the caller's per-op path then runs, and names the error) for no tokens, a cache of
    # another batch or too short for the tokens, a padding mask short of them, or a prompt of more rows than
    # STEP_ROWS (float weights) / STORED_STEP_ROWS (int8 and half weights); the compiled step never
    # writes past the cache
    from refopt.config import OPTConfig
    from refopt.kernels.cpu.decode import STEP_ROWS, STORED_STEP_ROWS, decode_step
    from refopt.model import init_params, new_cache
    from refopt.quant import quantize_params

    cfg = OPTConfig(vocabulary_size=11, num_layers=1, num_heads=2, hidden_dim=4, intermediate_dim=8,
                    max_sequence_length=40, dtype="float32")
    params = init_params(cfg, seed=0)
    ids = np.ones((2, 3), np.int64)
    mask = np.ones((2, 8), bool)
    assert decode_step(params, cfg, ids, mask, new_cache(cfg, 2, 8, np.float32), 5, threads=1) is not None
    assert decode_step(params, cfg, ids[:, :0], mask, new_cache(cfg, 2, 8, np.float32), 5, threads=1) is None
    for cache, index, m in ((new_cache(cfg, 2, 7, np.float32), 5, mask),      # 5 + 3 > 7
                            (new_cache(cfg, 3, 8, np.float32), 5, mask),      # three rows
                            (new_cache(cfg, 2, 8, np.float32), -1, mask),
                            (new_cache(cfg, 2, 8, np.float32), 5, mask[:, :7])):
        before = cache.copy()
        assert decode_step(params, cfg, ids, m, cache, index, threads=1) is None
        assert np.array_equal(cache, before)
    int8 = quantize_params(params, "int8")
    for S, floats, stored in ((STEP_ROWS // 2, True, True), (STEP_ROWS // 2 + 1, False, True),
                              (STORED_STEP_ROWS // 2 + 1, False, False)):
        long, T = np.ones((2, S), np.int64), S + 1
        for p, takes in ((params, floats), (int8, stored)):
            got = decode_step(p, cfg, long, np.ones((2, T), bool), new_cache(cfg, 2, T, np.float32), 0,
                              threads=1)
            assert (got is not None) == takes, (S, p is int8)


@settings(max_examples=int(os.environ.get("REFOPT_DECODE_EXAMPLES", 12)))
@given(cfg=random_config(max_len=10), dtype=DTYPES, kind=st.sampled_from([None, "bfloat16", "int8"]),
       B=st.integers(1, 4), stop=st.none() | st.lists(st.integers(0, 45), max_size=2),
       temperature=st.sampled_from([1.0, 0.5, 1e7]), threads=st.sampled_from([1, 2]),
       steps=st.integers(1, 4), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_greedy_gives_the_step_by_step_tokens(cfg, dtype, kind, B, stop, temperature, threads, steps,
                                                     ties, seed):
    # GreedySampler's loop through the compiled greedy loop (decode_greedy, several steps a call)
    # against the same sampler step by step (decode_step's logits, NumPy's choice): the same tokens,
    # finished rows and KV cache.  Prompts of different lengths (prompt tokens kept past the
    # shortest), stop tokens, a temperature that makes every pick uncertain (1e7: each step's choice
    # falls back to NumPy), and a token table of equal rows (ties: every logit equal)
    from dataclasses import replace

    from refopt.kernels.cpu.decode import decode_greedy, decode_step
    from refopt.model import forward, init_params, new_cache
    from refopt.quant import quantize_params
    from refopt.samplers import GreedySampler

    cfg = replace(cfg, dtype=np.dtype(dtype).name)
    kind = kind if dtype == np.float32 else None
    threads = threads if dtype == np.float32 and kind is None else 1    # as test_decode_step
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed, std=0.5)
    if ties:
        params["embed_tokens"] = np.repeat(params["embed_tokens"][:1], cfg.vocabulary_size, axis=0)
    if kind:
        params = quantize_params(params, kind)
    T = cfg.max_sequence_length
    lengths = rng.integers(1, T, B)
    seq = rng.integers(0, cfg.vocabulary_size, (B, T))
    mask = np.arange(T)[None, :] < lengths[:, None]
    index = int(lengths.min())
    cache = new_cache(cfg, B, T, dtype)
    forward(params, cfg, seq[:, :index], np.ones((B, index), bool), cache=cache, cache_index=0, ops=ref)
    stop = None if stop is None else tuple(i % cfg.vocabulary_size for i in stop)

    def step_by_step(prompt, cache, i):
        logits, hidden = decode_step(params, cfg, prompt[:, i - 1:i], np.ones((B, i), bool), cache, i - 1,
                                     threads=threads, min_bytes=0)
        return logits[:, 0], hidden[:, 0], cache

    def fused(prompt, cache, i, mask, generated, stop, finished, temperature):
        calls.append(i)
        return decode_greedy(params, cfg, prompt, mask, generated, stop, finished, cache, i, temperature,
                             steps=steps, threads=threads, min_bytes=0)

    def looped(prompt, cache, i):
        return step_by_step(prompt, cache, i)

    looped.greedy_steps = fused
    calls = []
    sampler = GreedySampler(temperature=temperature)
    want_cache, got_cache = cache.copy(), cache.copy()
    want = sampler(step_by_step, seq, cache=want_cache, index=index, mask=mask, stop_token_ids=stop)
    got = sampler(looped, seq, cache=got_cache, index=index, mask=mask, stop_token_ids=stop)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_cache, want_cache)
    assert calls and calls[0] == index                    # the compiled loop ran (or declined: a projection)


@settings(max_examples=60)
@given(V=st.integers(1, 30), dtype=DTYPES, near=st.integers(0, 3), special=st.sampled_from([None, np.nan, np.inf]),
       temperature=st.sampled_from([1.0, 0.3, 3.0, 1e6]), scale=st.sampled_from([1e-3, 1.0, 1e4]),
       ranges=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_a_certain_greedy_pick_is_the_samplers_choice(V, dtype, near, special, temperature, scale, ranges,
                                                      seed):
    # decode._pick (the greedy loop's scan of a row in ranges, some empty, and its decision): when
    # it is certain, its token is argmax(softmax(logits / T)) as GreedySampler computes it in
    # NumPy; logits with exact ties, neighbours a few ulps apart, inf and NaN
    from refopt.kernels.cpu.decode import _pick
    from refopt.samplers import GreedySampler

    rng = np.random.default_rng(seed)
    row = (rng.standard_normal(V) * scale).astype(dtype)
    top = int(np.argmax(row))
    for _ in range(near):                                # ties and near-ties of the largest
        j = int(rng.integers(0, V))
        row[j] = np.nextafter(row[top], dtype(-np.inf), dtype=dtype) if rng.random() < 0.5 else row[top]
        for _ in range(int(rng.integers(0, 4))):
            row[j] = np.nextafter(row[j], dtype(-np.inf), dtype=dtype)
    if special is not None:
        row[int(rng.integers(0, V))] = special
    sampler = GreedySampler(temperature=temperature)
    token, sure = _pick(row[None], 0, dtype(temperature), ranges)
    with np.errstate(all="ignore"):
        want = int(sampler.get_next_token(sampler.compute_probabilities(row[None]))[0])
    if sure:
        assert token == want
    if np.isfinite(row).all() and near == 0 and V > 1:
        gap = np.sort(row)[-1] - np.sort(row)[-2]
        assert sure or gap / temperature < 1e-4 * max(1.0, abs(row).max() / temperature)


def test_background_warm_up_serves_the_numpy_ops_meanwhile():
    # while a warm-up compiles on its thread, every other thread gets the NumPy ops (and no
    # compiled decode step), so nothing waits on Numba's compiler; its own thread gets the kernels
    import threading

    from refopt.kernels.cpu import warmup
    from refopt.config import OPTConfig
    from refopt.model import init_params, new_cache

    gate, seen = threading.Event(), {}

    def exercise():
        seen["inside"] = warmup.busy()
        gate.wait(10)

    job = nb.warm_up(exercise)
    try:
        assert job.running and warmup.busy()
        cfg = OPTConfig(vocabulary_size=11, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4,
                        max_sequence_length=4, dropout=0.0, dtype="float64")
        params = init_params(cfg)
        assert nb.decode_step(params, cfg, np.zeros((1, 1), np.int64), np.ones((1, 1), bool),
                              new_cache(cfg, 1, 1, np.float64), 0) is None
        x = np.random.default_rng(0).standard_normal((2, 3, 5))
        np.testing.assert_array_equal(nb.layernorm_forward(x, None, None, 1e-5),
                                      ref.layernorm_forward(x, None, None, 1e-5))
    finally:
        gate.set()
    assert job.wait(10) and job.error is None
    assert seen["inside"] is False and not warmup.busy()


def test_warm_up_loads_the_step_on_one_thread_too(monkeypatch):
    # the governor runs a step on the calling thread alone now and then (and on a busy machine):
    # generation.prepare loads that entry of the compiled step too, in the background -- its first
    # call otherwise loaded it from Numba's cache mid-generation (47-56 ms against a step's 8-11)
    from refopt import generation
    from refopt.config import OPTConfig
    from refopt.model import init_params
    from refopt.models.opt_backbone import OPTBackbone
    from refopt.models.opt_causal_lm import OPTCausalLM

    cfg = OPTConfig(vocabulary_size=11, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4,
                    max_sequence_length=4, dropout=0.0, dtype="float32")
    lm = OPTCausalLM(OPTBackbone.from_opt_config(cfg, init_params(cfg)), preprocessor=None)
    lm.backbone.backend = "numba"
    calls, step = [], nb.decode_step

    def recording(*args, **kwargs):
        calls.append(kwargs.get("threads"))
        return step(*args, **kwargs)
    monkeypatch.setattr(nb, "decode_step", recording)
    job = generation.prepare(lm)
    assert job is not None and job.wait(120) and job.error is None
    assert 1 in calls


def test_governor_follows_the_faster_thread_count():
    from refopt.kernels.cpu._threads import Governor

    g = Governor()
    speed = {1: 1.0, 2: 0.5}                      # seconds per call on each count: two threads win

    def run(n_calls):
        used = []
        for _ in range(n_calls):
            n = g.threads("k", 2, 1)
            g.record("k", n, speed[n])
            used.append(n)
        return used

    used = run(40)
    assert used[0] == 1 and used[-5:] == [2] * 5  # started on one thread, moved to two
    speed[2] = 5.0                                # a core got busy: two threads are slow now
    used = run(60)                                # three slow calls, then one thread (and probes,
    assert used[3:].count(2) <= 4                 # fewer and fewer, of two)
    probes = run(300).count(2)                    # losing comparisons become rare
    assert 1 <= probes <= 4
    speed[1], speed[2] = 3.0, 0.5                 # the count in use slows down 3x: the next
    assert run(6)[-2:] == [2, 2]                  # comparison comes after three calls, not 256
    assert g.threads("other", 1, 1) == 1          # one thread allowed: nothing to choose
    assert not g.probing("k", 2) and g.probing("k", 1) and not g.probing("never called", 2)


def test_governor_returns_to_all_threads_soon_after_the_load_goes():
    # greedy calls of 32 steps: a busy core makes one thread the faster count, and the comparisons
    # that lose meanwhile must not push the next one minutes away -- at most Governor.SECONDS of
    # calls (here 8 calls of 0.32 s; without the cap, 256 calls after a long busy spell)
    from refopt.kernels.cpu._threads import Governor

    g = Governor()
    per_step = {1: 0.010, 2: 0.005}

    def run(n_calls, steps=32):
        used = []
        for _ in range(n_calls):
            n = g.threads("k", 2, 2)
            g.record("k", n, per_step[n], per_step[n] * steps)
            used.append(n)
        return used

    use = lambda: g._state["k"]["use"]            # noqa: E731
    run(20)
    assert use() == 2
    per_step[2] = 0.030                            # a core busy: two threads 3x slower than one
    assert run(400).count(2) < 60 and use() == 1   # a long busy spell, on one thread
    per_step[2] = 0.005                            # the core is free again
    run(Governor.FIRST + 2)
    assert use() == 2
    # calls that are short take the interval to its cap of 256 calls as before
    g2, speed = Governor(), {1: 1e-4, 2: 5e-4}
    for _ in range(2000):
        n = g2.threads("k", 2, 1)
        g2.record("k", n, speed[n], speed[n])
    assert g2._state["k"]["interval"] == Governor.LAST


def test_greedy_comparisons_run_one_step(monkeypatch):
    # a greedy call that the governor runs on the other thread count (a comparison) commits one
    # step, not ``steps``: a slow count costs one token's time, not eight
    import numba

    from refopt.config import OPTConfig
    from refopt.kernels.cpu import _threads, decode
    from refopt.model import init_params, new_cache

    if numba.get_num_threads() < 2:
        pytest.skip("one Numba thread: nothing to compare")
    seen = []

    class Recording(_threads.Governor):
        def threads(self, key, most, start):
            n = super().threads(key, most, start)
            seen.append(self.probing(key, n))
            return n

    monkeypatch.setattr(decode, "governor", Recording())
    cfg = OPTConfig(vocabulary_size=40, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
                    max_sequence_length=24)
    params = init_params(cfg, seed=0, std=0.5)
    seq = np.ones((1, 24), np.int64)
    prompt = np.arange(24)[None, :] < 2
    committed = []
    for _ in range(40):                              # comparisons come now and then among these
        cache = new_cache(cfg, 1, 24, np.float32)
        index, _ = decode.decode_greedy(params, cfg, seq.copy(), prompt, ~prompt, None, np.zeros(1, bool),
                                        cache, 2, steps=8)
        committed.append((seen[-1], index - 2))
    assert any(p for p, _ in committed) and all(c <= 1 for p, c in committed if p)
    assert max(c for p, c in committed if not p) == 8


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_claimed_stages_run_each_chunk_once_and_in_order(parts):
    # the fused decode step's work sharing (refopt.kernels.cpu.sync): every chunk of every stage
    # done exactly once, by one thread, only after the previous stage finished (own segments first,
    # then the others' from the back: 7 chunks cut unevenly) -- with more
    # iterations than threads too (the region's iterations then run one after another)
    from numba import njit, prange

    from refopt.kernels.cpu import sync

    @njit(parallel=True)
    def run(counters, stages, n, out, parts):
        for t in prange(parts):
            sync.spread(counters, stages, n, out, t)

    out = np.zeros((40, 7), np.int64)
    run(sync.counters(40, parts), 40, 7, out, parts)
    assert ((out % 100 == 1) & (out >= 1) & (out // 100 < parts)).all()   # once, by one thread


@pytest.mark.skipif(not hasattr(os, "RTLD_DEEPBIND"), reason="deep binding is glibc's")
@pytest.mark.parametrize("loaded, user_set", [(True, False), (False, False), (True, True)])
def test_threading_layer_gets_its_own_passive_openmp_runtime(monkeypatch, loaded, user_set):
    # an OpenMP runtime already loaded (PyTorch's, imported first) would otherwise serve Numba's
    # calls with the spinning waits it read at its own start: Numba's layer is loaded deep-bound
    # with OMP_WAIT_POLICY=PASSIVE set, and both settings are restored afterwards
    import sys

    from numba.np.ufunc import parallel

    from refopt.kernels.cpu import _threads

    calls = []
    monkeypatch.setattr(parallel, "_launch_threads", lambda: calls.append(
        {"flags": sys.getdlopenflags(), "policy": os.environ.get("OMP_WAIT_POLICY")}))
    monkeypatch.setattr(_threads, "_configured", False)
    monkeypatch.setattr(_threads, "openmp_loaded", lambda: loaded)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    if user_set:
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    else:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    flags = sys.getdlopenflags()
    _threads.configure()
    _threads.configure()                          # once only
    assert len(calls) == 1
    seen = calls[0]
    assert bool(seen["flags"] & os.RTLD_DEEPBIND) == (loaded and not user_set)
    assert seen["policy"] == ("ACTIVE" if user_set else "PASSIVE")
    assert sys.getdlopenflags() == flags
    assert os.environ.get("OMP_WAIT_POLICY") == ("ACTIVE" if user_set else None)
