"""The persistent decode kernel's stages (:mod:`.decode`) as device functions, one per stage.

Each stage is a loop over its work spread over the blocks (or threads) of the grid; the kernel
calls them one after another with a grid synchronisation between two stages that exchange data
(:func:`make_sync`).  The stages are made per model shape (``make_*`` factories, cached), with
the shapes, weight offsets and options written in as compile-time constants; every block calls
every stage, and all threads of a block call it (they synchronise inside).

==============  ==========================================================================
embed           ``x[b] = embed[token] + positions[index - 1]`` (projection models: the token
                rows ``xe``, then ``project_in``'s product, then the positions)
norm            one block per row: a product's partial sums (their count written in) and its
                bias join the residual ``x``, then LayerNorm -> ``xn`` (or in place: post-LN
                models)
attention       one block per (row, head): q/k/v from the product's partial sums and bias,
                k and v stored in the cache at the position, then the scores against the
                cached keys, an online softmax over chunks of positions, the weighted values;
                batch passes of ``decode.WARP_ATTENTION_FROM`` rows or more: one **warp** per
                (row, head), 32 positions at a time, shuffles instead of barriers
                (:func:`make_warp_attention`)
softmax         ``softmax(logits / temperature)`` over the grid in three steps (slice maxima,
                slice sums, normalisation), each row's vocabulary cut into slices, one block a
                slice; the partial maxima and sums are combined in slice order
sample          one block per row: the sampler's rule (:mod:`.sampling`); the prompt's own
                token kept where the prompt mask is set; stop tokens counted
advance         block 0 moves the position on and raises the stop flag
==============  ==========================================================================

The products between them are :mod:`.decode_products`'.  The LayerNorm and softmax formulas are
the row kernels' (:func:`.rows.row_functions`), the samplers' rules :mod:`.sampling`'s.

Names: ``B`` rows, ``D`` hidden width, ``E`` embedding width, ``V`` vocabulary, ``L`` layers,
``H`` heads, ``K`` head width, ``T`` cache positions, ``NT`` threads a block, ``NW`` warps a
block, ``WL`` lanes of a warp, ``GV`` thread groups of the attention's weighted sum, ``nsl``
softmax slices a row, ``Wt`` the packed weights (offsets: :class:`.decode.Layout`), ``xn`` the
normalised rows; shared buffers: ``fbuf`` / ``dbuf`` / ``ibuf`` (float32 / float64 / int64, one
entry a thread) for block reductions, ``scores`` a chunk of attention scores, ``q`` a head's
query, ``pv`` the weighted values' group sums.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import cuda, float32, float64

from refopt.kernels.cuda import rows as _rows
from refopt.kernels.cuda._common import SIM, SIMULATOR, block_max, block_sum
from refopt.kernels.cuda.halves import make_load
from refopt.kernels.cuda.sampling import (
    philox_uniform, row_argmax, row_choose, row_min_p, row_top_k_weights, row_top_p)

THREADS = 8 if SIM else 32 if SIMULATOR else 256    # threads per block of the persistent kernel
WL = min(32, THREADS)                 # lanes of a warp (the simulator's blocks are narrower)
NW = THREADS // WL                    # warps of a block
CHUNK = 1024                          # attention scores kept in shared memory per pass

if SIMULATOR:
    clock64 = None                    # (profiling is off under the simulator)
else:
    from llvmlite import ir as _ir
    from numba.cuda import cgutils as _cgutils
    from numba.cuda import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic
    from numba.cuda.typing import signature as _signature

    @_intrinsic
    def clock64(typingctx):
        """The SM's cycle counter (PTX ``%clock64``)."""
        def codegen(context, builder, sig, args):
            fnty = _ir.FunctionType(_ir.IntType(64), [])
            fn = _cgutils.get_or_insert_function(builder.module, fnty, "llvm.nvvm.read.ptx.sreg.clock64")
            return builder.call(fn, [])
        return _signature(_types.int64), codegen


# ----------------------------------------------------------------------------- grid sync
class Sync(NamedTuple):
    grid_sync: object                 # grid_sync(): every block of the grid waits for the others
    mark: object                      # ps = mark(prof, ps, stage): profile mark (see make_sync)
    sync: object                      # ps = sync(prof, ps, stage): grid_sync(), then mark


