"""Products of int8 weights with activations quantised to int8 per row (the ``activations="int8"``
mode; its NumPy reference is :func:`refopt.quant.int8_matmul`): integer dot products in int32,
through AVX-512 VNNI's ``vpdpbusd`` where the CPU has it (else AVX2's ``vpmaddwd``, 16 products
an instruction), then one float scale per row and per output.  Compared with the exact path
(:mod:`.matmul`: int8 widened to float32 inside the product, three vector instructions per 16
weights), one ``vpdpbusd`` multiplies and sums 64 weights: batch-1 decoding is left bound by
memory alone, and batch 8 by far less arithmetic.

The arithmetic, for a row ``x [I]`` of activations and an output row ``w [I]`` (int8, scale ``sw``)::

    sx = max|x| / 127;  q = clip(rint(x / sx), -127, 127)      (int8; see quantize_rows for 0/inf/nan)
    y  = float32(sum_i q_i * w_i) * sx * sw

``vpdpbusd`` multiplies *unsigned* bytes by signed ones, so the kernel feeds it ``u = q + 128``
(uint8) and subtracts ``128 * sum_i w_i`` (each output's row sum, computed once per matrix):
``sum u_i w_i - 128 sum w_i = sum q_i w_i``.

**No int32 overflow, for any input.**  ``|u_i w_i| <= 255 * 127 = 32,385``, so a sum of at most
:data:`BLOCK` = 65,536 such products stays within ``65,536 * 32,385 = 2,122,383,360 < 2^31 - 1 =
2,147,483,647``: each block of at most BLOCK inputs is summed in int32 (vpdpbusd does not
saturate: its sums are exact below that bound), blocks and the row-sum correction
(``|128 * sum w_i| <= 128 * 127 * I``) are combined in int64.  OPT's widest input is 36,864
(66b's MLP), one block.
"""

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from refopt.kernels.cpu.epilogue import store

BLOCK = 1 << 16          # inputs summed in int32 at a time (see the module's overflow bound)
OFFSET = 128             # u = q + OFFSET is the unsigned byte vpdpbusd takes
STEP = 64                # bytes one vpdpbusd takes from each operand

_features = llvm_binding.get_host_cpu_features()
HAVE_VNNI = bool(_features.get("avx512vnni") and _features.get("avx512bw"))


