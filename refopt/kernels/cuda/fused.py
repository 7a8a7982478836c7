"""The kernels of device-resident training that the ops namespace has no use for: each works on
device arrays the caller allocated once (nothing is allocated per call), and several fuse what
the reference does in two or three NumPy lines.

* :func:`embed` -- ``tokens[ids] + positions[pos]``.
* :func:`layernorm_backward` -- LayerNorm's input gradient from the forward's saved statistics,
  with the residual gradient added in the same pass, and the gain / bias gradients (column sums
  over chunks of rows, then over the chunks).
* :func:`column_sums` -- a bias gradient: the column sums of ``[N, O]`` (chunks, then the chunks).
* :func:`cross_entropy_grad` -- softmax cross-entropy per row, the arg-max hit for the accuracy
  metric, and the logits overwritten by their gradient ``w * (softmax - onehot)``;
  :func:`weighted_sums` reduces ``sum(w * ce)``, ``sum(w * hit)`` and ``sum(w)`` in float64 to
  three numbers (what a step copies back).
* :func:`segment_sum` -- an embedding gradient: per table row, the sum of its positions'
  gradients in token order, added to the row (``np.add.at`` into zeros, then ``+=``).
* :func:`dropout_keep` -- the dropout multiplier from :func:`refopt.philox.uniform`'s Philox
  stream (bit for bit reproducible on the host), and :func:`multiply`.
* The optimizer over one flat parameter buffer cut into *chunks* that never straddle two
  parameters: :func:`chunk_sumsq` (float64 sums of squares per chunk), :func:`clip_factors`
  (global-norm, per-tensor norm or no clipping, Keras's rules), :func:`adam_chunks` (clipping,
  decoupled weight decay and the Adam(W) step, the reference's arithmetic operation for
  operation, skipped entirely when the step's loss is not finite), :func:`accumulate`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float64, int32

from refopt.kernels.cuda._common import SIM, SIMULATOR, block_max, block_min, block_sum, cdiv, kernel, nbtype
from refopt.kernels.cuda.sampling import philox_uniform

THREADS = 8 if SIM else 32 if SIMULATOR else 256
COLS = 8 if SIM else 128  # threads of the column-sum and element-wise kernels
CHUNKS = 64               # row chunks of the two-stage column sums


# ----------------------------------------------------------------------------- embeddings
@functools.lru_cache(maxsize=None)
def _embed(dtype):
    @kernel()
    def embed(tokens, positions, ids, pos, out):
        n = cuda.blockIdx.x
        r, p = ids[n], pos[n]
        for e in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
            out[n, e] = tokens[r, e] + positions[p, e]
    return embed


def embed(tokens, positions, ids, pos, out, stream=0):
    """``out[n] = tokens[ids[n]] + positions[pos[n]]`` (``ids``, ``pos`` int32 ``[N]``)."""
    if out.shape[0]:
        _embed(np.dtype(out.dtype))[out.shape[0], THREADS, stream](tokens, positions, ids, pos, out)


@functools.lru_cache(maxsize=None)
def _segment_sum(dtype):
    DT = nbtype(dtype)

    @kernel()
    def segment_sum(d_out, order, starts, rows, d_table, count):
        # d_table[rows[g]] += sum of d_out[order[starts[g] .. starts[g+1]]], in token order, for
        # the count[0] distinct rows (the grid may be larger)
        g = cuda.blockIdx.x
        if g < count[0]:
            r = rows[g]
            for e in range(cuda.threadIdx.x, d_out.shape[1], cuda.blockDim.x):
                s = DT(0)
                for p in range(starts[g], starts[g + 1]):
                    s += d_out[order[p], e]
                d_table[r, e] += s
    return segment_sum


def segment_sum(d_out, order, starts, rows, count, d_table, stream=0):
    """Add each row's gathered gradients (``order``/``starts``/``rows`` from :func:`segments`, on the
    device; ``count`` a one-element device array holding the number of distinct rows, at most
    ``len(order)``, the grid) into ``d_table``."""
    if order.shape[0]:
        _segment_sum(np.dtype(d_out.dtype))[order.shape[0], THREADS, stream](d_out, order, starts, rows,
                                                                             d_table, count)


def segments(ids):
    """Host side of :func:`segment_sum`: ``(order, starts, rows)`` int32 for the ids ``[N]``: the
    positions sorted by id (stably), where each id's run starts (and the end), the distinct ids."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if ids.size else \
        np.zeros(0, np.int64)
    rows = sorted_ids[starts]
    return (order.astype(np.int32), np.r_[starts, ids.size].astype(np.int32), rows.astype(np.int32))