@functools.lru_cache(maxsize=None)
def make_sync(profile: bool) -> Sync:
    """Grid synchronisation and profile marks: with ``profile``, block 0 records the SM clock and
    the stage that just ended after a grid synchronisation (``prof[ps] = (clock, stage)``)."""

    @cuda.jit(device=True)
    def grid_sync():
        cuda.cg.this_grid().sync()

    @cuda.jit(device=True)
    def mark(prof, ps, stage):
        if profile:
            if cuda.blockIdx.x == 0 and cuda.threadIdx.x == 0 and ps < prof.shape[0]:
                prof[ps, 0] = clock64()
                prof[ps, 1] = stage
        return ps + 1

    @cuda.jit(device=True)
    def sync(prof, ps, stage):
        grid_sync()
        return mark(prof, ps, stage)

    return Sync(grid_sync, mark, sync)


# ----------------------------------------------------------------------------- embed
class Embed(NamedTuple):
    tokens_positions: object          # (Wt, Wm, tokens, pos, B, x): x[b] = embed[token] + positions[pos]
    tokens: object                    # (Wm, tokens, pos, B, xe): xe[b] = embed[token] (E wide)
    add_positions: object             # (Wt, part, pos, B, x): x[b] = part[b] + positions[pos]


@functools.lru_cache(maxsize=None)
def make_embed(D: int, E: int, g_embed: int, g_pos: int, kind: str = "float32") -> Embed:
    """The embed stage's steps, one thread an element over the grid (the token of row ``b`` is
    ``tokens[b, pos]``, the position table's row is ``pos``); the token table is in ``Wm`` (stored
    as ``kind``, :mod:`.halves`), the positions in ``Wt``."""
    NT = THREADS
    ld = make_load(kind)

    @cuda.jit(device=True)
    def tokens_positions(Wt, Wm, tokens, pos, B, x):
        for idx in range(cuda.blockIdx.x * NT + cuda.threadIdx.x, B * D, cuda.gridDim.x * NT):
            b = idx // D
            d = idx % D
            x[idx] = ld(Wm, g_embed + tokens[b, pos] * E + d) + Wt[g_pos + pos * D + d]

    @cuda.jit(device=True)
    def token_rows(Wm, tokens, pos, B, xe):
        for idx in range(cuda.blockIdx.x * NT + cuda.threadIdx.x, B * E, cuda.gridDim.x * NT):
            b = idx // E
            e = idx % E
            xe[idx] = ld(Wm, g_embed + tokens[b, pos] * E + e)

    @cuda.jit(device=True)
    def add_positions(Wt, part, pos, B, x):
        for idx in range(cuda.blockIdx.x * NT + cuda.threadIdx.x, B * D, cuda.gridDim.x * NT):
            x[idx] = part[idx] + Wt[g_pos + pos * D + idx % D]

    return Embed(tokens_positions, token_rows, add_positions)


# ----------------------------------------------------------------------------- norm
@functools.lru_cache(maxsize=None)
def make_norm(D: int, eps: float, NP: int = 0):
    """``norm(x, part, add, bias_off, ln, gamma_off, beta_off, dst, Wt, B, fbuf)``, one block a
    row: ``x[b] += sum of the NP partial sums part[s, b] + Wt[bias_off:]`` when ``add``, then
    ``dst[b] = LayerNorm(x[b])`` with the gain and offset at ``gamma_off``, ``beta_off`` when
    ``ln`` (``dst`` may be ``x``).  ``NP`` is written in (a kernel has one norm per partial-sum
    count): the sum's loop unrolls and its loads are in flight together (a loop over a count
    known only at run time waited on each load: 16 us a norm at batch 32 with 39 partials)."""
    NT = THREADS
    EPS = float32(eps)
    layernorm = _rows.row_functions(np.float32).layernorm

    @cuda.jit(device=True)
    def norm(x, part, add, bias_off, ln, gamma_off, beta_off, dst, Wt, B, fbuf):
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        while b < B:
            if add:
                for d in range(tid, D, NT):
                    v = float32(0)
                    for s in range(NP):
                        v += part[(s * B + b) * D + d]
                    x[b * D + d] = x[b * D + d] + (v + Wt[bias_off + d])
            if ln:
                layernorm(x, dst, b * D, D, Wt, gamma_off, Wt, beta_off, True, True, EPS, NT, fbuf)
            cuda.syncthreads()
            b += cuda.gridDim.x
    return norm


