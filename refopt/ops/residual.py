"""The residual sum, ``x + y``: the embedding sum and the two residual connections of each layer.

An op of its own because a reduced-precision dtype policy rounds the sum to its compute dtype, as
KerasHub does (:mod:`refopt.dtype_policies`).  Its backward passes the gradient to both terms
unchanged, so it has no function of its own (``refopt.backward`` adds the two paths)."""


def add(x, y):
    # x [...], y [...] -> x + y [...]
    return x + y
