"""Affine maps ``y = x @ W.T + b``, with ``W`` stored ``[out, in]`` (transformers' and PyTorch's
layout; Keras stores the transpose, its ``kernel [in, out]``)."""

import numpy as np


def linear_forward(x, w, b=None):
    # x [..., I], w [O, I], b [O] | None -> [..., O]
    y = x @ w.T
    if b is not None:
        y = y + b
    return y


def linear_backward(d_y, x, w, has_bias=True):
    # d_y [..., O], x [..., I], w [O, I] -> d_x [..., I], d_w [O, I], d_b [O] | None
    O, I = w.shape
    d_x = d_y @ w                                               # [..., I]
    d_w = d_y.reshape(-1, O).T @ x.reshape(-1, I)               # [O, I]
    d_b = d_y.reshape(-1, O).sum(axis=0) if has_bias else None  # [O]
    return d_x, d_w, d_b


def linear_backward_input(d_y, w):
    # d_y [..., O], w [O, I] -> d_x [..., I]: linear_backward for a frozen map (no d_w, d_b to form)
    return d_y @ w


def linear_relu_forward(x, w, b=None):
    # x [..., I] -> relu(x @ w.T + b) [..., O]: the MLP's first layer (a backend may fuse the epilogue)
    return np.maximum(linear_forward(x, w, b), 0)
