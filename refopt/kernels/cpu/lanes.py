"""Dot products in a fixed order of lanes, and ``y += w x``, written as LLVM vector IR (the decode
step's attention, :mod:`.decode`), one key at a time (:func:`dot`, :func:`axpy`) or BLOCK keys
at a time with the same bits (:func:`dots`, :func:`axpys`).

A dot product is a sum, and a compiler may vectorise a sum only by reordering it (``fastmath``),
which Numba leaves to LLVM and the CPU at hand.  :func:`dot` fixes the order instead: for ``n``
products of float32 (float64), lane ``j`` of ``LANES = 16`` (8) sums the products ``j, j +
LANES, j + 2 LANES, ...`` of the whole blocks of LANES, in that order; the lanes are then added
pairwise, ``lane[j] += lane[j + w]`` for ``w = LANES/2, LANES/4, ..., 1``; the products past the
last whole block are added last, one at a time.  Every step is one IEEE operation with nothing
fused, so the result is the same bits on any CPU (LLVM splits the 16 lanes into narrower
registers where the CPU has no 512-bit ones, lane by lane) and equals :func:`dot_reference`, a
plain loop written in that order.

Measured on the development machine (AMD EPYC, Zen 4, one thread, the scores of 12 heads x
201-481 keys of 64 values, one layer's cache in cache, three rounds, 2026-12-02): 22-27 ns a score
with four scalar sums side by side (Numba compiles the plain loops to scalar instructions: a sum
without fastmath, and indices that may be negative), 12-15 ns with :func:`dot` (64 values are only
four vector steps; the rest is the lanes' reduction and the loop around it).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

LANES = {types.float32: 16, types.float64: 8}


def _pointer(context, builder, arrty, arr, index, indty):
    # the address of ``arr[index]`` (index: a tuple of integers, one per dimension)
    a = context.make_array(arrty)(context, builder, arr)
    idx = [context.cast(builder, v, t, types.intp)
           for v, t in zip(cgutils.unpack_tuple(builder, index), indty)]
    return cgutils.get_item_pointer(context, builder, arrty, a, idx)


def _operands(context, builder, signature, args, first, L):
    # pointers to x[i] and y[j] (the arguments x, i, y, j, n from position ``first``), the count n
    # and where its whole blocks of L lanes end
    tys = signature.args
    px = _pointer(context, builder, tys[first], args[first], args[first + 1], tys[first + 1])
    py = _pointer(context, builder, tys[first + 2], args[first + 2], args[first + 3], tys[first + 3])
    count = context.cast(builder, args[first + 4], tys[first + 4], types.intp)
    return px, py, count, _whole(builder, count, L)


def _whole(builder, count, L):
    # where the whole blocks of L lanes of ``count`` (intp) values end
    lanes = ir.Constant(count.type, L)
    return builder.mul(builder.sdiv(count, lanes), lanes)


def _block(context, builder, p, stride, ty):
    # the BLOCK pointers p, p + stride, .., p + (BLOCK - 1) * stride (stride: an argument of type ty)
    intp = context.get_value_type(types.intp)
    step = context.cast(builder, stride, ty, types.intp)
    return [builder.gep(p, [builder.mul(step, ir.Constant(intp, k))]) for k in range(BLOCK)]


def _steps(builder, start, stop, step):
    # a loop over start, start + step, .. < stop (intp values; step an int)
    intp = start.type
    return cgutils.for_range_slice(builder, start, stop, ir.Constant(intp, step), intp)


def _vector_arg(x, i):
    return (isinstance(x, types.Array) and x.layout == "C" and x.dtype in LANES
            and isinstance(i, types.BaseTuple) and len(i) == x.ndim
            and all(isinstance(t, types.Integer) for t in i))


@intrinsic
def _dot_vector(typingctx, x, i, y, j, n):
    # sum_k x[i][k] * y[j][k] for k < n in the module's lane order; x, y C-contiguous
    if not (_vector_arg(x, i) and _vector_arg(y, j) and x.dtype == y.dtype and isinstance(n, types.Integer)):
        return None
    dt = x.dtype
    sig = dt(x, i, y, j, n)
    L = LANES[dt]

    def codegen(context, builder, signature, args):
        vt = ir.VectorType(context.get_value_type(dt), L)
        px, py, count, whole = _operands(context, builder, signature, args, 0, L)
        acc = cgutils.alloca_once_value(builder, ir.Constant(vt, None))
        with _steps(builder, ir.Constant(whole.type, 0), whole, L) as (k, _):
            xv = builder.load(builder.bitcast(builder.gep(px, [k]), vt.as_pointer()), align=1)
            yv = builder.load(builder.bitcast(builder.gep(py, [k]), vt.as_pointer()), align=1)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(xv, yv)), acc)
        v = builder.load(acc)
        w = L
        while w > 1:                                   # lane[j] += lane[j + w/2], pairwise
            w //= 2
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), L),
                                                          [(t + w) % L for t in range(L)]))
            v = builder.fadd(v, hi)
        total = cgutils.alloca_once_value(builder, builder.extract_element(v, ir.Constant(ir.IntType(32), 0)))
        with _steps(builder, whole, count, 1) as (k, _):
            xs = builder.load(builder.gep(px, [k]))
            ys = builder.load(builder.gep(py, [k]))
            builder.store(builder.fadd(builder.load(total), builder.fmul(xs, ys)), total)
        return builder.load(total)

    return sig, codegen


@njit(cache=True)
def dot_reference(x, y):
    """``sum x * y`` of two 1-D arrays of one float dtype, in :func:`dot`'s order, as plain loops."""
    L = 64 // x.itemsize                            # LANES: 16 float32, 8 float64
    n = x.shape[0]
    whole = n // L * L
    lane = np.zeros(L, x.dtype)
    for k in range(whole):
        lane[k % L] += x[k] * y[k]
    w = L
    while w > 1:
        w //= 2
        for t in range(w):
            lane[t] += lane[t + w]
    total = lane[0]
    for k in range(whole, n):
        total += x[k] * y[k]
    return total


