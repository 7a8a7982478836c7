"""The OPT decoder over a flat dict of NumPy parameters, top to bottom in one function.

    embed -> (project_in) -> + positions
    for each layer:  [norm] -> attention (with cache) -> residual -> [norm] -> MLP -> residual
    (final norm) -> (project_out) -> tied LM head

Pre-LayerNorm models (OPT-125m, 1.3b, ...) normalise *before* each block and once more at the end;
post-LayerNorm models (OPT-350m) normalise *after* each residual sum and have no final norm.

Parameters (``x @ weight.T + bias``: weights stored ``[out, in]``, as transformers and PyTorch store
them, so each output's weights are one contiguous row -- what a memory-bound decode step streams):

    embed_tokens                        [V, E]   also the LM head (tied)
    embed_positions                     [P, D]   row p is position p (KerasHub's layout)
    project_in.weight / project_out.weight   [D, E] / [E, D]   only when E != D
    layers.{i}.self_attn_layer_norm.{gamma,beta}   [D]
    layers.{i}.{q,k,v,out}_proj.{weight,bias}     [D, D], [D]
    layers.{i}.mlp_layer_norm.{gamma,beta}         [D]
    layers.{i}.fc1.{weight,bias}   [F, D], [F]
    layers.{i}.fc2.{weight,bias}   [D, F], [D]
    final_layer_norm.{gamma,beta}  [D]        only when config.has_final_layer_norm

Positions are derived from the padding mask: ``cumsum(mask) - 1`` (clipped at 0 on padding), so a
right-padded row gets KerasHub's absolute positions 0, 1, 2, ... and a left-padded row gets the
positions transformers computes for it.

The KV cache is KerasHub's layout, one array ``[B, L, 2, T, H, K]`` (batch first, so samplers can
reorder or repeat rows); ``cache[:, i, 0]`` holds layer i's keys and ``cache[:, i, 1]`` its values.
"""

from __future__ import annotations

import numpy as np

from refopt import backend
from refopt.config import OPTConfig


# ---------------------------------------------------------------------------------- parameters
class Parameters(dict):
    """A model's parameters: a dict name -> array that counts its changes in ``version``.

    Assigning or removing an entry adds one; so does :meth:`touch`, which an optimizer calls after
    updating arrays in place.  Copies of the weights kept elsewhere (the cuda backend's
    device-resident weights) compare versions to know when they are stale."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.version = 0

    def touch(self) -> None:
        """Note an in-place change of some array."""
        self.version += 1

    def __setitem__(self, name, value):
        super().__setitem__(name, value)
        self.version += 1

    def __delitem__(self, name):
        super().__delitem__(name)
        self.version += 1

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self.version += 1

    def pop(self, *args):
        self.version += 1
        return super().pop(*args)


def param_shapes(cfg: OPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of a model with this config."""
    D, E, F, V = cfg.hidden_dim, cfg.word_embed_proj_dim, cfg.intermediate_dim, cfg.vocabulary_size
    shapes = {"embed_tokens": (V, E), "embed_positions": (cfg.max_sequence_length, D)}
    if cfg.has_projection:
        shapes["project_in.weight"] = (D, E)
        shapes["project_out.weight"] = (E, D)

    def norm(prefix):
        if cfg.layer_norm_elementwise_affine:
            shapes[f"{prefix}.gamma"] = (D,)
            shapes[f"{prefix}.beta"] = (D,)

    def dense(prefix, i, o):
        shapes[f"{prefix}.weight"] = (o, i)
        if cfg.enable_bias:
            shapes[f"{prefix}.bias"] = (o,)

    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        norm(f"{p}.self_attn_layer_norm")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            dense(f"{p}.{name}", D, D)
        norm(f"{p}.mlp_layer_norm")
        dense(f"{p}.fc1", D, F)
        dense(f"{p}.fc2", F, D)
    if cfg.has_final_layer_norm:
        norm("final_layer_norm")
    return shapes


