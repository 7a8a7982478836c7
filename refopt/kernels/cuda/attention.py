"""Attention on the GPU: a flash-style forward (online softmax, nothing of size ``S x T`` in memory),
the probabilities rebuilt from its row statistics when asked for, and the backward.

Contract (:mod:`refopt.ops.attention`): ``q`` is already scaled; a masked score is *replaced* by
the dtype's most negative finite number ``lowest``, so a row whose keys are all masked is uniform
over all ``T`` keys, never NaN.  The mask is either structured -- key padding ``key_mask[b, t]``
and, when causal, ``t <= s + q_offset`` -- or a dense boolean ``[B, S, T]``.

Forward (flash-attention-2, Dao 2023): one block takes ``BQ`` queries of one (batch, head); it
walks the keys in tiles of ``BKV``, keeping per row the running maximum ``m``, the running sum
``l`` of ``exp(score - m)`` and the unnormalised output, rescaled by ``exp(m_old - m_new)``
whenever the maximum grows.  Both products are register-blocked (a thread owns 4 query rows x
``BKV/8`` keys of the scores and 4 rows x ``K/8`` columns of the output), the row reductions run
over the 8 threads sharing those rows.  Exactness of the masking rule: a masked score is
``lowest``, whose exponential against any real maximum is exactly 0, so tiles wholly above the
causal diagonal are skipped without changing the result; a row with no allowed key at all (only
possible with padding) is then finished as the uniform average of all ``T`` values, as the
reference computes it.

``m`` and ``l`` per row are the forward's statistics: ``probs = exp(score - m) / l`` rebuilds the
reference's probabilities (:class:`LazyProbs`), which the backward (batched products, below) uses.

Short names (a legend): ``B`` batch, ``H`` heads, ``Z = B * H``, ``S`` queries, ``T`` keys, ``K``
head width, ``KP`` the head width the kernel is compiled for (``K <= KP``, a multiple of 32),
``BQ`` / ``BKV`` query / key rows of a tile, ``NTX`` threads sharing a query row, ``NTY`` thread
rows (``NT = NTX * NTY`` threads a block), ``CT`` score columns and ``CD`` output columns a thread
owns (``GD = CD / 4`` groups of four), ``SQ`` / ``SP`` padded row lengths of the Q/K and the
probability tiles in shared memory.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, int32, int64

from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda._common import ALIGN, SIM, block_sum, cdiv, empty, kernel, larger, nbtype, plus

NTX = 8          # threads sharing a query row (the row reductions run over them)


def _tiles(KP):
    # (BQ, BKV) for a padded head width: shared memory stays under the 48 KiB static limit (the
    # simulator gets small tiles: each of its threads is a Python thread)
    if SIM:
        return (16, 8)
    return (64, 32) if KP <= 64 else (32, 16)


@functools.lru_cache(maxsize=None)
def make_flash_forward(dtype, KP: int, causal: bool, dense: bool):
    """Flash attention forward for head widths ``K <= KP`` (``KP`` 64 or 128)."""
    DT = nbtype(dtype)
    BQ, BKV = _tiles(KP)
    NTY = BQ // 4
    NT = NTX * NTY
    CT = BKV // NTX                 # score columns per thread: keys jj * NTX + tx
    CD = KP // NTX                  # output columns per thread, in groups of four
    GD = CD // 4
    SQ = KP + 4                     # padded rows of the Q and K tiles
    SP = BQ + 4                     # padded rows of the probability tile
    LOWEST = float(np.finfo(dtype).min)
    NEG_INF = -math.inf

    @kernel(launch_bounds=NT)
    def flash_forward(q, k, v, out, m_out, l_out, key_mask, mask, qsb, qsh, qss, ksb, ksh, kss,
                      vsb, vsh, vss, osb, osh, oss, H, S, T, K, q_offset, scale):
        Qs = cuda.shared.array((BQ, SQ), DT, alignment=ALIGN)
        Ks = cuda.shared.array((BKV, SQ), DT, alignment=ALIGN)
        Vs = cuda.shared.array((BKV, KP), DT, alignment=ALIGN)
        Ps = cuda.shared.array((BKV, SP), DT, alignment=ALIGN)
        red = cuda.shared.array(NT, DT)
        acc = cuda.local.array((4, CD), DT)
        sc = cuda.local.array((4, CT), DT)
        qv = cuda.local.array((4, 4), DT)
        kv = cuda.local.array((CT, 4), DT)
        pv = cuda.local.array(4, DT)
        vv = cuda.local.array(CD, DT)
        mrow = cuda.local.array(4, DT)
        lrow = cuda.local.array(4, DT)
        tid = cuda.threadIdx.x & 1023
        tx = tid % NTX
        ty = tid // NTX
        nqt = (S + BQ - 1) // BQ
        qt = nqt - 1 - (cuda.blockIdx.x & 0x7FFFFFFF)    # heaviest (latest) query tiles first
        bh = cuda.blockIdx.y & 0x7FFFFFFF
        b = bh // H
        h = bh % H
        q0 = qt * BQ
        qbase = b * qsb + h * qsh
        kbase = b * ksb + h * ksh
        vbase = b * vsb + h * vsh
        lowest = DT(LOWEST)

        for idx in range(tid, BQ * KP, NT):
            r = idx // KP
            d = idx % KP
            s = q0 + r
            Qs[r, d] = q[qbase + s * qss + d] * scale if (s < S and d < K) else DT(0)
        for i in range(4):
            mrow[i] = lowest
            lrow[i] = DT(0)
            for c in range(CD):
                acc[i, c] = DT(0)

        t_end = T
        if causal:
            t_end = min(T, q0 + BQ + q_offset)           # keys past the last row's diagonal: all masked
        for t0 in range(0, t_end, BKV):
            cuda.syncthreads()
            for idx in range(tid, BKV * KP, NT):
                j = idx // KP
                d = idx % KP
                t = t0 + j
                ok = t < T and d < K
                Ks[j, d] = k[kbase + t * kss + d] if ok else DT(0)
                Vs[j, d] = v[vbase + t * vss + d] if ok else DT(0)
            cuda.syncthreads()
            # scores: 4 rows x CT keys, four head columns at a time
            for i in range(4):
                for jj in range(CT):
                    sc[i, jj] = DT(0)
            d = 0
            while d < KP:            # (a while loop: Numba's range() here defeats the vectoriser)
                for i in range(4):
                    for e in range(4):
                        qv[i, e] = Qs[ty * 4 + i, d + e]
                for jj in range(CT):
                    for e in range(4):
                        kv[jj, e] = Ks[jj * NTX + tx, d + e]
                for i in range(4):
                    for jj in range(CT):
                        for e in range(4):
                            sc[i, jj] += qv[i, e] * kv[jj, e]
                d += 4
            # mask, row maxima, exponentials, row sums
            for i in range(4):
                s = q0 + ty * 4 + i
                top = DT(NEG_INF)
                for jj in range(CT):
                    t = t0 + jj * NTX + tx
                    if t >= T:
                        sc[i, jj] = DT(NEG_INF)                     # not a key: weight 0
                    else:
                        allowed = key_mask[b, t] != 0
                        if causal:
                            allowed = allowed and t <= s + q_offset
                        if dense:
                            allowed = allowed and mask[b, min(s, S - 1), t] != 0
                        if not allowed:
                            sc[i, jj] = lowest
                    top = max(top, sc[i, jj])
                top = _group_max(top, red, tid)
                m_new = max(mrow[i], top)
                alpha = math.exp(mrow[i] - m_new)
                mrow[i] = m_new
                total = DT(0)
                for jj in range(CT):
                    p = math.exp(sc[i, jj] - m_new)
                    sc[i, jj] = p
                    total += p
                total = _group_sum(total, red, tid)
                lrow[i] = lrow[i] * alpha + total
                for c in range(CD):
                    acc[i, c] *= alpha
            for jj in range(CT):
                for i in range(4):
                    Ps[jj * NTX + tx, ty * 4 + i] = sc[i, jj]
            cuda.syncthreads()
            # output += P @ V
            for j in range(BKV):
                for i in range(4):
                    pv[i] = Ps[j, ty * 4 + i]
                for g in range(GD):
                    for e in range(4):
                        vv[g * 4 + e] = Vs[j, g * 4 * NTX + tx * 4 + e]
                for i in range(4):
                    for c in range(CD):
                        acc[i, c] += pv[i] * vv[c]

        for i in range(4):
            s = q0 + ty * 4 + i
            if s < S:
                inv = DT(1) / lrow[i]
                fix = causal and t_end < T and mrow[i] == lowest
                if fix:
                    # no allowed key in the walked tiles, so none at all: uniform over all T keys
                    lrow[i] = DT(T)
                    inv = DT(1) / lrow[i]
                    for d in range(tx, K, NTX):
                        tot = DT(0)
                        for t in range(T):
                            tot += v[vbase + t * vss + d]
                        out[b * osb + h * osh + s * oss + d] = tot * inv
                else:
                    for c in range(CD):
                        d = (c // 4) * 4 * NTX + tx * 4 + (c % 4)
                        if d < K:
                            out[b * osb + h * osh + s * oss + d] = acc[i, c] * inv
                if tx == 0 and m_out.shape[0] > 0:
                    m_out[bh * S + s] = mrow[i]
                    l_out[bh * S + s] = lrow[i]

    flash_forward.tiles = (BQ, BKV, NT)
    return flash_forward


if SIM:
    def _group_reduce(combine):
        # ``combine`` over the NTX threads sharing a row, through shared memory (no shuffles here)
        @cuda.jit(device=True)
        def reduce(value, red, tid):
            cuda.syncthreads()
            red[tid] = value
            cuda.syncthreads()
            base = tid - tid % NTX
            out = red[base]
            for j in range(1, NTX):
                out = combine(out, red[base + j])
            return out
        return reduce

    _group_max, _group_sum = _group_reduce(larger), _group_reduce(plus)
else:
    @cuda.jit(device=True, inline=True)
    def _group_max(value, red, tid):
        # max over the NTX = 8 consecutive lanes sharing a row (butterfly of shuffles)
        value = max(value, cuda.shfl_xor_sync(0xFFFFFFFF, value, 4))
        value = max(value, cuda.shfl_xor_sync(0xFFFFFFFF, value, 2))
        return max(value, cuda.shfl_xor_sync(0xFFFFFFFF, value, 1))

    @cuda.jit(device=True, inline=True)
    def _group_sum(value, red, tid):
        value += cuda.shfl_xor_sync(0xFFFFFFFF, value, 4)
        value += cuda.shfl_xor_sync(0xFFFFFFFF, value, 2)
        return value + cuda.shfl_xor_sync(0xFFFFFFFF, value, 1)


def head_pad(K: int) -> int:
    if K <= 64:
        return 64
    if K <= 128:
        return 128
    from refopt.errors import BackendError

    raise BackendError(f"cuda attention: head width {K} > 128 is not supported")


def flash_attention(q, k, v, out, qstrides, kstrides, vstrides, ostrides, B, H, S, T, K, *,
                    key_mask=None, causal=False, q_offset=0, mask=None, stats=None, scale=1.0,
                    stream=0):
    """Launch the forward on flat device arrays with element strides ``(batch, head, position)``
    (the head column stride is 1).  ``key_mask`` ``[B, T]`` uint8 (None: every key is real),
    ``mask`` an optional dense ``[B, S, T]`` uint8, ``stats`` an optional pair of ``[B*H*S]``
    arrays receiving each row's ``m`` and ``l``; ``scale`` multiplies ``q`` as it is loaded (the
    model's ``q * K**-0.5``, rounded as the reference rounds it)."""
    dtype = np.dtype(q.dtype)
    if key_mask is None:
        key_mask = ones_u8((B, T))
    dense = mask is not None
    fn = make_flash_forward(dtype, head_pad(K), bool(causal), dense)
    BQ, BKV, NT = fn.tiles
    m_out, l_out = stats if stats is not None else (empty(0, dtype), empty(0, dtype))
    if not dense:
        mask = ones_u8((1, 1, 1))
    fn[(cdiv(S, BQ), B * H), NT, stream](
        q, k, v, out, m_out, l_out, key_mask, mask,
        *map(int64, qstrides), *map(int64, kstrides), *map(int64, vstrides), *map(int64, ostrides),
        int32(H), int32(S), int32(T), int32(K), int32(q_offset), dtype.type(scale))
    return out


