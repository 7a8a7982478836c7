"""The TF32 tensor-core product (``refopt/kernels/cuda/gemm_tf32.py``) against a host reference:
float64 products of the TF32-rounded operands (:func:`round_tf32`, the host's ``cvt.rna``), within
float32 accumulation error (1e-5 of the terms' scale, ``|a| @ |b|``).  TF32's own error (about
1e-4..1e-3 against the float64 product of the unrounded operands) is far outside that, so a kernel
that skipped the rounding, or rounded another way, fails.

Under Numba's simulator (CI) the fragment op is the emulation (plain CUDA through a shared scratch)
and the shapes are small; on a GPU the tensor cores' ``mma.sync`` and ``cvt.rna`` (inline PTX) run,
and are checked against the emulation too.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refopt import backend

if not backend.available("cuda"):
    pytest.skip("the cuda backend is not available here: needs numba.cuda with a CUDA GPU, or "
                "NUMBA_ENABLE_CUDASIM=1 for Numba's simulator", allow_module_level=True)

from numba import cuda  # noqa: E402
from refopt.kernels.cuda import gemm as ggemm  # noqa: E402
from refopt.kernels.cuda import gemm_tf32 as T  # noqa: E402
from refopt.kernels.cuda._common import SIM, SIMULATOR  # noqa: E402
from tests_support import close  # noqa: E402

FULL = not SIM
EX = 12 if FULL else 5
GPU = not SIMULATOR
gpu_only = pytest.mark.skipif(not GPU, reason="inline PTX (mma.sync, cvt.rna) runs on a GPU only")


def big(n):
    return n * 10 if FULL else n


def operands(rng, layout, M, N, K):
    A = rng.standard_normal((K, M) if layout == "tn" else (M, K)).astype(np.float32)
    B = rng.standard_normal((N, K) if layout == "nt" else (K, N)).astype(np.float32)
    return A, B


def logical(A, B, layout):
    return (A.T if layout == "tn" else A), (B.T if layout == "nt" else B)


def reference(A, B, layout, bias=None):
    """float64 product of the TF32-rounded operands (+ bias), and the terms' scale."""
    a, b = logical(A, B, layout)
    ar, br = T.round_tf32(a).astype(np.float64), T.round_tf32(b).astype(np.float64)
    want = ar @ br + (0 if bias is None else bias.astype(np.float64))
    scale = (np.abs(ar) @ np.abs(br)).max() + (0 if bias is None else np.abs(bias).max())
    return want, scale


# ---------------------------------------------------------------------------------- rounding
def test_round_tf32_ties_away_and_specials():
    one = np.float32(1.0)
    half_ulp = np.float32(2.0 ** -11)           # TF32 keeps 10 mantissa bits: ulp(1) = 2**-10
    x = np.array([1 + half_ulp, -(1 + half_ulp), 1 + half_ulp - np.float32(2.0 ** -23), 1 + 3 * half_ulp,
                  np.inf, -np.inf, np.finfo(np.float32).max, 0.0, -0.0, 2.0 ** -130, 2.0 ** -140], np.float32)
    got = T.round_tf32(x)
    want = [1 + 2 * half_ulp, -(1 + 2 * half_ulp), one, 1 + 4 * half_ulp, np.inf, -np.inf, np.inf, 0.0, -0.0,
            2.0 ** -130, 0.0]              # subnormals: TF32's spacing there is 2**-136
    assert got.tolist() == [float(np.float32(w)) for w in want]
    assert np.signbit(got[8])
    assert np.isnan(T.round_tf32(np.float32(np.nan)))


@settings(max_examples=50)
@given(seed=st.integers(0, 2**16))
def test_round_tf32_is_the_nearest_tf32(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000)).astype(np.float32)
    r = T.round_tf32(x)
    assert (r.view(np.uint32) & 0x1FFF == 0).all()              # 13 low bits cleared
    ulp = np.spacing(np.abs(r).astype(np.float32)) * 2.0 ** 13    # the spacing of TF32 there
    assert (np.abs(r.astype(np.float64) - x) <= ulp.astype(np.float64) / 2).all()


