"""The OPT decoder over a flat dict of NumPy parameters, read top to bottom in :func:`forward`:

    x = embed(token_ids, positions)           # token embedding (-> project_in) + position
    for each layer:
        x = attention_block(x)                # x + attention(norm(x)), with the KV cache
        x = mlp_block(x)                      # x + fc2(relu(fc1(norm(x))))
    hidden = head_side(x)                     # (final norm) -> (project_out); the tied LM head follows

Each block is a short function with a shape comment per line; it returns its output and the
intermediates its backward needs, which ``forward`` files in the tape (:mod:`refopt.backward` walks
the same blocks in reverse, each ``*_backward`` beside the forward it undoes).

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
    <dense>.lora_a, <dense>.lora_b            LoRA adapters, only where enabled (refopt.models.lora)

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


# ---------------------------------------------------------------------------------- pieces
def dense(ops, params, name, x):
    # x [..., I] -> x @ W.T + b [..., O], W = params[name.weight] [O, I], b = params[name.bias] | None
    y = ops.linear_forward(x, params[name + ".weight"], params.get(name + ".bias"))
    a = params.get(name + ".lora_a")
    if a is not None:                           # a LoRA adapter beside W (refopt.models.lora)
        y = ops.add(y, ops.lora_forward(x, a, params[name + ".lora_b"]))          # [..., O]
    return y


def norm(ops, params, name, x, cfg):
    # x [..., D] -> LayerNorm(x) [..., D] with params[name.gamma], params[name.beta] (when affine)
    return ops.layernorm_forward(x, params.get(name + ".gamma"), params.get(name + ".beta"),
                                 cfg.layer_norm_epsilon)


# ---------------------------------------------------------------------------------- blocks
# Each block returns its output and ``saved``, the intermediates its backward reads
# (:mod:`refopt.backward`, ``*_block_backward``); ``forward`` files them in the tape.
def embed(params, cfg: OPTConfig, ops, token_ids, positions):
    """token_ids, positions [B, S] -> x [B, S, D]: token embedding (through project_in) + position."""
    e = ops.embedding_forward(params["embed_tokens"], token_ids)                   # [B, S, E]
    x = dense(ops, params, "project_in", e) if cfg.has_projection else e           # [B, S, D]
    x = ops.add(x, ops.embedding_forward(params["embed_positions"], positions))   # [B, S, D]
    return x, {"project_in.input": e if cfg.has_projection else None, "embeddings": x}


def attention_block(x, params, p, cfg: OPTConfig, ops, mask, keep=None, layer_cache=None,
                    cache_index=0):
    """x [B, S, D] -> x + attention(norm(x)) [B, S, D] (pre-LN; post-LN: norm(x + attention(x))).

    mask [B, 1, S, T] bool; keep: the dropout keep-mask [B, S, D] or None; layer_cache: this layer's
    slice of the KV cache [B, 2, T, H, K] (keys and values of the new tokens go in at
    ``cache_index``; attention reads ``0 .. cache_index + S``)."""
    H, pre = cfg.num_heads, cfg.do_layer_norm_before
    a = norm(ops, params, p + "self_attn_layer_norm", x, cfg) if pre else x        # [B, S, D]
    q = ops.split_heads(dense(ops, params, p + "q_proj", a) * cfg.head_dim ** -0.5, H)  # [B, H, S, K]
    k = ops.split_heads(dense(ops, params, p + "k_proj", a), H)                    # [B, H, S, K]
    v = ops.split_heads(dense(ops, params, p + "v_proj", a), H)                    # [B, H, S, K]
    if layer_cache is not None:
        k, v = cache_keys_values(layer_cache, cache_index, k, v)                   # [B, H, T, K]
    ctx, probs = ops.attention_forward(q, k, v, mask)                    # [B, H, S, K], [B, H, S, T]
    ctx = ops.merge_heads(ctx)                                                     # [B, S, D]
    out = dense(ops, params, p + "out_proj", ctx)                                  # [B, S, D]
    if keep is not None:
        out = ops.dropout_forward(out, keep)                                       # [B, S, D]
    y = ops.add(x, out)                                                            # [B, S, D]
    saved = {"input": x, "attention_input": a, "q": q, "k": k, "v": v, "attention_probs": probs,
             "attention_context": ctx, "attention_dropout_mask": keep, "attention_output": out}
    if not pre:
        saved["attention_residual"] = y
        y = norm(ops, params, p + "self_attn_layer_norm", y, cfg)                 # [B, S, D]
    return y, saved


def mlp_block(x, params, p, cfg: OPTConfig, ops, keep=None, keep_preactivation=False):
    """x [B, S, D] -> x + fc2(relu(fc1(norm(x)))) [B, S, D] (post-LN: norm(x + mlp(x))).

    keep: the dropout keep-mask [B, S, D] or None; keep_preactivation: save fc1's output for ReLU's
    backward (else bias and ReLU run fused into the product's epilogue)."""
    pre = cfg.do_layer_norm_before
    m = norm(ops, params, p + "mlp_layer_norm", x, cfg) if pre else x               # [B, S, D]
    if keep_preactivation or p + "fc1.lora_a" in params:   # training, or an adapted fc1
        pre_act = dense(ops, params, p + "fc1", m)                                 # [B, S, F]
        h = ops.relu_forward(pre_act)                                              # [B, S, F]
    else:                         # inference: bias and ReLU fused into the product's epilogue
        pre_act = None
        h = ops.linear_relu_forward(m, params[p + "fc1.weight"], params.get(p + "fc1.bias"))
    out = dense(ops, params, p + "fc2", h)                                         # [B, S, D]
    if keep is not None:
        out = ops.dropout_forward(out, keep)                                       # [B, S, D]
    y = ops.add(x, out)                                                            # [B, S, D]
    saved = {"mlp_block_input": x, "mlp_input": m, "fc1_output": pre_act,
             "mlp_dropout_mask": keep, "mlp_output": out}
    if not pre:
        saved["mlp_residual"] = y
        y = norm(ops, params, p + "mlp_layer_norm", y, cfg)                       # [B, S, D]
    saved["output"] = y
    return y, saved


def head_side(x, params, cfg: OPTConfig, ops):
    """x [B, S, D] -> hidden [B, S, E]: the final norm (pre-LN models) and project_out."""
    saved = {"final_norm_input": x if cfg.has_final_layer_norm else None}
    if cfg.has_final_layer_norm:
        x = norm(ops, params, "final_layer_norm", x, cfg)                          # [B, S, D]
    saved["final_norm"] = x
    if cfg.has_projection:
        x = dense(ops, params, "project_out", x)                                   # [B, S, E]
    saved["hidden"] = x
    return x, saved


def cache_keys_values(layer_cache, cache_index, k, v):
    """Write the new keys and values k, v [B, H, S, K] into layer_cache [B, 2, T, H, K] at
    ``cache_index`` and return every key and value so far, [B, H, cache_index + S, K] each."""
    end = cache_index + k.shape[2]
    layer_cache[:, 0, cache_index:end] = k.transpose(0, 2, 1, 3)                   # [B, S, H, K]
    layer_cache[:, 1, cache_index:end] = v.transpose(0, 2, 1, 3)
    return (layer_cache[:, 0, :end].transpose(0, 2, 1, 3),                         # [B, H, T, K]
            layer_cache[:, 1, :end].transpose(0, 2, 1, 3))


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
    key_mask = np.asarray(padding_mask)[:, :end].astype(bool)                     # [B, T=end]
    positions = positions_from_mask(key_mask)[:, cache_index:end]                  # [B, S]
    mask = ops.attention_mask(key_mask, np.arange(cache_index, end))               # [B, 1, S, T]
    record = _recorder(tape)
    record("", {"token_ids": token_ids, "positions": positions, "attention_mask": mask})

    x, saved = embed(params, cfg, ops, token_ids, positions)                       # [B, S, D]
    record("", saved)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        keep_attention, keep_mlp = _dropout_masks(ops, cfg, dropout_rng, x)        # [B, S, D] | None
        x, saved = attention_block(x, params, p, cfg, ops, mask, keep_attention,
                                   None if cache is None else cache[:, i], cache_index)  # [B, S, D]
        record(p, saved)
        x, saved = mlp_block(x, params, p, cfg, ops, keep_mlp, tape is not None)   # [B, S, D]
        record(p, saved)
    x, saved = head_side(x, params, cfg, ops)                                      # [B, S, E]
    record("", saved)
    return x


def _recorder(tape):
    # record(prefix, saved): file a block's intermediates in the tape as prefix + name (None: absent)
    def record(prefix, saved):
        tape.update({prefix + name: value for name, value in saved.items() if value is not None})
    return record if tape is not None else (lambda prefix, saved: None)


def _dropout_masks(ops, cfg, dropout_rng, x):
    # training: a keep-mask [B, S, D] for each residual branch of a layer (attention's drawn first);
    # inference: (None, None)
    if dropout_rng is None or cfg.dropout == 0:
        return None, None
    return tuple(ops.dropout_mask(dropout_rng, x.shape, cfg.dropout, x.dtype) for _ in range(2))


def logits_forward(params, cfg: OPTConfig, token_ids, padding_mask, *, ops=None, **kwargs):
    """Logits ``[B, S, V]``: :func:`forward` followed by the tied LM head."""
    ops = backend.ops() if ops is None else ops
    hidden = forward(params, cfg, token_ids, padding_mask, ops=ops, **kwargs)
    return ops.lm_head_forward(hidden, params["embed_tokens"])
