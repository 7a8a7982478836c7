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

:func:`make_flash_backward_v2` builds the same two kernels for float32 head widths up to 64 in
fours (``REFOPT_FLASH_BWD=v2``; ``v1`` goes back to the first): 32 x 32 tile pairs on 64
threads, 16-byte tile loads, 4 x 4 pairs and 4 x 8 gradient entries a thread, the head, query and
key steps as loops of :data:`UNROLL` steps a pass.  Measured on an H200 (causal, 8 x 12 x 2048 x 64,
float32, ``benchmarks/flash_variants.py``, session 11): the backward alone 19.1-19.2 TFLOP/s against
the first's 6.5, forward + backward 0.69-0.70x SDPA (the first's 0.27x).

Its ``dq`` recomputes each tile pair's scores and ``dO . v`` that ``dkdv`` already formed: 7
products of a pair's size where the gradients need 5.  :func:`make_flash_backward_v3` (the
default, :data:`VARIANT` ``"v3"``) drops the recomputation and stays deterministic (no atomic
adds): ``dkdv`` writes each pair's ``dS`` (float32) to a scratch buffer and a second ``dq`` sums
``dQ = scale * dS k`` over the key tiles its queries see, in order -- the same values summed in the
same order as ``v2``, so the same bits.  The scratch is bounded (:data:`SCRATCH_BYTES`): the
(batch x head) slices run in chunks, two launches a chunk, the causal pairs packed
(:func:`scratch_layout`); a slice larger than the bound takes ``v2``.  Measured on an H200 (same
shape, session 12): the backward 4.7-4.9 ms against ``v2``'s 6.7-7.1, forward + backward 0.89-0.91x
SDPA with the whole batch in one or two chunks (1 GiB, 512 MiB), 0.81-0.85x in four (256 MiB).
What follows describes the first (``"v1"``), which takes every other case.

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
import os

import numpy as np
from numba import cuda, int32, int64

from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda._common import ALIGN, SIM, SIMULATOR, cdiv, generated, kernel, nbtype
from refopt.kernels.cuda.launch import as_shape, launcher, pointer

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


#: the backward :func:`flash_backward` launches where its operands allow: ``"v3"``
#: (:func:`make_flash_backward_v3`, the default: the backward 1.4 times ``v2``'s speed on an H200,
#: the same bits -- benchmarks/GPU.md, session 12), ``"v2"`` (:func:`make_flash_backward_v2`, 2.9
#: times the first's, session 11) or ``"v1"`` (:func:`make_flash_backward`, every other case);
#: ``REFOPT_FLASH_BWD``
VARIANT = os.environ.get("REFOPT_FLASH_BWD", "v3")
#: the most bytes of ``dS`` scratch the third backward holds at once: it runs the (batch x head)
#: slices in chunks whose tile pairs fit, and a call whose one slice does not fit takes ``"v2"``.
#: 512 MiB: the measured shape (causal 8 x 12 x 2048, 816 MB of pairs) in two chunks, 0.89-0.90x
#: SDPA forward + backward; each chunk boundary costs the tail of its longest blocks (four chunks
#: 0.81-0.85x, fourteen 0.49x).  The buffer is GEMM's split-K workspace (:func:`gemm.workspaces`,
#: held by a CUDA graph that captured it); ``REFOPT_FLASH_BWD_SCRATCH_MIB``
SCRATCH_BYTES = int(os.environ.get("REFOPT_FLASH_BWD_SCRATCH_MIB", "512")) << 20
#: the third backward's ``dq`` loads the next tiles while it multiplies (in four chunks its launches
#: 1.04 ms against 1.24, in one 0.94 against 0.92); ``REFOPT_FLASH_BWD_PREFETCH=0``: not
DQ_PREFETCH = os.environ.get("REFOPT_FLASH_BWD_PREFETCH", "1") != "0"
#: ``v2``'s head, query and key steps a pass of their loops (4: 9-12 s of ``compile_ptx`` for both
#: kernels, 219 s with every step written out; 8 and 2 measured 3-5% slower); ``REFOPT_FLASH_BWD_UNROLL``
UNROLL = int(os.environ.get("REFOPT_FLASH_BWD_UNROLL", "4"))


