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

The kernel (:func:`make_step_kernel`) is a sequence of named stages, each a device function:
embed, norm, the products (q/k/v, out, fc1, fc2, the LM head over the tied token table: warp
products or tiled ones, :mod:`.decode_products`), attention, softmax and sample
(:mod:`.decode_stages`), with a grid synchronisation between two stages that exchange data.
fc1's bias and ReLU are applied where fc2 reads its sums (tiled) or in fc1's own stage (warp);
the residual additions happen in the norm stage after out and after fc2 -- or, in pre-LN batch
passes of warp products (a step bound by its synchronisations, not its bytes), in the product
after it: every block adds and normalises the few rows itself (:func:`.make_block_norm`,
:data:`FOLD_NORMS_FLOATS`; batch 1 on an H200 went from 1,042 to 1,196 tok/s).

Where the time goes (step times, per-stage shares, what was tried) is measured by
``benchmarks/profile_decode.py`` and recorded in ``benchmarks/GPU.md``; the kernel's compiled
resources (registers, spills, SASS) by ``benchmarks/decode_resources.py``, without a GPU.

Short names (a legend): ``B`` rows of the batch, ``RB`` rows of one batch pass (a power of two,
at most 32), ``T`` positions of the cache, ``D`` hidden width, ``E`` embedding width, ``F`` MLP
width, ``V`` vocabulary, ``L`` layers, ``H`` heads, ``K`` head width, ``P`` position-table rows,
``LS`` floats of one layer's weights, ``S*`` split-K slices of a product (:class:`Plan`: ``So``
the attention output's, ``S1`` fc1's, ``S2`` fc2's), ``NT`` threads a block, ``KC`` inputs a tiled
product stages per pass, ``TM x TN`` its tile, ``XSH`` / ``WSH`` its shared staging of inputs /
weights, ``NW`` warps a block and ``WL`` lanes a warp, ``RED`` the simulator's warp-reduction
buffer, ``P2`` the vocabulary rounded up to a power of two (top-p's sort), ``SM`` a
multiprocessor, ``Wt`` the packed weights, ``xn`` the normalised rows, ``o_*`` / ``g_*`` offsets of
a layer's / the model's weights in ``Wt``; the stages (``EMBED`` ... ``SOFTMAX``) are named in
:data:`STAGES`; the buffers are listed in :func:`make_step_kernel`.

A prompt of up to :func:`prompt_steps` positions runs through the step kernel itself, a position
a step from position 0 (the prompt's tokens kept, as for rows with longer prompts); a longer one
is prefilled with the general kernels (tiled products, flash attention) before the first step
(their hundred-odd launches from Python cost some 40 ms whatever the prompt's length).

The weights' matrices are float32, or bfloat16 / float16 in a second buffer of 16-bit patterns
(:class:`Layout`, :mod:`.halves`): the products read half the bytes and widen each weight to
float32 as they read it.  Numbers are float32; the sampler reproduces the NumPy samplers' rules exactly, so a
seed gives the same tokens as on the CPU wherever the probabilities agree (they are computed in a
different order, so they agree to rounding, not bit for bit).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import cuda, float32, float64, int32, int64

from refopt.kernels.cuda import attention as _attn
from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda import halves as _halves
from refopt.kernels.cuda import rows as _rows
from refopt.kernels.cuda._common import ALIGN, SIM, SIMULATOR, cdiv, empty, kernel
from refopt.kernels.cuda.decode_products import (
    make_tile_stage, make_warp_stage, product_plan, split_target, tile_chunk, tile_shared)
from refopt.kernels.cuda.halves import KINDS, make_load
from refopt.io.safetensors_io import float32_to_bfloat16
from refopt.kernels.cuda.decode_stages import (
    CHUNK, NW, THREADS, WL, make_attention, make_block_norm, make_embed, make_norm, make_sample,
    make_softmax, make_sync, make_warp_attention)
from refopt.kernels.cuda.sampling import pow2

SAMPLERS = ("greedy", "random", "top_k", "top_p", "min_p")

#: The stages a step's profile marks (``PROFILE``, :func:`stage_times`), by name; each mark closes
#: the interval since the previous one.
STAGES = ("embed", "norm 1", "q k v", "attention", "out", "norm 2", "fc1", "fc2", "norm 2 (post)",
          "final norm", "projection out", "head", "sample", "next", "softmax")
(EMBED, NORM_1, QKV, ATTENTION, OUT, NORM_2, FC1, FC2, NORM_2_POST, FINAL_NORM, PROJECTION_OUT, HEAD,
 SAMPLE, NEXT, SOFTMAX) = range(len(STAGES))
MIN_BLOCKS = 1                        # blocks per SM the step kernel's registers must allow
PROFILE = False                       # record stage times (see make_step_kernel)
BLOCKS_PER_SM = 2                     # most resident blocks per SM the cooperative grid takes
PROMPT_STEPS = 32                     # prompts up to this long run through the step kernel (prompt_steps)
ATTENTION_VARIANT = (False, False)    # the attention stage's variant (decode_stages.make_attention)
#: batch passes of this many rows take a warp an attention item (:func:`.make_warp_attention`):
#: at batch 32 (384 items at 125m) 2.245 against 2.364 ms a step on an H200 (benchmarks/GPU.md,
#: session 14); smaller passes keep a block an item (not measured with warps; a warp walks all of
#: an item's positions itself, so with few items and long contexts it would leave the grid idle)
WARP_ATTENTION_FROM = 32
#: pre-LN batch passes of warp products (below ``TILED_FROM`` rows) whose rows fit in this many
#: floats of shared memory fold each LayerNorm into the product that reads it
#: (:func:`.make_block_norm`: every block normalises the rows itself; 24 fewer grid
#: synchronisations a step at 12 layers); 0: never
FOLD_NORMS_FLOATS = 4096


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8           # 16 bytes of halves, 32 of floats


#: The matrices (stored as the weights' kind) among a layer's / the model's weights; the rest
#: (LayerNorm gains and offsets, biases, positions) stays float32.
MATRICES = ("wqkv", "wo", "w1", "w2", "embed", "proj_in", "proj_out")


# ----------------------------------------------------------------------------- weights
class Layout:
    """Offsets (elements) of every weight in flat, aligned device buffers: with float32 weights,
    one float32 buffer holds everything; with half weights (``kind`` "bfloat16" or "float16",
    :mod:`.halves`) the :data:`MATRICES` are in a second buffer of 16-bit elements, at offsets of
    their own (``matrix_stride`` a layer), and everything else in the float32 one
    (``layer_stride``)."""

    def __init__(self, cfg, kind: str = "float32"):
        if kind not in KINDS:
            raise ValueError(f"weights {kind!r}: expected one of {KINDS}")
        D, E, F, V = cfg.hidden_dim, cfg.word_embed_proj_dim, cfg.intermediate_dim, cfg.vocabulary_size
        self.D, self.E, self.F, self.V = D, E, F, V
        self.L, self.H, self.P = cfg.num_layers, cfg.num_heads, cfg.max_sequence_length
        self.K = D // self.H
        self.kind = kind
        split = kind != "float32"
        off = [0, 0]                                   # float32 buffer, matrix buffer

        def place(table, name, size):
            which = 1 if split and name in MATRICES else 0
            table[name] = off[which]
            off[which] += _align8(size)
        self.layer = {}
        for name, size in (("ln1_g", D), ("ln1_b", D), ("wqkv", 3 * D * D), ("bqkv", 3 * D),
                           ("wo", D * D), ("bo", D), ("ln2_g", D), ("ln2_b", D), ("w1", F * D),
                           ("b1", F), ("w2", D * F), ("b2", D)):
            place(self.layer, name, size)
        self.layer_stride = off[0]
        self.matrix_stride = off[1] if split else off[0]
        off = [off[0] * self.L, off[1] * self.L]
        self.glob = {}
        for name, size in (("embed", V * E), ("pos", self.P * D), ("lnf_g", D), ("lnf_b", D),
                           ("proj_in", D * E), ("proj_out", E * D)):
            place(self.glob, name, size)
        self.size, self.matrix_size = off

    def layer_offset(self, i: int, name: str) -> int:
        """Offset of layer ``i``'s weight ``name`` in its buffer."""
        stride = self.matrix_stride if name in MATRICES else self.layer_stride
        return i * stride + self.layer[name]


def _matrix_bits(value, kind):
    # a matrix as the 16-bit patterns of ``kind``: the stored data of a QuantizedMatrix of that
    # kind as it is (no rounding twice), any other value rounded from float32
    if getattr(value, "kind", None) == kind:
        return np.ascontiguousarray(value.data).view(np.uint16)
    wide = np.asarray(value, np.float32)
    if kind == "bfloat16":
        return float32_to_bfloat16(wide)
    return wide.astype(np.float16).view(np.uint16)


def pack_weights(params, cfg, kind: str = "float32"):
    """The model's parameters laid out as :class:`Layout` for weights ``kind``: ``(float32 array,
    uint16 array of the matrices or None)`` (absent LayerNorm gains are ones, absent biases and
    offsets zeros: the same numbers)."""
    lay = Layout(cfg, kind)
    flat = np.zeros(lay.size, np.float32)
    mats = np.zeros(lay.matrix_size, np.uint16) if kind != "float32" else None
    D, E, F = lay.D, lay.E, lay.F

    def put(off, value, size, name=None):
        # value: an array, or a list of matrices stacked by rows (q, k, v)
        parts = value if isinstance(value, list) else [value]
        if mats is not None and name in MATRICES:
            mats[off:off + size] = np.concatenate([_matrix_bits(v, kind).reshape(-1) for v in parts])
        else:
            flat[off:off + size] = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in parts])

    def get(name, shape, fill):
        v = params.get(name)
        return np.full(shape, fill, np.float32) if v is None else np.asarray(v, np.float32)

    for i in range(lay.L):
        p = f"layers.{i}."

        def at(name, value, size):
            put(lay.layer_offset(i, name), value, size, name)
        at("ln1_g", get(p + "self_attn_layer_norm.gamma", D, 1.0), D)
        at("ln1_b", get(p + "self_attn_layer_norm.beta", D, 0.0), D)
        at("wqkv", [params[p + f"{n}_proj.weight"] for n in "qkv"], 3 * D * D)
        at("bqkv", np.concatenate([get(p + f"{n}_proj.bias", D, 0.0) for n in "qkv"]), 3 * D)
        at("wo", params[p + "out_proj.weight"], D * D)
        at("bo", get(p + "out_proj.bias", D, 0.0), D)
        at("ln2_g", get(p + "mlp_layer_norm.gamma", D, 1.0), D)
        at("ln2_b", get(p + "mlp_layer_norm.beta", D, 0.0), D)
        at("w1", params[p + "fc1.weight"], F * D)
        at("b1", get(p + "fc1.bias", F, 0.0), F)
        at("w2", params[p + "fc2.weight"], D * F)
        at("b2", get(p + "fc2.bias", D, 0.0), D)
    g = lay.glob
    put(g["embed"], params["embed_tokens"], lay.V * E, "embed")
    pos = np.asarray(params["embed_positions"], np.float32)
    put(g["pos"], pos[:lay.P], lay.P * D)
    put(g["lnf_g"], get("final_layer_norm.gamma", D, 1.0), D)
    put(g["lnf_b"], get("final_layer_norm.beta", D, 0.0), D)
    if "project_in.weight" in params:
        put(g["proj_in"], params["project_in.weight"], D * E, "proj_in")
        put(g["proj_out"], params["project_out.weight"], E * D, "proj_out")
    return flat, mats


# ----------------------------------------------------------------------------- the step kernel
@functools.lru_cache(maxsize=None)
def make_step_kernel(D, E, F, V, L, H, P, T, RB, pre_ln, final_ln, projection, sampler, eps,
                     layer_stride, layer_offsets, glob_offsets, plan, min_blocks=1, profile=False,
                     kind="float32", matrix_stride=None, attention_variant=(False, False),
                     warp_attention=False, fold=False):
    """The persistent decode kernel for one model shape, cache length ``T``, batch pass ``RB``,
    sampler kind, product :class:`Plan` and weight storage ``kind`` (:mod:`.halves`: the
    matrices read from ``Wm`` at ``matrix_stride`` a layer, everything else from ``Wt``; with
    float32 weights ``Wm`` is ``Wt``) -- everything the loops and offsets depend on is a
    compile-time constant.  ``min_blocks``: blocks per SM the compiler must leave room for (its
    register budget, through the launch bounds); ``profile``: record the SM clock of block 0 after
    every grid synchronisation (``prof[i] = (clock, stage)``, for :func:`stage_times`);
    ``warp_attention``: the attention stage a warp an item (:func:`.make_warp_attention`);
    ``fold`` (pre-LN warp products only): each LayerNorm folded into the product after it
    (:func:`.make_block_norm`; the residual stream alternates between ``x`` and ``xn``, fc2's
    sums go to ``ctx``), the final one into the head's when there is no ``project_out``."""
    LS = layer_stride
    LM = layer_stride if matrix_stride is None else matrix_stride
    o_ln1g, o_ln1b, o_wqkv, o_bqkv, o_wo, o_bo, o_ln2g, o_ln2b, o_w1, o_b1, o_w2, o_b2 = layer_offsets
    g_embed, g_pos, g_lnfg, g_lnfb, g_pin, g_pout = glob_offsets
    NT = THREADS
    tiled = plan.tiled
    So, S1, S2 = plan.out[0], plan.fc1[0], plan.fc2[0]
    if tiled:
        XSH, WSH = tile_shared(RB, plan.tile)               # shared staging of a tile's inputs
        KC = tile_chunk(RB, plan.tile)
        qkv = make_tile_stage(D, 3 * D, *plan.qkv, 1, False, RB, kind, plan.tile, plan.prefetch)
        out = make_tile_stage(D, D, *plan.out, 1, False, RB, kind, plan.tile, plan.prefetch)
        fc1 = make_tile_stage(D, F, *plan.fc1, 1, False, RB, kind, plan.tile, plan.prefetch)
        fc2 = make_tile_stage(F, D, *plan.fc2, S1, True, RB, kind, plan.tile, plan.prefetch)   # + fc1's bias and ReLU
        head = make_tile_stage(E, V, 1, cdiv(E, KC), 1, False, RB, kind, plan.tile, plan.prefetch)
        project_in = make_tile_stage(E, D, 1, cdiv(E, KC), 1, False, RB, kind, plan.tile, plan.prefetch)
        project_out = make_tile_stage(D, E, 1, cdiv(D, KC), 1, False, RB, kind, plan.tile, plan.prefetch)
    else:
        XSH = WSH = 1
        qkv = make_warp_stage(RB, D, 3 * D, "store", kind)
        out = make_warp_stage(RB, D, D, "store", kind)
        fc1 = make_warp_stage(RB, D, F, "bias_relu", kind)      # fc2 then reads activations
        fc2 = make_warp_stage(RB, F, D, "store", kind)
        head = make_warp_stage(RB, E, V, "store", kind)
        project_in = make_warp_stage(RB, E, D, "add", kind)     # + the position embedding
        project_out = make_warp_stage(RB, D, E, "store", kind)
    RED = (NW, WL, RB) if SIM else (1, 1, 1)   # the simulator's warp reductions go through here
    fold = bool(fold) and pre_ln and not tiled
    fold_final = fold and final_ln and not projection
    FSH = RB * D if fold else 1                 # a block's normalised rows (fold)
    block_norm = make_block_norm(D, eps)
    grid_sync, mark, sync = make_sync(profile)
    embed = make_embed(D, E, g_embed, g_pos, kind)
    norm_o = make_norm(D, eps, So)                 # adding the attention output's partial sums
    norm_2 = make_norm(D, eps, S2)                 # adding fc2's
    attention = (make_warp_attention(D, H, L, T, plan.qkv[0]) if warp_attention
                 else make_attention(D, H, L, T, plan.qkv[0], attention_variant))
    softmax = make_softmax(V, sampler == "greedy")
    sample, advance = make_sample(V, sampler)

    @kernel(launch_bounds=(NT, min_blocks) if min_blocks > 1 else NT)
    def step(Wt, Wm, cache, tokens, pmask, stop_ids, state_i, x, xn, part, part1, ctx, xe, logits, probs,
             wts, cidx, cval, keep, svals, sidx, gpart, gidx, params_f, params_i, prof, B, nsteps):
        # x [B, D] the residual stream, xn its normalised rows (xe: the token rows, E wide); part:
        # the products' partial sums [S, B, N] (part1: fc1's); ctx [B, D] the attention's output;
        # logits, probs [B, V]; wts, cidx, cval, keep, svals, sidx: the sampler's rows; gpart, gidx:
        # the softmax's slice partials; state_i, params_f, params_i: make_sample's; prof: the profile
        red = cuda.shared.array(RED, float32)
        Xs = cuda.shared.array(XSH, float32, alignment=ALIGN)
        Ws = cuda.shared.array(WSH, float32, alignment=ALIGN)
        fbuf = cuda.shared.array(NT, float32)
        dbuf = cuda.shared.array(NT, float64)
        ibuf = cuda.shared.array(NT, int64)
        scores = cuda.shared.array(CHUNK, float32)
        q = cuda.shared.array(128, float32)
        pv = cuda.shared.array(NT, float32)
        xf = cuda.shared.array(FSH, float32)
        fc2_out = ctx if fold else part                       # where fc2's sums go (see fold)
        ps = mark(prof, 0, NEXT)
        for _step in range(nsteps):
            index = state_i[0]                                 # the position to decide
            if index >= T or state_i[2] != 0:
                return                                         # uniform over the grid
            pos = index - 1                                    # the token that goes in
            # ---------------------------------------------------------------- embed
            if projection:
                embed.tokens(Wm, tokens, pos, B, xe)
                ps = sync(prof, ps, EMBED)
                if tiled:
                    project_in(Wt, Wm, g_pin, xe, 0, B, part, Xs, Ws, red)
                    ps = sync(prof, ps, EMBED)
                    embed.add_positions(Wt, part, pos, B, x)
                else:
                    project_in(Wt, Wm, g_pin, xe, g_pos + pos * D, B, x, Xs, Ws, red)
            else:
                embed.tokens_positions(Wt, Wm, tokens, pos, B, x)
            ps = sync(prof, ps, EMBED)

            for l in range(L):
                base = l * LS
                mbase = l * LM
                # ------------------------------------------------------------ attention block
                if fold:        # every block: the previous layer's fc2 sums (in ctx) join the
                    block_norm(x, fc2_out, l > 0, base - LS + o_b2, base + o_ln1g, base + o_ln1b, xn,
                               xf, Wt, B, fbuf)                       # residual, x -> xn, LN1 in xf
                elif pre_ln:    # the previous layer's fc2 sums join the residual (none at layer 0)
                    norm_2(x, part, l > 0, base - LS + o_b2, True, base + o_ln1g,
                         base + o_ln1b, xn, Wt, B, fbuf)
                    ps = sync(prof, ps, NORM_1)
                src = xf if fold else xn if pre_ln else x
                qkv(Wt, Wm, mbase + o_wqkv, src, 0, B, part, Xs, Ws, red)
                ps = sync(prof, ps, QKV)
                attention(Wt, base + o_bqkv, part, cache, l, index, B, ctx, q, scores, pv, fbuf)
                ps = sync(prof, ps, ATTENTION)
                out(Wt, Wm, mbase + o_wo, ctx, 0, B, part, Xs, Ws, red)
                ps = sync(prof, ps, OUT)
                if fold:        # every block: out's sums join the residual, xn -> x, LN2 in xf
                    block_norm(xn, part, True, base + o_bo, base + o_ln2g, base + o_ln2b, x, xf, Wt,
                               B, fbuf)
                else:
                    if pre_ln:  # out's sums join the residual, then the MLP's norm
                        norm_o(x, part, True, base + o_bo, True, base + o_ln2g, base + o_ln2b, xn, Wt,
                               B, fbuf)
                    else:       # post-LN: the attention's norm, in place
                        norm_o(x, part, True, base + o_bo, True, base + o_ln1g, base + o_ln1b, x, Wt,
                               B, fbuf)
                    ps = sync(prof, ps, NORM_2)
                # ------------------------------------------------------------ MLP block
                fc1(Wt, Wm, mbase + o_w1, src, base + o_b1, B, part1, Xs, Ws, red)
                ps = sync(prof, ps, FC1)
                fc2(Wt, Wm, mbase + o_w2, part1, base + o_b1, B, fc2_out, Xs, Ws, red)
                ps = sync(prof, ps, FC2)
                if not pre_ln:  # fc2's sums join the residual, the MLP's norm in place
                    norm_2(x, part, True, base + o_b2, True, base + o_ln2g, base + o_ln2b, x, Wt, B, fbuf)
                    ps = sync(prof, ps, NORM_2_POST)

            # ---------------------------------------------------------------- head
            if fold_final:          # the last fc2's sums and the final norm, in every block
                block_norm(x, fc2_out, True, (L - 1) * LS + o_b2, g_lnfg, g_lnfb, xn, xf, Wt, B, fbuf)
                head(Wt, Wm, g_embed, xf, 0, B, logits, Xs, Ws, red)
                ps = sync(prof, ps, HEAD)
            elif pre_ln or final_ln:  # the last fc2's sums (pre-LN; in ctx when folded), the final norm
                norm_2(x, fc2_out, pre_ln, (L - 1) * LS + o_b2, final_ln, g_lnfg, g_lnfb, xn, Wt, B,
                       fbuf)
                ps = sync(prof, ps, FINAL_NORM)
            hsrc = xn if final_ln else x
            if projection:
                project_out(Wt, Wm, g_pout, hsrc, 0, B, part, Xs, Ws, red)
                ps = sync(prof, ps, PROJECTION_OUT)
                hsrc = part
            if not fold_final:
                head(Wt, Wm, g_embed, hsrc, 0, B, logits, Xs, Ws, red)
                ps = sync(prof, ps, HEAD)

            # ---------------------------------------------------------------- softmax, sample
            nsl = softmax.slices(B)
            softmax.maxima(logits, params_f, B, nsl, gpart, fbuf)
            grid_sync()
            softmax.sums(logits, params_f, B, nsl, probs, gpart, fbuf)
            grid_sync()
            softmax.normalise(probs, B, nsl, gpart, gidx, dbuf, ibuf)
            ps = sync(prof, ps, SOFTMAX)
            sample(probs, params_f, params_i, index, B, nsl, gpart, gidx, wts, cidx, cval, keep, svals,
                   sidx, dbuf, ibuf, tokens, pmask, stop_ids, state_i)
            ps = sync(prof, ps, SAMPLE)
            advance(state_i, index, B, stop_ids)
            ps = sync(prof, ps, NEXT)

    return step


# ----------------------------------------------------------------------------- prefill
@functools.lru_cache(maxsize=None)
def _make_embed_rows(kind):
    ld = make_load(kind)

    @kernel()
    def embed_rows(Wt, Wm, tokens, S, E, D, g_embed, g_pos, projection, out):
        # out[b*S + s] = embed[tokens[b, s]] (+ positions[s] unless projection)
        n = cuda.blockIdx.x
        b = n // S
        s = n % S
        tok = tokens[b, s]
        width = E if projection else D
        for d in range(cuda.threadIdx.x, width, cuda.blockDim.x):
            v = ld(Wm, g_embed + tok * E + d)
            if not projection:
                v = v + Wt[g_pos + s * D + d]
            out[n, d] = v
    return embed_rows


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


def weights_kind(params) -> str:
    """How the decode kernel stores ``params``' matrices: the kind their QuantizedMatrix objects
    share ("bfloat16" or "float16"), "float32" when every value is a float array; ``None`` when
    the device loop cannot hold them as they are (int8, or matrices of several kinds)."""
    kinds = {getattr(v, "kind", "float32") for v in params.values()}
    kinds.discard("float32")
    if not kinds:
        return "float32"
    kind = kinds.pop()
    return kind if not kinds and kind in KINDS else None


class DeviceModel:
    """A model's weights on the GPU (packed once) and the decode machinery around them.
    ``weights``: how the matrices are stored on the device (:data:`.halves.KINDS`; default
    :func:`weights_kind` of ``params``: float16 / bfloat16 matrices stay two bytes a weight,
    widened to float32 as the kernels read them; every sum is float32)."""

    def __init__(self, params, cfg, weights=None):
        from refopt.errors import BackendError

        if np.dtype(cfg.compute_dtype) != np.float32:
            raise BackendError("cuda decoding runs in float32; this model computes in "
                               f"{cfg.compute_dtype}")
        kind = weights_kind(params) if weights is None else weights
        if kind not in KINDS:
            raise BackendError(f"cuda decoding: weights stored as {kind or 'several kinds'} are not "
                               f"supported (one of {KINDS})")
        self.cfg = cfg
        self.kind = kind
        self.lay = Layout(cfg, kind)
        if self.lay.K > 128:
            raise BackendError(f"cuda decoding: head width {self.lay.K} > 128 is not supported")
        flat, mats = pack_weights(params, cfg, kind)
        self.weights = cuda.to_device(flat)
        self.matrices = self.weights if mats is None else cuda.to_device(mats)
        self._wide = None                 # prefill's float32 copy of one half matrix at a time
        self._held = None                 # (key, _Scratch) of the last decode, for the next one

    def view(self, off, *shape):
        """A float32 vector or matrix of the float32 buffer."""
        n = int(np.prod(shape))
        return self.weights[off:off + n].reshape(shape)

    def matrix(self, off, rows, cols):
        """A matrix of the matrix buffer as float32 ``[rows, cols]`` (half weights: widened into
        a scratch buffer, valid until the next call)."""
        if self.kind == "float32":
            return self.view(off, rows, cols)
        n = rows * cols
        if self._wide is None or self._wide.size < n:
            lay = self.lay
            self._wide = empty(max(3 * lay.D * lay.D, lay.F * lay.D, lay.D * lay.E), np.float32)
        return _halves.widen(self.matrices, off, n, self.kind, self._wide)[:n].reshape(rows, cols)

    # ------------------------------------------------------------------ prefill
    def prefill(self, tokens_dev, B, S, T, cache=None):
        """Run positions ``0 .. S-1`` of every row; returns the KV cache ``[B, L, 2, T, H, K]``
        (flat; ``cache`` or a new one) filled there."""
        lay, cfg = self.lay, self.cfg
        D, E, F, L, H, K = lay.D, lay.E, lay.F, lay.L, lay.H, lay.K
        if cache is None:
            cache = cuda.device_array(B * L * 2 * T * H * K, np.float32)
        if S == 0:
            return cache
        N = B * S
        proj = cfg.has_projection
        g = lay.glob
        eps = cfg.layer_norm_epsilon
        x = empty((N, E if proj else D), np.float32)
        _make_embed_rows(self.kind)[N, 128](self.weights, self.matrices, tokens_dev, S, E, D,
                                            g["embed"], g["pos"], proj, x)
        if proj:
            x = _gemm.gemm(x, self.matrix(g["proj_in"], D, E), "nt")
            _add_positions[N, 128](x, self.weights, S, D, g["pos"])
        for i in range(L):
            vec = lambda name, n: self.view(lay.layer_offset(i, name), n)           # noqa: E731
            mat = lambda name, r, c: self.matrix(lay.layer_offset(i, name), r, c)   # noqa: E731
            src = _rows.layernorm(x, vec("ln1_g", D), vec("ln1_b", D), eps) if cfg.do_layer_norm_before else x
            qkv = _gemm.gemm(src, mat("wqkv", 3 * D, D), "nt", bias=vec("bqkv", 3 * D))
            _store_kv[N, 128](qkv, cache, i, S, L, T, H, K, D)
            ctx = empty((N, D), np.float32)
            flat = qkv.reshape(-1)
            _attn.flash_attention(flat, flat[D:], flat[2 * D:], ctx.reshape(-1),
                                  (S * 3 * D, K, 3 * D), (S * 3 * D, K, 3 * D), (S * 3 * D, K, 3 * D),
                                  (S * D, K, D), B, H, S, S, K, causal=True, scale=K ** -0.5)
            _gemm.gemm(ctx, mat("wo", D, D), "nt", bias=vec("bo", D), out=x,
                       accumulate=True)
            if not cfg.do_layer_norm_before:
                x = _rows.layernorm(x, vec("ln1_g", D), vec("ln1_b", D), eps)
            src = _rows.layernorm(x, vec("ln2_g", D), vec("ln2_b", D), eps) if cfg.do_layer_norm_before else x
            h = _gemm.gemm(src, mat("w1", F, D), "nt", bias=vec("b1", F), relu=True)
            _gemm.gemm(h, mat("w2", D, F), "nt", bias=vec("b2", D), out=x,
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
            self.plan(B), MIN_BLOCKS, PROFILE and not SIMULATOR, self.kind, lay.matrix_stride,
            tuple(ATTENTION_VARIANT), RB >= WARP_ATTENTION_FROM and not SIM,
            RB * lay.D <= FOLD_NORMS_FLOATS)

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
                    p=1.0, min_p=0.0, seeds=None, stop_token_ids=None, steps_per_launch=1):
        """A generator: after every launch it yields ``(start, stop, tokens [B, stop - start])``,
        the positions just decided (the host's only synchronisation), and it returns the final
        token ids ``[B, T]``.  ``sampler_kind`` is one of :data:`SAMPLERS` with its parameters
        (``k`` is top-k's k, top-p's cutoff or min-p's ``min_tokens_to_keep``; ``seeds [B]``, each
        row's seed, key the Philox uniforms by (row's seed, position); default 0);
        ``steps_per_launch`` decode steps run in one
        launch of the persistent kernel."""
        from refopt.errors import SamplerError

        if sampler_kind not in SAMPLERS:
            raise ValueError(f"sampler kind {sampler_kind!r}: expected one of {SAMPLERS}")
        token_ids = np.ascontiguousarray(token_ids, np.int64)
        B, T = token_ids.shape
        lay = self.lay
        if T > lay.P:
            raise ValueError(f"sequence length {T} exceeds the position table ({lay.P})")
        key = (B, T, sampler_kind, self.step_kernel(T, B, sampler_kind))   # the kernel: every option
        held, self._held = (self._held if self._held is not None and self._held[0] == key else None), None
        if held is None:
            held = (key, self._scratch(B, T, sampler_kind))
        buf = held[1]
        buf.tokens.copy_to_device(token_ids)
        buf.pmask.copy_to_device(np.ascontiguousarray(prompt_mask, np.uint8))
        tokens = buf.tokens
        # a short prompt goes through the step kernel itself, a position a step from position 0
        # (its tokens kept: they are the prompt's), instead of the prefill's hundred-odd launches
        begin = 1 if 1 < index <= prompt_steps(B) else index
        self.prefill(tokens, B, 0 if begin == 1 else index, T, buf.cache)
        stop = np.asarray(list(stop_token_ids or ()), np.int64)
        state = np.zeros(4 + B, np.int64)
        state[0] = begin
        buf.state.copy_to_device(state)
        buf.params_f.copy_to_device(np.array([temperature, p, min_p], np.float64))
        seeds = np.zeros(B, np.uint64) if seeds is None else np.asarray(seeds, np.uint64)
        words = np.stack([seeds & np.uint64(0xFFFFFFFF), seeds >> np.uint64(32)], 1).astype(np.int64)
        buf.params_i.copy_to_device(np.concatenate([[k], words.reshape(-1)]).astype(np.int64))
        stop_dev = cuda.to_device(stop if stop.size else np.zeros(0, np.int64))
        args = (self.weights, self.matrices, buf.cache, tokens, buf.pmask, stop_dev, buf.state) + buf.work + (
            buf.params_f, buf.params_i, buf.prof, int32(B))
        while True:
            start = int(state[0])
            if start >= T or state[2]:
                break
            n = index - start if start < index else min(int(steps_per_launch), T - start)
            buf.launch(args + (int32(n),))
            state = buf.state.copy_to_host()
            if PROFILE:
                self.profile = buf.prof.copy_to_host()
            if state[3]:
                raise SamplerError(f"cannot sample row {int(state[3]) - 1}: its weights must be finite, "
                                   "non-negative and not all zero; are the logits NaN?")
            stop_at = int(state[0])
            if stop_at > index:                   # (the prompt's own positions are not yielded)
                start = max(start, index)
                yield start, stop_at, tokens[:, start:stop_at].copy_to_host()
        out = tokens.copy_to_host()
        self._held = held                 # the buffers serve the next call of the same shape
        return out

    def _scratch(self, B, T, sampler_kind):
        """The device buffers of a decode of ``B`` rows, ``T`` positions and a sampler kind, and
        the step kernel compiled for them with its grid (:class:`_Scratch`)."""
        lay = self.lay
        D, E, F, V, L, H, K = lay.D, lay.E, lay.F, lay.V, lay.L, lay.H, lay.K
        f32 = np.float32
        plan = self.plan(B)
        step = self.step_kernel(T, B, sampler_kind)
        Vw = V if sampler_kind != "greedy" else 1
        P2 = pow2(V) if sampler_kind == "top_p" else 1
        gmax = 1 if SIMULATOR else max_grid()
        work = (empty(B * D, f32), empty(B * max(D, E), f32),                               # x, xn
                empty(B * max(plan.qkv[0] * 3 * D, plan.out[0] * D, plan.fc2[0] * D, E), f32),  # part
                empty(B * plan.fc1[0] * F, f32), empty(B * D, f32), empty(B * max(D, E), f32),  # part1, ctx, xe
                empty(B * V, f32), empty(B * V, f32),                                       # logits, probs
                empty((B, Vw), np.float64), empty((B, Vw), np.int64),                       # wts, cidx
                empty((B, Vw + 1), np.float64), empty((B, Vw), np.uint8),                   # cval, keep
                empty((B, P2), np.float64), empty((B, P2), np.int64),                       # svals, sidx
                empty(3 * max(B, gmax), f32), empty(max(B, gmax), np.int64))                # gpart, gidx
        buf = _Scratch(tokens=empty((B, T), np.int64), pmask=empty((B, T), np.uint8),
                       cache=empty(B * L * 2 * T * H * K, f32), state=empty(4 + B, np.int64),
                       params_f=empty(3, np.float64), params_i=empty(1 + 2 * B, np.int64),
                       prof=cuda.to_device(np.zeros((8192 if PROFILE else 1, 2), np.int64)), work=work,
                       launch=None)
        if SIMULATOR:
            return buf._replace(launch=lambda args: step[1, THREADS](*args))
        args = (self.weights, self.matrices, buf.cache, buf.tokens, buf.pmask, empty(0, np.int64),
                buf.state) + work + (buf.params_f, buf.params_i, buf.prof, int32(B), int32(1))
        launcher = step[grid_blocks(step._compile_for_args(*args), THREADS), THREADS]
        return buf._replace(launch=lambda args: launcher(*args))


