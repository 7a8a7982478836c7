"""One decode step of OPT compiled whole: every decoder layer, the final norm and the tied LM head
for one new token per row, in ONE compiled call and at most one parallel region (the Numba
backend's ``decode_step``; a short prompt's prefill runs through it too, its tokens as rows).

Why a fused step: a decode step multiplies a few rows by every weight once.  Run op by op it is
about 25 Python-level calls per layer and a parallel region per product; the Python costs as much
as streaming the weights of a small model, and every parallel region is a point where the step
waits for a thread that the operating system may have parked (see :mod:`._threads`).

Where a 125m batch-1 int8 step's time went before this layout (12 layers; 124.6 MB of int8
weights, 38.6 MB of them the tied head; one Numba call per layer and one for the head; a stage ran
on two threads only from 4 MB of weights, so every layer ran on ONE thread and only the head on
two; ``/tmp`` profile, 2026-12-02, load 0.6-7): a step took 4.5 ms (exact int8) and 5.3 ms (int8
activations); a layer's four products 0.19 / 0.09 ms of its 0.20 / 0.11 ms with the weights in
cache (LayerNorms, attention over 19 positions, quantising the activations, the cache writes:
0.013-0.020 ms, 6-12%), the head's product 0.66 / 1.2 ms of 0.67 / 1.2 ms.  So the fixed cost was
not the small ops but streaming 85 MB of layer weights on one thread (~22 GB/s, against a 32-45
GB/s read), 13 Python calls and a parallel region (~14 and ~13 us).  Outside the step, a 32-token
generation spent 15 ms (exact) / 9 ms in the prefill of its 8-token prompt, 7 ms of it an LM head
over every prompt position whose logits were discarded (now skipped, :func:`refopt.generation.prefill`).

Now the step is one call: every stage of every layer is cut into chunks that the threads of ONE
parallel region claim (:mod:`.sync`; 5 stages a layer -- the q/k/v products together with the
cache writes, attention one chunk per (row, group of heads), the output product, fc1, fc2 -- then
the head's two), each thread computing the small per-stage work it needs itself (the LayerNorm of ``x``, the
quantised activations) rather than waiting for one thread to do it.

Each thread streams a contiguous segment of every stage (:mod:`.sync`): when the chunks went to
whichever thread asked next, the two threads' 64 KB reads interleaved and the layers streamed at
21-27 GB/s while the head (one stage of 38.6 MB) reached 36-41.  Measured with segments
(``benchmarks/profile_cpu_step.py --weights int8 w8a8 f32 --runs 3``, 2026-12-02 05:23-05:29 UTC,
load 2.1-2.4, the two-thread read 45-50 GB/s): the best 125m int8 step 3.54-3.63 ms (34-35 GB/s;
exact) and 3.42-3.91 ms (32-37 GB/s; int8 activations), the layers 2.3-3.1 ms (28-38 GB/s), the
head 0.73-0.85 ms (46-53 GB/s); float32 12.5-14.7 ms (34-40 GB/s).  A 32-token generation, per
token: exact int8 4.64-5.08 ms = the steps as run 3.80-4.18, the prompt's prefill 0.50-0.53, the
rest (sampling over 50,272 logits, Python) 0.30-0.37: 197-216 tok/s against a bound of 365-378.
The same A/B in one process (best of 10 steps, median of 4-6 alternations): 5.52 ms = 22.6 GB/s
before (load 2.35), 3.27 ms = 38.0 GB/s after (load 2.1); chunks of 64 KB to 1 MB within 6% of each
other (2.92-3.09 ms, load 1.0).

Before that, with one shared counter per stage (2026-12-02 03:03 UTC, load 1.5-1.6, a two-thread
read of 41-56 GB/s): the best 125m int8 step 4.5-5.1 ms exact / 4.6-5.6 ms with int8 activations
(22-28 GB/s), the layers 3.2-4.0 ms of it (21-27 GB/s: 85 MB in matrices of 0.6-2.4 MB, each stage
10-80 us between waits for the other thread) and the head 0.95-1.3 ms (29-41 GB/s); float32 streams
its 495 MB at 36-38 GB/s.  In a 32-token generation a token took 6.2-8.3 ms: the step as run
5.2-7.0, the prompt's prefill 0.4-0.8, sampling and Python 0.5-0.8.  Alternating with the previous
layout in one sitting (load 1.8-2.1), a generation's median went 93.5-106.5 -> 115.8-148.5 tok/s
(exact int8) and 108.1-134.0 -> 113.2-161.3 (int8 activations).

Greedy decoding runs several steps in one call (:func:`decode_greedy`, up to ``GREEDY_STEPS``):
the same parallel region embeds each step's token, runs the layers and the head, picks every row's
token and commits it as :meth:`refopt.samplers.Sampler.steps` does, then goes on -- no Python, no
new parallel region and no NumPy softmax between tokens.  The pick (:func:`_decide`) is the largest
logit, certain to be the samplers' ``argmax(softmax(logits / temperature))`` unless another logit
lies within rounding of it (then the call stops and the sampler decides that step in NumPy), so
the tokens are those of the step-by-step loop.  Measured in one process, a 32-token greedy
generate after a prompt of 8, NumPy backend / Numba step by step / Numba greedy loop, median of
five alternations (``/tmp`` script, 2026-12-02 10:54-11:00 UTC, load 1.7-2.6, a shared machine
whose two-thread read gave 23-26 GB/s that hour): the bundled model 552 / 1011 / 1393 tok/s at
batch 1 (1.38x from the loop), 1395 / 3702 / 4352 at batch 8 (1.18x); 125m with int8 weights
(NumPy float32) 29.2 / 65.5 / 68.9 (1.05x; the steps themselves took 13 ms a token at that
hour's read); with one core busy 13.6 / 35.5 / 37.2.  In ``benchmarks/profile_cpu_step.py
--compare-loop`` (125m int8, 10:36 UTC, load 2.2) the time a token spent outside the steps and
the prefill went from 0.55-0.62 ms to 0.03.

The arithmetic is :func:`refopt.model.forward` with the KV cache, one token per row, followed by
the LM head (the tests compare it against the NumPy reference), in the activations' dtype:

    x = embed_tokens[token] (@ project_in.T) + embed_positions[position]
    per layer (pre-LN; post-LN normalises after each residual sum instead):
        q, k, v = LN1(x) @ [Wq, Wk, Wv].T + b   (q times head_dim**-0.5; k, v into the cache)
        x += softmax(q . K[:index+1] masked) V @ Wo.T + bo
        x += relu(LN2(x) @ W1.T + b1) @ W2.T + b2
    hidden = final LN(x) (@ project_out.T);  logits = hidden @ embed_tokens.T

Weights are read as stored: float32/float64 arrays, or a QuantizedMatrix's data -- bfloat16 bits
as uint16, float16 bits as int16 (Numba has no float16 type on the CPU; the two views keep the
kinds apart at compile time), int8 with a float32 scale per output row (and, with int8
activations, its row sums: :mod:`.int8`).  Products are :mod:`.matmul`'s and :mod:`.int8`'s.
"""

