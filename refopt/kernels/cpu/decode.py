"""One decode step of OPT compiled whole: every decoder layer, the final norm and the tied LM head
for one new token per row, in one Numba call per layer and one for the head (the Numba
backend's ``decode_step``).

Why a fused step: a decode step multiplies a few rows by every weight once.  Run op by op it is
about 25 Python-level calls per layer and a parallel region per product; the Python costs as much
as streaming the weights of a small model, and every parallel region is a point where the step
waits for a thread that the operating system may have parked (see :mod:`._threads`).  Here the
whole step is one call, with five parallel stages per layer (the q/k/v products together,
attention, the output product, fc1, fc2), each run on as many threads as its work is worth.

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
kinds apart at compile time), int8 with a float32 scale per output row.  Products keep one
weight row in registers for four rows of activations at a time (:func:`.matmul.dot_block`), so
a batch of 8 reads each weight once and spends its time in fused multiply-adds.
"""

from __future__ import annotations

import weakref

import numba
import numpy as np
from numba import njit, prange

from refopt.kernels.cpu._threads import governor
from refopt.kernels.cpu.layernorm import layernorm_serial
from refopt.kernels.cpu.matmul import PARALLEL_BYTES, product, products, readonly, stored

# ----------------------------------------------------------------------------- stages
# Each stage is a serial function over a range of its work (compiled once, as ordinary code) and a
# small parallel wrapper that splits the range across the threads; :func:`_layer` calls the wrapper
# only when more than one thread is allowed and the stage's bytes (a product: its weight bytes
# times max(1, rows // 2); attention: the keys and values it reads) reach ``min_bytes``
# (PARALLEL_BYTES by default).  The products are :mod:`.matmul`'s.
GOVERNOR_START_BYTES = 1 << 24   # a step reading this many weight bytes starts on every thread


@njit(cache=True)
def _copy(src, dst):
    # dst [M, D] <- src (a loop: slice assignment compiles Numba's broadcasting machinery)
    for m in range(src.shape[0]):
        for d in range(src.shape[1]):
            dst[m, d] = src[m, d]


@njit(inline="always")
def _layernorm_rows(x, gamma, beta, eps, y):
    # y [M, D] <- LayerNorm of each row of x [M, D] (:mod:`.layernorm`'s serial kernel; the flags
    # are typed booleans, not literals, so it compiles once)
    affine = x.shape[1] >= 0
    layernorm_serial(x, gamma, beta, affine, affine, eps, y)


@njit(fastmath=False, cache=True)
def _attend_range(qkv, cache, layer, index, key_mask, probs, ctx, r0, r1):
    # rows r0..r1 of (batch row, head): the row's query (qkv[:, :D], heads side by side) against
    # keys 0..index of the layer's cache -> ctx [B, D]; masked keys score the dtype's lowest
    # finite number (a fully masked row is uniform and finite, as the reference)
    H, K = cache.shape[4], cache.shape[5]
    lowest = np.finfo(qkv.dtype).min
    for bh in range(r0, r1):
        b = bh // H
        h = bh % H
        p = probs[bh]
        top = lowest
        for t in range(index + 1):
            if key_mask[b, t]:
                acc = qkv.dtype.type(0)
                for d in range(K):
                    acc += qkv[b, h * K + d] * cache[b, layer, 0, t, h, d]
                p[t] = acc
            else:
                p[t] = lowest
            top = max(top, p[t])
        total = qkv.dtype.type(0)
        for t in range(index + 1):
            p[t] = np.exp(p[t] - top)
            total += p[t]
        for d in range(K):
            ctx[b, h * K + d] = 0
        for t in range(index + 1):
            wt = p[t] / total
            if wt != 0:
                for d in range(K):
                    ctx[b, h * K + d] += wt * cache[b, layer, 1, t, h, d]


@njit(parallel=True, cache=True)
def _attend_parallel(qkv, cache, layer, index, key_mask, probs, ctx, parts):
    for c in prange(parts):
        n = probs.shape[0]
        per = (n + parts - 1) // parts
        _attend_range(qkv, cache, layer, index, key_mask, probs, ctx, min(n, c * per), min(n, (c + 1) * per))