def dot(x, i, y, j, n):
    """``sum_k x[i + (k,)] * y[j + (k,)]`` for ``k < n``: the ``n`` values from index tuple ``i``
    of array ``x`` (its last dimension; likewise ``j`` of ``y``) times each other, summed in the
    module's lane order (float32 or float64; within the arrays: unchecked)."""


@overload(dot)
def _dot_impl(x, i, y, j, n):
    if _vector_arg(x, i) and _vector_arg(y, j) and x.dtype == y.dtype:
        return lambda x, i, y, j, n: _dot_vector(x, i, y, j, n)

    def plain(x, i, y, j, n):               # another layout: the same order through views
        return dot_reference(x[i[:-1]][i[-1]:i[-1] + n], y[j[:-1]][j[-1]:j[-1] + n])
    return plain


@intrinsic
def _axpy_vector(typingctx, w, x, i, y, j, n):
    # y[j][k] += w * x[i][k] for k < n; x, y C-contiguous
    if not (_vector_arg(x, i) and _vector_arg(y, j) and x.dtype == y.dtype and w == x.dtype
            and isinstance(n, types.Integer)):
        return None
    dt = x.dtype
    sig = types.none(w, x, i, y, j, n)
    L = LANES[dt]

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        vt = ir.VectorType(context.get_value_type(dt), L)
        px, py, count, whole = _operands(context, builder, signature, args, 1, L)
        wv = builder.insert_element(ir.Constant(vt, None), args[0], ir.Constant(i32, 0))
        wv = builder.shuffle_vector(wv, wv, ir.Constant(ir.VectorType(i32, L), [0] * L))   # w in every lane
        with _steps(builder, ir.Constant(whole.type, 0), whole, L) as (k, _):
            xv = builder.load(builder.bitcast(builder.gep(px, [k]), vt.as_pointer()), align=1)
            yp = builder.bitcast(builder.gep(py, [k]), vt.as_pointer())
            builder.store(builder.fadd(builder.load(yp, align=1), builder.fmul(wv, xv)), yp, align=1)
        with _steps(builder, whole, count, 1) as (k, _):
            yp = builder.gep(py, [k])
            xs = builder.load(builder.gep(px, [k]))
            builder.store(builder.fadd(builder.load(yp), builder.fmul(args[0], xs)), yp)
        return context.get_dummy_value()

    return sig, codegen


def axpy(w, x, i, y, j, n):
    """``y[j + (k,)] += w * x[i + (k,)]`` for ``k < n`` (index tuples as :func:`dot`'s): each
    value one product and one sum, so the result does not depend on the vector width."""


@overload(axpy)
def _axpy_impl(w, x, i, y, j, n):
    if _vector_arg(x, i) and _vector_arg(y, j) and x.dtype == y.dtype and w == x.dtype:
        return lambda w, x, i, y, j, n: _axpy_vector(w, x, i, y, j, n)

    def plain(w, x, i, y, j, n):
        xs, ys = x[i[:-1]], y[j[:-1]]
        for k in range(n):
            ys[j[-1] + k] += w * xs[i[-1] + k]
    return plain