from __future__ import annotations

import weakref

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from refopt.kernels.cpu._threads import governor
from refopt.kernels.cpu.int8 import quantize_rows, quantized_range
from refopt.kernels.cpu.lanes import BLOCK, axpy, axpys, dot, dots, prefetch
from refopt.kernels.cpu.layernorm import layernorm_serial
from refopt.kernels.cpu.matmul import CHUNK, PARALLEL_BYTES, float_range, readonly, stored, widen
from refopt.kernels.cpu.sync import claim, counters, done, left, wait

# ----------------------------------------------------------------------------- small ops
GOVERNOR_START_BYTES = 1 << 24   # a step reading this many weight bytes starts on every thread


@njit(cache=True)
def _copy(src, dst):
    # dst [M, D] <- src (a loop: slice assignment compiles Numba's broadcasting machinery)
    for m in range(src.shape[0]):
        for d in range(src.shape[1]):
            dst[m, d] = src[m, d]


@njit(cache=True)
def _layernorm_rows(x, gamma, beta, eps, y):
    # y [M, D] <- LayerNorm of each row of x [M, D] (:mod:`.layernorm`'s serial kernel; the flags
    # are typed booleans, not literals, so it compiles once)
    affine = x.shape[1] >= 0
    layernorm_serial(x, gamma, beta, affine, affine, eps, y)


AHEAD_BYTES = 16384     # how far ahead of its reads the decode attention prefetches the cache


