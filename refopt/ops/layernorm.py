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


def layernorm_backward(d_y, x, gamma, eps):
    # d_y [..., D], x [..., D] the forward's input, gamma [D] | None
    # -> d_x [..., D], d_gamma [D] | None, d_beta [D] (d_beta is returned even when there is no beta)
    D = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)                     # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)      # [..., 1]
    rstd = 1.0 / np.sqrt(var + eps)                           # [..., 1]
    xhat = (x - mean) * rstd                                  # [..., D]
    d_beta = d_y.reshape(-1, D).sum(axis=0)                   # [D]
    d_gamma = (d_y * xhat).reshape(-1, D).sum(axis=0) if gamma is not None else None
    d_xhat = d_y * gamma if gamma is not None else d_y        # [..., D]
    # d_x = rstd * (d_xhat - mean(d_xhat) - xhat * mean(d_xhat * xhat))
    d_x = rstd * (d_xhat - d_xhat.mean(axis=-1, keepdims=True)
                  - xhat * (d_xhat * xhat).mean(axis=-1, keepdims=True))   # [..., D]
    return d_x, d_gamma, d_beta
