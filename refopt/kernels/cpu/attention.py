"""Attention for the Numba backend.  Decode-sized queries (a few per row): the softmax fused, one
pass per (batch, head, query) row computing the masked scores, their maximum, the exponentials and
the weighted sum of values.  Prefill-sized queries: the two products on BLAS (NumPy's batched
``matmul``) around a fused mask-and-softmax kernel over the score rows.  Same contract as
:func:`refopt.ops.attention.attention_forward`: masked scores are replaced by the dtype's most
negative finite number, so a fully masked row is uniform and finite.  Serves prefill (S queries)
and one-token decode against the cache (S = 1, keys and values read in place through strided
views of the cache)."""

import numpy as np
from numba import njit, prange


@njit(inline="always")
def _exp_normalise(p, top):
    # in place: p <- exp(p - top) / sum(exp(p - top)), ``top`` the row's maximum
    total = p.dtype.type(0)
    for t in range(p.shape[0]):
        p[t] = np.exp(p[t] - top)
        total += p[t]
    for t in range(p.shape[0]):
        p[t] /= total


@njit(parallel=True, fastmath=False, cache=True)
def _attention(q, k, v, mask, out, probs, lowest):
    # q [B, H, S, K], k, v [B, H, T, K], mask [B, 1, S, T] bool -> out [B, H, S, K], probs [B, H, S, T]
    B, H, S, K = q.shape
    T = k.shape[2]
    for row in prange(B * H * S):
        b = row // (H * S)
        h = (row // S) % H
        s = row % S
        p = probs[b, h, s]
        top = lowest
        for t in range(T):
            if mask[b, 0, s, t]:
                acc = q.dtype.type(0)
                for d in range(K):
                    acc += q[b, h, s, d] * k[b, h, t, d]
                p[t] = acc
            else:
                p[t] = lowest
            top = max(top, p[t])
        _exp_normalise(p, top)
        o = out[b, h, s]
        for d in range(K):
            o[d] = 0
        for t in range(T):
            w = p[t]
            if w != 0:
                for d in range(K):
                    o[d] += w * v[b, h, t, d]


@njit(parallel=True, fastmath=False, cache=True)
def _masked_softmax(scores, mask, lowest):
    # in place: scores [B, H, S, T] -> softmax over T, masked entries scored ``lowest``
    B, H, S, T = scores.shape
    for row in prange(B * H * S):
        b = row // (H * S)
        h = (row // S) % H
        s = row % S
        p = scores[b, h, s]
        top = lowest
        for t in range(T):
            if not mask[b, 0, s, t]:
                p[t] = lowest
            top = max(top, p[t])
        _exp_normalise(p, top)


BLAS_QUERIES = 8     # from this many queries per row, the products go to BLAS


def attention_forward(q, k, v, mask):
    # q [B, H, S, K] (scaled), k, v [B, H, T, K], mask [B, 1, S, T] -> out [B, H, S, K], probs [B, H, S, T]
    B, H, S, K = q.shape
    T = k.shape[2]
    k, v = k.astype(q.dtype, copy=False), v.astype(q.dtype, copy=False)
    if mask.shape != (B, 1, S, T):                  # the kernels index every dimension
        mask = np.broadcast_to(mask, (B, 1, S, T))
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if S >= BLAS_QUERIES:
        probs = q @ k.swapaxes(-1, -2)                                    # [B, H, S, T] scores
        _masked_softmax(probs, mask, np.finfo(q.dtype).min)
        return probs @ v, probs
    out = np.empty((B, H, S, K), q.dtype)
    probs = np.empty((B, H, S, T), q.dtype)
    _attention(q, k, v, mask, out, probs, np.finfo(q.dtype).min)
    return out, probs
