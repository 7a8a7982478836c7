"""Row-wise and element-wise kernels: LayerNorm forward and backward, softmax, cross-entropy forward
and backward, embedding gather and scatter-add, ReLU, the fused Adam(W) update.

A row kernel runs one block per row (``THREADS`` threads, fewer under the simulator) and reduces
through shared memory (``_common.block_sum``, ``block_max``: a tree over the block, every thread
calls them).  The arithmetic follows the NumPy reference op for op: LayerNorm's mean and variance
in two passes, the softmax's maximum subtracted before the exponentials, the scatter-add summing
each table row's gradients in token order (as ``np.add.at``), Adam's update in the reference's
order of operations.  The LayerNorm and softmax formulas are device functions
(:func:`row_functions`) that the persistent decode kernel's stages call too.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import cuda

from refopt.kernels.cuda._common import (
    SIM, SIMULATOR, block_max, block_sum, cdiv, empty, kernel, nbtype)

THREADS = 8 if SIM else 32 if SIMULATOR else 256


# ----------------------------------------------------------------------------- row formulas
class RowFunctions(NamedTuple):
    """The row formulas as block-cooperative device functions (every thread of the block calls
    them; thread ``tid`` takes entries ``tid, tid + stride, ...``), one home for each: the row
    kernels below and the persistent decode kernel (:mod:`.decode_stages`) call these.

    * ``layernorm(x, y, r0, D, gamma, g0, beta, b0, has_gamma, has_beta, eps, stride, buf)
      -> (mean, rstd)``: the row ``x[r0:r0 + D]`` normalised into ``y[r0:r0 + D]``,
      ``(x - mean) * rstd * gamma[g0:] + beta[b0:]`` (the gain and the offset where given), the
      mean and the variance in two passes as the reference; ``y`` may be ``x``.
    * ``scaled_max(x, lo, hi, t, stride, buf)``: the block's maximum of ``x[j] / t``, ``lo <= j < hi``.
    * ``exp_sum(x, lo, hi, t, top, y, stride, buf)``: ``y[j] = exp(x[j] / t - top)``; returns
      their sum over the block.
    * ``divide(y, lo, hi, total, stride)``: ``y[j] /= total``.
    * ``softmax(x, y, V, t, stride, buf) -> (top, total)``: the three in turn over a whole row
      ``[0, V)`` (the softmax and cross-entropy kernels).

    The last three are the reference's ``softmax(x / t)`` (the maximum subtracted before the
    exponentials) over ``[lo, hi)``; the decode kernel runs them on slices of a row and combines
    the slices' maxima and sums in between.  ``buf``: shared memory of ``blockDim`` entries or more.
    Rows are given by offsets into flat arrays, not by slices: a slice's bounds are clamped at run
    time, and the compiler then keeps several versions of the loops over it.
    """

    layernorm: object
    scaled_max: object
    exp_sum: object
    divide: object
    softmax: object


@functools.lru_cache(maxsize=None)
def row_functions(dtype) -> RowFunctions:
    """:class:`RowFunctions` computing in ``dtype`` (float32 or float64)."""
    DT = nbtype(dtype)

    @cuda.jit(device=True)
    def layernorm(x, y, r0, D, gamma, g0, beta, b0, has_gamma, has_beta, eps, stride, buf):
        tid = cuda.threadIdx.x
        part = DT(0)
        for d in range(tid, D, stride):
            part += x[r0 + d]
        mean = block_sum(part, buf) / DT(D)
        part = DT(0)
        for d in range(tid, D, stride):
            c = x[r0 + d] - mean
            part += c * c
        var = block_sum(part, buf) / DT(D)
        rstd = DT(1) / math.sqrt(var + eps)
        cuda.syncthreads()
        for d in range(tid, D, stride):
            v = (x[r0 + d] - mean) * rstd
            if has_gamma:
                v = v * gamma[g0 + d]
            if has_beta:
                v = v + beta[b0 + d]
            y[r0 + d] = v
        return mean, rstd

    @cuda.jit(device=True)
    def scaled_max(x, lo, hi, t, stride, buf):
        top = DT(-math.inf)
        for j in range(lo + cuda.threadIdx.x, hi, stride):
            top = max(top, x[j] / t)
        return block_max(top, buf)

    @cuda.jit(device=True)
    def exp_sum(x, lo, hi, t, top, y, stride, buf):
        part = DT(0)
        for j in range(lo + cuda.threadIdx.x, hi, stride):
            e = math.exp(x[j] / t - top)
            y[j] = e
            part += e
        return block_sum(part, buf)

    @cuda.jit(device=True)
    def divide(y, lo, hi, total, stride):
        for j in range(lo + cuda.threadIdx.x, hi, stride):
            y[j] = y[j] / total

    @cuda.jit(device=True)
    def softmax(x, y, V, t, stride, buf):
        top = scaled_max(x, 0, V, t, stride, buf)
        total = exp_sum(x, 0, V, t, top, y, stride, buf)
        divide(y, 0, V, total, stride)
        return top, total

    return RowFunctions(layernorm, scaled_max, exp_sum, divide, softmax)


# ----------------------------------------------------------------------------- LayerNorm
@functools.lru_cache(maxsize=None)
def _layernorm(dtype):
    DT = nbtype(dtype)
    layernorm_row = row_functions(dtype).layernorm

    @kernel()
    def layernorm(x, gamma, beta, has_gamma, has_beta, eps, y, mean_out, rstd_out):
        # x [N, D] -> y [N, D]; mean_out / rstd_out [N] (when non-empty) keep the statistics
        n = cuda.blockIdx.x
        buf = cuda.shared.array(1024, DT)
        mean, rstd = layernorm_row(x[n], y[n], 0, x.shape[1], gamma, 0, beta, 0, has_gamma, has_beta, eps,
                                   cuda.blockDim.x, buf)
        if cuda.threadIdx.x == 0 and mean_out.shape[0] > 0:
            mean_out[n] = mean
            rstd_out[n] = rstd
    return layernorm


def layernorm(x2, gamma, beta, eps, y=None, stats=None, stream=0):
    """LayerNorm of the rows of the device array ``x2 [N, D]`` -> ``y`` (allocated when None);
    ``stats``: a pair of ``[N]`` arrays receiving each row's mean and 1/std."""
    N, D = x2.shape
    dtype = np.dtype(x2.dtype)
    y = empty((N, D), dtype) if y is None else y
    dummy = y.reshape(-1)[:1]
    mean, rstd = stats if stats is not None else (dummy[:0], dummy[:0])
    if N:
        _layernorm(dtype)[N, THREADS, stream](x2, dummy if gamma is None else gamma,
                                             dummy if beta is None else beta, gamma is not None,
                                             beta is not None, dtype.type(eps), y, mean, rstd)
    return y