# ----------------------------------------------------------------------------- LayerNorm
@functools.lru_cache(maxsize=None)
def _layernorm_backward(dtype):
    DT = nbtype(dtype)

    @kernel()
    def rows(d_y, x, mean, rstd, gamma, d_res, d_x, add_res):
        # d_x = (d_res +) rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = d_y * gamma
        n = cuda.blockIdx.x
        D = x.shape[1]
        buf = cuda.shared.array(1024, DT)
        mu, r = mean[n], rstd[n]
        p1 = DT(0)
        p2 = DT(0)
        for d in range(cuda.threadIdx.x, D, cuda.blockDim.x):
            g = d_y[n, d] * gamma[d]
            p1 += g
            p2 += g * ((x[n, d] - mu) * r)
        m1 = block_sum(p1, buf) / DT(D)
        m2 = block_sum(p2, buf) / DT(D)
        for d in range(cuda.threadIdx.x, D, cuda.blockDim.x):
            g = d_y[n, d] * gamma[d]
            xhat = (x[n, d] - mu) * r
            v = r * (g - m1 - xhat * m2)
            d_x[n, d] = d_res[n, d] + v if add_res else v

    @kernel()
    def columns(d_y, x, mean, rstd, part_g, part_b, per):
        # partial column sums of d_y * xhat and d_y over chunks of rows -> [CHUNKS, D] each
        d = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        c = cuda.blockIdx.y
        N, D = x.shape
        if d < D:
            sg = DT(0)
            sb = DT(0)
            for n in range(c * per, min(N, (c + 1) * per)):
                g = d_y[n, d]
                sb += g
                sg += g * ((x[n, d] - mean[n]) * rstd[n])
            part_g[c, d] = sg
            part_b[c, d] = sb
    return rows, columns


def layernorm_backward(d_y, x, mean, rstd, gamma, d_x, d_gamma, d_beta, part, d_res=None, stream=0):
    """LayerNorm backward on ``[N, D]`` device arrays with the forward's ``mean``/``rstd`` ``[N]``:
    ``d_x`` (plus ``d_res`` when given: the residual branch's gradient), ``d_gamma``, ``d_beta``
    (``[D]`` views, written); ``part`` a ``[2, CHUNKS, >= D]`` work array."""
    N, D = x.shape
    dtype = np.dtype(x.dtype)
    rows, columns = _layernorm_backward(dtype)
    if N:
        rows[N, THREADS, stream](d_y, x, mean, rstd, gamma, d_x if d_res is None else d_res, d_x,
                                 d_res is not None)
    per = cdiv(max(N, 1), CHUNKS)
    chunks = cdiv(max(N, 1), per)
    pg, pb = part[0, :chunks, :D], part[1, :chunks, :D]
    columns[(cdiv(D, COLS), chunks), COLS, stream](d_y, x, mean, rstd, pg, pb, per)
    _finish(dtype)[cdiv(D, COLS), COLS, stream](pg, d_gamma, chunks)
    _finish(dtype)[cdiv(D, COLS), COLS, stream](pb, d_beta, chunks)


@functools.lru_cache(maxsize=None)
def _finish(dtype):
    DT = nbtype(dtype)

    @kernel()
    def finish(part, out, chunks):
        d = cuda.grid(1)
        if d < out.shape[0]:
            s = DT(0)
            for c in range(chunks):
                s += part[c, d]
            out[d] = s
    return finish


