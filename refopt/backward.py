"""The backward pass of the OPT decoder: :func:`refopt.model.forward` read bottom to top, block by
block.  Each ``*_backward`` here undoes the block of :mod:`refopt.model` of the same name, its
lines in reverse; the comment above each step quotes the forward line it undoes.

``forward(..., tape=tape)`` files every block's saved intermediates in the tape; :func:`backward`
walks the blocks in reverse, calling each op's ``*_backward`` (kept beside its forward in
``refopt/ops``), and returns the gradient of every parameter:

    d_hidden -> head_side_backward      (project_out) -> (final norm)
             -> for each layer, last first:
                    mlp_block_backward        [post-LN: norm] -> dropout -> fc2 -> ReLU -> fc1
                                              -> [pre-LN: norm] -> + residual
                    attention_block_backward  [post-LN: norm] -> dropout -> out_proj -> attention
                                              -> q/k/v -> [pre-LN: norm] -> + residual
             -> embed_backward          + positions -> (project_in) -> token embedding

The LM head is tied to ``embed_tokens``; its share of that table's gradient comes from
``lm_head_backward`` in the caller (``refopt.training.loss_and_gradients``), since the head sits
after ``forward``'s output, and is passed in as ``d_embed_tokens``.

The token embedding's gradient covers every id that was looked up, the pad id included, as
Keras's ``Embedding`` (KerasHub) computes it; transformers builds ``embed_tokens`` with
``padding_idx=pad_token_id``, so torch leaves the pad row's lookup out.  The two agree whenever the
pad id appears only at padding positions (zero sample weight, masked as a key), as in real batches.

Only a cache-free forward (``cache=None, cache_index=0``, the training forward) can be walked back.
"""

from __future__ import annotations

import numpy as np

from refopt import backend
from refopt.config import OPTConfig
from refopt.errors import InputError


class Saved:
    """One block's entries of the tape: ``saved["q"]`` reads ``tape["layers.3.q"]``."""

    def __init__(self, tape: dict, prefix: str = ""):
        self.tape, self.prefix = tape, prefix

    def __getitem__(self, name):
        return self.tape[self.prefix + name]

    def __contains__(self, name):
        return self.prefix + name in self.tape


class Gradients:
    """The parameter gradients, filled in as the blocks' backwards reach each parameter.

    ``dense`` and ``norm`` undo :func:`refopt.model.dense` and :func:`refopt.model.norm`: they
    return the gradient of the input and keep those of the parameters.  ``trainable`` (a set of
    names, None for all) limits which are kept; a frozen map's weight gradient is not even formed
    (LoRA trains the adapters alone)."""

    def __init__(self, params, cfg: OPTConfig, ops, trainable=None):
        self.params, self.cfg, self.ops, self.trainable = params, cfg, ops, trainable
        self.grads: dict[str, np.ndarray] = {}

    def wants(self, name) -> bool:
        return name in self.params and (self.trainable is None or name in self.trainable)

    def keep(self, name, grad):
        if self.wants(name):
            self.grads[name] = grad

    def dense(self, d_y, x, name):
        # undoes  y = x @ W.T + b (+ the LoRA update (x . a) @ b, when adapted):
        # d_y [..., O], x [..., I] -> d_x [..., I]; keeps d_W, d_b (d_a, d_b of the adapter)
        w = self.params[name + ".weight"]
        if self.wants(name + ".weight") or self.wants(name + ".bias"):
            d_x, d_w, d_b = self.ops.linear_backward(d_y, x, w, name + ".bias" in self.params)
            self.keep(name + ".weight", d_w)
            self.keep(name + ".bias", d_b)
        else:                                   # frozen: only the input's gradient
            d_x = self.ops.linear_backward_input(d_y, w)
        if name + ".lora_a" in self.params:
            d_x_lora, d_a, d_b_lora = self.ops.lora_backward(
                d_y, x, self.params[name + ".lora_a"], self.params[name + ".lora_b"])
            self.keep(name + ".lora_a", d_a)
            self.keep(name + ".lora_b", d_b_lora)
            d_x = d_x + d_x_lora
        return d_x

    def norm(self, d_y, x, name):
        # undoes  y = LayerNorm(x):  d_y, x [B, S, D] -> d_x [B, S, D]; keeps d_gamma, d_beta
        d_x, d_gamma, d_beta = self.ops.layernorm_backward(
            d_y, x, self.params.get(name + ".gamma"), self.cfg.layer_norm_epsilon)
        self.keep(name + ".gamma", d_gamma)
        self.keep(name + ".beta", d_beta)
        return d_x


