"""Device-resident generation: weights, KV cache and tokens stay on the GPU; the host only starts
kernels and reads the tokens back to stream them out.

Why a persistent kernel
-----------------------
A decode step of OPT-125m is about a hundred small operations, and a ``numba.cuda`` launch costs
some 20 microseconds from Python: launched one by one they would cost more than the arithmetic.
So one decode step -- embedding, every layer (norm, q/k/v, attention over the cache, output
projection, norm, MLP), final norm, tied LM head, the sampler -- is **one cooperative kernel**:
its blocks stay resident and pass from one stage to the next through ``grid.sync()``, and several
steps can run in one launch (the tokens go to a device buffer the host reads between launches).

Stages (each a loop over its work, spread over every warp or block of the grid):

====================  ========================================================================
embed                 ``x[b] = embed[token] (@ project_in) + positions[index - 1]``
norm                  one block per row: the pending products' partial sums and bias join the
                      residual ``x``, then LayerNorm -> ``xn`` (or in place, post-LN models)
q/k/v                 the product ``xn @ Wqkv^T`` (below), partial sums ``[S, B, 3D]``
attention             one block per (row, head): adds its head's q/k/v sums and biases, stores
                      k and v in the cache ``[B, L, 2, T, H, K]`` at the position, then scores
                      against the cached keys (a warp per position) in shared memory, softmax,
                      weighted sum of the cached values
out / fc1 / fc2       products; fc1's bias and ReLU are applied where fc2 reads its sums, the
                      residual additions in the norm stages after out and fc2
LM head               the tied token table, logits ``[B, V]``
softmax               ``softmax(logits / temperature)`` over the whole grid: each row in slices,
                      a block per slice (slice maxima, then slice sums, then normalisation and,
                      for greedy, the slices' first maxima), partials combined in slice order
sample                one block per row: the sampler's rule (:mod:`.sampling`), the prompt's own
                      token kept where the prompt mask is set, stop tokens counted
====================  ========================================================================

Two kinds of product, chosen by the batch pass ``RB`` (the batch rounded up to a power of two,
at most 32 rows a pass):

* ``RB < 8``, **warp products**: one warp per output feature, all rows at once (weights
  ``[out, in]``, one contiguous row per output, streamed once).  Lane ``j`` takes inputs
  ``j, j + 32, ...``, so each load of the warp reads one contiguous 128-byte run of the weight
  row and of every activation row; ``RB`` accumulators, reduced over the warp so that lane ``b``
  ends with row ``b``'s output (a transposing butterfly of shuffles; shared memory under the
  simulator).
* ``RB >= 8``, **tiled products** (:func:`make_tile_stage`): a block computes a tile of ``RB``
  rows by ``TN`` outputs, staging 32 inputs of the rows and of the weights at a time through
  shared memory, with the next chunk's loads in flight during the current chunk's products; a
  product with fewer tiles than the grid has blocks is split over its inputs (split-K, the
  :class:`Plan`), and the stage that reads it adds the partial sums in a fixed order (so the
  result does not depend on timing).  Per-output warps at batch 32 re-read every activation row
  for every weight row and were bound by those loads.

Where the time goes (step times, per-stage shares, what was tried) is measured by
``benchmarks/profile_decode.py`` and recorded in ``benchmarks/GPU.md``.

Short names (a legend): ``B`` rows of the batch, ``RB`` rows of one batch pass (a power of two,
at most 32), ``T`` positions of the cache, ``D`` hidden width, ``E`` embedding width, ``F`` MLP
width, ``V`` vocabulary, ``L`` layers, ``H`` heads, ``K`` head width, ``P`` position-table rows,
``S`` split-K slices of a product, ``TN`` outputs of a tile, ``CPS`` input chunks per slice,
``U`` unrolling of the tile loop, ``Wt`` the packed weights, ``xn`` the normalised rows.

The prompt is prefilled with the general kernels (tiled products, flash attention) before the
first step.  Numbers are float32; the sampler reproduces the NumPy samplers' rules exactly, so a
seed gives the same tokens as on the CPU wherever the probabilities agree (they are computed in a
different order, so they agree to rounding, not bit for bit).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import cuda, float32, float64, int32, int64

from refopt.kernels.cuda import attention as _attn
from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda import rows as _rows
from refopt.kernels.cuda._common import SIM, SIMULATOR, cdiv, empty, kernel
from refopt.kernels.cuda.sampling import (
    philox_uniform, pow2, row_argmax, row_choose, row_top_k, row_top_p)

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

THREADS = 8 if SIM else 32 if SIMULATOR else 256    # threads per block of the persistent kernel
WL = min(32, THREADS)                 # lanes of a warp (the simulator's blocks are narrower)
SAMPLERS = ("greedy", "random", "top_k", "top_p", "min_p")

#: The stages a step's profile marks (``PROFILE``, :func:`stage_times`), by name; each mark closes
#: the interval since the previous one.
STAGES = ("embed", "norm 1", "q k v", "attention", "out", "norm 2", "fc1", "fc2", "norm 2 (post)",
          "final norm", "projection out", "head", "sample", "next", "softmax")
(EMBED, NORM_1, QKV, ATTENTION, OUT, NORM_2, FC1, FC2, NORM_2_POST, FINAL_NORM, PROJECTION_OUT, HEAD,
 SAMPLE, NEXT, SOFTMAX) = range(len(STAGES))
CHUNK = 1024                          # attention scores kept in shared memory per pass
MIN_BLOCKS = 1                        # blocks per SM the step kernel's registers must allow
PROFILE = False                       # record stage times (see make_step_kernel)
UNROLL = 8                            # inputs per pass of a tiled product's loop (8: fastest of
                                      # 1, 8, 32 at batch 32 on an H100)
BLOCKS_PER_SM = 2                     # most resident blocks per SM the cooperative grid takes


def _align4(n: int) -> int:
    return (n + 3) // 4 * 4


# ----------------------------------------------------------------------------- weights
class Layout:
    """Offsets (float32 elements) of every weight in one flat, 16-byte aligned device buffer."""

    def __init__(self, cfg):
        D, E, F, V = cfg.hidden_dim, cfg.word_embed_proj_dim, cfg.intermediate_dim, cfg.vocabulary_size
        self.D, self.E, self.F, self.V = D, E, F, V
        self.L, self.H, self.P = cfg.num_layers, cfg.num_heads, cfg.max_sequence_length
        self.K = D // self.H
        off = 0
        self.layer = {}
        for name, size in (("ln1_g", D), ("ln1_b", D), ("wqkv", 3 * D * D), ("bqkv", 3 * D),
                           ("wo", D * D), ("bo", D), ("ln2_g", D), ("ln2_b", D), ("w1", F * D),
                           ("b1", F), ("w2", D * F), ("b2", D)):
            self.layer[name] = off
            off += _align4(size)
        self.layer_stride = off
        off *= self.L
        self.glob = {}
        for name, size in (("embed", V * E), ("pos", self.P * D), ("lnf_g", D), ("lnf_b", D),
                           ("proj_in", D * E), ("proj_out", E * D)):
            self.glob[name] = off
            off += _align4(size)
        self.size = off


def pack_weights(params, cfg) -> np.ndarray:
    """The model's parameters in one float32 array laid out as :class:`Layout` (absent LayerNorm
    gains are ones, absent biases and offsets zeros: the same numbers)."""
    lay = Layout(cfg)
    flat = np.zeros(lay.size, np.float32)
    D, E, F = lay.D, lay.E, lay.F

    def put(off, value, size):
        flat[off:off + size] = np.asarray(value, np.float32).reshape(-1)

    def get(name, shape, fill):
        v = params.get(name)
        return np.full(shape, fill, np.float32) if v is None else np.asarray(v, np.float32)

    for i in range(lay.L):
        base = i * lay.layer_stride
        p = f"layers.{i}."
        o = lay.layer
        put(base + o["ln1_g"], get(p + "self_attn_layer_norm.gamma", D, 1.0), D)
        put(base + o["ln1_b"], get(p + "self_attn_layer_norm.beta", D, 0.0), D)
        wqkv = np.concatenate([np.asarray(params[p + f"{n}_proj.weight"], np.float32)
                               for n in ("q", "k", "v")])
        put(base + o["wqkv"], wqkv, 3 * D * D)
        put(base + o["bqkv"], np.concatenate([get(p + f"{n}_proj.bias", D, 0.0) for n in "qkv"]), 3 * D)
        put(base + o["wo"], params[p + "out_proj.weight"], D * D)
        put(base + o["bo"], get(p + "out_proj.bias", D, 0.0), D)
        put(base + o["ln2_g"], get(p + "mlp_layer_norm.gamma", D, 1.0), D)
        put(base + o["ln2_b"], get(p + "mlp_layer_norm.beta", D, 0.0), D)
        put(base + o["w1"], params[p + "fc1.weight"], F * D)
        put(base + o["b1"], get(p + "fc1.bias", F, 0.0), F)
        put(base + o["w2"], params[p + "fc2.weight"], D * F)
        put(base + o["b2"], get(p + "fc2.bias", D, 0.0), D)
    g = lay.glob
    put(g["embed"], params["embed_tokens"], lay.V * E)
    pos = np.asarray(params["embed_positions"], np.float32)
    put(g["pos"], pos[:lay.P], lay.P * D)
    put(g["lnf_g"], get("final_layer_norm.gamma", D, 1.0), D)
    put(g["lnf_b"], get("final_layer_norm.beta", D, 0.0), D)
    if "project_in.weight" in params:
        put(g["proj_in"], params["project_in.weight"], D * E)
        put(g["proj_out"], params["project_out.weight"], E * D)
    return flat


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
def _make_warp_dot(RB: int, width: int = 0):
    """``warp_dot(W, base, I, X, xrow0, B, lane, red, warp)``: the dot products of ``W[base:base+I]``
    with rows ``xrow0 .. xrow0+B-1`` of ``X`` (``B <= RB``), summed over the warp; lane ``b``
    returns row ``b``'s.  On the GPU the function is generated with ``RB`` scalar accumulators
    (registers, whatever the compiler unrolls) and the row width ``width`` written in as a
    constant (a known trip count: the loop unrolls and a lane's loads are all in flight at once);
    under the simulator it reduces through shared memory."""
    if not SIM:
        assert width > 0
        I = width
        full = I // (4 * WL)                  # passes in which every lane has four inputs
        body = ["def warp_dot(W, base, I, X, xrow0, B, lane, red, warp):"]
        body += [f"    a{r} = float32(0)" for r in range(RB)]

        def four(indent):
            # inputs i0, i0 + WL, i0 + 2 WL, i0 + 3 WL: each load of the warp reads one
            # contiguous run of 128 bytes (one L1 wavefront), of the weights and of every x row
            out = [f"{indent}w{e} = W[base + i0 + {e * WL}]" for e in range(4)]
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
                     f"        if i0 < {I}:", "            w = W[base + i0]",
                     f"            xb = xrow0 * {I} + i0"]
            for r in range(RB):
                body += [f"            if {r} < B:", "                a%d += w * X[xb]" % r,
                         f"            xb += {I}"]
            body += [f"        i0 += {WL}"]
        body += ["    " + line for line in reduction_source(RB)]
        body += ["    return a0"]
        scope = {"cuda": cuda, "float32": float32, "WL": WL}
        exec("\n".join(body), scope)                      # noqa: S102  (generated, no input)
        return cuda.jit(device=True)(scope["warp_dot"])

    @cuda.jit(device=True)
    def warp_dot(W, base, I, X, xrow0, B, lane, red, warp):
        acc = cuda.local.array(RB, float32)
        for r in range(RB):
            acc[r] = float32(0)
        i0 = lane
        while i0 < I:                     # inputs lane, lane + WL, lane + 2 WL, ...
            w = W[base + i0]
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
def make_warp_stage(RB: int, I: int, N: int, epilogue: str = "store"):
    """``warp_stage(Wt, wbase, X, eoff, B, dst, Xs, Ws, red)``: one stage of the persistent kernel with
    warp products (batch passes below :data:`TILED_FROM` rows): output ``o < N`` of every row
    ``b < B`` is ``X[b] . W[o]`` with ``W = Wt[wbase:]`` as ``[N, I]``, one warp per output; it
    goes to ``dst[b, o]`` as it is (``"store"``), plus ``Wt[eoff + o]`` (``"add"``), or plus that
    bias through a ReLU (``"bias_relu"``).  ``Xs, Ws`` are unused: the signature is
    :func:`make_tile_stage`'s, so that the kernel calls either kind alike."""
    assert epilogue in ("store", "add", "bias_relu")
    dot = _make_warp_dot(RB, I)
    NW = THREADS // WL
    add = epilogue != "store"
    relu = epilogue == "bias_relu"

    @cuda.jit(device=True)
    def warp_stage(Wt, wbase, X, eoff, B, dst, Xs, Ws, red):
        tid = cuda.threadIdx.x
        lane = tid % WL
        warp = tid // WL
        gwarp = cuda.blockIdx.x * NW + warp
        nwarps = cuda.gridDim.x * NW
        for r in range((N + nwarps - 1) // nwarps):
            o = r * nwarps + gwarp
            oo = o if o < N else 0               # every warp takes part in the shuffles
            for c0 in range(0, B, RB):
                s = dot(Wt, wbase + oo * I, I, X, c0, min(RB, B - c0), lane, red, warp)
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


def tile_shape(RB: int):
    """``(TM, TN, TY, TX, RM, CN)`` of a tiled product for a batch pass of ``RB`` rows: a tile is
    ``TM = RB`` rows by ``TN`` outputs; thread ``(tx, ty)`` of the block (``TX * TY`` threads)
    computes rows ``ty + i * TY`` (``i < RM``) and outputs ``tx + j * TX`` (``j < CN = 2``)."""
    TY = max(1, min(RB // 2, THREADS // 2))
    TX = THREADS // TY
    return RB, 2 * TX, TY, TX, RB // TY, 2


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


def split_target() -> int:
    """Work items a split product aims for: two per SM (a few under the simulator, so that its
    tests split)."""
    if SIMULATOR:
        return 8
    return 2 * cuda.get_current_device().MULTIPROCESSOR_COUNT


def product_plan(D: int, F: int, RB: int, target: int) -> Plan:
    """The :class:`Plan` of a batch pass of ``RB`` rows (warp products below :data:`TILED_FROM`
    rows, whole sums)."""
    if RB < TILED_FROM:
        return Plan(False, (1, 1), (1, 1), (1, 1), (1, 1))
    TN = tile_shape(RB)[1]

    def split(N, I):
        tiles, chunks = cdiv(N, TN), cdiv(I, KC)
        per = cdiv(chunks, max(1, min(chunks, cdiv(target, tiles))))
        return cdiv(chunks, per), per
    return Plan(True, split(3 * D, D), split(D, D), split(F, D), split(D, F))


@functools.lru_cache(maxsize=None)
def make_tile_stage(I: int, N: int, S: int, CPS: int, XS: int, XACT: bool, RB: int, U: int = 1):
    """``tile_stage(Wt, wbase, X, xbias, B, dst, Xs, Ws, red)``: one stage of the persistent kernel,
    ``dst[s, b, n] = sum over split s's inputs k of X[b, k] * W[n, k]`` for every row ``b < B``,
    output ``n < N`` and split ``s < S``, with ``W = Wt[wbase:]`` as ``[N, I]`` (one contiguous row
    per output).  Each work item (batch pass, tile of ``TN`` outputs, split) is one block's: it
    stages ``TM x KC`` inputs and ``TN x KC`` weights at a time through shared memory (``Xs``,
    ``Ws``; rows padded to ``KC + 1`` against bank conflicts, every global load a contiguous run)
    and keeps ``RM x CN`` sums in registers (the chunk's products unrolled, at constant offsets);
    the next chunk's loads are issued into registers before the current chunk's products, so their
    latency overlaps the arithmetic.  The inputs ``X[b, k]`` are themselves the sum of ``XS``
    partial sums (``X`` as ``[XS, B, I]``), plus ``Wt[xbias + k]`` and a ReLU when
    ``XACT`` (fc2 reading fc1's split sums).  ``U``: inputs per pass of the product loop (unrolled).
    Generated with the shapes written in as constants."""
    TM, TN, TY, TX, RM, CN = tile_shape(RB)
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
                    f"{ind}    pw{m} = Wt[wbase + n * {I} + k]"]
        return out

    src = ["def tile_stage(Wt, wbase, X, xbias, B, dst, Xs, Ws, red):     # red: unused",
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
    scope = {"cuda": cuda, "float32": float32}
    exec("\n".join(src), scope)                              # noqa: S102  (generated, no input)
    return cuda.jit(device=True)(scope["tile_stage"])


# ----------------------------------------------------------------------------- the step kernel
@functools.lru_cache(maxsize=None)
def make_step_kernel(D, E, F, V, L, H, P, T, RB, pre_ln, final_ln, projection, sampler, eps,
                     layer_stride, layer_offsets, glob_offsets, plan, min_blocks=1, profile=False,
                     unroll=1):
    """The persistent decode kernel for one model shape, cache length ``T``, batch pass ``RB``,
    sampler kind and product :class:`Plan` (everything the loops and offsets depend on is a
    compile-time constant).  ``min_blocks``: blocks per SM the compiler must leave room for (its
    register budget, through the launch bounds); ``profile``: record the SM clock of block 0 after
    every grid synchronisation (``prof[i] = (clock, stage)``, for :func:`stage_times`);
    ``unroll``: the tiled products' ``U``."""
    K = D // H
    LS = layer_stride
    o_ln1g, o_ln1b, o_wqkv, o_bqkv, o_wo, o_bo, o_ln2g, o_ln2b, o_w1, o_b1, o_w2, o_b2 = layer_offsets
    g_embed, g_pos, g_lnfg, g_lnfb, g_pin, g_pout = glob_offsets
    NT = THREADS
    NW = NT // WL
    scale = float32(K ** -0.5)
    GV = max(1, NT // K)                # thread groups of the attention's weighted sum
    tiled = plan.tiled
    Sq, So, S1, S2 = plan.qkv[0], plan.out[0], plan.fc1[0], plan.fc2[0]
    if tiled:
        TM, TN = tile_shape(RB)[:2]
        XSH, WSH = TM * (KC + 1), TN * (KC + 1)
        prod_qkv = make_tile_stage(D, 3 * D, *plan.qkv, 1, False, RB, unroll)
        prod_out = make_tile_stage(D, D, *plan.out, 1, False, RB, unroll)
        prod_fc1 = make_tile_stage(D, F, *plan.fc1, 1, False, RB, unroll)
        prod_fc2 = make_tile_stage(F, D, *plan.fc2, S1, True, RB, unroll)
        prod_head = make_tile_stage(E, V, 1, cdiv(E, KC), 1, False, RB, unroll)
        prod_pin = make_tile_stage(E, D, 1, cdiv(E, KC), 1, False, RB, unroll)
        prod_pout = make_tile_stage(D, E, 1, cdiv(D, KC), 1, False, RB, unroll)
    else:
        XSH = WSH = 1
        prod_qkv = make_warp_stage(RB, D, 3 * D)
        prod_out = make_warp_stage(RB, D, D)
        prod_fc1 = make_warp_stage(RB, D, F, "bias_relu")     # fc2 then reads activations
        prod_fc2 = make_warp_stage(RB, F, D)
        prod_head = make_warp_stage(RB, E, V)
        prod_pin = make_warp_stage(RB, E, D, "add")           # + the position embedding
        prod_pout = make_warp_stage(RB, D, E)
    greedy = sampler == "greedy"
    top_k = sampler in ("top_k", "min_p")
    top_p = sampler == "top_p"
    min_p = sampler == "min_p"
    EPS = float32(eps)
    RED = (NW, WL, RB) if SIM else (1, 1, 1)   # the simulator's warp reductions go through here

    @cuda.jit(device=True)
    def grid_sync():
        cuda.cg.this_grid().sync()

    @cuda.jit(device=True)
    def mark(prof, ps, stage):
        # profiling (``profile``): block 0 records the SM clock and the stage after a grid sync
        if profile:
            if cuda.blockIdx.x == 0 and cuda.threadIdx.x == 0 and ps < prof.shape[0]:
                prof[ps, 0] = clock64()
                prof[ps, 1] = stage
        return ps + 1

    @cuda.jit(device=True)
    def finish_rows(x, part, nparts, bias_off, ln, gamma_off, beta_off, dst, Wt, B, fbuf):
        # for the rows of this block: x[b] += (sum of the nparts partial sums part[s, b] + bias)
        # (nothing when nparts is 0), then dst[b] = LayerNorm(x[b]) when ln (two passes, as the
        # reference; dst may be x)
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        while b < B:
            if nparts > 0:
                for d in range(tid, D, NT):
                    v = float32(0)
                    for s in range(nparts):
                        v += part[(s * B + b) * D + d]
                    x[b * D + d] = x[b * D + d] + (v + Wt[bias_off + d])
            if ln:
                acc = float32(0)
                for d in range(tid, D, NT):
                    acc += x[b * D + d]
                mean = _rows.block_sum(acc, fbuf) / float32(D)
                acc = float32(0)
                for d in range(tid, D, NT):
                    c = x[b * D + d] - mean
                    acc += c * c
                var = _rows.block_sum(acc, fbuf) / float32(D)
                rstd = float32(1) / math.sqrt(var + EPS)
                cuda.syncthreads()
                for d in range(tid, D, NT):
                    dst[b * D + d] = (x[b * D + d] - mean) * rstd * Wt[gamma_off + d] + Wt[beta_off + d]
            cuda.syncthreads()
            b += cuda.gridDim.x

    @kernel(launch_bounds=(NT, min_blocks) if min_blocks > 1 else NT)
    def step(Wt, cache, tokens, pmask, stop_ids, state_i, x, xn, part, part1, ctx, xe, logits, probs,
             wts, cidx, cval, keep, svals, sidx, gpart, gidx, params_f, params_i, prof, B, nsteps):
        # state_i: [0] index (next position to decide), [1] rows finished, [2] stop flag,
        # [3] 1 + a row whose distribution could not be sampled, [4:] row b has stopped
        # part: products' partial sums [S, B, N]; part1: fc1's; gpart, gidx: the softmax's
        # per-slice maxima, sums and first maxima (3 x B x nsl; B x nsl), nsl <= grid / B
        red = cuda.shared.array(RED, float32)
        Xs = cuda.shared.array(XSH, float32)
        Ws = cuda.shared.array(WSH, float32)
        fbuf = cuda.shared.array(NT, float32)
        dbuf = cuda.shared.array(NT, float64)
        ibuf = cuda.shared.array(NT, int64)
        sc = cuda.shared.array(CHUNK, float32)
        qs = cuda.shared.array(128, float32)
        pv = cuda.shared.array(NT, float32)
        tid = cuda.threadIdx.x
        lane = tid % WL
        warp = tid // WL
        temperature = float32(params_f[0])
        top_p_value = params_f[1]
        min_p_value = params_f[2]
        k_value = params_i[0]
        seed_lo = params_i[1]
        seed_hi = params_i[2]
        ps = mark(prof, 0, NEXT)

        for _step in range(nsteps):
            index = state_i[0]
            if index >= T or state_i[2] != 0:
                return                                         # uniform over the grid
            pos = index - 1
            # ---------------------------------------------------------------- embed
            if projection:
                for idx in range(cuda.blockIdx.x * NT + tid, B * E, cuda.gridDim.x * NT):
                    b = idx // E
                    e = idx % E
                    xe[idx] = Wt[g_embed + tokens[b, pos] * E + e]
                grid_sync()
                ps = mark(prof, ps, EMBED)
                if tiled:
                    prod_pin(Wt, g_pin, xe, 0, B, part, Xs, Ws, red)
                    grid_sync()
                    ps = mark(prof, ps, EMBED)
                    for idx in range(cuda.blockIdx.x * NT + tid, B * D, cuda.gridDim.x * NT):
                        x[idx] = part[idx] + Wt[g_pos + pos * D + idx % D]
                else:
                    prod_pin(Wt, g_pin, xe, g_pos + pos * D, B, x, Xs, Ws, red)
            else:
                for idx in range(cuda.blockIdx.x * NT + tid, B * D, cuda.gridDim.x * NT):
                    b = idx // D
                    d = idx % D
                    x[idx] = Wt[g_embed + tokens[b, pos] * E + d] + Wt[g_pos + pos * D + d]
            grid_sync()
            ps = mark(prof, ps, EMBED)

            for l in range(L):
                base = l * LS
                # ------------------------------------------------------------ attention block
                if pre_ln:
                    # the previous layer's fc2 sums join the residual here (none before layer 0)
                    finish_rows(x, part, S2 if l > 0 else 0, base - LS + o_b2, True, base + o_ln1g,
                                base + o_ln1b, xn, Wt, B, fbuf)
                    grid_sync()
                    ps = mark(prof, ps, NORM_1)
                    src = xn
                else:
                    src = x
                prod_qkv(Wt, base + o_wqkv, src, 0, B, part, Xs, Ws, red)
                grid_sync()
                ps = mark(prof, ps, QKV)
                # attention of each (row, head) over cache positions 0 .. pos; the block first
                # adds up its head's q, k, v (partial sums + bias), stores k and v at pos
                item = cuda.blockIdx.x
                while item < B * H:
                    b = item // H
                    hh = item % H
                    kbase = (b * L + l) * 2 * T * H * K
                    vbase = kbase + T * H * K
                    for d in range(tid, K, NT):
                        f = hh * K + d
                        qv = float32(0)
                        kv = float32(0)
                        vv = float32(0)
                        for s_ in range(Sq):
                            pb = (s_ * B + b) * 3 * D
                            qv += part[pb + f]
                            kv += part[pb + D + f]
                            vv += part[pb + 2 * D + f]
                        qs[d] = (qv + Wt[base + o_bqkv + f]) * scale
                        cache[kbase + (pos * H + hh) * K + d] = kv + Wt[base + o_bqkv + D + f]
                        cache[vbase + (pos * H + hh) * K + d] = vv + Wt[base + o_bqkv + 2 * D + f]
                    cuda.syncthreads()
                    top = float32(-math.inf)
                    total = float32(0)
                    acc_d = float32(0)                         # thread tid < K: output column tid
                    for t0 in range(0, index, CHUNK):
                        t1 = min(index, t0 + CHUNK)
                        if SIM:
                            for t in range(t0 + tid, t1, NT):
                                s = float32(0)
                                kp = kbase + (t * H + hh) * K
                                for d in range(K):
                                    s += qs[d] * cache[kp + d]
                                sc[t - t0] = s
                        else:
                            # a warp per position, its lanes across the head (coalesced rows)
                            for t in range(t0 + warp, t1, NW):
                                s = float32(0)
                                kp = kbase + (t * H + hh) * K
                                for d in range(lane, K, WL):
                                    s += qs[d] * cache[kp + d]
                                for w in (16, 8, 4, 2, 1):
                                    s += cuda.shfl_xor_sync(0xFFFFFFFF, s, w)
                                if lane == 0:
                                    sc[t - t0] = s
                        cuda.syncthreads()
                        m = float32(-math.inf)
                        for t in range(t0 + tid, t1, NT):
                            m = max(m, sc[t - t0])
                        m = _rows.block_max(m, fbuf)
                        m_new = max(top, m)
                        alpha = math.exp(top - m_new)
                        psum = float32(0)
                        for t in range(t0 + tid, t1, NT):
                            e = math.exp(sc[t - t0] - m_new)
                            sc[t - t0] = e
                            psum += e
                        psum = _rows.block_sum(psum, fbuf)
                        total = total * alpha + psum
                        top = m_new
                        cuda.syncthreads()
                        # weighted values: GV groups of K threads each take every GV-th position,
                        # then thread d < K adds its column's group sums in order
                        if tid < GV * K:
                            g = tid // K
                            d = tid % K
                            a = float32(0)
                            for t in range(t0 + g, t1, GV):
                                a += sc[t - t0] * cache[vbase + (t * H + hh) * K + d]
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
                grid_sync()
                ps = mark(prof, ps, ATTENTION)
                # out projection (its sums join the residual in the norm stage after it)
                prod_out(Wt, base + o_wo, ctx, 0, B, part, Xs, Ws, red)
                grid_sync()
                ps = mark(prof, ps, OUT)
                if pre_ln:
                    finish_rows(x, part, So, base + o_bo, True, base + o_ln2g, base + o_ln2b, xn,
                                Wt, B, fbuf)
                else:
                    finish_rows(x, part, So, base + o_bo, True, base + o_ln1g, base + o_ln1b, x,
                                Wt, B, fbuf)
                grid_sync()
                ps = mark(prof, ps, NORM_2)
                # ------------------------------------------------------------ MLP block
                # (fc1's bias and ReLU: in its warp stage, or where the tiled fc2 reads its sums)
                prod_fc1(Wt, base + o_w1, src, base + o_b1, B, part1, Xs, Ws, red)
                grid_sync()
                ps = mark(prof, ps, FC1)
                prod_fc2(Wt, base + o_w2, part1, base + o_b1, B, part, Xs, Ws, red)
                grid_sync()
                ps = mark(prof, ps, FC2)
                if not pre_ln:
                    finish_rows(x, part, S2, base + o_b2, True, base + o_ln2g, base + o_ln2b, x,
                                Wt, B, fbuf)
                    grid_sync()
                    ps = mark(prof, ps, NORM_2_POST)

            # ---------------------------------------------------------------- head
            if pre_ln or final_ln:
                finish_rows(x, part, S2 if pre_ln else 0, (L - 1) * LS + o_b2, final_ln, g_lnfg,
                            g_lnfb, xn, Wt, B, fbuf)
                grid_sync()
                ps = mark(prof, ps, FINAL_NORM)
            hsrc = xn if final_ln else x
            if projection:
                prod_pout(Wt, g_pout, hsrc, 0, B, part, Xs, Ws, red)
                grid_sync()
                ps = mark(prof, ps, PROJECTION_OUT)
                hsrc = part
            prod_head(Wt, g_embed, hsrc, 0, B, logits, Xs, Ws, red)
            grid_sync()
            ps = mark(prof, ps, HEAD)

            # ---------------------------------------------------------------- softmax
            # probs = softmax(logits / temperature) over the whole grid: each row's vocabulary
            # in nsl slices, one block each; slice maxima, then slice sums of the exponentials,
            # then every slice divides by its row's total (partials combined in slice order)
            nsl = max(1, min(cuda.gridDim.x // B, (V + NT - 1) // NT))
            sl = (V + nsl - 1) // nsl
            gsz = B * nsl
            item = cuda.blockIdx.x
            while item < gsz:
                b = item // nsl
                lo = (item % nsl) * sl
                hi = min(V, lo + sl)
                top = float32(-math.inf)
                for j in range(lo + tid, hi, NT):
                    top = max(top, logits[b * V + j] / temperature)
                top = _rows.block_max(top, fbuf)
                if tid == 0:
                    gpart[item] = top
                item += cuda.gridDim.x
            grid_sync()
            item = cuda.blockIdx.x
            while item < gsz:
                b = item // nsl
                lo = (item % nsl) * sl
                hi = min(V, lo + sl)
                top = float32(-math.inf)
                for jj in range(nsl):
                    top = max(top, gpart[b * nsl + jj])
                esum = float32(0)
                for j in range(lo + tid, hi, NT):
                    e = math.exp(logits[b * V + j] / temperature - top)
                    probs[b * V + j] = e
                    esum += e
                esum = _rows.block_sum(esum, fbuf)
                if tid == 0:
                    gpart[gsz + item] = esum
                item += cuda.gridDim.x
            grid_sync()
            item = cuda.blockIdx.x
            while item < gsz:
                b = item // nsl
                lo = (item % nsl) * sl
                hi = min(V, lo + sl)
                total = float32(0)
                for jj in range(nsl):
                    total += gpart[gsz + b * nsl + jj]
                for j in range(lo + tid, hi, NT):
                    probs[b * V + j] = probs[b * V + j] / total
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
            grid_sync()
            ps = mark(prof, ps, SOFTMAX)

            # ---------------------------------------------------------------- sample
            b = cuda.blockIdx.x
            while b < B:
                prow = probs[b * V:(b + 1) * V]
                if greedy:
                    # the first maximum: the slices' first maxima, in slice order
                    token = gidx[b * nsl]
                    best = gpart[2 * gsz + b * nsl]
                    for jj in range(1, nsl):
                        if gpart[2 * gsz + b * nsl + jj] > best:
                            best = gpart[2 * gsz + b * nsl + jj]
                            token = gidx[b * nsl + jj]
                else:
                    wrow = wts[b]
                    if top_p:
                        row_top_p(prow, V, top_p_value, min(k_value, V), wrow, svals[b], sidx[b],
                                  svals.shape[1], ibuf)
                    elif top_k:
                        row_top_k(prow, V, k_value, keep[b], ibuf)
                        threshold = 0.0
                        if min_p:
                            threshold = min_p_value * float64(prow[row_argmax(prow, V, dbuf, ibuf)])
                        for j in range(tid, V, NT):
                            pj = prow[j]
                            if min_p:
                                wrow[j] = float64(pj) if (float64(pj) >= threshold or keep[b, j] != 0) else 0.0
                            else:
                                wrow[j] = float64(pj) if keep[b, j] != 0 else 0.0
                    else:
                        for j in range(tid, V, NT):
                            wrow[j] = float64(prow[j])
                    cuda.syncthreads()
                    u = philox_uniform(seed_lo, seed_hi, b, index, 0)
                    token = row_choose(wrow, V, u, cidx[b], cval[b], ibuf)
                if tid == 0:
                    if token < 0:
                        state_i[3] = b + 1                       # an invalid distribution
                        token = 0
                    if pmask[b, index] == 0:
                        tokens[b, index] = token
                        for sidx_ in range(stop_ids.shape[0]):
                            if token == stop_ids[sidx_] and state_i[4 + b] == 0:
                                state_i[4 + b] = 1
                                cuda.atomic.add(state_i, 1, 1)
                cuda.syncthreads()
                b += cuda.gridDim.x
            grid_sync()
            ps = mark(prof, ps, SAMPLE)
            if cuda.blockIdx.x == 0 and tid == 0:
                state_i[0] = index + 1
                if stop_ids.shape[0] > 0 and state_i[1] >= B:
                    state_i[2] = 1
            grid_sync()
            ps = mark(prof, ps, NEXT)

    return step


# ----------------------------------------------------------------------------- prefill
@kernel()
def _embed_rows(Wt, tokens, S, E, D, g_embed, g_pos, projection, out):
    # out[b*S + s] = embed[tokens[b, s]] (+ positions[s] unless projection)
    n = cuda.blockIdx.x
    b = n // S
    s = n % S
    tok = tokens[b, s]
    width = E if projection else D
    for d in range(cuda.threadIdx.x, width, cuda.blockDim.x):
        v = Wt[g_embed + tok * E + d]
        if not projection:
            v = v + Wt[g_pos + s * D + d]
        out[n, d] = v


@kernel()
def _add_positions(x, Wt, S, D, g_pos):
    n = cuda.blockIdx.x
    s = n % S
    for d in range(cuda.threadIdx.x, D, cuda.blockDim.x):
        x[n, d] = x[n, d] + Wt[g_pos + s * D + d]


@kernel()
def _store_kv(qkv, cache, l, S, L, T, H, K, D):
    # cache[b, l, 0/1, s, h, :] = k / v of row b*S + s (columns D.. of qkv)
    n = cuda.blockIdx.x
    b = n // S
    s = n % S
    for f in range(cuda.threadIdx.x, 2 * D, cuda.blockDim.x):
        kv = f // D
        r = f % D
        cache[((((b * L + l) * 2 + kv) * T + s) * H) * K + r] = qkv[n, D + f]


class DeviceModel:
    """A model's weights on the GPU (packed once) and the decode machinery around them."""

    def __init__(self, params, cfg):
        from refopt.errors import BackendError

        if np.dtype(cfg.compute_dtype) != np.float32:
            raise BackendError("cuda decoding runs in float32; this model computes in "
                               f"{cfg.compute_dtype}")
        self.cfg = cfg
        self.lay = Layout(cfg)
        if self.lay.K > 128:
            raise BackendError(f"cuda decoding: head width {self.lay.K} > 128 is not supported")
        self.weights = cuda.to_device(pack_weights(params, cfg))

    def view(self, off, *shape):
        n = int(np.prod(shape))
        return self.weights[off:off + n].reshape(shape)

    # ------------------------------------------------------------------ prefill
    def prefill(self, tokens_dev, B, S, T):
        """Run positions ``0 .. S-1`` of every row; returns the KV cache ``[B, L, 2, T, H, K]``
        (flat) filled there."""
        lay, cfg = self.lay, self.cfg
        D, E, F, L, H, K = lay.D, lay.E, lay.F, lay.L, lay.H, lay.K
        cache = cuda.device_array(B * L * 2 * T * H * K, np.float32)
        if S == 0:
            return cache
        N = B * S
        proj = cfg.has_projection
        g = lay.glob
        eps = cfg.layer_norm_epsilon
        x = empty((N, E if proj else D), np.float32)
        _embed_rows[N, 128](self.weights, tokens_dev, S, E, D, g["embed"], g["pos"], proj, x)
        if proj:
            x = _gemm.gemm(x, self.view(g["proj_in"], D, E), "nt")
            _add_positions[N, 128](x, self.weights, S, D, g["pos"])
        for i in range(L):
            base = i * lay.layer_stride
            o = lay.layer
            vec = lambda name, n: self.view(base + o[name], n)                      # noqa: E731
            src = _rows.layernorm(x, vec("ln1_g", D), vec("ln1_b", D), eps) if cfg.do_layer_norm_before else x
            qkv = _gemm.gemm(src, self.view(base + o["wqkv"], 3 * D, D), "nt", bias=vec("bqkv", 3 * D))
            _store_kv[N, 128](qkv, cache, i, S, L, T, H, K, D)
            ctx = empty((N, D), np.float32)
            flat = qkv.reshape(-1)
            _attn.flash_attention(flat, flat[D:], flat[2 * D:], ctx.reshape(-1),
                                  (S * 3 * D, K, 3 * D), (S * 3 * D, K, 3 * D), (S * 3 * D, K, 3 * D),
                                  (S * D, K, D), B, H, S, S, K, causal=True, scale=K ** -0.5)
            _gemm.gemm(ctx, self.view(base + o["wo"], D, D), "nt", bias=vec("bo", D), out=x,
                       accumulate=True)
            if not cfg.do_layer_norm_before:
                x = _rows.layernorm(x, vec("ln1_g", D), vec("ln1_b", D), eps)
            src = _rows.layernorm(x, vec("ln2_g", D), vec("ln2_b", D), eps) if cfg.do_layer_norm_before else x
            h = _gemm.gemm(src, self.view(base + o["w1"], F, D), "nt", bias=vec("b1", F), relu=True)
            _gemm.gemm(h, self.view(base + o["w2"], D, F), "nt", bias=vec("b2", D), out=x,
                       accumulate=True)
            if not cfg.do_layer_norm_before:
                x = _rows.layernorm(x, vec("ln2_g", D), vec("ln2_b", D), eps)
        return cache

    # ------------------------------------------------------------------ decode
    def plan(self, B):
        """The products' :class:`Plan` for a batch of ``B`` rows."""
        return product_plan(self.lay.D, self.lay.F, min(32, pow2(B)), split_target())

    def step_kernel(self, T, B, sampler):
        lay, cfg = self.lay, self.cfg
        RB = min(32, pow2(B))
        o, g = lay.layer, lay.glob
        return make_step_kernel(
            lay.D, lay.E, lay.F, lay.V, lay.L, lay.H, lay.P, int(T), RB, bool(cfg.do_layer_norm_before),
            bool(cfg.has_final_layer_norm), bool(cfg.has_projection), sampler,
            float(cfg.layer_norm_epsilon), lay.layer_stride,
            tuple(o[n] for n in ("ln1_g", "ln1_b", "wqkv", "bqkv", "wo", "bo", "ln2_g", "ln2_b", "w1",
                                 "b1", "w2", "b2")),
            tuple(g[n] for n in ("embed", "pos", "lnf_g", "lnf_b", "proj_in", "proj_out")),
            self.plan(B), MIN_BLOCKS, PROFILE and not SIMULATOR, UNROLL)

    def decode(self, token_ids, prompt_mask, index, sampler_kind="greedy", **kwargs):
        """Decode ``token_ids [B, T]`` (host ints, prompt tokens where ``prompt_mask``) from
        ``index`` to ``T`` (or until every row has produced one of ``stop_token_ids``) on the
        device; returns the final token ids.  See :meth:`decode_iter` for the arguments."""
        steps = self.decode_iter(token_ids, prompt_mask, index, sampler_kind, **kwargs)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def decode_iter(self, token_ids, prompt_mask, index, sampler_kind="greedy", temperature=1.0, k=1,
                    p=1.0, min_p=0.0, seed=0, stop_token_ids=None, steps_per_launch=1):
        """A generator: after every launch it yields ``(start, stop, tokens [B, stop - start])``,
        the positions just decided (the host's only synchronisation), and it returns the final
        token ids ``[B, T]``.  ``sampler_kind`` is one of :data:`SAMPLERS` with its parameters
        (``k`` is top-k's k, top-p's cutoff or min-p's ``min_tokens_to_keep``; ``seed`` keys the
        Philox uniforms by (seed, row, position)); ``steps_per_launch`` decode steps run in one
        launch of the persistent kernel."""
        from refopt.errors import SamplerError

        if sampler_kind not in SAMPLERS:
            raise ValueError(f"sampler kind {sampler_kind!r}: expected one of {SAMPLERS}")
        token_ids = np.ascontiguousarray(token_ids, np.int64)
        B, T = token_ids.shape
        lay = self.lay
        if T > lay.P:
            raise ValueError(f"sequence length {T} exceeds the position table ({lay.P})")
        tokens = cuda.to_device(token_ids)
        pmask = cuda.to_device(np.ascontiguousarray(prompt_mask, np.uint8))
        cache = self.prefill(tokens, B, index, T)
        stop = np.asarray(list(stop_token_ids or ()), np.int64)
        step = self.step_kernel(T, B, sampler_kind)
        D, E, F, V = lay.D, lay.E, lay.F, lay.V
        f32 = np.float32
        plan = self.plan(B)
        x, xn, ctx, xe = (empty(B * D, f32), empty(B * max(D, E), f32), empty(B * D, f32),
                          empty(B * max(D, E), f32))
        part = empty(B * max(plan.qkv[0] * 3 * D, plan.out[0] * D, plan.fc2[0] * D, E), f32)
        part1 = empty(B * plan.fc1[0] * F, f32)
        logits, probs = empty(B * V, f32), empty(B * V, f32)
        Vw = V if sampler_kind != "greedy" else 1
        P2 = pow2(V) if sampler_kind == "top_p" else 1
        wts = empty((B, Vw), np.float64)
        cidx, cval = empty((B, Vw), np.int64), empty((B, Vw + 1), np.float64)
        keep = empty((B, Vw), np.uint8)
        svals, sidx = empty((B, P2), np.float64), empty((B, P2), np.int64)
        state = np.zeros(4 + B, np.int64)
        state[0] = index
        state_dev = cuda.to_device(state)
        params_f = cuda.to_device(np.array([temperature, p, min_p], np.float64))
        params_i = cuda.to_device(np.array([k, seed & 0xFFFFFFFF, seed >> 32], np.int64))
        stop_dev = cuda.to_device(stop if stop.size else np.zeros(0, np.int64))
        prof = cuda.to_device(np.zeros((8192 if PROFILE else 1, 2), np.int64))
        args = (self.weights, cache, tokens, pmask, stop_dev, state_dev, x, xn, part, part1, ctx, xe, logits,
                probs, wts, cidx, cval, keep, svals, sidx)
        tail = (params_f, params_i, prof, int32(B))
        gmax = 1 if SIMULATOR else max_grid()
        gpart, gidx = empty(3 * max(B, gmax), f32), empty(max(B, gmax), np.int64)
        args = args + (gpart, gidx) + tail
        grid = 1 if SIMULATOR else grid_blocks(step, args + (int32(1),), THREADS)
        while True:
            start = int(state[0])
            if start >= T or state[2]:
                break
            n = min(int(steps_per_launch), T - start)
            step[grid, THREADS](*args, int32(n))
            state = state_dev.copy_to_host()
            if PROFILE:
                self.profile = prof.copy_to_host()
            if state[3]:
                raise SamplerError(f"cannot sample row {int(state[3]) - 1}: its weights must be finite, "
                                   "non-negative and not all zero; are the logits NaN?")
            stop_at = int(state[0])
            yield start, stop_at, tokens[:, start:stop_at].copy_to_host()
        return tokens.copy_to_host()




def stage_times(profile) -> dict:
    """SM clock cycles per stage, summed over the marks of one launch with ``PROFILE`` on (each
    interval between two marks is the stage that the later mark closes)."""
    rows = profile[profile[:, 0] != 0]
    out = {}
    for (t0, _), (t1, code) in zip(rows[:-1], rows[1:]):
        out[STAGES[code]] = out.get(STAGES[code], 0) + int(t1 - t0)
    return out


def grid_blocks(step, args, threads):
    """Blocks of the cooperative grid: as many as can be resident at once, at most
    :data:`BLOCKS_PER_SM` per SM."""
    kern = step._compile_for_args(*args)
    return max(1, min(kern.max_cooperative_grid_blocks(threads), max_grid()))


def max_grid() -> int:
    """The most blocks a cooperative grid takes: :data:`BLOCKS_PER_SM` per SM."""
    return BLOCKS_PER_SM * cuda.get_current_device().MULTIPROCESSOR_COUNT
