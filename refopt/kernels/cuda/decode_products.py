"""The persistent decode kernel's products (:mod:`.decode`): ``dst[b, o] = x[b] . W[o]`` for every
row ``b`` of the batch and output ``o``, with the weights ``W [out, in]`` in the packed buffer
``Wt`` (one contiguous row per output).  Two kinds, chosen by the batch pass ``RB`` (the batch
rounded up to a power of two, at most 32 rows a pass):

* ``RB < 8``, **warp products** (:func:`make_warp_stage`): one warp per output feature, all rows
  at once (each weight row streamed once).  Lane ``j`` takes inputs ``j, j + 32, ...``, so each
  load of the warp reads one contiguous 128-byte run of the weight row and of every activation
  row; ``RB`` accumulators, reduced over the warp so that lane ``b`` ends with row ``b``'s output
  (a transposing butterfly of shuffles, :func:`reduction_source`; shared memory under the
  simulator).
* ``RB >= 8``, **tiled products** (:func:`make_tile_stage`): a block computes a tile of ``RB``
  rows by ``TN`` outputs, staging ``KC`` inputs of the rows and of the weights at a time through
  shared memory (k-major, read back as 16-byte loads), with the next chunk's loads in flight
  during the current chunk's products, as :mod:`.gemm`'s second kernel does; a product with fewer
  tiles than the grid has blocks is split over its inputs (split-K, the :class:`Plan`), and the
  stage that reads it adds the partial sums in a fixed order (so the result does not depend on
  timing).  Per-output warps at batch 32 re-read every activation row for every weight row and
  were bound by those loads.

Both kinds are generated per shape (the widths written in as constants) and take the same
arguments, ``(Wt, Wm, wbase, X, eoff, B, dst, Xs, Ws, red)``, so that the kernel calls either
alike: the weights are read from ``Wm`` (float32, or bfloat16 / float16 widened as they are read:
:mod:`.halves`), biases from the float32 buffer ``Wt``.

Names: ``RB`` rows of a batch pass, ``I`` inputs and ``N`` outputs of a product, ``TM x TN`` a
tile (rows x outputs), ``TY x TX`` its threads, ``RM x CN`` the sums a thread keeps (``GN = CN /
4`` groups of four outputs, ``HN`` apart), ``KC`` inputs staged a pass (``Q = KC / 4`` groups of
four), ``S`` split-K slices, ``CPS`` input chunks a slice, ``XS`` partial sums the inputs are made
of, ``XACT`` the inputs' bias and ReLU (fc2 reading fc1's sums), ``WL`` lanes of a warp, ``NW``
warps of a block, ``NT`` threads a block, ``NCH`` chunks of ``KC`` inputs, ``TILES`` tiles of
outputs, ``SX`` / ``SW`` a staged k row's length (``TM`` / ``TN`` plus ``PAD``), ``PX`` / ``PW``
staging groups a thread loads per chunk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from numba import cuda, float32

from refopt.kernels.cuda._common import SIM, SIMULATOR, cdiv, generated
from refopt.kernels.cuda.decode_stages import THREADS, WL
from refopt.kernels.cuda.halves import bf16_to_f32, f16_to_f32, make_load


# ----------------------------------------------------------------------------- warp products
@functools.lru_cache(maxsize=None)
def reduction_source(RB: int) -> list[str]:
    """Source lines reducing the accumulators ``a0 .. a{RB-1}`` over a warp so that lane ``b``
    ends with row ``b``'s total in ``a0``: levels 16, 8, 4, 2, 1 of shuffles, a plain butterfly of
    every value while the level is >= RB, then transposing levels (a lane keeps half its values and
    receives its partner's matching half: 31 shuffles for 32 values instead of 160)."""
    lines = []
    cur = [f"a{r}" for r in range(RB)]
    for s in (16, 8, 4, 2, 1):
        if s >= RB:
            lines += [f"{a} += cuda.shfl_xor_sync(0xFFFFFFFF, {a}, {s})" for a in cur]
            continue
        half = len(cur) // 2
        lines.append(f"upper = (lane & {s}) != 0")
        for j in range(half):
            lo, hi = cur[j], cur[j + half]
            lines += [f"send = {hi} if not upper else {lo}",
                      f"{lo} = ({hi} if upper else {lo}) + cuda.shfl_xor_sync(0xFFFFFFFF, send, {s})"]
        cur = cur[:half]
    return lines


@functools.lru_cache(maxsize=None)
def _make_warp_dot(RB: int, width: int = 0, kind: str = "float32"):
    """``warp_dot(W, base, I, X, xrow0, B, lane, red, warp)``: the dot products of ``W[base:base+I]``
    (stored as ``kind``, :mod:`.halves`)
    with rows ``xrow0 .. xrow0+B-1`` of ``X`` (``B <= RB``), summed over the warp; lane ``b``
    returns row ``b``'s.  On the GPU the function is generated with ``RB`` scalar accumulators
    (registers, whatever the compiler unrolls) and the row width ``width`` written in as a
    constant (a known trip count: the loop unrolls and a lane's loads are all in flight at once);
    under the simulator it reduces through shared memory."""
    ld = make_load(kind)
    if not SIM:
        assert width > 0
        I = width
        full = I // (4 * WL)                  # passes in which every lane has four inputs
        body = ["def warp_dot(W, base, I, X, xrow0, B, lane, red, warp):"]
        body += [f"    a{r} = float32(0)" for r in range(RB)]

        def four(indent):
            # inputs i0, i0 + WL, i0 + 2 WL, i0 + 3 WL: each load of the warp reads one
            # contiguous run of 128 bytes (one L1 wavefront), of the weights and of every x row
            out = [f"{indent}w{e} = ld(W, base + i0 + {e * WL})" for e in range(4)]
            out += [f"{indent}xb = xrow0 * {I} + i0"]
            for r in range(RB):
                out += [f"{indent}if {r} < B:",
                        f"{indent}    a{r} += (w0 * X[xb] + w1 * X[xb + {WL}] + w2 * X[xb + {2 * WL}]"
                        f" + w3 * X[xb + {3 * WL}])",
                        f"{indent}xb += {I}"]
            return out
        body += [f"    for it in range({full}):", f"        i0 = lane + it * {4 * WL}"]
        body += four("        ")
        if I % (4 * WL):                      # the last, partial pass
            body += [f"    i0 = lane + {full * 4 * WL}", "    for e in range(4):",
                     f"        if i0 < {I}:", "            w = ld(W, base + i0)",
                     f"            xb = xrow0 * {I} + i0"]
            for r in range(RB):
                body += [f"            if {r} < B:", "                a%d += w * X[xb]" % r,
                         f"            xb += {I}"]
            body += [f"        i0 += {WL}"]
        body += ["    " + line for line in reduction_source(RB)]
        body += ["    return a0"]
        scope = {"cuda": cuda, "float32": float32, "WL": WL, "ld": ld}
        exec("\n".join(body), scope)                      # noqa: S102  (generated, no input)
        return cuda.jit(device=True)(scope["warp_dot"])

    @cuda.jit(device=True)
    def warp_dot(W, base, I, X, xrow0, B, lane, red, warp):
        acc = cuda.local.array(RB, float32)
        for r in range(RB):
            acc[r] = float32(0)
        i0 = lane
        while i0 < I:                     # inputs lane, lane + WL, lane + 2 WL, ...
            w = ld(W, base + i0)
            for r in range(RB):
                if r < B:
                    acc[r] += w * X[(xrow0 + r) * I + i0]
            i0 += WL
        # shared-memory reduction (the simulator has no shuffles): lane b sums everyone's acc[b]
        cuda.syncthreads()
        for r in range(RB):
            red[warp, lane, r] = acc[r]
        cuda.syncthreads()
        total = float32(0)
        if lane < RB:
            for j in range(WL):
                total += red[warp, j, lane]
        cuda.syncthreads()
        return total

    return warp_dot


@functools.lru_cache(maxsize=None)
def make_warp_stage(RB: int, I: int, N: int, epilogue: str = "store", kind: str = "float32"):
    """``warp_stage(Wt, Wm, wbase, X, eoff, B, dst, Xs, Ws, red)``: one stage of the persistent kernel with
    warp products (batch passes below :data:`TILED_FROM` rows): output ``o < N`` of every row
    ``b < B`` is ``X[b] . W[o]`` with ``W = Wm[wbase:]`` as ``[N, I]`` (stored as ``kind``), one
    warp per output; it
    goes to ``dst[b, o]`` as it is (``"store"``), plus ``Wt[eoff + o]`` (``"add"``), or plus that
    bias through a ReLU (``"bias_relu"``).  ``Xs, Ws`` are unused: the signature is
    :func:`make_tile_stage`'s, so that the kernel calls either kind alike."""
    assert epilogue in ("store", "add", "bias_relu")
    dot = _make_warp_dot(RB, I, kind)
    NW = THREADS // WL
    add = epilogue != "store"
    relu = epilogue == "bias_relu"

    @cuda.jit(device=True)
    def warp_stage(Wt, Wm, wbase, X, eoff, B, dst, Xs, Ws, red):
        tid = cuda.threadIdx.x
        lane = tid % WL
        warp = tid // WL
        gwarp = cuda.blockIdx.x * NW + warp
        nwarps = cuda.gridDim.x * NW
        for r in range((N + nwarps - 1) // nwarps):
            o = r * nwarps + gwarp
            oo = o if o < N else 0               # every warp takes part in the shuffles
            for c0 in range(0, B, RB):
                s = dot(Wm, wbase + oo * I, I, X, c0, min(RB, B - c0), lane, red, warp)
                bl = c0 + lane
                if o < N and lane < RB and bl < B:
                    if add:
                        s = s + Wt[eoff + o]
                    if relu:
                        s = max(s, float32(0))
                    dst[bl * N + o] = s
    return warp_stage


# ----------------------------------------------------------------------------- tiled products
TILED_FROM = 8                        # batch passes of at least this many rows take tiled products
PAD = 4                               # floats padding a staged k row (16 bytes: see make_tile_stage)
#: floats of shared memory a tiled product may stage (both buffers, 24 KB): the kernel's other
#: shared arrays take about 10.5 KB of the 48 KB a block may have statically, and a larger chunk
#: means more staging registers (tiles 256 outputs wide spilled with 16-input chunks)
STAGE_FLOATS = 6144

#: ``(rows, outputs)`` of the sums one thread of a tiled product keeps (its register tile): per
#: staged input a thread reads its rows as one 16-byte shared load (four rows; a warp's threads
#: share them, a broadcast), its outputs as ``outputs / 4`` 16-byte loads, and makes ``rows x
#: outputs`` multiply-adds.  :data:`TILE_BY_ROWS` names the tile of each batch pass.
TILE = (4, 4)
TILE_BY_ROWS = {8: (2, 4), 16: (4, 4), 32: (4, 4)}


def tile_shape(RB: int, tile=TILE):
    """``(TM, TN, TY, TX, RM, CN)`` of a tiled product for a batch pass of ``RB`` rows and a
    thread's register tile ``tile`` (rows, outputs): a tile is ``TM = RB`` rows by ``TN``
    outputs; thread ``tid`` of the block (``TX * TY`` threads) computes rows ``RM * ty + i`` (``i
    < RM``, ``ty = tid // TX``) and outputs ``g * 4 * TX + 4 * tx + j`` (``j < 4``, ``g < CN / 4``,
    ``tx = tid % TX``)."""
    RM, CN = tile
    RM = min(RM, RB)
    assert CN % 4 == 0 and RB % RM == 0
    TY = RB // RM
    assert THREADS % TY == 0
    TX = THREADS // TY
    return RB, CN * TX, TY, TX, RM, CN


def tile_chunk(RB: int, tile=TILE) -> int:
    """``KC``, the inputs a tiled product stages per pass: the most of 32, 16, 8 (4 under the
    simulator) whose two staging buffers fit in :data:`STAGE_FLOATS`."""
    TM, TN = tile_shape(RB, tile)[:2]
    for kc in ((4,) if SIM else (32, 16, 8)):
        if 2 * kc * (TM + PAD + TN + PAD) <= STAGE_FLOATS:
            return kc
    raise ValueError(f"tile {tile} of {RB} rows: no staging chunk fits")


def tile_shared(RB: int, tile=TILE) -> tuple[int, int]:
    """Floats of the shared arrays ``Xs``, ``Ws`` a tiled product of ``RB`` rows stages through
    (two buffers of ``KC`` input rows, each ``TM + PAD`` / ``TN + PAD`` long)."""
    TM, TN = tile_shape(RB, tile)[:2]
    KC = tile_chunk(RB, tile)
    return 2 * KC * (TM + PAD), 2 * KC * (TN + PAD)


#: chunks ahead of the one being loaded whose weights a tiled product asks the L2 cache for
#: (``prefetch.L2``; 0: none): a block keeps one chunk of loads in flight in registers, so without
#: it every chunk waits for a trip to memory
PREFETCH = 4
#: work items a split product aims for, per multiprocessor (:func:`split_target`; at batch 32 on
#: an H200 one a multiprocessor ran 5% faster a step than two, 2026-12-03)
SPLIT_PER_SM = 1


class Plan(NamedTuple):
    """How the step's products split their inputs: for each product ``(S, CPS)``, ``S`` partial
    sums over ``CPS`` chunks of ``KC`` inputs each (``S = 1``: whole sums).  Split-K keeps every
    block busy when a product has fewer output tiles than the grid has blocks; the partial sums
    are added, in a fixed order, by the stage that reads them."""

    tiled: bool
    qkv: tuple
    out: tuple
    fc1: tuple
    fc2: tuple
    tile: tuple = TILE                # a thread's register tile (:func:`tile_shape`)
    prefetch: int = 0                 # chunks of weights asked of the L2 ahead (:data:`PREFETCH`)


def split_target() -> int:
    """Work items a split product aims for: :data:`SPLIT_PER_SM` per SM (a few under the
    simulator, so that its tests split)."""
    if SIMULATOR:
        return 8
    return SPLIT_PER_SM * cuda.get_current_device().MULTIPROCESSOR_COUNT


def product_plan(D: int, F: int, RB: int, target: int, tile=None) -> Plan:
    """The :class:`Plan` of a batch pass of ``RB`` rows (warp products below :data:`TILED_FROM`
    rows, whole sums) with register tiles ``tile`` (default :data:`TILE_BY_ROWS` or :data:`TILE`)."""
    if RB < TILED_FROM:
        return Plan(False, (1, 1), (1, 1), (1, 1), (1, 1))
    tile = tuple(TILE_BY_ROWS.get(RB, TILE) if tile is None else tile)
    TN = tile_shape(RB, tile)[1]
    KC = tile_chunk(RB, tile)

    def split(N, I):
        tiles, chunks = cdiv(N, TN), cdiv(I, KC)
        per = cdiv(chunks, max(1, min(chunks, cdiv(target, tiles))))
        return cdiv(chunks, per), per
    return Plan(True, split(3 * D, D), split(D, D), split(F, D), split(D, F), tile, PREFETCH)


if SIMULATOR:
    def ld4(arr, off):
        """Elements ``off .. off + 3`` of a flat array (the simulator's stand-in for one 16-byte
        load)."""
        return arr[off], arr[off + 1], arr[off + 2], arr[off + 3]

    def prefetch_l2(arr, off):
        """(the simulator has no caches)"""
else:
    from llvmlite import ir as _ir
    from numba.cuda import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic
    from numba.cuda.typing import signature as _signature

    from refopt.kernels.cuda.gemm import ldg4 as ld4      # one 16-byte load (global or shared)

    @_intrinsic
    def prefetch_l2(typingctx, arr, off):
        """Ask the L2 cache for the line holding flat element ``off`` of ``arr`` (PTX
        ``prefetch.L2``, generic address of global memory); nothing waits for it."""
        sig = _signature(_types.void, arr, _types.int64)

        def codegen(context, builder, sig, args):
            a = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = builder.gep(a.data, [context.cast(builder, args[1], sig.args[1], _types.int64)])
            i64 = _ir.IntType(64)
            asm = _ir.InlineAsm(_ir.FunctionType(_ir.VoidType(), [i64]), "prefetch.L2 [$0];", "l",
                                side_effect=True)
            builder.call(asm, [builder.ptrtoint(ptr, i64)])
            return context.get_dummy_value()
        return sig, codegen


@cuda.jit(device=True)
def _same(v):
    return v


#: a stored weight element -> float32, by storage kind (:mod:`.halves`)
WIDEN = {"float32": _same, "bfloat16": bf16_to_f32, "float16": f16_to_f32}


@functools.lru_cache(maxsize=None)
def make_tile_stage(I: int, N: int, S: int, CPS: int, XS: int, XACT: bool, RB: int,
                    kind: str = "float32", tile=TILE, prefetch: int = 0):
    """``tile_stage(Wt, Wm, wbase, X, xbias, B, dst, Xs, Ws, red)``: one stage of the persistent
    kernel, ``dst[s, b, n] = sum over split s's inputs k of X[b, k] * W[n, k]`` for every row ``b
    < B``, output ``n < N`` and split ``s < S``, with ``W = Wm[wbase:]`` as ``[N, I]`` (one
    contiguous row per output, stored as ``kind``: :mod:`.halves`).  The inputs ``X[b, k]`` are
    themselves the sum of ``XS`` partial sums (``X`` as ``[XS, B, I]``), plus ``Wt[xbias + k]``
    and a ReLU when ``XACT`` (fc2 reading fc1's split sums).

    A work item (batch pass, tile of ``TN`` outputs, split) is one block's; the block stages
    ``KC`` inputs of its ``TM`` rows and ``TN`` weight rows at a time in shared memory, k-major
    (``Xs[k][m]``, ``Ws[k][n]``: the transposes of how they lie in memory), so that a thread reads
    four consecutive rows or outputs of one input as one 16-byte shared load; its ``RM x CN`` sums
    stay in registers.  As in :mod:`.gemm`'s second kernel: the next chunk's global loads (four
    elements at once -- 16 bytes, 8 for half weights, widened as they arrive -- where rows are
    multiples of 4 long, element by element otherwise)
    are in flight in registers while the current chunk's products run from the other of two
    shared buffers (one barrier a chunk); the chunk's ``KC`` steps are written out, each step's
    shared loads at constant offsets.  Staging: consecutive threads take the two 16-byte halves of
    one 32-byte sector of a row, then the next row -- a warp reads 16 rows' sectors whole, and its
    transposing shared stores (rows ``TM + PAD`` / ``TN + PAD`` long, 4 mod 8 floats) fall in 32
    distinct banks.  ``prefetch``: the weights of the chunk ``prefetch`` ahead of the one being
    loaded are asked of the L2 cache (:data:`PREFETCH`).  Generated with the shapes written in as
    constants."""
    TM, TN, TY, TX, RM, CN = tile_shape(RB, tile)
    KC = tile_chunk(RB, tile)
    NCH, TILES, NT = cdiv(I, KC), cdiv(N, TN), THREADS
    SX, SW = TM + PAD, TN + PAD               # a staged k row's length (floats)
    Q = KC // 4                               # 4-input groups of a staged row
    GN = CN // 4                              # a thread's groups of 4 outputs
    HN = 4 * TX                               # distance between them
    vec_w = I % 4 == 0                        # 16-byte weight loads (8 for half weights)
    vec_x = I % 4 == 0                        # 16-byte input loads

    def geometry(R, name):
        # staging of an R x KC operand tile: group e = tid + p * NT (p < P) is row r = (e // 2) %
        # R, inputs 4 * (2 * (e // (2 R)) + e % 2) ..  + 3 of the chunk (in-chunk offset 'k')
        P = cdiv(R * Q, NT)
        out = []
        for p in range(P):
            out += [f"e = tid + {p * NT}", f"{name}v{p} = e < {R * Q}"]
            if Q == 1:                        # (the simulator's 4-input chunks)
                out += [f"{name}r{p} = e % {R}", f"{name}k{p} = 0"]
            else:
                out += [f"{name}r{p} = (e // 2) % {R}", f"{name}k{p} = 4 * (2 * (e // {2 * R}) + e % 2)"]
        return P, out

    PX, geo_x = geometry(TM, "x")
    PW, geo_w = geometry(TN, "w")

    def fetch(ind):
        # chunk c's groups into registers px{p}_{j}, pw{p}_{j} (zeros outside the product)
        out = []
        for p in range(PX):
            out += [f"{ind}b = r0 + xr{p}", f"{ind}k = c * {KC} + xk{p}",
                    f"{ind}ok = xv{p} and b < B and k < {I}"]
            if vec_x:
                out += [f"{ind}o = (b * {I} + k) if ok else 0"]
                out += [f"{ind}v = ld4(X, o)"] + [f"{ind}px{p}_{j} = v[{j}]" for j in range(4)]
                for q in range(1, XS):
                    out += [f"{ind}v = ld4(X, o + {q} * B * {I})"]
                    out += [f"{ind}px{p}_{j} += v[{j}]" for j in range(4)]
                if XACT:
                    out += [f"{ind}v = ld4(Wt, (xbias + k) if ok else 0)"]
                    out += [f"{ind}px{p}_{j} = max(px{p}_{j} + v[{j}], float32(0))" for j in range(4)]
                out += [f"{ind}px{p}_{j} = px{p}_{j} if ok else float32(0)" for j in range(4)]
            else:
                for j in range(4):
                    out += [f"{ind}px{p}_{j} = float32(0)", f"{ind}if ok and k + {j} < {I}:"]
                    out += [f"{ind}    px{p}_{j} += X[({q} * B + b) * {I} + k + {j}]" for q in range(XS)]
                    if XACT:
                        out += [f"{ind}    px{p}_{j} = max(px{p}_{j} + Wt[xbias + k + {j}], float32(0))"]
        for p in range(PW):
            out += [f"{ind}n = n0 + wr{p}", f"{ind}k = c * {KC} + wk{p}",
                    f"{ind}ok = wv{p} and n < {N} and k < {I}"]
            if vec_w:
                out += [f"{ind}v = ld4(Wm, (wbase + n * {I} + k) if ok else 0)"]
                out += [f"{ind}pw{p}_{j} = wid(v[{j}]) if ok else float32(0)" for j in range(4)]
            else:
                for j in range(4):
                    out += [f"{ind}pw{p}_{j} = float32(0)", f"{ind}if ok and k + {j} < {I}:",
                            f"{ind}    pw{p}_{j} = ld(Wm, wbase + n * {I} + k + {j})"]
        return out

    def ask_l2(ind, chunk):
        # the weights of chunk 'chunk' (if it is one of the item's) to the L2 cache
        out = [f"{ind}if {chunk} < c_end:", f"{ind}    k = ({chunk}) * {KC}"]
        for p in range(PW):
            out += [f"{ind}    n = n0 + wr{p}",
                    f"{ind}    if wv{p} and n < {N} and k + wk{p} < {I}:",
                    f"{ind}        prefetch_l2(Wm, wbase + n * {I} + k + wk{p})"]
        return out

    def store(ind, buf):
        # the registers into shared buffer 'buf', transposed (k-major)
        out = []
        for name, P, SR, arr in (("x", PX, SX, "Xs"), ("w", PW, SW, "Ws")):
            for p in range(P):
                out += [f"{ind}if {name}v{p}:"]
                out += [f"{ind}    {arr}[({buf} * {KC} + {name}k{p} + {j}) * {SR} + {name}r{p}] = p{name}{p}_{j}"
                        for j in range(4)]
        return out

    def frag(ind, s, k):
        # step k's fragments into slot s: RM rows (one 16-byte load when four), CN outputs
        if RM == 4:
            out = [f"{ind}v = ld4(Xs, xs + {k * SX})"] + [f"{ind}fa{s}_{i} = v[{i}]" for i in range(4)]
        else:
            out = [f"{ind}fa{s}_{i} = Xs[xs + {k * SX + i}]" for i in range(RM)]
        for g in range(GN):
            out += [f"{ind}v = ld4(Ws, ws + {k * SW + g * HN})"]
            out += [f"{ind}fb{s}_{4 * g + j} = v[{j}]" for j in range(4)]
        return out

    L = ["def tile_stage(Wt, Wm, wbase, X, xbias, B, dst, Xs, Ws, red):     # red: unused",
         "    tid = cuda.threadIdx.x & 1023",
         f"    tx4 = (tid % {TX}) * 4",
         f"    ty = (tid // {TX}) * {RM}"]
    L += ["    " + x for x in geo_x + geo_w]
    L += [f"    items = ((B + {TM - 1}) // {TM}) * {TILES * S}",
          "    item = cuda.blockIdx.x & 0x7FFFFFFF",
          "    while item < items:",
          f"        s = item % {S}",
          f"        t = item // {S}",
          f"        n0 = (t % {TILES}) * {TN}",
          f"        r0 = (t // {TILES}) * {TM}"]
    L += [f"        a{i}_{j} = float32(0)" for i in range(RM) for j in range(CN)]
    L += [f"        c = s * {CPS}", f"        c_end = min(c + {CPS}, {NCH})", "        buf = 0"]
    L += fetch("        ")
    for d in range(1, prefetch + 1):
        L += ask_l2("        ", f"c + {d}")
    L += store("        ", "0")
    L += ["        cuda.syncthreads()",
          "        while c < c_end:",
          f"            xs = buf * {KC * SX} + ty",
          f"            ws = buf * {KC * SW} + tx4",
          "            c += 1",
          "            more = c < c_end",
          "            if more:"]
    L += fetch("                ")
    if prefetch:
        L += ask_l2("                ", f"c + {prefetch}")
    L += frag("            ", 0, 0)
    for k in range(KC):
        s = k & 1
        if k + 1 < KC:
            L += frag("            ", s ^ 1, k + 1)
        L += [f"            a{i}_{j} += fa{s}_{i} * fb{s}_{j}" for i in range(RM) for j in range(CN)]
    L += ["            if more:"]
    L += store("                ", "(buf ^ 1)")
    L += ["            cuda.syncthreads()",
          "            buf ^= 1"]
    for i in range(RM):
        L += [f"        b = r0 + ty + {i}"]
        for g in range(GN):
            for j in range(4):
                L += [f"        n = n0 + {g * HN} + tx4 + {j}",
                      f"        if b < B and n < {N}:",
                      f"            dst[(s * B + b) * {N} + n] = a{i}_{4 * g + j}"]
    L += ["        item += cuda.gridDim.x"]
    scope = {"cuda": cuda, "float32": float32, "ld": make_load(kind), "ld4": ld4, "prefetch_l2": prefetch_l2,
             "wid": WIDEN[kind]}
    generated(L, f"decode tile_stage {I}x{N} S{S} XS{XS}{' act' if XACT else ''} RB{RB} {kind} {tile} "
              f"prefetch {prefetch}",
              scope)
    return cuda.jit(device=True)(scope["tile_stage"])