@functools.lru_cache(maxsize=None)
def make_block_norm(D: int, eps: float):
    """``block_norm(x, src, add, bias_off, gamma_off, beta_off, x_out, xs, Wt, B, fbuf)``: the
    norm of small batch passes folded into the product that reads it.  EVERY block computes the
    ``B`` rows ``v = x[b] + (src[b] + Wt[bias_off:])`` (``v = x[b]`` when not ``add``) and their
    LayerNorm (gain and offset at ``gamma_off``, ``beta_off``) into its own shared ``xs [B, D]``,
    which its product then reads; block 0 alone also stores ``v`` in ``x_out`` (the residual
    stream's other buffer: the other blocks are still reading ``x``).  The arithmetic is
    :func:`make_norm`'s with one partial sum (``0 + p`` is ``p``), so the same bits: a grid
    synchronisation and a stage run by one block a row are saved at the cost of every block
    normalising ``B`` short rows itself."""
    NT = THREADS
    EPS = float32(eps)
    layernorm = _rows.row_functions(np.float32).layernorm

    @cuda.jit(device=True)
    def block_norm(x, src, add, bias_off, gamma_off, beta_off, x_out, xs, Wt, B, fbuf):
        tid = cuda.threadIdx.x
        first = cuda.blockIdx.x == 0
        for b in range(B):
            for d in range(tid, D, NT):
                v = x[b * D + d]
                if add:
                    v = v + (src[b * D + d] + Wt[bias_off + d])
                xs[b * D + d] = v
                if first:
                    x_out[b * D + d] = v
            layernorm(xs, xs, b * D, D, Wt, gamma_off, Wt, beta_off, True, True, EPS, NT, fbuf)
        cuda.syncthreads()
    return block_norm


# ----------------------------------------------------------------------------- attention
@functools.lru_cache(maxsize=None)
def _make_head_input(D: int, H: int, L: int, T: int, Sq: int):
    """``q = head_input(Wt, bias_off, part, cache, l, pos, B, b, hh, d)``: column ``d`` of head
    ``hh``'s q, k, v for row ``b`` -- the ``Sq`` partial sums ``part [Sq, B, 3D]`` added in order,
    plus the bias at ``bias_off`` -- with k and v stored in layer ``l``'s cache at position
    ``pos``; returns q scaled by ``K ** -0.5``.  Both attention stages start with it."""
    K = D // H
    scale = float32(K ** -0.5)

    @cuda.jit(device=True)
    def head_input(Wt, bias_off, part, cache, l, pos, B, b, hh, d):
        kbase = (b * L + l) * 2 * T * H * K
        f = hh * K + d
        qv = float32(0)
        kv = float32(0)
        vv = float32(0)
        for s_ in range(Sq):
            pb = (s_ * B + b) * 3 * D
            qv += part[pb + f]
            kv += part[pb + D + f]
            vv += part[pb + 2 * D + f]
        cache[kbase + (pos * H + hh) * K + d] = kv + Wt[bias_off + D + f]
        cache[kbase + T * H * K + (pos * H + hh) * K + d] = vv + Wt[bias_off + 2 * D + f]
        return (qv + Wt[bias_off + f]) * scale
    return head_input