@functools.lru_cache(maxsize=None)
def _column_partials(dtype):
    DT = nbtype(dtype)

    @kernel()
    def partials(a, part, per):
        d = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        c = cuda.blockIdx.y
        N, D = a.shape
        if d < D:
            s = DT(0)
            for n in range(c * per, min(N, (c + 1) * per)):
                s += a[n, d]
            part[c, d] = s
    return partials


def column_sums(a, out, part, stream=0):
    """``out[d] = sum_n a[n, d]`` for a device ``a [N, D]`` (chunks of rows, then the chunks);
    ``part`` a ``[CHUNKS, >= D]`` work array."""
    N, D = a.shape
    dtype = np.dtype(a.dtype)
    per = cdiv(max(N, 1), CHUNKS)
    chunks = cdiv(max(N, 1), per)
    p = part[:chunks, :D]
    _column_partials(dtype)[(cdiv(D, COLS), chunks), COLS, stream](a, p, per)
    _finish(dtype)[cdiv(D, COLS), COLS, stream](p, out, chunks)


# ----------------------------------------------------------------------------- loss
@functools.lru_cache(maxsize=None)
def _cross_entropy_grad(dtype):
    DT = nbtype(dtype)

    @kernel()
    def ce_grad(logits, targets, d_ce, ce, hit, write_grad):
        # per row n: ce[n] = log(sum exp(l - top)) - (l[t] - top); hit[n] = (first arg-max == t);
        # then (write_grad) logits[n] <- d_ce[n] * (softmax(l) - onehot(t))
        n = cuda.blockIdx.x
        V = logits.shape[1]
        buf = cuda.shared.array(1024, DT)
        ibuf = cuda.shared.array(1024, int32)
        tid = cuda.threadIdx.x
        top = DT(-math.inf)
        first = V
        for j in range(tid, V, cuda.blockDim.x):
            x = logits[n, j]
            if x > top:
                top = x
                first = j
        row_top = block_max(top, buf)
        if top != row_top:
            first = V
        argmax = block_min(first, ibuf)
        part = DT(0)
        for j in range(tid, V, cuda.blockDim.x):
            part += math.exp(logits[n, j] - row_top)
        total = block_sum(part, buf)
        t = targets[n]
        if tid == 0:
            ce[n] = math.log(total) - (logits[n, t] - row_top)
            hit[n] = DT(1) if argmax == t else DT(0)
        cuda.syncthreads()
        if write_grad:
            wgt = d_ce[n]
            for j in range(tid, V, cuda.blockDim.x):
                g = (math.exp(logits[n, j] - row_top) / total) * wgt
                if j == t:
                    g -= wgt
                logits[n, j] = g

    @kernel()
    def sums(ce, hit, w, out):
        # one block: out = [sum(w * ce), sum(w * hit), sum(w)] in float64
        buf = cuda.shared.array(1024, float64)
        a = float64(0)
        b = float64(0)
        c = float64(0)
        for n in range(cuda.threadIdx.x, ce.shape[0], cuda.blockDim.x):
            a += float64(w[n] * ce[n])
            b += float64(w[n]) * float64(hit[n])
            c += float64(w[n])
        a = block_sum(a, buf)
        b = block_sum(b, buf)
        c = block_sum(c, buf)
        if cuda.threadIdx.x == 0:
            out[0] = a
            out[1] = b
            out[2] = c
    return ce_grad, sums


def cross_entropy_grad(logits, targets, d_ce, ce, hit, write_grad=True, stream=0):
    """See the module docstring; ``logits [N, V]`` (overwritten by its gradient when
    ``write_grad``), ``targets`` int32 ``[N]``, ``d_ce`` the per-row loss weights ``[N]``."""
    N = logits.shape[0]
    if N:
        _cross_entropy_grad(np.dtype(logits.dtype))[0][N, THREADS, stream](logits, targets, d_ce, ce,
                                                                          hit, bool(write_grad))


def weighted_sums(ce, hit, w, out, stream=0):
    """``out[:3] = sum(w * ce), sum(w * hit), sum(w)`` (float64, one block)."""
    _cross_entropy_grad(np.dtype(ce.dtype))[1][1, THREADS, stream](ce, hit, w, out)


