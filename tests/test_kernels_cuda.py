"""The CUDA backend against the NumPy reference: every kernel (hypothesis), the ops namespace through
the whole model and its gradients, and the device-resident decode loop against ``generate``.

Runs on a GPU at full size, and in CI under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)
on small shapes and few examples (each simulated thread is a Python thread).  Tolerances: float64
within 1e-12 relative, float32 within 1e-5 (relative to the natural scale of the terms: for a
product, ``|a| @ |b|``); sampler choices identical.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refopt import backend
from refopt import philox

if not backend.available("cuda"):
    pytest.skip("the cuda backend is not available here: needs numba.cuda with a CUDA GPU, or "
                "NUMBA_ENABLE_CUDASIM=1 for Numba's simulator", allow_module_level=True)

import refopt.kernels.cuda as gpu  # noqa: E402
import refopt.ops as ref  # noqa: E402
from numba import cuda  # noqa: E402
from refopt.kernels.cuda import attention as gattn  # noqa: E402
from refopt.kernels.cuda import gemm as ggemm  # noqa: E402
from refopt.kernels.cuda._common import SIM  # noqa: E402
from kernel_checks import (  # noqa: E402
    check_cross_entropy, check_embedding, check_layernorm, probabilities)
from tests_support import DTYPES, arrays, close  # noqa: E402

FULL = not SIM                    # a real GPU: full sizes and more examples
EX = 15 if FULL else 4            # hypothesis examples per test (each new shape compiles on a GPU)


def big(n):
    return n * 8 if FULL else n


# ---------------------------------------------------------------------------------- products
@settings(max_examples=EX)
@given(dtype=DTYPES, layout=st.sampled_from(ggemm.LAYOUTS), Z=st.integers(1, 2), M=st.integers(1, big(40)),
       N=st.integers(1, big(40)), K=st.integers(1, big(20)), bias=st.booleans(), relu=st.booleans(),
       accumulate=st.booleans(), seed=st.integers(0, 2**16))
def test_gemm(dtype, layout, Z, M, N, K, bias, relu, accumulate, seed):
    rng = np.random.default_rng(seed)
    A = arrays(rng, (Z, K, M) if layout == "tn" else (Z, M, K), dtype)
    B = arrays(rng, (Z, N, K) if layout == "nt" else (Z, K, N), dtype)
    b = arrays(rng, (N,), dtype)
    C0 = arrays(rng, (Z, M, N), dtype)
    a = A.transpose(0, 2, 1) if layout == "tn" else A
    bb = B.transpose(0, 2, 1) if layout == "nt" else B
    want = a @ bb + (b if bias else 0)
    want = np.maximum(want, 0) if relu else want
    want = want + C0 if accumulate else want
    out = cuda.to_device(C0)
    ggemm.gemm(cuda.to_device(A), cuda.to_device(B), layout, bias=cuda.to_device(b) if bias else None,
               relu=relu, out=out, accumulate=accumulate)
    scale = (np.abs(a) @ np.abs(bb)).max() + np.abs(C0).max()
    close(out.copy_to_host(), want, dtype, f"gemm {layout}", scale)


@pytest.mark.parametrize("layout", ggemm.LAYOUTS)
@pytest.mark.parametrize("splits", [2, 3])
def test_gemm_split_k(layout, splits):
    # products cut over K into partial products summed in order (the last slice ragged)
    rng = np.random.default_rng(splits)
    K, M, N = (1000, 300, 200) if FULL else (19, 9, 7)
    for dtype in (np.float32, np.float64):
        A = arrays(rng, (K, M) if layout == "tn" else (M, K), dtype)
        B = arrays(rng, (N, K) if layout == "nt" else (K, N), dtype)
        a = A.T if layout == "tn" else A
        b = B.T if layout == "nt" else B
        out = ggemm.gemm(cuda.to_device(A), cuda.to_device(B), layout, splits=splits).copy_to_host()
        close(out, a @ b, dtype, f"{layout} split-K {splits}", (np.abs(a) @ np.abs(b)).max())


def epilogue(y, b, P, G, C0, R, bias, relu, keep, gate, accumulate, residual):
    """The fused epilogue in NumPy, in the kernels' order: bias, ReLU, dropout multiplier, ReLU
    gate, accumulate, residual."""
    y = y + (b if bias else 0)
    y = np.maximum(y, 0) if relu else y
    y = y * P if keep else y
    y = np.where(G <= 0, 0, y) if gate else y
    y = y + C0 if accumulate else y
    return R + y if residual else y


@settings(max_examples=EX)
@given(dtype=DTYPES, layout=st.sampled_from(ggemm.LAYOUTS), splits=st.integers(2, 4),
       M=st.integers(1, big(20)), N=st.integers(1, big(20)), K=st.integers(1, big(40)),
       flags=st.lists(st.booleans(), min_size=6, max_size=6), seed=st.integers(0, 2**16))
def test_gemm_split_k_epilogues(dtype, layout, splits, M, N, K, flags, seed):
    # the split product's epilogue (bias, ReLU, dropout multiplier, ReLU gate, accumulate,
    # residual) runs in the kernel that sums the slices, in the one-pass kernel's order
    bias, relu, keep, gate, accumulate, residual = flags
    rng = np.random.default_rng(seed)
    A = arrays(rng, (K, M) if layout == "tn" else (M, K), dtype)
    B = arrays(rng, (N, K) if layout == "nt" else (K, N), dtype)
    b, P, G, R, C0 = (arrays(rng, shape, dtype) for shape in ((N,), (M, N), (M, N), (M, N), (M, N)))
    a_ = A.T if layout == "tn" else A
    b_ = B.T if layout == "nt" else B
    want = epilogue(a_ @ b_, b, P, G, C0, R, bias, relu, keep, gate, accumulate, residual)
    out = cuda.to_device(C0)
    dev = cuda.to_device
    ggemm.gemm(dev(A), dev(B), layout, bias=dev(b) if bias else None, relu=relu, out=out,
               accumulate=accumulate, residual=dev(R) if residual else None,
               gate=dev(G) if gate else None, keep=dev(P) if keep else None, splits=splits)
    scale = (np.abs(a_) @ np.abs(b_)).max() * np.abs(P).max() + np.abs(C0).max() + np.abs(R).max()
    close(out.copy_to_host(), want, dtype, f"split {layout}", scale)


@pytest.mark.parametrize("config", list(ggemm.CONFIGS))
def test_gemm_every_tile_configuration(config):
    # each tile shape on a product that is not a multiple of it
    rng = np.random.default_rng(1)
    M, N, K = (300, 260, 37) if FULL else (21, 19, 11)
    for layout in ggemm.LAYOUTS:
        A = arrays(rng, (K, M) if layout == "tn" else (M, K), np.float32)
        B = arrays(rng, (N, K) if layout == "nt" else (K, N), np.float32)
        a = A.T if layout == "tn" else A
        b = B.T if layout == "nt" else B
        out = ggemm.gemm(cuda.to_device(A), cuda.to_device(B), layout, config=config).copy_to_host()
        close(out, a @ b, np.float32, f"{config} {layout}", (np.abs(a) @ np.abs(b)).max())


V2_FLAGS = [(False,) * 6, (True, True, False, False, True, False), (True,) * 6]


@settings(max_examples=min(EX, 8))     # (each new kernel of v2 compiles for 5-10 s on a GPU)
@given(layout=st.sampled_from(ggemm.LAYOUTS), Z=st.integers(1, 2), M=st.integers(1, big(10)),
       N=st.integers(1, big(10)), K=st.integers(1, big(10)), splits=st.sampled_from([1, 2, 3]),
       flags=st.sampled_from(V2_FLAGS), config=st.sampled_from([None, "large16", "wide", "large"]),
       seed=st.integers(0, 2**16))
def test_gemm_v2(layout, Z, M, N, K, splits, flags, config, seed):
    # the second kernel (16-byte global loads, generated slice steps) against NumPy: float32, the
    # contiguous dimensions multiples of 4 (M, N, K drawn as 4x), no epilogue, bias + ReLU +
    # accumulate, or all six terms (the epilogue's code is v1's; the loads are what is new), split
    # and whole, in the tiles v2 takes on a GPU (its default, large16, wide, large)
    M, N, K = 4 * M, 4 * N, 4 * K
    bias, relu, keep, gate, accumulate, residual = flags
    if Z > 1:
        splits = 1                                 # batches are never split
    rng = np.random.default_rng(seed)
    A = arrays(rng, (Z, K, M) if layout == "tn" else (Z, M, K), np.float32)
    B = arrays(rng, (Z, N, K) if layout == "nt" else (Z, K, N), np.float32)
    b, P, G, R, C0 = (arrays(rng, shape, np.float32) for shape in ((N,), (Z, M, N), (Z, M, N), (Z, M, N), (Z, M, N)))
    a_ = A.transpose(0, 2, 1) if layout == "tn" else A
    b_ = B.transpose(0, 2, 1) if layout == "nt" else B
    want = epilogue(a_ @ b_, b, P, G, C0, R, bias, relu, keep, gate, accumulate, residual)
    dev = cuda.to_device
    if Z == 1:
        A, B, P, G, R, C0, want = A[0], B[0], P[0], G[0], R[0], C0[0], want[0]
    assert ggemm._v2_fits(dev(A), dev(B), layout, M, N, K)
    out = dev(C0)
    ggemm.gemm(dev(A), dev(B), layout, bias=dev(b) if bias else None, relu=relu, out=out,
               accumulate=accumulate, residual=dev(R) if residual else None,
               gate=dev(G) if gate else None, keep=dev(P) if keep else None,
               splits=splits if Z == 1 else None, variant="v2", config=None if SIM else config)
    scale = (np.abs(a_) @ np.abs(b_)).max() * np.abs(P).max() + np.abs(C0).max() + np.abs(R).max()
    close(out.copy_to_host(), want, np.float32, f"v2 {layout} split {splits}", scale)


def test_gemm_v2_falls_back():
    # variant="v2" on operands it cannot take (a contiguous dimension not a multiple of 4,
    # float64) launches the first kernel: same results
    rng = np.random.default_rng(5)
    for dtype, (M, N, K) in ((np.float32, (9, 8, 7)), (np.float64, (8, 8, 8))):
        A, B = arrays(rng, (M, K), dtype), arrays(rng, (N, K), dtype)
        assert not ggemm._v2_fits(cuda.to_device(A), cuda.to_device(B), "nt", M, N, K)
        out = ggemm.gemm(cuda.to_device(A), cuda.to_device(B), "nt", variant="v2").copy_to_host()
        close(out, A @ B.T, dtype, "v2 fallback", (np.abs(A) @ np.abs(B.T)).max())
    with pytest.raises(ValueError):
        ggemm.gemm(cuda.to_device(A), cuda.to_device(B), "nt", variant="v3")


def test_launch_marshals_arrays_as_numba():
    # the fast launcher's argument list for an array (launch.View): meminfo, parent, size,
    # itemsize, data, shape, byte strides -- the strides of a C-contiguous NumPy array
    from refopt.kernels.cuda import launch

    for shape, dtype in (((7,), np.float32), ((3, 5), np.float64), ((2, 3, 4), np.float32), ((1, 1), np.float32)):
        got = launch._marshal([launch.View(4096, shape, np.dtype(dtype))])
        want = np.empty(shape, dtype)
        assert got == [0, 0, want.size, want.itemsize, 4096, *shape, *want.strides]
    scalars = launch._marshal([np.int32(-3), 7, np.float32(0.5), 2.25])
    assert [type(v).__name__ for v in scalars] == ["c_int", "c_long", "c_float", "c_double"]
    assert [v.value for v in scalars] == [-3, 7, 0.5, 2.25]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("fast", [True, False])
def test_gemm_launch_paths(fast, splits, monkeypatch):
    # the same product through launch.launcher's cached path and through Numba's dispatcher
    # (REFOPT_FAST_LAUNCH=0), every epilogue operand, split and whole, and a batch of products
    from refopt.kernels.cuda import launch

    if SIM and fast:
        pytest.skip("the fast launcher runs on a GPU only (the simulator has no pointers)")
    monkeypatch.setattr(launch, "FAST", fast)
    rng = np.random.default_rng(3)
    M, N, K = (200, 150, 700) if FULL else (9, 7, 13)
    A, B, C0 = (arrays(rng, s, np.float32) for s in ((K, M), (K, N), (M, N)))
    R, G, P = (arrays(rng, (M, N), np.float32) for _ in range(3))
    bias = arrays(rng, (N,), np.float32)
    dev = cuda.to_device
    out = dev(C0)
    ggemm.gemm(dev(A), dev(B), "tn", bias=dev(bias), relu=True, out=out, accumulate=True,
               residual=dev(R), gate=dev(G), keep=dev(P), splits=splits)
    want = np.where(G <= 0, 0, np.maximum(A.T @ B + bias, 0) * P) + C0 + R
    scale = (np.abs(A.T) @ np.abs(B)).max() * np.abs(P).max() + np.abs(C0).max() + np.abs(R).max()
    close(out.copy_to_host(), want, np.float32, f"fast={fast} split {splits}", scale)
    def stacked(*xs):     # (np.stack keeps the transposes' layout: C order for the transfer)
        return dev(np.ascontiguousarray(np.stack(xs)))
    batch = ggemm.gemm(stacked(A.T, A.T[::-1]), stacked(B.T, B.T), "nt", residual=stacked(R, R))
    got = batch.copy_to_host()
    close(got[0], A.T @ B + R, np.float32, f"fast={fast} batch 0", scale)
    close(got[1], A.T[::-1] @ B + R, np.float32, f"fast={fast} batch 1", scale)


@pytest.mark.parametrize("direct", [True, False])
def test_gemm_plans_replay(monkeypatch, direct):
    # a product repeated with the same arguments replays its bound launches (gemm's plans): new
    # contents at the same addresses give the new product, a different output or epilogue is
    # another plan, and a split-K workspace that grows (a larger split product in between)
    # invalidates the plans holding the old one; the same again with the launches through
    # cuda.core.launch (launch.DIRECT off)
    from refopt.kernels.cuda import launch

    if SIM:
        pytest.skip("gemm's plans are kept on the fast launch path, a GPU only")
    monkeypatch.setattr(ggemm, "_PLANS", {})
    monkeypatch.setattr(ggemm, "_WORKSPACE", {})
    monkeypatch.setattr(launch, "DIRECT", direct)
    rng = np.random.default_rng(5)
    M, N, K = 96, 80, 1024
    A, B = arrays(rng, (M, K), np.float32), arrays(rng, (N, K), np.float32)
    dA, dB, out = cuda.to_device(A), cuda.to_device(B), cuda.device_array((M, N), np.float32)
    scale = (np.abs(A) @ np.abs(B).T).max()
    for splits in (None, 1, 4):
        ggemm.gemm(dA, dB, "nt", out=out, splits=splits)
        close(out.copy_to_host(), A @ B.T, np.float32, f"first call, splits {splits}", scale)
        assert launch.FAST and len(ggemm._PLANS) >= 1
        # the bound launches go to cuLaunchKernel directly (launch.DIRECT), not through cuda.core
        assert all(hasattr(go, "keep") == launch.DIRECT for plan in ggemm._PLANS.values() for go in plan)
        A2 = arrays(rng, (M, K), np.float32)
        dA.copy_to_device(A2)                            # same address, new contents
        ggemm.gemm(dA, dB, "nt", out=out, splits=splits)
        close(out.copy_to_host(), A2 @ B.T, np.float32, f"replayed, splits {splits}", scale)
        ggemm.gemm(dA, dB, "nt", out=out, splits=splits, relu=True)
        close(out.copy_to_host(), np.maximum(A2 @ B.T, 0), np.float32, f"relu, splits {splits}", scale)
        ggemm.gemm(dA, dB, "nt", out=out, splits=splits, accumulate=True)
        close(out.copy_to_host(), np.maximum(A2 @ B.T, 0) + A2 @ B.T, np.float32,
              f"accumulated, splits {splits}", 2 * scale)
        dA.copy_to_device(A)
    ggemm.gemm(dA, dB, "nt", out=out, splits=4)          # a plan holding the small workspace
    big_a, big_b = arrays(rng, (512, K), np.float32), arrays(rng, (384, K), np.float32)
    big_out = cuda.device_array((512, 384), np.float32)
    ggemm.gemm(cuda.to_device(big_a), cuda.to_device(big_b), "nt", out=big_out, splits=8)
    close(big_out.copy_to_host(), big_a @ big_b.T, np.float32, "the larger split product",
          (np.abs(big_a) @ np.abs(big_b).T).max())
    assert len(ggemm._PLANS) == 1                        # the old workspace's plans are gone
    ggemm.gemm(dA, dB, "nt", out=out, splits=4)
    close(out.copy_to_host(), A @ B.T, np.float32, "after the workspace grew", scale)


@settings(max_examples=EX)
@given(dtype=DTYPES, M=st.integers(1, big(9)), I=st.integers(1, big(30)), O=st.integers(1, big(40)),
       bias=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_namespace(dtype, M, I, O, bias, relu, seed):
    rng = np.random.default_rng(seed)
    x, w = arrays(rng, (2, M, I), dtype), arrays(rng, (O, I), dtype)
    b = arrays(rng, (O,), dtype) if bias else None
    fn, rfn = (gpu.linear_relu_forward, ref.linear_relu_forward) if relu else (gpu.linear_forward, ref.linear_forward)
    scale = (np.abs(x) @ np.abs(w).T).max() + 1
    close(fn(x, w, b), rfn(x, w, b), dtype, "linear", scale)
    close(gpu.lm_head_forward(x, w), ref.lm_head_forward(x, w), dtype, "head", scale)
    d_y = arrays(rng, (2, M, O), dtype)
    for got, want, what in zip(gpu.linear_backward(d_y, x, w, bias), ref.linear_backward(d_y, x, w, bias),
                               ("d_x", "d_w", "d_b")):
        assert (got is None) == (want is None)
        if got is not None:
            close(got, want, dtype, what, np.abs(want).max() + np.abs(d_y).max() * max(I, O, M))


# ---------------------------------------------------------------------------------- attention
@settings(max_examples=EX)
@given(dtype=DTYPES, B=st.integers(1, 2), H=st.integers(1, 2), S=st.integers(1, big(9)),
       extra=st.integers(0, big(6)), K=st.sampled_from([1, 5, 8, 64, 80, 128]), seed=st.integers(0, 2**16),
       left=st.booleans())
def test_attention_namespace(dtype, B, H, S, extra, K, seed, left):
    # the dense-mask path of the ops namespace, its rebuilt probabilities and the backward
    rng = np.random.default_rng(seed)
    T = S + extra
    q, k, v = arrays(rng, (B, H, S, K), dtype), arrays(rng, (B, H, T, K), dtype), arrays(rng, (B, H, T, K), dtype)
    lengths = rng.integers(0, T + 1, B)
    cols = np.arange(T)
    key_mask = np.stack([(cols >= T - n) if left else (cols < n) for n in lengths])
    mask = ref.attention_mask(key_mask, np.arange(extra, T))
    out, probs = gpu.attention_forward(q, k, v, mask)
    r_out, r_probs = ref.attention_forward(q, k, v, mask)
    close(out, r_out, dtype, "out")
    close(np.asarray(probs), r_probs, dtype, "probs")
    d_out = arrays(rng, q.shape, dtype)
    for got, want, what in zip(gpu.attention_backward(d_out, q, k, v, probs, mask),
                               ref.attention_backward(d_out, q, k, v, r_probs, mask), ("d_q", "d_k", "d_v")):
        close(got, want, dtype, what, np.abs(want).max() + np.abs(d_out).max())


@settings(max_examples=EX)
@given(B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, big(12)), extra=st.integers(0, big(20)),
       K=st.sampled_from([4, 5, 16, 64, 100]), seed=st.integers(0, 2**16), left=st.booleans())
def test_flash_causal_structured(B, H, S, extra, K, seed, left):
    # the structured path (key padding + causal, tiles above the diagonal skipped, q scaled on load,
    # the row statistics m and l): float32 head widths in fours take the second forward
    # (make_flash_forward_v2), K = 5 the first
    rng = np.random.default_rng(seed)
    T = S + extra
    dt = np.float32
    q, k, v = arrays(rng, (B, H, S, K), dt), arrays(rng, (B, H, T, K), dt), arrays(rng, (B, H, T, K), dt)
    lengths = rng.integers(0, T + 1, B)
    cols = np.arange(T)
    key_mask = np.stack([(cols >= T - n) if left else (cols < n) for n in lengths])
    mask = ref.attention_mask(key_mask, np.arange(extra, T))
    scale = np.float32(K ** -0.5)
    r_out, _ = ref.attention_forward(q * scale, k, v, mask)
    out = cuda.device_array(q.size, dt)
    m, l = cuda.device_array(B * H * S, dt), cuda.device_array(B * H * S, dt)
    qd, kd, vd = (cuda.to_device(a.ravel()) for a in (q, k, v))
    strides = (H * S * K, S * K, K), (H * T * K, T * K, K), (H * T * K, T * K, K)
    assert gattn.v2_fits(dt, K, (qd, kd, vd), strides) == (K % 4 == 0)
    gattn.flash_attention(qd, kd, vd, out, *strides, (H * S * K, S * K, K), B, H, S, T, K,
                          key_mask=cuda.to_device(key_mask.astype(np.uint8)), causal=True, q_offset=extra,
                          scale=float(scale), stats=(m, l))
    close(out.copy_to_host().reshape(q.shape), r_out, dt, "flash causal")
    # the statistics the backward rebuilds the probabilities from: m the row's largest score (masked
    # scores lowest), l the sum of exp(score - m) over all T keys
    qs = q * scale
    scores = np.where(mask, qs @ k.transpose(0, 1, 3, 2), np.finfo(dt).min)
    r_m = scores.max(-1)
    r_l = np.exp(scores - r_m[..., None]).sum(-1)
    got_m = m.copy_to_host().reshape(r_m.shape)
    real = r_m > np.finfo(dt).min
    assert np.array_equal(got_m[~real], r_m[~real])          # rows with no allowed key: lowest
    close(got_m[real], r_m[real], dt, "m", (np.abs(qs) @ np.abs(k).transpose(0, 1, 3, 2)).max())
    close(l.copy_to_host().reshape(r_l.shape), r_l, dt, "l")


# ---------------------------------------------------------------------------------- rows
@settings(max_examples=EX)
@given(dtype=DTYPES, N=st.integers(1, big(5)), D=st.integers(1, big(40)), affine=st.booleans(),
       seed=st.integers(0, 2**16))
def test_layernorm(dtype, N, D, affine, seed):
    check_layernorm(gpu, dtype, N, D, affine, seed)


@settings(max_examples=EX)
@given(dtype=DTYPES, B=st.integers(1, 2), S=st.integers(1, 3), V=st.integers(2, big(60)),
       seed=st.integers(0, 2**16))
def test_cross_entropy(dtype, B, S, V, seed):
    check_cross_entropy(gpu, dtype, B, S, V, seed)


@settings(max_examples=EX)
@given(dtype=DTYPES, N=st.integers(1, 3), V=st.integers(1, big(60)),
       temperature=st.sampled_from([1.0, 0.7, 2.5]), seed=st.integers(0, 2**16))
def test_softmax_rows(dtype, N, V, temperature, seed):
    # the row softmax (rows.softmax: the formulas the decode kernel's softmax stage shares) against
    # the reference's softmax(x / temperature); at temperature 1 the probabilities of the
    # cross-entropy kernel, which runs the same steps, bit for bit
    from refopt.kernels.cuda import rows

    rng = np.random.default_rng(seed)
    x = arrays(rng, (N, V), dtype, 4.0)
    got = rows.softmax(cuda.to_device(x), temperature).copy_to_host()
    close(got, ref.softmax(x / np.dtype(dtype).type(temperature)), dtype, "probs")
    if temperature == 1.0:
        _, probs = rows.cross_entropy(cuda.to_device(x), cuda.to_device(np.zeros(N, np.int64)))
        assert np.array_equal(got, probs.copy_to_host())


@settings(max_examples=EX)
@given(dtype=DTYPES, V=st.integers(1, big(20)), E=st.integers(1, big(30)), N=st.integers(1, big(9)),
       seed=st.integers(0, 2**16))
def test_embedding_gather_scatter(dtype, V, E, N, seed):
    check_embedding(gpu, dtype, V, E, N, seed, exact_backward=True)


@settings(max_examples=EX)
@given(dtype=DTYPES, n=st.integers(1, big(50)), decay=st.sampled_from([0.0, 1e-3]), amsgrad=st.booleans(),
       seed=st.integers(0, 2**16))
def test_adam_update(dtype, n, decay, amsgrad, seed):
    from refopt.kernels.cpu import optim

    rng = np.random.default_rng(seed)
    var, grad = arrays(rng, (n, 2), dtype), arrays(rng, (n, 2), dtype)
    m, v = arrays(rng, (n, 2), dtype), np.abs(arrays(rng, (n, 2), dtype))
    vh = np.abs(arrays(rng, (n, 2), dtype)) if amsgrad else None
    mine = [a.copy() if a is not None else None for a in (var, m, v, vh)]
    want = [a.copy() if a is not None else None for a in (var, m, v, vh)]
    gpu.adam_update(mine[0], grad, mine[1], mine[2], mine[3], decay, 0.9, 0.999, 1e-3, 1e-7)
    optim.adam_update(want[0], grad, want[1], want[2], want[3], decay, 0.9, 0.999, 1e-3, 1e-7)
    for a, b, what in zip(mine, want, ("var", "m", "v", "v_hat")):
        if a is not None:
            close(a, b, dtype, what)


# ---------------------------------------------------------------------------------- sampling
@settings(max_examples=EX)
@given(seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=5), step=st.integers(0, 2**32 - 1),
       stream=st.integers(0, 3))
def test_philox_uniforms(seeds, step, stream):
    assert np.array_equal(gpu.uniform(seeds, step, stream), philox.uniform(seeds, step, stream))


@settings(max_examples=EX)
@given(B=st.integers(1, 2), V=st.integers(1, big(40)), ties=st.booleans(), seed=st.integers(0, 2**16),
       k=st.integers(1, big(50)), top_p=st.floats(1e-6, 1.0), min_p=st.floats(0.0, 1.0), keep=st.integers(1, 4))
def test_selection_steps(B, V, ties, seed, k, top_p, min_p, keep):
    from refopt.samplers import MinPSampler, TopPSampler

    rng = np.random.default_rng(seed)
    p = probabilities(rng, B, V, ties)
    assert np.array_equal(gpu.top_k_mask(p, k), ref.top_k_mask(p, k))
    with backend.use_backend("numpy"):
        want_p = TopPSampler(p=top_p, k=k).next_token_distribution(p)
        want_m = MinPSampler(min_p=min_p, min_tokens_to_keep=keep).next_token_distribution(p)
    assert np.array_equal(gpu.top_p_distribution(p, top_p, k), want_p)
    assert np.array_equal(gpu.min_p_distribution(p, min_p, keep), want_m)
    u = rng.random(B)
    w = np.where(ref.top_k_mask(p, k), p, 0.0)
    assert np.array_equal(gpu.choose(w, u), philox.choose(w, u))
    assert np.array_equal(gpu.choose(p, u), philox.choose(p, u))


def test_choose_rejects_bad_weights():
    from refopt.errors import SamplerError

    with pytest.raises(SamplerError, match="row 1"):
        gpu.choose(np.array([[0.5, 0.5], [np.nan, 1.0]]), np.array([0.1, 0.2]))


# ---------------------------------------------------------------------------------- the model
def _config(pre_ln=True, proj=False, dtype=None, layers=2):
    from refopt.config import OPTConfig

    return OPTConfig(vocabulary_size=big(23), num_layers=layers, num_heads=2, hidden_dim=big(6),
                     intermediate_dim=big(7), max_sequence_length=16, dropout=0.0,
                     do_layer_norm_before=pre_ln, word_embed_proj_dim=5 if proj else None, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_logits_and_gradients(dtype):
    from refopt.model import init_params, logits_forward
    from refopt.training.gradients import loss_and_gradients

    cfg = _config(pre_ln=dtype == "float32", proj=dtype == "float64", dtype=dtype, layers=2 if FULL else 1)
    params = init_params(cfg, seed=3, std=0.3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocabulary_size, (2, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    dt = np.dtype(dtype)
    want = logits_forward(params, cfg, ids, mask, ops=ref)
    close(logits_forward(params, cfg, ids, mask, ops=gpu), want, dt, "logits")
    y = np.roll(ids, -1, axis=1)
    loss, grads = loss_and_gradients(params, cfg, {"token_ids": ids, "padding_mask": mask}, y, ops=gpu)
    r_loss, r_grads = loss_and_gradients(params, cfg, {"token_ids": ids, "padding_mask": mask}, y, ops=ref)
    assert abs(loss - r_loss) <= (1e-12 if dtype == "float64" else 1e-5) * abs(r_loss)
    # some gradients are exactly zero in exact arithmetic (k_proj's bias: the softmax ignores a
    # constant shift), so each is measured against the largest gradient of the model as well
    top = max(np.abs(g).max() for g in r_grads.values())
    for name, g in r_grads.items():
        close(grads[name], g, dt, name, max(np.abs(g).max(), 0.01 * top))


def test_fit_runs_on_cuda():
    from refopt.models import OPTBackbone, OPTCausalLM
    from refopt.optimizers import AdamW

    cfg = _config(layers=1)
    lm = OPTCausalLM(OPTBackbone.from_opt_config(cfg))
    lm.backend = "cuda"
    lm.compile(optimizer=AdamW(learning_rate=0.05))
    ids = np.random.default_rng(0).integers(0, cfg.vocabulary_size, (2, 4))
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    history = lm.fit(x, np.roll(ids, -1, 1), batch_size=2, epochs=2, verbose=0, shuffle=False)
    assert history.history["loss"][1] < history.history["loss"][0]


# ---------------------------------------------------------------------------------- decoding
def _lm(pre_ln, proj, seed=1):
    from refopt.model import init_params
    from refopt.models import OPTBackbone, OPTCausalLM

    cfg = _config(pre_ln=pre_ln, proj=proj)
    params = init_params(cfg, seed=seed, std=0.6)
    rng = np.random.default_rng(seed)
    for name, value in params.items():   # biases, offsets and gains that are not 0 and 1: an offset
        if name.endswith(("bias", "beta", "gamma")):   # or gain read from the wrong place shows
            params[name] = (rng.standard_normal(np.shape(value)) * 0.3
                            + name.endswith("gamma")).astype(np.asarray(value).dtype)
    return OPTCausalLM(OPTBackbone.from_opt_config(cfg, params))


def _samplers():
    from refopt.samplers import GreedySampler, MinPSampler, RandomSampler, TopKSampler, TopPSampler

    return [GreedySampler(), TopKSampler(k=3, seed=5, temperature=0.7), RandomSampler(seed=7),
            TopPSampler(p=0.5, seed=3), MinPSampler(min_p=0.2, min_tokens_to_keep=2, seed=9)]


def _generate_as_numpy(lm, x, samplers, seed=None):
    # the device loop (cuda) against the host loop on the NumPy ops: the same tokens and output
    # mask for every sampler (the probabilities agree to rounding; the rules exactly)
    for sampler in samplers:
        lm.compile(sampler=sampler)
        lm.backend = "numpy"
        want = lm.generate(x, stop_token_ids=None, seed=seed)
        lm.backend = "cuda"
        got = lm.generate(x, stop_token_ids=None, seed=seed)
        assert np.array_equal(got["token_ids"], want["token_ids"]), type(sampler).__name__
        assert np.array_equal(got["padding_mask"], want["padding_mask"])


def _staggered_prompts(lm, B, T, seed, shortest):
    # B random rows of T tokens, row b's prompt shortest + b % 3 long
    ids = np.random.default_rng(seed).integers(3, lm.backbone.config.vocabulary_size, (B, T))
    mask = np.arange(T)[None, :] < (shortest + np.arange(B) % 3)[:, None]
    return {"token_ids": ids, "padding_mask": mask}


@pytest.mark.parametrize("pre_ln,proj", [(True, False), (False, True)])
def test_device_decode_matches_generate(pre_ln, proj):
    # the device loop (one persistent kernel per step) against the host loop on the NumPy ops:
    # the same tokens for every sampler (the probabilities agree to rounding; the rules exactly)
    lm = _lm(pre_ln, proj)
    B, T = 2, 9
    rng = np.random.default_rng(0)
    ids = rng.integers(3, lm.backbone.config.vocabulary_size, (B, T))
    mask = np.zeros((B, T), bool)
    mask[0, :3] = True
    mask[1, :5] = True
    samplers = _samplers() if FULL else _samplers()[:2] if pre_ln else _samplers()[2:4]
    _generate_as_numpy(lm, {"token_ids": ids, "padding_mask": mask}, samplers)


@pytest.mark.parametrize("fold,proj", [(True, False), (False, False), (True, True)])
def test_device_decode_norms_folded_or_not(fold, proj, monkeypatch):
    # pre-LN passes of warp products fold each LayerNorm into the product after it (every block
    # normalising the rows itself, decode.FOLD_NORMS_FLOATS; the final norm into the head's, or,
    # with project_out between them, a stage of its own); unfolded, the norms are stages of their
    # own (wider models): each gives the host loop's tokens, rows of several prompt lengths
    from refopt.kernels.cuda import decode

    monkeypatch.setattr(decode, "FOLD_NORMS_FLOATS", decode.FOLD_NORMS_FLOATS if fold else 0)
    lm = _lm(True, proj, seed=4)
    _generate_as_numpy(lm, _staggered_prompts(lm, 3, 8, 4, 2), _samplers()[:2])


@pytest.mark.parametrize("B", [6, 35] if FULL else [6])
def test_device_decode_tiled_batches(B):
    # batches of 8 rows or more take the tiled, split-K products (and 35 rows, two row passes);
    # rows of different prompt lengths
    from refopt.kernels.cuda import decode
    from refopt.samplers import GreedySampler, TopKSampler

    lm = _lm(True, False, seed=2)
    assert decode.DeviceModel(lm.backbone.params, lm.backbone.config).plan(B).tiled
    _generate_as_numpy(lm, _staggered_prompts(lm, B, 7, B, 3),
                       (GreedySampler(), TopKSampler(k=3, seed=5, temperature=0.7)),
                       seed=[100 + b for b in range(B)])                # one seed per row


def _attention_stage_case(make, seed, B, H, K, L, T, index, Sq):
    # one attention stage of the decode kernel (make: decode_stages.make_attention or
    # make_warp_attention) against NumPy: q, k, v summed from Sq partial sums plus the bias, k and
    # v stored at position index - 1 of layer l's cache, softmax(q k / sqrt(K)) v over positions
    # 0 .. index - 1
    from refopt.kernels.cuda import decode_stages as ds

    D = H * K
    rng = np.random.default_rng(seed)
    part = rng.standard_normal((Sq, B, 3 * D)).astype(np.float32)
    boff = 5
    Wt = rng.standard_normal(boff + 3 * D).astype(np.float32)
    cache = rng.standard_normal((B, L, 2, T, H, K)).astype(np.float32)
    l, pos = L - 1, index - 1
    qkv = part.sum(0) + Wt[boff:]
    q, k, v = (qkv[:, i * D:(i + 1) * D].reshape(B, H, K) for i in range(3))
    want_cache = cache.copy()
    want_cache[:, l, 0, pos], want_cache[:, l, 1, pos] = k, v
    keys, vals = want_cache[:, l, 0, :index], want_cache[:, l, 1, :index]      # [B, index, H, K]
    sc = np.einsum("bhk,bthk->bht", q.astype(np.float64), keys) / np.sqrt(K)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bht,bthk->bhk", p, vals).reshape(B, D)
    stage = make(D, H, L, T, Sq)
    NT, CHUNK = ds.THREADS, ds.CHUNK     # plain ints: a shared array's shape must be a constant

    @cuda.jit
    def run(Wt, part, cache, index, B, ctx):
        q = cuda.shared.array(128, np.float32)
        scores = cuda.shared.array(CHUNK, np.float32)
        pv = cuda.shared.array(NT, np.float32)
        fbuf = cuda.shared.array(NT, np.float32)
        stage(Wt, boff, part, cache, l, index, B, ctx, q, scores, pv, fbuf)

    ctx = cuda.to_device(np.full(B * D, np.nan, np.float32))
    dcache = cuda.to_device(cache.ravel())
    run[3, NT](cuda.to_device(Wt), cuda.to_device(part.ravel()), dcache, index, B, ctx)
    np.testing.assert_array_equal(dcache.copy_to_host().reshape(cache.shape)[:, l, :, pos],
                                  want_cache[:, l, :, pos])
    close(ctx.copy_to_host().reshape(B, D), want, np.float32, f"attention stage {make.__name__}",
          np.abs(vals).max())


def test_decode_warp_attention_stage():
    # the attention a warp an item (decode_stages.make_warp_attention, batch passes of
    # decode.WARP_ATTENTION_FROM rows or more on the GPU) and the block attention, against NumPy: items past B * H in the last round,
    # positions past one and two chunks of 32, head widths of one and two 32-lane passes. It needs
    # the GPU's 32-lane warps and shuffles: under the simulator it runs in a subprocess with the
    # GPU's code paths (REFOPT_CUDASIM_GPU_PATHS=1, shuffles emulated)
    import os
    import subprocess
    import sys

    if SIM:
        env = dict(os.environ, REFOPT_CUDASIM_GPU_PATHS="1")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-p", "no:randomly", f"{__file__}::test_decode_warp_attention_stage"],
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return
    from refopt.kernels.cuda import decode_stages as ds

    cases = [(0, 3, 2, 64, 2, 40, 33, 2), (1, 2, 3, 32, 1, 80, 70, 1), (2, 1, 1, 40, 1, 8, 5, 3)]
    for seed, B, H, K, L, T, index, Sq in cases:
        for make in (ds.make_warp_attention, ds.make_attention):
            if make is ds.make_attention and K > ds.THREADS:
                continue          # (a block attention's thread a column: the simulator's 32-thread blocks)
            _attention_stage_case(make, seed, B, H, K, L, T, index, Sq)


@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("by4", [False, True])
@settings(max_examples=EX // 2, deadline=None)
@given(kind=st.sampled_from(["float32", "bfloat16"]), RB=st.sampled_from([8, 16, 32]),
       rows=st.integers(1, 40), I=st.integers(1, big(40)), N=st.integers(1, big(70)),
       XS=st.integers(1, 3), split=st.integers(1, 4), prefetch=st.sampled_from([0, 3]),
       seed=st.integers(0, 2**16))
def test_decode_tile_stage(by4, act, kind, RB, rows, I, N, XS, split, prefetch, seed):
    # the decode kernel's tiled product (decode_products.make_tile_stage) alone, against NumPy:
    # inputs that are sums of XS partial sums (with fc1's bias and ReLU when act), any row count
    # (several batch passes), widths that are not multiples of the tile or the chunk, rows a
    # multiple of 4 long (by4: 16-byte loads) or not, split-K, L2 prefetches or none
    from refopt.kernels.cuda import decode_products as dp
    from refopt.io.safetensors_io import float32_to_bfloat16

    I = 4 * I if by4 else I + (I % 4 == 0)
    if SIM and RB > 8:
        RB = 8                    # the simulator's 8-thread blocks take 8-row passes
    tile = dp.TILE_BY_ROWS.get(RB, dp.TILE)
    KC = dp.tile_chunk(RB, tile)
    NCH = -(-I // KC)
    CPS = -(-NCH // min(split, NCH))
    S = -(-NCH // CPS)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((N, I)).astype(np.float32)
    if kind == "bfloat16":
        Wm = float32_to_bfloat16(W)
        W = (Wm.astype(np.uint32) << 16).view(np.float32)
    else:
        Wm = W
    wbase, xbias = 8, 16
    Wflat = np.zeros(wbase + W.size + 8, Wm.dtype)
    Wflat[wbase:wbase + W.size] = Wm.ravel()
    Wt = rng.standard_normal(xbias + I + 8).astype(np.float32)
    parts = rng.standard_normal((XS, rows, I)).astype(np.float32)
    x = parts.sum(0)
    if act:
        x = np.maximum(x + Wt[xbias:xbias + I], 0)
    XSH, WSH = dp.tile_shared(RB, tile)
    stage = dp.make_tile_stage(I, N, S, CPS, XS, act, RB, kind, tile, prefetch)

    @cuda.jit
    def run(Wt, Wm, X, B, dst):
        Xs = cuda.shared.array(XSH, np.float32)
        Ws = cuda.shared.array(WSH, np.float32)
        red = cuda.shared.array((1, 1, 1), np.float32)
        stage(Wt, Wm, wbase, X, xbias, B, dst, Xs, Ws, red)

    dst = cuda.to_device(np.full((S, rows, N), np.nan, np.float32))
    blocks = 3 if SIM else 40
    run[blocks, dp.THREADS](cuda.to_device(Wt), cuda.to_device(Wflat), cuda.to_device(parts.ravel()),
                            rows, dst.reshape(dst.size))
    got = dst.copy_to_host()
    # split s sums inputs [s CPS KC, (s + 1) CPS KC)
    want = np.stack([x[:, s * CPS * KC:(s + 1) * CPS * KC] @ W[:, s * CPS * KC:(s + 1) * CPS * KC].T
                     for s in range(S)])
    scale = (np.abs(x) @ np.abs(W).T).max() + 1e-30
    close(got, want, np.float32, f"tile stage {kind} RB{RB} {rows}x{I}x{N} S{S} XS{XS}", scale)


@settings(max_examples=EX, deadline=None)
@given(kind=st.sampled_from(["bfloat16", "float16"]), n=st.integers(1, big(300)), seed=st.integers(0, 2**31))
def test_half_weights_widen_exactly(kind, n, seed):
    # the decode kernel's half loads (halves.make_load, through halves.widen): every bit pattern
    # of the kind, NaN, inf and subnormals included, widened as NumPy widens it
    from refopt.kernels.cuda import halves

    bits = np.random.default_rng(seed).integers(0, 2**16, n, dtype=np.uint16)
    want = ((bits.astype(np.uint32) << 16).view(np.float32) if kind == "bfloat16"
            else bits.view(np.float16).astype(np.float32))
    got = halves.widen(cuda.to_device(bits), 0, n, kind, cuda.device_array(n, np.float32)).copy_to_host()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@settings(max_examples=2, deadline=None)
@given(kind=st.sampled_from(["bfloat16", "float16"]), pre_ln=st.booleans(), B=st.sampled_from([1, 2, 9]),
       seed=st.integers(0, 100))
def test_device_decode_half_weights(kind, pre_ln, B, seed):
    # matrices held in two bytes on the device (backbone.quantize: the NumPy loop then computes
    # with the same half weights, widened to float32), every sum float32: the same tokens;
    # batches of 9 take the tiled products
    from refopt import device_decoding
    from refopt.samplers import GreedySampler, TopKSampler

    lm = _lm(pre_ln, not pre_ln, seed=seed)
    lm.backbone.quantize(kind)
    dm = device_decoding.resident(lm)
    assert dm.kind == kind and dm.matrices.dtype == np.uint16 and dm.matrices.size == dm.lay.matrix_size
    # (on a GPU every new shape and sampler compiles the step kernel: greedy alone there)
    _generate_as_numpy(lm, _staggered_prompts(lm, B, 7, seed, 2),
                       (GreedySampler(),) + ((TopKSampler(k=3, seed=5, temperature=0.7),) if SIM else ()))


@pytest.mark.parametrize("B", [1, 9])
def test_device_decode_prompt_paths_agree(B, monkeypatch):
    # a short prompt runs through the step kernel from position 0; a long one through the prefill's
    # general kernels (decode.prompt_steps): the same tokens either way, and the NumPy loop's
    from refopt.kernels.cuda import decode
    from refopt.samplers import GreedySampler

    lm = _lm(True, False, seed=6)
    T = 7
    ids = np.random.default_rng(B).integers(3, lm.backbone.config.vocabulary_size, (B, T))
    mask = np.zeros((B, T), bool)
    mask[:, :3] = True
    mask[0, :4] = True
    for steps in (0, 32):
        monkeypatch.setattr(decode, "PROMPT_STEPS", steps)
        assert (decode.prompt_steps(B) >= 3) == (steps > 0)
        _generate_as_numpy(lm, {"token_ids": ids, "padding_mask": mask}, (GreedySampler(),))


def test_device_decode_stops_and_streams():
    from refopt import device_decoding
    from refopt.samplers import GreedySampler

    lm = _lm(True, False, seed=4)
    B, T = 2, 8
    ids = np.random.default_rng(2).integers(3, lm.backbone.config.vocabulary_size, (B, T))
    mask = np.zeros((B, T), bool)
    mask[:, :3] = True
    lm.compile(sampler="greedy")
    lm.backend = "numpy"
    free = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)["token_ids"]
    stop = (int(free[0, 4]), int(free[1, 3]))          # a token each row produces
    want = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=stop)
    lm.backend = "cuda"
    got = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=stop)
    assert np.array_equal(got["token_ids"], want["token_ids"])
    assert np.array_equal(got["padding_mask"], want["padding_mask"])
    # streaming: one Step per decided position, the same tokens
    steps = device_decoding.steps(lm, ids, mask, None, GreedySampler())
    seen = {step.start: step.token_ids[:, 0] for step in steps}
    assert sorted(seen) == list(range(3, T))
    assert np.array_equal(np.stack([seen[i] for i in range(3, T)], 1), free[:, 3:])


def test_samplers_describe_themselves_to_the_device_loop():
    from refopt import samplers

    assert samplers.TopPSampler(p=0.5, k=7, temperature=0.5).device_spec() == samplers.SamplerSpec(
        "top_p", {"temperature": 0.5, "p": 0.5, "k": 7})
    assert samplers.GreedySampler().device_spec().kind == "greedy"
    # no device form: processors, subclasses (a rule may change), beam search
    assert samplers.TopKSampler(k=2, repetition_penalty=1.2).device_spec() is None

    class Mine(samplers.RandomSampler):
        pass

    assert Mine().device_spec() is None
    assert samplers.BeamSampler(num_beams=2).device_spec() is None


def test_backend_selection_with_cuda(monkeypatch):
    monkeypatch.delenv("REFOPT_BACKEND", raising=False)
    assert backend.available("cuda")
    assert backend.get_backend() == "numba"       # "auto" never picks the GPU
    assert backend.ops("cuda") is gpu
