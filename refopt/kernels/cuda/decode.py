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
norm                  one block per row: LayerNorm -> ``xn`` (or in place, post-LN models)
q/k/v                 one warp per output feature, all rows at once (weights ``[out, in]``, one
                      contiguous row per output, streamed once): ``q`` scaled, ``k`` and ``v``
                      written straight into the cache ``[B, L, 2, T, H, K]``
attention             one block per (row, head): scores against the cached keys in shared
                      memory, softmax, weighted sum of the cached values
out / fc1 / fc2       warp-per-output products with fused bias, ReLU and residual epilogues
LM head               warp per vocabulary row (the tied token table), logits ``[B, V]``
sample                one block per row: softmax(logits / temperature), then the sampler's
                      rule (:mod:`.sampling`), the prompt's own token kept where the prompt
                      mask is set, stop tokens counted
====================  ========================================================================

A warp's product: lane ``j`` takes inputs ``j, j + 32, j + 64, ...``, so each load of the warp
reads one contiguous 128-byte run of the weight row and of every activation row.  It multiplies
the weight row by each of the batch's rows (``RB`` accumulators, ``RB`` the batch rounded up to a
power of two, at most 32 rows a pass), and the warp reduces the ``RB`` sums so that lane ``b``
ends with row ``b``'s output (a transposing butterfly of shuffles; shared memory under the
simulator).

