"""The samplers' selection steps, compiled: the Philox-4x32-10 generator, the selection rule
(:func:`refopt.philox.choose`), top-k partial selection, and the top-p and min-p cut-offs.

Each follows the rule written in :mod:`refopt.philox` and :mod:`refopt.samplers` exactly (same
tie-breaking, same float64 accumulation order), so for the same seed and probabilities the choices
are identical to the NumPy samplers'; the tests check that with hypothesis.
"""

import numpy as np
from numba import njit, prange

from refopt.philox import as_seeds

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint32(0x9E3779B9)
_W1 = np.uint32(0xBB67AE85)


@njit(cache=True)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    # one Philox-4x32-10 block: counter (c0..c3), key (k0, k1), all uint32 -> four uint32 words
    for r in range(10):
        if r:
            k0 = np.uint32(k0 + _W0)
            k1 = np.uint32(k1 + _W1)
        p0 = _M0 * np.uint64(c0)
        p1 = _M1 * np.uint64(c2)
        hi0, lo0 = np.uint32(p0 >> np.uint64(32)), np.uint32(p0 & np.uint64(0xFFFFFFFF))
        hi1, lo1 = np.uint32(p1 >> np.uint64(32)), np.uint32(p1 & np.uint64(0xFFFFFFFF))
        c0, c1, c2, c3 = np.uint32(hi1 ^ c1 ^ k0), lo1, np.uint32(hi0 ^ c3 ^ k1), lo0
    return c0, c1, c2, c3


@njit(cache=True)
def _uniforms(seeds, step, stream, out):
    # key: each row's seed; counter (step, 0, stream, 0) -> 53-bit uniform in [0, 1)
    for n in range(seeds.shape[0]):
        k0 = np.uint32(seeds[n] & np.uint64(0xFFFFFFFF))
        k1 = np.uint32(seeds[n] >> np.uint64(32))
        x0, x1, _, _ = philox4x32_10(np.uint32(step), np.uint32(0), np.uint32(stream), np.uint32(0), k0, k1)
        hi = np.float64(x0 >> np.uint32(5))
        lo = np.float64(x1 >> np.uint32(6))
        out[n] = (hi * 67108864.0 + lo) / 9007199254740992.0


def uniform(seeds, step, stream=0):
    """Philox uniforms ``[len(seeds)]``, one per row's seed, at ``step`` (same values as
    :func:`refopt.philox.uniform`)."""
    seeds = np.ascontiguousarray(as_seeds(seeds)).reshape(-1)
    out = np.empty(seeds.shape[0], np.float64)
    _uniforms(seeds, int(step), int(stream), out)
    return out


@njit(parallel=True, cache=True)
def _choose(w, u, out, bad):
    # w [B, V] float64 >= 0, u [B] -> out [B]: smallest i with cumsum(w)[i] > u * sum(w)
    B, V = w.shape
    for b in prange(B):
        total = 0.0
        ok = True
        for i in range(V):
            if not (w[b, i] >= 0):
                ok = False
            total += w[b, i]
        if not ok or not (total > 0) or not np.isfinite(total):
            bad[b] = True
            out[b] = -1
            continue
        t = u[b] * total
        c = 0.0
        chosen = -1
        for i in range(V):
            c += w[b, i]
            if c > t:
                chosen = i
                break
        if chosen < 0:                     # rounding left none: the last positive weight
            for i in range(V - 1, -1, -1):
                if w[b, i] > 0:
                    chosen = i
                    break
        out[b] = chosen


def choose(weights, u):
    """:func:`refopt.philox.choose`, compiled."""
    from refopt.errors import SamplerError

    w = np.ascontiguousarray(weights, dtype=np.float64)
    u = np.ascontiguousarray(u, dtype=np.float64).reshape(-1)
    out = np.empty(w.shape[0], np.int64)
    bad = np.zeros(w.shape[0], np.bool_)
    _choose(w, u, out, bad)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SamplerError(f"cannot sample row {row}: its weights must be finite, non-negative and "
                           f"not all zero (sum {w[row].sum()!r}); are the logits NaN?")
    return out


