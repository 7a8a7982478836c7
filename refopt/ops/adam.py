"""Adam(W)'s update of one parameter, in place (Keras's rule; :mod:`refopt.optimizers` holds the
optimizer around it: learning-rate schedules, clipping, accumulation, which parameters decay).

With ``t`` the update's number, ``alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)`` (the bias
corrections folded into the step size) and ``decay = weight_decay * lr`` (0 for Adam)::

    var <- var - var * decay                          decoupled weight decay (AdamW)
    m   <- m + (g - m) * (1 - beta_1)                 first moment
    v   <- v + (g*g - v) * (1 - beta_2)               second moment  (AMSGrad: v_hat <- max(v_hat, v))
    var <- var - m * alpha / (sqrt(v) + epsilon)

Every operation in the parameter's dtype, in this order: the backends' fused kernels
(:mod:`refopt.kernels.cpu.optim`, :mod:`refopt.kernels.cuda`) compute the same values bit for bit.
"""

import numpy as np


def adam_update(var, grad, m, v, v_hat, decay, beta_1, beta_2, alpha, epsilon):
    # var, grad, m, v [...] (v_hat [...] for AMSGrad, else None), all of var's dtype; in place
    dt = var.dtype.type
    if decay:
        var -= var * dt(decay)                                     # decoupled weight decay
    m += (grad - m) * dt(1.0 - beta_1)                             # first moment
    v += (grad * grad - v) * dt(1.0 - beta_2)                      # second moment
    if v_hat is not None:
        np.maximum(v_hat, v, out=v_hat)                            # AMSGrad: the largest so far
        v = v_hat
    var -= m * dt(alpha) / (np.sqrt(v) + dt(epsilon))              # the step
