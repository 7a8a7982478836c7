"""Matrix products ``x [M, I] @ w.T`` for weights ``w [O, I]`` stored in float32/float64, bfloat16,
float16 or int8 (with a float32 scale per output row), with a fused epilogue.

A decode step multiplies a handful of rows by every weight matrix: memory-bound, and a loop that
streams each weight row once and dots it with every row of ``x`` beats a general GEMV and reads the
weights in the bytes they are stored in (two for bfloat16/float16, one for int8).  Rows come four
at a time (:func:`dot_block`: two outputs by four rows, eight accumulators, so each weight is
widened once and used four times): a batch of 8 spends its time in fused multiply-adds rather than
in loads.  Accumulation is in the activations' dtype (float32 or float64).

Weights are ``[O, I]``, one contiguous row per output (refopt's float weights, the token table of
the tied head, a :class:`refopt.quant.QuantizedMatrix`'s data).  Float weights multiplied by more
than :data:`SMALL_M` rows go to BLAS (compute-bound, and BLAS is the fastest there is); stored
kinds never do, so their weights are never widened into a float copy.  The products computed
here give each output the bits its shapes and storage kind decide, whatever the thread count or
the decode step's chunks cut the outputs into (:func:`_dots`; BLAS's products are BLAS's).

:func:`products` is the one kernel (one to three products of a shape at once: the decode step's
queries, keys and values in one parallel stage), called by the per-op path (:func:`matmul_rows`)
and by the compiled decode step (:mod:`.decode`).  int8 weights whose products quantise the
activations (``activations="int8"``) travel with ``scale = (weight scales, row sums)``, a tuple,
and :func:`product_range` hands them to :mod:`.int8` (integer products, VNNI) at compile time.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from refopt.kernels.cpu import int8
from refopt.kernels.cpu.epilogue import RELU, STORE, store

SMALL_M = 16         # rows up to which the streaming kernels beat BLAS on float weights
# A product runs on several threads when its weight bytes times max(1, rows // 2) reach this: a
# parallel region costs ~35 us here (Numba's OpenMP threads wait passively, see _threads), which a
# memory-bound product of one row gains back from about 6 MB (one thread streams ~30 GB/s, two
# ~36), and a compute-bound one of eight rows from ~1 MB of int8 weights
PARALLEL_BYTES = 1 << 22


@intrinsic
def _bf16_to_f32(typingctx, bits):
    # uint16 bfloat16 bits -> float32: the bits become the top half of a float32 (a bitcast, free)
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


@intrinsic
def _f16_to_f32(typingctx, bits):
    # float16 bits (uint16 or int16) -> float32 (LLVM's fpext: one vcvtph2ps on x86 with F16C)
    if bits not in (types.uint16, types.int16):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def widen(v):
    """A stored weight element as a float: float32/float64 as they are, bfloat16 bits (uint16),
    float16 bits (int16: Numba has no float16 type on the CPU, so float16 weights travel as int16
    and bfloat16 as uint16, which keeps the two apart at compile time), int8 (unscaled)."""


@overload(widen, inline="always")
def _widen(v):
    if isinstance(v, types.Float):
        return lambda v: v
    if v == types.uint16:
        return lambda v: _bf16_to_f32(v)
    if v == types.int16:
        return lambda v: _f16_to_f32(v)
    if v == types.int8:
        return lambda v: np.float32(v)
    return None


# ----------------------------------------------------------------------------- one row, streamed
# Batch-1 decoding dots one row of activations with each weight row in turn. LLVM's loop for it
# (dot_one: widen, multiply-add, four accumulators) is ideal as arithmetic, but on an AVX2-only CPU
# (AMD EPYC Zen 3, session 18) int8 weights widen at about the rate memory delivers them (vpmovsxbd
# + vcvtdq2ps + vfmadd: 15-21 GB/s of weights on one thread with the matrix in L1, a plain read from
# memory 15-20), and the two overlapped poorly: 9-12 GB/s from memory. Session 18 wrote that loop
# as an IR tile hinting the weights 4 KB ahead into the cache (10.9-11.6 -> 12.1-12.9 GB/s from
# memory, one thread; the 125m int8 step 6.37 -> 5.36 ms in one sitting, 7.11 -> 6.84 in another).
#
# Session 21 found the tile itself the limit: on one thread it widened 16-17 GB/s of int8 weights
# even with them in L1 (1.45 cycles a vector of eight at 3.2 GHz), where the conversion allows about
# one cycle -- each vector of weights also loaded its eight activations, and the two threads of a
# decode step stream ~30 GB/s, so each thread's tile ran within 10% of its share of memory and any
# stall showed.  _tile now takes ROWS = 4 weight rows side by side against one row of activations
# (each vector of activations loaded once for four rows: 23-25 GB/s in cache, 1.07 cycles a
# vector), one accumulator of 16 lanes per weight row, and hints the weights whole blocks of four
# rows ahead (at least AHEAD bytes) in address order, one hint per 64 bytes it reads (two other
# placements lost: hints taking the next block's four rows in turn, on 768-wide rows; hints a
# fixed 4 KB ahead, on fc2's 3072-wide rows, where they fell behind the later rows' reads).
# Measured on two threads, each its half of the outputs, 40 random int8 matrices from memory, 15
# alternations in one process (/tmp script, 2026-12-04, against the one-row tile as it was; the
# medians of the rounds' ratios): 768 x 768 1.31x (15 of 15 faster) and 3072 x 768 1.10x (12 of
# 15) hinting two blocks (6 KB) ahead, 768 x 3072 1.25x (14 of 15) one block (12 KB) ahead, as
# AHEAD makes them.
#
# One output's sum is the same whatever rows sit beside it: lane j of its accumulator sums the
# products j, j + 16, j + 32, .. of the whole steps of 16 inputs, in order, each a fused
# multiply-add; the lanes are then added pairwise (lane[j] += lane[j + w], w = 8, 4, 2, 1); the
# inputs past the last whole step are added last, one fused multiply-add each.  So _tile of one row
# (the outputs left over past a multiple of four) gives the bits _tile of four gives, and a
# product's bits do not depend on how its outputs are cut into ranges (threads, chunks): only on
# the shapes.  No fastmath: the same bits on any CPU with or without 512-bit registers.
# bfloat16 and float16 weights streamed from memory as fast through LLVM's loop on an AVX2-only
# Zen 3 (session 18; the four-row tile on bfloat16, two threads, 10 alternations: 0.95-1.07x by
# shape, on a host whose two-thread read had fallen to ~18 GB/s), but not on an Intel Xeon with
# AVX-512 (session 23, 2026-12-04: a 125m-shaped model's whole greedy generate, prompt 8, 64 new
# tokens, batch 1, two threads, processes alternated with separate Numba caches): bfloat16 76.3-80.3
# -> 96.5-109.2 tok/s over 9 rounds (56-58% -> 70-78% of a read of the same bytes; 1.27x in each
# of three paired rounds), float16 71.4-73.9 -> 103.8-105.2 (1.43x, two rounds).  So every stored
# kind takes the tile (all of _WIDENED), and a batch-1 product of stored weights gets the tile's fixed
# lane order: the same bits on any CPU, not LLVM's fastmath choice for the CPU at hand.
# Where the hints bring the weights (session 23, the Intel Xeon, variants of the tile compiled side
# by side in one process and alternated, 12 rounds, 141 MB int8 / 70 MB 2-byte rows from memory,
# 768 and 3072 wide, the medians of the ratios): 2-byte weights hinted into L2 (prefetcht1) rather
# than L1 (prefetcht0) 1.11x / 1.34x on two threads and 1.33x / 1.26x on one (11-12 of 12 rounds
# each; the tile streamed them at 23-28 GB/s on two threads, 12-13 on one, against a read's 35 and
# 19); int8 weights 1.02-1.05x at 768 wide but 0.90-0.91x at 3072 wide on two threads (every
# round), so int8 keeps prefetcht0.  The distance (2-24 KB) mattered less (0.95-1.05x).  A 125m
# generate, batch 1, 64 tokens, processes alternated: bfloat16 89.6-99.2 -> 104.3-108.2 tok/s (three
# rounds, each faster), float16 105.6 -> 118.9 (one round).
STREAM = 16           # inputs one step of the streaming tile takes (one vector of 16 lanes a row)
ROWS = 4              # weight rows the tile takes side by side
AHEAD = 6144          # bytes ahead of its reads (rounded up to whole blocks of ROWS rows) it hints
_WIDENED = (types.int8, types.uint16, types.int16)     # int8, bfloat16 bits, float16 bits


def _widen_vector(builder, v, dtype):
    # a vector of stored elements -> as many float32, as widen() does one
    n = v.type.count
    f32s = ir.VectorType(ir.FloatType(), n)
    if dtype == types.int8:
        return builder.sitofp(v, f32s)
    i32s = ir.VectorType(ir.IntType(32), n)
    if dtype == types.uint16:                    # bfloat16: the bits become a float32's top half
        top = builder.shl(builder.zext(v, i32s), ir.Constant(i32s, [16] * n))
        return builder.bitcast(top, f32s)
    return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), n)), f32s)   # float16


def _tile_of(R):
    """The streaming tile over ``R`` weight rows (an intrinsic; see the comment above)."""

    @intrinsic
    def tile(typingctx, x, m, w, o):
        # (x[m] . widen(w[o + r]) for r < R) for float32 x [M, I] and w [O, I] of a _WIDENED
        # dtype, both C-contiguous, o + R <= O
        if not (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 2 and x.layout == "C"
                and isinstance(w, types.Array) and w.dtype in _WIDENED and w.ndim == 2 and w.layout == "C"
                and isinstance(m, types.Integer) and isinstance(o, types.Integer)):
            return None
        sig = types.UniTuple(types.float32, R)(x, m, w, o)
        size = w.dtype.bitwidth // 8

        def codegen(context, builder, signature, args):
            intp = context.get_value_type(types.intp)
            i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
            c = lambda v: ir.Constant(intp, v)   # noqa: E731
            f32v = ir.VectorType(f32, STREAM)
            elem = context.get_value_type(signature.args[2].dtype)
            stored = ir.VectorType(elem, STREAM)
            xa = context.make_array(signature.args[0])(context, builder, args[0])
            wa = context.make_array(signature.args[2])(context, builder, args[2])
            m_, o_ = (context.cast(builder, args[j], signature.args[j], types.intp) for j in (1, 3))
            n = cgutils.unpack_tuple(builder, xa.shape)[1]
            xs, ws = (cgutils.unpack_tuple(builder, a.strides)[0] for a in (xa, wa))
            xrow = builder.bitcast(builder.gep(builder.bitcast(xa.data, i8.as_pointer()),
                                               [builder.mul(m_, xs)]), f32.as_pointer())
            base = builder.gep(builder.bitcast(wa.data, i8.as_pointer()), [builder.mul(o_, ws)])
            rows = [builder.bitcast(builder.gep(base, [builder.mul(c(r), ws)]), elem.as_pointer())
                    for r in range(R)]
            block = builder.mul(ws, c(R))        # the bytes of R rows; hint whole blocks ahead
            locality = 3 if size == 1 else 2     # int8: into L1 (prefetcht0); 2-byte kinds: L2
            ahead = builder.mul(builder.sdiv(builder.add(c(AHEAD - 1), block), block), block)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32v, [f32v] * 3),
                                                 "llvm.fma.v%df32" % STREAM)
            fma1 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3),
                                                  "llvm.fma.f32")
            hint = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]),
                "llvm.prefetch.p0")
            accs = [cgutils.alloca_once_value(builder, ir.Constant(f32v, None)) for _ in range(R)]
            whole = builder.mul(builder.sdiv(n, c(STREAM)), c(STREAM))
            with cgutils.for_range_slice(builder, c(0), whole, c(STREAM), intp) as (k, _):
                at = builder.gep(base, [builder.add(builder.mul(k, c(R * size)), ahead)])
                for b in range(0, max(1, R * STREAM * size // 64) * 64, 64):   # a hint per 64 bytes
                    builder.call(hint, [builder.gep(at, [c(b)]), ir.Constant(i32, 0), ir.Constant(i32, locality),
                                        ir.Constant(i32, 1)])
                xv = builder.load(builder.bitcast(builder.gep(xrow, [k]), f32v.as_pointer()), align=4)
                for r in range(R):
                    wp = builder.bitcast(builder.gep(rows[r], [k]), stored.as_pointer())
                    wf = _widen_vector(builder, builder.load(wp, align=1), signature.args[2].dtype)
                    builder.store(builder.call(fma, [xv, wf, builder.load(accs[r])]), accs[r])
            totals = []
            lanes = ir.VectorType(i32, STREAM)
            for r in range(R):
                v = builder.load(accs[r])
                w_ = STREAM
                while w_ > 1:                    # lane[j] += lane[j + w], w = 8, 4, 2, 1
                    w_ //= 2
                    turn = ir.Constant(lanes, [(j + w_) % STREAM for j in range(STREAM)])
                    v = builder.fadd(v, builder.shuffle_vector(v, v, turn))
                first = builder.extract_element(v, ir.Constant(i32, 0))
                totals.append(cgutils.alloca_once_value(builder, first))
            one = ir.VectorType(elem, 1)
            with cgutils.for_range_slice(builder, whole, n, c(1), intp) as (k, _):   # the rest, in order
                xk = builder.load(builder.gep(xrow, [k]))
                for r in range(R):
                    wk = builder.load(builder.bitcast(builder.gep(rows[r], [k]), one.as_pointer()))
                    wf = builder.extract_element(_widen_vector(builder, wk, signature.args[2].dtype),
                                                 ir.Constant(i32, 0))
                    builder.store(builder.call(fma1, [xk, wf, builder.load(totals[r])]), totals[r])
            return context.make_tuple(builder, signature.return_type, [builder.load(t) for t in totals])

        return sig, codegen

    return tile


_tile = _tile_of(ROWS)
_tile1 = _tile_of(1)


def _streamed(x, w):
    # whether rows x against weights w (Numba types) take the streaming tile
    return (isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C"
            and isinstance(w, types.Array) and w.dtype in _WIDENED and w.layout == "C")


def _streams(x, w):
    """Whether ``x [M, I]`` against ``w`` takes the streaming tile (True/False at compile time)."""


@overload(_streams, inline="always")
def _streams_impl(x, w):
    return (lambda x, w: True) if _streamed(x, w) else (lambda x, w: False)


def dot_row(x, m, w, o):
    """``x[m] . widen(w[o])``: the streaming tile of one row where :func:`_streams`, else
    :func:`dot_one` (typed for every kind; :func:`_dots` calls it only where the tile applies)."""


@overload(dot_row, inline="always")
def _dot_row(x, m, w, o):
    if _streamed(x, w):
        return lambda x, m, w, o: _tile1(x, m, w, o)[0]
    return lambda x, m, w, o: dot_one(x, m, w, o)


def dot_rows(x, m, w, o):
    """``x[m] . widen(w[o + r])`` for r < 4: the streaming tile where :func:`_streams`, else
    :func:`dot_four` (typed for every kind; :func:`_dots` calls it only where the tile applies)."""


@overload(dot_rows, inline="always")
def _dot_rows(x, m, w, o):
    if _streamed(x, w):
        return lambda x, m, w, o: _tile(x, m, w, o)
    return lambda x, m, w, o: dot_four(x, m, w, o, o + 1, o + 2, o + 3)


@njit(inline="always", fastmath=True)
def dot_one(x, m, w, o):
    # x[m] . widen(w[o]), accumulated in x's dtype
    acc = x.dtype.type(0)
    for i in range(x.shape[1]):
        acc += x[m, i] * widen(w[o, i])
    return acc


@njit(inline="always", fastmath=True)
def dot_block(x, m, w, o, p):
    # rows m..m+3 of x against outputs o, p of w: each weight widened once and used four times,
    # eight accumulators (LLVM vectorises the loop over i with one vector per accumulator) ->
    # (x[m].w[o], x[m].w[p], x[m+1].w[o], ..., x[m+3].w[p]).  (Twelve accumulators, three
    # outputs by four rows, ran 8 rows of int8 or bfloat16 weights 1.20-1.34x faster on one
    # thread with the weights in cache, but not on two threads from memory: the 50,272 x 768
    # head 0.75x, a 125m step of 8 rows 0.83x; session 22, see the README)
    z = x.dtype.type(0)
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = z
    for i in range(x.shape[1]):
        w0 = widen(w[o, i])
        w1 = widen(w[p, i])
        x0 = x[m, i]
        x1 = x[m + 1, i]
        x2 = x[m + 2, i]
        x3 = x[m + 3, i]
        a00 += x0 * w0
        a01 += x0 * w1
        a10 += x1 * w0
        a11 += x1 * w1
        a20 += x2 * w0
        a21 += x2 * w1
        a30 += x3 * w0
        a31 += x3 * w1
    return (a00, a01, a10, a11, a20, a21, a30, a31)


@njit(inline="always", fastmath=True)
def dot_four(x, m, w, o, p, q, r):
    # row m of x against outputs o, p, q, r: four weight rows streamed side by side, so more
    # memory requests are in flight than with one
    z = x.dtype.type(0)
    a0 = a1 = a2 = a3 = z
    for i in range(x.shape[1]):
        xv = x[m, i]
        a0 += xv * widen(w[o, i])
        a1 += xv * widen(w[p, i])
        a2 += xv * widen(w[q, i])
        a3 += xv * widen(w[r, i])
    return a0, a1, a2, a3


@njit(fastmath=True, cache=True)
def _dots(x, w, o0, o1, raw):
    # raw[:, :o1-o0] <- x [M, I] @ widen(w[o0:o1]).T.  Rows four at a time: pairs of outputs by
    # four rows (dot_block).  The rows left over (all of them below four rows, as in decoding):
    # stored weights (int8, bfloat16, float16) against float32 rows through the streaming tile,
    # four outputs a call (dot_rows) and the last ones one by one (dot_row, the same bits; see the
    # tile's comment).  Otherwise (float weights, or float64 rows): four outputs
    # side by side (dot_four) where that streams faster -- float32/float64 weights (+34% at 768
    # wide), or rows over 4096 (+20% for float16 at 8192; at 16384, 1.6-2.3x for float16: the row
    # of x, 64 KB, no longer stays in L1 and dot_four reads it once for four weight rows) -- else
    # one output at a time (dot_one: faster for narrow weights at 768-4096 wide, measured before
    # they took the tile: at 4096, 1.3x for float16; one thread, load 6-10).  Each kernel has one
    # call site, and the outputs past the last whole pair (dot_block) or four (dot_four) fill the
    # slots left with the last output:
    # an output's bits depend on the shapes and the kind alone, not on how threads or the decode
    # step's chunks cut the outputs into ranges (before session 22 they did, for the rows past a
    # multiple of four of float32 weights, and for ranges of odd length).
    M, I = x.shape
    Mb = M - M % 4
    for o in range(o0, o1, 2):
        p = min(o + 1, o1 - 1)       # past the last whole pair, the last output takes both slots
        for m in range(0, Mb, 4):
            a00, a01, a10, a11, a20, a21, a30, a31 = dot_block(x, m, w, o, p)
            c, d = o - o0, p - o0
            raw[m, c], raw[m, d], raw[m + 1, c], raw[m + 1, d] = a00, a01, a10, a11
            raw[m + 2, c], raw[m + 2, d], raw[m + 3, c], raw[m + 3, d] = a20, a21, a30, a31
    tile = _streams(x, w)
    four = w.itemsize >= 4 or I > 4096
    for m in range(Mb, M):
        o = o0
        if tile:
            while o + 4 <= o1:
                a0, a1, a2, a3 = dot_rows(x, m, w, o)
                c = o - o0
                raw[m, c], raw[m, c + 1], raw[m, c + 2], raw[m, c + 3] = a0, a1, a2, a3
                o += 4
            while o < o1:
                raw[m, o - o0] = dot_row(x, m, w, o)
                o += 1
        elif four:
            while o < o1:        # past the last whole four, the last output takes the slots left
                p, q, r = min(o + 1, o1 - 1), min(o + 2, o1 - 1), min(o + 3, o1 - 1)
                a0, a1, a2, a3 = dot_four(x, m, w, o, p, q, r)
                raw[m, o - o0], raw[m, p - o0], raw[m, q - o0], raw[m, r - o0] = a0, a1, a2, a3
                o += 4
        else:
            while o < o1:
                raw[m, o - o0] = dot_one(x, m, w, o)
                o += 1


@njit(fastmath=True, cache=True)
def _finish(raw, scale, bias, out, col, mode, alpha, o0, o1):
    # out[:, col + o] <- epilogue(raw[:, o - o0]) for o in o0..o1: the int8 scale, the bias, then
    # mode STORE (times alpha), RELU or ADD (+=)
    for m in range(raw.shape[0]):
        for o in range(o0, o1):
            y = raw[m, o - o0]
            if scale.shape[0] > 0:
                y = y * scale[o]
            if bias.shape[0] > 0:
                y += bias[o]
            store(out, m, col + o, y, mode, alpha)


CHUNK = 64            # outputs whose raw dots are kept before the epilogue (in L1)


def product_range(x, w, scale, bias, out, col, mode, alpha, o0, o1):
    """Outputs ``o0..o1`` (``o0`` even) of every row: ``out[:, col + o] <- epilogue(x @ w[o])``:
    :func:`float_product_range`, or :func:`.int8.product_range` for int8 weights with quantised
    activations (``scale`` a tuple)."""


@overload(product_range, inline="always")
def _product_range(x, w, scale, bias, out, col, mode, alpha, o0, o1):
    if isinstance(scale, types.BaseTuple):
        return lambda x, w, scale, bias, out, col, mode, alpha, o0, o1: int8.product_range(
            x, w, scale, bias, out, col, mode, alpha, o0, o1)
    return lambda x, w, scale, bias, out, col, mode, alpha, o0, o1: float_product_range(
        x, w, scale, bias, out, col, mode, alpha, o0, o1)


@njit(cache=True)
def float_product_range(x, w, scale, bias, out, col, mode, alpha, o0, o1):
    """Outputs ``o0..o1`` (``o0`` even) of every row: ``out[:, col + o] <- epilogue(x @
    widen(w[o]))``, in chunks of CHUNK outputs: their raw dots first (:func:`_dots`), then the
    epilogue (:func:`_finish`).  Kept apart on purpose: with the epilogue's stores in the same
    loop nest as the dot products, LLVM compiled the products three to four times slower
    (measured: 20-25 against 76-95 GMAC/s on eight rows, float32 and int8 weights)."""
    float_range(x, w, scale, bias, out, col, mode, alpha, o0, o1, np.empty((x.shape[0], CHUNK), x.dtype))


@njit(cache=True)
def float_range(x, w, scale, bias, out, col, mode, alpha, o0, o1, raw):
    """:func:`float_product_range` with ``raw [M, >= CHUNK]`` scratch of ``x``'s dtype (the fused
    decode step keeps one per thread)."""
    for c0 in range(o0, o1, CHUNK):
        c1 = min(o1, c0 + CHUNK)
        _dots(x, w, c0, c1, raw)
        _finish(raw, scale, bias, out, col, mode, alpha, c0, c1)


@njit(inline="always")
def split(n, parts, c):
    """The even-aligned range ``c`` of ``n`` items cut into ``parts``."""
    per = ((n + parts - 1) // parts + 1) // 2 * 2
    return min(n, c * per), min(n, (c + 1) * per)


@njit(cache=True)
def products_range(x, w0, s0, b0, w1, s1, b1, w2, s2, b2, count, out, mode, alpha, j0, j1):
    """Jobs ``j0..j1`` of ``count`` (1 to 3) products of ``x`` with weights of one shape ``[O, I]``
    side by side: job ``j`` is output ``j % O`` of product ``j // O``, written at column ``j`` of
    ``out [M, count * O]``.  Product 0 is stored by ``mode`` with ``alpha``; products 1 and 2 (the
    keys and values beside the queries) are stored as they are."""
    O = w0.shape[0]
    one = x.dtype.type(1)          # alpha's type: a literal would compile product_range again
    for part in range(count):
        o0 = max(j0 - part * O, 0)
        o1 = min(j1 - part * O, O)
        if o0 < o1:
            col = o0 * 0 + part * O
            if part == 0:
                product_range(x, w0, s0, b0, out, col, mode, alpha, o0, o1)
            elif part == 1:
                product_range(x, w1, s1, b1, out, col, mode * 0, one, o0, o1)
            else:
                product_range(x, w2, s2, b2, out, col, mode * 0, one, o0, o1)


@njit(parallel=True, cache=True)
def _products_parallel(x, w0, s0, b0, w1, s1, b1, w2, s2, b2, count, out, mode, alpha, parts):
    for c in prange(parts):
        j0, j1 = split(count * w0.shape[0], parts, c)
        products_range(x, w0, s0, b0, w1, s1, b1, w2, s2, b2, count, out, mode, alpha, j0, j1)


@njit(cache=True)
def products(x, w0, s0, b0, w1, s1, b1, w2, s2, b2, count, out, mode, alpha, threads, min_bytes):
    """:func:`products_range` over all the jobs, split across ``threads`` threads when the
    products' weight bytes times max(1, rows // 2) reach ``min_bytes`` (the caller sets Numba's
    count)."""
    jobs = count * w0.shape[0]
    if threads > 1 and count * w0.nbytes * max(1, x.shape[0] // 2) >= min_bytes:
        _products_parallel(x, w0, s0, b0, w1, s1, b1, w2, s2, b2, count, out, mode, alpha, threads)
    else:
        products_range(x, w0, s0, b0, w1, s1, b1, w2, s2, b2, count, out, mode, alpha, jobs * 0, jobs)


@njit(cache=True)
def product(x, w, scale, bias, out, mode, alpha, threads, min_bytes):
    """``out [M, O] <- x [M, I] @ widen(w [O, I]).T``, int8-scaled, plus ``bias``, stored by
    ``mode`` (STORE: times ``alpha``, RELU, ADD: added to ``out``); split across ``threads``
    threads when its weight bytes times max(1, rows // 2) reach ``min_bytes``."""
    products(x, w, scale, bias, w, scale, bias, w, scale, bias, mode * 0 + 1, out, mode, alpha,
             threads, min_bytes)


def readonly(a):
    """``a`` as a read-only view (no copy).  Numba types a read-only array apart from a writable
    one and compiles a kernel once per type: weights memory-mapped from a file are read-only, those
    made in memory writable, so the kernels compiled twice per storage dtype (15 signatures of
    :func:`product` in one run of the test suite, where 5 serve).  The weights, biases and scales
    reach the kernels read-only whatever their source."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def stored(w, dtype):
    """``(data, scale)`` of a weight as :func:`product` reads it, read-only (:func:`readonly`): a
    float matrix as ``dtype`` (no copy when it is already), a QuantizedMatrix's data (float16 bits
    viewed as int16, see :func:`widen`) and int8 scales (else an empty scale); with quantised
    activations, ``scale`` is ``(scales, row sums)``."""
    from refopt.quant import QuantizedMatrix

    if isinstance(w, QuantizedMatrix):
        if w.activations == "int8":
            return readonly(np.ascontiguousarray(w.data)), (readonly(w.scale), readonly(w.row_sums()))
        data = w.data.view(np.int16) if w.kind == "float16" else w.data
        return readonly(np.ascontiguousarray(data)), readonly(w.scale) if w.kind == "int8" else _NO_SCALE
    return readonly(np.ascontiguousarray(w, dtype=dtype)), _NO_SCALE


_NO_SCALE = readonly(np.zeros(0, np.float32))


def matmul_rows(x2, w, bias=None, relu=False, threads=None):
    """``epilogue(x2 [M, I] @ w.T + bias)`` for ``w [O, I]`` a float matrix or a QuantizedMatrix
    -> ``[M, O]``; the epilogue adds ``bias`` and applies ReLU when ``relu``.  ``threads``:
    default Numba's current count."""
    from refopt.quant import QuantizedMatrix

    M = x2.shape[0]
    if not isinstance(w, QuantizedMatrix) and (M > SMALL_M or w.dtype != x2.dtype
                                                or not w.flags.c_contiguous):
        # compute-bound (or an unusual operand): BLAS, then the epilogue in place
        y = x2 @ w.T
        if bias is not None:
            y += bias
        if relu:
            np.maximum(y, 0, out=y)
        return y
    import numba

    x2 = np.ascontiguousarray(x2)
    dt = x2.dtype.type
    data, scale = stored(w, x2.dtype)
    b = readonly(np.zeros(0, x2.dtype) if bias is None else np.ascontiguousarray(bias, x2.dtype))
    out = np.empty((M, w.shape[0]), x2.dtype)
    product(x2, data, scale, b, out, RELU if relu else STORE, dt(1),
            numba.get_num_threads() if threads is None else threads, PARALLEL_BYTES)
    return out