def v2_fits(dtype, K: int, arrays, strides) -> bool:
    """Whether :func:`make_flash_backward_v2` can take these operands: float32, a head width that
    is a multiple of 4 up to 64, strides in fours, data 16-byte aligned."""
    from refopt.kernels.cuda.attention import v2_fits as forward_fits

    return K <= 64 and forward_fits(dtype, K, arrays, strides)


def pairs_before(x: int, nK: int, crow: int) -> int:
    """Tile pairs of the ``dS`` scratch before query tile row ``x``: the sum over ``r < x`` of
    ``min(nK, max(0, r + crow))``, the key tiles query tile ``r`` sees (the kernels' closed form)."""
    lo = min(max(-crow, 0), x)
    hi = min(max(nK - crow, lo), x)
    return (hi - lo) * crow + (hi * (hi - 1) - lo * (lo - 1)) // 2 + (x - hi) * nK


def scratch_layout(S: int, T: int, q_offset: int, causal: bool):
    """``(crow, npairs)`` of the third backward's ``dS`` scratch for one (batch x head) slice: query
    tile ``qt`` sees key tiles ``kt < min(nK, qt + crow)`` (all ``nK`` without the causal mask), and
    the slice's ``npairs`` tiles of ``BQ x BT`` follow in that order (query tile rows, then key
    tiles), each stored ``[key, query]``."""
    BQ, BT = _v2_tiles()
    nQ, nK = cdiv(S, BQ), cdiv(T, BT)
    crow = -((-(BQ + q_offset)) // BT) if causal else nK       # ceil((BQ + q_offset) / BT)
    return crow, pairs_before(nQ, nK, crow)


def _chunks(Z: int, per_slice: int):
    """Slices a chunk of the third backward: as many as :data:`SCRATCH_BYTES` holds, spread evenly
    over the fewest chunks; 0 when one slice does not fit."""
    if per_slice > SCRATCH_BYTES:
        return 0
    most = SCRATCH_BYTES // per_slice if per_slice else Z
    return cdiv(Z, cdiv(Z, max(1, most)))


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
    fits = v2_fits(dtype, K, (q, k, v, d_o), [strides[n] for n in ("q", "k", "v", "d_o")])
    if VARIANT == "v3" and fits and T and S and B * H:
        BQ, BT = _v2_tiles()
        crow, npairs = scratch_layout(S, T, q_offset, causal)
        Zc = _chunks(B * H, npairs * BQ * BT * 4)
        if Zc and max(cdiv(S, BQ), cdiv(T, BT)) <= 65535:
            dkdv, dq = make_flash_backward_v3(bool(causal), UNROLL, DQ_PREFETCH)
            NTV = dkdv.tiles[2]
            flat = [as_shape(a, (a.shape[0],)) for a in (q, k, v, d_o, m, l, dlt)]
            km = as_shape(key_mask, key_mask.shape)
            dsw = as_shape(_gemm._workspace(max(4, Zc * npairs * BQ * BT), np.float32),
                           (max(4, Zc * npairs * BQ * BT),))
            dkf, dvf, dqf = (as_shape(a, (a.shape[0],)) for a in (d_k, d_v, d_q))
            common = (*st["q"], *st["k"], *st["v"], *st["d_o"])
            tail = (int32(H), int32(S), int32(T), int32(K), int32(q_offset), np.float32(scale))
            for z0 in range(0, B * H, Zc):
                n = min(Zc, B * H - z0)
                launcher(dkdv)((n, cdiv(T, BT), 1), (NTV, 1, 1), stream, *flat, km, dkf, dvf, *common,
                               *st["d_k"], *st["d_v"], *tail, dsw, int32(z0), int32(crow),
                               int64(npairs))
                launcher(dq)((n, cdiv(S, BQ), 1), (NTV, 1, 1), stream, flat[1], dsw, dqf, *st["k"],
                             *st["d_q"], int32(H), int32(S), int32(T), int32(K), int32(z0),
                             int32(crow), int64(npairs), np.float32(scale))
            return
    if VARIANT in ("v2", "v3") and fits:
        dkdv, dq = make_flash_backward_v2(bool(causal), UNROLL)
        BQ, BT, NTV = dkdv.tiles
        flat = [as_shape(a, (a.shape[0],)) for a in (q, k, v, d_o, m, l, dlt)]
        km = as_shape(key_mask, key_mask.shape)
        common = (*st["q"], *st["k"], *st["v"], *st["d_o"])
        tail = (int32(H), int32(S), int32(T), int32(K), int32(q_offset), np.float32(scale))
        if T and B * H:
            launcher(dkdv)((cdiv(T, BT), B * H, 1), (NTV, 1, 1), stream, *flat, km,
                           as_shape(d_k, (d_k.shape[0],)), as_shape(d_v, (d_v.shape[0],)), *common,
                           *st["d_k"], *st["d_v"], *tail)
        if S and B * H:
            launcher(dq)((cdiv(S, BQ), B * H, 1), (NTV, 1, 1), stream, *flat, km,
                         as_shape(d_q, (d_q.shape[0],)), *common, *st["d_q"], *tail)
        return
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


# ----------------------------------------------------------------------------- the second backward
# (float32, head width <= 64 in 16-byte groups: vector loads, 4 x 4 pair tiles, products written out)

if SIMULATOR:
    def stg4(arr, off, x0, x1, x2, x3):
        """Store four values at ``arr``'s flat elements ``off`` .. ``off + 3`` (the simulator's
        stand-in for one 16-byte store)."""
        flat = arr.reshape(arr.size)
        flat[off], flat[off + 1], flat[off + 2], flat[off + 3] = x0, x1, x2, x3
else:
    from llvmlite import ir as _ir
    from numba.cuda import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic
    from numba.cuda.typing import signature as _signature

    @_intrinsic
    def stg4(typingctx, arr, off, x0, x1, x2, x3):
        """Store four values at ``arr``'s flat elements ``off`` .. ``off + 3`` as one 16-byte store
        (``st.v4.f32``; ``off`` a multiple of 4 and the data 16-byte aligned: the caller checks)."""
        dt = arr.dtype
        sig = _signature(_types.void, arr, _types.int64, dt, dt, dt, dt)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            off64 = context.cast(builder, args[1], sig.args[1], _types.int64)
            ptr = builder.gep(ary.data, [off64])
            vty = _ir.VectorType(context.get_data_type(dt), 4)
            vec = _ir.Constant(vty, _ir.Undefined)
            for i in range(4):
                vec = builder.insert_element(vec, args[2 + i], _ir.Constant(_ir.IntType(32), i))
            builder.store(vec, builder.bitcast(ptr, vty.as_pointer()), align=16)
            return context.get_dummy_value()
        return sig, codegen


def make_flash_backward_v3(causal: bool, unroll: int = 4, prefetch: bool = True):
    """The third backward's ``(dkdv, dq)``: :func:`make_flash_backward_v2`'s with ``scratch``.
    ``dkdv`` (grid: slices of the chunk x key tiles) computes a tile pair's scores, ``dO . v``, ``dV``
    and ``dK`` as the second does and writes the pair's ``dS`` to the scratch
    (:func:`scratch_layout`); ``dq`` (grid: slices x query tiles) sums ``dQ = scale * dS k`` over the
    key tiles its queries see, in order -- one product of a pair's size instead of three, the
    arithmetic and its order the second's (the same bits)."""
    return make_flash_backward_v2(causal, unroll, True, prefetch)


def _v2_tiles():
    # (BQ, BT) query / key rows of a tile pair: 32 x 32 with 64 threads (8 x 8, each 4 x 4 pairs);
    # the simulator 8 x 8 with 16 threads
    return (8, 8) if SIM else (32, 32)


@functools.lru_cache(maxsize=None)
def make_flash_backward_v2(causal: bool, unroll: int = 4, scratch: bool = False,
                           dq_prefetch: bool = True):
    """``(dkdv, dq)`` as :func:`make_flash_backward`'s (same arguments, same results, same
    arithmetic per pair: ``P = exp(score - m) / l``, ``dS = P (dP - Dlt)``) for float32 head widths
    ``K <= 64`` that :func:`v2_fits` accepts.  Both kernels compute a tile pair's scores and
    ``dO . v`` products with each thread owning 4 query rows x ``BT / 8`` keys (keys ``8 j + tx``),
    four head columns a step, ``unroll`` steps a pass of a loop (the generated source is as long for
    any tile; written out step by step, it took minutes to compile, most of them in Numba's own
    liveness and SSA passes rather than NVVM); the tiles come in as 16-byte global loads (offsets
    kept, out-of-range groups zeroed by selects, the passes a loop); the masking selects run only on
    pairs that need them.  ``dkdv`` then accumulates ``dV`` and ``dK`` for 4 keys x 8 head columns a
    thread (``P`` and ``dS`` staged ``[query, key]``: one 16-byte load of four keys and two of
    eight columns feed 32 multiply-adds), ``dq`` accumulates ``dQ`` for 4 query rows x 8 columns
    (``dS`` staged ``[key, query]``).

    ``scratch`` (the third backward, :func:`make_flash_backward_v3`): ``dkdv`` also writes each
    tile pair's ``dS`` that ``dq`` would read to a scratch buffer (:func:`scratch_layout`), and
    ``dq`` reads it there instead of recomputing the scores and ``dO . v`` -- the same values
    summed in the same order, so the same bits as without ``scratch``; ``dq_prefetch``: that ``dq``
    loads the next key tile and ``dS`` tile into registers while it multiplies the current ones."""
    KP = 64
    BQ, BT = _v2_tiles()
    NTX = 8
    CT = BT // NTX                  # keys a thread owns of a pair tile
    NTY = BQ // 4
    NT = NTX * NTY
    SQ = KP + 4
    G4 = KP // 4
    RP = NT // G4                   # rows one pass of the block's 16-byte loads covers
    PQ, PT = BQ // RP, BT // RP
    TKG = BT // 4                   # dkdv: groups of 4 keys; threads along the head columns:
    TDK = NT // TKG
    CDK = KP // TDK
    TRG = BQ // 4                   # dq: groups of 4 query rows
    TDQ = NT // TRG
    CDQ = KP // TDQ
    assert NT % G4 == 0 and BQ % RP == 0 and BT % RP == 0 and CDK % 4 == 0 and CDQ % 4 == 0
    LOWEST = float(np.finfo(np.float32).min)
    UD, UQ, UT = min(unroll, KP // 4), min(unroll, BQ), min(unroll, BT)   # steps a pass of the loops
    PS = BQ * BT // (4 * NT)        # passes of the block's 16-byte loads of a dS tile (scratch)
    assert (KP // 4) % UD == 0 and BQ % UQ == 0 and BT % UT == 0

    def loads(arr, name, off, stride, first, limit, P, mul=""):
        return [f"for p in range({P}):",
                f"    ok = cok and {first} + lr + p * RP < {limit}",
                f"    w = ldg4({name}, ({off} + p * RP * {stride}) if ok else int64(0))",
                "    for e in range(4):",
                f"        {arr}[lr + p * RP, lc + e] = (w[e]{mul}) if ok else DT(0)"]

    def row_offset(x, out):
        # the scratch's pairs before query tile row x: the sum over r < x of min(nK, max(0, r + crow))
        # (the key tiles query tile r sees; crow = nK without the causal mask)
        return ["nk_ = (T + BT - 1) // BT",
                f"lo = min(max(-crow, 0), {x})",
                f"hi = min(max(nk_ - crow, lo), {x})",
                f"{out} = (int64(hi - lo) * crow + (int64(hi) * (hi - 1) - int64(lo) * (lo - 1)) // 2"
                f" + int64({x} - hi) * nk_)"]

    def head(name, args):
        # scratch: blockIdx.x the slice of the chunk (from z0), blockIdx.y the tile -- the grid's
        # first blocks are the longest of every slice
        bh = "z0 + (cuda.blockIdx.x & 0x7FFFFFFF)" if scratch else "cuda.blockIdx.y & 0x7FFFFFFF"
        return [f"def {name}({args}):",
                "    Qs = cuda.shared.array((BQ, SQ), DT, alignment=ALIGN)",
                "    dOs = cuda.shared.array((BQ, SQ), DT, alignment=ALIGN)",
                "    Ks = cuda.shared.array((BT, SQ), DT, alignment=ALIGN)",
                "    Vs = cuda.shared.array((BT, SQ), DT, alignment=ALIGN)",
                f"    Ps = cuda.shared.array(({max(BQ, BT)}, {max(BQ, BT) + 4}), DT, alignment=ALIGN)",
                f"    dSs = cuda.shared.array(({max(BQ, BT)}, {max(BQ, BT) + 4}), DT, alignment=ALIGN)",
                "    Ms = cuda.shared.array(BQ, DT)",
                "    Ls = cuda.shared.array(BQ, DT)",
                "    Ds = cuda.shared.array(BQ, DT)",
                "    sc = cuda.local.array((4, CT), DT)",
                "    dp = cuda.local.array((4, CT), DT)",
                "    qv = cuda.local.array((4, 4), DT)",
                "    ov = cuda.local.array((4, 4), DT)",
                "    kv = cuda.local.array((CT, 4), DT)",
                "    vv = cuda.local.array((CT, 4), DT)",
                "    kok = cuda.local.array(CT, int32)",
                "    tid = cuda.threadIdx.x & 1023",
                "    tx = tid % NTX",
                "    ty4 = (tid // NTX) * 4",
                "    lr = tid // G4",
                "    lc = (tid % G4) * 4",
                "    cok = lc < K",
                f"    bh = {bh}",
                "    b = bh // H",
                "    h = bh % H",
                "    lowest = DT(LOWEST)",
                "    pad = 0",
                "    for t in range(tid, T, NT):",
                "        if key_mask[b, t] == 0:",
                "            pad = 1",
                "    padded = cuda.syncthreads_or(pad)"]

    def load_q(indent):
        # the query tile q0 (Q scaled, dO) and its rows' statistics
        L = loads("Qs", "q", "qo", "qss", "q0", "S", PQ, " * scale")
        L += loads("dOs", "d_o", "oo", "oss", "q0", "S", PQ)
        L += ["for i in range(tid, BQ, NT):",
              "    s = q0 + i",
              "    Ms[i] = m[bh * S + min(s, S - 1)] if s < S else DT(0)",
              "    Ls[i] = l[bh * S + min(s, S - 1)] if s < S else DT(1)",
              "    Ds[i] = dlt[bh * S + min(s, S - 1)] if s < S else DT(0)"]
        return [indent + x for x in L]

    def pairs(indent, transposed):
        # P and dS of the tile pair (q0, t0) into Ps / dSs ([query, key], or [key, query])
        L = ["for i in range(4):",
             "    for jj in range(CT):",
             "        sc[i, jj] = DT(0)",
             "        dp[i, jj] = DT(0)"]
        L += ["d = 0",
              "while d < KP:"]
        for u in range(0, 4 * UD, 4):      # four head columns a step, UD steps a pass
            L += ["    for i in range(4):",
                  "        for e in range(4):",
                  f"            qv[i, e] = Qs[ty4 + i, d + {u} + e]",
                  f"            ov[i, e] = dOs[ty4 + i, d + {u} + e]",
                  "    for jj in range(CT):",
                  "        for e in range(4):",
                  f"            kv[jj, e] = Ks[jj * NTX + tx, d + {u} + e]",
                  f"            vv[jj, e] = Vs[jj * NTX + tx, d + {u} + e]",
                  "    for i in range(4):",
                  "        for jj in range(CT):",
                  "            for e in range(4):",
                  "                sc[i, jj] += qv[i, e] * kv[jj, e]",
                  "                dp[i, jj] += ov[i, e] * vv[jj, e]"]
        L += [f"    d += {4 * UD}"]
        need = "padded != 0 or q0 + BQ > S or t0 + BT > T"
        if causal:
            need += " or t0 + BT - 1 > q0 + q_offset"
        L += [f"if {need}:",
              "    for jj in range(CT):",
              "        t = t0 + jj * NTX + tx",
              "        kok[jj] = 1 if (t < T and key_mask[b, min(t, T - 1)] != 0) else 0",
              "    for i in range(4):",
              "        s = q0 + ty4 + i",
              "        mi = Ms[ty4 + i]",
              "        li = Ls[ty4 + i]",
              "        di = Ds[ty4 + i]",
              "        for jj in range(CT):",
              "            t = t0 + jj * NTX + tx",
              "            inside = s < S and t < T"]
        if causal:
            L += ["            allowed = inside and kok[jj] != 0 and t <= s + q_offset"]
        else:
            L += ["            allowed = inside and kok[jj] != 0"]
        L += ["            p = math.exp((sc[i, jj] if allowed else lowest) - mi) / li",
              "            sc[i, jj] = p if inside else DT(0)",
              "            dp[i, jj] = p * (dp[i, jj] - di) if allowed else DT(0)",
              "else:",
              "    for i in range(4):",
              "        mi = Ms[ty4 + i]",
              "        li = Ls[ty4 + i]",
              "        di = Ds[ty4 + i]",
              "        for jj in range(CT):",
              "            p = math.exp(sc[i, jj] - mi) / li",
              "            sc[i, jj] = p",
              "            dp[i, jj] = p * (dp[i, jj] - di)"]
        if transposed:
            L += ["for jj in range(CT):",
                  "    for i in range(4):",
                  "        dSs[jj * NTX + tx, ty4 + i] = dp[i, jj]"]
        else:
            L += ["for i in range(4):",
                  "    for jj in range(CT):",
                  "        Ps[ty4 + i, jj * NTX + tx] = sc[i, jj]",
                  "        dSs[ty4 + i, jj * NTX + tx] = dp[i, jj]"]
        return [indent + x for x in L]

    def dq_accumulate():
        # dQ[s] += dS[s, t] k[t] over the key tile staged in Ks, dS staged [key, query] in dSs
        L = ["        j = 0",
             "        while j < BT:"]
        for u in range(UT):      # UT keys a pass
            L += ["            for r in range(4):",
                  f"                sv[r] = dSs[j + {u}, tr4 + r]",
                  "            for g in range(CDQ // 4):",
                  "                for e in range(4):",
                  f"                    kw[g * 4 + e] = Ks[j + {u}, g * 4 * TDQ + td4 + e]",
                  "            for r in range(4):",
                  "                for c in range(CDQ):",
                  "                    aq[r, c] += sv[r] * kw[c]"]
        L += [f"            j += {UT}"]
        return L

    dq_store = ["    for r in range(4):",
                "        s = q0 + tr4 + r",
                "        if s < S:",
                "            for c in range(CDQ):",
                "                d = (c // 4) * 4 * TDQ + td4 + (c % 4)",
                "                if d < K:",
                "                    d_q[b * dqsb + h * dqsh + s * dqss + d] = aq[r, c] * scale"]

    def dq_from_scratch():
        # ---- dq: one block per (batch x head of the chunk, query tile); dQ = dS k from the scratch
        L = ["def dq(k, dsw, d_q, ksb, ksh, kss, dqsb, dqsh, dqss, H, S, T, K, z0, crow, npairs, scale):",
             "    Ks = cuda.shared.array((BT, SQ), DT, alignment=ALIGN)",
             f"    dSs = cuda.shared.array(({BT}, {BQ + 4}), DT, alignment=ALIGN)",
             "    aq = cuda.local.array((4, CDQ), DT)",
             "    sv = cuda.local.array(4, DT)",
             "    kw = cuda.local.array(CDQ, DT)",
             "    tid = cuda.threadIdx.x & 1023",
             "    lr = tid // G4",
             "    lc = (tid % G4) * 4",
             "    cok = lc < K",
             "    zl = cuda.blockIdx.x & 0x7FFFFFFF",
             "    bh = z0 + zl",
             "    b = bh // H",
             "    h = bh % H",
             "    tr4 = (tid // TDQ) * 4",
             "    td4 = (tid % TDQ) * 4",
             "    qt = (S + BQ - 1) // BQ - 1 - (cuda.blockIdx.y & 0x7FFFFFFF)   # the longest rows first",
             "    q0 = qt * BQ",
             "    for r in range(4):",
             "        for c in range(CDQ):",
             "            aq[r, c] = DT(0)"]
        L += ["    " + x for x in row_offset("qt", "ro")]
        L += ["    ro = (int64(zl) * npairs + ro) * (BQ * BT)",
              "    ko = int64(b) * ksb + int64(h) * ksh + int64(lr) * kss + lc",
              "    nk = min(nk_, max(0, qt + crow))"]
        # a key tile and its dS tile into registers (16-byte loads), then into shared memory
        fetch = [f"for p in range({PT}):",
                 "    ok = cok and t0 + lr + p * RP < T",
                 "    w = ldg4(k, (ko + p * RP * kss) if ok else int64(0))",
                 "    for e in range(4):",
                 "        kr[p * 4 + e] = w[e] if ok else DT(0)",
                 "for p in range(PS):",
                 "    w = ldg4(dsw, ro + (p * NT + tid) * 4)",
                 "    for e in range(4):",
                 "        dr[p * 4 + e] = w[e]",
                 "ko += int64(BT) * kss",
                 "ro += BQ * BT"]
        stage = [f"for p in range({PT}):",
                 "    for e in range(4):",
                 "        Ks[lr + p * RP, lc + e] = kr[p * 4 + e]",
                 "for p in range(PS):",
                 "    e4 = (p * NT + tid) * 4",
                 "    for e in range(4):",
                 "        dSs[e4 // BQ, e4 % BQ + e] = dr[p * 4 + e]"]
        L += [f"    kr = cuda.local.array({PT * 4}, DT)",
              f"    dr = cuda.local.array({PS * 4}, DT)"]
        if dq_prefetch:
            # the next tiles' loads are in flight while this tile's products run
            L += ["    if nk > 0:",
                  "        t0 = 0"]
            L += ["        " + x for x in fetch]
            L += ["    for kt in range(nk):",
                  "        cuda.syncthreads()"]
            L += ["        " + x for x in stage]
            L += ["        cuda.syncthreads()",
                  "        if kt + 1 < nk:",
                  "            t0 = (kt + 1) * BT"]
            L += ["            " + x for x in fetch]
        else:
            L += ["    for kt in range(nk):",
                  "        t0 = kt * BT",
                  "        cuda.syncthreads()"]
            L += ["        " + x for x in fetch + stage]
            L += ["        cuda.syncthreads()"]
        return L + dq_accumulate() + dq_store

    def dq_recompute():
        # ---- dq: one block per (query tile, batch x head)
        L = head("dq", args.replace("OUT", "d_q").replace("xsb, xsh, xss", "dqsb, dqsh, dqss"))
        L += ["    aq = cuda.local.array((4, CDQ), DT)",
              "    sv = cuda.local.array(4, DT)",
              "    kw = cuda.local.array(CDQ, DT)",
              "    tr4 = (tid // TDQ) * 4",
              "    td4 = (tid % TDQ) * 4",
              "    q0 = ((S + BQ - 1) // BQ - 1 - (cuda.blockIdx.x & 0x7FFFFFFF)) * BQ   # the longest rows first",
              "    qo = int64(b) * qsb + int64(h) * qsh + int64(q0 + lr) * qss + lc",
              "    oo = int64(b) * osb + int64(h) * osh + int64(q0 + lr) * oss + lc"]
        L += load_q("    ")
        L += ["    for r in range(4):",
              "        for c in range(CDQ):",
              "            aq[r, c] = DT(0)",
              "    t_end = T"]
        if causal:
            L += ["    t_end = min(T, q0 + BQ + q_offset)"]
        L += ["    ko = int64(b) * ksb + int64(h) * ksh + int64(lr) * kss + lc",
              "    vo = int64(b) * vsb + int64(h) * vsh + int64(lr) * vss + lc",
              "    for t0 in range(0, t_end, BT):",
              "        cuda.syncthreads()"]
        L += ["        " + x for x in loads("Ks", "k", "ko", "kss", "t0", "T", PT)]
        L += ["        " + x for x in loads("Vs", "v", "vo", "vss", "t0", "T", PT)]
        L += ["        ko += int64(BT) * kss",
              "        vo += int64(BT) * vss",
              "        cuda.syncthreads()"]
        L += pairs("        ", True)
        L += ["        cuda.syncthreads()"]
        return L + dq_accumulate() + dq_store

    args = ("q, k, v, d_o, m, l, dlt, key_mask, OUT, qsb, qsh, qss, ksb, ksh, kss, vsb, vsh, vss, "
            "osb, osh, oss, xsb, xsh, xss, H, S, T, K, q_offset, scale")
    # ---- dkdv: one block per (key tile, batch x head)
    tail = ", dsw, z0, crow, npairs" if scratch else ""
    L = head("dkdv", args.replace("OUT", "d_k, d_v").replace("xsb, xsh, xss",
                                                             "dksb, dksh, dkss, dvsb, dvsh, dvss") + tail)
    L += ["    ak = cuda.local.array((4, CDK), DT)",
          "    av = cuda.local.array((4, CDK), DT)",
          "    pv = cuda.local.array(4, DT)",
          "    sv = cuda.local.array(4, DT)",
          "    ow = cuda.local.array(CDK, DT)",
          "    qw = cuda.local.array(CDK, DT)",
          "    tk4 = (tid // TDK) * 4",
          "    td4 = (tid % TDK) * 4",
          f"    kt = cuda.blockIdx.{'y' if scratch else 'x'} & 0x7FFFFFFF",
          "    t0 = kt * BT",
          "    ko = int64(b) * ksb + int64(h) * ksh + int64(t0 + lr) * kss + lc",
          "    vo = int64(b) * vsb + int64(h) * vsh + int64(t0 + lr) * vss + lc"]
    L += ["    " + x for x in loads("Ks", "k", "ko", "kss", "t0", "T", PT)]
    L += ["    " + x for x in loads("Vs", "v", "vo", "vss", "t0", "T", PT)]
    L += ["    for r in range(4):",
          "        for c in range(CDK):",
          "            ak[r, c] = DT(0)",
          "            av[r, c] = DT(0)",
          "    q_start = 0"]
    if causal:
        L += ["    if key_mask[b, 0] != 0:",
              "        q_start = max(0, t0 - q_offset) // BQ"]
    L += ["    qo = int64(b) * qsb + int64(h) * qsh + int64(q_start * BQ + lr) * qss + lc",
          "    oo = int64(b) * osb + int64(h) * osh + int64(q_start * BQ + lr) * oss + lc",
          "    for qt in range(q_start, (S + BQ - 1) // BQ):",
          "        q0 = qt * BQ",
          "        cuda.syncthreads()"]
    L += load_q("        ")
    L += ["        qo += int64(BQ) * qss",
          "        oo += int64(BQ) * oss",
          "        cuda.syncthreads()"]
    L += pairs("        ", False)
    if scratch:
        # dS of the pairs dq reads (key tiles kt < qt + crow), [key, query] in the pair's tile:
        # a thread's four query rows are consecutive, one 16-byte store a key
        L += ["        if kt < qt + crow:"]
        L += ["            " + x for x in row_offset("qt", "ro")]
        L += ["            wo = (int64(bh - z0) * npairs + ro + kt) * (BQ * BT) + ty4",
              "            for jj in range(CT):",
              "                stg4(dsw, wo + (jj * NTX + tx) * BQ,",
              "                     dp[0, jj], dp[1, jj], dp[2, jj], dp[3, jj])"]
    L += ["        cuda.syncthreads()"]
    L += ["        qi = 0",
          "        while qi < BQ:"]
    for u in range(UQ):      # dV[t] += P[s, t] dO[s], dK[t] += dS[s, t] q_s; UQ query rows a pass
        L += ["            for r in range(4):",
              f"                pv[r] = Ps[qi + {u}, tk4 + r]",
              f"                sv[r] = dSs[qi + {u}, tk4 + r]",
              "            for g in range(CDK // 4):",
              "                for e in range(4):",
              f"                    ow[g * 4 + e] = dOs[qi + {u}, g * 4 * TDK + td4 + e]",
              f"                    qw[g * 4 + e] = Qs[qi + {u}, g * 4 * TDK + td4 + e]",
              "            for r in range(4):",
              "                for c in range(CDK):",
              "                    av[r, c] += pv[r] * ow[c]",
              "                    ak[r, c] += sv[r] * qw[c]"]
    L += [f"            qi += {UQ}"]
    L += ["    for r in range(4):",
          "        t = t0 + tk4 + r",
          "        if t < T:",
          "            for c in range(CDK):",
          "                d = (c // 4) * 4 * TDK + td4 + (c % 4)",
          "                if d < K:",
          "                    d_k[b * dksb + h * dksh + t * dkss + d] = ak[r, c]",
          "                    d_v[b * dvsb + h * dvsh + t * dvss + d] = av[r, c]"]
    if scratch:
        L += dq_from_scratch()
    else:
        L += dq_recompute()
    ns = dict(cuda=cuda, math=math, DT=nbtype(np.float32), int32=int32, int64=int64, ldg4=_gemm.ldg4,
              stg4=stg4, min=min, max=max, ALIGN=ALIGN, BQ=BQ, BT=BT, KP=KP, NT=NT, NTX=NTX, CT=CT,
              SQ=SQ, G4=G4, CDK=CDK, CDQ=CDQ, TDK=TDK, TDQ=TDQ, RP=RP, PS=PS, LOWEST=LOWEST)
    ns, src = generated(L, f"flash backward v2 {causal} {unroll} {scratch} {dq_prefetch}", ns)
    dkdv = kernel(launch_bounds=NT)(ns["dkdv"])
    dq = kernel(launch_bounds=NT)(ns["dq"])
    dkdv.tiles = dq.tiles = (BQ, BT, NT)
    dkdv.source = dq.source = src
    return dkdv, dq

