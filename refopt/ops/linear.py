"""Affine maps y = x @ W + b, with W stored [in, out] (Keras's kernel layout; transformers stores the
transpose)."""

import numpy as np



def linear_forward(x, w, b=None):
    # x [..., I], w [I, O], b [O] | None -> [..., O]
    y = x @ w
    if b is not None:
        y = y + b
    return y


def linear_backward(d_y, x, w, has_bias=True):
    # d_y [..., O], x [..., I], w [I, O] -> d_x [..., I], d_w [I, O], d_b [O] | None
    I, O = w.shape
    d_x = d_y @ w.T                                             # [..., I]
    d_w = x.reshape(-1, I).T @ d_y.reshape(-1, O)               # [I, O]
    d_b = d_y.reshape(-1, O).sum(axis=0) if has_bias else None  # [O]
    return d_x, d_w, d_b


def linear_relu_forward(x, w, b=None):
    # x [..., I] -> relu(x @ w + b) [..., O]: the MLP's first layer (a backend may fuse the epilogue)
    return np.maximum(linear_forward(x, w, b), 0)
