"""The samplers' selection steps on the GPU, each exactly the rule of :mod:`refopt.philox` and
:mod:`refopt.samplers` (same tie-breaking, same float64 accumulation order), so that for the same
probabilities and seed the tokens are the NumPy samplers' tokens.

Every routine is a *block-cooperative device function* over one row (all threads of the block
call it; results are returned to every thread), used both by the one-block-per-row kernels of the
ops namespace below and inside the persistent decode kernel (:mod:`.decode`):

* :func:`philox_uniform` -- Philox-4x32-10 keyed by ``(seed, row, step, stream)``, the 53-bit
  uniform of :func:`refopt.philox.uniform`, bit for bit (64-bit integer arithmetic, masked).
* :func:`row_argmax` -- the first maximum (greedy).
* :func:`row_kth_largest` -- the k-th largest value by radix selection on the float64 bit
  patterns (non-negative floats order as their bits): 63 passes of block-wide counting.
* :func:`row_top_k` -- the top-k mask: values above the k-th largest, then the tied values in
  token order until k are kept (an ordered count of ties: a block-wide exclusive scan);
  :func:`row_top_k_weights` and :func:`row_min_p` -- the top-k and min-p samplers' weights.
* :func:`row_choose` -- the selection rule: the non-zero weights are compacted in token order (a
  block-wide scan), one thread accumulates them left to right in float64 (adding zeros changes no
  float sum, so this *is* the sequential cumulative sum over all ``V`` entries), and the block
  finds the first cumulative sum above ``u * total``.  The sequential pass is the cost the rule
  imposes: about ``V`` dependent float64 additions for a dense distribution (RandomSampler),
  only the support for top-k / top-p / min-p.
* :func:`row_sort_desc` -- a block bitonic sort of ``(value, index)`` pairs, largest first, ties
  by lower index (a stable descending order), for top-p's cumulative sum in sorted order.

Short names (a legend): ``V`` vocabulary, ``P2`` ``V`` rounded up to a power of two (the bitonic
sort's length), ``SCAN`` entries of the shared scan buffers, ``fbuf`` / ``ibuf`` shared float64 /
int64 buffers of one entry a thread, ``cval`` / ``cidx`` the compacted non-zero weights and their
token ids.  Block reductions (``block_min``, ``block_sum_released``) are :mod:`._common`'s.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64, int64, uint64

from refopt.kernels.cuda._common import (SIM, SIMULATOR, block_min, block_sum_released, cdiv, empty,
                                         kernel)

THREADS = 16 if SIM else 32 if SIMULATOR else 256
SCAN = 1024                      # shared scan buffers hold one entry per thread (<= 1024 threads)

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK = 0xFFFFFFFF

if SIMULATOR:
    @cuda.jit(device=True)
    def f64_bits(x):
        # the IEEE-754 bit pattern of a float64 as an int64
        return int(np.float64(x).view(np.int64))
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def f64_bits(x):
        return libdevice.double_as_longlong(x)


@cuda.jit(device=True)
def philox_uniform(k0, k1, row, step, stream):
    """The uniform of counter ``(step, row, stream, 0)`` under key ``(k0, k1)`` (uint64 holding
    32-bit words): :func:`refopt.philox.uniform` with ``row`` 0 and the row's seed as the key."""
    mask = uint64(_MASK)
    c0 = uint64(step) & mask
    c1 = uint64(row) & mask
    c2 = uint64(stream) & mask
    c3 = uint64(0)
    a = uint64(k0) & mask
    b = uint64(k1) & mask
    for r in range(10):
        if r > 0:
            a = (a + uint64(_W0)) & mask
            b = (b + uint64(_W1)) & mask
        p0 = uint64(_M0) * c0
        p1 = uint64(_M1) * c2
        hi0 = p0 >> uint64(32)
        lo0 = p0 & mask
        hi1 = p1 >> uint64(32)
        lo1 = p1 & mask
        n0 = (hi1 ^ c1 ^ a) & mask
        n2 = (hi0 ^ c3 ^ b) & mask
        c0, c1, c2, c3 = n0, lo1, n2, lo0
    hi = float64(c0 >> uint64(5))
    lo = float64(c1 >> uint64(6))
    return (hi * 67108864.0 + lo) / 9007199254740992.0


