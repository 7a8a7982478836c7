"""LoRA: a low-rank update beside a frozen affine map (Hu et al., 2021), as Keras factors it.

Keras's ``Dense`` / ``EinsumDense`` ``enable_lora(rank)`` (what KerasHub's ``backbone.enable_lora``
calls) adds ``lora_kernel_a`` with the kernel's shape but its last axis replaced by ``rank``, and
``lora_kernel_b`` ``[rank, last axis]``; the layer then uses ``kernel + a @ b`` (``lora_alpha``
defaults to ``rank``, so the scale ``alpha / rank`` is 1).  For a query/key/value projection the
Keras kernel is ``[D, H, K]``: ``a`` is ``[D, H, r]`` and ``b`` ``[r, K]``, one ``b`` shared by the
heads.  Here ``a`` is read as ``[I, G, r]`` (``I`` the input width, ``G`` the groups the output
splits into: ``H`` for those projections, 1 for a plain ``[in, out]`` kernel) and the update is

    delta(x) = (x . a) @ b,   x [..., I] -> u [..., G, r] -> [..., G, O/G] -> [..., O]

added to ``linear_forward(x, w, b)`` (``refopt.model.dense``).  Equal to ``x @ (a @ b)``
reshaped to ``[I, O]``, without forming that ``[I, O]`` matrix.
"""

import numpy as np


def _grouped(a, width):
    # a [..., r] (Keras's shape) -> [I, G, r] for inputs of `width` I
    return a.reshape(width, -1, a.shape[-1])


def lora_forward(x, a, b):
    # x [..., I], a [*kernel.shape[:-1], r] read as [I, G, r], b [r, O/G] -> delta [..., O]
    a3 = _grouped(a, x.shape[-1])                                         # [I, G, r]
    u = np.tensordot(x, a3, axes=([-1], [0]))                             # [..., G, r]
    v = u @ b                                                             # [..., G, O/G]
    return v.reshape(x.shape[:-1] + (a3.shape[1] * b.shape[1],))         # [..., O]


def lora_backward(d_y, x, a, b):
    # d_y [..., O], x [..., I] the forward's input, a, b as in lora_forward
    # -> d_x [..., I] (the adapter's share; the frozen map adds its own), d_a [a.shape], d_b [r, O/G]
    I, r = x.shape[-1], a.shape[-1]
    a3 = _grouped(a, I)                                                   # [I, G, r]
    G = a3.shape[1]
    xs = x.reshape(-1, I)                                                 # [N, I]
    u = (xs @ a3.reshape(I, G * r)).reshape(-1, G, r)                     # [N, G, r] (recomputed)
    d_v = d_y.reshape(-1, G, b.shape[1])                                  # [N, G, O/G]
    d_b = u.reshape(-1, r).T @ d_v.reshape(-1, b.shape[1])                # [r, O/G]
    d_u = d_v @ b.T                                                       # [N, G, r]
    d_a = (xs.T @ d_u.reshape(-1, G * r)).reshape(a.shape)                # [I, G, r] -> a.shape
    d_x = (d_u.reshape(-1, G * r) @ a3.reshape(I, G * r).T).reshape(x.shape)  # [..., I]
    return d_x, d_a, d_b


def lora_merge(w, a, b):
    # w [O, I] (refopt's layout) -> w + (a @ b) as [O, I]: the adapter folded into the weight
    I = w.shape[1]
    delta = (_grouped(a, I) @ b).reshape(I, -1)                            # [I, O]
    return (w + delta.T).astype(w.dtype)                                  # [O, I]