def layernorm_backward(d_y2, x2, gamma, eps, stream=0):
    """Device ``d_y2, x2 [N, D]`` -> ``d_x [N, D]``, ``d_gamma [D]`` (None without gamma),
    ``d_beta [D]``: the row statistics from the forward's kernel, then the training step's
    backward (:func:`refopt.kernels.cuda.fused.layernorm_backward`)."""
    from refopt.kernels.cuda import fused
    from refopt.kernels.cuda._common import fill

    N, D = x2.shape
    dtype = np.dtype(x2.dtype)
    mean, rstd = empty(max(N, 1), dtype), empty(max(N, 1), dtype)
    layernorm(x2, None, None, eps, y=empty((N, D), dtype), stats=(mean[:N], rstd[:N]), stream=stream)
    has_gamma = gamma is not None
    if not has_gamma:
        gamma = empty(D, dtype)
        fill(gamma, 1, stream=stream)
    d_x, d_gamma, d_beta = empty((N, D), dtype), empty(D, dtype), empty(D, dtype)
    fused.layernorm_backward(d_y2, x2, mean, rstd, gamma, d_x, d_gamma, d_beta,
                             empty((2, fused.CHUNKS, D), dtype), stream=stream)
    return d_x, (d_gamma if has_gamma else None), d_beta


def sum_rows(a2, stream=0):
    """Column sums of the device array ``a2 [N, D]`` -> ``[D]`` (chunks of rows, then the chunks:
    :func:`refopt.kernels.cuda.fused.column_sums`)."""
    from refopt.kernels.cuda import fused

    D = a2.shape[1]
    out = empty(D, a2.dtype)
    fused.column_sums(a2, out, empty((fused.CHUNKS, D), a2.dtype), stream=stream)
    return out