# ----------------------------------------------------------------------------- the tile intrinsic
def _tile(rows, cols, unroll, vnni, ahead=False):
    """An intrinsic ``tile(xu, m, w, o, k0, k1, far)`` -> ``rows * cols`` int32 sums
    ``sum_{k0 <= k < k1} xu[m + r, k] * w[o + c, k]`` (r-major: ``(r0c0, r0c1, ..., r1c0, ...)``),
    ``xu [M, I]`` uint8 and ``w [O, I]`` int8, C-contiguous; ``k1 - k0`` a multiple of
    ``STEP * unroll`` (the caller's: ``unroll`` independent accumulators per pair, for the latency
    of the multiply-adds) and at most BLOCK.  ``vnni``: ``vpdpbusd`` (AVX-512 VNNI), else the same
    sums in plain LLVM vector IR for CPUs without it: 16 bytes at a time widened to 32 bits,
    multiplied, and adjacent pairs added into eight int32 lanes, the pattern LLVM lowers to one
    ``pmaddwd`` (AVX2's ``vpmaddwd``: 16 products a step).  ``ahead``: also prefetch, for each 64
    bytes read of a weight row, the byte ``far`` bytes further on (else ``far`` is ignored)."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    v16i32 = ir.VectorType(i32, 16)
    # the accumulators: 16 int32 lanes (one zmm) for vpdpbusd, else eight (one ymm) for pmaddwd
    vacc = v16i32 if vnni else ir.VectorType(i32, 8)
    even = ir.Constant(ir.VectorType(i32, 8), list(range(0, 16, 2)))
    odd = ir.Constant(ir.VectorType(i32, 8), list(range(1, 16, 2)))

    def dpbusd(builder, acc, xv, wv):
        # acc [16 x i32] + per lane j: sum_{t<4} zext(xv[4j+t]) * sext(wv[4j+t])
        fnty = ir.FunctionType(v16i32, [v16i32, v16i32, v16i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(xv, v16i32), builder.bitcast(wv, v16i32)])

    def pmaddwd(builder, acc, xw, ww):
        # acc [8 x i32] + per lane j: xw[2j] * ww[2j] + xw[2j+1] * ww[2j+1], for xw, ww 16 bytes
        # widened to [16 x i32] (zext and sext: each product fits 16 by 16 bits, pmaddwd's)
        prod = builder.mul(xw, ww)
        pair = builder.add(builder.shuffle_vector(prod, prod, even),
                           builder.shuffle_vector(prod, prod, odd))
        return builder.add(acc, pair)

    # a step: 64 bytes of each operand for vpdpbusd, else 16 widened to 32 bits for pmaddwd
    mac, width = (dpbusd, STEP) if vnni else (pmaddwd, 16)
    vload = ir.VectorType(i8, width)

    @intrinsic
    def tile(typingctx, xu, m, w, o, k0, k1, far):
        if not (isinstance(xu, types.Array) and xu.dtype == types.uint8 and xu.ndim == 2
                and isinstance(w, types.Array) and w.dtype == types.int8 and w.ndim == 2):
            return None
        sig = types.UniTuple(types.int32, rows * cols)(xu, m, w, o, k0, k1, far)

        def codegen(context, builder, signature, args):
            intp = context.get_value_type(types.intp)
            xa = context.make_array(signature.args[0])(context, builder, args[0])
            wa = context.make_array(signature.args[2])(context, builder, args[2])
            m_, o_, k0_, k1_, far = (context.cast(builder, args[j], signature.args[j], types.intp)
                                     for j in (1, 3, 4, 5, 6))
            xs = cgutils.unpack_tuple(builder, xa.strides)[0]
            ws = cgutils.unpack_tuple(builder, wa.strides)[0]
            xdata = builder.bitcast(xa.data, i8.as_pointer())
            wdata = builder.bitcast(wa.data, i8.as_pointer())
            xrow = [builder.gep(xdata, [builder.mul(builder.add(m_, ir.Constant(intp, r)), xs)])
                    for r in range(rows)]
            wrow = [builder.gep(wdata, [builder.mul(builder.add(o_, ir.Constant(intp, c)), ws)])
                    for c in range(cols)]
            zero = ir.Constant(vacc, None)
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]),
                "llvm.prefetch.p0")
            accs = [[[cgutils.alloca_once_value(builder, zero) for _ in range(unroll)]
                     for _ in range(cols)] for _ in range(rows)]
            with cgutils.for_range_slice(builder, k0_, k1_, ir.Constant(intp, STEP * unroll),
                                         intp) as (k, _):
                for u in range(unroll):
                    ku = builder.add(k, ir.Constant(intp, STEP * u))

                    def load(base, at, vt):
                        ptr = builder.bitcast(builder.gep(base, [at]), vt.as_pointer())
                        return builder.load(ptr, align=1)

                    if ahead:
                        for p in wrow:
                            builder.call(prefetch, [builder.gep(builder.gep(p, [ku]), [far]),
                                                    ir.Constant(i32, 0), ir.Constant(i32, 3),
                                                    ir.Constant(i32, 1)])
                    for q in range(0, STEP, width):    # one vpdpbusd, or four pmaddwd steps
                        kq = builder.add(ku, ir.Constant(intp, q))
                        xv = [load(p, kq, vload) for p in xrow]
                        wv = [load(p, kq, vload) for p in wrow]
                        if not vnni:
                            xv = [builder.zext(v, v16i32) for v in xv]
                            wv = [builder.sext(v, v16i32) for v in wv]
                        for r in range(rows):
                            for c in range(cols):
                                slot = accs[r][c][u]
                                builder.store(mac(builder, builder.load(slot), xv[r], wv[c]), slot)
            fnty = ir.FunctionType(i32, [vacc])
            reduce = cgutils.get_or_insert_function(builder.module, fnty,
                                                    f"llvm.vector.reduce.add.v{vacc.count}i32")
            out = []
            for r in range(rows):
                for c in range(cols):
                    total = builder.load(accs[r][c][0])
                    for u in range(1, unroll):
                        total = builder.add(total, builder.load(accs[r][c][u]))
                    out.append(builder.call(reduce, [total]))
            return context.make_tuple(builder, signature.return_type, out)

        return sig, codegen

    return tile


# ----------------------------------------------------------------------------- the kernels
@intrinsic
def _bits_to_f32(typingctx, bits):
    # uint32 bits -> the float32 they encode (a bitcast)
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True)
def quantize_rows(x, xu, sx):
    """Each row of ``x [M, I]`` (float32) quantised: ``sx[m] = max|x[m]| / 127`` and ``xu[m] =
    clip(rint(x[m] / sx[m]), -127, 127) + 128`` (uint8).  A row of zeros (or so small that
    ``sx`` underflows to 0) quantises to zeros; a row holding inf or NaN to zeros with ``sx =
    NaN``, so its outputs are NaN.  No fastmath: the divisions and the rounding are IEEE's, as in
    :func:`refopt.quant.quantize_activations`, so both give the same bytes."""
    M, I = x.shape
    for m in range(M):
        # max |x| over the float32 bits with the sign cleared: for non-negative floats the integer
        # order is the float order, and every NaN lies above inf (a plain loop, so it vectorises)
        bits = x[m].view(np.uint32)
        top = np.uint32(0)
        for i in range(I):
            top = max(top, bits[i] & np.uint32(0x7FFFFFFF))
        bad = top >= np.uint32(0x7F800000)             # inf or NaN
        amax = _bits_to_f32(top)
        s = np.float32(np.nan) if bad else amax / np.float32(127)
        if s > 0:
            for i in range(I):
                q = np.rint(x[m, i] / s)
                q = min(max(q, np.float32(-127)), np.float32(127))
                xu[m, i] = np.uint8(np.int32(q) + OFFSET)
        else:
            for i in range(I):
                xu[m, i] = np.uint8(OFFSET)
        sx[m] = s


# The tiles, and how far ahead of its reads each prefetches (one thread, random int8 weights of
# 16 125m layers / 4 1.3b layers streamed from memory, GB/s of weights, the streaming read 32-34;
# load ~3.5, so +-20%): batch 8, eight rows by two outputs, 8 KB ahead: 18-23 (no prefetching
# 9-11, 4 KB 16-18; four rows by four outputs 11-15); batch 1, one row by two outputs with two
# accumulators each, 4 KB ahead: 20-34 (no prefetching 15-28; one or four outputs 19-33).
# Measured again on an AMD EPYC (Zen 4; session 9, one thread, 40 random 3072 x 768 matrices
# from memory, a plain read of them 20 GB/s): one row by two outputs 9.4-10.9 GB/s whatever the
# prefetch distance (0-32 KB), one row by one output 19.2-20.5 (four accumulators, no prefetching;
# 18.2-19.5 with it), four outputs 9.4 -- two weight rows read side by side are two streams that
# each jump every row, and this CPU's prefetcher does not follow them.  Rows left over below
# four (all of batch-1 decoding) therefore take one output at a time, one stream.
# Without VNNI (AMD EPYC Zen 3, AVX2 only, session 17): the plain-IR tiles first added groups of
# four lanes as vpdpbusd does, which LLVM lowered to vpmaddwd plus two shuffles (vpermd, vpblendd)
# per product; summed in adjacent pairs (pmaddwd's own lanes: the lanes' order is free, the sums
# are integers) each product is one vpmaddwd and one vpaddd.  One thread, 40 random 3072 x 768
# matrices from memory (a plain read of them 15-20 GB/s): one row 3.7-3.9 -> 9.6-11.2 GB/s of
# weights, eight rows 0.4 -> 3.8-5.8 GB/s (30-46 GMAC/s).  Eight rows by two outputs kept for
# eight rows (16 ymm accumulators): faster than two four-row tiles in 19 of 20 alternations
# (47.0 against 45.8 GMAC/s at 3072 x 768, 45.7 against 43.3 at 768 x 3072, matrices in cache)
# The same one-row tile with and without prefetching, on that AVX2-only Zen 3 (session 18, one
# thread, 40 random int8 matrices of 3072 x 768, 768 x 3072 and 2048 x 2048 from memory, seven
# alternations, the medians of the three shapes): 12.1-13.4 GB/s without, 13.7-15.5 with the byte
# 1 KB ahead hinted (14.2-14.4 at 4 KB, 13.3-13.9 at 8 KB).  So the one-row tile prefetches where the CPU has no VNNI, as on that
# Zen 3, and not where it has (the Zen 4 figures above).
FAR_BLOCK = 8192
FAR_ROW = 1024
_tile8 = _tile(8, 2, 1, HAVE_VNNI, ahead=True)
_tile4 = _tile(4, 2, 1, HAVE_VNNI, ahead=True)
_row = _tile(1, 1, 4, HAVE_VNNI, ahead=not HAVE_VNNI)   # one row by one output, 256 bytes a step
_single = _tile(1, 1, 1, HAVE_VNNI)            # 64 bytes a step: a row's last steps, the last output


@njit(inline="always")
def _tail(xu, m, w, o, k0, k1):
    # sum_{k0 <= k < k1} xu[m, k] * w[o, k] in int64, plainly (the inputs past the last 64)
    acc = np.int64(0)
    for k in range(k0, k1):
        acc += np.int64(xu[m, k]) * np.int64(w[o, k])
    return acc


@njit(cache=True)
def int_dots(xu, w, o0, o1, raw):
    """``raw[m, o - o0] <- sum_k xu[m, k] * w[o, k]`` (int64) for outputs ``o0..o1`` and every
    row, in blocks of BLOCK inputs summed in int32 (see the module's bound)."""
    M, I = xu.shape
    for m in range(M):
        for o in range(o0, o1):
            raw[m, o - o0] = 0
    for b0 in range(0, I, BLOCK):
        b1 = min(I, b0 + BLOCK)
        e = b0 + (b1 - b0) // STEP * STEP              # the whole 64-byte steps end here
        e4 = b0 + (b1 - b0) // (4 * STEP) * (4 * STEP)
        m = 0
        while m < M:
            left = M - m
            if left < 4:                               # one output at a time: one weight stream
                for o in range(o0, o1):
                    for r in range(left):              # (the row of w stays in L1 for the next)
                        t = np.int64(_row(xu, m + r, w, o, b0, e4, FAR_ROW)[0])
                        if e4 < e:
                            t += _single(xu, m + r, w, o, e4, e, 0)[0]
                        raw[m + r, o - o0] += t
                m += left
                continue
            o = o0
            while o + 2 <= o1:                         # outputs two at a time
                c = o - o0
                if left >= 8:
                    t8 = _tile8(xu, m, w, o, b0, e, FAR_BLOCK)
                    for r in range(8):
                        raw[m + r, c] += t8[2 * r]
                        raw[m + r, c + 1] += t8[2 * r + 1]
                else:
                    t4 = _tile4(xu, m, w, o, b0, e, FAR_BLOCK)
                    for r in range(4):
                        raw[m + r, c] += t4[2 * r]
                        raw[m + r, c + 1] += t4[2 * r + 1]
                o += 2
            n = 8 if left >= 8 else 4
            if o < o1:                                 # the last output, when odd
                for r in range(n):
                    raw[m + r, o - o0] += _single(xu, m + r, w, o, b0, e, 0)[0]
            m += n
        if e < b1:
            for m in range(M):
                for o in range(o0, o1):
                    raw[m, o - o0] += _tail(xu, m, w, o, e, b1)


CHUNK = 64            # outputs whose sums are kept before the epilogue


@njit(cache=True)
def product_range(x, w, scale, bias, out, col, mode, alpha, o0, o1):
    """Outputs ``o0..o1`` of every row: ``out[:, col + o] <- epilogue(y)`` with ``y = float32(sum_i
    q_i w[o, i]) * sx * scale[0][o]`` (``scale = (weight scales, row sums of w)``); the epilogue
    as :func:`refopt.kernels.cpu.matmul.product_range`'s: the bias, then STORE (times ``alpha``),
    RELU or ADD.  No fastmath: the float steps are the reference's, in its order."""
    M, I = x.shape
    xu = np.empty((M, I), np.uint8)
    sx = np.empty(M, np.float32)
    quantize_rows(x, xu, sx)
    quantized_range(xu, sx, w, scale, bias, out, col, mode, alpha, o0, o1, np.empty((M, CHUNK), np.int64))


@njit(cache=True)
def quantized_range(xu, sx, w, scale, bias, out, col, mode, alpha, o0, o1, raw):
    """:func:`product_range` for activations already quantised (``xu``, ``sx`` of
    :func:`quantize_rows`), with ``raw [M, >= CHUNK]`` int64 scratch (the fused decode step
    quantises once per stage and thread, then runs many ranges)."""
    sw, rowsum = scale
    M = xu.shape[0]
    for c0 in range(o0, o1, CHUNK):
        c1 = min(o1, c0 + CHUNK)
        int_dots(xu, w, c0, c1, raw)
        for m in range(M):
            for o in range(c0, c1):
                y = np.float32(raw[m, o - c0] - OFFSET * rowsum[o]) * sx[m] * sw[o]
                if bias.shape[0] > 0:
                    y += bias[o]
                store(out, m, col + o, y, mode, alpha)
