"""ReLU, OPT's only activation."""

import numpy as np


def relu_forward(x):
    # x [...] -> [...]
    return np.maximum(x, 0)


def relu_backward(d_y, x):
    # d_y [...], x [...] the ReLU's input -> d_x [...]; the derivative at 0 is taken as 0 (as torch)
    return d_y * (x > 0)
