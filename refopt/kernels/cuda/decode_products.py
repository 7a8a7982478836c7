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
  shared memory, with the next chunk's loads in flight during the current chunk's products; a
  product with fewer tiles than the grid has blocks is split over its inputs (split-K, the
  :class:`Plan`), and the stage that reads it adds the partial sums in a fixed order (so the
  result does not depend on timing).  Per-output warps at batch 32 re-read every activation row
  for every weight row and were bound by those loads.

Both kinds are generated per shape (the widths written in as constants) and take the same
arguments, ``(Wt, Wm, wbase, X, eoff, B, dst, Xs, Ws, red)``, so that the kernel calls either
alike: the weights are read from ``Wm`` (float32, or bfloat16 / float16 widened as they are read:
:mod:`.halves`), biases from the float32 buffer ``Wt``.

Names: ``RB`` rows of a batch pass, ``I`` inputs and ``N`` outputs of a product, ``TM x TN`` a
tile (rows x outputs), ``TY x TX`` its threads, ``RM x CN`` the sums a thread keeps, ``KC``
inputs staged a pass, ``S`` split-K slices, ``CPS`` input chunks a slice, ``U`` unrolling of the
tile loop, ``XS`` partial sums the inputs are made of, ``XACT`` the inputs' bias and ReLU
(fc2 reading fc1's sums), ``WL`` lanes of a warp, ``NW`` warps of a block, ``NT`` threads a
block, ``NCH`` chunks of ``KC`` inputs, ``TILES`` tiles of outputs, ``KP = KC + 1`` a staged row's
padded length, ``RS`` rows the block stages at once (``NXE`` / ``NWE`` staging rounds for the
inputs / weights).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from numba import cuda, float32

from refopt.kernels.cuda._common import SIM, SIMULATOR, cdiv
from refopt.kernels.cuda.decode_stages import THREADS, WL
from refopt.kernels.cuda.halves import make_load


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
KC = 4 if SIM else 32                 # inputs staged through shared memory per pass of a tile
TILED_FROM = 8                        # batch passes of at least this many rows take tiled products


#: ``(rows, outputs)`` of the sums one thread of a tiled product keeps (the register tile): each
#: input staged in shared memory is read by a thread once per row and once per output, so the
#: shared-memory loads per multiply-add are ``1 / rows + 1 / outputs``.  Two rows by four outputs
#: (0.75 loads a multiply-add) unless :data:`TILE_BY_ROWS` names the batch pass's rows.
TILE = (2, 4)
#: register tiles of particular batch passes (``RB`` rows).  On an H200 (``benchmarks/GPU.md``,
#: 2026-12-02) batch 32 ran 3.55 ms a step with 2 x 2, 3.38-3.48 with 2 x 4, 3.33 with 4 x 4 (56
#: bytes of spills); passes of 8 rows keep 2 x 2: their tiles are wide (``TN = 4 * THREADS /
#: (RB / rows)``), so 2 x 4 needs 46.6 KB of shared memory and 4 x 4 more than the 48 KB allowed.
TILE_BY_ROWS = {8: (2, 2), 32: (4, 4)}


def tile_shape(RB: int, tile=(2, 2)):
    """``(TM, TN, TY, TX, RM, CN)`` of a tiled product for a batch pass of ``RB`` rows and a
    thread's register tile ``tile`` (:data:`TILE`): a tile is ``TM = RB`` rows by ``TN`` outputs;
    thread ``(tx, ty)`` of the block (``TX * TY`` threads) computes rows ``ty + i * TY`` (``i <
    RM``) and outputs ``tx + j * TX`` (``j < CN``)."""
    rows, CN = tile
    TY = max(1, min(RB // rows, THREADS // 2))
    TX = THREADS // TY
    return RB, CN * TX, TY, TX, RB // TY, CN


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
    tile: tuple = (2, 2)              # a thread's register tile (:func:`tile_shape`)


def split_target() -> int:
    """Work items a split product aims for: two per SM (a few under the simulator, so that its
    tests split)."""
    if SIMULATOR:
        return 8
    return 2 * cuda.get_current_device().MULTIPROCESSOR_COUNT


def product_plan(D: int, F: int, RB: int, target: int, tile=None) -> Plan:
    """The :class:`Plan` of a batch pass of ``RB`` rows (warp products below :data:`TILED_FROM`
    rows, whole sums) with register tiles ``tile`` (default :data:`TILE_BY_ROWS` or :data:`TILE`)."""
    if RB < TILED_FROM:
        return Plan(False, (1, 1), (1, 1), (1, 1), (1, 1))
    tile = tuple(TILE_BY_ROWS.get(RB, TILE) if tile is None else tile)
    TN = tile_shape(RB, tile)[1]

    def split(N, I):
        tiles, chunks = cdiv(N, TN), cdiv(I, KC)
        per = cdiv(chunks, max(1, min(chunks, cdiv(target, tiles))))
        return cdiv(chunks, per), per
    return Plan(True, split(3 * D, D), split(D, D), split(F, D), split(D, F), tile)


@functools.lru_cache(maxsize=None)
def make_tile_stage(I: int, N: int, S: int, CPS: int, XS: int, XACT: bool, RB: int, U: int = 1,
                    kind: str = "float32", tile=(2, 2)):
    """``tile_stage(Wt, Wm, wbase, X, xbias, B, dst, Xs, Ws, red)``: one stage of the persistent kernel,
    ``dst[s, b, n] = sum over split s's inputs k of X[b, k] * W[n, k]`` for every row ``b < B``,
    output ``n < N`` and split ``s < S``, with ``W = Wm[wbase:]`` as ``[N, I]`` (one contiguous row
    per output, stored as ``kind``: :mod:`.halves`).  Each work item (batch pass, tile of ``TN`` outputs, split) is one block's: it
    stages ``TM x KC`` inputs and ``TN x KC`` weights at a time through shared memory (``Xs``,
    ``Ws``; rows padded to ``KC + 1`` against bank conflicts, every global load a contiguous run)
    and keeps ``RM x CN`` sums in registers (the chunk's products unrolled, at constant offsets);
    the next chunk's loads are issued into registers before the current chunk's products, so their
    latency overlaps the arithmetic.  The inputs ``X[b, k]`` are themselves the sum of ``XS``
    partial sums (``X`` as ``[XS, B, I]``), plus ``Wt[xbias + k]`` and a ReLU when
    ``XACT`` (fc2 reading fc1's split sums).  ``U``: inputs per pass of the product loop (unrolled).
    Generated with the shapes written in as constants."""
    TM, TN, TY, TX, RM, CN = tile_shape(RB, tile)
    NCH, TILES, NT, KP = cdiv(I, KC), cdiv(N, TN), THREADS, KC + 1
    assert NT % KC == 0
    U = math.gcd(U, KC)
    RS = NT // KC                     # staging: thread tid fills column tid % KC of rows tid // KC + RS m
    NXE, NWE = cdiv(TM, RS), cdiv(TN, RS)

    def fetch(ind):
        # chunk c's inputs and weights into registers px*, pw* (issued a chunk ahead)
        out = [f"{ind}k = c * {KC} + tcol"]
        for m in range(NXE):
            out += [f"{ind}px{m} = float32(0)", f"{ind}b = r0 + trow + {m * RS}",
                    f"{ind}if trow + {m * RS} < {TM} and b < B and k < {I}:",
                    f"{ind}    px{m} = X[b * {I} + k]"]
            out += [f"{ind}    px{m} += X[({q} * B + b) * {I} + k]" for q in range(1, XS)]
            if XACT:
                out += [f"{ind}    px{m} = max(px{m} + Wt[xbias + k], float32(0))"]
        for m in range(NWE):
            out += [f"{ind}pw{m} = float32(0)", f"{ind}n = n0 + trow + {m * RS}",
                    f"{ind}if trow + {m * RS} < {TN} and n < {N} and k < {I}:",
                    f"{ind}    pw{m} = ld(Wm, wbase + n * {I} + k)"]
        return out

    src = ["def tile_stage(Wt, Wm, wbase, X, xbias, B, dst, Xs, Ws, red):     # red: unused",
           "    tid = cuda.threadIdx.x",
           f"    tx = tid % {TX}",
           f"    ty = tid // {TX}",
           f"    tcol = tid % {KC}",
           f"    trow = tid // {KC}",
           f"    tslot = trow * {KP} + tcol",
           f"    items = ((B + {TM - 1}) // {TM}) * {TILES * S}",
           "    item = cuda.blockIdx.x",
           "    while item < items:",
           f"        s = item % {S}",
           f"        t = item // {S}",
           f"        n0 = (t % {TILES}) * {TN}",
           f"        r0 = (t // {TILES}) * {TM}"]
    src += [f"        a{i}_{j} = float32(0)" for i in range(RM) for j in range(CN)]
    src += [f"        c = s * {CPS}", f"        c_end = min(c + {CPS}, {NCH})"]
    src += fetch("        ")
    src += ["        while c < c_end:"]
    for m in range(NXE):
        src += [f"            if trow + {m * RS} < {TM}:", f"                Xs[tslot + {m * RS * KP}] = px{m}"]
    for m in range(NWE):
        src += [f"            if trow + {m * RS} < {TN}:", f"                Ws[tslot + {m * RS * KP}] = pw{m}"]
    src += ["            cuda.syncthreads()",
            "            c += 1",
            "            if c < c_end:"]
    src += fetch("                ")
    src += [f"            for kb in range(0, {KC}, {U}):"]
    for u in range(U):                        # U inputs a pass, at constant offsets
        src += [f"                x{i} = Xs[(ty + {i * TY}) * {KP} + kb + {u}]" for i in range(RM)]
        src += [f"                w{j} = Ws[(tx + {j * TX}) * {KP} + kb + {u}]" for j in range(CN)]
        src += [f"                a{i}_{j} += x{i} * w{j}" for i in range(RM) for j in range(CN)]
    src += ["            cuda.syncthreads()"]
    for i in range(RM):
        for j in range(CN):
            src += [f"        b = r0 + ty + {i * TY}",
                    f"        n = n0 + tx + {j * TX}",
                    f"        if b < B and n < {N}:",
                    f"            dst[(s * B + b) * {N} + n] = a{i}_{j}"]
    src += ["        item += cuda.gridDim.x"]
    scope = {"cuda": cuda, "float32": float32, "ld": make_load(kind)}
    exec("\n".join(src), scope)                              # noqa: S102  (generated, no input)
    return cuda.jit(device=True)(scope["tile_stage"])
