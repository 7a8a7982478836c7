"""The backward pass of the OPT decoder: :func:`refopt.model.forward` read bottom to top.

``forward(..., tape=tape)`` records every intermediate the backward needs; :func:`backward` walks
that tape in reverse, calling each op's ``*_backward`` (kept beside its forward in ``refopt/ops``),
and returns the gradient of every parameter:

    d_hidden -> (project_out) -> (final norm) -> for each layer, last first:
        [post-LN: norm]  MLP block: dropout -> fc2 -> ReLU -> fc1 -> [pre-LN: norm] -> + residual
        [post-LN: norm]  attention block: dropout -> out_proj -> attention -> q/k/v -> [pre-LN: norm]
                         -> + residual
    -> + positions -> (project_in) -> token embedding

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


def backward(params, cfg: OPTConfig, tape: dict, d_hidden, d_embed_tokens=None, *,
             ops=None) -> dict[str, np.ndarray]:
    """Gradients of every parameter (refopt names, the params' shapes and dtype) given
    ``d_hidden`` ``[B, S, E]``, the gradient of the loss with respect to ``forward``'s output.

    ``tape`` is the dict filled by ``forward(params, cfg, token_ids, padding_mask, tape=tape)``
    (with ``dropout_rng`` too, in training: the recorded keep-masks are reused here).
    ``d_embed_tokens`` ``[V, E]``: a gradient already collected for ``embed_tokens`` (the tied LM
    head's share); the lookup's share is added to it in place and it is returned as
    ``grads["embed_tokens"]``.
    ``ops``: the ops namespace (:mod:`refopt.ops`, the NumPy reference, or a backend's, as
    :func:`refopt.model.forward` takes it); default: the current backend's.
    """
    ops = backend.ops() if ops is None else ops
    if "token_ids" not in tape or "hidden" not in tape:
        raise InputError("backward: the tape lacks 'token_ids' or 'hidden'; pass the dict that "
                         "refopt.model.forward(..., tape=tape) filled")
    S = tape["token_ids"].shape[1]
    if cfg.num_layers and tape["layers.0.k"].shape[2] != S:
        raise InputError("backward: the tape comes from a forward with a KV cache; only a cache-free "
                         "forward (cache=None, cache_index=0) can be differentiated")
    H, eps = cfg.num_heads, cfg.layer_norm_epsilon
    scale = cfg.head_dim ** -0.5
    get = params.get
    grads: dict[str, np.ndarray] = {}
    mask = tape["attention_mask"]                                              # [B, 1, S, S]

    def norm_backward(d_y, x, prefix):
        # d_y, x [B, S, D] -> d_x; records the norm's gamma/beta gradients
        d_x, d_gamma, d_beta = ops.layernorm_backward(d_y, x, get(prefix + ".gamma"), eps)
        if prefix + ".gamma" in params:
            grads[prefix + ".gamma"] = d_gamma
        if prefix + ".beta" in params:
            grads[prefix + ".beta"] = d_beta
        return d_x

    def dense_backward(d_y, x, prefix):
        # d_y [..., O], x [..., I] -> d_x [..., I]; records the weight/bias gradients
        d_x, d_w, d_b = ops.linear_backward(d_y, x, params[prefix + ".weight"], prefix + ".bias" in params)
        grads[prefix + ".weight"] = d_w
        if d_b is not None:
            grads[prefix + ".bias"] = d_b
        return d_x

    def dropout_back(d_y, name):
        # the keep-mask is in the tape only when dropout was active in the forward
        return ops.dropout_backward(d_y, tape[name]) if name in tape else d_y

    # output side: project_out, final norm
    d_x = d_hidden                                                             # [B, S, E]
    if cfg.has_projection:
        d_x = dense_backward(d_x, tape["final_norm"], "project_out")          # [B, S, D]
    if cfg.has_final_layer_norm:
        d_x = norm_backward(d_x, tape["final_norm_input"], "final_layer_norm")  # [B, S, D]

    for i in reversed(range(cfg.num_layers)):
        p = f"layers.{i}."
        # --- MLP block, in reverse
        if not cfg.do_layer_norm_before:
            d_x = norm_backward(d_x, tape[p + "mlp_residual"], p + "mlp_layer_norm")
        d_residual = d_x                                                       # [B, S, D]
        d_m = dropout_back(d_x, p + "mlp_dropout_mask")                        # [B, S, D]
        h = tape[p + "fc1_output"]                                             # [B, S, F]
        d_h = dense_backward(d_m, ops.relu_forward(h), p + "fc2")                  # [B, S, F]
        d_h = ops.relu_backward(d_h, h)
        d_m = dense_backward(d_h, tape[p + "mlp_input"], p + "fc1")           # [B, S, D]
        if cfg.do_layer_norm_before:
            d_m = norm_backward(d_m, tape[p + "mlp_block_input"], p + "mlp_layer_norm")
        d_x = d_residual + d_m                                                 # [B, S, D]

        # --- self-attention block, in reverse
        if not cfg.do_layer_norm_before:
            d_x = norm_backward(d_x, tape[p + "attention_residual"], p + "self_attn_layer_norm")
        d_residual = d_x
        d_a = dropout_back(d_x, p + "attention_dropout_mask")                  # [B, S, D]
        d_ctx = dense_backward(d_a, tape[p + "attention_context"], p + "out_proj")  # [B, S, D]
        d_q, d_k, d_v = ops.attention_backward(ops.split_heads(d_ctx, H), tape[p + "q"], tape[p + "k"],
                                           tape[p + "v"], tape[p + "attention_probs"], mask)
        a_in = tape[p + "attention_input"]                                     # [B, S, D]
        d_a = dense_backward(ops.merge_heads(d_q) * scale, a_in, p + "q_proj")     # q was scaled
        d_a = d_a + dense_backward(ops.merge_heads(d_k), a_in, p + "k_proj")
        d_a = d_a + dense_backward(ops.merge_heads(d_v), a_in, p + "v_proj")
        if cfg.do_layer_norm_before:
            d_a = norm_backward(d_a, tape[p + "input"], p + "self_attn_layer_norm")
        d_x = d_residual + d_a                                                 # [B, S, D]

    # embeddings: x = (project_in(embed_tokens[ids])) + embed_positions[positions]
    grads["embed_positions"] = ops.embedding_backward(d_x, tape["positions"],
                                                  params["embed_positions"].shape[0])
    if cfg.has_projection:
        d_x = dense_backward(d_x, tape["project_in.input"], "project_in")     # [B, S, E]
    d_tokens = ops.embedding_backward(d_x, tape["token_ids"], params["embed_tokens"].shape[0])
    if d_embed_tokens is not None:
        d_embed_tokens += d_tokens                                             # [V, E]
        d_tokens = d_embed_tokens
    grads["embed_tokens"] = d_tokens

    missing = set(params) - set(grads)
    if missing:  # a parameter the walk does not know: a bug here, never a user error
        raise AssertionError(f"backward: no gradient computed for {sorted(missing)}")
    return {name: grads[name].astype(params[name].dtype, copy=False) for name in params}