@cuda.jit(device=True)
def block_exclusive_scan(value, ibuf):
    """``(sum of value over threads before this one, total)`` (Hillis-Steele in shared memory)."""
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    cuda.syncthreads()
    ibuf[tid] = value
    cuda.syncthreads()
    off = 1
    while off < n:
        add = ibuf[tid - off] if tid >= off else int64(0)
        cuda.syncthreads()
        ibuf[tid] += add
        cuda.syncthreads()
        off *= 2
    inclusive = ibuf[tid]
    total = ibuf[n - 1]
    cuda.syncthreads()
    return inclusive - value, total


@cuda.jit(device=True)
def row_argmax(p, V, fbuf, ibuf):
    """Index of the first maximum of ``p[0:V]``."""
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    best = -math.inf
    at = int64(V)
    for j in range(tid, V, n):
        x = float64(p[j])
        if x > best:                      # strided ascending: the first maximum of this thread
            best = x
            at = j
    cuda.syncthreads()
    fbuf[tid] = best
    ibuf[tid] = at
    cuda.syncthreads()
    w = n // 2
    while w > 0:
        if tid < w:
            ob, oa = fbuf[tid + w], ibuf[tid + w]
            if ob > fbuf[tid] or (ob == fbuf[tid] and oa < ibuf[tid]):
                fbuf[tid] = ob
                ibuf[tid] = oa
        cuda.syncthreads()
        w //= 2
    out = ibuf[0]
    cuda.syncthreads()
    return out if out < V else int64(0)


@cuda.jit(device=True)
def row_kth_largest(p, V, k, ibuf):
    """The k-th largest of the non-negative ``p[0:V]`` (1 <= k <= V), by radix selection on the
    float64 bit patterns, as a float64."""
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    x = int64(0)
    for bit in range(62, -1, -1):
        cand = x | (int64(1) << int64(bit))
        cnt = int64(0)
        for j in range(tid, V, n):
            if f64_bits(float64(p[j])) >= cand:
                cnt += 1
        if block_sum_released(cnt, ibuf) >= k:
            x = cand
    # the value whose bits are x: read it back from an element (one exists)
    cuda.syncthreads()
    if tid == 0:
        ibuf[0] = int64(V)
    cuda.syncthreads()
    for j in range(tid, V, n):
        if f64_bits(float64(p[j])) == x:
            cuda.atomic.min(ibuf, 0, j)
    cuda.syncthreads()
    out = float64(p[ibuf[0]])
    cuda.syncthreads()
    return out


@cuda.jit(device=True)
def row_top_k(p, V, k, keep, ibuf):
    """``keep[0:V]`` (uint8) = the top-k mask of ``p`` (refopt.samplers.sampler.top_k_mask):
    entries above the k-th largest, then ties in token order until ``min(k, V)`` are kept."""
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    k = min(k, V)
    kth = row_kth_largest(p, V, k, ibuf)
    above = int64(0)
    for j in range(tid, V, n):
        if float64(p[j]) > kth:
            above += 1
    room = k - block_sum_released(above, ibuf)
    # ties in token order: each thread takes a contiguous chunk, an exclusive scan orders them
    chunk = (V + n - 1) // n
    lo = tid * chunk
    hi = min(V, lo + chunk)
    ties = int64(0)
    for j in range(lo, hi):
        if float64(p[j]) == kth:
            ties += 1
    before, _ = block_exclusive_scan(ties, ibuf)
    for j in range(lo, hi):
        x = float64(p[j])
        if x > kth:
            keep[j] = 1
        elif x == kth and before < room:
            keep[j] = 1
            before += 1
        else:
            keep[j] = 0
    cuda.syncthreads()


@cuda.jit(device=True)
def row_top_k_weights(p, V, k, keep, out, ibuf):
    """``out[0:V]`` (float64) = TopKSampler.next_token_distribution of ``p``: ``p`` where the top-k
    mask (:func:`row_top_k`, into ``keep``) is set, else 0."""
    row_top_k(p, V, k, keep, ibuf)
    for j in range(cuda.threadIdx.x, V, cuda.blockDim.x):
        out[j] = float64(p[j]) if keep[j] != 0 else 0.0


@cuda.jit(device=True)
def row_min_p(p, V, min_p, min_keep, keep, out, fbuf, ibuf):
    """``out[0:V]`` (float64) = MinPSampler.next_token_distribution of ``p``: entries of at least
    ``min_p`` times the largest, and the top ``min_keep`` (:func:`row_top_k`, into ``keep``);
    ``fbuf``: shared float64."""
    row_top_k(p, V, min_keep, keep, ibuf)
    threshold = min_p * float64(p[row_argmax(p, V, fbuf, ibuf)])
    for j in range(cuda.threadIdx.x, V, cuda.blockDim.x):
        x = float64(p[j])
        out[j] = x if (x >= threshold or keep[j] != 0) else 0.0