def test_device_rounding_is_the_hosts():
    # tf32() in a kernel (cvt.rna.tf32.f32 on a GPU) against round_tf32, ties included
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096 if FULL else 64).astype(np.float32)
    x[:8] = np.float32(1 + 2.0 ** -11) * np.array([1, -1, 2, -2, 0.5, 3, 1e-20, 1e20], np.float32)

    @cuda.jit
    def k(x, y):
        i = cuda.grid(1)
        if i < x.shape[0]:
            y[i] = T.tf32(x[i])

    y = cuda.device_array_like(x)
    k[(x.size + 63) // 64, 64](cuda.to_device(x), y)
    np.testing.assert_array_equal(y.copy_to_host().view(np.uint32), T.round_tf32(x).view(np.uint32))


# ---------------------------------------------------------------------------------- one fragment
def _fragment_kernel(emulate):
    mma = T.make_mma_emulated(SIMULATOR) if emulate else None
    hw = T.mma_tf32

    @cuda.jit
    def k(A, B, C, D):
        # one warp: A [16, 8], B [8, 8], C [16, 8] in the PTX fragment layouts; D = A @ B + C
        scr = cuda.shared.array((1, 192), np.float32)
        lane = cuda.threadIdx.x
        g = lane >> 2
        t = lane & 3
        a0, a1, a2, a3 = A[g, t], A[g + 8, t], A[g, t + 4], A[g + 8, t + 4]
        b0, b1 = B[t, g], B[t + 4, g]
        c0, c1, c2, c3 = C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]
        if emulate:
            d = mma(scr, 0, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
        else:
            d = hw(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
        D[g, 2 * t] = d[0]
        D[g, 2 * t + 1] = d[1]
        D[g + 8, 2 * t] = d[2]
        D[g + 8, 2 * t + 1] = d[3]
    return k


@pytest.mark.parametrize("emulate", [True, pytest.param(False, marks=gpu_only)])
def test_mma_fragment(emulate):
    # the m16n8k8 fragment op (mma.sync on a GPU, or the emulation) on one warp, every element
    # distinct, against float64 (operands already TF32, as the kernel gives them)
    rng = np.random.default_rng(3)
    A = T.round_tf32(rng.standard_normal((16, 8)).astype(np.float32))
    B = T.round_tf32(rng.standard_normal((8, 8)).astype(np.float32))
    C = rng.standard_normal((16, 8)).astype(np.float32)
    D = cuda.to_device(np.full((16, 8), np.nan, np.float32))
    _fragment_kernel(emulate)[1, 32](cuda.to_device(A), cuda.to_device(B), cuda.to_device(C), D)
    want = A.astype(np.float64) @ B.astype(np.float64) + C
    close(D.copy_to_host(), want, np.float32, f"mma emulate={emulate}", (np.abs(A) @ np.abs(B)).max() + 3)


# ---------------------------------------------------------------------------------- the kernel
@settings(max_examples=EX)
@given(layout=st.sampled_from(ggemm.LAYOUTS), M=st.integers(1, big(40)), N=st.integers(1, big(40)),
       K=st.integers(1, big(40)), bias=st.booleans(), splits=st.sampled_from([None, 1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_gemm_tf32(layout, M, N, K, bias, splits, seed):
    # edge tiles in M, N and K (K not a multiple of 4 takes the scalar loads), split and whole
    rng = np.random.default_rng(seed)
    A, B = operands(rng, layout, M, N, K)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    want, scale = reference(A, B, layout, b)
    out = cuda.to_device(np.full((M, N), np.nan, np.float32))
    T.gemm_tf32(cuda.to_device(A), cuda.to_device(B), layout, out=out,
                bias=cuda.to_device(b) if bias else None, splits=splits)
    close(out.copy_to_host(), want, np.float32, f"tf32 {layout} {M}x{N}x{K}", scale)


@pytest.mark.parametrize("layout", ggemm.LAYOUTS)
def test_gemm_tf32_differs_from_float32(layout):
    # the operands really are rounded: against the float64 product of the unrounded operands the
    # error is TF32's (far above float32's), and against the rounded operands' it is float32's
    rng = np.random.default_rng(7)
    M, N, K = (200, 136, 96) if FULL else (33, 17, 20)
    A, B = operands(rng, layout, M, N, K)
    got = T.gemm_tf32(cuda.to_device(A), cuda.to_device(B), layout).copy_to_host().astype(np.float64)
    a, b = logical(A, B, layout)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = (np.abs(a) @ np.abs(b)).max()
    assert np.abs(got - exact).max() / scale > 1e-5
    want, scale_r = reference(A, B, layout)
    close(got, want, np.float32, f"tf32 {layout}", scale_r)


@pytest.mark.parametrize("config", [c for c in T.CONFIGS if FULL or c == "tiny"])
def test_gemm_tf32_every_tile_configuration(config):
    rng = np.random.default_rng(11)
    M, N, K = (300, 270, 77) if FULL else (37, 21, 35)
    for layout in [lay for lay in ggemm.LAYOUTS if T.fits(lay, config)]:
        # 16-byte and scalar loads of the K-contiguous operands (both on a GPU for two tiles only:
        # each kernel compiles for seconds)
        for k in (K, K + 1) if config in ("large", "wide", "tiny") else (K,):
            A, B = operands(rng, layout, M, N, k)
            want, scale = reference(A, B, layout)
            out = T.gemm_tf32(cuda.to_device(A), cuda.to_device(B), layout, config=config, splits=1)
            close(out.copy_to_host(), want, np.float32, f"tf32 {config} {layout} K={k}", scale)


@pytest.mark.parametrize("pipeline", ["async", "regs"])
@pytest.mark.parametrize("layout", ggemm.LAYOUTS)
def test_gemm_tf32_pipelines(pipeline, layout):
    # both main loops on the same aligned operands (cp.async stages, and register staging), K from
    # under one slice to several (the async loop's prologue issues up to two slices)
    rng = np.random.default_rng(13)
    M, N = (260, 200) if FULL else (35, 19)
    for K in (8, 16, 52) if not FULL else (8, 16, 52, 1000):
        A, B = operands(rng, layout, M, N, K)
        want, scale = reference(A, B, layout)
        out = T.gemm_tf32(cuda.to_device(A), cuda.to_device(B), layout, pipeline=pipeline, splits=1)
        close(out.copy_to_host(), want, np.float32, f"tf32 {pipeline} {layout} K={K}", scale)


@gpu_only
@pytest.mark.parametrize("layout", ggemm.LAYOUTS)
@pytest.mark.parametrize("config", ["large", "wide"])
def test_tensor_cores_match_the_emulation(layout, config):
    # the same kernel with mma.sync and with the emulated fragment op: the tiling and fragment
    # indexing are shared, so the two agree to float32 accumulation (the tensor cores' internal
    # summation order is theirs)
    rng = np.random.default_rng(5)
    M, N, K = 517, 390, 301
    A, B = operands(rng, layout, M, N, K)
    dA, dB = cuda.to_device(A), cuda.to_device(B)
    hw = T.gemm_tf32(dA, dB, layout, config=config, splits=1).copy_to_host()
    em = T.gemm_tf32(dA, dB, layout, config=config, splits=1, emulate=True).copy_to_host()
    want, scale = reference(A, B, layout)
    close(hw, em, np.float32, f"mma vs emulation {config} {layout}", scale)
    close(hw, want, np.float32, f"mma {config} {layout}", scale)


def test_gemm_tf32_rejects_bad_arguments():
    a = cuda.to_device(np.ones((4, 8), np.float32))
    b = cuda.to_device(np.ones((5, 8), np.float32))
    with pytest.raises(ValueError, match="layout"):
        T.gemm_tf32(a, b, "tt")
    with pytest.raises(ValueError, match="inner dimensions"):
        T.gemm_tf32(a, b, "nn")
    with pytest.raises(ValueError, match="2-D"):
        T.gemm_tf32(cuda.to_device(np.ones((1, 4, 8), np.float32)), b, "nt")
    with pytest.raises(ValueError, match="float64"):
        T.gemm_tf32(cuda.to_device(np.ones((4, 8), np.float64)), b, "nt")
    with pytest.raises(ValueError, match="out is"):
        T.gemm_tf32(a, b, "nt", out=cuda.to_device(np.ones((5, 4), np.float32)))
    with pytest.raises(ValueError, match="pipeline"):
        T.gemm_tf32(a, b, "nt", pipeline="tma")
    with pytest.raises(ValueError, match="config"):
        T.gemm_tf32(a, b, "nt", config="huge")
    with pytest.raises(ValueError, match="exceed"):
        T.gemm_tf32(a, cuda.to_device(np.ones((8, 5), np.float32)), "nn", config="big")
    out = T.gemm_tf32(a, b, "nt").copy_to_host()               # the good call, for contrast
    np.testing.assert_array_equal(out, np.full((4, 5), 8.0, np.float32))


def test_gemm_precision_tf32():
    # gemm(..., precision="tf32") is gemm_tf32 (the same bits); float32 stays gemm's default path
    rng = np.random.default_rng(17)
    A, B = operands(rng, "nn", 21, 30, 24)
    b = rng.standard_normal(30).astype(np.float32)
    dA, dB, db = cuda.to_device(A), cuda.to_device(B), cuda.to_device(b)
    via = ggemm.gemm(dA, dB, "nn", bias=db, precision="tf32").copy_to_host()
    direct = ggemm.gemm_tf32(dA, dB, "nn", bias=db).copy_to_host()
    np.testing.assert_array_equal(via, direct)
    plain = ggemm.gemm(dA, dB, "nn", bias=db).copy_to_host()
    close(plain, A.astype(np.float64) @ B + b, np.float32, "gemm float32", (np.abs(A) @ np.abs(B)).max())
    assert np.abs(plain - via).max() > 0                 # the default did not take TF32
    with pytest.raises(ValueError, match="precision"):
        ggemm.gemm(dA, dB, "nn", precision="bf16")
    with pytest.raises(ValueError, match="relu"):
        ggemm.gemm(dA, dB, "nn", relu=True, precision="tf32")


@pytest.mark.parametrize("splits", [1, 3])
def test_gemm_tf32_plans_replay(monkeypatch, splits):
    # a repeated call replays its bound launches (gemm's plans): new contents at the same addresses
    # give the new product, another bias is another plan
    from refopt.kernels.cuda import launch

    if SIMULATOR:
        pytest.skip("plans are kept on the fast launch path, a GPU only")
    monkeypatch.setattr(ggemm, "_PLANS", {})
    rng = np.random.default_rng(23)
    M, N, K = 70, 90, 200
    A, B = operands(rng, "nt", M, N, K)
    b = rng.standard_normal(N).astype(np.float32)
    dA, dB, db = cuda.to_device(A), cuda.to_device(B), cuda.to_device(b)
    out = cuda.device_array((M, N), np.float32)
    T.gemm_tf32(dA, dB, "nt", out=out, splits=splits)
    want, scale = reference(A, B, "nt")
    close(out.copy_to_host(), want, np.float32, f"first call, splits {splits}", scale)
    assert launch.FAST and len(ggemm._PLANS) == 1
    A2 = rng.standard_normal(A.shape).astype(np.float32)
    dA.copy_to_device(A2)                                # same address, new contents
    T.gemm_tf32(dA, dB, "nt", out=out, splits=splits)
    want, scale = reference(A2, B, "nt")
    close(out.copy_to_host(), want, np.float32, f"replayed, splits {splits}", scale)
    T.gemm_tf32(dA, dB, "nt", out=out, splits=splits, bias=db)
    want, scale = reference(A2, B, "nt", b)
    close(out.copy_to_host(), want, np.float32, f"with a bias, splits {splits}", scale)
    assert len(ggemm._PLANS) == 2
