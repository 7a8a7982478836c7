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

Two kernels share that design (:data:`VARIANT`, ``REFOPT_FLASH``): ``"v2"``
(:func:`make_flash_forward_v2`, the default for float32 with head widths in fours, strides in fours
and 16-byte aligned data, structured masks) reads its tiles as 16-byte loads and runs the head steps
of ``Q K^T`` and the key steps of ``P V`` as loops of generated source, :data:`UNROLL` steps a pass
(on an H200, causal 8 x 12 x 2048 x 64: 0.87-0.94x SDPA over session 11's four runs; the first
0.55x); ``"v1"`` (:func:`make_flash_forward`) takes everything else (float64, other widths, dense
masks).

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
import os

import numpy as np
from numba import cuda, int32, int64

from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda._common import (ALIGN, SIM, SIMULATOR, block_sum, cdiv, empty, generated, kernel,
                                         larger, nbtype, plus)
from refopt.kernels.cuda.launch import as_shape, launcher, pointer

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


# ----------------------------------------------------------------------------- the second forward
# (float32, head columns in 16-byte groups: vector global loads, the products written out)

@functools.lru_cache(maxsize=None)
def make_flash_forward_v2(KP: int, causal: bool, prefetch: bool = True, unroll: int = 4):
    """The forward of :func:`make_flash_forward` (float32, structured masks only, same tiles and
    thread layout, same arithmetic in the same order) for operands :func:`v2_fits` accepts: the Q,
    K and V tiles read as 16-byte loads (:func:`~refopt.kernels.cuda.gemm.ldg4`) from offsets
    computed once and advanced per key tile, out-of-range groups read from element 0 and replaced
    by zeros (selects, no branches around the loads); with ``prefetch`` the next key tile is read
    into registers while the current one is multiplied; the key-padding and causal selects only
    on tiles that need them (a block first checks whether its batch row has padding); the head
    steps of ``Q K^T`` and the key steps of ``P V`` as loops of generated source, ``unroll`` steps
    written out a pass (the register blocking inside a step unchanged; the tile loads' passes a
    loop too).  The source is as long for any tile: with every step written out the kernel took
    90 s of ``compile_ptx`` (the CPU machine) and 37 s of its first call on an H200's host, at
    ``unroll`` 4 4.3 s and 4.9-8.2 s, its speed within the spread between processes
    (benchmarks/GPU.md, session 11)."""
    BQ, BKV = _tiles(KP)
    NTY = BQ // 4
    NT = NTX * NTY
    CT = BKV // NTX
    CD = KP // NTX
    GD = CD // 4
    SQ = KP + 4
    SP = BQ + 4
    G4 = KP // 4                    # 16-byte groups of a row
    RP = NT // G4                   # rows a pass of the block's loads covers
    PQ, PK = BQ // RP, BKV // RP    # passes over a Q / a K or V tile
    assert NT % G4 == 0 and BQ % RP == 0 and BKV % RP == 0 and CD % 4 == 0
    LOWEST = float(np.finfo(np.float32).min)
    UD, UJ = min(unroll, KP // 4), min(unroll, BKV)     # head / key steps a pass of their loops
    assert (KP // 4) % UD == 0 and BKV % UJ == 0

    def loads(name, regs, off, stride, rows, first, limit, P):
        # P passes of 16-byte loads of rows first + lr + p * RP (< limit) into regs[4 p + e]
        return [f"for p in range({P}):",
                f"    ok = cok and {first} + lr + p * RP < {limit}",
                f"    w = ldg4({name}, ({off} + p * RP * {stride}) if ok else int64(0))",
                "    for e in range(4):",
                f"        {regs}[4 * p + e] = w[e] if ok else DT(0)"]

    def stores(arr, regs, P, mul=""):
        return [f"for p in range({P}):",
                "    for e in range(4):",
                f"        {arr}[lr + p * RP, lc + e] = {regs}[4 * p + e]{mul}"]

    L = ["def flash_forward(q, k, v, out, m_out, l_out, key_mask, qsb, qsh, qss, ksb, ksh, kss,",
         "                  vsb, vsh, vss, osb, osh, oss, H, S, T, K, q_offset, scale):",
         "    Qs = cuda.shared.array((BQ, SQ), DT, alignment=ALIGN)",
         "    Ks = cuda.shared.array((BKV, SQ), DT, alignment=ALIGN)",
         "    Vs = cuda.shared.array((BKV, KP), DT, alignment=ALIGN)",
         "    Ps = cuda.shared.array((BKV, SP), DT, alignment=ALIGN)",
         "    red = cuda.shared.array(NT, DT)",
         "    acc = cuda.local.array((4, CD), DT)",
         "    sc = cuda.local.array((4, CT), DT)",
         "    qv = cuda.local.array((4, 4), DT)",
         "    kv = cuda.local.array((CT, 4), DT)",
         "    pv = cuda.local.array(4, DT)",
         "    vv = cuda.local.array(CD, DT)",
         "    mrow = cuda.local.array(4, DT)",
         "    lrow = cuda.local.array(4, DT)",
         "    kok = cuda.local.array(CT, int32)",
         f"    rq = cuda.local.array({4 * PQ}, DT)",
         f"    rk = cuda.local.array({4 * PK}, DT)",
         f"    rv = cuda.local.array({4 * PK}, DT)",
         "    tid = cuda.threadIdx.x & 1023",
         "    tx = tid % NTX",
         "    ty4 = (tid // NTX) * 4",
         "    tx4 = tx * 4",
         "    lr = tid // G4",
         "    lc = (tid % G4) * 4",
         "    cok = lc < K",
         "    nqt = (S + BQ - 1) // BQ",
         "    qt = nqt - 1 - (cuda.blockIdx.x & 0x7FFFFFFF)",
         "    bh = cuda.blockIdx.y & 0x7FFFFFFF",
         "    b = bh // H",
         "    h = bh % H",
         "    q0 = qt * BQ",
         "    lowest = DT(LOWEST)",
         "    ninf = DT(NEG_INF)",
         "    qo = int64(b) * qsb + int64(h) * qsh + int64(q0 + lr) * qss + lc",
         "    ko = int64(b) * ksb + int64(h) * ksh + int64(lr) * kss + lc",
         "    vo = int64(b) * vsb + int64(h) * vsh + int64(lr) * vss + lc",
         "    kstep = int64(BKV) * kss",
         "    vstep = int64(BKV) * vss"]
    L += ["    " + x for x in loads("q", "rq", "qo", "qss", "rows", "q0", "S", PQ)]
    L += ["    " + x for x in stores("Qs", "rq", PQ, " * scale")]
    L += ["    pad = 0",
          "    for t in range(tid, T, NT):",
          "        if key_mask[b, t] == 0:",
          "            pad = 1",
          "    padded = cuda.syncthreads_or(pad)",
          "    for i in range(4):",
          "        mrow[i] = lowest",
          "        lrow[i] = DT(0)",
          "        for c in range(CD):",
          "            acc[i, c] = DT(0)",
          "    t_end = T"]
    if causal:
        L += ["    t_end = min(T, q0 + BQ + q_offset)"]
    if prefetch:
        L += ["    if t_end > 0:"]
        L += ["        " + x for x in loads("k", "rk", "ko", "kss", "rows", "0", "T", PK)]
        L += ["        " + x for x in loads("v", "rv", "vo", "vss", "rows", "0", "T", PK)]
    L += ["    for t0 in range(0, t_end, BKV):",
          "        cuda.syncthreads()"]
    if prefetch:
        L += ["        " + x for x in stores("Ks", "rk", PK) + stores("Vs", "rv", PK)]
        L += ["        cuda.syncthreads()",
              "        if t0 + BKV < t_end:",
              "            ko += kstep",
              "            vo += vstep"]
        L += ["            " + x for x in loads("k", "rk", "ko", "kss", "rows", "t0 + BKV", "T", PK)]
        L += ["            " + x for x in loads("v", "rv", "vo", "vss", "rows", "t0 + BKV", "T", PK)]
    else:
        L += ["        " + x for x in loads("k", "rk", "ko", "kss", "rows", "t0", "T", PK)]
        L += ["        " + x for x in loads("v", "rv", "vo", "vss", "rows", "t0", "T", PK)]
        L += ["        " + x for x in stores("Ks", "rk", PK) + stores("Vs", "rv", PK)]
        L += ["        ko += kstep",
              "        vo += vstep",
              "        cuda.syncthreads()"]
    L += ["        for i in range(4):",
          "            for jj in range(CT):",
          "                sc[i, jj] = DT(0)"]
    L += ["        d = 0",
          "        while d < KP:"]
    for u in range(0, 4 * UD, 4):  # scores: four head columns a step, UD steps a pass
        L += ["            for i in range(4):",
              "                for e in range(4):",
              f"                    qv[i, e] = Qs[ty4 + i, d + {u} + e]",
              "            for jj in range(CT):",
              "                for e in range(4):",
              f"                    kv[jj, e] = Ks[jj * NTX + tx, d + {u} + e]",
              "            for i in range(4):",
              "                for jj in range(CT):",
              "                    for e in range(4):",
              "                        sc[i, jj] += qv[i, e] * kv[jj, e]"]
    L += [f"            d += {4 * UD}"]
    # the masking rule: a key past T weighs 0 (-inf), a masked key scores lowest; a tile needs the
    # selects when it reaches past T, past the first row's diagonal, or when the row has padding
    need = "padded != 0 or t0 + BKV > T"
    if causal:
        need += " or t0 + BKV - 1 > q0 + q_offset"
    L += [f"        if {need}:",
          "            for jj in range(CT):",
          "                t = t0 + jj * NTX + tx",
          "                kok[jj] = 1 if key_mask[b, min(t, T - 1)] != 0 else 0",
          "            for i in range(4):",
          "                lim = q0 + ty4 + i + q_offset",
          "                for jj in range(CT):",
          "                    t = t0 + jj * NTX + tx",
          "                    x = sc[i, jj]"]
    if causal:
        L += ["                    x = x if (kok[jj] != 0 and t <= lim) else lowest"]
    else:
        L += ["                    x = x if kok[jj] != 0 else lowest"]
    L += ["                    sc[i, jj] = x if t < T else ninf",
          "        for i in range(4):",
          "            top = ninf",
          "            for jj in range(CT):",
          "                top = max(top, sc[i, jj])",
          "            top = group_max(top, red, tid)",
          "            m_new = max(mrow[i], top)",
          "            alpha = math.exp(mrow[i] - m_new)",
          "            mrow[i] = m_new",
          "            total = DT(0)",
          "            for jj in range(CT):",
          "                p = math.exp(sc[i, jj] - m_new)",
          "                sc[i, jj] = p",
          "                total += p",
          "            total = group_sum(total, red, tid)",
          "            lrow[i] = lrow[i] * alpha + total",
          "            for c in range(CD):",
          "                acc[i, c] *= alpha",
          "        for jj in range(CT):",
          "            for i in range(4):",
          "                Ps[jj * NTX + tx, ty4 + i] = sc[i, jj]",
          "        cuda.syncthreads()"]
    L += ["        j = 0",
          "        while j < BKV:"]
    for u in range(UJ):            # output += P V, one key a step, UJ steps a pass
        L += ["            for i in range(4):",
              f"                pv[i] = Ps[j + {u}, ty4 + i]",
              "            for g in range(GD):",
              "                for e in range(4):",
              f"                    vv[g * 4 + e] = Vs[j + {u}, g * 4 * NTX + tx4 + e]",
              "            for i in range(4):",
              "                for c in range(CD):",
              "                    acc[i, c] += pv[i] * vv[c]"]
    L += [f"            j += {UJ}"]
    L += ["    ob = int64(b) * osb + int64(h) * osh",
          "    vb = int64(b) * vsb + int64(h) * vsh",
          "    for i in range(4):",
          "        s = q0 + ty4 + i",
          "        if s < S:",
          "            inv = DT(1) / lrow[i]",
          f"            fix = {bool(causal)} and t_end < T and mrow[i] == lowest",
          "            if fix:",
          "                lrow[i] = DT(T)",
          "                inv = DT(1) / lrow[i]",
          "                for d in range(tx, K, NTX):",
          "                    tot = DT(0)",
          "                    for t in range(T):",
          "                        tot += v[vb + t * vss + d]",
          "                    out[ob + s * oss + d] = tot * inv",
          "            else:",
          "                for c in range(CD):",
          "                    d = (c // 4) * 4 * NTX + tx4 + (c % 4)",
          "                    if d < K:",
          "                        out[ob + s * oss + d] = acc[i, c] * inv",
          "            if tx == 0 and m_out.shape[0] > 0:",
          "                m_out[bh * S + s] = mrow[i]",
          "                l_out[bh * S + s] = lrow[i]"]
    ns = dict(cuda=cuda, math=math, DT=nbtype(np.float32), int32=int32, int64=int64, ldg4=_gemm.ldg4,
              min=min, max=max, ALIGN=ALIGN, BQ=BQ, BKV=BKV, KP=KP, NT=NT, NTX=NTX, CT=CT, CD=CD,
              GD=GD, SQ=SQ, SP=SP, G4=G4, RP=RP, PQ=PQ, PK=PK, LOWEST=LOWEST, NEG_INF=-math.inf,
              group_max=_group_max, group_sum=_group_sum)
    ns, src = generated(L, f"flash forward v2 {KP} {causal} {prefetch} {unroll}", ns)
    fn = kernel(launch_bounds=NT)(ns["flash_forward"])
    fn.tiles = (BQ, BKV, NT)
    fn.source = src
    return fn


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


#: the forward :func:`flash_attention` launches where its operands allow: ``"v2"``
#: (:func:`make_flash_forward_v2`) or ``"v1"`` (:func:`make_flash_forward`); ``REFOPT_FLASH``
VARIANT = os.environ.get("REFOPT_FLASH", "v2")
#: ``v2`` reads the next key tile into registers while it multiplies the current one (on: the variant
#: the real-GPU tests ran; 168 registers; 0.94x SDPA against 0.93x without in session 11, 0.91x
#: against 0.95x in session 9: within the spread, benchmarks/GPU.md); ``REFOPT_FLASH_PREFETCH=0``
#: turns it off
PREFETCH = os.environ.get("REFOPT_FLASH_PREFETCH", "1") != "0"
#: ``v2``'s head and key steps a pass of their loops (4; 8 measured 1-2% faster, within the spread,
#: at 1.7 times the compile; 2 10% slower); ``REFOPT_FLASH_UNROLL``
UNROLL = int(os.environ.get("REFOPT_FLASH_UNROLL", "4"))


def v2_fits(dtype, K: int, arrays, strides) -> bool:
    """Whether :func:`make_flash_forward_v2` can take these operands: float32, the head width a
    multiple of 4, every batch / head / position stride a multiple of 4 and the data 16-byte
    aligned (so each row's groups of four are 16-byte loads)."""
    if np.dtype(dtype) != np.float32 or K % 4 or K == 0 or K > 128:
        return False
    if any(int(x) % 4 for st in strides for x in st):
        return False
    return SIMULATOR or all(pointer(a) % 16 == 0 for a in arrays)


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
    if not dense and VARIANT == "v2" and v2_fits(dtype, K, (q, k, v), (qstrides, kstrides, vstrides)):
        fn = make_flash_forward_v2(head_pad(K), bool(causal), PREFETCH, UNROLL)
        BQ, BKV, NT = fn.tiles
        m_out, l_out = stats if stats is not None else (empty(0, dtype), empty(0, dtype))
        flat = [as_shape(a, (a.shape[0],)) for a in (q, k, v, out, m_out, l_out)]
        launcher(fn)((cdiv(S, BQ), B * H, 1), (NT, 1, 1), stream, *flat, as_shape(key_mask, key_mask.shape),
                     *map(int64, qstrides), *map(int64, kstrides), *map(int64, vstrides),
                     *map(int64, ostrides), int32(H), int32(S), int32(T), int32(K), int32(q_offset),
                     np.float32(scale))
        return out
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

