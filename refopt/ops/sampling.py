"""The samplers' selection steps in NumPy: the support of top-k, top-p and min-p sampling, and the
draw itself (:func:`refopt.philox.choose` with Philox uniforms, :func:`refopt.philox.uniform`).

The sampler classes (:mod:`refopt.samplers`) call these through the current backend's ops
namespace, so the Numba backend's compiled versions (:mod:`refopt.kernels.cpu.sampling`), which
follow the same rules to the bit, run underneath.
"""

import numpy as np

from refopt.philox import choose, uniform  # noqa: F401  (part of the namespace)


def descending_order(x):
    # x [B, V] -> indices [B, V] sorting each row by value, largest first; ties: lower index first
    return np.argsort(-np.asarray(x), axis=-1, kind="stable")


def top_k_mask(p, k: int):
    # p [B, V] -> bool [B, V], True on exactly min(k, V) entries per row: the largest values, ties
    # broken towards the lower token id.  O(V) (a partition, no sort).
    B, V = p.shape
    k = min(k, V)
    kth = -np.partition(-p, k - 1, axis=-1)[:, k - 1:k]                    # [B, 1] k-th largest
    above = p > kth                                                        # [B, V]
    tied = p == kth
    room = k - above.sum(axis=-1, keepdims=True)                           # tied entries to keep
    return above | (tied & (np.cumsum(tied, axis=-1) <= room))


def top_p_distribution(p, top_p: float, k=None):
    # KerasHub's nucleus rule: p [B, V] float64 -> the kept probabilities [B, V] (zero elsewhere).
    # Sort largest first (ties: lower id first), keep at most k, accumulate left to right in float64,
    # keep the first token and every token whose *preceding* sum is <= top_p.
    B, V = p.shape
    cutoff = V if k is None else min(k, V)
    order = descending_order(p)[:, :cutoff]                                # [B, cutoff]
    sorted_p = np.take_along_axis(p, order, axis=-1)
    cumulative = np.cumsum(sorted_p, axis=-1)                              # sequential, float64
    before = np.concatenate([np.zeros((B, 1)), cumulative[:, :-1]], axis=-1)  # sum of earlier ones
    keep = before <= top_p
    keep[:, 0] = True
    out = np.zeros_like(p)
    np.put_along_axis(out, order, np.where(keep, sorted_p, 0.0), axis=-1)
    return out


def min_p_distribution(p, min_p: float, min_tokens_to_keep: int = 1):
    # transformers' MinPLogitsWarper rule: keep p_i >= min_p * max(p), and always the
    # min_tokens_to_keep most probable (ties by lower id); p [B, V] float64 -> kept [B, V]
    threshold = min_p * p.max(axis=-1, keepdims=True)                      # [B, 1]
    keep = (p >= threshold) | top_k_mask(p, min_tokens_to_keep)
    return np.where(keep, p, 0.0)


def output_padding_mask(token_ids, prompt_mask, stop_token_ids):
    # token_ids [B, T], prompt_mask bool [B, T] -> bool [B, T]: KerasHub's output mask, True
    # through each row's first stop token outside the prompt, False after it; all True without
    # stop tokens.  (generate's output on every backend, the device loop's included.)
    if stop_token_ids is None:
        return np.ones(token_ids.shape, bool)
    end = np.isin(token_ids, np.asarray(stop_token_ids)) & ~prompt_mask       # [B, T]
    after = np.cumsum(end, axis=-1) - end                                       # stops strictly before
    return after == 0