# ----------------------------------------------------------------------------- element-wise
@functools.lru_cache(maxsize=None)
def _elementwise(dtype):
    DT = nbtype(dtype)

    @kernel()
    def keep(out, rate, scale, scal, stream):
        # scal = [step, key word 0, key word 1] (int32 words, read on the device)
        i = cuda.grid(1)
        if i < out.shape[0]:
            u = philox_uniform(scal[1], scal[2], i, scal[0], stream)
            out[i] = scale if u >= rate else DT(0)

    @kernel()
    def multiply(a, b, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = a[i] * b[i]

    @kernel()
    def accumulate(acc, g, steps, finish):
        # micro-step: acc += g;  last micro-step: g = (g + acc) / steps, acc = 0
        i = cuda.grid(1)
        if i < g.shape[0]:
            if finish:
                g[i] = (g[i] + acc[i]) / steps
                acc[i] = DT(0)
            else:
                acc[i] += g[i]
    return keep, multiply, accumulate


def dropout_keep(out, rate, scal, stream_id, stream=0):
    """``out[i] = 1/(1 - rate)`` where ``uniform(seed, step, stream_id, index=i) >= rate``, else 0
    (the uniform of :func:`refopt.philox.uniform`); ``scal`` an int32 device array ``[step, k0, k1]``
    with the key words of :func:`refopt.philox.seed_to_key` (bit patterns)."""
    n = out.shape[0]
    dtype = np.dtype(out.dtype)
    if n:
        _elementwise(dtype)[0][cdiv(n, COLS), COLS, stream](
            out, float64(rate), dtype.type(1.0 / (1.0 - rate)), scal, np.int64(stream_id))


def multiply(a, b, out, stream=0):
    n = out.shape[0]
    if n:
        _elementwise(np.dtype(out.dtype))[1][cdiv(n, COLS), COLS, stream](a, b, out)


def accumulate(acc, g, steps, finish, stream=0):
    """Gradient accumulation on flat buffers (Keras's rule: the mean of ``steps`` gradients)."""
    n = g.shape[0]
    dtype = np.dtype(g.dtype)
    if n:
        _elementwise(dtype)[2][cdiv(n, COLS), COLS, stream](acc, g, dtype.type(steps), bool(finish))


# ----------------------------------------------------------------------------- optimizer
@functools.lru_cache(maxsize=None)
def _optimizer(dtype):
    DT = nbtype(dtype)

    @kernel()
    def sumsq(g, bounds, out):
        # out[c] = sum over chunk c (elements bounds[c, 0] .. bounds[c, 1]) of g^2, in float64
        c = cuda.blockIdx.x
        buf = cuda.shared.array(1024, float64)
        s = float64(0)
        for i in range(bounds[c, 0] + cuda.threadIdx.x, bounds[c, 1], cuda.blockDim.x):
            x = float64(g[i])
            s += x * x
        s = block_sum(s, buf)
        if cuda.threadIdx.x == 0:
            out[c] = s

    @kernel()
    def segment_sumsq(chunk_sumsq, seg_chunks, out):
        # out[k] = sum of the chunk sums of parameter k (one block per parameter)
        k = cuda.blockIdx.x
        buf = cuda.shared.array(1024, float64)
        s = float64(0)
        for c in range(seg_chunks[k] + cuda.threadIdx.x, seg_chunks[k + 1], cuda.blockDim.x):
            s += chunk_sumsq[c]
        s = block_sum(s, buf)
        if cuda.threadIdx.x == 0:
            out[k] = s

    @kernel()
    def factors(seg_sumsq, mode, clip, mul, div, norm):
        # one thread: per parameter k, (g * mul[k]) / div[k] is the clipped gradient
        #   mode 0: no clipping; 1: global norm (Keras's clip_by_global_norm); 2: per tensor
        if cuda.threadIdx.x == 0 and cuda.blockIdx.x == 0:
            nseg = mul.shape[0]
            total = float64(0)
            for k in range(nseg):
                total += seg_sumsq[k]
                mul[k] = DT(1)
                div[k] = DT(1)
                if mode == 2:
                    mul[k] = DT(clip)
                    div[k] = DT(max(math.sqrt(seg_sumsq[k]), clip))
            gnorm = math.sqrt(total)
            norm[0] = gnorm
            if mode == 1:
                scale = clip / max(gnorm, clip) if math.isfinite(gnorm) else math.nan
                for k in range(nseg):
                    mul[k] = DT(scale)

    @kernel()
    def adam(var, grad, m, v, v_hat, bounds, chunk_seg, mul, div, decay_flag, hyper, clipvalue,
             one_minus_beta_1, one_minus_beta_2, epsilon, amsgrad, loss):
        # one block per chunk: the reference's Optimizer.apply for one element at a time;
        # hyper = [weight_decay * lr, alpha] of this step (on the device: graph replays read it)
        if not math.isfinite(loss[0]):
            return
        decay = hyper[0]
        alpha = hyper[1]
        c = cuda.blockIdx.x
        k = chunk_seg[c]
        f_mul, f_div = mul[k], div[k]
        dk = decay if decay_flag[k] != 0 else DT(0)
        for i in range(bounds[c, 0] + cuda.threadIdx.x, bounds[c, 1], cuda.blockDim.x):
            g = (grad[i] * f_mul) / f_div
            if clipvalue > DT(0):
                g = min(max(g, -clipvalue), clipvalue)
            x = var[i]
            if dk != DT(0):
                x = x - x * dk
            mi = m[i] + (g - m[i]) * one_minus_beta_1
            vi = v[i] + (g * g - v[i]) * one_minus_beta_2
            m[i] = mi
            v[i] = vi
            if amsgrad:
                vi = max(v_hat[i], vi)
                v_hat[i] = vi
            var[i] = x - (mi * alpha) / (math.sqrt(vi) + epsilon)
    return sumsq, segment_sumsq, factors, adam


def chunk_sumsq(g, bounds, out, stream=0):
    """``out[c]``: the float64 sum of squares of ``g[bounds[c, 0]:bounds[c, 1]]``."""
    n = out.shape[0]
    if n:
        _optimizer(np.dtype(g.dtype))[0][n, THREADS, stream](g, bounds, out)


def clip_factors(chunk_sums, seg_chunks, seg_sums, mode, clip, mul, div, norm, stream=0):
    """Per parameter ``k`` the clipped gradient is ``(g * mul[k]) / div[k]``; ``norm[0]`` the
    global norm; ``seg_sums`` a float64 work array (a sum of squares per parameter).  ``mode``:
    0 none, 1 ``global_clipnorm``, 2 ``clipnorm``."""
    kernels = _optimizer(np.dtype(mul.dtype))
    kernels[1][mul.shape[0], THREADS, stream](chunk_sums, seg_chunks, seg_sums)
    kernels[2][1, 1, stream](seg_sums, int32(mode), float64(clip), mul, div, norm)


def adam_chunks(var, grad, m, v, v_hat, bounds, chunk_seg, mul, div, decay_flag, hyper, clipvalue,
                beta_1, beta_2, epsilon, loss, stream=0):
    """Clip, decay and Adam-step every chunk of the flat ``var`` (``v_hat`` None without AMSGrad);
    ``hyper`` a device array ``[weight_decay * lr, alpha]`` in ``var``'s dtype; nothing is written
    when ``loss[0]`` is not finite."""
    dtype = np.dtype(var.dtype)
    dt = dtype.type
    n = chunk_seg.shape[0]
    amsgrad = v_hat is not None
    if n:
        _optimizer(dtype)[3][n, THREADS, stream](
            var, grad, m, v, v_hat if amsgrad else var[:1], bounds, chunk_seg, mul, div, decay_flag,
            hyper, dt(clipvalue or 0.0), dt(1.0 - beta_1), dt(1.0 - beta_2), dt(epsilon), amsgrad, loss)
