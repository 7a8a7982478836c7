"""A TF32 tensor-core matrix product, ``C = op(A) @ op(B) (+ bias)``, float32 in and out: the
operands rounded to TF32 (``cvt.rna.tf32.f32``: 10 mantissa bits, to nearest, ties away from
zero), the products summed in float32 by the tensor cores (``mma.sync.aligned.m16n8k8.row.col
.f32.tf32.tf32.f32``, reached as inline PTX from a Numba intrinsic).  Opt-in only
(:func:`gemm_tf32`, or ``gemm(..., precision="tf32")``): refopt's products are float32 unless a
caller asks; TF32 is never a default.

The layouts are :mod:`.gemm`'s (``"nt"``: ``x @ W.T``; ``"nn"``: ``d_y @ W``; ``"tn"``:
``d_y.T @ x``), 2-D operands, C-contiguous.

Design (the shape of CUTLASS's Ampere "multistage" tensor-op kernels and of the public write-ups of
``mma.sync`` GEMMs, written here for Numba):

* A block computes a ``BM x BN`` tile of C with ``NW`` warps, each warp a ``WM x WN`` warp tile:
  ``WM / 16 x WN / 8`` fragments of ``m16n8``, whose accumulators (4 a lane each) stay in
  registers.  Every ``BK`` slice of A and B is staged in shared memory.  Where both operands'
  contiguous dimensions are multiples of 4 and their data 16-byte aligned, the copies are
  ``cp.async`` (16 bytes, out-of-range groups zero-filled) into 3 shared stages (2 where 3 do not
  fit the 48 KB a block may declare), CUTLASS's multistage loop: two slices in flight while one
  is multiplied, one barrier a slice, the operands rounded to TF32 as fragments are read
  (``"async"``).  Otherwise (``"regs"``) the next slice is read into registers with guarded
  scalar loads while the current one is multiplied, rounded as it is stored to the other of two
  buffers.
* Fragments (PTX ISA, ``m16n8k8`` with ``.tf32``; ``g = lane / 4``, ``t = lane % 4``): A's
  ``a0..a3`` are ``A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]``; B's ``b0, b1`` are ``B[t][g],
  B[t+4][g]``; C's ``c0..c3`` are ``C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]``.
* ``"nt"`` (both operands K-contiguous in shared memory, rows of ``BK = 16``, unpadded): the sum
  over k inside a 16-wide chunk does not care which physical k a fragment's logical k is, so a
  lane reads its four consecutive k ``4t .. 4t+3`` of a row as one 16-byte shared load and uses
  ``(4t, 4t+1)`` as logical ``(t, t+4)`` of the chunk's first ``k8`` step and ``(4t+2, 4t+3)`` of
  the second -- the same permutation for A and B, so the product is unchanged.  A quarter-warp's
  eight 16-byte loads cover two consecutive 64-byte rows: no bank conflicts.  (CUTLASS instead
  swizzles its shared tiles and reads fragments with ``ldmatrix``.)
* ``"nn"`` / ``"tn"`` (an operand stored k-major, ``[K, rows]``): natural fragments, one 4-byte
  shared load an element, K-contiguous rows padded to ``BK + 4`` and k-major rows to ``rows + 8``
  floats, which puts the eight groups' four lanes of a fragment load in 32 distinct banks.
* Too few output tiles for the GPU (the training shapes' ``[1024, 768]`` outputs): 64 x 64 tiles,
  and the product split over K (grid z), partial products summed in order by :mod:`.gemm`'s
  split-K kernel, which applies the bias.

Measured (one H200, ``benchmarks/gemm_tf32.py``, ``benchmarks/GPU.md`` session 13): 113-140
TFLOP/s at 4096^3 (the default tile, graph-replayed) against cuBLAS TF32's 226-378, 0.31-0.62x;
at the training shapes 0.58-0.87x cuBLAS TF32's per-call rate (this kernel graph-replayed);
normwise error against float64 2.9e-4, as cuBLAS TF32's.

Under Numba's CUDA simulator inline PTX cannot run: there (and on a GPU with ``emulate=True``) the
fragment op is :func:`make_mma_emulated`'s: each lane posts its fragments to a per-warp shared
scratch, the warp synchronises, each lane sums its four outputs from the scratch in float32 (the
operands are already TF32), the warp synchronises again.  The kernel's tiling and fragment
indexing are the same code either way.  :func:`round_tf32` is the host's ``cvt.rna``.

Short names: ``BM x BN`` the block's tile, ``BK`` the K slice, ``WM x WN`` a warp's tile, ``FM x
FN`` its fragments, ``NW`` / ``NT`` warps / threads a block, ``g`` / ``t`` a lane's group and
place in it, ``SA`` / ``SB`` the shared rows' lengths.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, int32, int64

from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda._common import ALIGN, SIM, SIMULATOR, cdiv, empty, generated, kernel
from refopt.kernels.cuda.gemm import LAYOUTS, ldg4
from refopt.kernels.cuda.launch import as_shape, launcher, pointer

#: Tile configurations: (BM, BN, BK, WM, WN, the launch bounds' resident blocks a multiprocessor,
#: which caps the registers).  ``"square"`` and ``"medium"`` are :func:`default_config`'s;
#: ``"tiny"`` is the simulator's (two warps); BK a multiple of 16.
CONFIGS = {
    "large": (128, 128, 16, 64, 32, 1),
    "large2": (128, 128, 16, 64, 32, 2),
    "square": (128, 128, 16, 64, 64, 1),
    "big": (128, 256, 16, 64, 64, 1),         # "nt" only (two stages of the others exceed 48 KB)
    "wide": (64, 128, 16, 32, 32, 2),
    "medium": (64, 64, 16, 32, 32, 2),
    "tiny": (32, 16, 16, 16, 16, 1),
}


# ----------------------------------------------------------------------------- rounding, host
def round_tf32(x) -> np.ndarray:
    """``x`` rounded to TF32 as ``cvt.rna.tf32.f32`` does, as float32: the low 13 mantissa bits
    rounded to nearest, ties away from zero (add half of the last kept bit to the magnitude, then
    clear the 13 bits; a carry may reach the exponent, and the largest finite values round to
    infinity); infinities and NaNs pass unchanged."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    finite = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where(finite, rounded, bits).astype(np.uint32).view(np.float32)