_ONES = {}


def ones_u8(shape):
    """A cached all-ones uint8 device array (key masks of unpadded batches)."""
    a = _ONES.get(shape)
    if a is None:
        a = _ONES[shape] = cuda.to_device(np.ones(shape, np.uint8))
    return a


# ----------------------------------------------------------------------------- probabilities
@functools.lru_cache(maxsize=None)
def _make_probs(dtype):
    DT = nbtype(dtype)
    LOWEST = float(np.finfo(dtype).min)

    @kernel()
    def rebuild(scores, m, l, mask):
        # scores [Z, S, T] (q @ k.T) -> probabilities in place; mask [B, S, T] uint8, Z = B * H
        z, s = cuda.blockIdx.y, cuda.blockIdx.x
        S, T = scores.shape[1], scores.shape[2]
        H = scores.shape[0] // mask.shape[0]
        row = z * S + s
        for t in range(cuda.threadIdx.x, T, cuda.blockDim.x):
            x = scores[z, s, t] if mask[z // H, s, t] != 0 else DT(LOWEST)
            scores[z, s, t] = math.exp(x - m[row]) / l[row]
    return rebuild


class LazyProbs:
    """The attention probabilities ``[B, H, S, T]`` of a flash forward, rebuilt on demand from the
    row statistics (``np.asarray(probs)`` or :meth:`device`): ``exp(q @ k.T - m) / l`` with masked
    scores replaced by ``lowest``."""

    def __init__(self, q, k, mask, m, l, shape, dtype):
        self.q, self.k, self.mask, self.m, self.l = q, k, mask, m, l
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim = 4

    def device(self):
        B, H, S, T = self.shape
        K = self.q.shape[3]
        scores = _gemm.gemm(self.q.reshape(B * H, S, K), self.k.reshape(B * H, T, K), "nt")
        _make_probs(self.dtype)[(S, B * H), 128](scores, self.m, self.l, self.mask)
        return scores.reshape(self.shape)

    def __array__(self, dtype=None, copy=None):
        out = self.device().copy_to_host()
        return out if dtype is None else out.astype(dtype)


# ----------------------------------------------------------------------------- backward
@functools.lru_cache(maxsize=None)
def _make_softmax_backward(dtype):
    DT = nbtype(dtype)

    @kernel()
    def softmax_backward(d_probs, probs, mask):
        # d_probs [Z, S, T] <- probs * (d_probs - sum(d_probs * probs)), zero where masked
        z, s = cuda.blockIdx.y, cuda.blockIdx.x
        T = probs.shape[2]
        H = probs.shape[0] // mask.shape[0]
        buf = cuda.shared.array(256, DT)
        tid = cuda.threadIdx.x
        part = DT(0)
        for t in range(tid, T, 256):
            part += d_probs[z, s, t] * probs[z, s, t]
        dot = block_sum(part, buf)                   # launched with 256 threads
        for t in range(tid, T, 256):
            g = probs[z, s, t] * (d_probs[z, s, t] - dot)
            d_probs[z, s, t] = g if mask[z // H, s, t] != 0 else DT(0)
    return softmax_backward


def attention_backward_device(d_out, q, k, v, probs, mask):
    """Device arrays ``d_out, q [B, H, S, K]``, ``k, v [B, H, T, K]``, ``probs [B, H, S, T]``,
    ``mask [B, S, T]`` uint8 -> ``d_q, d_k, d_v`` (the reference's products, batched over B*H)."""
    B, H, S, K = q.shape
    T = k.shape[2]
    Z = B * H
    d3, q3, k3, v3 = (a.reshape(Z, a.shape[2], K) for a in (d_out, q, k, v))
    p3 = probs.reshape(Z, S, T)
    d_probs = _gemm.gemm(d3, v3, "nt")                                     # [Z, S, T]
    d_v = _gemm.gemm(p3, d3, "tn")                                         # [Z, T, K]
    _make_softmax_backward(np.dtype(q.dtype))[(S, Z), 256](d_probs, p3, mask)
    d_q = _gemm.gemm(d_probs, k3, "nn")                                    # [Z, S, K]
    d_k = _gemm.gemm(d_probs, q3, "tn")                                    # [Z, T, K]
    return d_q.reshape(B, H, S, K), d_k.reshape(B, H, T, K), d_v.reshape(B, H, T, K)

