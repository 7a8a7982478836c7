"""The oracle's reference values: refopt's NumPy model run in float64 (and, for the tie-break, in the
port's own dtype), named the way every adapter names them.

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

The loss is the fixtures' (``../shared/fixtures/hf/*/expected.npz``): ``sum(sw * CE) / sum(sw)``,
CE the cross-entropy of the logits at position t against the token at t+1, ``sw`` the padding mask
at t+1 (:func:`loss_targets`).
"""

from __future__ import annotations

from types import SimpleNamespace

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


_ROUNDED_OPS = ("embedding_forward", "linear_forward", "linear_relu_forward", "layernorm_forward",
                "attention_forward", "relu_forward", "lm_head_forward")


def round_to(x, fmt: str):
    """Float arrays rounded to ``fmt`` (``"float16"`` / ``"bfloat16"``), returned as float32."""
    from refopt.io.safetensors_io import bfloat16_to_float32, float32_to_bfloat16

    x = np.asarray(x, np.float32)
    if fmt == "float16":
        return x.astype(np.float16).astype(np.float32)
    return bfloat16_to_float32(float32_to_bfloat16(x))


def emulated_ops(fmt: str):
    """The NumPy ops with every forward op's float outputs rounded to ``fmt`` (float32 arithmetic
    inside each op, half-precision storage between ops): how the oracle runs "refopt in bfloat16"
    for the tie-break and the calibration."""
    ops = numpy_ops()

    def wrap(fn):
        def rounded(*args, **kwargs):
            out = fn(*args, **kwargs)
            if isinstance(out, tuple):
                return tuple(round_to(o, fmt) for o in out)
            return round_to(out, fmt)
        return rounded

    return numpy_ops(**{name: wrap(getattr(ops, name)) for name in _ROUNDED_OPS})


def run_forward_as(params, cfg, token_ids, padding_mask, dtype: str):
    """refopt's named intermediates as a port computing in ``dtype`` would get them: float64 and
    float32 natively, float16 and bfloat16 emulated (:func:`emulated_ops`, weights rounded)."""
    if dtype in ("float64", "float32"):
        return run_forward(params, cfg, token_ids, padding_mask, dtype)
    p = {k: round_to(v, dtype) for k, v in params.items()}
    return run_forward(p, cfg, token_ids, padding_mask, "float32", ops=emulated_ops(dtype))


def run_gradients_as(params, cfg, token_ids, padding_mask, dtype: str):
    """:func:`run_gradients` as a port computing in ``dtype`` would get them (see
    :func:`run_forward_as`)."""
    if dtype in ("float64", "float32"):
        return run_gradients(params, cfg, token_ids, padding_mask, dtype)
    p = {k: round_to(v, dtype) for k, v in params.items()}
    return run_gradients(p, cfg, token_ids, padding_mask, "float32", ops=emulated_ops(dtype))


def run_forward(params, cfg: OPTConfig, token_ids, padding_mask, dtype="float64", ops=None):
    """refopt's named intermediates (:func:`activation_names`) for one batch, computed in
    ``dtype`` with the NumPy ops (or ``ops``)."""
    ops = numpy_ops() if ops is None else ops
    p = cast_params(params, dtype)
    tape: dict = {}
    ids = np.asarray(token_ids, np.int64)
    mask = np.asarray(padding_mask).astype(bool)
    hidden = _model.forward(p, cfg, ids, mask, tape=tape, ops=ops)
    logits = ops.lm_head_forward(hidden, p["embed_tokens"])
    return from_tape(tape, cfg, logits)


def run_gradients(params, cfg: OPTConfig, token_ids, padding_mask, dtype="float64", ops=None):
    """``(loss, grads)`` of the fixtures' loss (:func:`loss_targets`) in ``dtype``, refopt's names."""
    from refopt.training.gradients import loss_and_gradients

    ops = numpy_ops() if ops is None else ops
    p = cast_params(params, dtype)
    y, sw = loss_targets(token_ids, padding_mask, cfg.pad_token_id)
    x = {"token_ids": np.asarray(token_ids, np.int64), "padding_mask": np.asarray(padding_mask).astype(bool)}
    return loss_and_gradients(p, cfg, x, y, sw, ops=ops)


# ---------------------------------------------------------------------------------- samplers
CONVENTIONS = ("keras_hub", "transformers")


