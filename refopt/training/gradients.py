"""The loss of a batch and its gradient for every parameter: forward with a tape, cross-entropy,
the tied LM head's backward, then :func:`refopt.backward.backward`.

Two reductions of the weighted per-position cross-entropy ``w * CE`` (``w`` the sample weights):

``"mean_with_sample_weight"`` (the default of :func:`loss_and_gradients`)
    ``sum(w * CE) / sum(w)``: the mean over the positions that count.  This is the loss in
    ``../shared/fixtures/hf/*/expected.npz`` (``loss_f64``) and what ``lm.loss_and_gradients``
    returns.  When ``sum(w) == 0`` the loss and every gradient are 0 (Keras's ``divide_no_nan``).
``"sum_over_batch_size"``
    ``sum(w * CE) / (B * S)``: Keras 3's default loss reduction, which divides by the *number of
    elements* of the per-position loss array, not by the weights (``keras/src/losses/loss.py``,
    ``reduce_values``).  ``fit`` and ``evaluate`` use it, so their losses and gradients are those
    KerasHub's ``OPTCausalLM`` (compiled with ``SparseCategoricalCrossentropy(from_logits=True)``)
    reports and descends on the same data and weights.
``"sum"``
    ``sum(w * CE)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refopt import backend
from refopt.backward import backward
from refopt.config import OPTConfig
from refopt.errors import InputError, InputTypeError, TrainingError
from refopt.model import forward

REDUCTIONS = ("mean_with_sample_weight", "sum_over_batch_size", "sum")


class Batch(NamedTuple):
    """A checked training batch: all arrays ``[B, S]``."""

    token_ids: np.ndarray      # int64
    padding_mask: np.ndarray   # bool
    y: np.ndarray              # int64, the next-token ids
    sample_weight: np.ndarray  # the params' float dtype


class StepResult(NamedTuple):
    loss: float                # the reduced loss
    grads: dict                # refopt name -> gradient, the params' shapes and dtype
    logits: np.ndarray         # [B, S, V], for metrics
    batch: Batch


def _int_array(value, name, ndim=2):
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InputTypeError(f"{name}: expected integer ids, got an array of dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise InputError(f"{name}: expected a 2-D array [batch, sequence], got shape {list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def check_batch(cfg: OPTConfig, x, y, sample_weight=None, dtype=np.float32) -> Batch:
    """Validate ``x`` (``{"token_ids", "padding_mask"}``), ``y`` and ``sample_weight`` against each
    other and the config; raise :class:`refopt.errors.InputError` / ``InputTypeError`` naming the
    culprit.  ``sample_weight=None`` weighs every position 1; a missing ``padding_mask`` is all ones.
    """
    if not isinstance(x, dict):
        raise InputTypeError(f"x: expected a dict with 'token_ids' and 'padding_mask', got "
                             f"{type(x).__name__}")
    if "token_ids" not in x:
        raise InputError(f"x: the dict has no 'token_ids' (keys: {sorted(x)})")
    ids = _int_array(x["token_ids"], "x['token_ids']")
    B, S = ids.shape
    if B == 0 or S == 0:
        raise InputError(f"x['token_ids']: empty batch of shape {[B, S]}")
    V = cfg.vocabulary_size
    if ids.min() < 0 or ids.max() >= V:
        bad = ids[(ids < 0) | (ids >= V)][0]
        raise InputError(f"x['token_ids']: id {bad} is outside the vocabulary [0, {V})")
    if S > cfg.max_sequence_length:
        raise InputError(f"x['token_ids']: sequence length {S} exceeds max_sequence_length "
                         f"{cfg.max_sequence_length}")
    mask = x.get("padding_mask")
    mask = np.ones((B, S), bool) if mask is None else np.asarray(mask)
    if mask.shape != (B, S):
        raise InputError(f"x['padding_mask']: shape {list(mask.shape)} does not match "
                         f"x['token_ids'] shape {[B, S]}")
    if y is None:
        raise InputError("y: missing; with x a dict, y must hold the next-token ids [batch, sequence]")
    y = np.asarray(y)
    if y.shape != (B, S):
        raise InputError(f"y: shape {list(y.shape)} does not match x['token_ids'] shape {[B, S]}")
    y = _int_array(y, "y")
    if y.min() < 0 or y.max() >= V:
        bad = y[(y < 0) | (y >= V)][0]
        raise InputError(f"y: id {bad} is outside the vocabulary [0, {V})")
    if sample_weight is None:
        sw = np.ones((B, S), dtype)
    else:
        sw = np.asarray(sample_weight)
        if sw.shape != (B, S):
            raise InputError(f"sample_weight: shape {list(sw.shape)} does not match y shape {[B, S]} "
                             "(one weight per position)")
        if not (np.issubdtype(sw.dtype, np.number) or sw.dtype == bool):
            raise InputTypeError(f"sample_weight: expected numbers, got an array of dtype {sw.dtype}")
        sw = sw.astype(dtype)
        if not np.all(np.isfinite(sw)):
            raise InputError("sample_weight: contains non-finite values")
    return Batch(ids, mask.astype(bool), y, sw)


def check_trainable(params, what="params"):
    """Raise :class:`TrainingError` unless every parameter is a floating-point NumPy array (a
    quantised model, :meth:`OPTBackbone.quantize`, can run but not be differentiated)."""
    for name, p in params.items():
        if not isinstance(p, np.ndarray) or not np.issubdtype(p.dtype, np.floating):
            raise TrainingError(f"{what}[{name!r}] is a {type(p).__name__}, not a float array: a "
                                "quantised model cannot be trained; quantize('float32') first")


def forward_backward(params, cfg: OPTConfig, batch: Batch, *, dropout_rng=None,
                     reduction: str = "mean_with_sample_weight", ops=None,
                     trainable=None) -> StepResult:
    """One forward and backward pass over a checked :class:`Batch` (see :func:`check_batch`), on
    the ops namespace ``ops`` (default: the current backend's, as :func:`refopt.model.forward`).
    ``trainable``: the names whose gradients to compute (None: all; LoRA passes its adapters)."""
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
    ops = backend.ops() if ops is None else ops
    dtype = params["embed_tokens"].dtype
    sw = batch.sample_weight.astype(dtype, copy=False)                        # [B, S]
    tape: dict = {}
    hidden = forward(params, cfg, batch.token_ids, batch.padding_mask, tape=tape,
                     dropout_rng=dropout_rng, ops=ops)                        # [B, S, E]
    logits = ops.lm_head_forward(hidden, params["embed_tokens"])              # [B, S, V]
    ce, probs = ops.cross_entropy_forward(logits, batch.y)                    # [B, S], [B, S, V]
    if reduction == "mean_with_sample_weight":
        divisor = float(sw.sum())
    elif reduction == "sum_over_batch_size":
        divisor = float(sw.size)
    else:
        divisor = 1.0
    if divisor == 0.0:  # no position counts: Keras's divide_no_nan gives 0, and so does the gradient
        return StepResult(0.0, {k: np.zeros_like(v) for k, v in params.items()
                                if trainable is None or k in trainable}, logits, batch)
    loss = float((sw * ce).sum(dtype=np.float64) / divisor)                  # accumulated in float64
    d_logits = ops.cross_entropy_backward((sw / dtype.type(divisor)).astype(dtype), probs, batch.y)
    del probs
    if trainable is None or "embed_tokens" in trainable:
        d_hidden, d_head = ops.lm_head_backward(d_logits, hidden, params["embed_tokens"])  # tied head
        d_head = d_head.astype(dtype, copy=False)
    else:                                      # a frozen table: only the hidden states' gradient
        d_hidden, d_head = ops.linear_backward_input(d_logits, params["embed_tokens"]), None
    del d_logits
    # the embedding lookup's gradient is added into the head's: embed_tokens gets both
    grads = backward(params, cfg, tape, d_hidden, d_embed_tokens=d_head, ops=ops, trainable=trainable)
    return StepResult(loss, grads, logits, batch)


def loss_and_gradients(params, cfg: OPTConfig, x, y, sample_weight=None, dropout_rng=None, *,
                       reduction: str = "mean_with_sample_weight", ops=None):
    """``(loss, grads)`` for one batch.

    params         refopt's flat parameter dict (float32 or float64; the computation runs in the
                   dtype of ``params["embed_tokens"]`` and the gradients have each param's dtype)
    x              ``{"token_ids": [B, S] int, "padding_mask": [B, S]}``
    y              ``[B, S]`` int, the next-token ids (``token_ids`` shifted left by one)
    sample_weight  ``[B, S]`` or None (all ones)
    dropout_rng    a ``numpy.random.Generator``: training mode, dropout active (``cfg.dropout``);
                   None: inference mode, deterministic
    reduction      see the module docstring; the default is ``sum(w * CE) / sum(w)``
    ops            the ops namespace (``refopt.ops`` for the NumPy reference, or a backend's);
                   default: the current backend's (:mod:`refopt.backend`)

    ``grads`` is keyed by refopt's names, with the params' shapes; the tied LM head's gradient is
    inside ``grads["embed_tokens"]``.  ``refopt.io.huggingface.grads_to_huggingface`` renames them.
    """
    check_trainable(params)
    dtype = params["embed_tokens"].dtype
    batch = check_batch(cfg, x, y, sample_weight, dtype)
    result = forward_backward(params, cfg, batch, dropout_rng=dropout_rng, reduction=reduction, ops=ops)
    return result.loss, result.grads