# ----------------------------------------------------------------------------- the step
@njit(cache=True)
def _layer(x, ln1_g, ln1_b, wq, sq, bq, wk, sk, bk, wv, sv, bv, wo, so, bo, ln2_g, ln2_b, w1, s1, b1,
           w2, s2, b2, cache, layer, index, key_mask, pre_ln, eps, alpha, threads, min_bytes, xn, qkv,
           ctx, h, probs):
    """Decoder layer ``layer`` for one new token per row, ``x [B, D]`` updated in place.

    s* are int8 scales (else empty), b* biases (empty without), gammas ones and betas zeros when
    the norms are not affine; this token's keys and values go to ``cache[:, layer, :, index]``
    ``[B, L, 2, T, H, K]``; ``key_mask [B, >= index + 1]`` says which cached positions each row may
    attend to; ``threads``: how many threads a stage of at least ``min_bytes`` is split
    across (the caller sets Numba's count); xn, qkv, ctx, h, probs are scratch ``[B, D]``,
    ``[B, 3D]``, ``[B, D]``, ``[B, F]``, ``[B * H, T]``."""
    B, D = x.shape
    H, K = cache.shape[4], cache.shape[5]
    one = x.dtype.type(1)
    # typed ints, not literals: a literal argument would compile a stage once per value
    ZERO, STORE, RELU, ADD, THREE = np.int64(0), np.int64(0), np.int64(1), np.int64(2), np.int64(3)
    # --- attention block
    if pre_ln:
        _layernorm_rows(x, ln1_g, ln1_b, eps, xn)
    else:
        _copy(x, xn)
    products(xn, wq, sq, bq, wk, sk, bk, wv, sv, bv, THREE, qkv, STORE, alpha, threads, min_bytes)
    for b in range(B):
        for hd in range(H):
            for d in range(K):
                cache[b, layer, 0, index, hd, d] = qkv[b, D + hd * K + d]
                cache[b, layer, 1, index, hd, d] = qkv[b, 2 * D + hd * K + d]
    if threads > 1 and B * H * (index + 1) * K * 2 * x.itemsize >= min_bytes:
        _attend_parallel(qkv, cache, layer, index, key_mask, probs, ctx, threads)
    else:
        _attend_range(qkv, cache, layer, index, key_mask, probs, ctx, ZERO, B * H)
    product(ctx, wo, so, bo, x, ADD, one, threads, min_bytes)
    if not pre_ln:
        _copy(x, xn)
        _layernorm_rows(xn, ln1_g, ln1_b, eps, x)
    # --- MLP block
    if pre_ln:
        _layernorm_rows(x, ln2_g, ln2_b, eps, xn)
    else:
        _copy(x, xn)
    product(xn, w1, s1, b1, h, RELU, one, threads, min_bytes)
    product(h, w2, s2, b2, x, ADD, one, threads, min_bytes)
    if not pre_ln:
        _copy(x, xn)
        _layernorm_rows(xn, ln2_g, ln2_b, eps, x)


@njit(cache=True)
def _head(x, final_g, final_b, has_final, w_out, s_out, table, s_table, hidden, logits, eps, threads,
          min_bytes, xn):
    """The final norm, project_out (``w_out [E, D]``, empty ``[0, D]`` without) and the tied LM head
    (``table [V, E]``): ``hidden [B, E]`` and ``logits [B, V]`` for ``x [B, D]``."""
    one = x.dtype.type(1)
    STORE = np.int64(0)
    if has_final:
        _layernorm_rows(x, final_g, final_b, eps, xn)
    else:
        _copy(x, xn)
    if w_out.shape[0] > 0:
        product(xn, w_out, s_out, final_b[:0], hidden, STORE, one, threads, min_bytes)
    else:
        _copy(xn, hidden)
    product(hidden, table, s_table, final_b[:0], logits, STORE, one, threads, min_bytes)


