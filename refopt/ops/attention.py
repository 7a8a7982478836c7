"""Multi-head causal self-attention with a padding mask.

The mask is boolean, True where a query may attend a key: the key is at or before the query
(causal) and is not padding.  Masked scores are *replaced* by the dtype's most negative finite
number, never -inf, so a query whose every key is masked (a row of padding) gets a uniform
distribution, finite numbers, never NaN.
"""

import numpy as np


def attention_mask(key_mask, query_positions):
    # key_mask [B, T] bool (True = real token), query_positions [S] int (index of each query in the
    # key axis) -> [B, 1, S, T] bool
    T = key_mask.shape[1]
    causal = np.arange(T)[None, :] <= query_positions[:, None]        # [S, T]
    return causal[None, None, :, :] & key_mask[:, None, None, :].astype(bool)


def split_heads(x, num_heads):
    # [B, S, D] -> [B, H, S, K]
    B, S, D = x.shape
    return x.reshape(B, S, num_heads, D // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    # [B, H, S, K] -> [B, S, D]
    B, H, S, K = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, S, H * K)


def softmax(x, axis=-1):
    # numerically stable softmax along `axis`
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention_forward(q, k, v, mask):
    # q [B, H, S, K] (already scaled by 1/sqrt(K)), k, v [B, H, T, K], mask [B, 1, S, T] bool
    # -> out [B, H, S, K], probs [B, H, S, T]
    scores = q @ k.transpose(0, 1, 3, 2)                              # [B, H, S, T]
    scores = np.where(mask, scores, np.finfo(scores.dtype).min)      # masked -> most negative finite
    probs = softmax(scores, axis=-1)                                  # [B, H, S, T]
    return probs @ v, probs


# split_heads and merge_heads are reshapes, each the other's inverse: the backward of split_heads is
# merge_heads and the backward of merge_heads is split_heads.


def softmax_backward(d_probs, probs, axis=-1):
    # d_probs, probs [...] -> d_x [...]: the Jacobian-vector product of softmax,
    # d_x = probs * (d_probs - sum(d_probs * probs))
    return probs * (d_probs - (d_probs * probs).sum(axis=axis, keepdims=True))


def attention_backward(d_out, q, k, v, probs, mask):
    # d_out [B, H, S, K], q [B, H, S, K] (scaled), k, v [B, H, T, K], probs [B, H, S, T] from the
    # forward, mask [B, 1, S, T] bool -> d_q [B, H, S, K], d_k [B, H, T, K], d_v [B, H, T, K]
    d_probs = d_out @ v.transpose(0, 1, 3, 2)                         # [B, H, S, T]
    d_v = probs.transpose(0, 1, 3, 2) @ d_out                         # [B, H, T, K]
    d_scores = softmax_backward(d_probs, probs)                       # [B, H, S, T]
    # a masked score was replaced by a constant, so nothing flows back through it
    d_scores = np.where(mask, d_scores, 0)
    d_q = d_scores @ k                                                # [B, H, S, K]
    d_k = d_scores.transpose(0, 1, 3, 2) @ q                          # [B, H, T, K]
    return d_q, d_k, d_v