Measured limit (H100): a step costs about 1.5 ms at batch 1, 3.1 ms at 8 and 8.2 ms at 32, far
above what the products' arithmetic or memory traffic would take.  Nsight Compute on the batch-32
step: 199 registers per thread (246 at batch 1) and 25 KB of static shared memory leave one
256-thread block per SM (132 blocks, 12.5% occupancy, 2 warps per scheduler); the kernel is
latency-bound (7.4 cycles between a warp's instructions, 42% of them waiting on L1) with DRAM at
2% and the SMs 34% busy.  Capping registers at 128 (``max_registers``) gained some 15-25% in one
trial.  The fix is occupancy: fewer registers (the sampler's code sets the kernel's count) and
less shared memory, so that two or more blocks fit per SM.

The prompt is prefilled with the general kernels (tiled products, flash attention) before the
first step.  Numbers are float32; the sampler reproduces the NumPy samplers' rules exactly, so a
seed gives the same tokens as on the CPU wherever the probabilities agree (they are computed in a
different order, so they agree to rounding, not bit for bit).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64, int32, int64

from refopt.kernels.cuda import attention as _attn
from refopt.kernels.cuda import gemm as _gemm
from refopt.kernels.cuda import rows as _rows
from refopt.kernels.cuda._common import SIM, SIMULATOR, empty, kernel
from refopt.kernels.cuda.sampling import (
    SCAN, philox_uniform, pow2, row_argmax, row_choose, row_top_k, row_top_p)

THREADS = 8 if SIM else 32 if SIMULATOR else 256    # threads per block of the persistent kernel
WL = min(32, THREADS)                 # lanes of a warp (the simulator's blocks are narrower)
SAMPLERS = ("greedy", "random", "top_k", "top_p", "min_p")
CHUNK = 1024                          # attention scores kept in shared memory per pass


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


# ----------------------------------------------------------------------------- the step kernel
@functools.lru_cache(maxsize=None)
def make_step_kernel(D, E, F, V, L, H, P, T, RB, pre_ln, final_ln, projection, sampler, eps,
                     layer_stride, layer_offsets, glob_offsets):
    """The persistent decode kernel for one model shape, cache length ``T``, batch pass ``RB``
    and sampler kind (everything the loops and offsets depend on is a compile-time constant)."""
    K = D // H
    LS = layer_stride
    o_ln1g, o_ln1b, o_wqkv, o_bqkv, o_wo, o_bo, o_ln2g, o_ln2b, o_w1, o_b1, o_w2, o_b2 = layer_offsets
    g_embed, g_pos, g_lnfg, g_lnfb, g_pin, g_pout = glob_offsets
    NT = THREADS
    NW = NT // WL
    scale = float32(K ** -0.5)
    dot_d, dot_e, dot_f = _make_warp_dot(RB, D), _make_warp_dot(RB, E), _make_warp_dot(RB, F)
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
    def layernorm_rows(src, dst, gamma_off, beta_off, Wt, B, fbuf):
        # dst[b] = LayerNorm(src[b]) for the rows of this block (two passes, as the reference)
        b = cuda.blockIdx.x
        while b < B:
            part = float32(0)
            for d in range(cuda.threadIdx.x, D, NT):
                part += src[b * D + d]
            mean = _rows.block_sum(part, fbuf) / float32(D)
            part = float32(0)
            for d in range(cuda.threadIdx.x, D, NT):
                c = src[b * D + d] - mean
                part += c * c
            var = _rows.block_sum(part, fbuf) / float32(D)
            rstd = float32(1) / math.sqrt(var + EPS)
            cuda.syncthreads()
            for d in range(cuda.threadIdx.x, D, NT):
                dst[b * D + d] = (src[b * D + d] - mean) * rstd * Wt[gamma_off + d] + Wt[beta_off + d]
            cuda.syncthreads()
            b += cuda.gridDim.x

    @kernel(launch_bounds=NT)
    def step(Wt, cache, tokens, pmask, stop_ids, state_i, x, xn, qb, ctx, hb, xe, logits, probs,
             wts, cidx, cval, keep, svals, sidx, params_f, params_i, B, nsteps):
        # state_i: [0] index (next position to decide), [1] rows finished, [2] stop flag
        red = cuda.shared.array(RED, float32)
        fbuf = cuda.shared.array(1024, float32)
        dbuf = cuda.shared.array(SCAN, float64)
        ibuf = cuda.shared.array(SCAN, int64)
        sc = cuda.shared.array(CHUNK, float32)
        qs = cuda.shared.array(128, float32)
        tid = cuda.threadIdx.x
        lane = tid % WL
        warp = tid // WL
        gwarp = cuda.blockIdx.x * NW + warp
        nwarps = cuda.gridDim.x * NW
        temperature = float32(params_f[0])
        top_p_value = params_f[1]
        min_p_value = params_f[2]
        k_value = params_i[0]
        seed_lo = params_i[1]
        seed_hi = params_i[2]

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
                rounds = (D + nwarps - 1) // nwarps
                for r in range(rounds):
                    o = r * nwarps + gwarp
                    oo = o if o < D else 0
                    for c0 in range(0, B, RB):
                        s = dot_e(Wt, g_pin + oo * E, E, xe, c0, min(RB, B - c0), lane, red, warp)
                        bl = c0 + lane
                        if o < D and lane < RB and bl < B:
                            x[bl * D + o] = s + Wt[g_pos + pos * D + o]
            else:
                for idx in range(cuda.blockIdx.x * NT + tid, B * D, cuda.gridDim.x * NT):
                    b = idx // D
                    d = idx % D
                    x[idx] = Wt[g_embed + tokens[b, pos] * E + d] + Wt[g_pos + pos * D + d]
            grid_sync()

            for l in range(L):
                base = l * LS
                # ------------------------------------------------------------ attention block
                if pre_ln:
                    layernorm_rows(x, xn, base + o_ln1g, base + o_ln1b, Wt, B, fbuf)
                    src = xn
                else:
                    src = x
                grid_sync()
                rounds = (3 * D + nwarps - 1) // nwarps
                for r in range(rounds):
                    o = r * nwarps + gwarp
                    oo = o if o < 3 * D else 0
                    for c0 in range(0, B, RB):
                        s = dot_d(Wt, base + o_wqkv + oo * D, D, src, c0, min(RB, B - c0), lane,
                                     red, warp)
                        bl = c0 + lane
                        if o < 3 * D and lane < RB and bl < B:
                            v = s + Wt[base + o_bqkv + o]
                            if o < D:
                                qb[bl * D + o] = v * scale
                            else:
                                kv = (o - D) // D
                                f = (o - D) % D
                                hh = f // K
                                dd = f % K
                                cache[((((bl * L + l) * 2 + kv) * T + pos) * H + hh) * K + dd] = v
                grid_sync()
                # attention of each (row, head) over cache positions 0 .. pos
                item = cuda.blockIdx.x
                while item < B * H:
                    b = item // H
                    hh = item % H
                    for d in range(tid, K, NT):
                        qs[d] = qb[b * D + hh * K + d]
                    cuda.syncthreads()
                    kbase = (b * L + l) * 2 * T * H * K
                    vbase = kbase + T * H * K
                    top = float32(-math.inf)
                    total = float32(0)
                    acc_d = float32(0)                         # thread tid < K: output column tid
                    for t0 in range(0, index, CHUNK):
                        t1 = min(index, t0 + CHUNK)
                        for t in range(t0 + tid, t1, NT):
                            s = float32(0)
                            kp = kbase + (t * H + hh) * K
                            for d in range(K):
                                s += qs[d] * cache[kp + d]
                            sc[t - t0] = s
                        cuda.syncthreads()
                        m = float32(-math.inf)
                        for t in range(t0 + tid, t1, NT):
                            m = max(m, sc[t - t0])
                        m = _rows.block_max(m, fbuf)
                        m_new = max(top, m)
                        alpha = math.exp(top - m_new)
                        part = float32(0)
                        for t in range(t0 + tid, t1, NT):
                            e = math.exp(sc[t - t0] - m_new)
                            sc[t - t0] = e
                            part += e
                        part = _rows.block_sum(part, fbuf)
                        total = total * alpha + part
                        top = m_new
                        cuda.syncthreads()
                        if tid < K:
                            a = acc_d * alpha
                            for t in range(t0, t1):
                                a += sc[t - t0] * cache[vbase + (t * H + hh) * K + tid]
                            acc_d = a
                        cuda.syncthreads()
                    if tid < K:
                        ctx[b * D + hh * K + tid] = acc_d / total
                    cuda.syncthreads()
                    item += cuda.gridDim.x
                grid_sync()
                # out projection + residual
                rounds = (D + nwarps - 1) // nwarps
                for r in range(rounds):
                    o = r * nwarps + gwarp
                    oo = o if o < D else 0
                    for c0 in range(0, B, RB):
                        s = dot_d(Wt, base + o_wo + oo * D, D, ctx, c0, min(RB, B - c0), lane, red,
                                     warp)
                        bl = c0 + lane
                        if o < D and lane < RB and bl < B:
                            x[bl * D + o] = x[bl * D + o] + (s + Wt[base + o_bo + o])
                grid_sync()
                if not pre_ln:
                    layernorm_rows(x, x, base + o_ln1g, base + o_ln1b, Wt, B, fbuf)
                    grid_sync()
                # ------------------------------------------------------------ MLP block
                if pre_ln:
                    layernorm_rows(x, xn, base + o_ln2g, base + o_ln2b, Wt, B, fbuf)
                    src = xn
                    grid_sync()
                else:
                    src = x
                rounds = (F + nwarps - 1) // nwarps
                for r in range(rounds):
                    o = r * nwarps + gwarp
                    oo = o if o < F else 0
                    for c0 in range(0, B, RB):
                        s = dot_d(Wt, base + o_w1 + oo * D, D, src, c0, min(RB, B - c0), lane, red,
                                     warp)
                        bl = c0 + lane
                        if o < F and lane < RB and bl < B:
                            hb[bl * F + o] = max(s + Wt[base + o_b1 + o], float32(0))
                grid_sync()
                rounds = (D + nwarps - 1) // nwarps
                for r in range(rounds):
                    o = r * nwarps + gwarp
                    oo = o if o < D else 0
                    for c0 in range(0, B, RB):
                        s = dot_f(Wt, base + o_w2 + oo * F, F, hb, c0, min(RB, B - c0), lane, red,
                                     warp)
                        bl = c0 + lane
                        if o < D and lane < RB and bl < B:
                            x[bl * D + o] = x[bl * D + o] + (s + Wt[base + o_b2 + o])
                grid_sync()
                if not pre_ln:
                    layernorm_rows(x, x, base + o_ln2g, base + o_ln2b, Wt, B, fbuf)
                    grid_sync()

            # ---------------------------------------------------------------- head
            if final_ln:
                layernorm_rows(x, xn, g_lnfg, g_lnfb, Wt, B, fbuf)
                hsrc = xn
                grid_sync()
            else:
                hsrc = x
            if projection:
                rounds = (E + nwarps - 1) // nwarps
                for r in range(rounds):
                    o = r * nwarps + gwarp
                    oo = o if o < E else 0
                    for c0 in range(0, B, RB):
                        s = dot_d(Wt, g_pout + oo * D, D, hsrc, c0, min(RB, B - c0), lane, red,
                                     warp)
                        bl = c0 + lane
                        if o < E and lane < RB and bl < B:
                            xe[bl * E + o] = s
                grid_sync()
                hsrc = xe
            rounds = (V + nwarps - 1) // nwarps
            for r in range(rounds):
                o = r * nwarps + gwarp
                oo = o if o < V else 0
                for c0 in range(0, B, RB):
                    s = dot_e(Wt, g_embed + oo * E, E, hsrc, c0, min(RB, B - c0), lane, red, warp)
                    bl = c0 + lane
                    if o < V and lane < RB and bl < B:
                        logits[bl * V + o] = s
            grid_sync()

            # ---------------------------------------------------------------- sample
            b = cuda.blockIdx.x
            while b < B:
                lrow = logits[b * V:(b + 1) * V]
                prow = probs[b * V:(b + 1) * V]
                top = float32(-math.inf)
                for j in range(tid, V, NT):
                    top = max(top, lrow[j] / temperature)
                top = _rows.block_max(top, fbuf)
                part = float32(0)
                for j in range(tid, V, NT):
                    e = math.exp(lrow[j] / temperature - top)
                    prow[j] = e
                    part += e
                total = _rows.block_sum(part, fbuf)
                for j in range(tid, V, NT):
                    prow[j] = prow[j] / total
                cuda.syncthreads()
                if greedy:
                    token = row_argmax(prow, V, dbuf, ibuf)
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
            if cuda.blockIdx.x == 0 and tid == 0:
                state_i[0] = index + 1
                if stop_ids.shape[0] > 0 and state_i[1] >= B:
                    state_i[2] = 1
            grid_sync()

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
            tuple(g[n] for n in ("embed", "pos", "lnf_g", "lnf_b", "proj_in", "proj_out")))

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
        x, xn, qb, ctx = (empty(B * D, f32), empty(B * max(D, E), f32), empty(B * D, f32),
                          empty(B * D, f32))
        hb, xe = empty(B * F, f32), empty(B * max(D, E), f32)
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
        args = (self.weights, cache, tokens, pmask, stop_dev, state_dev, x, xn, qb, ctx, hb, xe, logits,
                probs, wts, cidx, cval, keep, svals, sidx, params_f, params_i, int32(B))
        grid = 1 if SIMULATOR else grid_blocks(step, args + (int32(1),), THREADS)
        while True:
            start = int(state[0])
            if start >= T or state[2]:
                break
            n = min(int(steps_per_launch), T - start)
            step[grid, THREADS](*args, int32(n))
            state = state_dev.copy_to_host()
            if state[3]:
                raise SamplerError(f"cannot sample row {int(state[3]) - 1}: its weights must be finite, "
                                   "non-negative and not all zero; are the logits NaN?")
            stop_at = int(state[0])
            yield start, stop_at, tokens[:, start:stop_at].copy_to_host()
        return tokens.copy_to_host()


