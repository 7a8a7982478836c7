"""The oracle's reference values: refopt's NumPy model run in float64, named the way every adapter
names them, and the magnitude each tensor is judged against.

Named intermediates, in forward order (:func:`activation_names`)::

    embeddings                    token embedding (after project_in) + position embedding [B, S, D]
    layers.{i}.attention_input    what layer i's q/k/v projections read (after the LayerNorm in a
                                  pre-LN model; the layer's input in a post-LN one)
    layers.{i}.attention_output   the output of layer i's out_proj, before the residual sum
    layers.{i}.mlp_input          what layer i's fc1 reads
    layers.{i}.mlp_output         the output of layer i's fc2, before the residual sum
    layers.{i}.output             the residual stream after layer i (after its LayerNorm when post-LN)
    final_norm                    the final LayerNorm's output (pre-LN models that have one)
    hidden                        the output of project_out (models with word_embed_proj_dim < hidden)
    logits                        [B, S, V]

Each is defined by a module boundary (the input or output of a named projection), so a port can
produce it with hooks on its own modules.  Only real (unpadded) positions are ever compared: at a
padding position the libraries legitimately differ (transformers embeds padding with a spare
position row, refopt with row 0).

Gradients are keyed by refopt's parameter names and compared in *backward order*
(:func:`gradient_order`): the first gradient that diverges is the one nearest the loss, where the
backward pass first went wrong.

Each tensor's error is measured against its *family's* magnitude, not only its own
(:func:`activation_scales`, :func:`gradient_scales`): a tensor that is zero or nearly so in exact
arithmetic (a key bias's gradient, the score gradients of a query that attends one key, an MLP
branch whose units are all off) holds only rounding noise, and that noise is as large as the terms
it was computed from, which are the family's.  The families: an attention or MLP branch's output
belongs with the residual stream it is added to; a gradient with the other gradients of its block
(one layer's attention block, one layer's MLP block, the final LayerNorm and ``project_out``, the
position table and ``project_in``, the token table).

The loss is the fixtures' (``../shared/fixtures/hf/*/expected.npz``): ``sum(sw * CE) / sum(sw)``,
CE the cross-entropy of the logits at position t against the token at t+1, ``sw`` the padding mask
at t+1 (:func:`loss_targets`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from refopt import model as _model
from refopt import ops as _numpy_ops
from refopt.config import OPTConfig


# ---------------------------------------------------------------------------------- names
def activation_names(cfg: OPTConfig) -> list[str]:
    """The named intermediates of a model with this config, in forward order (logits last)."""
    names = ["embeddings"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        names += [p + "attention_input", p + "attention_output", p + "mlp_input", p + "mlp_output",
                  p + "output"]
    if cfg.has_final_layer_norm:
        names.append("final_norm")
    if cfg.has_projection:
        names.append("hidden")
    names.append("logits")
    return names


def depth_of(name: str, cfg: OPTConfig) -> int:
    """How many decoder layers a tensor has gone through (the tolerance model's ``depth``):
    0 for the embeddings, ``i + 1`` inside layer ``i``, ``num_layers`` after the last layer and
    for gradients and the loss."""
    if name == "embeddings":
        return 0
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    return cfg.num_layers


def from_tape(tape: dict, cfg: OPTConfig, logits) -> dict[str, np.ndarray]:
    """The named intermediates out of a :func:`refopt.model.forward` tape."""
    out = {"embeddings": tape["embeddings"]}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for name in ("attention_input", "attention_output", "mlp_input", "mlp_output", "output"):
            out[p + name] = tape[p + name]
    if cfg.has_final_layer_norm:
        out["final_norm"] = tape["final_norm"]
    if cfg.has_projection:
        out["hidden"] = tape["hidden"]
    out["logits"] = logits
    return out


def gradient_order(cfg: OPTConfig) -> list[str]:
    """refopt's parameter names in the order a backward pass produces their gradients (nearest the
    loss first); the tied LM head's gradient is inside ``embed_tokens``, which comes last."""
    shapes = _model.param_shapes(cfg)
    order = []

    def add(*names):
        order.extend(n for n in names if n in shapes)

    if cfg.has_projection:
        add("project_out.weight")
    add("final_layer_norm.gamma", "final_layer_norm.beta")
    for i in reversed(range(cfg.num_layers)):
        p = f"layers.{i}."
        if not cfg.do_layer_norm_before:
            add(p + "mlp_layer_norm.gamma", p + "mlp_layer_norm.beta")
        add(p + "fc2.weight", p + "fc2.bias", p + "fc1.weight", p + "fc1.bias")
        if cfg.do_layer_norm_before:
            add(p + "mlp_layer_norm.gamma", p + "mlp_layer_norm.beta")
        if not cfg.do_layer_norm_before:
            add(p + "self_attn_layer_norm.gamma", p + "self_attn_layer_norm.beta")
        add(p + "out_proj.weight", p + "out_proj.bias")
        for proj in ("q_proj", "k_proj", "v_proj"):
            add(p + proj + ".weight", p + proj + ".bias")
        if cfg.do_layer_norm_before:
            add(p + "self_attn_layer_norm.gamma", p + "self_attn_layer_norm.beta")
    add("embed_positions", "project_in.weight", "embed_tokens")
    missing = set(shapes) - set(order)
    assert not missing, f"gradient_order misses {sorted(missing)}"
    return order