# ----------------------------------------------------------------------------- device intrinsics
if SIMULATOR:
    def tf32(x):
        """``x`` rounded to TF32 (the simulator's ``cvt.rna.tf32.f32``), as a float32."""
        return round_tf32(np.float32(x))[()]

    mma_tf32 = None      # inline PTX: a GPU only

    def cp_async16(dst, doff, src, soff, nbytes):
        """The simulator's ``cp.async``: four floats of ``src`` from flat ``soff`` to ``dst`` at flat
        ``doff`` (zeros when ``nbytes`` is 0), at once."""
        d = dst.reshape(dst.size)
        if nbytes:
            f = src.reshape(src.size)
            d[doff:doff + 4] = f[soff:soff + 4]
        else:
            d[doff:doff + 4] = 0

    def cp_commit():
        pass

    def cp_wait0():
        pass

    def cp_wait1():
        pass
else:
    from llvmlite import ir as _ir
    from numba.cuda import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic
    from numba.cuda.typing import signature as _signature

    _F32 = _ir.FloatType()
    _I32 = _ir.IntType(32)

    @_intrinsic
    def tf32(typingctx, x):
        """``x`` rounded to TF32 by ``cvt.rna.tf32.f32`` (inline PTX), as a float32 whose low 13
        mantissa bits are zero."""
        sig = _signature(_types.float32, x)

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], _types.float32)
            asm = _ir.InlineAsm(_ir.FunctionType(_I32, [_F32]), "cvt.rna.tf32.f32 $0, $1;", "=r,f")
            return builder.bitcast(builder.call(asm, [v]), _F32)
        return sig, codegen

    @_intrinsic
    def mma_tf32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """One warp's ``D = A @ B + C`` on an ``m16n8k8`` tile (inline PTX ``mma.sync.aligned
        .m16n8k8.row.col.f32.tf32.tf32.f32``): this lane's A fragment ``a0..a3`` and B fragment
        ``b0, b1`` (TF32 values held as float32 bits), its accumulators ``c0..c3``; returns
        ``(d0, d1, d2, d3)``.  Every lane of the warp must call it together."""
        args = (a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
        sig = _signature(_types.UniTuple(_types.float32, 4), *args)

        def codegen(context, builder, sig, args):
            vals = [context.cast(builder, v, t, _types.float32) for v, t in zip(args, sig.args)]
            ab = [builder.bitcast(v, _I32) for v in vals[:6]]
            fnty = _ir.FunctionType(_ir.LiteralStructType([_F32] * 4), [_I32] * 6 + [_F32] * 4)
            asm = _ir.InlineAsm(
                fnty,
                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            res = builder.call(asm, ab + vals[6:])
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_value(res, i) for i in range(4)])
        return sig, codegen

    @_intrinsic
    def cp_async16(typingctx, dst, doff, src, soff, nbytes):
        """``cp.async.cg.shared.global`` of 16 bytes: ``src`` (global) from flat element ``soff`` to
        ``dst`` (shared) at flat element ``doff``, ``nbytes`` (16 or 0) read and the rest
        zero-filled; both addresses 16-byte aligned (the caller's duty).  Completes at
        :func:`cp_wait0` / :func:`cp_wait1` of a later :func:`cp_commit`'s group."""
        sig = _signature(_types.void, dst, _types.int64, src, _types.int64, _types.int32)

        def codegen(context, builder, sig, args):
            d = context.make_array(sig.args[0])(context, builder, args[0])
            a = context.make_array(sig.args[2])(context, builder, args[2])
            dp = builder.gep(d.data, [context.cast(builder, args[1], sig.args[1], _types.int64)])
            sp = builder.gep(a.data, [context.cast(builder, args[3], sig.args[3], _types.int64)])
            n = context.cast(builder, args[4], sig.args[4], _types.int32)
            i64 = _ir.IntType(64)
            asm = _ir.InlineAsm(
                _ir.FunctionType(_ir.VoidType(), [i64, i64, _I32]),
                "{ .reg .u64 s; cvta.to.shared.u64 s, $0; cp.async.cg.shared.global [s], [$1], 16, $2; }",
                "l,l,r,~{memory}", side_effect=True)
            builder.call(asm, [builder.ptrtoint(dp, i64), builder.ptrtoint(sp, i64), n])
            return context.get_dummy_value()
        return sig, codegen

    def _asm0(text):
        @_intrinsic
        def op(typingctx):
            def codegen(context, builder, sig, args):
                asm = _ir.InlineAsm(_ir.FunctionType(_ir.VoidType(), []), text, "~{memory}", side_effect=True)
                builder.call(asm, [])
                return context.get_dummy_value()
            return _signature(_types.void), codegen
        return op

    cp_commit = _asm0("cp.async.commit_group;")
    cp_wait0 = _asm0("cp.async.wait_group 0;")   # every committed group complete
    cp_wait1 = _asm0("cp.async.wait_group 1;")   # all but the newest group complete


