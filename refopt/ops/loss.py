"""Softmax cross-entropy of logits against integer targets, with per-position weights, and the
accuracy metric trained models report.

The per-position cross-entropy is ``CE[b, t] = logsumexp(logits[b, t]) - logits[b, t, y[b, t]]``
(Keras's ``sparse_categorical_crossentropy(from_logits=True)`` and torch's ``cross_entropy``).  How
the weighted values are reduced to one number is the caller's choice (``refopt.training``): Keras's
``"sum_over_batch_size"`` divides ``sum(w * CE)`` by the number of positions, the fixtures'
``"mean_with_sample_weight"`` by ``sum(w)``.
"""

import numpy as np


def log_softmax(logits):
    # logits [..., V] -> [..., V], computed stably (max subtracted first)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy_forward(logits, targets):
    # logits [B, S, V], targets [B, S] int -> ce [B, S], probs [B, S, V] (softmax, kept for backward)
    logp = log_softmax(logits)                                                   # [B, S, V]
    ce = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]          # [B, S]
    return ce, np.exp(logp)


def cross_entropy_backward(d_ce, probs, targets):
    # d_ce [B, S] (d loss / d CE, e.g. weight / divisor), probs [B, S, V], targets [B, S]
    # -> d_logits [B, S, V] = d_ce * (probs - onehot(targets))
    d_logits = probs * d_ce[..., None]                                           # [B, S, V]
    np.put_along_axis(d_logits, targets[..., None],
                      np.take_along_axis(d_logits, targets[..., None], axis=-1) - d_ce[..., None],
                      axis=-1)
    return d_logits


def accuracy(logits, targets):
    # logits [B, S, V], targets [B, S] -> [B, S] float: 1 where the arg-max (first on ties) is the target
    return (logits.argmax(axis=-1) == targets).astype(logits.dtype)