def backward(params, cfg: OPTConfig, tape: dict, d_hidden, d_embed_tokens=None, *,
             ops=None, trainable=None) -> dict[str, np.ndarray]:
    """Gradients of every parameter (refopt names, the params' shapes and dtype) given
    ``d_hidden`` ``[B, S, E]``, the gradient of the loss with respect to ``forward``'s output.

    ``tape`` is the dict filled by ``forward(params, cfg, token_ids, padding_mask, tape=tape)``
    (with ``dropout_rng`` too, in training: the recorded keep-masks are reused here).
    ``d_embed_tokens`` ``[V, E]``: a gradient already collected for ``embed_tokens`` (the tied LM
    head's share); the lookup's share is added to it in place and it is returned as
    ``grads["embed_tokens"]``.
    ``ops``: the ops namespace (:mod:`refopt.ops`, the NumPy reference, or a backend's, as
    :func:`refopt.model.forward` takes it); default: the current backend's.
    ``trainable``: a set of parameter names; only their gradients are computed and returned
    (None: every parameter's).
    """
    ops = backend.ops() if ops is None else ops
    if "token_ids" not in tape or "hidden" not in tape:
        raise InputError("backward: the tape lacks 'token_ids' or 'hidden'; pass the dict that "
                         "refopt.model.forward(..., tape=tape) filled")
    S = tape["token_ids"].shape[1]
    if cfg.num_layers and tape["layers.0.k"].shape[2] != S:
        raise InputError("backward: the tape comes from a forward with a KV cache; only a cache-free "
                         "forward (cache=None, cache_index=0) can be differentiated")
    g = Gradients(params, cfg, ops, trainable)
    mask = tape["attention_mask"]                                              # [B, 1, S, S]

    d_x = head_side_backward(d_hidden, Saved(tape), cfg, g)                    # [B, S, D]
    for i in reversed(range(cfg.num_layers)):
        saved = Saved(tape, f"layers.{i}.")
        d_x = mlp_block_backward(d_x, saved, f"layers.{i}.", cfg, ops, g)      # [B, S, D]
        d_x = attention_block_backward(d_x, saved, f"layers.{i}.", cfg, ops, g, mask)  # [B, S, D]
    embed_backward(d_x, Saved(tape), cfg, ops, g, d_embed_tokens)

    grads = g.grads
    wanted = set(params) if trainable is None else set(params) & set(trainable)
    missing = wanted - set(grads)
    if missing:  # a parameter the walk does not know: a bug here, never a user error
        raise AssertionError(f"backward: no gradient computed for {sorted(missing)}")
    # a mapping that reads its tensors on demand (the oracle's streamed checkpoint) says each one's
    # dtype without reading it
    dtype_of = getattr(params, "dtype_of", None) or (lambda name: params[name].dtype)
    return {name: grads[name].astype(dtype_of(name), copy=False) for name in params if name in wanted}


# ---------------------------------------------------------------------------------- blocks
def head_side_backward(d_hidden, saved: Saved, cfg: OPTConfig, g: Gradients):
    """Undoes :func:`refopt.model.head_side`: d_hidden [B, S, E] -> d_x [B, S, D]."""
    d_x = d_hidden                                                             # [B, S, E]
    if cfg.has_projection:
        # x = dense(ops, params, "project_out", x)
        d_x = g.dense(d_x, saved["final_norm"], "project_out")                 # [B, S, D]
    if cfg.has_final_layer_norm:
        # x = norm(ops, params, "final_layer_norm", x, cfg)
        d_x = g.norm(d_x, saved["final_norm_input"], "final_layer_norm")       # [B, S, D]
    return d_x


def mlp_block_backward(d_y, saved: Saved, p: str, cfg: OPTConfig, ops, g: Gradients):
    """Undoes :func:`refopt.model.mlp_block`: d_y [B, S, D] -> d_x [B, S, D]."""
    pre = cfg.do_layer_norm_before
    if not pre:
        # y = norm(ops, params, p + "mlp_layer_norm", y, cfg)
        d_y = g.norm(d_y, saved["mlp_residual"], p + "mlp_layer_norm")         # [B, S, D]
    # y = ops.add(x, out)               (d_out = d_y; d_x gets d_y too, added at the end)
    d_out = d_y                                                                # [B, S, D]
    if "mlp_dropout_mask" in saved:
        # out = ops.dropout_forward(out, keep)
        d_out = ops.dropout_backward(d_out, saved["mlp_dropout_mask"])         # [B, S, D]
    pre_act = saved["fc1_output"]                                              # [B, S, F]
    # out = dense(ops, params, p + "fc2", h)
    d_h = g.dense(d_out, ops.relu_forward(pre_act), p + "fc2")                 # [B, S, F]
    # h = ops.relu_forward(pre_act)
    d_pre = ops.relu_backward(d_h, pre_act)                                    # [B, S, F]
    # pre_act = dense(ops, params, p + "fc1", m)
    d_m = g.dense(d_pre, saved["mlp_input"], p + "fc1")                        # [B, S, D]
    if pre:
        # m = norm(ops, params, p + "mlp_layer_norm", x, cfg)
        d_m = g.norm(d_m, saved["mlp_block_input"], p + "mlp_layer_norm")      # [B, S, D]
    # y = ops.add(x, out)               (the residual: both paths reach x)
    return d_y + d_m                                                           # [B, S, D]