def loss_targets(token_ids, padding_mask, pad_token_id: int = 1):
    """``(y, sample_weight)`` of the fixtures' loss: ``y[:, t] = token_ids[:, t+1]`` and
    ``sample_weight[:, t] = padding_mask[:, t+1]`` (the last position has no target: weight 0)."""
    ids = np.asarray(token_ids, np.int64)
    mask = np.asarray(padding_mask).astype(np.float64)
    y = np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), pad_token_id, np.int64)], axis=1)
    sw = np.concatenate([mask[:, 1:], np.zeros((ids.shape[0], 1))], axis=1)
    return y, sw


# ---------------------------------------------------------------------------------- running refopt
def cast_params(params: dict, dtype) -> dict[str, np.ndarray]:
    """Every parameter as a ``dtype`` array (a copy only where the dtype differs)."""
    dtype = np.dtype(dtype)
    return {k: np.asarray(v, dtype=dtype) for k, v in params.items()}


def numpy_ops(**overrides):
    """The NumPy reference ops namespace (:mod:`refopt.ops`), with some functions replaced.

    The oracle's values always come from the NumPy ops, whatever backend is current; mutants and the
    calibration replace single ops through ``overrides``."""
    names = {k: getattr(_numpy_ops, k) for k in dir(_numpy_ops) if not k.startswith("_")}
    names.update(overrides)
    return SimpleNamespace(**names)


def run_forward(params, cfg: OPTConfig, token_ids, padding_mask, dtype="float64", ops=None):
    """refopt's named intermediates (:func:`activation_names`) for one batch, computed in
    ``dtype`` with the NumPy ops (or ``ops``).  ``params`` may be a streamed mapping
    (:class:`refopt.testing.streaming.StreamingParams`, float64 one layer at a time): the tied head
    then multiplies the token table chunk by chunk."""
    ops = numpy_ops() if ops is None else ops
    p = cast_params(params, dtype) if isinstance(params, dict) else params
    tape: dict = {}
    ids = np.asarray(token_ids, np.int64)
    mask = np.asarray(padding_mask).astype(bool)
    try:
        hidden = _model.forward(p, cfg, ids, mask, tape=tape, ops=ops)
        return from_tape(tape, cfg, head_forward(hidden, p, ops))
    finally:
        if hasattr(p, "release"):
            p.release()          # a streamed mapping: no layer held between the checks


#: the compute dtypes whose reference is computed in that dtype (:func:`run_forward_half`)
HALF = ("bfloat16", "float16")


def _half(params, dtype: str):
    """``params`` rounded to ``dtype``'s policy variables and the ops rounding as KerasHub does."""
    from refopt.dtype_policies import DTypePolicy, ops_for

    policy = DTypePolicy(dtype)
    rounded = {k: policy.round_variable(np.asarray(v, np.float32)) for k, v in params.items()}
    return rounded, ops_for(policy, _numpy_ops, fused_attention=True)


def run_gradients_half(params, cfg: OPTConfig, token_ids, padding_mask, dtype: str):
    """``(loss, grads)`` of refopt's model in ``dtype`` (:func:`run_forward_half`'s forward, the
    backward in float32 on its rounded activations)."""
    rounded, ops = _half(params, dtype)
    return run_gradients(rounded, cfg, token_ids, padding_mask, "float32", ops=ops)


def run_forward_half(params, cfg: OPTConfig, token_ids, padding_mask, dtype: str):
    """refopt's named intermediates computed in ``dtype`` (``"bfloat16"`` / ``"float16"``) as
    KerasHub computes them under that dtype policy (:func:`refopt.dtype_policies.ops_for`): the
    weights rounded to it, each op in float32 and its output rounded where KerasHub's layers round
    (the dense product and the bias sum, the LayerNorm output from float32 statistics, the residual
    sums, attention on KerasHub's dropout-0 path: float32 scores and softmax, the probabilities
    rounded); float32 arrays holding ``dtype``'s values."""
    rounded, ops = _half(params, dtype)
    return run_forward(rounded, cfg, token_ids, padding_mask, "float32", ops=ops)