def grid_blocks(step, args, threads):
    """Blocks of the cooperative grid: as many as can be resident at once (capped at 2 per SM)."""
    kern = step._compile_for_args(*args)
    most = kern.max_cooperative_grid_blocks(threads)
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    return max(1, min(most, 2 * sms))



# ----------------------------------------------------------------------------- generation hook
def _sampler_kinds():
    from refopt import samplers

    return {samplers.GreedySampler: "greedy", samplers.RandomSampler: "random",
            samplers.TopKSampler: "top_k", samplers.TopPSampler: "top_p",
            samplers.MinPSampler: "min_p"}


def resident(model) -> DeviceModel | None:
    """The model's weights on the device, uploaded on first use and kept on the backbone while its
    parameter arrays are the same objects and no optimizer has updated them since
    (:func:`refopt.backend.weights_epoch`); None when they cannot run here (not float32, or
    quantised)."""
    from refopt import backend

    backbone = model.backbone
    params = backbone.params
    if np.dtype(backbone.config.compute_dtype) != np.float32 or not all(
            isinstance(v, np.ndarray) for v in params.values()):
        return None
    key = (tuple((name, id(v)) for name, v in params.items()), backend.weights_epoch())
    held = getattr(backbone, "_cuda_resident", None)
    if held is None or held[0] != key:
        held = (key, DeviceModel(params, backbone.config))
        backbone._cuda_resident = held
    return held[1]


