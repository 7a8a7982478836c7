"""Gradient clipping over dicts of gradients, as Keras 3's optimizers clip
(``keras/src/optimizers/base_optimizer.py``: ``_clip_by_norm``, ``clip_by_global_norm``).

Norms are accumulated in float64 whatever the gradients' dtype; the scaled gradients keep their dtype.
"""

from __future__ import annotations

import math

import numpy as np


def global_norm(grads: dict) -> float:
    """``sqrt(sum of every gradient element squared)`` over the whole dict."""
    return math.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads.values()))


def clip_by_global_norm(grads: dict, clip_norm: float) -> dict:
    """Scale every gradient by ``clip_norm / max(global_norm, clip_norm)``: unchanged when the global
    norm is within ``clip_norm``; all NaN when the norm is not finite (Keras's behaviour, so a
    non-finite gradient is never silently rescaled into a finite one)."""
    norm = global_norm(grads)
    if not math.isfinite(norm):
        scale = math.nan
    else:
        scale = clip_norm / max(norm, clip_norm)
    if scale == 1.0:
        return dict(grads)
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}


def clip_by_norm(grad: np.ndarray, clip_norm: float) -> np.ndarray:
    """One tensor scaled to norm at most ``clip_norm`` (Keras's ``clipnorm``, applied per tensor)."""
    norm = math.sqrt(float(np.square(grad, dtype=np.float64).sum()))
    return grad * grad.dtype.type(clip_norm) / grad.dtype.type(max(norm, clip_norm))


def clip_by_value(grad: np.ndarray, clip_value: float) -> np.ndarray:
    """Every element clipped to ``[-clip_value, clip_value]`` (Keras's ``clipvalue``)."""
    return np.clip(grad, -clip_value, clip_value)