#: rows of a streamed token table the tied head multiplies at a time: 2,048 rows of a 768-wide
#: table are 12 MiB in float64 (a chunk is read, widened and gathered: about three copies live)
HEAD_CHUNK_ROWS = 2048


def head_forward(hidden, params, ops):
    """The tied LM head: ``hidden [B, S, E] @ embed_tokens.T``, in chunks of rows for a streamed
    table (a mapping with ``head_chunks``)."""
    if not hasattr(params, "head_chunks"):
        return ops.lm_head_forward(hidden, params["embed_tokens"])
    logits = np.empty(hidden.shape[:-1] + (params["embed_tokens"].shape[0],), np.float64)
    for start, rows in params.head_chunks(HEAD_CHUNK_ROWS):                      # rows [n, E]
        logits[..., start:start + rows.shape[0]] = ops.lm_head_forward(hidden, rows)
    return logits


def run_gradients(params, cfg: OPTConfig, token_ids, padding_mask, dtype="float64", ops=None):
    """``(loss, grads)`` of the fixtures' loss (:func:`loss_targets`) in ``dtype``, refopt's names."""
    from refopt.training.gradients import loss_and_gradients

    ops = numpy_ops() if ops is None else ops
    p = cast_params(params, dtype)
    y, sw = loss_targets(token_ids, padding_mask, cfg.pad_token_id)
    x = {"token_ids": np.asarray(token_ids, np.int64), "padding_mask": np.asarray(padding_mask).astype(bool)}
    return loss_and_gradients(p, cfg, x, y, sw, ops=ops)


# ---------------------------------------------------------------------------------- families
class Scale(NamedTuple):
    """What a tensor's errors are measured against: ``scale`` divides ``max|Δ|``, ``energy`` (a
    sum of squares) divides ``sum Δ²``."""

    scale: float
    energy: float


def _scale(values: np.ndarray, family: np.ndarray | None = None) -> Scale:
    own = float(np.max(np.abs(values))) if values.size else 0.0
    energy = float(np.sum(values * values))
    if family is not None and family.size:
        own = max(own, float(np.max(np.abs(family))))
        energy = max(energy, float(np.mean(family * family)) * values.size)
    return Scale(own, energy)


def activation_scales(acts: dict, cfg: OPTConfig, padding_mask) -> dict[str, Scale]:
    """Per named intermediate (real positions only): its own magnitude, and for the attention and
    MLP branch outputs the residual stream they are added to (:class:`Scale`)."""
    real = np.asarray(padding_mask).astype(bool)
    out = {}
    for name in activation_names(cfg):
        if name not in acts:
            continue
        value = np.asarray(acts[name], np.float64)
        family = None
        if name.startswith("layers.") and name.endswith(("attention_output", "mlp_output")):
            i = int(name.split(".")[1])
            stream = acts["embeddings"] if i == 0 else acts[f"layers.{i - 1}.output"]
            if name.endswith("mlp_output"):
                attn = acts[f"layers.{i}.attention_output"]
                stream = stream + attn if cfg.do_layer_norm_before else acts[f"layers.{i}.mlp_input"]
            family = np.asarray(stream, np.float64)[real]
        out[name] = _scale(value[real], family)
    return out


def gradient_family(name: str) -> str:
    """The family of a parameter's gradient (see the module docstring)."""
    if name.startswith("layers."):
        i, part = name.split(".")[1:3]
        return f"layers.{i}.{'mlp' if part in ('fc1', 'fc2', 'mlp_layer_norm') else 'attention'}"
    if name.startswith(("final_layer_norm", "project_out")):
        return "head"
    if name == "embed_tokens":
        return "tokens"
    return "embeddings"


def gradient_scales(grads: dict) -> dict[str, Scale]:
    """Per gradient: the largest magnitude of its family's gradients and the family's mean square."""
    peak, squares, sizes = {}, {}, {}
    for name, g in grads.items():
        g = np.asarray(g, np.float64)
        f = gradient_family(name)
        peak[f] = max(peak.get(f, 0.0), float(np.max(np.abs(g))) if g.size else 0.0)
        squares[f] = squares.get(f, 0.0) + float(np.sum(g * g))
        sizes[f] = sizes.get(f, 0) + g.size
    out = {}
    for name, g in grads.items():
        f = gradient_family(name)
        g = np.asarray(g, np.float64)
        out[name] = Scale(peak[f], max(float(np.sum(g * g)), squares[f] / max(sizes[f], 1) * g.size))
    return out