# ----------------------------------------------------------------------------- keys in blocks
# The decode step's attention dots one query with each key of a head and adds each value, weighted,
# into the context: per (key, head), 64 products and a reduction of the 16 lanes (four rounds of a
# shuffle across the lanes and a sum), then 64 multiply-adds through memory.  :func:`dots` and
# :func:`axpys` take BLOCK keys a call and do exactly the same operations on the same operands, so
# every score and every context value keeps its bits: the BLOCK keys' lane reductions run side by
# side (each round halves every key's lanes, the keys' halves packed into full vectors, so a round
# is a few shuffles and ONE sum for all of them), and the context's values stay in registers while
# the BLOCK weighted values are added to them in order.
BLOCK = 8             # keys one call of dots / axpys takes


def _halves(builder, vec, keys, width):
    # a vector of ``keys`` segments of ``width`` lanes -> (first halves, second halves) of every segment
    i32 = ir.IntType(32)
    first = [k * width + j for k in range(keys) for j in range(width // 2)]
    second = [k * width + width // 2 + j for k in range(keys) for j in range(width // 2)]
    return tuple(builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, len(ix)), ix))
                 for ix in (first, second))


def _reduce_keys(builder, accs, L):
    # the lane sums of each accumulator [L lanes] in the order of dot's reduction (lane[j] +=
    # lane[j + w] for w = L/2, .., 1; lane 0 is the sum), all accumulators side by side -> scalars
    i32 = ir.IntType(32)
    vecs, keys, width = list(accs), 1, L
    while width > 1:
        if len(vecs) > 1 and keys * width < L:            # pack two vectors' keys into one
            vecs = [builder.shuffle_vector(vecs[m], vecs[m + 1], ir.Constant(
                ir.VectorType(i32, 2 * keys * width), list(range(2 * keys * width))))
                for m in range(0, len(vecs), 2)]
            keys *= 2
        halves = [_halves(builder, v, keys, width) for v in vecs]
        vecs = [builder.fadd(a, b) for a, b in halves]   # lane j of a segment + lane j + width/2
        width //= 2
    return [builder.extract_element(v, ir.Constant(i32, k)) for v in vecs for k in range(keys)]


@intrinsic
def _dots_vector(typingctx, x, i, y, j, n, stride, out, o):
    # out[o][k] = dot(x[i], y[j] + k * stride, n) for k < BLOCK (the flat offsets of y's keys)
    if not (_vector_arg(x, i) and _vector_arg(y, j) and _vector_arg(out, o) and x.dtype == y.dtype
            and out.dtype == x.dtype and isinstance(n, types.Integer) and isinstance(stride, types.Integer)):
        return None
    dt = x.dtype
    sig = types.none(x, i, y, j, n, stride, out, o)
    L = LANES[dt]

    def codegen(context, builder, signature, args):
        intp = context.get_value_type(types.intp)
        vt = ir.VectorType(context.get_value_type(dt), L)
        px, py, count, whole = _operands(context, builder, signature, args, 0, L)
        keys = _block(context, builder, py, args[5], signature.args[5])
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(BLOCK)]
        with _steps(builder, ir.Constant(intp, 0), whole, L) as (e, _):
            xv = builder.load(builder.bitcast(builder.gep(px, [e]), vt.as_pointer()), align=1)
            for k in range(BLOCK):
                yv = builder.load(builder.bitcast(builder.gep(keys[k], [e]), vt.as_pointer()), align=1)
                builder.store(builder.fadd(builder.load(accs[k]), builder.fmul(xv, yv)), accs[k])
        sums = _reduce_keys(builder, [builder.load(a) for a in accs], L)
        totals = [cgutils.alloca_once_value(builder, v) for v in sums]
        with _steps(builder, whole, count, 1) as (e, _):      # the products past the whole blocks
            xs = builder.load(builder.gep(px, [e]))
            for k in range(BLOCK):
                ys = builder.load(builder.gep(keys[k], [e]))
                builder.store(builder.fadd(builder.load(totals[k]), builder.fmul(xs, ys)), totals[k])
        po = _pointer(context, builder, signature.args[6], args[6], args[7], signature.args[7])
        for k in range(BLOCK):
            builder.store(builder.load(totals[k]), builder.gep(po, [ir.Constant(intp, k)]))
        return context.get_dummy_value()

    return sig, codegen


def dots(x, i, y, j, n, stride, out, o):
    """``out[o + (k,)] = dot(x, i, y, j + k * stride, n)`` for ``k < BLOCK`` (``j + k * stride``:
    ``stride`` values past index tuple ``j`` of ``y``, flat): BLOCK dot products of one vector,
    each the bits :func:`dot` gives (C-contiguous arrays of one float dtype; within the arrays:
    unchecked)."""


@overload(dots)
def _dots_impl(x, i, y, j, n, stride, out, o):
    if _vector_arg(x, i) and _vector_arg(y, j) and _vector_arg(out, o):
        return lambda x, i, y, j, n, stride, out, o: _dots_vector(x, i, y, j, n, stride, out, o)
    return None