def _plan(model, sampler):
    kind = _sampler_kinds().get(type(sampler))        # exact types: a subclass may change the rule
    if kind is None or sampler.logits_processors:
        return None
    dm = resident(model)
    if dm is None:
        return None
    seed = sampler.begin() or 0
    kwargs = {"temperature": sampler.temperature, "seed": int(seed)}
    V = dm.lay.V
    if kind == "top_k":
        kwargs["k"] = sampler.k
    elif kind == "top_p":
        kwargs["p"] = sampler.p
        kwargs["k"] = V if sampler.k is None else min(sampler.k, V)
    elif kind == "min_p":
        kwargs["min_p"] = sampler.min_p
        kwargs["k"] = sampler.min_tokens_to_keep
    return dm, kind, kwargs


def generate_step(model, token_ids, padding_mask, stop_token_ids, sampler):
    """KerasHub's ``generate_step`` on the device (see :func:`refopt.generation.generate_step`), or
    None when the sampler or the model needs the host loop (other samplers, logits processors,
    float64 or quantised weights)."""
    from refopt.generation import output_padding_mask

    plan = _plan(model, sampler)
    if plan is None:
        return None
    dm, kind, kwargs = plan
    index = int(padding_mask.sum(axis=1).min())
    out = dm.decode(token_ids, padding_mask, index, kind, stop_token_ids=stop_token_ids,
                    steps_per_launch=16, **kwargs)
    return {"token_ids": out, "padding_mask": output_padding_mask(out, padding_mask, stop_token_ids)}


def steps(model, token_ids, padding_mask, stop_token_ids, sampler):
    """The device loop as a generator of :class:`refopt.samplers.Step` (one per token, no
    log-probabilities), for streaming; None when the host loop is needed."""
    from refopt.samplers import Step

    plan = _plan(model, sampler)
    if plan is None:
        return None
    dm, kind, kwargs = plan
    index = int(padding_mask.sum(axis=1).min())

    def gen():
        inner = dm.decode_iter(token_ids, padding_mask, index, kind, stop_token_ids=stop_token_ids,
                               steps_per_launch=1, **kwargs)
        while True:
            try:
                start, stop, toks = next(inner)
            except StopIteration as done:
                return done.value
            for j, position in enumerate(range(start, stop)):
                yield Step(position, position + 1, toks[:, j:j + 1], None)
    return gen()
