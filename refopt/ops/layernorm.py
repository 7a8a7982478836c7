"""LayerNorm over the last axis, as torch.nn.LayerNorm and keras.layers.LayerNormalization compute it
(biased variance, epsilon inside the square root)."""

import numpy as np


def layernorm_forward(x, gamma, beta, eps):
    # x [..., D], gamma [D] | None, beta [D] | None -> y [..., D]
    mean = x.mean(axis=-1, keepdims=True)                     # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)      # [..., 1]
    y = (x - mean) / np.sqrt(var + eps)                       # [..., D]
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y
