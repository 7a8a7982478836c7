"""Inverted dropout: in training, each element is kept with probability ``1 - rate`` and scaled by
``1 / (1 - rate)``, so the expectation is unchanged and inference needs no rescaling.

``refopt.model.forward`` draws a layer's keep-masks with :func:`dropout_mask` (when given a
``dropout_rng``) and records them in the tape; :func:`dropout_forward` applies one and
:func:`dropout_backward` (in ``refopt.backward``) undoes it.
"""

import numpy as np


def dropout_mask(rng, shape, rate, dtype):
    # -> keep [shape]: 0 where dropped, 1 / (1 - rate) where kept (the layout model.forward records)
    return ((rng.random(shape) >= rate) / (1.0 - rate)).astype(dtype)


def dropout_forward(x, keep):
    # x [...], keep [...] from dropout_mask -> [...]
    return x * keep


def dropout_backward(d_y, keep):
    # d_y [...], keep [...] -> d_x [...]
    return d_y * keep
