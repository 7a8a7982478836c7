"""Tiled matrix products ``C = op(A) @ op(B)`` with a fused epilogue, in shared memory with
register blocking and double buffering.

    C[m, n] = relu?( sum_k A[m, k] * B[n, k]  + bias[n] )  (+ C[m, n] when accumulating)

and, for training, three more epilogue terms (each optional, each a compile-time flag):

    C[m, n] = gate?( keep?( ... ) ) + R[m, n]
    gate:  zero where G[m, n] <= 0   (ReLU's backward: G holds the forward's post-ReLU output)
    keep:  times P[m, n]             (the dropout multiplier, 0 or 1 / (1 - rate))
    R:     a residual added last     (the decoder's ``x = residual + x``)

Operands keep the layouts refopt stores them in, so nothing is transposed in memory:

==========  ===================  ===================  ==========================================
name        A stored             B stored             used for
==========  ===================  ===================  ==========================================
``"nt"``    ``[M, K]``           ``[N, K]``           ``x @ W.T`` (linear, tied LM head, scores)
``"nn"``    ``[M, K]``           ``[K, N]``           ``d_y @ W`` (input gradients), ``P @ V``
``"tn"``    ``[K, M]``           ``[K, N]``           ``d_y.T @ x`` (weight gradients)
==========  ===================  ===================  ==========================================

One block computes a ``BM x BN`` tile of C; each of its ``(BM/TM) * (BN/TN)`` threads owns a
``TM x TN`` register tile (accumulators never leave registers).  Every ``BK`` slice of A and B
is staged in shared memory, k-major (``As[k][m]``, ``Bs[k][n]``), so a thread reads its four
consecutive rows / columns as one 16-byte load; the next slice is fetched from global memory into
registers while the current one is multiplied (two shared buffers, one barrier per slice).  A
thread's rows are ``4*ty + i`` and ``BM/2 + 4*ty + i`` (columns likewise): contiguous fours that
keep the 16-byte shared loads conflict-free while a warp's columns span 64 consecutive floats.

Two kernels share that design and every argument (``gemm(variant=...)``, ``REFOPT_GEMM``):

* ``"v2"`` (:func:`make_gemm_v2`, the default; float32 operands whose contiguous dimensions are
  multiples of 4 and whose data are 16-byte aligned, every configuration but ``"medium"``): each
  thread reads its part of a slice as 16-byte global loads (``ld.v4``, an intrinsic: :func:`ldg4`),
  from offsets computed once and advanced per slice; out-of-range groups are read from element 0
  and replaced by zeros (selects, no branches around the loads); the ``BK`` steps of a slice are
  written out one by one (the kernel's source is generated in Python) and each step's shared-memory
  fragments are loaded while the previous step's products run.  Its large tile is ``"large16"``
  (BK 16), its split products take ``"wide"`` (64x128, 128 threads) at about 3 blocks per
  multiprocessor.  SASS for sm_90 (``benchmarks/gemm_resources.py``): 81-84% of the ``large16``
  main loop's instructions are FFMA (``v1``: 50-51%), 119-151 registers, no spills.
* ``"v1"`` (:func:`make_gemm`): the same tiles with one scalar global load per element behind a
  branch, the ``BK`` loop rolled; taken for float64, for operands ``"v2"`` cannot read, and on
  request.  H200 measurements of both: ``benchmarks/GPU.md``.

Indices are masked non-negative (``& mask``) so that the compiler drops Numba's negative-index
wrap-around and can vectorise the shared loads; constants are typed in the kernel's dtype so
float32 code never widens to float64.

Short names (a legend): ``BM x BN`` the block's tile of C, ``BK`` the K slice staged per step,
``TM x TN`` a thread's register tile, ``NTX x NTY`` the block's threads along n and m (``NT`` in
all), ``GM`` / ``GN`` a thread's groups of four rows / columns, ``HM`` / ``HN`` the distance
between them, ``LA`` / ``LB`` elements of A / B one thread loads per slice, ``SA`` / ``SB`` the
shared rows' padded lengths (``PAD`` floats of padding), ``M``, ``N``, ``K`` the product's sizes.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from numba import cuda, int32, int64

from refopt.kernels.cuda import launch as _launch
from refopt.kernels.cuda._common import ALIGN, SIM, SIMULATOR, cdiv, empty, generated, kernel, nbtype
from refopt.kernels.cuda.launch import as_shape, launcher, pointer

LAYOUTS = ("nt", "nn", "tn")

#: Tile configurations (BM, BN, BK, TM, TN[, resident blocks per multiprocessor, default 2]).
#: ``"large"`` is the compute-bound one (256 threads, 8x8 per thread, registers capped at 128 for
#: two resident blocks); ``"large1"`` the same tile uncapped (one block per multiprocessor); the
#: smaller ones suit short products, ``"tiny"`` Numba's simulator.
CONFIGS = {
    "large": (128, 128, 8, 8, 8),
    "large1": (128, 128, 8, 8, 8, 1),
    "large16": (128, 128, 16, 8, 8),
    "wide": (64, 128, 8, 8, 8),
    "medium": (64, 64, 8, 4, 4),
    "small": (32, 32, 8, 4, 4),
    "tiny": (16, 16, 8, 4, 4),
}
PAD = 4   # shared rows padded by 16 bytes: the transposed stores of K-contiguous tiles avoid conflicts


@functools.lru_cache(maxsize=None)
def make_gemm(dtype, layout: str, config: str, has_bias: bool = False, relu: bool = False,
              accumulate: bool = False, residual: bool = False, gate: bool = False,
              keep: bool = False, splitk: bool = False):
    """The kernel ``gemm(A, B, C, bias, R, G, P, M, N, K, Kc)`` for one dtype, layout, tile
    configuration and epilogue (compiled on first launch; the epilogue flags are compile-time
    constants, so the unrolled epilogue keeps the accumulators in registers).  With ``splitk``
    the grid's z index is a slice of ``K`` (``[z * Kc, (z + 1) * Kc)``) of one product, not a
    product of a batch: ``C[z]`` receives that slice's partial product."""
    BM, BN, BK, TM, TN = CONFIGS[config][:5]
    MIN_BLOCKS = CONFIGS[config][5] if len(CONFIGS[config]) > 5 else 2
    DT = nbtype(dtype)
    NTX, NTY = BN // TN, BM // TM            # threads along n and m
    NT = NTX * NTY
    GM, GN = TM // 4, TN // 4                # groups of four rows / columns per thread
    LA, LB = BM * BK // NT, BN * BK // NT    # elements of each slice a thread loads
    HM, HN = BM // GM, BN // GN              # distance between a thread's row / column groups
    a_km = layout == "tn"                    # A stored [K, M]
    b_kn = layout in ("nn", "tn")            # B stored [K, N]
    SA, SB = BM + PAD, BN + PAD
    assert NT * LA == BM * BK and NT * LB == BN * BK and HM == NTY * 4 and HN == NTX * 4

    # MIN_BLOCKS resident blocks per multiprocessor: registers capped at 65536 / (MIN_BLOCKS * NT)
    @kernel(launch_bounds=(NT, MIN_BLOCKS))
    def gemm(A, B, C, bias, R, G, P, M, N, K, Kc):
        As = cuda.shared.array((2, BK, SA), DT, alignment=ALIGN)
        Bs = cuda.shared.array((2, BK, SB), DT, alignment=ALIGN)
        acc = cuda.local.array((TM, TN), DT)
        ra = cuda.local.array(LA, DT)
        rb = cuda.local.array(LB, DT)
        av = cuda.local.array(TM, DT)
        bv = cuda.local.array(TN, DT)
        tid = cuda.threadIdx.x & 1023
        tx = tid % NTX
        ty = tid // NTX
        m0 = (cuda.blockIdx.y & 0x7FFFFFFF) * BM
        n0 = (cuda.blockIdx.x & 0x7FFFFFFF) * BN
        z = cuda.blockIdx.z & 0xFFFF
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = DT(0)
        za = z                                   # the operands' batch index
        kb = 0                                   # this block's slice of K: [kb, ke)
        ke = K
        if splitk:
            za = 0
            kb = z * Kc
            ke = min(K, kb + Kc)
        ntiles = (ke - kb + BK - 1) // BK

        # -- fetch slice 0 into registers, then into shared buffer 0 (the loop's prefetch below
        # repeats these loads for slice kt + 1 on purpose: double buffering; a device function over
        # the register arrays could push them to local memory)
        for p in range(LA):
            e = tid + p * NT
            if a_km:
                kk, mm = e // BM, e % BM
                ra[p] = A[za, kb + kk, m0 + mm] if (kb + kk < ke and m0 + mm < M) else DT(0)
            else:
                mm, kk = e // BK, e % BK
                ra[p] = A[za, m0 + mm, kb + kk] if (kb + kk < ke and m0 + mm < M) else DT(0)
        for p in range(LB):
            e = tid + p * NT
            if b_kn:
                kk, nn = e // BN, e % BN
                rb[p] = B[za, kb + kk, n0 + nn] if (kb + kk < ke and n0 + nn < N) else DT(0)
            else:
                nn, kk = e // BK, e % BK
                rb[p] = B[za, n0 + nn, kb + kk] if (kb + kk < ke and n0 + nn < N) else DT(0)
        for p in range(LA):
            e = tid + p * NT
            if a_km:
                As[0, e // BM, e % BM] = ra[p]
            else:
                As[0, e % BK, e // BK] = ra[p]
        for p in range(LB):
            e = tid + p * NT
            if b_kn:
                Bs[0, e // BN, e % BN] = rb[p]
            else:
                Bs[0, e % BK, e // BK] = rb[p]
        cuda.syncthreads()

        for kt in range(ntiles):
            cur = kt & 1
            k0 = kb + (kt + 1) * BK
            more = kt + 1 < ntiles
            if more:                                     # next slice: global -> registers
                for p in range(LA):
                    e = tid + p * NT
                    if a_km:
                        kk, mm = e // BM, e % BM
                        ra[p] = A[za, k0 + kk, m0 + mm] if (k0 + kk < ke and m0 + mm < M) else DT(0)
                    else:
                        mm, kk = e // BK, e % BK
                        ra[p] = A[za, m0 + mm, k0 + kk] if (k0 + kk < ke and m0 + mm < M) else DT(0)
                for p in range(LB):
                    e = tid + p * NT
                    if b_kn:
                        kk, nn = e // BN, e % BN
                        rb[p] = B[za, k0 + kk, n0 + nn] if (k0 + kk < ke and n0 + nn < N) else DT(0)
                    else:
                        nn, kk = e // BK, e % BK
                        rb[p] = B[za, n0 + nn, k0 + kk] if (k0 + kk < ke and n0 + nn < N) else DT(0)
            for k in range(BK):                          # the current slice, from shared memory
                for g in range(GM):
                    for i in range(4):
                        av[g * 4 + i] = As[cur, k, g * HM + ty * 4 + i]
                for g in range(GN):
                    for j in range(4):
                        bv[g * 4 + j] = Bs[cur, k, g * HN + tx * 4 + j]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += av[i] * bv[j]
            if more:                                     # registers -> the other shared buffer
                nxt = cur ^ 1
                for p in range(LA):
                    e = tid + p * NT
                    if a_km:
                        As[nxt, e // BM, e % BM] = ra[p]
                    else:
                        As[nxt, e % BK, e // BK] = ra[p]
                for p in range(LB):
                    e = tid + p * NT
                    if b_kn:
                        Bs[nxt, e // BN, e % BN] = rb[p]
                    else:
                        Bs[nxt, e % BK, e // BK] = rb[p]
            cuda.syncthreads()

        # -- epilogue: bias, ReLU, accumulate, guarded stores
        for i in range(TM):
            m = m0 + (i // 4) * HM + ty * 4 + (i % 4)
            for j in range(TN):
                n = n0 + (j // 4) * HN + tx * 4 + (j % 4)
                if m < M and n < N:
                    v = acc[i, j]
                    if has_bias:
                        v += bias[n]
                    if relu:
                        v = max(v, DT(0))
                    if keep:
                        v = v * P[z, m, n]
                    if gate:
                        if G[z, m, n] <= DT(0):
                            v = DT(0)
                    if accumulate:
                        v += C[z, m, n]
                    if residual:
                        v = R[z, m, n] + v
                    C[z, m, n] = v

    gemm.threads = NT
    gemm.tile = (BM, BN)
    return gemm


# ----------------------------------------------------------------------------- the second kernel
# (float32 with 16-byte global loads, unrolled K slice with fragment double buffering)

if SIMULATOR:
    def ldg4(arr, off):
        """Four consecutive elements of ``arr`` from flat element ``off`` (the simulator's
        stand-in for one 16-byte load)."""
        flat = arr.reshape(arr.size)
        return flat[off], flat[off + 1], flat[off + 2], flat[off + 3]
else:
    from llvmlite import ir as _ir
    from numba.cuda import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic
    from numba.cuda.typing import signature as _signature

    @_intrinsic
    def ldg4(typingctx, arr, off):
        """Four consecutive elements of ``arr`` from flat element ``off`` as one vector load
        (``ld.v4.f32``: 16 bytes; 8 for 16-bit elements) -- ``off`` a multiple of 4 and the data
        aligned to the load's size (at most 16 bytes): the caller checks."""
        dt = arr.dtype
        sig = _signature(_types.UniTuple(dt, 4), arr, _types.int64)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            off64 = context.cast(builder, args[1], sig.args[1], _types.int64)
            ptr = builder.gep(ary.data, [off64])
            lty = context.get_data_type(dt)
            vptr = builder.bitcast(ptr, _ir.VectorType(lty, 4).as_pointer())
            vec = builder.load(vptr, align=min(16, 4 * context.get_abi_sizeof(lty)))
            vals = [builder.extract_element(vec, _ir.Constant(_ir.IntType(32), i)) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)
        return sig, codegen


def _operand_lines(X, name, rows, r0, BX, km, LX, NT, BK, regs):
    """Source lines of one operand's geometry (``X`` "a" / "b"): the thread's part of a slice as
    ``LX / 4`` groups of four consecutive elements of the operand's contiguous dimension; ``km``
    when the operand is stored ``[K, rows]``."""
    P = LX // 4
    if km:
        Q = BX // 4                   # threads along a k row
        KR = NT // Q                  # k rows per pass
        assert P * KR == BK
        geo = [f"{X}k = tid // {Q}", f"{X}c = (tid % {Q}) * 4",
               f"{X}ok = {r0} + {X}c < {rows}",
               f"{X}o = int64(za) * K * {rows} + int64(kb + {X}k) * {rows} + {r0} + {X}c",
               f"{X}step = int64({BK}) * {rows}"]
        loads = []
        for p in range(P):
            loads += [f"ok = {X}ok and k0 + {X}k + {p * KR} < ke",
                      f"v = ldg4({name}, ({X}o + koff + {p * KR} * {rows}) if ok else int64(0))"]
            loads += [f"{regs}[{4 * p + j}] = v[{j}] if ok else DT(0)" for j in range(4)]
        stores = [f"{X.upper()}s[BUF, {X}k + {p * KR}, {X}c + {j}] = {regs}[{4 * p + j}]"
                  for p in range(P) for j in range(4)]
    else:
        Q = BK // 4                   # threads along a row's slice
        RR = NT // Q                  # rows per pass
        assert P * RR == BX
        geo = [f"{X}r = tid // {Q}", f"{X}q = (tid % {Q}) * 4",
               f"{X}o = int64(za) * {rows} * K + int64(min({r0} + {X}r, {rows} - 1)) * K + kb + {X}q",
               f"{X}step = int64({BK})"]
        loads = []
        for p in range(P):
            loads += [f"ok = {r0} + {X}r + {p * RR} < {rows} and k0 + {X}q < ke",
                      f"v = ldg4({name}, ({X}o + koff + {p * RR} * K) if ok else int64(0))"]
            loads += [f"{regs}[{4 * p + j}] = v[{j}] if ok else DT(0)" for j in range(4)]
        stores = [f"{X.upper()}s[BUF, {X}q + {j}, {X}r + {p * RR}] = {regs}[{4 * p + j}]"
                  for p in range(P) for j in range(4)]
    return geo, loads, stores


@functools.lru_cache(maxsize=None)
def make_gemm_v2(dtype, layout: str, config: str, has_bias: bool = False, relu: bool = False,
                 accumulate: bool = False, residual: bool = False, gate: bool = False,
                 keep: bool = False, splitk: bool = False):
    """The second GEMM kernel (``variant="v2"``), same arguments and results as
    :func:`make_gemm`'s: every slice of A and B read with 16-byte global loads (the operands'
    contiguous dimensions multiples of 4 and their data 16-byte aligned: :func:`gemm` checks),
    global offsets computed once and advanced per slice, out-of-range groups read from element 0
    and replaced by zeros (no branches around the loads), and the ``BK`` steps of a slice written
    out one by one (Python-generated source) with the next step's shared-memory fragments loaded
    while the current step's products run."""
    BM, BN, BK, TM, TN = CONFIGS[config][:5]
    MIN_BLOCKS = CONFIGS[config][5] if len(CONFIGS[config]) > 5 else 2
    NTX, NTY = BN // TN, BM // TM
    NT = NTX * NTY
    GM, GN = TM // 4, TN // 4
    LA, LB = BM * BK // NT, BN * BK // NT
    HM, HN = BM // GM, BN // GN
    a_km = layout == "tn"
    b_kn = layout in ("nn", "tn")
    SA, SB = BM + PAD, BN + PAD
    assert LA % 4 == 0 and LB % 4 == 0 and BK % 4 == 0

    ageo, aload, astore = _operand_lines("a", "A", "M", "m0", BM, a_km, LA, NT, BK, "ra")
    bgeo, bload, bstore = _operand_lines("b", "B", "N", "n0", BN, b_kn, LB, NT, BK, "rb")

    def frag(s, k, buf="cur"):
        out = [f"fa[{s}, {g * 4 + i}] = As[{buf}, {k}, {g * HM + i} + ty4]" for g in range(GM) for i in range(4)]
        out += [f"fb[{s}, {g * 4 + j}] = Bs[{buf}, {k}, {g * HN + j} + tx4]" for g in range(GN) for j in range(4)]
        return out

    L = []
    L += ["def gemm(A, B, C, bias, R, G, P, M, N, K, Kc):",
          "    As = cuda.shared.array((2, BK, SA), DT, alignment=ALIGN)",
          "    Bs = cuda.shared.array((2, BK, SB), DT, alignment=ALIGN)",
          "    acc = cuda.local.array((TM, TN), DT)",
          "    fa = cuda.local.array((2, TM), DT)",
          "    fb = cuda.local.array((2, TN), DT)",
          "    ra = cuda.local.array(LA, DT)",
          "    rb = cuda.local.array(LB, DT)",
          "    tid = cuda.threadIdx.x & 1023",
          "    tx4 = (tid % NTX) * 4",
          "    ty4 = (tid // NTX) * 4",
          "    m0 = (cuda.blockIdx.y & 0x7FFFFFFF) * BM",
          "    n0 = (cuda.blockIdx.x & 0x7FFFFFFF) * BN",
          "    z = cuda.blockIdx.z & 0xFFFF",
          "    for i in range(TM):",
          "        for j in range(TN):",
          "            acc[i, j] = DT(0)",
          "    za = z",
          "    kb = 0",
          "    ke = K"]
    if splitk:
        L += ["    za = 0", "    kb = z * Kc", "    ke = min(K, kb + Kc)"]
    L += ["    ntiles = (ke - kb + BK - 1) // BK"]
    L += ["    " + s for s in ageo + bgeo]
    L += ["    if ntiles > 0:",
          "        k0 = kb",
          "        koff = int64(0)"]
    L += ["        " + s for s in aload + bload]
    L += ["        " + s.replace("BUF", "0") for s in astore + bstore]
    L += ["    cuda.syncthreads()",
          "    for kt in range(ntiles):",
          "        cur = kt & 1",
          "        more = kt + 1 < ntiles",
          "        k0 = kb + (kt + 1) * BK",
          "        if more:"]
    L += ["            koff = int64(kt + 1) * astep"]
    L += ["            " + s for s in aload]
    L += ["            koff = int64(kt + 1) * bstep"]
    L += ["            " + s for s in bload]
    L += ["        " + s for s in frag(0, 0)]
    for k in range(BK):
        s = k & 1
        if k + 1 < BK:
            L += ["        " + x for x in frag(s ^ 1, k + 1)]
        L += ["        for i in range(TM):",
              "            for j in range(TN):",
              f"                acc[i, j] += fa[{s}, i] * fb[{s}, j]"]
    L += ["        if more:",
          "            nxt = cur ^ 1"]
    L += ["            " + s.replace("BUF", "nxt") for s in astore + bstore]
    L += ["        cuda.syncthreads()"]
    L += ["    for i in range(TM):",
          "        m = m0 + (i // 4) * HM + ty4 + (i % 4)",
          "        for j in range(TN):",
          "            n = n0 + (j // 4) * HN + tx4 + (j % 4)",
          "            if m < M and n < N:",
          "                v = acc[i, j]",
          "                if has_bias:",
          "                    v += bias[n]",
          "                if relu:",
          "                    v = max(v, DT(0))",
          "                if keep:",
          "                    v = v * P[z, m, n]",
          "                if gate:",
          "                    if G[z, m, n] <= DT(0):",
          "                        v = DT(0)",
          "                if accumulate:",
          "                    v += C[z, m, n]",
          "                if residual:",
          "                    v = R[z, m, n] + v",
          "                C[z, m, n] = v"]
    ns = dict(cuda=cuda, DT=nbtype(dtype), int64=int64, ldg4=ldg4, min=min, max=max, ALIGN=ALIGN,
              BM=BM, BN=BN, BK=BK, TM=TM, TN=TN, NTX=NTX, SA=SA, SB=SB, LA=LA, LB=LB, HM=HM, HN=HN,
              has_bias=has_bias, relu=relu, accumulate=accumulate, residual=residual, gate=gate,
              keep=keep)
    ns, src = generated(L, f"gemm v2 {layout} {config}", ns)
    gemm = kernel(launch_bounds=(NT, MIN_BLOCKS))(ns["gemm"])
    gemm.threads = NT
    gemm.tile = (BM, BN)
    gemm.source = src
    return gemm


def default_config(M: int, N: int) -> str:
    """The tile configuration for an ``M x N`` product: the large tile when it gives the GPU enough
    blocks, smaller ones for short products; the small tile under the simulator."""
    if SIM:
        return "tiny"
    if M * N >= 128 * 128 * 264:
        return "large"
    if M * N >= 64 * 128 * 132:
        return "wide"
    if M * N >= 64 * 64 * 132:
        return "medium"
    return "small"


#: blocks per multiprocessor a split-K product aims at (two waves of two resident blocks)
SPLIT_TARGET = 4
_SMS: list = []
_WORKSPACE: dict = {}

#: A product's launches, bound (:meth:`refopt.kernels.cuda.launch._Launcher.bind`), by everything
#: that decides them: the operands' addresses, shapes and dtypes, the epilogue, the tiles, the
#: stream.  A call repeated with the same arguments (a training loop's products, a benchmark)
#: replays them.  Why: at the training shapes (1024x768x3072) a product's call cost about 60 us
#: more than its kernels replayed from a CUDA graph on the H200 (0.63-0.68x cuBLAS per call against
#: 0.88-0.95x, session 11), and ``gemm``'s own Python, its launches stubbed out, took 28-42 us a
#: call on the 2-core development CPU.  With the plans (H200, ``benchmarks/gemm_shapes.py``,
#: session 12): 17-28 us of host time a call instead of 63-119, 0.77-0.86x cuBLAS per call at the
#: training shapes instead of 0.57-0.65x.  Cleared when it holds :data:`MAX_PLANS` plans or a
#: split-K workspace grows; only on the fast launch path; ``REFOPT_GEMM_PLANS=0`` turns it off.
_PLANS: dict = {}
MAX_PLANS = 4096
PLANS = os.environ.get("REFOPT_GEMM_PLANS", "1") != "0"


def _multiprocessors() -> int:
    if not _SMS:
        _SMS.append(1 if SIMULATOR else cuda.get_current_device().MULTIPROCESSOR_COUNT)
    return _SMS[0]


def split_count(M: int, N: int, K: int, config: str, per_sm: int = SPLIT_TARGET) -> int:
    """How many slices of ``K`` a product whose output tiles are too few to fill the GPU is cut
    into (the training step's products: weight gradients with ``K`` the tokens, the tied head's
    input gradient with ``K`` the vocabulary, the ``[tokens, hidden]`` outputs): about
    ``per_sm`` blocks per multiprocessor in all, each slice at least 128 long; 1 when the tiles
    alone give half that."""
    BM, BN = CONFIGS[config][:2]
    tiles = cdiv(M, BM) * cdiv(N, BN)
    target = per_sm * _multiprocessors()
    if tiles * 2 > target:
        return 1
    return max(1, min(target // tiles, K // 128))


def _workspace(n: int, dtype):
    """A reusable flat device buffer of at least ``n`` elements (sized by the first, direct, launch of a
    shape, so that a CUDA graph capture of the same launches allocates nothing)."""
    key = np.dtype(dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.shape[0] < n:
        buf = _WORKSPACE[key] = empty(n, key)
        _PLANS.clear()                  # plans hold the old buffer's address
    return buf


def workspaces() -> list:
    """The split-K workspaces allocated so far (a CUDA graph captured over split products holds
    their addresses: its owner keeps these alive)."""
    return list(_WORKSPACE.values())


@functools.lru_cache(maxsize=None)
def _make_sum_splits(dtype, has_bias=False, relu=False, accumulate=False, residual=False, gate=False,
                     keep=False):
    DT = nbtype(dtype)

    @kernel()
    def sum_splits(parts, out, bias, R, G, P):
        # out[m, n] = epilogue(sum over z of parts[z, m, n], in z order): the kernel's epilogue
        i = cuda.grid(1)
        Z, M, N = parts.shape
        if i < M * N:
            m = i // N
            n = i % N
            v = DT(0)
            for z in range(Z):
                v += parts[z, m, n]
            if has_bias:
                v += bias[n]
            if relu:
                v = max(v, DT(0))
            if keep:
                v = v * P[m, n]
            if gate:
                if G[m, n] <= DT(0):
                    v = DT(0)
            if accumulate:
                v += out[m, n]
            if residual:
                v = R[m, n] + v
            out[m, n] = v
    return sum_splits


#: the kernel :func:`gemm` launches: ``"v2"`` (:func:`make_gemm_v2`, where its operands allow it) or
#: ``"v1"`` (:func:`make_gemm`); ``REFOPT_GEMM`` in the environment, or ``variant=`` per call
VARIANT = os.environ.get("REFOPT_GEMM", "v2")
#: the configuration ``"v2"`` takes where the default would be ``"large"``: a 16-long K slice
#: (half the barriers and loop overhead per product; 122-128 registers without spills)
V2_LARGE = "large16"
#: blocks per multiprocessor a split-K product of ``"v2"`` aims at (its split products take the
#: ``"wide"`` tile: 128 threads and up to 151 registers, so three resident blocks)
V2_SPLIT_TARGET = 3


def v2_takes(config: str) -> bool:
    """Whether :func:`make_gemm_v2` can build a tile configuration: each thread's share of an A
    and a B slice whole groups of four, laid out in whole passes (``"medium"``: two elements of
    each per thread, so no)."""
    BM, BN, BK, TM, TN = CONFIGS[config][:5]
    NT = (BM // TM) * (BN // TN)
    return (BM * BK % (4 * NT) == 0 and BN * BK % (4 * NT) == 0 and BK % 4 == 0
            and TM % 4 == 0 and TN % 4 == 0 and all(NT % q == 0 for q in (BM // 4, BN // 4, BK // 4)))


def _v2_fits(a, b, layout: str, M: int, N: int, K: int) -> bool:
    """Whether ``make_gemm_v2`` can take these operands: float32, the contiguous dimension of each
    operand a multiple of 4 and its data 16-byte aligned."""
    if np.dtype(a.dtype) != np.float32 or np.dtype(b.dtype) != np.float32 or K == 0:
        return False
    ca = M if layout == "tn" else K
    cb = N if layout in ("nn", "tn") else K
    if ca % 4 or cb % 4:
        return False
    return SIMULATOR or (pointer(a) % 16 == 0 and pointer(b) % 16 == 0)


def gemm(a, b, layout: str = "nt", bias=None, relu: bool = False, out=None, accumulate: bool = False,
         config: str | None = None, stream=0, residual=None, gate=None, keep=None, splits=None,
         variant: str | None = None, precision: str = "float32"):
    """``op(a) @ op(b)`` (+ bias, ReLU, + out when ``accumulate``) on C-contiguous device arrays;
    see the module docstring for the layouts and the training epilogue (``residual``, ``gate``,
    ``keep``: device arrays shaped like the output).  2-D operands give ``[M, N]``; 3-D operands
    (a batch of products, ``a[z]`` with ``b[z]``) give ``[Z, M, N]``.  Returns ``out`` (allocated
    when None).  A 2-D product whose output has too few tiles for the GPU is split over ``K``
    (:func:`split_count`, or ``splits``) into partial products, summed in a fixed order by a
    second kernel that applies the epilogue.

    ``precision="tf32"`` (opt-in; float32 is the default and the oracle's) takes
    :func:`gemm_tf32` instead: TF32 operands on the tensor cores, 2-D float32 operands, bias
    only."""
    if precision != "float32":
        return _gemm_precision(precision, a, b, layout, bias, relu, out, accumulate, config, stream,
                               residual, gate, keep, splits, variant)
    plan_key = plan_key_of(out, (a, b, bias, residual, gate, keep), layout, bool(relu), bool(accumulate),
                           config, stream, splits, variant or VARIANT)
    if replay(plan_key):
        return out
    if layout not in LAYOUTS:
        raise ValueError(f"gemm layout {layout!r}: expected one of {LAYOUTS}")
    batched = a.ndim == 3
    ash = tuple(a.shape) if batched else (1,) + tuple(a.shape)
    bsh = tuple(b.shape) if b.ndim == 3 else (1,) + tuple(b.shape)
    Z = ash[0]
    if bsh[0] != Z:
        raise ValueError(f"gemm: batch sizes differ ({a.shape} and {b.shape})")
    K, M = ash[1:] if layout == "tn" else ash[:0:-1]
    N, Kb = (bsh[2], bsh[1]) if layout in ("nn", "tn") else (bsh[1], bsh[2])
    if Kb != K:
        raise ValueError(f"gemm {layout}: inner dimensions differ ({a.shape} and {b.shape})")
    dtype = np.dtype(a.dtype)
    if out is None:
        out = empty((Z, M, N) if batched else (M, N), dtype)
    if M == 0 or N == 0 or Z == 0:
        return out
    has_bias = bias is not None
    variant = variant or VARIANT
    if variant not in ("v1", "v2"):
        raise ValueError(f"gemm variant {variant!r}: expected 'v1' or 'v2'")
    v2 = variant == "v2" and _v2_fits(a, b, layout, M, N, K)

    def make(cfg):              # the kernel builder for a configuration
        return make_gemm_v2 if v2 and v2_takes(cfg) else make_gemm
    one = as_shape(out, (1,))                  # the placeholder of an absent operand
    calls = []                                 # (launcher, grid, block, arguments)
    if not batched:
        split_config = config
        if split_config is None:    # split products keep the large tile: the slices fill the GPU
            if v2:              # the 64x128 tile, 3 blocks a multiprocessor (measured: GPU.md)
                split_config = "wide" if not SIM and M >= 64 and N >= 128 else default_config(M, N)
            else:
                split_config = "large" if not SIM and M >= 128 and N >= 128 else default_config(M, N)
        if splits is None:
            splits = split_count(M, N, K, split_config, V2_SPLIT_TARGET if v2 else SPLIT_TARGET)
        if splits > 1:
            BK = CONFIGS[split_config][2]
            Kc = cdiv(cdiv(K, splits), BK) * BK               # slices of whole BK steps
            splits = cdiv(K, Kc)
            parts = as_shape(_workspace(splits * M * N, dtype), (splits, M, N))
            k = make(split_config)(dtype, layout, split_config, splitk=True)
            BM, BN = k.tile
            calls.append((launcher(k), (cdiv(N, BN), cdiv(M, BM), splits), (k.threads, 1, 1),
                          (as_shape(a, ash), as_shape(b, bsh), parts, one, parts, parts, parts,
                           int32(M), int32(N), int32(K), int32(Kc))))
            o2 = as_shape(out, (M, N))
            calls.append((launcher(_make_sum_splits(dtype, has_bias, bool(relu), bool(accumulate),
                                                    residual is not None, gate is not None,
                                                    keep is not None)),
                          (cdiv(M * N, 256), 1, 1), (256, 1, 1),
                          (parts, o2, as_shape(bias, bias.shape) if has_bias else one,
                           *(o2 if x is None else as_shape(x, (M, N)) for x in (residual, gate, keep)))))
    if not calls:
        if config is None:
            config = default_config(M * Z, N)
            if v2 and config == "large":
                config = V2_LARGE
        kernel = make(config)(dtype, layout, config, has_bias, bool(relu), bool(accumulate),
                              residual is not None, gate is not None, keep is not None)
        BM, BN = kernel.tile
        o3 = as_shape(out, (Z, M, N))

        def like_out(x):
            return o3 if x is None else as_shape(x, (x.shape[0] if x.ndim == 3 else 1, M, N))

        calls.append((launcher(kernel), (cdiv(N, BN), cdiv(M, BM), Z), (kernel.threads, 1, 1),
                      (as_shape(a, ash), as_shape(b, bsh), o3, as_shape(bias, bias.shape) if has_bias else one,
                       like_out(residual), like_out(gate), like_out(keep), int32(M), int32(N), int32(K),
                       int32(K))))
    run_calls(calls, stream, plan_key)
    return out


def plan_key_of(out, operands, *parts):
    """The key of a call's plan (the address, shape and dtype of ``out`` and of each of
    ``operands``, None for an absent one, then ``parts``: everything else that decides the
    launches), or None where plans are not kept (off, off the fast launch path -- the simulator's
    arrays have no addresses -- or no ``out`` given: a new output each call)."""
    if not (PLANS and _launch.FAST and out is not None):
        return None
    return (_address(out),) + tuple(_address(x) for x in operands) + parts


def replay(plan_key) -> bool:
    """Make the launches of the plan under ``plan_key`` again; False when there is none."""
    plan = None if plan_key is None else _PLANS.get(plan_key)
    if plan is None:
        return False
    for go in plan:
        go()
    return True


def run_calls(calls, stream, plan_key=None):
    """Launch ``calls`` (``(launcher, grid, block, arguments)``) on ``stream``; with a plan key,
    bound once and kept as that key's plan (the table cleared when full)."""
    if plan_key is None:
        for go, grid, block, args in calls:
            go(grid, block, stream, *args)
        return
    plan = [go.bind(grid, block, stream, *args) for go, grid, block, args in calls]
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.clear()
    _PLANS[plan_key] = plan
    for go in plan:
        go()


def gemm_tf32(a, b, layout: str = "nt", out=None, bias=None, **kwargs):
    """:func:`refopt.kernels.cuda.gemm_tf32.gemm_tf32` (TF32 tensor-core product, opt-in), exported
    beside :func:`gemm`."""
    from refopt.kernels.cuda import gemm_tf32 as _tf32

    return _tf32.gemm_tf32(a, b, layout, out=out, bias=bias, **kwargs)


def _gemm_precision(precision, a, b, layout, bias, relu, out, accumulate, config, stream, residual,
                    gate, keep, splits, variant):
    if precision != "tf32":
        raise ValueError(f"gemm precision {precision!r}: expected 'float32' or 'tf32'")
    extra = [name for name, on in (("relu", relu), ("accumulate", accumulate), ("residual", residual is not None),
                                   ("gate", gate is not None), ("keep", keep is not None),
                                   ("variant", variant is not None)) if on]
    if extra:
        raise ValueError(f"gemm precision 'tf32': {', '.join(extra)} not supported (bias only)")
    return gemm_tf32(a, b, layout, out=out, bias=bias, config=config, splits=splits, stream=stream)


def _address(x):
    """What a plan's key holds of an operand: address, shape and dtype (None when absent)."""
    return None if x is None else (pointer(x), tuple(x.shape), x.dtype)
