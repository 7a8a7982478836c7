"""LayerNorm forward and backward, one row per task (two-pass mean and variance, as the reference)."""

import numpy as np
from numba import njit, prange


@njit(inline="always")
def _row_stats(x, n, eps):
    # mean and 1 / sqrt(var + eps) of row n of x [N, D], two passes as the reference
    D = x.shape[1]
    mean = x.dtype.type(0)
    for d in range(D):
        mean += x[n, d]
    mean /= D
    var = x.dtype.type(0)
    for d in range(D):
        var += (x[n, d] - mean) ** 2
    var /= D
    return mean, 1.0 / np.sqrt(var + eps)


@njit(inline="always")
def _normalise_row(x, n, gamma, beta, has_gamma, has_beta, eps, y):
    mean, rstd = _row_stats(x, n, eps)
    for d in range(x.shape[1]):
        v = (x[n, d] - mean) * rstd
        if has_gamma:
            v = v * gamma[d]
        if has_beta:
            v = v + beta[d]
        y[n, d] = v


@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True)
def _layernorm(x, gamma, beta, has_gamma, has_beta, eps, y):
    # x [N, D] -> y [N, D], one row per task
    for n in prange(x.shape[0]):
        _normalise_row(x, n, gamma, beta, has_gamma, has_beta, eps, y)


@njit(fastmath={"reassoc", "contract"}, cache=True)
def layernorm_serial(x, gamma, beta, has_gamma, has_beta, eps, y):
    # the same on the calling thread: a decode step's few rows cost less than waking the pool
    for n in range(x.shape[0]):
        _normalise_row(x, n, gamma, beta, has_gamma, has_beta, eps, y)


@njit(parallel=True, fastmath=False, cache=True)
def _layernorm_backward(d_y, x, gamma, has_gamma, eps, d_x, d_gamma_rows, d_beta_rows, chunks):
    # d_y, x [N, D] -> d_x [N, D]; per-chunk partial sums of d_gamma / d_beta [chunks, D]
    N, D = x.shape
    per = (N + chunks - 1) // chunks
    for c in prange(chunks):
        xhat = np.empty(D, x.dtype)
        g = np.empty(D, x.dtype)
        for n in range(c * per, min(N, (c + 1) * per)):
            mean, rstd = _row_stats(x, n, eps)
            m1 = x.dtype.type(0)
            m2 = x.dtype.type(0)
            for d in range(D):
                xhat[d] = (x[n, d] - mean) * rstd
                d_beta_rows[c, d] += d_y[n, d]
                d_gamma_rows[c, d] += d_y[n, d] * xhat[d]
                g[d] = d_y[n, d] * gamma[d] if has_gamma else d_y[n, d]
                m1 += g[d]
                m2 += g[d] * xhat[d]
            m1 /= D
            m2 /= D
            for d in range(D):
                d_x[n, d] = rstd * (g[d] - m1 - xhat[d] * m2)


def _vec(p, D, dtype):
    return np.zeros(D, dtype) if p is None else np.asarray(p, dtype)


_PARALLEL_ROWS = 32  # below this many rows (decode), one thread beats waking the thread pool


def layernorm_forward(x, gamma, beta, eps):
    # x [..., D] -> y [..., D]
    D = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)
    y = np.empty_like(x2)
    kernel = layernorm_serial if x2.shape[0] < _PARALLEL_ROWS else _layernorm
    kernel(x2, _vec(gamma, D, x.dtype), _vec(beta, D, x.dtype), gamma is not None, beta is not None,
           eps, y)
    return y.reshape(x.shape)


def layernorm_backward(d_y, x, gamma, eps):
    # d_y, x [..., D] -> d_x [..., D], d_gamma [D] | None, d_beta [D]
    D = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)
    g2 = np.ascontiguousarray(d_y, dtype=x.dtype).reshape(-1, D)
    chunks = max(1, min(x2.shape[0], 64))
    d_x = np.empty_like(x2)
    d_gamma = np.zeros((chunks, D), x.dtype)
    d_beta = np.zeros((chunks, D), x.dtype)
    _layernorm_backward(g2, x2, _vec(gamma, D, x.dtype), gamma is not None, eps, d_x, d_gamma, d_beta, chunks)
    return d_x.reshape(x.shape), (d_gamma.sum(0) if gamma is not None else None), d_beta.sum(0)