@njit(fastmath=False, cache=True)
def _attend_heads(qkv, cache, layer, index, causal, key_mask, probs, ctx, r, b, h0, h1):
    # heads h0..h1 of step row r: each head's query (qkv[r, :D], heads side by side) against keys
    # 0..index of the layer's cache row b -> ctx[r, h0 * K:h1 * K]; the keys past ``causal`` and
    # those key_mask[b] masks score the dtype's lowest finite number (a fully masked row is uniform
    # over keys 0..index and finite, as the reference's).  A decode step's rows are its batch rows
    # (r == b, causal == index); a prompt's, its tokens (causal: the token's own index).
    #
    # The keys and values are walked in memory order: the cache holds a key's heads side by side
    # ([t, h, d]), so key t of heads h0..h1 is one run of (h1 - h0) * K values, and the runs of
    # successive keys follow each other.  Walked head by head (a 256-byte piece every 3 KB at
    # 125m), the prefetcher did not follow, and the cache -- evicted by the weights every step --
    # came from memory a line at a time; each thread now also prefetches the keys AHEAD_BYTES
    # ahead.  The scores are :func:`.lanes.dot`'s (sums in a fixed order of 16 lanes, vector
    # instructions; Numba had compiled the plain loops to scalar code) and the context sums
    # :func:`.lanes.axpy`'s, taken over t = 0..index in order -- BLOCK keys a call
    # (:func:`.lanes.dots`, :func:`.lanes.axpys`: the same bits, the keys' lane reductions side by
    # side and the context in registers), the keys past the last whole block one by one.
    # Measured (session 19, AMD EPYC Zen 3, AVX2; 125m int8, batch 1): one thread's six heads of
    # a layer, 73 / 191 keys, in cache 46.0 / 104.4 -> 27.6 / 49.8 us, from memory 110.8 / 215.2
    # -> 91.3 / 163.7 us (``/tmp`` script, medians of 15; scores and contexts bit for bit the
    # same); the attention stage of a two-thread decode step (medians over the 12 layers, 20
    # steps; three alternations of the code before and after) 47.6-64.7 -> 33.3-42.7 us at
    # index 72, 122.1-134.3 -> 88.0-107.3 us at index 190.
    #
    # Measured (2026-12-02, AMD EPYC Zen 4, two cores): 12 heads x 481 keys of one layer in cache,
    # one thread, 112 us (19 ns a key and head); 12 layers' caches from memory, 3.05 ms walked in
    # order without prefetching, 2.06 with (``/tmp`` scripts).  A whole 125m batch-1 step,
    # ``benchmarks/bench_decode_context.py`` (medians of six rounds, the code before and after
    # alternated twice): float32 21.6 / 23.2 -> 43.1 / 35.5 tok/s at 1,501 keys, 0.87 / 0.75x the
    # NumPy backend's step -> 1.76 / 1.44x; int8 weights 27.8 / 27.4 -> 89.2 / 57.2 tok/s; at 21
    # keys as before.
    H, K = cache.shape[4], cache.shape[5]
    lowest = np.finfo(qkv.dtype).min
    zero = qkv.dtype.type(0)
    AHEAD = max(1, AHEAD_BYTES // max(1, (h1 - h0) * K * cache.itemsize))      # keys
    for t0 in range(0, index + 1, BLOCK):             # the scores, BLOCK keys at a time
        for t in range(t0 + AHEAD, min(t0 + BLOCK + AHEAD, index + 1)):
            prefetch(cache, (b, layer, 0, t, h0, 0), (h1 - h0) * K)
        if t0 + BLOCK <= index + 1:
            for h in range(h0, h1):
                dots(qkv, (r, h * K), cache, (b, layer, 0, t0, h, 0), K, H * K, probs, (r * H + h, t0))
        else:
            for t in range(t0, index + 1):
                for h in range(h0, h1):
                    probs[r * H + h, t] = dot(qkv, (r, h * K), cache, (b, layer, 0, t, h, 0), K)
    for h in range(h0, h1):                            # softmax
        p = probs[r * H + h]
        top = lowest
        for t in range(index + 1):
            if t > causal or not key_mask[b, t]:
                p[t] = lowest
            top = max(top, p[t])
        total = zero
        for t in range(index + 1):
            p[t] = np.exp(p[t] - top)
            total += p[t]
        for t in range(index + 1):
            p[t] = p[t] / total
        for d in range(K):
            ctx[r, h * K + d] = 0
    for t0 in range(0, index + 1, BLOCK):             # the values, BLOCK keys at a time
        for t in range(t0 + AHEAD, min(t0 + BLOCK + AHEAD, index + 1)):
            prefetch(cache, (b, layer, 1, t, h0, 0), (h1 - h0) * K)
        if t0 + BLOCK <= index + 1:
            for h in range(h0, h1):
                axpys(probs, (r * H + h, t0), cache, (b, layer, 1, t0, h, 0), H * K, ctx, (r, h * K), K)
        else:
            for t in range(t0, index + 1):
                for h in range(h0, h1):
                    wt = probs[r * H + h, t]
                    if wt != 0:
                        axpy(wt, cache, (b, layer, 1, t, h, 0), ctx, (r, h * K), K)


# ----------------------------------------------------------------------------- the step
# The whole step runs in ONE parallel region (or on the calling thread alone), its work cut into
# stages of chunks that the threads claim (:mod:`.sync`).  The weights reach it as addresses
# (``addr [L, COLS]``, ``head [HEAD_COLS]``, taken when the plan is made; the plan keeps the arrays
# alive) viewed in place with ``numba.carray``: a step is one compiled call with a dozen arguments,
# not a tuple of 22 arrays per layer for the dispatcher to type on every call.
LN1_G, LN1_B, LN2_G, LN2_B = 0, 1, 2, 3
Q, K_, V_, O_, FC1, FC2 = 0, 1, 2, 3, 4, 5   # projection p's slots: 4 + 4p + (W, S, R, B)
W_, S_, R_, B_ = 0, 1, 2, 3
COLS = 28
FINAL_G, FINAL_B, OUT, TABLE = 0, 1, 2, 6     # the head's: the final norm, project_out, the table
HEAD_COLS = 10
CHUNK_BYTES = 1 << 16   # weight bytes a chunk of a product reads (rows // 2 times fewer from 4 rows)


@intrinsic
def _pointer(typingctx, addr, like):
    # the address ``addr`` (int64) as a pointer to ``like``'s dtype
    ptr = types.CPointer(like.dtype)
    sig = ptr(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return sig, codegen


@njit(cache=True)
def _vec(addr, n, like):
    return numba.carray(_pointer(addr, like), n)


@njit(cache=True)
def _mat(addr, rows, cols, like):
    return numba.carray(_pointer(addr, like), (rows, cols))


def _scales(s_like, s, r, n):
    """A product's scales viewed like ``s_like``: empty (float weights), int8 scales, or (int8
    scales, row sums) with quantised activations."""


@overload(_scales)
def _scales_impl(s_like, s, r, n):
    if isinstance(s_like, types.BaseTuple):
        return lambda s_like, s, r, n: (_vec(s, n, s_like[0]), _vec(r, n, s_like[1]))
    return lambda s_like, s, r, n: _vec(s, n, s_like)


def _prepare(x, s_like, xq, sx):
    """Quantise the rows of ``x`` into ``xq``/``sx`` for products with quantised activations."""


@overload(_prepare)
def _prepare_impl(x, s_like, xq, sx):
    if isinstance(s_like, types.BaseTuple):
        return lambda x, s_like, xq, sx: quantize_rows(x, xq, sx)
    return lambda x, s_like, xq, sx: None


def _range(x, xq, sx, w, scale, bias, out, col, mode, alpha, o0, o1, rawf, rawi):
    """Outputs ``o0..o1`` of a product into ``out`` (:func:`.matmul.float_range`, or
    :func:`.int8.quantized_range` on the rows :func:`_prepare` quantised)."""


@overload(_range)
def _range_impl(x, xq, sx, w, scale, bias, out, col, mode, alpha, o0, o1, rawf, rawi):
    if isinstance(scale, types.BaseTuple):
        return (lambda x, xq, sx, w, scale, bias, out, col, mode, alpha, o0, o1, rawf, rawi:
                quantized_range(xq, sx, w, scale, bias, out, col, mode, alpha, o0, o1, rawi))
    return (lambda x, xq, sx, w, scale, bias, out, col, mode, alpha, o0, o1, rawf, rawi:
            float_range(x, w, scale, bias, out, col, mode, alpha, o0, o1, rawf))


MAX_CHUNKS = 128        # chunks a stage is cut into at most (the head: 50,272 outputs)


@njit(cache=True)
def _per_chunk(outputs, inputs, itemsize, rows, chunk):
    # outputs per chunk (even): CHUNK_BYTES of weights, fewer when several rows make it compute,
    # more when that would cut the stage into more than MAX_CHUNKS (each claim is an atomic add on
    # a cache line the threads share)
    per = max(2, chunk // (inputs * itemsize * max(1, rows // 2)) // 2 * 2)
    return max(per, ((outputs + MAX_CHUNKS - 1) // MAX_CHUNKS + 1) // 2 * 2)


@njit(cache=True)
def _quantized_view(xq_all, sx_all, tid, B, I):
    # this thread's quantised rows [B, I] (C-contiguous; xq_all is flat, one part per thread) and
    # scales [B]
    per = xq_all.shape[0] // sx_all.shape[0]
    return xq_all[tid * per:tid * per + B * I].reshape((B, I)), sx_all[tid]


@njit(cache=True)
def _projection(a, lens, j, rows, cols, w_like, s_like, f_like):
    # projection j of a layer's address row ``a``: (weights [rows, cols], scales, bias)
    base = 4 + 4 * j
    return (_mat(a[base + W_], rows, cols, w_like), _scales(s_like, a[base + S_], a[base + R_], lens[2 * j]),
            _vec(a[base + B_], lens[2 * j + 1], f_like))


@njit(cache=True)
def _stage_input(src, normed, gamma, beta, eps, xn, s_like, tid, xq_all, sx_all, sync, s, O, I,
                 itemsize, chunk):
    # a product stage's input, prepared by each thread for itself: LN(src) (in xn) when
    # ``normed``, else src, and its int8 view where activations are quantised; ``(input, xq, sx,
    # outputs per chunk, chunks)`` for O outputs of I inputs
    B = src.shape[0]
    per = _per_chunk(O, I, itemsize, B, chunk)
    n = (O + per - 1) // per
    xq, sx = _quantized_view(xq_all, sx_all, tid, B, I)
    inp = xn if normed else src
    if left(sync, s, n, sx_all.shape[0]):  # a thread that arrives late skips what it cannot use
        if normed:
            _layernorm_rows(src, gamma, beta, eps, xn)
        _prepare(inp, s_like, xq, sx)
    return inp, xq, sx, per, n


@njit(cache=True)
def _product_stage(src, normed, gamma, beta, eps, xn, w, sc, bias, out, mode, alpha, s_like, tid,
                   xq_all, sx_all, rawf, rawi, sync, s, chunk):
    # stage s: out <- epilogue(input @ w.T + bias) in chunks of outputs, the input LN(src) (each
    # thread its own, in xn) when ``normed``, else src; returns the next stage
    O, I = w.shape
    inp, xq, sx, per, n = _stage_input(src, normed, gamma, beta, eps, xn, s_like, tid, xq_all, sx_all,
                                       sync, s, O, I, w.itemsize, chunk)
    parts = sx_all.shape[0]                # the threads the work is cut for
    k = 0
    c = claim(sync, s, n, tid, parts)
    while c >= 0:
        _range(inp, xq, sx, w, sc, bias, out, 0, mode, alpha, c * per, min(O, (c + 1) * per), rawf, rawi)
        k += 1
        c = claim(sync, s, n, tid, parts)
    done(sync, s, parts, k)
    wait(sync, s, n, parts)
    return s + 1


@njit(cache=True)
def _layers_and_head(tid, x, addr, lens, head, head_lens, w_like, s_like, f_like, dims, cache, index,
                     key_mask, pre_ln, eps, alpha, qkv, ctx, h, probs, hidden, logits, xt, xn_all,
                     xq_all, sx_all, rawf_all, rawi_all, sync, s):
    """Thread ``tid``'s share of one decode step (every layer, then the head) from stage ``s``,
    ``x [B, D]`` updated in place; returns the next stage.  Row r of ``x`` is token r % S of
    cache row r // S (S = B / the cache's rows), at cache index ``index + r % S`` (S = 1: a
    decode step's batch rows, S > 1: a prompt's tokens, whose keys and values are all written
    before any row attends).  ``addr``/``lens``/``head``/``head_lens``: the weights' addresses and
    vector lengths (see :class:`_Plan`), viewed like ``w_like`` (matrices), ``s_like`` (scales)
    and ``f_like`` (vectors); ``dims``: (F, E, V, has_final, has_out,
    chunk bytes), V = 0 for no logits.  Shared scratch: qkv
    [B, 3D], ctx [B, D], h [B, F], probs [B * H, T], xt [B, D]; per thread (first index
    ``tid``): xn_all [P, B, D], xq_all [P * B * max(D, F, E)] uint8, sx_all [P, B],
    rawf_all [P, B, CHUNK], rawi_all [P, B, CHUNK] int64; ``sync``: the stages' counters.
    Reading ``x`` while another thread adds to it cannot happen: a stage's chunks are claimed
    only while the stage is unfinished, and ``x`` changes only in later stages."""
    B, D = x.shape
    H, K = cache.shape[4], cache.shape[5]
    F, E, V, has_final, has_out = dims[0], dims[1], dims[2], dims[3] != 0, dims[4] != 0
    chunk = dims[5]
    S = B // cache.shape[0]                            # tokens a cache row (1: a decode step)
    one = x.dtype.type(1)
    STORE, RELU, ADD = np.int64(0), np.int64(1), np.int64(2)
    xn, rawf, rawi = xn_all[tid], rawf_all[tid], rawi_all[tid]
    parts = xn_all.shape[0]                            # the threads the work is cut for
    for layer in range(addr.shape[0]):
        a, n_ = addr[layer], lens[layer]
        g1, b1 = _vec(a[LN1_G], D, f_like), _vec(a[LN1_B], D, f_like)
        g2, b2 = _vec(a[LN2_G], D, f_like), _vec(a[LN2_B], D, f_like)
        # --- q, k, v: chunks of the 3D outputs of the three products, keys and values to the cache
        inp, xq, sx, per, n = _stage_input(x, pre_ln, g1, b1, eps, xn, s_like, tid, xq_all, sx_all,
                                           sync, s, 3 * D, D, w_like.itemsize, chunk)
        k = 0
        c = claim(sync, s, n, tid, parts)
        while c >= 0:
            j0, j1 = c * per, min(3 * D, (c + 1) * per)
            for part in range(3):
                o0, o1 = max(j0 - part * D, 0), min(j1 - part * D, D)
                if o0 < o1:
                    w, sc, bias = _projection(a, n_, part, D, D, w_like, s_like, f_like)
                    _range(inp, xq, sx, w, sc, bias, qkv, part * D, STORE, alpha if part == 0 else one,
                           o0, o1, rawf, rawi)
                    if part > 0:
                        for r in range(B):             # row r: cache row r // S, index + r % S
                            for o in range(o0, o1):
                                cache[r // S, layer, part - 1, index + r % S, o // K, o % K] = qkv[r, part * D + o]
            k += 1
            c = claim(sync, s, n, tid, parts)
        done(sync, s, parts, k)
        wait(sync, s, n, parts)
        s += 1
        # --- attention: one chunk per (row, group of heads), groups enough for every thread
        G = min(H, max(1, parts // B))
        n = B * G
        k = 0
        c = claim(sync, s, n, tid, parts)
        while c >= 0:
            g, r = c % G, c // G
            at = index + r % S                           # row r's own index
            last = at                                    # the last key it reads; no key allowed:
            if S > 1 and not key_mask[r // S, :at + 1].any():
                last = index + S - 1                     # uniform over them all
            _attend_heads(qkv, cache, layer, last, at, key_mask, probs, ctx, r, r // S, g * H // G,
                          (g + 1) * H // G)
            k += 1
            c = claim(sync, s, n, tid, parts)
        done(sync, s, parts, k)
        wait(sync, s, n, parts)
        s += 1
        # --- the output projection, added to x; post-LN: x = LN1(x)
        w, sc, bias = _projection(a, n_, O_, D, D, w_like, s_like, f_like)
        s = _product_stage(ctx, False, g1, b1, eps, xn, w, sc, bias, x, ADD, one, s_like, tid, xq_all,
                           sx_all, rawf, rawi, sync, s, chunk)
        if not pre_ln:
            s = _norm_stage(x, g1, b1, eps, xt, sync, s, tid, parts)
        # --- h = relu(LN2(x) @ W1.T + b1); x += h @ W2.T + b2; post-LN: x = LN2(x)
        w, sc, bias = _projection(a, n_, FC1, F, D, w_like, s_like, f_like)
        s = _product_stage(x, pre_ln, g2, b2, eps, xn, w, sc, bias, h, RELU, one, s_like, tid, xq_all,
                           sx_all, rawf, rawi, sync, s, chunk)
        w, sc, bias = _projection(a, n_, FC2, D, F, w_like, s_like, f_like)
        s = _product_stage(h, False, g2, b2, eps, xn, w, sc, bias, x, ADD, one, s_like, tid, xq_all,
                           sx_all, rawf, rawi, sync, s, chunk)
        if not pre_ln:
            s = _norm_stage(x, g2, b2, eps, xt, sync, s, tid, parts)
    # --- the head: hidden = final LN(x) (@ project_out.T), logits = hidden @ table.T
    fg, fb = _vec(head[FINAL_G], D, f_like), _vec(head[FINAL_B], D, f_like)
    nobias = _vec(head[FINAL_G], 0, f_like)
    if has_out:
        w = _mat(head[OUT + W_], E, D, w_like)
        sc = _scales(s_like, head[OUT + S_], head[OUT + R_], head_lens[0])
        s = _product_stage(x, has_final, fg, fb, eps, xn, w, sc, nobias, hidden, STORE, one, s_like, tid,
                           xq_all, sx_all, rawf, rawi, sync, s, chunk)
    else:                                              # one thread writes hidden
        if claim(sync, s, 1, tid, parts) == 0:
            if has_final:
                _layernorm_rows(x, fg, fb, eps, hidden)
            else:
                _copy(x, hidden)
            done(sync, s, parts, 1)
        wait(sync, s, 1, parts)
        s += 1
    w = _mat(head[TABLE + W_], V, E, w_like)
    sc = _scales(s_like, head[TABLE + S_], head[TABLE + R_], head_lens[1])
    return _product_stage(hidden, False, fg, fb, eps, xn, w, sc, nobias, logits, STORE, one, s_like, tid,
                          xq_all, sx_all, rawf, rawi, sync, s, chunk)


def _int8_scales(sc):
    """The per-row scales of a product's scales (empty for float weights)."""


@overload(_int8_scales)
def _int8_scales_impl(sc):
    if isinstance(sc, types.BaseTuple):
        return lambda sc: sc[0]
    return lambda sc: sc


@njit(cache=True)
def _embed(table, sw, token, positions, position, x, b):
    # x[b] <- the token's row of the table (times its int8 scale) + the position's row: the
    # arithmetic of ``decode_step``'s NumPy lines (QuantizedMatrix.rows_float32, then the sum in
    # the two arrays' common dtype, stored in x's)
    for d in range(x.shape[1]):
        e = widen(table[token, d])
        if sw.shape[0] > 0:
            e = e * sw[token]
        x[b, d] = x.dtype.type(e) + positions[position, d]


@njit(cache=True)
def _scan(logits, b, o0, o1, part):
    # part <- (largest, the next smaller one (-inf: none), 1.0 when all are finite else 0.0, the
    # first index of the largest; -1 for no logits) of logits[b, o0:o1]
    if o0 >= o1:
        part[0], part[1], part[2], part[3] = -np.inf, -np.inf, 1.0, -1.0
        return
    top = logits[b, o0]
    at = o0
    second = -np.inf
    finite = True
    for j in range(o0, o1):
        v = logits[b, j]
        if not np.isfinite(v):
            finite = False
        if v > top:
            second = top
            top = v
            at = j
        elif v < top and v > second:
            second = v
    part[0], part[1], part[2], part[3] = top, second, 1.0 if finite else 0.0, at


@njit(cache=True)
def _decide(parts, like, temperature):
    """A row's greedy token from the :func:`_scan` of its consecutive ranges (``parts [R, 4]``)
    and whether it is certainly the one the samplers' NumPy path chooses (``argmax(softmax(logits
    / temperature))`` in the logits' dtype -- ``like``'s -- ties to the first index): (first index
    of the largest logit, True) when every logit is finite and the next smaller one, divided by
    the temperature, lies at least 1e-5 below the largest after the softmax's subtraction -- then
    every other probability is at most (1 - 1e-5) / sum, several roundings below the largest,
    1 / sum, and exact ties stay ties.  Else (.., False): the caller decides on the NumPy path."""
    top = -np.inf
    at = -1.0
    second = -np.inf
    finite = True
    for j in range(parts.shape[0]):
        if parts[j, 2] == 0.0:
            finite = False
        if parts[j, 3] < 0:
            continue
        t = parts[j, 0]
        if at < 0 or t > top:
            if at >= 0:
                second = max(second, top)
            top = t
            at = parts[j, 3]
        elif t < top:
            second = max(second, t)
        second = max(second, parts[j, 1])
    token = np.int64(at)
    if not finite:
        return token, False
    if second == -np.inf:                              # every logit equal: the first one
        return token, True
    y_top = like.dtype.type(top) / temperature
    gap = (like.dtype.type(second) / temperature) - y_top
    return token, gap < -1e-5


@njit(cache=True)
def _pick(logits, b, temperature, ranges):
    """Row ``b``'s (token, certain) by :func:`_scan` over ``ranges`` consecutive ranges of the
    logits and :func:`_decide` (as the greedy loop, whose threads scan the ranges)."""
    V = logits.shape[1]
    parts = np.empty((ranges, 4))
    for r in range(ranges):
        _scan(logits, b, r * V // ranges, (r + 1) * V // ranges, parts[r])
    return _decide(parts, logits, temperature)


@njit(cache=True)
def _step_work(tid, x, addr, lens, head, head_lens, w_like, s_like, f_like, dims, cache, index,
               key_mask, pre_ln, eps, alpha, qkv, ctx, h, probs, hidden, logits, xt, xn_all, xq_all,
               sx_all, rawf_all, rawi_all, sync, loop, seq, marks, stop, finished, picks, positions,
               temperature):
    """Thread ``tid``'s share of one decode step (``loop[0] == 0``: every layer, then the head, at
    cache index ``index``, ``x [B, D]`` the fed tokens' embeddings, updated in place), or of up to
    ``loop[0]`` greedy steps (:func:`decode_greedy`): step k feeds ``seq[:, index + k]`` (embedded
    here, into ``x``) at cache index ``index + k``, picks each row's token (:func:`_scan`, :func:`_decide`) and
    commits it at position ``index + k + 1`` as the samplers' loop does (``marks`` bit 1: keep the
    prompt's token there; bit 2: a generated position, where a token of ``stop`` (used when
    ``loop[1]``) finishes the row in ``finished``).  It stops after ``loop[0]`` steps, at the
    sequence's end, when every row has finished (with stop tokens), or at a step whose pick is
    uncertain, its logits left in ``logits``; ``loop[2]`` <- the positions committed, ``loop[3]``
    <- 1 when it stopped uncertain.  ``picks [B, R, 4]`` float64: scratch (each row's logits are
    scanned in R ranges, by any thread).  The other arguments: see
    :func:`_layers_and_head`."""
    steps = loop[0]
    single = steps == 0              # one step: the layers and the head alone (one call site of
    B, T = seq.shape                 # _layers_and_head, which LLVM would otherwise inline twice)
    parts = xn_all.shape[0]
    has_stop = loop[1] != 0
    V, E = dims[2], dims[1]
    table = _mat(head[TABLE + W_], V, E, w_like)
    sw = _int8_scales(_scales(s_like, head[TABLE + S_], head[TABLE + R_], head_lens[1]))
    s = 0
    k = 0
    while True:
        at = index + k                                 # the cache index of step k
        if not single:
            # --- commit step k - 1's choice at position ``at``; embed the token fed now, seq[:, at]
            c = claim(sync, s, B, tid, parts)
            n = 0
            while c >= 0:
                b = c
                if k > 0:
                    token = _decide(picks[b], logits, temperature)[0]
                    if marks[b, at] & 1:
                        token = seq[b, at]
                    if has_stop and (marks[b, at] & 2) and not finished[b]:
                        for j in range(stop.shape[0]):
                            if stop[j] == token:
                                finished[b] = True
                    seq[b, at] = token
                _embed(table, sw, seq[b, at], positions, at, x, b)
                n += 1
                c = claim(sync, s, B, tid, parts)
            done(sync, s, parts, n)
            wait(sync, s, B, parts)
            s += 1
            if k > 0:
                end = k >= steps or at + 1 >= T
                if has_stop and not end:
                    end = True
                    for b in range(B):
                        if not finished[b]:
                            end = False
                if end:
                    break
        s = _layers_and_head(tid, x, addr, lens, head, head_lens, w_like, s_like, f_like, dims, cache,
                             at, key_mask, pre_ln, eps, alpha, qkv, ctx, h, probs, hidden, logits, xt,
                             xn_all, xq_all, sx_all, rawf_all, rawi_all, sync, s)
        if single:
            return
        # --- each row's token: its logits scanned in R ranges (chunks any thread claims)
        R = picks.shape[1]
        c = claim(sync, s, B * R, tid, parts)
        n = 0
        while c >= 0:
            b, r = c // R, c % R
            _scan(logits, b, r * V // R, (r + 1) * V // R, picks[b, r])
            n += 1
            c = claim(sync, s, B * R, tid, parts)
        done(sync, s, parts, n)
        wait(sync, s, B * R, parts)
        s += 1
        unsure = False
        for b in range(B):
            if not _decide(picks[b], logits, temperature)[1]:
                unsure = True
        if unsure:
            if tid == 0:
                loop[3] = 1
            break
        k += 1
    if tid == 0:
        loop[2] = k


@njit(cache=True)
def _norm_stage(x, gamma, beta, eps, xt, sync, s, tid, parts):
    # x <- LN(x) in place by the thread that claims this one-chunk stage; the next stage
    if claim(sync, s, 1, tid, parts) == 0:
        _copy(x, xt)
        _layernorm_rows(xt, gamma, beta, eps, x)
        done(sync, s, parts, 1)
    wait(sync, s, 1, parts)
    return s + 1


@njit(parallel=True, cache=True)
def _step_parallel(parts, x, addr, lens, head, head_lens, w_like, s_like, f_like, dims, cache, index,
                   key_mask, pre_ln, eps, alpha, qkv, ctx, h, probs, hidden, logits, xt, xn_all,
                   xq_all, sx_all, rawf_all, rawi_all, sync, loop, seq, marks, stop, finished, picks,
                   positions, temperature):
    for t in prange(parts):
        _step_work(t, x, addr, lens, head, head_lens, w_like, s_like, f_like, dims, cache, index,
                   key_mask, pre_ln, eps, alpha, qkv, ctx, h, probs, hidden, logits, xt, xn_all,
                   xq_all, sx_all, rawf_all, rawi_all, sync, loop, seq, marks, stop, finished, picks,
                   positions, temperature)


# ----------------------------------------------------------------------------- the op
class _Plan:
    """A model's weights arranged for :func:`_step_work`: their addresses (``addr [L, COLS]``,
    ``head [HEAD_COLS]``) and vector lengths (``lens [L, 12]``: per projection the scales' and
    the bias's; ``head_lens``: project_out's and the table's scales), absent ones replaced
    (gammas by ones, betas by zeros, biases and scales by empty arrays), each matrix as its stored
    data.  ``keep`` holds every array addressed, so the addresses stay valid while the plan
    lives."""

    def __init__(self, params, cfg):
        dtype = np.dtype(cfg.compute_dtype)
        D, L = cfg.hidden_dim, cfg.num_layers
        empty = readonly(np.zeros(0, dtype))                  # read-only, as stored() gives the weights
        ones, zeros = readonly(np.ones(D, dtype)), readonly(np.zeros(D, dtype))
        no_rows = readonly(np.zeros(0, np.int64))
        kinds, keep = set(), []

        def address(a):
            keep.append(a)
            return a.__array_interface__["data"][0]

        def matrix(name, row, col):
            # slots W, S, R of a projection; the scales' length
            data, scale = stored(params[name], dtype)
            kinds.add((data.dtype, type(scale)))
            sw, rows = scale if isinstance(scale, tuple) else (scale, no_rows)
            row[col + W_], row[col + S_], row[col + R_] = address(data), address(sw), address(rows)
            return data, scale, sw.shape[0]

        def vec(name, default):
            v = params.get(name)
            return default if v is None else readonly(np.ascontiguousarray(v, dtype=dtype))

        self.addr = np.zeros((L, COLS), np.int64)
        self.lens = np.zeros((L, 12), np.int64)
        for i in range(L):
            p, row = f"layers.{i}.", self.addr[i]
            row[LN1_G] = address(vec(p + "self_attn_layer_norm.gamma", ones))
            row[LN1_B] = address(vec(p + "self_attn_layer_norm.beta", zeros))
            row[LN2_G] = address(vec(p + "mlp_layer_norm.gamma", ones))
            row[LN2_B] = address(vec(p + "mlp_layer_norm.beta", zeros))
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
                col = 4 + 4 * j
                *_, self.lens[i, 2 * j] = matrix(p + proj + ".weight", row, col)
                bias = vec(p + proj + ".bias", empty)
                row[col + B_] = address(bias)
                self.lens[i, 2 * j + 1] = bias.shape[0]
        self.head = np.zeros(HEAD_COLS, np.int64)
        self.head_lens = np.zeros(2, np.int64)
        self.head[FINAL_G] = address(vec("final_layer_norm.gamma", ones))
        self.head[FINAL_B] = address(vec("final_layer_norm.beta", zeros))
        table, s_table, self.head_lens[1] = matrix("embed_tokens", self.head, TABLE)
        self.w_like, self.s_like, self.f_like = table, s_table, ones
        has_out = bool(cfg.has_projection)
        if has_out:
            *_, self.head_lens[0] = matrix("project_out.weight", self.head, OUT)
        self.E, self.V = table.shape[1], table.shape[0]
        self.dims = np.array([cfg.intermediate_dim, self.E, self.V, bool(cfg.has_final_layer_norm),
                              has_out, CHUNK_BYTES], np.int64)
        self.keep = keep
        self.ok = len(kinds) == 1          # one storage kind throughout (QuantizedMatrix mixes not)
        seen = {}
        for a in keep:                     # the bytes one step reads (each array once)
            seen[id(a)] = a.nbytes
        self.nbytes = sum(seen.values())
        self.dtype = dtype
        self.positions = readonly(np.ascontiguousarray(params["embed_positions"]))
        self.alpha = dtype.type(cfg.head_dim ** -0.5)
        self.cfg = cfg


_plans: dict = {}       # id(params) -> (version, plan), dropped when the parameter dict is freed


def _plan_for(params, cfg):
    """The plan of ``params`` (a :class:`refopt.model.Parameters` keeps it while its version and
    the config are unchanged; a plain dict gets a new one each call)."""
    version = getattr(params, "version", None)
    held = _plans.get(id(params))
    if held is not None and held[0] == version and held[1].cfg == cfg:
        return held[1]
    plan = _Plan(params, cfg)
    if version is not None:
        if held is None:
            weakref.finalize(params, _plans.pop, id(params), None)
        _plans[id(params)] = (version, plan)
    return plan


def _run(plan, cfg, B, threads, x, cache, index, key_mask, dims, hidden, out, stages, loop=None,
         seq=None, marks=None, stop=None, finished=None, temperature=1.0):
    """One call of the compiled step on ``threads`` threads (one parallel region, or the calling
    thread alone); ``loop``...``temperature``: :func:`_step_work`'s greedy loop (None: one step)."""
    dtype = plan.dtype
    D, F, H = cfg.hidden_dim, cfg.intermediate_dim, cfg.num_heads
    T = cache.shape[3]
    E = plan.E
    if loop is None:
        loop, seq, marks, stop = _NO_LOOP, np.zeros((B, 0), np.int64), np.zeros((B, 0), np.uint8), _NO_STOP
        finished = np.zeros(B, np.bool_)
    args = (x, plan.addr, plan.lens, plan.head, plan.head_lens, plan.w_like, plan.s_like, plan.f_like,
            dims, cache, index, key_mask, bool(cfg.do_layer_norm_before), float(cfg.layer_norm_epsilon),
            plan.alpha, np.empty((B, 3 * D), dtype), np.empty((B, D), dtype), np.empty((B, F), dtype),
            np.empty((B * H, T), dtype), hidden, out, np.empty((B, D), dtype),
            np.empty((threads, B, D), dtype), np.empty(threads * B * max(D, F, E), np.uint8),
            np.empty((threads, B), np.float32), np.empty((threads, B, CHUNK), dtype),
            np.empty((threads, B, CHUNK), np.int64), counters(stages, threads), loop, seq, marks, stop,
            finished, np.zeros((B, PICK_RANGES, 4)), plan.positions, dtype.type(temperature))
    if threads == 1:
        _step_work(0, *args)
    else:
        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            _step_parallel(threads, *args)
        finally:
            numba.set_num_threads(before)


PICK_RANGES = 4                            # ranges a row's logits are scanned in (by any thread)
_NO_LOOP = np.zeros(4, np.int64)           # loop[0] == 0: one step, nothing written
_NO_STOP = np.zeros(0, np.int64)


def _governed(plan, key, fn, units=None):
    """``fn(threads)`` on the :class:`._threads.Governor`'s count for ``key`` (at most Numba's
    current count; a plan reading ``GOVERNOR_START_BYTES`` or more starts on all of them)."""
    most = numba.get_num_threads()
    start = most if plan.nbytes >= GOVERNOR_START_BYTES else 1
    return governor.timed(key, most, start, fn, units)


def _stages(cfg):
    # the stages of one step: five a layer (seven post-LN), the head's two
    return cfg.num_layers * (5 if cfg.do_layer_norm_before else 7) + 2


# Rows (batch rows times tokens) of a prompt that the compiled step takes; a longer one goes op by
# op.  Float32/float64 weights: the per-op products of more than 16 rows run on BLAS, which wins
# from ~64 rows; weights stored narrower never go to BLAS.  Measured (session 20, Zen 3, two
# threads, 125m, batch 1, best of 3 per round, two rounds), the compiled step against op by op:
# float32 16 / 32 / 64 / 128 tokens 37.9 / 70.7 / 130.5 / 266.8 ms against 58.6 / 94.1 / 132.3 /
# 206.4; bfloat16 35.1 / 58.8 / 116.9 / 252.3 against 53.1 / 87.4 / 161.9 / 483.4; int8 32.1 /
# 58.4 / 117.2 / 256.3 against 47.0 / 79.4 / 142.5 / 485.2, and 256 tokens 530.6 against 1,033.1.
STEP_ROWS = 32
STORED_STEP_ROWS = 256


def decode_step(params, cfg, token_ids, padding_mask, cache, index, threads=None,
                min_bytes=PARALLEL_BYTES, logits=True):
    """Logits ``[B, S, V]`` and hidden states ``[B, S, E]`` of ``token_ids [B, S]`` at cache
    indices ``index .. index + S`` (``padding_mask [B, >= index + S]``), with the KV cache updated
    in place: :func:`refopt.model.logits_forward` for that call, compiled (``logits=False``: the
    hidden states only, None in the logits' place -- no LM head).  One token per row is a decode
    step; several are a prompt (its prefill), its B * S rows through the same stages as one
    step's rows, each token attending to the keys up to its own (the causal mask).
    ``threads``: the count to run on (default: the :class:`._threads.Governor`'s choice, at most
    Numba's current count); the step runs on them (one parallel region) when its weight bytes
    times max(1, rows // 2) reach ``min_bytes``, else on the calling thread.
    None when this model cannot take the compiled step (weights of mixed storage kinds), for no
    tokens, or for a prompt of more rows than STEP_ROWS (float weights: the per-op path's products
    go to BLAS) or STORED_STEP_ROWS (bfloat16, float16, int8 weights).

    Measured (session 20, AMD EPYC Zen 3 (AVX2), two threads, a 125m int8 model): the prefill of
    an 8-token prompt, op by op (72 products, six per layer, each its own call; q/k/v and the
    output projection on one thread, below the size that a parallel region pays for) 29.5-47.7 ms,
    eight rows through the compiled step 14.6-18.4 ms (``/tmp`` script, four alternations); a
    whole 64-token greedy generate after that prompt, the two prefills alternated in one process
    (median of the rounds' ratios): int8 1.085x (20 rounds, 128.5 -> 137.8 tok/s, faster in 16),
    bfloat16 1.071x (12 rounds), float32 1.029x (12), int8 at batch 2 (16 rows) 1.059x (10)."""
    from refopt.model import positions_from_mask    # (at call time: the model imports the kernels)

    plan = _plan_for(params, cfg)
    B, S = token_ids.shape
    rows = STEP_ROWS if plan.w_like.dtype.kind == "f" else STORED_STEP_ROWS   # a prompt's at most
    if not plan.ok or S < 1 or (S > 1 and B * S > rows):
        return None
    if (cache.shape[:3] != (B, cfg.num_layers, 2) or not 0 <= index <= cache.shape[3] - S
            or np.shape(padding_mask)[1] < index + S):
        return None                    # the reference path names what does not fit
    if threads is None:
        return _governed(plan, (id(plan), B, S, logits), lambda n: decode_step(
            params, cfg, token_ids, padding_mask, cache, index, n, min_bytes, logits))
    M = B * S                                                               # the step's rows
    if threads > 1 and plan.nbytes * max(1, M // 2) < min_bytes:
        threads = 1
    dtype = plan.dtype
    key_mask = np.ascontiguousarray(np.asarray(padding_mask)[:, :index + S], dtype=np.bool_)
    position = positions_from_mask(key_mask)[:, index:].reshape(M)          # as the reference
    tokens = np.asarray(token_ids).reshape(M)
    x = np.asarray(params["embed_tokens"][tokens], dtype)                   # [M, E]
    if cfg.has_projection:
        x = x @ np.asarray(params["project_in.weight"], dtype).T            # [M, D]
    x = np.ascontiguousarray(x + params["embed_positions"][position], dtype=dtype)
    E, V = plan.E, plan.V if logits else 0
    dims = plan.dims
    if not logits:                                  # a head of no rows: the final norm only
        dims = dims.copy()
        dims[2] = 0
    hidden = np.empty((M, E), dtype)
    out = np.empty((M, V), dtype)
    _run(plan, cfg, M, threads, x, cache, index, key_mask, dims, hidden, out, _stages(cfg))
    return (out.reshape(B, S, V) if logits else None), hidden.reshape(B, S, E)


# Greedy steps one call of decode_greedy runs at most.  Between calls the process runs Python and
# the workers sleep (passive waiting, :mod:`._threads`); on this VM a call cost ~3 ms beyond its
# steps (the figures below: 0.28 ms a token at 32 steps, over six calls fewer a generate).
# Measured (session 21, AMD EPYC Zen 3, two threads, 125m, a 64-token greedy generate after a
# prompt of 8; the values alternated in one process, median of the rounds' ratios to 8): int8
# weights 16 steps 1.004x (11 of 20 rounds faster), 32 steps 1.047x (14 of 20; 1.034x, 12 of 16,
# in another sitting), 64 steps 1.054x (11 of 16); with a busy process on one core, 32 steps
# 1.003x (6 of 12); int8 at batch 8 1.034x (6 of 10); bfloat16 1.018x (8 of 12).  The thread
# governor compares counts once per call, so a change of load is followed after a few calls
# (three slow ones): more steps a call follow it later, hence 32, not more.
GREEDY_STEPS = 32


def decode_greedy(params, cfg, seq, prompt_mask, generated, stop, finished, cache, index, temperature=1.0,
                  steps=GREEDY_STEPS, threads=None, min_bytes=PARALLEL_BYTES):
    """Up to ``steps`` greedy decoding steps in one compiled call, as the samplers' loop
    (:meth:`refopt.samplers.Sampler.steps` with a :class:`refopt.samplers.GreedySampler` and no
    logits processors) runs them from its position ``index``: step k feeds ``seq[:, index + k -
    1]`` at cache index ``index + k - 1``, takes each row's most probable token (``argmax
    softmax(logits / temperature)``), keeps the prompt's token where ``prompt_mask`` is True,
    finishes a row at a token of ``stop`` (None: no stop tokens) on a ``generated`` position, and
    writes the token into ``seq [B, T]`` (int64, updated in place, as are ``finished [B]`` and the
    KV cache).  It stops at ``T``, when every row has finished (with ``stop``), after ``steps``
    steps, or at a step where a row's choice is not certain from the logits alone (two logits
    within rounding of each other after the temperature, or a non-finite one: :func:`_decide`).

    Returns ``(index, logits)``: the loop's position after the committed steps, and None, or the
    logits ``[B, V]`` of the uncertain step, whose tokens the caller chooses on the samplers' NumPy
    path (position ``index``; nothing of it is committed).  None when this model cannot take the
    compiled loop (weights of mixed storage kinds, a projection around the layers, or a ``seq``
    that is not int64): the caller runs its ordinary steps.  ``threads``: as
    :func:`decode_step`'s (the governor times a call per token)."""
    plan = _plan_for(params, cfg)
    if (not plan.ok or cfg.has_projection or seq.dtype != np.int64 or not seq.flags.c_contiguous
            or not seq.flags.writeable):
        return None
    B, T = seq.shape
    if threads is None:                  # timed per token: the steps committed, and an uncertain one
        # A comparison on the other thread count runs ONE step: eight steps on one thread, the
        # first comparison of a 125m int8 generation, cost it 36-57 ms (of 450-500 ms for 64 tokens;
        # session 19, /tmp script: 5.5-6.5 ms a step on two threads, 12.0-13.2 on one)
        key = (id(plan), B, "greedy")
        return _governed(plan, key, lambda n: decode_greedy(
            params, cfg, seq, prompt_mask, generated, stop, finished, cache, index, temperature,
            1 if governor.probing(key, n) else steps, n, min_bytes),
            units=lambda got: got[0] - index + (got[1] is not None) if got[0] > index else 0)
    if threads > 1 and plan.nbytes * max(1, B // 2) < min_bytes:
        threads = 1
    steps = max(1, min(int(steps), T - index))
    marks = (np.asarray(prompt_mask, bool).astype(np.uint8) | (np.asarray(generated, bool).astype(np.uint8) << 1))
    stop_ids = _NO_STOP if stop is None else np.array(stop, np.int64).reshape(-1)
    loop = np.array([steps, stop is not None, 0, 0], np.int64)
    dtype = plan.dtype
    x = np.empty((B, cfg.hidden_dim), dtype)
    out = np.empty((B, plan.V), dtype)
    key_mask = np.ones((B, T), np.bool_)
    _run(plan, cfg, B, threads, x, cache, index - 1, key_mask, plan.dims, np.empty((B, plan.E), dtype), out,
         steps * (_stages(cfg) + 2) + 1, loop, seq, np.ascontiguousarray(marks), stop_ids, finished,
         temperature)
    index += int(loop[2])
    return index, (out if loop[3] else None)