class _Scratch(NamedTuple):
    tokens: object                    # [B, T] int64: the token ids, decided ones written in
    pmask: object                     # [B, T] uint8: the prompt mask
    cache: object                     # the KV cache [B, L, 2, T, H, K]
    state: object                     # [4 + B] int64: make_sample's state
    params_f: object                  # [3] float64: temperature, p, min_p
    params_i: object                  # [1 + 2B] int64: k, each row's seed words
    prof: object                      # the profile marks (PROFILE)
    work: tuple                       # x, xn, part, part1, ctx, xe, logits, probs, the sampler's rows,
                                      # the softmax's slice partials (the step kernel's order)
    launch: object                    # launch(args): the step kernel compiled for these arguments




def stage_times(profile) -> dict:
    """SM clock cycles per stage, summed over the marks of one launch with ``PROFILE`` on (each
    interval between two marks is the stage that the later mark closes)."""
    rows = profile[profile[:, 0] != 0]
    out = {}
    for (t0, _), (t1, code) in zip(rows[:-1], rows[1:]):
        out[STAGES[code]] = out.get(STAGES[code], 0) + int(t1 - t0)
    return out


def prompt_steps(B: int) -> int:
    """The longest prompt (positions before the first one decided) that the step kernel runs a
    position a step, from position 0, instead of the prefill's general kernels: a prefill costs
    some 40 ms of launches from Python whatever its length (44 ms for 8 positions of a 125m model
    at batch 1 on an H200), a step 0.8 ms at batch 1 and about 3 ms at batch 32."""
    return PROMPT_STEPS if B < 8 else PROMPT_STEPS // 4


def grid_blocks(kern, threads):
    """Blocks of the cooperative grid of a compiled kernel: as many as can be resident at once, at
    most :data:`BLOCKS_PER_SM` per SM."""
    return max(1, min(kern.max_cooperative_grid_blocks(threads), max_grid()))


def max_grid() -> int:
    """The most blocks a cooperative grid takes: :data:`BLOCKS_PER_SM` per SM."""
    return BLOCKS_PER_SM * cuda.get_current_device().MULTIPROCESSOR_COUNT