@njit(cache=True)
def _kth_largest(row, k, top):
    # the k-th largest of row [V] (NaN counts as the largest, as in np.partition), in one pass
    # keeping the k largest seen so far in top [k], sorted descending
    n = 0
    for i in range(row.shape[0]):
        v = row[i]
        if n == k and not (v > top[k - 1] or (v != v and top[k - 1] == top[k - 1])):
            continue
        j = min(n, k - 1)                                 # insert v, dropping the smallest if full
        while j > 0 and (v > top[j - 1] or (v != v and top[j - 1] == top[j - 1])):
            top[j] = top[j - 1]
            j -= 1
        top[j] = v
        n = min(n + 1, k)
    return top[k - 1]


@njit(parallel=True, cache=True)
def _top_k_mask(p, k, out):
    # out[b, i] True on the k largest of p[b] (ties towards the lower index): the k-th largest
    # value, then one pass keeping "above" and the first ties
    B, V = p.shape
    for b in prange(B):
        kth = _kth_largest(p[b], k, np.empty(k, p.dtype))
        above = 0
        for i in range(V):
            if p[b, i] > kth:
                above += 1
        room = k - above
        for i in range(V):
            if p[b, i] > kth:
                out[b, i] = True
            elif p[b, i] == kth and room > 0:
                out[b, i] = True
                room -= 1
            else:
                out[b, i] = False


SMALL_K = 64          # up to this k, the one-pass selection; beyond it NumPy's partition


def top_k_mask(p, k):
    """:func:`refopt.samplers.sampler.top_k_mask`, compiled (for k up to SMALL_K)."""
    from refopt.ops.sampling import top_k_mask as reference

    p = np.ascontiguousarray(p)
    k = min(int(k), p.shape[1])
    if k > SMALL_K:
        return reference(p, k)
    out = np.empty(p.shape, np.bool_)
    _top_k_mask(p, k, out)
    return out


@njit(inline="always")
def _before(p, a, b):
    # whether token a comes before token b in the stable descending order (NaN last)
    pa, pb = p[a], p[b]
    if pa > pb:
        return True
    if pa == pb or (pa != pa and pb != pb):
        return a < b
    return pb != pb and pa == pa


@njit(inline="always")
def _sift_down(p, heap, n, j):
    while True:
        first = j
        for c in (2 * j + 1, 2 * j + 2):
            if c < n and _before(p, heap[c], heap[first]):
                first = c
        if first == j:
            return
        heap[j], heap[first] = heap[first], heap[j]
        j = first


@njit(parallel=True, cache=True)
def _top_p(p, top_p, cutoff, out):
    # KerasHub's nucleus rule in float64: in stable descending order, keep the first token and
    # every token whose preceding cumulative sum is <= top_p, among the first `cutoff`.  Tokens
    # come off a heap in that order, only as far as the rule keeps any (no full sort)
    B, V = p.shape
    for b in prange(B):
        row = p[b]
        heap = np.arange(V)
        for j in range(V // 2 - 1, -1, -1):
            _sift_down(row, heap, V, j)
        for i in range(V):
            out[b, i] = 0.0
        before = 0.0
        n = V
        for j in range(cutoff):
            if j > 0 and not before <= top_p:
                break
            i = heap[0]
            out[b, i] = row[i]
            before += row[i]
            n -= 1
            heap[0] = heap[n]
            _sift_down(row, heap, n, 0)


def top_p_distribution(p, top_p, k=None):
    """``TopPSampler.next_token_distribution``, compiled."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    cutoff = p.shape[1] if k is None else min(int(k), p.shape[1])
    out = np.empty_like(p)
    _top_p(p, float(top_p), cutoff, out)
    return out


@njit(parallel=True, cache=True)
def _min_p(p, min_p, keep_k, out):
    B, V = p.shape
    for b in prange(B):
        threshold = min_p * p[b].max()
        for i in range(V):
            out[b, i] = p[b, i] if (p[b, i] >= threshold or keep_k[b, i]) else 0.0


def min_p_distribution(p, min_p, min_tokens_to_keep=1):
    """``MinPSampler.next_token_distribution``, compiled."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    out = np.empty_like(p)
    _min_p(p, float(min_p), top_k_mask(p, min_tokens_to_keep), out)
    return out