@cuda.jit(device=True)
def row_choose(w, V, u, cidx, cval, ibuf):
    """The selection rule of :func:`refopt.philox.choose` on weights ``w[0:V]`` (float64 view) and
    a uniform ``u``: the smallest ``i`` with ``cumsum(w)[i] > u * sum(w)``, the cumulative sum
    sequential in float64 from token 0.  ``cidx`` (int64) / ``cval`` (float64) are scratch rows of
    ``V`` entries.  Returns -1 when the weights are not finite, negative, or all zero."""
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    chunk = (V + n - 1) // n
    lo = tid * chunk
    hi = min(V, lo + chunk)
    nz = int64(0)
    bad = int64(0)
    for j in range(lo, hi):
        x = float64(w[j])
        if not (x >= 0):                 # negative or NaN
            bad += 1
        elif x != 0:
            nz += 1
    bad = block_sum_released(bad, ibuf)
    pos, total_nz = block_exclusive_scan(nz, ibuf)
    for j in range(lo, hi):              # compact the non-zero weights, in token order
        x = float64(w[j])
        if x > 0:
            cidx[pos] = j
            cval[pos] = x
            pos += 1
    cuda.syncthreads()
    if tid == 0:                         # the sequential float64 cumulative sum
        c = 0.0
        for q in range(total_nz):
            c += cval[q]
            cval[q] = c
        ibuf[0] = int64(0)
        if bad > 0 or total_nz == 0 or not (c > 0) or math.isinf(c):
            ibuf[0] = int64(-1)
        # the threshold travels through cval's slot past the end of the compacted list
        cval[V] = u * c
    cuda.syncthreads()
    status = ibuf[0]
    t = cval[V]
    cuda.syncthreads()
    if status < 0:
        return int64(-1)
    # the first compacted entry whose cumulative sum exceeds t (none: the last positive weight)
    first = int64(total_nz)
    per = (total_nz + n - 1) // n
    for q in range(tid * per, min(total_nz, (tid + 1) * per)):
        if cval[q] > t:
            first = q
            break
    first = block_min(first, ibuf)
    if first >= total_nz:
        first = total_nz - 1
    return cidx[first]


@cuda.jit(device=True)
def _before(va, ia, vb, ib):
    # (va, ia) sorts before (vb, ib): larger value first, then lower index (NaN never first)
    return va > vb or (va == vb and ia < ib)


@cuda.jit(device=True)
def row_sort_desc(p, V, P2, svals, sidx):
    """``svals[0:P2]`` / ``sidx[0:P2]`` = ``p[0:V]`` sorted largest first, ties by lower index
    (``P2`` a power of two >= V; the padding sorts last)."""
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    for j in range(tid, P2, n):
        if j < V:
            svals[j] = float64(p[j])
            sidx[j] = j
        else:
            svals[j] = -math.inf
            sidx[j] = j
    cuda.syncthreads()
    size = 2
    while size <= P2:
        stride = size // 2
        while stride > 0:
            for i in range(tid, P2, n):
                partner = i ^ stride
                if partner > i:
                    ascending_block = (i & size) != 0   # this half sorts the other way round
                    a_first = _before(svals[i], sidx[i], svals[partner], sidx[partner])
                    if a_first == ascending_block:
                        tv, ti = svals[i], sidx[i]
                        svals[i] = svals[partner]
                        sidx[i] = sidx[partner]
                        svals[partner] = tv
                        sidx[partner] = ti
            cuda.syncthreads()
            stride //= 2
        size *= 2


@cuda.jit(device=True)
def row_top_p(p, V, top_p, cutoff, out, svals, sidx, P2, ibuf):
    """``out[0:V]`` = TopPSampler.next_token_distribution of ``p`` (float64 out): sorted largest
    first (stable), the first ``cutoff`` considered, a token kept when the float64 sum of those
    before it is ``<= top_p`` (the first always)."""
    tid = cuda.threadIdx.x
    n = cuda.blockDim.x
    row_sort_desc(p, V, P2, svals, sidx)
    if tid == 0:
        before = 0.0
        kept = int64(0)
        for j in range(cutoff):
            if j == 0 or before <= top_p:
                kept = j + 1
            else:
                break
            before += svals[j]
        ibuf[0] = kept
    cuda.syncthreads()
    kept = ibuf[0]
    cuda.syncthreads()
    for j in range(tid, V, n):
        out[j] = 0.0
    cuda.syncthreads()
    for j in range(tid, kept, n):
        out[sidx[j]] = svals[j]
    cuda.syncthreads()


