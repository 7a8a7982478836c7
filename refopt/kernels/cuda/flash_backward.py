"""Attention backward, flash-style: the probabilities are recomputed from ``q``, ``k`` and the
forward's row statistics (``m``, ``l``), never stored (Dao 2023, algorithm 2, with two
deterministic kernels instead of atomic adds).

    P[s, t]  = exp(score[s, t] - m[s]) / l[s]     score = q_s . k_t, masked scores -> lowest
    dV[t]    = sum_s P[s, t] dO[s]
    dP[s, t] = dO[s] . v[t]
    dS[s, t] = P[s, t] (dP[s, t] - Dlt[s])         Dlt[s] = dO[s] . O[s] = sum_t dP[s, t] P[s, t]
               0 where the key is masked (the reference replaces a masked score by a constant)
    dK[t]    = sum_s dS[s, t] q_s                  dQ[s] = scale * sum_t dS[s, t] k[t]

``q`` is scaled as it is loaded (``q_s = q * scale``, rounded as the forward rounds it) and the
query gradient is scaled back, so ``scale=1`` differentiates an already-scaled ``q`` as
:func:`refopt.ops.attention.attention_backward` does.  The mask is structured (key padding
``key_mask[b, t]``, and ``t <= s + q_offset`` when causal).  A query row with no allowed key is
uniform over all ``T`` keys in the forward (``m`` is ``lowest`` there and ``l = T``); the formula
above gives it ``P = 1/T`` everywhere and ``dS = 0``, so only ``dV`` sees it -- which is why the
key-side kernel walks every query tile of a batch row whose first key is padding.

* :func:`row_dots` -- ``Dlt`` (one thread per row).
* ``dkdv`` -- one block per (key tile, batch x head): it keeps the tile's ``dK`` and ``dV`` in
  registers and walks the query tiles that can see it.
* ``dq`` -- one block per (query tile, batch x head): it keeps ``dQ`` in registers and walks the
  key tiles the queries can see.

Both stage their tiles in padded shared memory (rows of ``KP + 1``: the dot products read a
column across threads without bank conflicts) and block their outputs in registers
(:func:`blocking`): a thread computes 2 x 2 of a pair's probabilities and 2 x 4 of a gradient tile,
so each shared value it loads feeds two or four multiply-adds.

Short names (a legend): ``NT`` threads a block, ``KP`` the compiled head width (``K <= KP``),
``BT`` query and key rows of a tile (``BQ = BKV = BT``), ``SQ`` / ``SP`` padded row lengths of the
staged tiles, ``RI x RI`` the probabilities a thread computes of a tile pair (its rows / columns
``TI`` apart), ``RR x RD`` the gradient entries it computes (rows ``TR`` apart, columns ``TD``
apart), ``Dlt`` the row dots ``dO . O``, ``Z`` batch times heads.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, int32, int64

from refopt.kernels.cuda._common import SIM, cdiv, kernel, nbtype

NT = 8 if SIM else 256       # threads per block


def tile_rows(KP: int, itemsize: int) -> int:
    """Query and key rows per tile: the five staged tiles fit the 48 KiB of static shared memory."""
    if SIM:
        return 8
    return max(8, min(32, 32 * 256 // (KP * itemsize)))


def blocking(BT: int, KP: int):
    """Register blocking: each thread computes ``RI x RI`` of a tile pair's ``BT x BT``
    probabilities (rows ``ti + r * TI``, columns ``tj + c * TI``) and ``RR x RD`` of a ``BT x KP``
    gradient tile (rows ``tr + r * TR``, columns ``td + q * TD``, consecutive threads on
    consecutive columns): fewer shared-memory loads per multiply-add than one output a thread."""
    RI = {1: 1, 4: 2}.get(BT * BT // NT, 0) if BT * BT >= NT else 0
    per = BT * KP // NT
    RD = max(4, per // BT)
    RR = per // RD
    return RI, BT // max(RI, 1), RR, RD, BT // max(RR, 1), KP // RD


@functools.lru_cache(maxsize=None)
def make_flash_backward(dtype, KP: int, causal: bool):
    """``(dkdv, dq)`` kernels for head widths ``K <= KP``."""
    DT = nbtype(dtype)
    BT = tile_rows(KP, np.dtype(dtype).itemsize)        # BQ = BKV = BT
    SQ = KP + 1
    SP = BT + 1
    RI, TI, RR, RD, TR, TD = blocking(BT, KP)
    LOWEST = float(np.finfo(dtype).min)
    SIMPLE = RI == 0                                    # the simulator's tiny blocks: one at a time
    assert SIMPLE or TI * TI == NT
    assert RR * RD * NT == BT * KP and TR * TD == NT

    @cuda.jit(device=True, inline=True)
    def pair(Qs, Ks, dOs, Vs, Ms, Ls, Ds, key_mask, b, i, j, q0, t0, S, T, q_offset, score, dp):
        # P and dS of query row i and key row j from their dot products
        s = q0 + i
        t = t0 + j
        p = DT(0)
        ds = DT(0)
        if s < S and t < T:
            allowed = key_mask[b, t] != 0
            if causal:
                allowed = allowed and t <= s + q_offset
            if not allowed:
                score = DT(LOWEST)
            p = math.exp(score - Ms[i]) / Ls[i]
            if allowed:
                ds = p * (dp - Ds[i])
        return p, ds

    @cuda.jit(device=True, inline=True)
    def probs_and_grads(Qs, Ks, dOs, Vs, Ms, Ls, Ds, Ps, dSs, key_mask, b, q0, t0, S, T, q_offset,
                        tid, sc, dpv):
        # P and dS of one (query tile, key tile) pair into shared memory
        if SIMPLE:
            for idx in range(tid, BT * BT, NT):
                i = idx // BT
                j = idx % BT
                score = DT(0)
                dp = DT(0)
                for d in range(KP):
                    score += Qs[i, d] * Ks[j, d]
                    dp += dOs[i, d] * Vs[j, d]
                p, ds = pair(Qs, Ks, dOs, Vs, Ms, Ls, Ds, key_mask, b, i, j, q0, t0, S, T, q_offset,
                             score, dp)
                Ps[i, j] = p
                dSs[i, j] = ds
            return
        ti = tid // TI
        tj = tid % TI
        for r in range(RI):
            for c in range(RI):
                sc[r, c] = DT(0)
                dpv[r, c] = DT(0)
        for d in range(KP):
            for r in range(RI):
                qd = Qs[ti + r * TI, d]
                od = dOs[ti + r * TI, d]
                for c in range(RI):
                    sc[r, c] += qd * Ks[tj + c * TI, d]
                    dpv[r, c] += od * Vs[tj + c * TI, d]
        for r in range(RI):
            for c in range(RI):
                i = ti + r * TI
                j = tj + c * TI
                p, ds = pair(Qs, Ks, dOs, Vs, Ms, Ls, Ds, key_mask, b, i, j, q0, t0, S, T, q_offset,
                             sc[r, c], dpv[r, c])
                Ps[i, j] = p
                dSs[i, j] = ds

    @cuda.jit(device=True, inline=True)
    def accumulate(acc, W, X, tid, transposed):
        # acc[r, q] += sum_k W[k, row] * X[k, col]   (transposed: W[row, k], the dq kernel)
        tr = tid // TD
        td = tid % TD
        for k in range(BT):
            for r in range(RR):
                w = W[tr + r * TR, k] if transposed else W[k, tr + r * TR]
                for q in range(RD):
                    acc[r, q] += w * X[k, td + q * TD]

    @cuda.jit(device=True, inline=True)
    def load_rows(dst, src, base, stride, r0, nrows, K, scale):
        for idx in range(cuda.threadIdx.x, BT * KP, NT):
            r = idx // KP
            d = idx % KP
            dst[r, d] = src[base + (r0 + r) * stride + d] * scale if (r0 + r < nrows and d < K) else DT(0)

    @cuda.jit(device=True, inline=True)
    def load_stats(Ms, Ls, Ds, m, l, dlt, row0, q0, S):
        for i in range(cuda.threadIdx.x, BT, NT):
            s = q0 + i
            ok = s < S
            Ms[i] = m[row0 + s] if ok else DT(0)
            Ls[i] = l[row0 + s] if ok else DT(1)
            Ds[i] = dlt[row0 + s] if ok else DT(0)

    @cuda.jit(device=True, inline=True)
    def store(acc, out, base, stride, r0, nrows, K, scale, tid):
        tr = tid // TD
        td = tid % TD
        for r in range(RR):
            row = r0 + tr + r * TR
            for q in range(RD):
                d = td + q * TD
                if row < nrows and d < K:
                    out[base + row * stride + d] = acc[r, q] * scale

    @kernel(launch_bounds=NT)
    def dkdv(q, k, v, d_o, m, l, dlt, key_mask, d_k, d_v, qs, ks, vs, ds_, dks, dvs, H, S, T, K,
             q_offset, scale):
        Qs = cuda.shared.array((BT, SQ), DT)
        dOs = cuda.shared.array((BT, SQ), DT)
        Ks = cuda.shared.array((BT, SQ), DT)
        Vs = cuda.shared.array((BT, SQ), DT)
        Ps = cuda.shared.array((BT, SP), DT)
        dSs = cuda.shared.array((BT, SP), DT)
        Ms = cuda.shared.array(BT, DT)
        Ls = cuda.shared.array(BT, DT)
        Ds = cuda.shared.array(BT, DT)
        acc_k = cuda.local.array((RR, RD), DT)
        acc_v = cuda.local.array((RR, RD), DT)
        sc = cuda.local.array((2, 2), DT)
        dpv = cuda.local.array((2, 2), DT)
        tid = cuda.threadIdx.x & 1023
        t0 = (cuda.blockIdx.x & 0x7FFFFFFF) * BT
        bh = cuda.blockIdx.y & 0x7FFFFFFF
        b = bh // H
        h = bh % H
        load_rows(Ks, k, b * ks[0] + h * ks[1], ks[2], t0, T, K, DT(1))
        load_rows(Vs, v, b * vs[0] + h * vs[1], vs[2], t0, T, K, DT(1))
        for r in range(RR):
            for c in range(RD):
                acc_k[r, c] = DT(0)
                acc_v[r, c] = DT(0)
        q_start = 0
        if causal and key_mask[b, 0] != 0:          # no all-masked query rows: skip the tiles above
            q_start = max(0, t0 - q_offset) // BT
        for qt in range(q_start, (S + BT - 1) // BT):
            q0 = qt * BT
            cuda.syncthreads()
            load_rows(Qs, q, b * qs[0] + h * qs[1], qs[2], q0, S, K, scale)
            load_rows(dOs, d_o, b * ds_[0] + h * ds_[1], ds_[2], q0, S, K, DT(1))
            load_stats(Ms, Ls, Ds, m, l, dlt, bh * S, q0, S)
            cuda.syncthreads()
            probs_and_grads(Qs, Ks, dOs, Vs, Ms, Ls, Ds, Ps, dSs, key_mask, b, q0, t0, S, T,
                            q_offset, tid, sc, dpv)
            cuda.syncthreads()
            accumulate(acc_v, Ps, dOs, tid, False)      # dV[t] += sum_s P[s, t] dO[s]
            accumulate(acc_k, dSs, Qs, tid, False)      # dK[t] += sum_s dS[s, t] q_s
        store(acc_k, d_k, b * dks[0] + h * dks[1], dks[2], t0, T, K, DT(1), tid)
        store(acc_v, d_v, b * dvs[0] + h * dvs[1], dvs[2], t0, T, K, DT(1), tid)

    # dq opens as dkdv does (the same staged tiles): Numba allocates shared memory per declaration
    # in a kernel body, so each kernel declares its own
    @kernel(launch_bounds=NT)
    def dq(q, k, v, d_o, m, l, dlt, key_mask, d_q, qs, ks, vs, ds_, dqs, H, S, T, K, q_offset, scale):
        Qs = cuda.shared.array((BT, SQ), DT)
        dOs = cuda.shared.array((BT, SQ), DT)
        Ks = cuda.shared.array((BT, SQ), DT)
        Vs = cuda.shared.array((BT, SQ), DT)
        Ps = cuda.shared.array((BT, SP), DT)
        dSs = cuda.shared.array((BT, SP), DT)
        Ms = cuda.shared.array(BT, DT)
        Ls = cuda.shared.array(BT, DT)
        Ds = cuda.shared.array(BT, DT)
        acc = cuda.local.array((RR, RD), DT)
        sc = cuda.local.array((2, 2), DT)
        dpv = cuda.local.array((2, 2), DT)
        tid = cuda.threadIdx.x & 1023
        q0 = (cuda.blockIdx.x & 0x7FFFFFFF) * BT
        bh = cuda.blockIdx.y & 0x7FFFFFFF
        b = bh // H
        h = bh % H
        load_rows(Qs, q, b * qs[0] + h * qs[1], qs[2], q0, S, K, scale)
        load_rows(dOs, d_o, b * ds_[0] + h * ds_[1], ds_[2], q0, S, K, DT(1))
        load_stats(Ms, Ls, Ds, m, l, dlt, bh * S, q0, S)
        for r in range(RR):
            for c in range(RD):
                acc[r, c] = DT(0)
        t_end = T
        if causal:                                  # keys past the last row's diagonal: dS = 0
            t_end = min(T, q0 + BT + q_offset)
        for t0 in range(0, t_end, BT):
            cuda.syncthreads()
            load_rows(Ks, k, b * ks[0] + h * ks[1], ks[2], t0, T, K, DT(1))
            load_rows(Vs, v, b * vs[0] + h * vs[1], vs[2], t0, T, K, DT(1))
            cuda.syncthreads()
            probs_and_grads(Qs, Ks, dOs, Vs, Ms, Ls, Ds, Ps, dSs, key_mask, b, q0, t0, S, T,
                            q_offset, tid, sc, dpv)
            cuda.syncthreads()
            accumulate(acc, dSs, Ks, tid, True)         # dQ[s] += sum_t dS[s, t] k[t]
        store(acc, d_q, b * dqs[0] + h * dqs[1], dqs[2], q0, S, K, scale, tid)

    dkdv.rows = dq.rows = BT
    return dkdv, dq


@functools.lru_cache(maxsize=None)
def _row_dots(dtype):
    DT = nbtype(dtype)

    @kernel()
    def row_dots(d_o, o, out, dos, os_, H, S, K):
        # out[bh * S + s] = dO[b, h, s] . O[b, h, s]
        r = cuda.grid(1)
        if r < out.shape[0]:
            bh = r // S
            s = r % S
            b = bh // H
            h = bh % H
            x = b * dos[0] + h * dos[1] + s * dos[2]
            y = b * os_[0] + h * os_[1] + s * os_[2]
            acc = DT(0)
            for d in range(K):
                acc += d_o[x + d] * o[y + d]
            out[r] = acc
    return row_dots


def flash_backward(q, k, v, o, d_o, m, l, key_mask, d_q, d_k, d_v, dlt, strides, B, H, S, T, K, *,
                   causal=True, q_offset=0, scale=1.0, stream=0):
    """Launch the backward on flat device arrays.  ``strides`` maps each of ``"q", "k", "v", "o",
    "d_o", "d_q", "d_k", "d_v"`` to its element strides ``(batch, head, position)`` (head columns
    contiguous); ``m``, ``l`` the forward's statistics ``[B*H*S]``; ``key_mask`` ``[B, T]`` uint8;
    ``dlt`` a ``[B*H*S]`` work array.  Writes ``d_q`` (times ``scale``), ``d_k``, ``d_v``."""
    from refopt.kernels.cuda.attention import head_pad

    dtype = np.dtype(q.dtype)
    st = {name: tuple(int64(x) for x in s) for name, s in strides.items()}
    rows = B * H * S
    if rows:
        _row_dots(dtype)[cdiv(rows, 128), 128, stream](d_o, o, dlt, st["d_o"], st["o"], int32(H),
                                                       int32(S), int32(K))
    dkdv, dq = make_flash_backward(dtype, head_pad(K), bool(causal))
    BT = dkdv.rows
    sc = dtype.type(scale)
    common = (int32(H), int32(S), int32(T), int32(K), int32(q_offset), sc)
    if T and B * H:
        dkdv[(cdiv(T, BT), B * H), NT, stream](q, k, v, d_o, m, l, dlt, key_mask, d_k, d_v, st["q"],
                                               st["k"], st["v"], st["d_o"], st["d_k"], st["d_v"],
                                               *common)
    if S and B * H:
        dq[(cdiv(S, BT), B * H), NT, stream](q, k, v, d_o, m, l, dlt, key_mask, d_q, st["q"], st["k"],
                                             st["v"], st["d_o"], st["d_q"], *common)