@intrinsic
def _axpys_vector(typingctx, w, wi, x, i, stride, y, j, n):
    # for k < BLOCK, in order: y[j][:n] += w[wi][k] * (x[i] + k * stride)[:n] where w[wi][k] != 0
    if not (_vector_arg(w, wi) and _vector_arg(x, i) and _vector_arg(y, j) and x.dtype == y.dtype
            and w.dtype == x.dtype and isinstance(n, types.Integer) and isinstance(stride, types.Integer)):
        return None
    dt = x.dtype
    sig = types.none(w, wi, x, i, stride, y, j, n)
    L = LANES[dt]

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        intp = context.get_value_type(types.intp)
        ft = context.get_value_type(dt)
        vt = ir.VectorType(ft, L)
        tys = signature.args
        pw = _pointer(context, builder, tys[0], args[0], args[1], tys[1])
        px = _pointer(context, builder, tys[2], args[2], args[3], tys[3])
        py = _pointer(context, builder, tys[5], args[5], args[6], tys[6])
        count = context.cast(builder, args[7], tys[7], types.intp)
        whole = _whole(builder, count, L)
        rows = _block(context, builder, px, args[4], tys[4])
        weights = [builder.load(builder.gep(pw, [ir.Constant(intp, k)])) for k in range(BLOCK)]
        used = [builder.fcmp_unordered("!=", wk, ir.Constant(ft, 0)) for wk in weights]   # wk != 0
        spread = []
        for wk in weights:                                 # each weight in every lane
            v = builder.insert_element(ir.Constant(vt, None), wk, ir.Constant(i32, 0))
            spread.append(builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, L), [0] * L)))
        with _steps(builder, ir.Constant(intp, 0), whole, L) as (e, _):
            yp = builder.bitcast(builder.gep(py, [e]), vt.as_pointer())
            yv = builder.load(yp, align=1)
            for k in range(BLOCK):
                xv = builder.load(builder.bitcast(builder.gep(rows[k], [e]), vt.as_pointer()), align=1)
                yv = builder.select(used[k], builder.fadd(yv, builder.fmul(spread[k], xv)), yv)
            builder.store(yv, yp, align=1)
        with _steps(builder, whole, count, 1) as (e, _):      # the values past the whole blocks
            yp = builder.gep(py, [e])
            ys = builder.load(yp)
            for k in range(BLOCK):
                xs = builder.load(builder.gep(rows[k], [e]))
                ys = builder.select(used[k], builder.fadd(ys, builder.fmul(weights[k], xs)), ys)
            builder.store(ys, yp)
        return context.get_dummy_value()

    return sig, codegen


def axpys(w, wi, x, i, stride, y, j, n):
    """For ``k < BLOCK`` in order, where ``wk = w[wi + (k,)]`` is not 0: ``y[j + (m,)] += wk *
    x[i + (k * stride + m,)]`` for ``m < n`` (flat offsets as :func:`dots`'): BLOCK calls of
    :func:`axpy`, skipping zero weights, with the same bits (C-contiguous arrays of one float
    dtype; within the arrays: unchecked)."""


@overload(axpys)
def _axpys_impl(w, wi, x, i, stride, y, j, n):
    if _vector_arg(w, wi) and _vector_arg(x, i) and _vector_arg(y, j):
        return lambda w, wi, x, i, stride, y, j, n: _axpys_vector(w, wi, x, i, stride, y, j, n)
    return None


@intrinsic
def prefetch(typingctx, x, i, n):
    """Hint the CPU to bring the ``n`` values from index tuple ``i`` of ``x`` (its last dimension,
    C-contiguous; else nothing) into the cache, a prefetch per 64 bytes: no effect on any value,
    never a fault."""
    if not (isinstance(x, types.Array) and isinstance(i, types.BaseTuple) and len(i) == x.ndim
            and all(isinstance(t, types.Integer) for t in i) and isinstance(n, types.Integer)):
        return None
    sig = types.none(x, i, n)

    def codegen(context, builder, signature, args):
        if signature.args[0].layout != "C":
            return context.get_dummy_value()
        xt, it, nt = signature.args
        intp = context.get_value_type(types.intp)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        p = builder.bitcast(_pointer(context, builder, xt, args[0], args[1], it), i8p)
        nbytes = builder.mul(context.cast(builder, args[2], nt, types.intp),
                             ir.Constant(intp, xt.dtype.bitwidth // 8))
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        read, keep, data = (ir.Constant(i32, v) for v in (0, 3, 1))   # a read, kept close, data
        with _steps(builder, ir.Constant(intp, 0), nbytes, 64) as (k, _):
            builder.call(fn, [builder.gep(p, [k]), read, keep, data])
        return context.get_dummy_value()

    return sig, codegen