@functools.lru_cache(maxsize=None)
def make_attention(D: int, H: int, L: int, T: int, Sq: int, variant=(False, False)):
    """``attention(Wt, bias_off, part, cache, l, index, B, ctx, q, scores, pv, fbuf)``: layer
    ``l``'s attention of each (row, head) over cache positions ``0 .. index - 1``, one block an
    item.  The block adds up its head's q, k, v (``Sq`` partial sums ``part [Sq, B, 3D]`` and the
    bias at ``bias_off``), stores k and v in the cache ``[B, L, 2, T, H, K]`` at position
    ``index - 1``, then goes over the positions in chunks of :data:`CHUNK`: the scores (a warp a
    position, its lanes across the head) into shared memory, an online softmax (the chunk's
    maximum, the running total rescaled), the weighted values (``GV`` groups of ``K`` threads each
    take every ``GV``-th position, then thread ``d < K`` adds its column's group sums in order);
    ``ctx[b, head] = weighted values / total``."""
    K = D // H
    NT = THREADS
    GV = max(1, NT // K)
    head_input = _make_head_input(D, H, L, T, Sq)
    # variant: (scores a thread a position instead of a warp a position, the weighted values
    # four positions a pass into four sums so that their loads are in flight together)
    ATTENTION_SCORES_BY_THREAD, ATTENTION_VALUES_UNROLLED = variant

    @cuda.jit(device=True)
    def attention(Wt, bias_off, part, cache, l, index, B, ctx, q, scores, pv, fbuf):
        tid = cuda.threadIdx.x
        lane = tid % WL
        warp = tid // WL
        pos = index - 1
        item = cuda.blockIdx.x
        while item < B * H:
            b = item // H
            hh = item % H
            kbase = (b * L + l) * 2 * T * H * K
            vbase = kbase + T * H * K
            for d in range(tid, K, NT):
                q[d] = head_input(Wt, bias_off, part, cache, l, pos, B, b, hh, d)
            cuda.syncthreads()
            top = float32(-math.inf)
            total = float32(0)
            acc_d = float32(0)                         # thread tid < K: output column tid
            for t0 in range(0, index, CHUNK):
                t1 = min(index, t0 + CHUNK)
                if SIM or ATTENTION_SCORES_BY_THREAD:
                    # a thread a position (its row of K keys read whole, every load in flight)
                    for t in range(t0 + tid, t1, NT):
                        s = float32(0)
                        kp = kbase + (t * H + hh) * K
                        for d in range(K):
                            s += q[d] * cache[kp + d]
                        scores[t - t0] = s
                else:
                    # a warp per position, its lanes across the head (coalesced rows)
                    for t in range(t0 + warp, t1, NW):
                        s = float32(0)
                        kp = kbase + (t * H + hh) * K
                        for d in range(lane, K, WL):
                            s += q[d] * cache[kp + d]
                        for w in (16, 8, 4, 2, 1):
                            s += cuda.shfl_xor_sync(0xFFFFFFFF, s, w)
                        if lane == 0:
                            scores[t - t0] = s
                cuda.syncthreads()
                m = float32(-math.inf)
                for t in range(t0 + tid, t1, NT):
                    m = max(m, scores[t - t0])
                m = block_max(m, fbuf)
                m_new = max(top, m)
                alpha = math.exp(top - m_new)
                psum = float32(0)
                for t in range(t0 + tid, t1, NT):
                    e = math.exp(scores[t - t0] - m_new)
                    scores[t - t0] = e
                    psum += e
                psum = block_sum(psum, fbuf)
                total = total * alpha + psum
                top = m_new
                cuda.syncthreads()
                if tid < GV * K:
                    g = tid // K
                    d = tid % K
                    a = float32(0)
                    t = t0 + g
                    if ATTENTION_VALUES_UNROLLED:
                        # four positions a pass into four sums: their loads are in flight together
                        a1 = float32(0)
                        a2 = float32(0)
                        a3 = float32(0)
                        while t + 3 * GV < t1:
                            vp = vbase + (t * H + hh) * K + d
                            a += scores[t - t0] * cache[vp]
                            a1 += scores[t + GV - t0] * cache[vp + GV * H * K]
                            a2 += scores[t + 2 * GV - t0] * cache[vp + 2 * GV * H * K]
                            a3 += scores[t + 3 * GV - t0] * cache[vp + 3 * GV * H * K]
                            t += 4 * GV
                        a = (a + a1) + (a2 + a3)
                    while t < t1:
                        a += scores[t - t0] * cache[vbase + (t * H + hh) * K + d]
                        t += GV
                    pv[tid] = a
                cuda.syncthreads()
                if tid < K:
                    a = acc_d * alpha
                    for g in range(GV):
                        a += pv[g * K + tid]
                    acc_d = a
                cuda.syncthreads()
            if tid < K:
                ctx[b * D + hh * K + tid] = acc_d / total
            cuda.syncthreads()
            item += cuda.gridDim.x
    return attention


@functools.lru_cache(maxsize=None)
def _make_chunk_scores(K: int, HK: int):
    """``score = chunk_scores(cache, kb, t0, last, q0, q1, q2, q3, lane)``: the scores of the
    ``WL`` positions ``t0 .. t0 + WL - 1`` against one head's ``q`` (lane ``j`` holds ``q[j + WL
    i]`` as ``qi``; positions past ``last`` read ``last``'s key row), lane ``u`` returning position
    ``t0 + u``'s.  Every lane multiplies its columns of every position's key row (coalesced rows,
    all the loads in flight), then a transposing butterfly of shuffles leaves each position's sum
    in its lane (:func:`.decode_products.reduction_source`: 31 shuffles for 32 sums).  Generated:
    ``K`` and ``HK`` (the cache's distance between positions) written in."""
    from refopt.kernels.cuda.decode_products import reduction_source

    KJ = -(-K // WL)
    assert KJ <= 4
    L = ["def chunk_scores(cache, kb, t0, last, q0, q1, q2, q3, lane):     # q{KJ}..q3: unused"]
    L += [f"    c{i} = min(lane + {i * WL}, {K - 1})" for i in range(KJ)]      # (q is 0 past K)
    for u in range(WL):
        L += [f"    r = kb + min(t0 + {u}, last) * {HK}"]
        L += [f"    a{u} = " + " + ".join(f"q{i} * cache[r + c{i}]" for i in range(KJ))]
    L += ["    " + x for x in reduction_source(WL)]
    L += ["    return a0"]
    scope = {"cuda": cuda, "float32": float32, "min": min}
    exec("\n".join(L), scope)                          # noqa: S102  (generated, no input)
    return cuda.jit(device=True)(scope["chunk_scores"])


@functools.lru_cache(maxsize=None)
def make_warp_attention(D: int, H: int, L: int, T: int, Sq: int):
    """The attention stage with one **warp** an item (row, head) instead of a block -- the
    arguments and results of :func:`make_attention`'s, for batch passes with many items (a block
    an item at batch 32 ran its 384 items in three rounds, each a dozen barriers deep).  Lane
    ``j`` adds up the head's q, k, v of columns ``j, j + WL, ...`` (keeping its q in registers),
    stores k and v in the cache, then the warp takes the positions ``WL`` at a time: their scores
    (:func:`_make_chunk_scores`: lane ``u`` ends with position ``t0 + u``'s), an online softmax
    through shuffles (the chunk's maximum, the running total rescaled), and every lane adds the
    chunk's weighted values of its columns position by position (each weight shuffled from its
    lane; the value rows read coalesced).  Every warp runs the same number of rounds (shuffles are
    uniform over the block; items past ``B * H`` compute nothing).  Needs 32-lane warps."""
    K = D // H
    KJ = -(-K // WL)                  # a lane's columns
    head_input = _make_head_input(D, H, L, T, Sq)
    assert WL == 32 and KJ <= 4
    chunk_scores = _make_chunk_scores(K, H * K)

    @cuda.jit(device=True)
    def attention(Wt, bias_off, part, cache, l, index, B, ctx, q, scores, pv, fbuf):
        tid = cuda.threadIdx.x
        lane = tid % WL
        warp = tid // WL
        pos = index - 1
        nwarps = cuda.gridDim.x * NW
        acc = cuda.local.array(KJ, float32)
        qr = cuda.local.array(4, float32)
        for r in range((B * H + nwarps - 1) // nwarps):
            item = r * nwarps + cuda.blockIdx.x * NW + warp
            live = item < B * H
            b = item // H if live else 0
            hh = item % H if live else 0
            kbase = (b * L + l) * 2 * T * H * K
            vbase = kbase + T * H * K
            for j in range(4):
                qr[j] = float32(0)
            for j in range(KJ):
                d = lane + j * WL
                acc[j] = float32(0)
                if live and d < K:
                    qr[j] = head_input(Wt, bias_off, part, cache, l, pos, B, b, hh, d)
            cuda.syncthreads()                         # this position's k and v visible
            top = float32(-math.inf)
            total = float32(0)
            for t0 in range(0, index, WL):
                sc = chunk_scores(cache, kbase + hh * K, t0, pos, qr[0], qr[1], qr[2], qr[3], lane)
                valid = live and t0 + lane < index
                if not valid:
                    sc = float32(-math.inf)
                m = sc
                for w in (16, 8, 4, 2, 1):
                    m = max(m, cuda.shfl_xor_sync(0xFFFFFFFF, m, w))
                m_new = max(top, m)
                alpha = math.exp(top - m_new) if live else float32(0)
                e = math.exp(sc - m_new) if valid else float32(0)
                psum = e
                for w in (16, 8, 4, 2, 1):
                    psum += cuda.shfl_xor_sync(0xFFFFFFFF, psum, w)
                total = total * alpha + psum
                top = m_new
                for j in range(KJ):
                    acc[j] *= alpha
                for u in range(WL):
                    p = cuda.shfl_xor_sync(0xFFFFFFFF, e, lane ^ u)      # lane u's weight
                    if live and t0 + u < index:
                        vp = vbase + ((t0 + u) * H + hh) * K
                        for j in range(KJ):
                            d = lane + j * WL
                            if d < K:
                                acc[j] += p * cache[vp + d]
            for j in range(KJ):
                d = lane + j * WL
                if live and d < K:
                    ctx[b * D + hh * K + d] = acc[j] / total
    return attention


# ----------------------------------------------------------------------------- softmax
class Softmax(NamedTuple):
    slices: object                    # (B) -> nsl: slices a row (as many as the grid has blocks a row)
    maxima: object                    # (logits, params_f, B, nsl, gpart, fbuf)
    sums: object                      # (logits, params_f, B, nsl, probs, gpart, fbuf)
    normalise: object                 # (probs, B, nsl, gpart, gidx, dbuf, ibuf)


@functools.lru_cache(maxsize=None)
def make_softmax(V: int, greedy: bool) -> Softmax:
    """``probs = softmax(logits / temperature)`` (``temperature = params_f[0]``) over the grid,
    each row's vocabulary in ``nsl`` slices, a block a slice (item ``b * nsl + j``: row ``b``'s
    slice ``j``); ``gpart [3, B, nsl]`` holds the slices' maxima, sums and (``greedy``) largest
    probabilities, ``gidx [B, nsl]`` the tokens of those.  The three steps need a grid
    synchronisation between them (each reads the partials of every slice of its row)."""
    NT = THREADS
    row = _rows.row_functions(np.float32)

    @cuda.jit(device=True)
    def slices(B):
        return max(1, min(cuda.gridDim.x // B, (V + NT - 1) // NT))

    @cuda.jit(device=True)
    def maxima(logits, params_f, B, nsl, gpart, fbuf):
        # gpart[0, b, j] = max of slice j of logits[b] / temperature
        temperature = float32(params_f[0])
        sl = (V + nsl - 1) // nsl
        item = cuda.blockIdx.x
        while item < B * nsl:
            b = item // nsl
            lo = (item % nsl) * sl
            hi = min(V, lo + sl)
            top = row.scaled_max(logits, b * V + lo, b * V + hi, temperature, NT, fbuf)
            if cuda.threadIdx.x == 0:
                gpart[item] = top
            item += cuda.gridDim.x

    @cuda.jit(device=True)
    def sums(logits, params_f, B, nsl, probs, gpart, fbuf):
        # probs = exp(logits / temperature - the row's maximum); gpart[1, b, j] = slice j's sum
        temperature = float32(params_f[0])
        sl = (V + nsl - 1) // nsl
        gsz = B * nsl
        item = cuda.blockIdx.x
        while item < gsz:
            b = item // nsl
            lo = (item % nsl) * sl
            hi = min(V, lo + sl)
            top = float32(-math.inf)
            for jj in range(nsl):
                top = max(top, gpart[b * nsl + jj])
            esum = row.exp_sum(logits, b * V + lo, b * V + hi, temperature, top, probs, NT, fbuf)
            if cuda.threadIdx.x == 0:
                gpart[gsz + item] = esum
            item += cuda.gridDim.x

    @cuda.jit(device=True)
    def normalise(probs, B, nsl, gpart, gidx, dbuf, ibuf):
        # probs /= the row's total (its slices' sums in order); greedy: each slice's first maximum
        sl = (V + nsl - 1) // nsl
        gsz = B * nsl
        tid = cuda.threadIdx.x
        item = cuda.blockIdx.x
        while item < gsz:
            b = item // nsl
            lo = (item % nsl) * sl
            hi = min(V, lo + sl)
            total = float32(0)
            for jj in range(nsl):
                total += gpart[gsz + b * nsl + jj]
            row.divide(probs, b * V + lo, b * V + hi, total, NT)
            if greedy:
                cuda.syncthreads()
                if hi > lo:
                    at = row_argmax(probs[b * V + lo:b * V + hi], hi - lo, dbuf, ibuf)
                    if tid == 0:
                        gidx[item] = lo + at
                        gpart[2 * gsz + item] = probs[b * V + lo + at]
                elif tid == 0:                             # an empty slice (V < nsl * sl)
                    gidx[item] = 0
                    gpart[2 * gsz + item] = float32(-math.inf)
            item += cuda.gridDim.x

    return Softmax(slices, maxima, sums, normalise)


# ----------------------------------------------------------------------------- sample
class Sample(NamedTuple):
    sample: object                    # (probs, params_f, params_i, index, B, nsl, gpart, gidx, wts,
                                      #  cidx, cval, keep, svals, sidx, dbuf, ibuf, tokens, pmask,
                                      #  stop_ids, state_i)
    advance: object                   # (state_i, index, B, stop_ids)


@functools.lru_cache(maxsize=None)
def make_sample(V: int, sampler: str) -> Sample:
    """The sample stage (one block a row) and the step's end (:class:`Sample`).

    ``sampler``: ``"greedy"`` (the first maximum: the slices' first maxima from the softmax, in
    slice order), ``"random"``, ``"top_k"``, ``"top_p"``, ``"min_p"`` (their weights in float64,
    ``wts[b]``, then :func:`.sampling.row_choose` with the Philox uniform of (the row's seed,
    position)).  ``params_f = (temperature, p, min_p)``, ``params_i = (k, then each row's seed
    as its low and high words)``
    (``k``: top-k's k, top-p's candidate cut, min-p's tokens to keep).  ``state_i``: ``[0]`` the
    position to decide, ``[1]`` rows finished, ``[2]`` stop flag, ``[3]`` 1 + a row whose weights
    could not be sampled, ``[4 + b]`` row ``b`` has stopped."""
    greedy = sampler == "greedy"
    top_k = sampler == "top_k"
    top_p = sampler == "top_p"
    min_p = sampler == "min_p"

    @cuda.jit(device=True)
    def first_maximum(gpart, gidx, b, nsl, gsz):
        token = gidx[b * nsl]
        best = gpart[2 * gsz + b * nsl]
        for jj in range(1, nsl):
            if gpart[2 * gsz + b * nsl + jj] > best:
                best = gpart[2 * gsz + b * nsl + jj]
                token = gidx[b * nsl + jj]
        return token

    @cuda.jit(device=True)
    def draw(prow, b, index, params_f, params_i, wrow, cidx, cval, keep, svals, sidx, dbuf, ibuf):
        # the sampler's weights of row b's probabilities, then its choice (-1: not a distribution)
        if top_p:
            row_top_p(prow, V, params_f[1], min(params_i[0], V), wrow, svals, sidx, svals.shape[0], ibuf)
        elif min_p:
            row_min_p(prow, V, params_f[2], params_i[0], keep, wrow, dbuf, ibuf)
        elif top_k:
            row_top_k_weights(prow, V, params_i[0], keep, wrow, ibuf)
        else:
            for j in range(cuda.threadIdx.x, V, cuda.blockDim.x):
                wrow[j] = float64(prow[j])
        cuda.syncthreads()
        u = philox_uniform(params_i[1 + 2 * b], params_i[2 + 2 * b], 0, index, 0)
        return row_choose(wrow, V, u, cidx, cval, ibuf)

    @cuda.jit(device=True)
    def record(token, b, index, tokens, pmask, stop_ids, state_i):
        # (one thread) the token goes to position index unless the prompt has one there
        if token < 0:
            state_i[3] = b + 1                       # an invalid distribution
            token = 0
        if pmask[b, index] == 0:
            tokens[b, index] = token
            for i in range(stop_ids.shape[0]):
                if token == stop_ids[i] and state_i[4 + b] == 0:
                    state_i[4 + b] = 1
                    cuda.atomic.add(state_i, 1, 1)

    @cuda.jit(device=True)
    def sample(probs, params_f, params_i, index, B, nsl, gpart, gidx, wts, cidx, cval, keep, svals, sidx,
               dbuf, ibuf, tokens, pmask, stop_ids, state_i):
        b = cuda.blockIdx.x
        while b < B:
            if greedy:
                token = first_maximum(gpart, gidx, b, nsl, B * nsl)
            else:
                token = draw(probs[b * V:(b + 1) * V], b, index, params_f, params_i, wts[b], cidx[b],
                             cval[b], keep[b], svals[b], sidx[b], dbuf, ibuf)
            if cuda.threadIdx.x == 0:
                record(token, b, index, tokens, pmask, stop_ids, state_i)
            cuda.syncthreads()
            b += cuda.gridDim.x

    @cuda.jit(device=True)
    def advance(state_i, index, B, stop_ids):
        # block 0: the next position; stop once every row has produced a stop token
        if cuda.blockIdx.x == 0 and cuda.threadIdx.x == 0:
            state_i[0] = index + 1
            if stop_ids.shape[0] > 0 and state_i[1] >= B:
                state_i[2] = 1

    return Sample(sample, advance)