# ----------------------------------------------------------------------------- the op
class _Plan:
    """A model's weights arranged for :func:`_layer` and :func:`_head`: per layer a tuple of its
    arrays, absent ones replaced (gammas by ones, betas by zeros, biases and scales by empty
    arrays), each matrix as its stored data."""

    def __init__(self, params, cfg):
        dtype = np.dtype(cfg.compute_dtype)
        D, L = cfg.hidden_dim, cfg.num_layers
        empty = readonly(np.zeros(0, dtype))                  # read-only, as stored() gives the weights
        ones, zeros = readonly(np.ones(D, dtype)), readonly(np.zeros(D, dtype))
        kinds = set()

        def matrix(name):
            data, scale = stored(params[name], dtype)
            kinds.add(data.dtype)
            return data, scale

        def vec(name, default):
            v = params.get(name)
            return default if v is None else readonly(np.ascontiguousarray(v, dtype=dtype))

        layers = []
        for i in range(L):
            p = f"layers.{i}."
            parts = [vec(p + "self_attn_layer_norm.gamma", ones), vec(p + "self_attn_layer_norm.beta", zeros)]
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                parts += [*matrix(p + proj + ".weight"), vec(p + proj + ".bias", empty)]
            parts += [vec(p + "mlp_layer_norm.gamma", ones), vec(p + "mlp_layer_norm.beta", zeros)]
            for proj in ("fc1", "fc2"):
                parts += [*matrix(p + proj + ".weight"), vec(p + proj + ".bias", empty)]
            layers.append(tuple(parts))
        self.layers = tuple(layers)
        table, s_table = matrix("embed_tokens")
        if cfg.has_projection:
            w_out, s_out = matrix("project_out.weight")
        else:
            w_out = readonly(np.zeros((0, D), table.dtype))
            s_out = tuple(a[:0] for a in s_table) if isinstance(s_table, tuple) else s_table[:0]
        self.head = (vec("final_layer_norm.gamma", ones), vec("final_layer_norm.beta", zeros),
                     bool(cfg.has_final_layer_norm), w_out, s_out, table, s_table)
        self.ok = len(kinds) == 1          # one storage kind throughout (QuantizedMatrix mixes not)
        self.nbytes = sum(b.nbytes for layer in self.layers for a in layer
                          for b in (a if isinstance(a, tuple) else (a,))) + table.nbytes
        self.dtype = dtype
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


def decode_step(params, cfg, token_ids, padding_mask, cache, index, threads=None,
                min_bytes=PARALLEL_BYTES):
    """Logits ``[B, 1, V]`` and hidden states ``[B, 1, E]`` of one token per row (``token_ids [B,
    1]`` at cache index ``index``; ``padding_mask [B, >= index + 1]``), with the KV cache updated in
    place: :func:`refopt.model.logits_forward` for that call, compiled.  ``threads``: the count
    to run on (default: the :class:`._threads.Governor`'s choice, at most Numba's current count);
    a stage runs on them when its bytes reach ``min_bytes`` (see the stages' comment), else on the
    calling thread.
    None when this model cannot take the compiled step (weights of mixed storage kinds)."""
    plan = _plan_for(params, cfg)
    if not plan.ok:
        return None
    if threads is None:
        most = numba.get_num_threads()
        start = most if plan.nbytes >= GOVERNOR_START_BYTES else 1
        return governor.timed((id(plan), token_ids.shape[0]), most, start, lambda n: decode_step(
            params, cfg, token_ids, padding_mask, cache, index, n, min_bytes))
    B = token_ids.shape[0]
    dtype = plan.dtype
    key_mask = np.ascontiguousarray(np.asarray(padding_mask)[:, :index + 1], dtype=np.bool_)
    position = np.maximum(key_mask.sum(axis=1) - 1, 0)                      # [B]
    tokens = np.asarray(token_ids).reshape(B)
    x = np.asarray(params["embed_tokens"][tokens], dtype)                   # [B, E]
    if cfg.has_projection:
        x = x @ np.asarray(params["project_in.weight"], dtype).T            # [B, D]
    x = np.ascontiguousarray(x + params["embed_positions"][position], dtype=dtype)
    D, F, H = cfg.hidden_dim, cfg.intermediate_dim, cfg.num_heads
    T = cache.shape[3]
    buffers = (np.empty((B, D), dtype), np.empty((B, 3 * D), dtype), np.empty((B, D), dtype),
               np.empty((B, F), dtype), np.empty((B * H, T), dtype))
    E, V = plan.head[5].shape[1], plan.head[5].shape[0]
    hidden = np.empty((B, E), dtype)
    logits = np.empty((B, V), dtype)
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        pre_ln, eps = bool(cfg.do_layer_norm_before), float(cfg.layer_norm_epsilon)
        for layer, weights in enumerate(plan.layers):
            _layer(x, *weights, cache, layer, index, key_mask, pre_ln, eps, plan.alpha, threads,
                   min_bytes, *buffers)
        _head(x, *plan.head, hidden, logits, eps, threads, min_bytes, buffers[0])
    finally:
        numba.set_num_threads(before)
    return logits[:, None], hidden[:, None]