def attention_block_backward(d_y, saved: Saved, p: str, cfg: OPTConfig, ops, g: Gradients, mask):
    """Undoes :func:`refopt.model.attention_block` (cache-free): d_y [B, S, D] -> d_x [B, S, D];
    mask [B, 1, S, S] the forward's."""
    H, pre = cfg.num_heads, cfg.do_layer_norm_before
    if not pre:
        # y = norm(ops, params, p + "self_attn_layer_norm", y, cfg)
        d_y = g.norm(d_y, saved["attention_residual"], p + "self_attn_layer_norm")  # [B, S, D]
    # y = ops.add(x, out)               (d_out = d_y; d_x gets d_y too, added at the end)
    d_out = d_y                                                                # [B, S, D]
    if "attention_dropout_mask" in saved:
        # out = ops.dropout_forward(out, keep)
        d_out = ops.dropout_backward(d_out, saved["attention_dropout_mask"])   # [B, S, D]
    # out = dense(ops, params, p + "out_proj", ctx)
    d_ctx = g.dense(d_out, saved["attention_context"], p + "out_proj")         # [B, S, D]
    # ctx = ops.merge_heads(ctx)        (undone by split_heads)
    # ctx, probs = ops.attention_forward(q, k, v, mask)
    d_q, d_k, d_v = ops.attention_backward(ops.split_heads(d_ctx, H), saved["q"], saved["k"],
                                           saved["v"], saved["attention_probs"], mask)  # [B, H, S, K]
    a = saved["attention_input"]                                               # [B, S, D]
    # q = ops.split_heads(dense(ops, params, p + "q_proj", a) * cfg.head_dim ** -0.5, H)
    d_a = g.dense(ops.merge_heads(d_q) * cfg.head_dim ** -0.5, a, p + "q_proj")  # [B, S, D]
    # k = ops.split_heads(dense(ops, params, p + "k_proj", a), H)
    d_a = d_a + g.dense(ops.merge_heads(d_k), a, p + "k_proj")
    # v = ops.split_heads(dense(ops, params, p + "v_proj", a), H)
    d_a = d_a + g.dense(ops.merge_heads(d_v), a, p + "v_proj")
    if pre:
        # a = norm(ops, params, p + "self_attn_layer_norm", x, cfg)
        d_a = g.norm(d_a, saved["input"], p + "self_attn_layer_norm")          # [B, S, D]
    # y = ops.add(x, out)               (the residual: both paths reach x)
    return d_y + d_a                                                           # [B, S, D]


def embed_backward(d_x, saved: Saved, cfg: OPTConfig, ops, g: Gradients, d_embed_tokens=None):
    """Undoes :func:`refopt.model.embed`: d_x [B, S, D] -> the tables' gradients (in ``g``);
    ``d_embed_tokens`` [V, E] (the tied head's share), when given, receives the lookup's in place."""
    params = g.params
    # x = ops.add(x, ops.embedding_forward(params["embed_positions"], positions))
    if g.wants("embed_positions"):
        g.keep("embed_positions", ops.embedding_backward(d_x, saved["positions"],
                                                         params["embed_positions"].shape[0]))
    if cfg.has_projection:
        # x = dense(ops, params, "project_in", e)
        d_x = g.dense(d_x, saved["project_in.input"], "project_in")            # [B, S, E]
    # e = ops.embedding_forward(params["embed_tokens"], token_ids)
    if g.wants("embed_tokens"):
        d_tokens = ops.embedding_backward(d_x, saved["token_ids"], params["embed_tokens"].shape[0])
        if d_embed_tokens is not None:
            d_embed_tokens += d_tokens                                         # [V, E]
            d_tokens = d_embed_tokens
        g.keep("embed_tokens", d_tokens)
