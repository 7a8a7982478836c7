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
the residual additions happen in the norm stage after out and after fc2.

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

The prompt is prefilled with the general kernels (tiled products, flash attention) before the
first step.  Numbers are float32; the sampler reproduces the NumPy samplers' rules exactly, so a
seed gives the same tokens as on the CPU wherever the probabilities agree (they are computed in a
different order, so they agree to rounding, not bit for bit).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, float64, int32, int64

from refopt.kernels.cuda import attention as _attn
from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda import rows as _rows
from refopt.kernels.cuda._common import SIM, SIMULATOR, cdiv, empty, kernel
from refopt.kernels.cuda.decode_products import (
    KC, make_tile_stage, make_warp_stage, product_plan, split_target, tile_shape)
from refopt.kernels.cuda.decode_stages import (
    CHUNK, NW, THREADS, WL, make_attention, make_embed, make_norm, make_sample, make_softmax, make_sync)
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
    LS = layer_stride
    o_ln1g, o_ln1b, o_wqkv, o_bqkv, o_wo, o_bo, o_ln2g, o_ln2b, o_w1, o_b1, o_w2, o_b2 = layer_offsets
    g_embed, g_pos, g_lnfg, g_lnfb, g_pin, g_pout = glob_offsets
    NT = THREADS
    tiled = plan.tiled
    So, S1, S2 = plan.out[0], plan.fc1[0], plan.fc2[0]
    if tiled:
        TM, TN = tile_shape(RB)[:2]
        XSH, WSH = TM * (KC + 1), TN * (KC + 1)            # shared staging of a tile's inputs
        qkv = make_tile_stage(D, 3 * D, *plan.qkv, 1, False, RB, unroll)
        out = make_tile_stage(D, D, *plan.out, 1, False, RB, unroll)
        fc1 = make_tile_stage(D, F, *plan.fc1, 1, False, RB, unroll)
        fc2 = make_tile_stage(F, D, *plan.fc2, S1, True, RB, unroll)   # + fc1's bias and ReLU
        head = make_tile_stage(E, V, 1, cdiv(E, KC), 1, False, RB, unroll)
        project_in = make_tile_stage(E, D, 1, cdiv(E, KC), 1, False, RB, unroll)
        project_out = make_tile_stage(D, E, 1, cdiv(D, KC), 1, False, RB, unroll)
    else:
        XSH = WSH = 1
        qkv = make_warp_stage(RB, D, 3 * D)
        out = make_warp_stage(RB, D, D)
        fc1 = make_warp_stage(RB, D, F, "bias_relu")      # fc2 then reads activations
        fc2 = make_warp_stage(RB, F, D)
        head = make_warp_stage(RB, E, V)
        project_in = make_warp_stage(RB, E, D, "add")     # + the position embedding
        project_out = make_warp_stage(RB, D, E)
    RED = (NW, WL, RB) if SIM else (1, 1, 1)   # the simulator's warp reductions go through here
    grid_sync, mark, sync = make_sync(profile)
    embed = make_embed(D, E, g_embed, g_pos)
    norm = make_norm(D, eps)
    attention = make_attention(D, H, L, T, plan.qkv[0])
    softmax = make_softmax(V, sampler == "greedy")
    sample, advance = make_sample(V, sampler)

    @kernel(launch_bounds=(NT, min_blocks) if min_blocks > 1 else NT)
    def step(Wt, cache, tokens, pmask, stop_ids, state_i, x, xn, part, part1, ctx, xe, logits, probs,
             wts, cidx, cval, keep, svals, sidx, gpart, gidx, params_f, params_i, prof, B, nsteps):
        # x [B, D] the residual stream, xn its normalised rows (xe: the token rows, E wide); part:
        # the products' partial sums [S, B, N] (part1: fc1's); ctx [B, D] the attention's output;
        # logits, probs [B, V]; wts, cidx, cval, keep, svals, sidx: the sampler's rows; gpart, gidx:
        # the softmax's slice partials; state_i, params_f, params_i: make_sample's; prof: the profile
        red = cuda.shared.array(RED, float32)
        Xs = cuda.shared.array(XSH, float32)
        Ws = cuda.shared.array(WSH, float32)
        fbuf = cuda.shared.array(NT, float32)
        dbuf = cuda.shared.array(NT, float64)
        ibuf = cuda.shared.array(NT, int64)
        scores = cuda.shared.array(CHUNK, float32)
        q = cuda.shared.array(128, float32)
        pv = cuda.shared.array(NT, float32)
        ps = mark(prof, 0, NEXT)
        for _step in range(nsteps):
            index = state_i[0]                                 # the position to decide
            if index >= T or state_i[2] != 0:
                return                                         # uniform over the grid
            pos = index - 1                                    # the token that goes in
            # ---------------------------------------------------------------- embed
            if projection:
                embed.tokens(Wt, tokens, pos, B, xe)
                ps = sync(prof, ps, EMBED)
                if tiled:
                    project_in(Wt, g_pin, xe, 0, B, part, Xs, Ws, red)
                    ps = sync(prof, ps, EMBED)
                    embed.add_positions(Wt, part, pos, B, x)
                else:
                    project_in(Wt, g_pin, xe, g_pos + pos * D, B, x, Xs, Ws, red)
            else:
                embed.tokens_positions(Wt, tokens, pos, B, x)
            ps = sync(prof, ps, EMBED)

            for l in range(L):
                base = l * LS
                # ------------------------------------------------------------ attention block
                if pre_ln:      # the previous layer's fc2 sums join the residual (none at layer 0)
                    norm(x, part, S2 if l > 0 else 0, base - LS + o_b2, True, base + o_ln1g,
                         base + o_ln1b, xn, Wt, B, fbuf)
                    ps = sync(prof, ps, NORM_1)
                src = xn if pre_ln else x
                qkv(Wt, base + o_wqkv, src, 0, B, part, Xs, Ws, red)
                ps = sync(prof, ps, QKV)
                attention(Wt, base + o_bqkv, part, cache, l, index, B, ctx, q, scores, pv, fbuf)
                ps = sync(prof, ps, ATTENTION)
                out(Wt, base + o_wo, ctx, 0, B, part, Xs, Ws, red)
                ps = sync(prof, ps, OUT)
                if pre_ln:      # out's sums join the residual, then the MLP's norm
                    norm(x, part, So, base + o_bo, True, base + o_ln2g, base + o_ln2b, xn, Wt, B, fbuf)
                else:           # post-LN: the attention's norm, in place
                    norm(x, part, So, base + o_bo, True, base + o_ln1g, base + o_ln1b, x, Wt, B, fbuf)
                ps = sync(prof, ps, NORM_2)
                # ------------------------------------------------------------ MLP block
                fc1(Wt, base + o_w1, src, base + o_b1, B, part1, Xs, Ws, red)
                ps = sync(prof, ps, FC1)
                fc2(Wt, base + o_w2, part1, base + o_b1, B, part, Xs, Ws, red)
                ps = sync(prof, ps, FC2)
                if not pre_ln:  # fc2's sums join the residual, the MLP's norm in place
                    norm(x, part, S2, base + o_b2, True, base + o_ln2g, base + o_ln2b, x, Wt, B, fbuf)
                    ps = sync(prof, ps, NORM_2_POST)

            # ---------------------------------------------------------------- head
            if pre_ln or final_ln:  # the last fc2's sums (pre-LN), the final norm
                norm(x, part, S2 if pre_ln else 0, (L - 1) * LS + o_b2, final_ln, g_lnfg, g_lnfb, xn,
                     Wt, B, fbuf)
                ps = sync(prof, ps, FINAL_NORM)
            hsrc = xn if final_ln else x
            if projection:
                project_out(Wt, g_pout, hsrc, 0, B, part, Xs, Ws, red)
                ps = sync(prof, ps, PROJECTION_OUT)
                hsrc = part
            head(Wt, g_embed, hsrc, 0, B, logits, Xs, Ws, red)
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
        seeds = np.zeros(B, np.uint64) if seeds is None else np.asarray(seeds, np.uint64)
        words = np.stack([seeds & np.uint64(0xFFFFFFFF), seeds >> np.uint64(32)], 1).astype(np.int64)
        params_i = cuda.to_device(np.concatenate([[k], words.reshape(-1)]).astype(np.int64))
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