@functools.lru_cache(maxsize=None)
def make_mma_emulated(block_sync: bool):
    """The ``m16n8k8`` fragment op in plain ``numba.cuda``: ``mma(scratch, w, lane, a0, a1, a2, a3,
    b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3)`` with the PTX fragment layouts (module docstring).
    ``scratch`` is a shared ``[warps, 32 * 6]`` float32 array, ``w`` the warp's row of it.  Each
    lane posts its six operand values, the warp synchronises, each lane sums its four outputs in
    float32 (``c + A[row, 0] B[0, col] + ... + A[row, 7] B[7, col]``, in k order), the warp
    synchronises again so the scratch may be written by the next call.  ``block_sync``: the
    synchronisation is the block's barrier (the simulator, which has no ``syncwarp``; every warp of
    the block must then call it together, as the kernels do), else ``syncwarp``."""

    @cuda.jit(device=True)
    def wsync():
        if block_sync:
            cuda.syncthreads()
        else:
            cuda.syncwarp(0xFFFFFFFF)

    @cuda.jit(device=True)
    def mma(scr, w, lane, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        o = lane * 6
        scr[w, o] = a0
        scr[w, o + 1] = a1
        scr[w, o + 2] = a2
        scr[w, o + 3] = a3
        scr[w, o + 4] = b0
        scr[w, o + 5] = b1
        wsync()
        g = lane >> 2
        t = lane & 3
        d0, d1, d2, d3 = c0, c1, c2, c3
        for i in range(4):
            row = g + 8 * (i >> 1)               # c0, c1: row g; c2, c3: row g + 8
            col = 2 * t + (i & 1)
            s = float32(0)
            if i == 0:
                s = c0
            elif i == 1:
                s = c1
            elif i == 2:
                s = c2
            else:
                s = c3
            for k in range(8):
                # A[row, k] is lane (row % 8) * 4 + k % 4's a[(row >= 8) + 2 (k >= 4)]
                av = scr[w, ((row & 7) * 4 + (k & 3)) * 6 + (row >> 3) + 2 * (k >> 2)]
                # B[k, col] is lane col * 4 + k % 4's b[k >= 4]
                bv = scr[w, (col * 4 + (k & 3)) * 6 + 4 + (k >> 2)]
                s += av * bv
            if i == 0:
                d0 = s
            elif i == 1:
                d1 = s
            elif i == 2:
                d2 = s
            else:
                d3 = s
        wsync()
        return d0, d1, d2, d3

    return mma


# ----------------------------------------------------------------------------- the kernel
def _operand(X, rows, r0, BR, km, BK, NT, vec, perm):
    """Source lines of one operand's slice copies (``X`` "a" / "b", its array ``X.upper()``, shared
    ``Xs``): ``(geometry, loads into registers rX[...], stores of rX into Xs[BUF, ...], cp.async
    copies into Xs[BUF, ...], registers a thread)``, a thread's part of a slice as groups of four
    consecutive elements of the operand's contiguous dimension.  ``km``: stored ``[K, rows]``
    (k-major), else ``[rows, K]``; ``vec``: 16-byte global loads."""
    A = X.upper()
    reg = f"r{X}"
    geo, loads, stores, issue = [], [], [], []
    if km:
        Q = BR // 4                       # quads along a k row of the tile
        KR = NT // Q                      # k rows a pass
        P = BK // KR
        assert Q * KR == NT and P * KR == BK and P >= 1
        geo += [f"{X}k = tid // {Q}", f"{X}c = (tid % {Q}) * 4"]
        for p in range(P):
            kk, cc = f"(k0 + {X}k + {p * KR})", f"({r0} + {X}c)"
            if vec:
                loads += [f"ok = {kk} < ke and {cc} < {rows}",
                          f"v = ldg4({A}, (int64({kk}) * {rows} + {cc}) if ok else int64(0))"]
                loads += [f"{reg}[{4 * p + j}] = v[{j}] if ok else DT0" for j in range(4)]
            else:
                loads += [f"{reg}[{4 * p + j}] = {A}[{kk}, {cc} + {j}] if ({kk} < ke and {cc} + {j} < {rows}) "
                          f"else DT0" for j in range(4)]
            stores += [f"{X.upper()}s[BUF, {X}k + {p * KR}, {X}c + {j}] = tf32({reg}[{4 * p + j}])"
                       for j in range(4)]
            issue += [f"ok = {kk} < ke and {cc} < {rows}",
                      f"cp_async16({A}s, int64((BUF * {BK} + {X}k + {p * KR}) * S{A} + {X}c), {A}, "
                      f"(int64({kk}) * {rows} + {cc}) if ok else int64(0), int32(16) if ok else int32(0))"]
    else:
        Q = BK // 4                       # quads along a row's slice
        RR = NT // Q                      # rows a pass
        P = BR // RR
        assert Q * RR == NT and P * RR == BR and P >= 1
        geo += [f"{X}r = tid // {Q}", f"{X}q = (tid % {Q}) * 4"]
        for p in range(P):
            rr, kq = f"({r0} + {X}r + {p * RR})", f"(k0 + {X}q)"
            if vec:
                loads += [f"ok = {rr} < {rows} and {kq} < ke",
                          f"v = ldg4({A}, (int64({rr}) * K + {kq}) if ok else int64(0))"]
                loads += [f"{reg}[{4 * p + j}] = v[{j}] if ok else DT0" for j in range(4)]
            else:
                loads += [f"{reg}[{4 * p + j}] = {A}[{rr}, {kq} + {j}] if ({rr} < {rows} and {kq} + {j} < ke) "
                          f"else DT0" for j in range(4)]
            stores += [f"{X.upper()}s[BUF, {X}r + {p * RR}, {X}q + {j}] = tf32({reg}[{4 * p + j}])"
                       for j in range(4)]
            issue += [f"ok = {rr} < {rows} and {kq} < ke",
                      f"cp_async16({A}s, int64((BUF * {BR} + {X}r + {p * RR}) * S{A} + {X}q), {A}, "
                      f"(int64({rr}) * K + {kq}) if ok else int64(0), int32(16) if ok else int32(0))"]
    return geo, loads, stores, issue, 4 * P


def _shared_plan(layout: str, config: str, emulate: bool, pipeline: str):
    """``(SA, SB, A tile dims, B tile dims, stages)`` of a kernel's shared memory (module
    docstring): 3 stages for ``"async"`` where they fit the 48 KB a block may declare, else 2;
    ValueError where 2 do not fit."""
    BM, BN, BK, WM, WN, _ = CONFIGS[config]
    a_km = layout == "tn"
    b_km = layout in ("nn", "tn")
    if not a_km and not b_km:
        SA = SB = BK
        adims, bdims = (BM, SA), (BN, SB)
    else:
        SA = BM + 8 if a_km else BK + 4
        SB = BN + 8 if b_km else BK + 4
        adims = (BK, SA) if a_km else (BM, SA)
        bdims = (BK, SB) if b_km else (BN, SB)
    stage = 4 * (adims[0] * adims[1] + bdims[0] * bdims[1])
    room = 48 * 1024 - (4 * (BM // WM) * (BN // WN) * 192 if emulate else 0)
    stages = 2 if pipeline == "regs" else max(2, min(3, room // stage))
    if stages * stage > room:
        raise ValueError(f"gemm_tf32 config {config!r}, layout {layout!r}: {stages} shared stages of "
                         f"{stage} bytes exceed the {room} a block may declare")
    return SA, SB, adims, bdims, stages


def fits(layout: str, config: str, emulate: bool = False) -> bool:
    """Whether a tile configuration's shared stages fit a block for ``layout``."""
    try:
        _shared_plan(layout, config, emulate or SIMULATOR, "regs")
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def make_gemm_tf32(layout: str, config: str, has_bias: bool = False, vec_a: bool = True,
                   vec_b: bool = True, emulate: bool = False, splitk: bool = False,
                   pipeline: str | None = None):
    """The kernel ``gemm(A, B, C, bias, M, N, K, Kc)`` for one layout, tile configuration and
    epilogue (generated source, compiled on first launch): ``C[z]`` (``[Z, M, N]``) receives the
    product over K's slice ``[z * Kc, min(K, (z + 1) * Kc))`` (``Z = 1, Kc = K`` unless
    ``splitk``), plus ``bias`` when ``has_bias``.  ``vec_a`` / ``vec_b``: 16-byte global loads of
    A / B (the caller checks they may); ``emulate``: :func:`make_mma_emulated`'s fragment op instead
    of the tensor cores' (always under the simulator).

    ``pipeline``: ``"async"`` (both operands 16-byte readable; the default then): ``cp.async``
    copies global -> shared, ``STAGES`` shared buffers (3 where they fit in 48 KB, else 2), slices
    ``kt + 1 .. kt + STAGES - 1`` in flight while slice ``kt`` is multiplied, the operands rounded
    to TF32 as fragments are read; ``"regs"``: the next slice read into registers while the current
    one is multiplied, rounded as it is stored to the other of two buffers."""
    if layout not in LAYOUTS:
        raise ValueError(f"gemm_tf32 layout {layout!r}: expected one of {LAYOUTS}")
    BM, BN, BK, WM, WN, MINB = CONFIGS[config]
    assert BK % 16 == 0 and WM % 16 == 0 and WN % 8 == 0 and BM % WM == 0 and BN % WN == 0
    FM, FN = WM // 16, WN // 8
    WNW = BN // WN                        # warps along n
    NW = (BM // WM) * WNW
    NT = 32 * NW
    a_km = layout == "tn"
    b_km = layout in ("nn", "tn")
    perm = not a_km and not b_km          # "nt": permuted-k fragments, 16-byte shared loads
    emulate = emulate or SIMULATOR
    if pipeline is None:
        pipeline = "async" if vec_a and vec_b else "regs"
    assert pipeline in ("async", "regs") and (pipeline == "regs" or (vec_a and vec_b))
    (SA, SB, adims, bdims, STAGES) = _shared_plan(layout, config, emulate, pipeline)
    ashape, bshape = (STAGES,) + adims, (STAGES,) + bdims
    ageo, aload, astore, aissue, LA = _operand("a", "M", "m0", BM, a_km, BK, NT, vec_a, perm)
    bgeo, bload, bstore, bissue, LB = _operand("b", "N", "n0", BN, b_km, BK, NT, vec_b, perm)
    rnd = "tf32" if pipeline == "async" else ""     # where the rounding happens: fragment reads

    if emulate:
        call = "mma(scr, w, lane, {a}, {b}, {c})"
    else:
        call = "mma_tf32({a}, {b}, {c})"

    def chunk(kc):
        """Lines of one 16-wide K chunk of buffer ``cur``: fragment loads, then 2 k8 steps."""
        out = []
        if perm:
            for i in range(FM):
                for h in range(2):        # rows g and g + 8 of fragment i
                    off = f"int64((cur * {BM} + wm0 + {16 * i + 8 * h} + g) * {SA} + {kc * 16} + t4)"
                    out.append(f"xa{i}{h} = ldg4(As, {off})")
            for j in range(FN):
                off = f"int64((cur * {BN} + wn0 + {8 * j} + g) * {SB} + {kc * 16} + t4)"
                out.append(f"xb{j} = ldg4(Bs, {off})")
            for i in range(FM):
                for h in range(2):
                    out += [f"xa{i}{h}{q} = {rnd}(xa{i}{h}[{q}])" for q in range(4)]
            for j in range(FN):
                out += [f"xb{j}{q} = {rnd}(xb{j}[{q}])" for q in range(4)]
            for s in range(2):
                for i in range(FM):
                    a = f"xa{i}0{2 * s}, xa{i}1{2 * s}, xa{i}0{2 * s + 1}, xa{i}1{2 * s + 1}"
                    for j in range(FN):
                        b = f"xb{j}{2 * s}, xb{j}{2 * s + 1}"
                        c = ", ".join(f"acc[{i}, {j}, {r}]" for r in range(4))
                        out.append(f"d = {call.format(a=a, b=b, c=c)}")
                        out += [f"acc[{i}, {j}, {r}] = d[{r}]" for r in range(4)]
            return out
        for s in range(2):
            k8 = kc * 16 + s * 8
            for i in range(FM):
                rows = (f"wm0 + {16 * i} + g", f"wm0 + {16 * i + 8} + g")
                ks = (f"{k8} + t", f"{k8 + 4} + t")
                # a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
                for r, (m, k) in enumerate([(rows[0], ks[0]), (rows[1], ks[0]), (rows[0], ks[1]),
                                            (rows[1], ks[1])]):
                    out.append(f"fa{i}{r} = {rnd}(As[cur, {k}, {m}])" if a_km
                               else f"fa{i}{r} = {rnd}(As[cur, {m}, {k}])")
            for j in range(FN):
                n = f"wn0 + {8 * j} + g"
                for r, k in enumerate((f"{k8} + t", f"{k8 + 4} + t")):
                    out.append(f"fb{j}{r} = {rnd}(Bs[cur, {k}, {n}])" if b_km
                               else f"fb{j}{r} = {rnd}(Bs[cur, {n}, {k}])")
            for i in range(FM):
                a = ", ".join(f"fa{i}{r}" for r in range(4))
                for j in range(FN):
                    b = f"fb{j}0, fb{j}1"
                    c = ", ".join(f"acc[{i}, {j}, {r}]" for r in range(4))
                    out.append(f"d = {call.format(a=a, b=b, c=c)}")
                    out += [f"acc[{i}, {j}, {r}] = d[{r}]" for r in range(4)]
        return out

    L = ["def gemm(A, B, C, bias, M, N, K, Kc):",
         f"    As = cuda.shared.array({ashape}, float32, alignment=ALIGN)",
         f"    Bs = cuda.shared.array({bshape}, float32, alignment=ALIGN)",
         f"    acc = cuda.local.array(({FM}, {FN}, 4), float32)"]
    if pipeline == "regs":
        L += [f"    ra = cuda.local.array({LA}, float32)",
              f"    rb = cuda.local.array({LB}, float32)"]
    if emulate:
        L += [f"    scr = cuda.shared.array(({NW}, 192), float32)"]
    L += ["    tid = cuda.threadIdx.x & 1023",
          "    w = tid >> 5",
          "    lane = tid & 31",
          "    g = lane >> 2",
          "    t = lane & 3",
          "    t4 = t * 4",
          f"    wm0 = (w // {WNW}) * {WM}",
          f"    wn0 = (w % {WNW}) * {WN}",
          f"    m0 = (cuda.blockIdx.y & 0x7FFFFFFF) * {BM}",
          f"    n0 = (cuda.blockIdx.x & 0x7FFFFFFF) * {BN}",
          "    z = cuda.blockIdx.z & 0xFFFF",
          f"    for i in range({FM}):",
          f"        for j in range({FN}):",
          "            for r in range(4):",
          "                acc[i, j, r] = DT0",
          "    kb = z * Kc",
          "    ke = min(K, kb + Kc)",
          f"    ntiles = (ke - kb + {BK - 1}) // {BK}"]
    L += ["    " + s for s in ageo + bgeo]
    body = [x for kc in range(BK // 16) for x in chunk(kc)]
    if pipeline == "regs":
        L += ["    if ntiles > 0:",
              "        k0 = kb"]
        L += ["        " + s for s in aload + bload]
        L += ["        " + s.replace("BUF", "0") for s in astore + bstore]
        L += ["    cuda.syncthreads()",
              "    for kt in range(ntiles):",
              "        cur = kt & 1",
              "        more = kt + 1 < ntiles",
              f"        k0 = kb + (kt + 1) * {BK}",
              "        if more:"]
        L += ["            " + s for s in aload + bload]
        L += ["        " + s for s in body]
        L += ["        if more:",
              "            nxt = cur ^ 1"]
        L += ["            " + s.replace("BUF", "nxt") for s in astore + bstore]
        L += ["        cuda.syncthreads()"]
    else:
        # CUTLASS's multistage main loop: slices 0 .. STAGES-2 issued first; at slice kt, wait for
        # its group (this thread's copies), a barrier (everyone's copies visible, and everyone done
        # with slice kt-1, whose buffer the next issue overwrites), issue slice kt+STAGES-1,
        # multiply slice kt.  Every thread commits one group a slice, empty ones included, so the
        # group count that wait_group names is the same for every slice.
        for s_ in range(STAGES - 1):
            L += [f"    if {s_} < ntiles:",
                  f"        k0 = kb + {s_ * BK}"]
            L += ["        " + x.replace("BUF", str(s_)) for x in aissue + bissue]
            L += ["    cp_commit()"]
        L += ["    for kt in range(ntiles):",
              f"        cur = kt % {STAGES}",
              f"        cp_wait{STAGES - 2}()",
              "        cuda.syncthreads()",
              f"        if kt + {STAGES - 1} < ntiles:",
              f"            k0 = kb + (kt + {STAGES - 1}) * {BK}",
              f"            nxt = (kt + {STAGES - 1}) % {STAGES}"]
        L += ["            " + x.replace("BUF", "nxt") for x in aissue + bissue]
        L += ["        cp_commit()"]
        L += ["        " + s for s in body]
    L += [f"    for i in range({FM}):",
          f"        for j in range({FN}):",
          "            for r in range(4):",
          "                m = m0 + wm0 + 16 * i + g + 8 * (r >> 1)",
          "                n = n0 + wn0 + 8 * j + 2 * t + (r & 1)",
          "                if m < M and n < N:",
          "                    v = acc[i, j, r]",
          "                    if has_bias:",
          "                        v += bias[n]",
          "                    C[z, m, n] = v"]
    ns = dict(cuda=cuda, float32=float32, int32=int32, int64=int64, DT0=float32(0), ldg4=ldg4, tf32=tf32,
              min=min, ALIGN=ALIGN, has_bias=has_bias, mma_tf32=mma_tf32, SA=SA, SB=SB,
              cp_async16=cp_async16, cp_commit=cp_commit, cp_wait0=cp_wait0, cp_wait1=cp_wait1,
              mma=make_mma_emulated(SIMULATOR) if emulate else None)
    name = f"gemm_tf32 {layout} {config} {pipeline}{' emulated' if emulate else ''}"
    ns, src = generated(L, name, ns)
    k = kernel(launch_bounds=(NT, MINB))(ns["gemm"])
    k.threads = NT
    k.tile = (BM, BN)
    k.stages = STAGES
    k.pipeline = pipeline
    k.source = src
    return k


# ----------------------------------------------------------------------------- the entry point
def default_config(M: int, N: int) -> str:
    """The tile for an ``M x N`` product: ``"square"`` (128 x 128, four warps of 64 x 64) where
    its tiles fill the GPU once, ``"medium"`` (64 x 64, split over K as well) otherwise; the
    simulator's two-warp tile.  Chosen from H200 sweeps (``benchmarks/GPU.md``, session 13):
    ``"square"`` was the fastest tile at 4096^3 and 1024x3072x768 in every layout, ``"medium"``
    split in two at 1024x768x3072."""
    if SIM:
        return "tiny"
    if M * N >= 128 * 128 * 132:
        return "square"
    return "medium"


#: blocks per multiprocessor a split product of the ``"medium"`` tile aims at
SPLIT_TARGET = 4


def _vec(x, contiguous: int) -> bool:
    return contiguous % 4 == 0 and (SIMULATOR or pointer(x) % 16 == 0)


def gemm_tf32(a, b, layout: str = "nt", out=None, bias=None, config: str | None = None,
              splits: int | None = None, stream=0, emulate: bool = False, pipeline: str | None = None):
    """``op(a) @ op(b)`` (+ ``bias``) with TF32 operands on the tensor cores, float32 sums: ``a``,
    ``b`` C-contiguous 2-D float32 device arrays in one of :data:`.gemm.LAYOUTS`, ``out`` an
    ``[M, N]`` float32 device array (allocated when None; returned).  ``config``: a key of
    :data:`CONFIGS` (default :func:`default_config`).  The product is split over K into
    ``splits`` partial products summed in order (default: products given the ``"medium"`` tile
    whose tiles are too few for :data:`SPLIT_TARGET` blocks a multiprocessor, else none).  ``emulate``: the fragment op in plain CUDA instead of ``mma.sync`` (what the simulator
    always runs; on a GPU, to check the kernel's indexing apart from the instruction).
    ``pipeline``: ``"async"`` / ``"regs"`` (:func:`make_gemm_tf32`; default ``"async"`` where both
    operands take 16-byte loads).

    The error against a float64 product is TF32's: each operand's relative rounding error is up to
    2**-11; measured on standard normal operands, ||C - C64|| / ||C64|| = 2.9e-4 and max|C - C64| /
    max|C64| = 2.6-3.3e-4 at K = 768..4096, as cuBLAS TF32's (``benchmarks/GPU.md``).

    A call repeated with the same operands (addresses, shapes, dtypes), ``out``, bias, tiles,
    splits, stream and kernel choice replays its launches bound once, as :func:`.gemm.gemm`'s
    plans (kept in the same table: cleared when it is full or a split-K workspace grows)."""
    plan_key = _gemm.plan_key_of(out, (a, b, bias), "tf32", layout, config, splits, stream, bool(emulate),
                                 pipeline)
    if _gemm.replay(plan_key):
        return out
    if layout not in LAYOUTS:
        raise ValueError(f"gemm_tf32 layout {layout!r}: expected one of {LAYOUTS}")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"gemm_tf32: 2-D operands expected, got {a.shape} and {b.shape}")
    for name, x in (("a", a), ("b", b), ("out", out), ("bias", bias)):
        if x is not None and np.dtype(x.dtype) != np.float32:
            raise ValueError(f"gemm_tf32: {name} is {np.dtype(x.dtype)}, expected float32")
    K, M = a.shape if layout == "tn" else a.shape[::-1]
    N, Kb = (b.shape[1], b.shape[0]) if layout in ("nn", "tn") else tuple(b.shape)
    if Kb != K:
        raise ValueError(f"gemm_tf32 {layout}: inner dimensions differ ({a.shape} and {b.shape})")
    if out is None:
        out = empty((M, N), np.float32)
    elif tuple(out.shape) != (M, N):
        raise ValueError(f"gemm_tf32: out is {tuple(out.shape)}, expected {(M, N)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"gemm_tf32: bias is {tuple(bias.shape)}, expected {(N,)}")
    if M == 0 or N == 0:
        return out
    if config is None:
        config = default_config(M, N)
    if config not in CONFIGS:
        raise ValueError(f"gemm_tf32 config {config!r}: expected one of {tuple(CONFIGS)}")
    if pipeline not in (None, "async", "regs"):
        raise ValueError(f"gemm_tf32 pipeline {pipeline!r}: expected 'async' or 'regs'")
    _shared_plan(layout, config, emulate or SIMULATOR, "regs")     # ValueError where it does not fit
    vec_a = _vec(a, M if layout == "tn" else K)
    vec_b = _vec(b, N if layout in ("nn", "tn") else K)
    if pipeline == "async" and not (vec_a and vec_b):
        pipeline = None                 # cp.async needs 16-byte aligned groups: registers instead
    BM, BN, BK = CONFIGS[config][:3]
    if splits is None:          # only the short products' tile is split (what was measured)
        tiles = cdiv(M, BM) * cdiv(N, BN)
        target = SPLIT_TARGET * _gemm._multiprocessors()
        splits = 1
        if config == "medium" and not SIM and tiles * 2 <= target:
            splits = max(1, min(target // tiles, K // 256))
    Kc = cdiv(cdiv(max(K, 1), splits), BK) * BK
    splits = max(1, cdiv(K, Kc))
    one = as_shape(out, (1,))
    calls = []                                 # (launcher, grid, block, arguments)
    if splits == 1:
        k = make_gemm_tf32(layout, config, bias is not None, vec_a, vec_b, emulate, False, pipeline)
        calls.append((launcher(k), (cdiv(N, BN), cdiv(M, BM), 1), (k.threads, 1, 1),
                      (as_shape(a, a.shape), as_shape(b, b.shape), as_shape(out, (1, M, N)),
                       as_shape(bias, (N,)) if bias is not None else one,
                       int32(M), int32(N), int32(K), int32(K))))
    else:
        parts = as_shape(_gemm._workspace(splits * M * N, np.float32), (splits, M, N))
        k = make_gemm_tf32(layout, config, False, vec_a, vec_b, emulate, True, pipeline)
        calls.append((launcher(k), (cdiv(N, BN), cdiv(M, BM), splits), (k.threads, 1, 1),
                      (as_shape(a, a.shape), as_shape(b, b.shape), parts, one,
                       int32(M), int32(N), int32(K), int32(Kc))))
        o2 = as_shape(out, (M, N))
        calls.append((launcher(_gemm._make_sum_splits(np.dtype(np.float32), bias is not None)),
                      (cdiv(M * N, 256), 1, 1), (256, 1, 1),
                      (parts, o2, as_shape(bias, (N,)) if bias is not None else one, o2, o2, o2)))
    _gemm.run_calls(calls, stream, plan_key)
    return out