# ----------------------------------------------------------------------------- ops kernels
@kernel()
def _uniform_kernel(seeds, step, stream, out):
    i = cuda.grid(1)
    if i < seeds.shape[0]:
        out[i] = philox_uniform(seeds[i] & uint64(_MASK), seeds[i] >> uint64(32), 0, step, stream)


def uniform(seeds, step, stream=0):
    """Philox uniforms ``[len(seeds)]``, one per row's seed, at ``step``
    (:func:`refopt.philox.uniform`), on the device."""
    from refopt.philox import as_seeds

    seeds = np.ascontiguousarray(as_seeds(seeds)).reshape(-1)
    out = empty(max(seeds.size, 1), np.float64)
    if seeds.size:
        _uniform_kernel[cdiv(seeds.size, 128), 128](cuda.to_device(seeds), int64(step), int64(stream), out)
    return out.copy_to_host()[:seeds.size]


@kernel()
def _choose_kernel(w, u, cidx, cval, out):
    ibuf = cuda.shared.array(SCAN, int64)
    b = cuda.blockIdx.x
    token = row_choose(w[b], w.shape[1], u[b], cidx[b], cval[b], ibuf)
    if cuda.threadIdx.x == 0:
        out[b] = token


def choose(weights, u):
    """:func:`refopt.philox.choose` on the device."""
    from refopt.errors import SamplerError

    w = np.ascontiguousarray(weights, dtype=np.float64)
    u = np.ascontiguousarray(u, dtype=np.float64).reshape(-1)
    B, V = w.shape
    out = empty(B, np.int64)
    _choose_kernel[B, THREADS](cuda.to_device(w), cuda.to_device(u), empty((B, V), np.int64),
                               empty((B, V + 1), np.float64), out)
    tokens = out.copy_to_host()
    if (tokens < 0).any():
        row = int(np.flatnonzero(tokens < 0)[0])
        raise SamplerError(f"cannot sample row {row}: its weights must be finite, non-negative and "
                           f"not all zero (sum {w[row].sum()!r}); are the logits NaN?")
    return tokens


@kernel()
def _top_k_kernel(p, k, keep):
    ibuf = cuda.shared.array(SCAN, int64)
    b = cuda.blockIdx.x
    row_top_k(p[b], p.shape[1], k, keep[b], ibuf)


def top_k_mask(p, k):
    """:func:`refopt.samplers.sampler.top_k_mask` on the device."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    B, V = p.shape
    keep = empty((B, V), np.uint8)
    if B and V:
        _top_k_kernel[B, THREADS](cuda.to_device(p), int64(k), keep)
    return keep.copy_to_host().astype(bool)


@kernel()
def _top_p_kernel(p, top_p, cutoff, out, svals, sidx):
    ibuf = cuda.shared.array(SCAN, int64)
    b = cuda.blockIdx.x
    row_top_p(p[b], p.shape[1], top_p, cutoff, out[b], svals[b], sidx[b], svals.shape[1], ibuf)


def pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def top_p_distribution(p, top_p, k=None):
    """``TopPSampler.next_token_distribution`` on the device."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    B, V = p.shape
    cutoff = V if k is None else min(int(k), V)
    out = empty((B, V), np.float64)
    P2 = pow2(V)
    _top_p_kernel[B, THREADS](cuda.to_device(p), float64(top_p), int64(cutoff), out,
                              empty((B, P2), np.float64), empty((B, P2), np.int64))
    return out.copy_to_host()


@kernel()
def _min_p_kernel(p, min_p, min_keep, keep, out):
    ibuf = cuda.shared.array(SCAN, int64)
    fbuf = cuda.shared.array(SCAN, float64)
    b = cuda.blockIdx.x
    row_min_p(p[b], p.shape[1], min_p, min_keep, keep[b], out[b], fbuf, ibuf)


def min_p_distribution(p, min_p, min_tokens_to_keep=1):
    """``MinPSampler.next_token_distribution`` on the device."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    B, V = p.shape
    out = empty((B, V), np.float64)
    _min_p_kernel[B, THREADS](cuda.to_device(p), float64(min_p), int64(min_tokens_to_keep),
                              empty((B, V), np.uint8), out)
    return out.copy_to_host()

