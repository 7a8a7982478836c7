"""Adam(W)'s per-element update fused into one parallel pass (:mod:`refopt.ops.adam` holds the
NumPy reference, which makes about fourteen passes over memory).

The arithmetic is the reference's, operation for operation in the same order and in the
parameter's dtype (no fast-math, so no fused multiply-adds), so the two agree bit for bit.
"""

import numpy as np
from numba import njit, prange

from refopt.kernels.cpu._threads import beside_blas


@njit(parallel=True, cache=True)
def _adam(var, grad, m, v, v_hat, decay, one_minus_beta_1, one_minus_beta_2, alpha, epsilon,
          amsgrad):
    # every array flat [N] of one dtype; the scalars of that dtype
    for i in prange(var.shape[0]):
        x = var[i]
        if decay != 0:
            x = x - x * decay                                 # decoupled weight decay
        g = grad[i]
        mi = m[i] + (g - m[i]) * one_minus_beta_1
        vi = v[i] + (g * g - v[i]) * one_minus_beta_2
        m[i] = mi
        v[i] = vi
        if amsgrad:
            vi = max(v_hat[i], vi)
            v_hat[i] = vi
        var[i] = x - (mi * alpha) / (np.sqrt(vi) + epsilon)


def adam_update(var, grad, m, v, v_hat, decay, beta_1, beta_2, alpha, epsilon):
    """In place: ``var <- var - var * decay``, then the Adam step with the moments ``m``, ``v`` (and
    ``v_hat`` for AMSGrad, else None).  All arrays C-contiguous, of ``var``'s shape and dtype."""
    dt = var.dtype.type
    flat = var.reshape(-1)
    amsgrad = v_hat is not None
    with beside_blas(flat.shape[0]):          # the update follows the backward pass's products
        _adam(flat, np.ascontiguousarray(grad, dtype=var.dtype).reshape(-1), m.reshape(-1),
              v.reshape(-1), v_hat.reshape(-1) if amsgrad else flat[:0], dt(decay), dt(1.0 - beta_1),
              dt(1.0 - beta_2), dt(alpha), dt(epsilon), amsgrad)
