"""Matrix products for decode-sized batches, and for weights stored in float16, bfloat16 or int8.

Large products (prefill, training) go to BLAS through NumPy: they are compute-bound and BLAS is the
fastest there is.  A decode step multiplies a handful of rows by every weight matrix: that is
memory-bound, and a simple parallel loop streaming each weight once beats a general GEMV and lets
the weights be read in two bytes (float16, bfloat16) or one (int8, with a float32 scale per output
row).  Accumulation is in the activations' dtype (float32 or float64).

Weights are ``[O, I]``, one contiguous row per output (refopt's float weights, the token table of
the tied head, a :class:`refopt.quant.QuantizedMatrix`'s data): each task takes outputs, streams
their rows once and dots each with every row of ``x``.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

SMALL_M = 16         # rows up to which the streaming kernels beat BLAS


@njit(inline="always")
def _epilogue(acc, bias, o, relu):
    # bias (empty when there is none) and ReLU applied to one output
    if bias.shape[0] > 0:
        acc += bias[o]
    if relu and acc < 0:
        acc = acc * 0
    return acc


@njit(parallel=True, fastmath=True, cache=True)
def matmul_oi(x, data, bias, relu, out):
    # x [M, I], data [O, I] float -> out [M, O] = epilogue(x @ data.T + bias)
    M, I = x.shape
    O = data.shape[0]
    for o in prange(O):
        for m in range(M):
            acc = out.dtype.type(0)
            for i in range(I):
                acc += x[m, i] * data[o, i]
            out[m, o] = _epilogue(acc, bias, o, relu)


@intrinsic
def _bf16_to_f32(typingctx, bits):
    # uint16 bfloat16 bits -> float32: the bits become the top half of a float32 (a bitcast, free)
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


@intrinsic
def _f16_to_f32(typingctx, bits):
    # uint16 float16 bits -> float32 (LLVM's fpext: one vcvtph2ps on x86 with F16C)
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(inline="always")
def _store4(out, m, o, a0, a1, a2, a3, bias, relu):
    # the epilogue of outputs o .. o+3 of row m (those below O: the last task may hold fewer)
    O = out.shape[1]
    out[m, o] = _epilogue(a0, bias, o, relu)
    if o + 1 < O:
        out[m, o + 1] = _epilogue(a1, bias, o + 1, relu)
    if o + 2 < O:
        out[m, o + 2] = _epilogue(a2, bias, o + 2, relu)
    if o + 3 < O:
        out[m, o + 3] = _epilogue(a3, bias, o + 3, relu)


# The two- and one-byte kernels stream four weight rows at once (rows o .. o+3 of each task; past
# the last row, the last row again, read and discarded): four concurrent streams keep more memory
# requests in flight than one, which a decode step -- bound by memory bandwidth -- needs
# (1.3b/6.7b-sized float16 products on one thread: 66-71% of a streaming read with one row, 78-83%
# with four; benchmarks/bench_load.py).

@njit(parallel=True, fastmath=True, cache=True)
def matmul_oi_bf16(x, data, bias, relu, out):
    # x [M, I], data [O, I] uint16 bfloat16 bits -> out [M, O]; each weight is widened in the loop
    M, I = x.shape
    O = data.shape[0]
    for t in prange((O + 3) // 4):
        o = 4 * t
        r1, r2, r3 = min(o + 1, O - 1), min(o + 2, O - 1), min(o + 3, O - 1)
        for m in range(M):
            a0 = a1 = a2 = a3 = out.dtype.type(0)
            for i in range(I):
                xv = x[m, i]
                a0 += xv * _bf16_to_f32(data[o, i])
                a1 += xv * _bf16_to_f32(data[r1, i])
                a2 += xv * _bf16_to_f32(data[r2, i])
                a3 += xv * _bf16_to_f32(data[r3, i])
            _store4(out, m, o, a0, a1, a2, a3, bias, relu)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_oi_f16(x, data, bias, relu, out):
    # x [M, I], data [O, I] uint16 float16 bits -> out [M, O]
    M, I = x.shape
    O = data.shape[0]
    for t in prange((O + 3) // 4):
        o = 4 * t
        r1, r2, r3 = min(o + 1, O - 1), min(o + 2, O - 1), min(o + 3, O - 1)
        for m in range(M):
            a0 = a1 = a2 = a3 = out.dtype.type(0)
            for i in range(I):
                xv = x[m, i]
                a0 += xv * _f16_to_f32(data[o, i])
                a1 += xv * _f16_to_f32(data[r1, i])
                a2 += xv * _f16_to_f32(data[r2, i])
                a3 += xv * _f16_to_f32(data[r3, i])
            _store4(out, m, o, a0, a1, a2, a3, bias, relu)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_oi_int8(x, data, scale, bias, relu, out):
    # x [M, I], data [O, I] int8, scale [O] float32 -> out [M, O] = epilogue((x @ data.T) * scale)
    M, I = x.shape
    O = data.shape[0]
    for t in prange((O + 3) // 4):
        o = 4 * t
        r1, r2, r3 = min(o + 1, O - 1), min(o + 2, O - 1), min(o + 3, O - 1)
        for m in range(M):
            a0 = a1 = a2 = a3 = out.dtype.type(0)
            for i in range(I):
                xv = x[m, i]
                a0 += xv * data[o, i]
                a1 += xv * data[r1, i]
                a2 += xv * data[r2, i]
                a3 += xv * data[r3, i]
            _store4(out, m, o, a0 * scale[o], a1 * scale[r1], a2 * scale[r2], a3 * scale[r3], bias, relu)


def matmul_rows(x2, w, bias=None, relu=False):
    """``epilogue(x2 [M, I] @ w.T + bias)`` for ``w [O, I]`` a float matrix or a QuantizedMatrix
    -> ``[M, O]``; the epilogue adds ``bias`` and applies ReLU when ``relu``."""
    from refopt.quant import QuantizedMatrix

    M = x2.shape[0]
    if M > SMALL_M or (not isinstance(w, QuantizedMatrix) and (w.dtype != x2.dtype or not w.flags.c_contiguous)):
        # compute-bound (or an unusual operand): BLAS, then the epilogue in place
        dense = w.rows_float32().astype(x2.dtype, copy=False) if isinstance(w, QuantizedMatrix) else w
        y = x2 @ dense.T
        if bias is not None:
            y += bias
        if relu:
            np.maximum(y, 0, out=y)
        return y
    x2 = np.ascontiguousarray(x2)
    b = np.zeros(0, x2.dtype) if bias is None else np.asarray(bias, x2.dtype)
    out = np.empty((M, w.shape[0]), x2.dtype)
    if not isinstance(w, QuantizedMatrix):
        matmul_oi(x2, w, b, relu, out)
    elif w.kind == "bfloat16":
        matmul_oi_bf16(x2, w.data, b, relu, out)
    elif w.kind == "float16":
        matmul_oi_f16(x2, w.data.view(np.uint16), b, relu, out)
    else:
        matmul_oi_int8(x2, w.data, w.scale, b, relu, out)
    return out
