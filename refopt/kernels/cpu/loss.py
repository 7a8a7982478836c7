"""Softmax cross-entropy, forward and backward fused per position (one pass for the maximum, one for
the sum of exponentials), as :mod:`refopt.ops.loss` defines them."""

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=False, cache=True)
def _cross_entropy(logits, targets, ce, probs):
    # logits [N, V], targets [N] -> ce [N], probs [N, V] (softmax)
    N, V = logits.shape
    for n in prange(N):
        top = logits[n, 0]
        for j in range(1, V):
            top = max(top, logits[n, j])
        total = logits.dtype.type(0)
        for j in range(V):
            e = np.exp(logits[n, j] - top)
            probs[n, j] = e
            total += e
        lse = np.log(total)
        ce[n] = lse - (logits[n, targets[n]] - top)
        for j in range(V):
            probs[n, j] /= total


@njit(parallel=True, fastmath=False, cache=True)
def _cross_entropy_backward(d_ce, probs, targets, d_logits):
    # d_logits[n] = d_ce[n] * (probs[n] - onehot(targets[n]))
    N, V = probs.shape
    for n in prange(N):
        w = d_ce[n]
        for j in range(V):
            d_logits[n, j] = probs[n, j] * w
        d_logits[n, targets[n]] -= w


def cross_entropy_forward(logits, targets):
    # logits [B, S, V], targets [B, S] -> ce [B, S], probs [B, S, V]
    V = logits.shape[-1]
    l2 = np.ascontiguousarray(logits).reshape(-1, V)
    ce = np.empty(l2.shape[0], logits.dtype)
    probs = np.empty_like(l2)
    _cross_entropy(l2, np.ascontiguousarray(targets, dtype=np.int64).reshape(-1), ce, probs)
    return ce.reshape(logits.shape[:-1]), probs.reshape(logits.shape)


def cross_entropy_backward(d_ce, probs, targets):
    # d_ce [B, S], probs [B, S, V], targets [B, S] -> d_logits [B, S, V]
    V = probs.shape[-1]
    p2 = np.ascontiguousarray(probs).reshape(-1, V)
    out = np.empty_like(p2)
    _cross_entropy_backward(np.ascontiguousarray(d_ce, dtype=probs.dtype).reshape(-1), p2,
                            np.ascontiguousarray(targets, dtype=np.int64).reshape(-1), out)
    return out.reshape(probs.shape)