def init_params(cfg: OPTConfig, seed: int = 0, dtype=None, std: float = 0.02) -> dict[str, np.ndarray]:
    """Random parameters: normal(0, std) kernels and embeddings, zero biases, unit LayerNorm gains
    (the initialisation both KerasHub and transformers use for OPT)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype or cfg.compute_dtype)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".gamma"):
            params[name] = np.ones(shape, dtype)
        elif name.endswith((".beta", ".bias")):
            params[name] = np.zeros(shape, dtype)
        else:
            params[name] = (rng.standard_normal(shape) * std).astype(dtype)
    return params


def new_cache(cfg: OPTConfig, batch: int, length: int, dtype) -> np.ndarray:
    """An empty KV cache ``[B, L, 2, T, H, K]``."""
    return np.zeros((batch, cfg.num_layers, 2, length, cfg.num_heads, cfg.head_dim), dtype)


def positions_from_mask(padding_mask):
    # padding_mask [B, T] -> positions [B, T] int: cumsum - 1, padding clipped to 0
    return np.maximum(np.cumsum(padding_mask.astype(np.int64), axis=1) - 1, 0)


# ---------------------------------------------------------------------------------- forward
def forward(params, cfg: OPTConfig, token_ids, padding_mask, *, cache=None, cache_index: int = 0,
            tape: dict | None = None, dropout_rng: np.random.Generator | None = None, ops=None):
    """Hidden states ``[B, S, E]`` (after the final norm and ``project_out``) for ``token_ids``.

    token_ids     [B, S] int, placed at indices ``cache_index .. cache_index+S`` of the sequence
    padding_mask  [B, >= cache_index+S] bool/int, 1 for real tokens, covering the whole sequence so
                  far (only its first ``cache_index+S`` columns are read)
    cache         optional KV cache ``[B, L, 2, T, H, K]``; keys and values of the new tokens are
                  written into it in place, and attention reads indices ``0 .. cache_index+S``
    tape          optional dict that receives every named intermediate (for backward and for the
                  oracle's divergence locator)
    dropout_rng   when given and ``cfg.dropout > 0``: training mode, inverted dropout on both
                  residual branches (after ``out_proj`` and after ``fc2``), masks kept in ``tape``
    ops           the ops namespace to run (:mod:`refopt.ops`, the NumPy reference, or a backend's
                  kernels with the same names, :func:`refopt.backend.ops`); default: the current
                  backend's
    """
    ops = backend.ops() if ops is None else ops
    B, S = token_ids.shape
    end = cache_index + S
    key_mask = np.asarray(padding_mask)[:, :end].astype(bool)                 # [B, T=end]
    H, eps = cfg.num_heads, cfg.layer_norm_epsilon
    scale = cfg.head_dim ** -0.5
    rec = tape.__setitem__ if tape is not None else (lambda name, value: None)
    get = params.get

    def dropout(x, name):
        if dropout_rng is None or cfg.dropout == 0:
            return x
        keep = (dropout_rng.random(x.shape) >= cfg.dropout) / (1.0 - cfg.dropout)
        rec(name, keep.astype(x.dtype))
        return x * keep.astype(x.dtype)

    # embeddings
    positions = positions_from_mask(key_mask)[:, cache_index:end]            # [B, S]
    rec("token_ids", token_ids)
    rec("positions", positions)
    x = ops.embedding_forward(params["embed_tokens"], token_ids)                  # [B, S, E]
    if cfg.has_projection:
        rec("project_in.input", x)
        x = ops.linear_forward(x, params["project_in.weight"])                   # [B, S, D]
    x = x + ops.embedding_forward(params["embed_positions"], positions)          # [B, S, D]
    rec("embeddings", x)

    mask = ops.attention_mask(key_mask, np.arange(cache_index, end))              # [B, 1, S, T]
    rec("attention_mask", mask)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        # --- self-attention block
        residual = x                                                           # [B, S, D]
        rec(p + "input", x)
        if cfg.do_layer_norm_before:
            x = ops.layernorm_forward(x, get(p + "self_attn_layer_norm.gamma"),
                                  get(p + "self_attn_layer_norm.beta"), eps)
        rec(p + "attention_input", x)
        q = ops.linear_forward(x, params[p + "q_proj.weight"], get(p + "q_proj.bias")) * scale
        k = ops.linear_forward(x, params[p + "k_proj.weight"], get(p + "k_proj.bias"))
        v = ops.linear_forward(x, params[p + "v_proj.weight"], get(p + "v_proj.bias"))  # [B, S, D]
        q, k, v = ops.split_heads(q, H), ops.split_heads(k, H), ops.split_heads(v, H)     # [B, H, S, K]
        if cache is not None:
            cache[:, i, 0, cache_index:end] = k.transpose(0, 2, 1, 3)          # [B, S, H, K]
            cache[:, i, 1, cache_index:end] = v.transpose(0, 2, 1, 3)
            k = cache[:, i, 0, :end].transpose(0, 2, 1, 3)                     # [B, H, T, K]
            v = cache[:, i, 1, :end].transpose(0, 2, 1, 3)
        rec(p + "q", q), rec(p + "k", k), rec(p + "v", v)
        ctx, probs = ops.attention_forward(q, k, v, mask)                          # [B, H, S, K]
        rec(p + "attention_probs", probs)
        ctx = ops.merge_heads(ctx)                                                 # [B, S, D]
        rec(p + "attention_context", ctx)
        x = ops.linear_forward(ctx, params[p + "out_proj.weight"], get(p + "out_proj.bias"))
        x = dropout(x, p + "attention_dropout_mask")
        rec(p + "attention_output", x)
        x = residual + x
        if not cfg.do_layer_norm_before:
            rec(p + "attention_residual", x)
            x = ops.layernorm_forward(x, get(p + "self_attn_layer_norm.gamma"),
                                  get(p + "self_attn_layer_norm.beta"), eps)
        # --- MLP block
        residual = x
        rec(p + "mlp_block_input", x)
        if cfg.do_layer_norm_before:
            x = ops.layernorm_forward(x, get(p + "mlp_layer_norm.gamma"), get(p + "mlp_layer_norm.beta"), eps)
        rec(p + "mlp_input", x)
        if tape is not None:   # training keeps the pre-activation for ReLU's backward
            h = ops.linear_forward(x, params[p + "fc1.weight"], get(p + "fc1.bias"))   # [B, S, F]
            rec(p + "fc1_output", h)
            h = ops.relu_forward(h)
        else:                  # inference: bias and ReLU fused into the product's epilogue
            h = ops.linear_relu_forward(x, params[p + "fc1.weight"], get(p + "fc1.bias"))
        x = ops.linear_forward(h, params[p + "fc2.weight"], get(p + "fc2.bias"))   # [B, S, D]
        x = dropout(x, p + "mlp_dropout_mask")
        rec(p + "mlp_output", x)
        x = residual + x
        if not cfg.do_layer_norm_before:
            rec(p + "mlp_residual", x)
            x = ops.layernorm_forward(x, get(p + "mlp_layer_norm.gamma"), get(p + "mlp_layer_norm.beta"), eps)
        rec(p + "output", x)

    if cfg.has_final_layer_norm:
        rec("final_norm_input", x)
        x = ops.layernorm_forward(x, get("final_layer_norm.gamma"), get("final_layer_norm.beta"), eps)
    rec("final_norm", x)
    if cfg.has_projection:
        x = ops.linear_forward(x, params["project_out.weight"])                  # [B, S, E]
    rec("hidden", x)
    return x


def logits_forward(params, cfg: OPTConfig, token_ids, padding_mask, *, ops=None, **kwargs):
    """Logits ``[B, S, V]``: :func:`forward` followed by the tied LM head."""
    ops = backend.ops() if ops is None else ops
    hidden = forward(params, cfg, token_ids, padding_mask, ops=ops, **kwargs)
    return ops.lm_head_forward(hidden, params["embed_tokens"])