def _tempered_probabilities(p, temperature):
    # p [B, V] float64 (softmax of the logits) -> softmax(log(p) / T); exact when T == 1
    if temperature == 1.0:
        return p
    with np.errstate(divide="ignore"):
        scores = np.log(p) / temperature                                       # -inf where p == 0
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def sampler_distribution(spec, probabilities, convention: str = "keras_hub", backend: str = "numpy",
                         tie_kept: bool = False):
    """The weights ``[B, V]`` (float64, zero outside the support) a correct port draws from.

    ``probabilities [B, V]``: the model's softmax before temperature.  Conventions:

    ``"keras_hub"`` (refopt's samplers, KerasHub's): ``q = softmax(log p / T)``; greedy is the
    first arg-max; top-k keeps exactly ``k`` tokens (ties to the lower id); top-p sorts ``q``
    (largest first, ties by lower id), keeps at most ``k``, and keeps every token whose *preceding*
    sum (of the un-renormalised ``q``) is ``<= p`` -- at least the first, so ``p = 0`` is the arg-max.

    ``"transformers"`` (``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``):
    scores ``log p / T``; top-k keeps every score ``>=`` the k-th largest (ties at the k-th are
    all kept); top-p renormalises what top-k kept, sorts ascending, removes tokens whose ascending
    cumulative probability is ``<= 1 - p`` but never the most probable, so a token is kept when the
    mass *before* it (largest first) is ``< p``.

    The two agree except at exact ties: a cumulative sum equal to ``p`` (keras_hub keeps one token
    more), equal probabilities at the k-th place, and top-k followed by top-p (keras_hub does not
    renormalise in between).

    ``tie_kept`` (transformers only): keep the token whose preceding mass equals ``p`` exactly.
    transformers applies its rule to ``softmax(log p)``, whose rounding decides such a tie either
    way (float32 keeps ``[.5, .25, .125, .125]`` exact at ``p = .75``, float64 does not), so the tie
    checks accept both outcomes for that convention."""
    from refopt import backend as _backend
    from refopt.samplers.sampler import one_hot_argmax

    if convention not in CONVENTIONS:
        raise ValueError(f"sampler convention {convention!r}: expected one of {CONVENTIONS}")
    p = np.asarray(probabilities, np.float64)
    name, k, top_p, T = spec.name, spec.k, spec.p, float(spec.temperature)
    if name not in ("greedy", "random", "top_k", "top_p"):
        raise ValueError(f"sampler {name!r}: the oracle checks greedy, random, top_k and top_p")
    if convention == "keras_hub":
        ops = _backend.ops(backend)
        q = _tempered_probabilities(p, T)
        if name == "greedy":
            return one_hot_argmax(q)
        if name == "random":
            return q
        if name == "top_k":
            return np.where(ops.top_k_mask(q, int(k)), q, 0.0)
        return ops.top_p_distribution(q, float(top_p), None if k is None else int(k))
    # transformers works on scores log(p) / T; the same rule in probability space, which keeps
    # exact ties exact (softmax(log p) == p in exact arithmetic, not always after rounding)
    q = _tempered_probabilities(p, T)                                          # [B, V]
    if name == "greedy":
        return one_hot_argmax(q)
    V = q.shape[-1]
    if k is not None and name in ("top_k", "top_p"):
        kk = min(max(int(k), 1), V)
        kth = -np.sort(-q, axis=-1)[:, kk - 1:kk]                              # [B, 1]
        q = np.where(q >= kth, q, 0.0)                                         # ties at the k-th kept
    q = q / q.sum(axis=-1, keepdims=True)                                      # renormalised
    if name == "top_p":
        order = np.argsort(q, axis=-1, kind="stable")                         # ascending
        s = np.take_along_axis(q, order, axis=-1)
        cumulative = np.cumsum(s, axis=-1)
        remove = (cumulative < 1.0 - float(top_p)) if tie_kept else (cumulative <= 1.0 - float(top_p))
        remove[:, -1] = False                                                  # min_tokens_to_keep=1
        np.put_along_axis(q, order, np.where(remove, 0.0, s), axis=-1)
        q = q / q.sum(axis=-1, keepdims=True)
    return q


def fragile_rows(spec, probabilities, convention: str = "keras_hub", margin: float = 1e-6):
    """``[B]`` bool: rows whose filtering decision lies within ``margin`` of a threshold (a near-tie
    for the arg-max or the k-th place, a cumulative sum within ``margin`` of ``p``).  Rounding in a
    correct float32 port may decide those either way, so random test cases leave them out; the
    exact-tie cases are built on purpose and always judged."""
    p = _tempered_probabilities(np.asarray(probabilities, np.float64), float(spec.temperature))
    srt = -np.sort(-p, axis=-1)                                                # [B, V] largest first
    B, V = p.shape
    fragile = np.zeros(B, bool)
    if spec.name == "greedy" and V > 1:
        fragile |= (srt[:, 0] - srt[:, 1]) <= margin * srt[:, 0]
    k = spec.k if spec.name in ("top_k", "top_p") else None
    if k is not None and k < V:
        fragile |= (srt[:, k - 1] - srt[:, k]) <= margin * srt[:, 0]
    if spec.name == "top_p":
        kept = srt[:, :k] if k is not None else srt
        if convention == "transformers" and k is not None:
            kept = kept / kept.sum(axis=-1, keepdims=True)
        before = (np.cumsum(kept, axis=-1) - kept)[:, 1:]      # the first token is always kept
        fragile |= (np.abs(before - spec.p) <= margin).any(axis=-1)
    return fragile


# ---------------------------------------------------------------------------------- ReLU kinks
def relu_kink_distance(params, cfg: OPTConfig, token_ids, padding_mask) -> np.ndarray:
    """``[num_layers]``: per layer, the smallest relative distance of an fc1 pre-activation (at a
    real position) from ReLU's kink, ``|h| / (|x| @ |W|.T + |b|)`` in float64.

    ReLU's derivative jumps at 0, so a pre-activation within rounding of 0 may fall on either side
    in a correct port, and the gradient then differs by a whole token's share in that unit's row
    of ``fc1`` -- a legitimate difference no tolerance should absorb.  Gradient checks run on a
    batch without such units (see :func:`refopt.testing.checks.ModelCase.gradient_batch`)."""
    p = cast_params(params, "float64")
    tape: dict = {}
    mask = np.asarray(padding_mask).astype(bool)
    _model.forward(p, cfg, np.asarray(token_ids, np.int64), mask, tape=tape, ops=numpy_ops())
    out = np.full(cfg.num_layers, np.inf)
    for i in range(cfg.num_layers):
        x = tape[f"layers.{i}.mlp_input"][mask]                                  # [N, D]
        h = tape[f"layers.{i}.fc1_output"][mask]                                 # [N, F]
        w = np.abs(p[f"layers.{i}.fc1.weight"])                                  # [F, D]
        b = p.get(f"layers.{i}.fc1.bias")
        scale = np.abs(x) @ w.T + (0.0 if b is None else np.abs(b))              # [N, F]
        if h.size:
            out[i] = float(np.min(np.abs(h) / np.maximum(scale, np.finfo(np.float64).tiny)))
    return out