# ----------------------------------------------------------------------------- softmax, loss
@functools.lru_cache(maxsize=None)
def _softmax(dtype):
    DT = nbtype(dtype)
    row = row_functions(dtype)

    @kernel()
    def softmax(x, temperature, y):
        # y[n] = softmax(x[n] / temperature)
        n = cuda.blockIdx.x
        V = x.shape[1]
        buf = cuda.shared.array(1024, DT)
        row.softmax(x[n], y[n], V, temperature, cuda.blockDim.x, buf)
    return softmax


def softmax(x2, temperature=1.0, out=None, stream=0):
    """Row softmax of ``x2 [N, V] / temperature`` on the device (dividing by ``temperature``, as
    the reference)."""
    N, V = x2.shape
    dtype = np.dtype(x2.dtype)
    out = empty((N, V), dtype) if out is None else out
    if N:
        _softmax(dtype)[N, THREADS, stream](x2, dtype.type(temperature), out)
    return out


@functools.lru_cache(maxsize=None)
def _cross_entropy(dtype):
    DT = nbtype(dtype)
    row = row_functions(dtype)
    one = DT(1)                       # the softmax at temperature 1 (x / 1 is x: the division folds)

    @kernel()
    def forward(logits, targets, ce, probs):
        # logits [N, V], targets [N] -> ce [N], probs [N, V]
        n = cuda.blockIdx.x
        V = logits.shape[1]
        buf = cuda.shared.array(1024, DT)
        top, total = row.softmax(logits[n], probs[n], V, one, cuda.blockDim.x, buf)
        if cuda.threadIdx.x == 0:
            ce[n] = math.log(total) - (logits[n, targets[n]] - top)

    @kernel()
    def backward(d_ce, probs, targets, d_logits):
        # d_logits[n] = d_ce[n] * (probs[n] - onehot(targets[n]))
        n = cuda.blockIdx.x
        V = probs.shape[1]
        w = d_ce[n]
        t = targets[n]
        for j in range(cuda.threadIdx.x, V, cuda.blockDim.x):
            g = probs[n, j] * w
            if j == t:
                g -= w
            d_logits[n, j] = g
    return forward, backward


def cross_entropy(logits2, targets, stream=0):
    """Device ``logits2 [N, V]``, ``targets [N]`` int64 -> ``ce [N]``, ``probs [N, V]``."""
    N, V = logits2.shape
    dtype = np.dtype(logits2.dtype)
    ce, probs = empty(max(N, 1), dtype)[:N], empty((N, V), dtype)
    if N:
        _cross_entropy(dtype)[0][N, THREADS, stream](logits2, targets, ce, probs)
    return ce, probs


def cross_entropy_backward(d_ce, probs2, targets, out=None, stream=0):
    N, V = probs2.shape
    dtype = np.dtype(probs2.dtype)
    out = empty((N, V), dtype) if out is None else out
    if N:
        _cross_entropy(dtype)[1][N, THREADS, stream](d_ce, probs2, targets, out)
    return out


# ----------------------------------------------------------------------------- embeddings
@functools.lru_cache(maxsize=None)
def _gather(dtype):
    @kernel()
    def gather(table, ids, out):
        # out[n] = table[ids[n]]
        n = cuda.blockIdx.x
        r = ids[n]
        for e in range(cuda.threadIdx.x, table.shape[1], cuda.blockDim.x):
            out[n, e] = table[r, e]
    return gather


def gather(table, ids, stream=0):
    """Rows ``table[ids]`` of a device table for device int64 ``ids [N]`` -> ``[N, E]``."""
    N = ids.shape[0]
    out = empty((N, table.shape[1]), table.dtype)
    if N:
        _gather(np.dtype(table.dtype))[N, THREADS, stream](table, ids, out)
    return out


@functools.lru_cache(maxsize=None)
def _segment_sum(dtype):

    @kernel()
    def segment_sum(d_out, order, starts, rows, d_table):
        # d_table[rows[g]] += sum of d_out[order[starts[g] .. starts[g+1]]], in that (token) order
        g = cuda.blockIdx.x
        r = rows[g]
        for e in range(cuda.threadIdx.x, d_out.shape[1], cuda.blockDim.x):
            s = d_table[r, e]
            for p in range(starts[g], starts[g + 1]):
                s += d_out[order[p], e]
            d_table[r, e] = s
    return segment_sum


