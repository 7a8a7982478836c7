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
from numba.extending import intrinsic, overload

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
    # float16 bits (uint16 or int16) -> float32 (LLVM's fpext: one vcvtph2ps on x86 with F16C)
    if bits not in (types.uint16, types.int16):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def widen(v):
    """A stored weight element as a float: float32/float64 as they are, bfloat16 bits (uint16),
    float16 bits (int16: Numba has no float16 type on the CPU, so float16 weights travel as int16
    and bfloat16 as uint16, which keeps the two apart at compile time), int8 (unscaled)."""


@overload(widen, inline="always")
def _widen(v):
    if isinstance(v, types.Float):
        return lambda v: v
    if v == types.uint16:
        return lambda v: _bf16_to_f32(v)
    if v == types.int16:
        return lambda v: _f16_to_f32(v)
    if v == types.int8:
        return lambda v: np.float32(v)
    return None


@njit(inline="always", fastmath=True)
def dot_one(x, m, w, o):
    # x[m] . widen(w[o]), accumulated in x's dtype
    acc = x.dtype.type(0)
    for i in range(x.shape[1]):
        acc += x[m, i] * widen(w[o, i])
    return acc


@njit(inline="always", fastmath=True)
def dot_block(x, m, w, o):
    # rows m..m+3 of x against outputs o, o+1 of w: each weight widened once and used four times,
    # eight accumulators (LLVM vectorises the loop over i with one vector per accumulator) ->
    # (x[m].w[o], x[m].w[o+1], x[m+1].w[o], ..., x[m+3].w[o+1])
    z = x.dtype.type(0)
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = z
    for i in range(x.shape[1]):
        w0 = widen(w[o, i])
        w1 = widen(w[o + 1, i])
        x0 = x[m, i]
        x1 = x[m + 1, i]
        x2 = x[m + 2, i]
        x3 = x[m + 3, i]
        a00 += x0 * w0
        a01 += x0 * w1
        a10 += x1 * w0
        a11 += x1 * w1
        a20 += x2 * w0
        a21 += x2 * w1
        a30 += x3 * w0
        a31 += x3 * w1
    return (a00, a01, a10, a11, a20, a21, a30, a31)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_oi_bf16(x, data, bias, relu, out):
    # x [M, I], data [O, I] uint16 bfloat16 bits -> out [M, O]; each weight is widened in the loop
    M, I = x.shape
    O = data.shape[0]
    for o in prange(O):
        for m in range(M):
            acc = out.dtype.type(0)
            for i in range(I):
                acc += x[m, i] * _bf16_to_f32(data[o, i])
            out[m, o] = _epilogue(acc, bias, o, relu)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_oi_f16(x, data, bias, relu, out):
    # x [M, I], data [O, I] uint16 float16 bits -> out [M, O]
    M, I = x.shape
    O = data.shape[0]
    for o in prange(O):
        for m in range(M):
            acc = out.dtype.type(0)
            for i in range(I):
                acc += x[m, i] * _f16_to_f32(data[o, i])
            out[m, o] = _epilogue(acc, bias, o, relu)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_oi_int8(x, data, scale, bias, relu, out):
    # x [M, I], data [O, I] int8, scale [O] float32 -> out [M, O] = epilogue((x @ data.T) * scale)
    M, I = x.shape
    O = data.shape[0]
    for o in prange(O):
        s = scale[o]
        for m in range(M):
            acc = out.dtype.type(0)
            for i in range(I):
                acc += x[m, i] * data[o, i]
            out[m, o] = _epilogue(acc * s, bias, o, relu)


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