def scatter_add(d_out2, ids, d_table, stream=0):
    """``d_table[ids[n]] += d_out2[n]`` in token order per row (``np.add.at``'s order); ``ids`` a
    host int array (the positions are sorted on the host), ``d_out2 [N, E]`` and ``d_table`` on
    the device."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size == 0:
        return d_table
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    rows = sorted_ids[starts]
    starts = np.r_[starts, ids.size].astype(np.int64)
    _segment_sum(np.dtype(d_out2.dtype))[rows.size, THREADS, stream](
        d_out2, cuda.to_device(order), cuda.to_device(starts), cuda.to_device(rows), d_table)
    return d_table


# ----------------------------------------------------------------------------- element-wise
@functools.lru_cache(maxsize=None)
def _elementwise(dtype):
    DT = nbtype(dtype)

    @kernel()
    def add(a, b, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = a[i] + b[i]

    @kernel()
    def scale(a, s, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = a[i] * s

    @kernel()
    def relu_backward(d_y, x, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = d_y[i] if x[i] > DT(0) else DT(0)

    @kernel()
    def relu(x, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = max(x[i], DT(0))
    return add, scale, relu_backward, relu


def _flat_launch(fn, n, *args, stream=0):
    if n:
        fn[cdiv(n, 256), 256, stream](*args)


def add(a, b, out=None, stream=0):
    """``a + b`` of same-shaped device arrays (``out`` may be ``a``)."""
    out = empty(a.shape, a.dtype) if out is None else out
    _flat_launch(_elementwise(np.dtype(a.dtype))[0], a.size, a.reshape(-1), b.reshape(-1),
                 out.reshape(-1), stream=stream)
    return out


def scale(a, s, out=None, stream=0):
    out = empty(a.shape, a.dtype) if out is None else out
    _flat_launch(_elementwise(np.dtype(a.dtype))[1], a.size, a.reshape(-1), np.dtype(a.dtype).type(s),
                 out.reshape(-1), stream=stream)
    return out


def relu_backward(d_y, x, stream=0):
    out = empty(x.shape, x.dtype)
    _flat_launch(_elementwise(np.dtype(x.dtype))[2], x.size, d_y.reshape(-1), x.reshape(-1),
                 out.reshape(-1), stream=stream)
    return out


def relu(x, stream=0):
    out = empty(x.shape, x.dtype)
    _flat_launch(_elementwise(np.dtype(x.dtype))[3], x.size, x.reshape(-1), out.reshape(-1),
                 stream=stream)
    return out


# ----------------------------------------------------------------------------- Adam(W)
@functools.lru_cache(maxsize=None)
def _adam(dtype):

    @kernel()
    def adam(var, grad, m, v, v_hat, decay, one_minus_beta_1, one_minus_beta_2, alpha, epsilon,
             amsgrad):
        # the reference's update (refopt.optimizers.Adam.update_step), element by element; the
        # Numba CPU kernel (kernels/cpu/optim.py) and fused.adam_chunks write the same lines: a
        # CUDA kernel and an @njit one cannot share a body
        i = cuda.grid(1)
        if i < var.shape[0]:
            x = var[i]
            x = x - x * decay
            g = grad[i]
            mi = m[i] + (g - m[i]) * one_minus_beta_1
            vi = v[i] + (g * g - v[i]) * one_minus_beta_2
            m[i] = mi
            v[i] = vi
            if amsgrad:
                vi = max(v_hat[i], vi)
                v_hat[i] = vi
            var[i] = x - (mi * alpha) / (math.sqrt(vi) + epsilon)
    return adam


def adam_device(var, grad, m, v, v_hat, decay, beta_1, beta_2, alpha, epsilon, stream=0):
    """The fused Adam(W) update on flat device arrays (``v_hat`` None without AMSGrad)."""
    dtype = np.dtype(var.dtype)
    dt = dtype.type
    amsgrad = v_hat is not None
    _flat_launch(_adam(dtype), var.shape[0], var, grad, m, v, v_hat if amsgrad else var[:0], dt(decay),
                 dt(1.0 - beta_1), dt(1.0 - beta_2), dt(alpha), dt(epsilon), amsgrad, stream=stream)

