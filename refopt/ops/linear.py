"""Affine maps y = x @ W + b, with W stored [in, out] (Keras's kernel layout; transformers stores the
transpose)."""


def linear_forward(x, w, b=None):
    # x [..., I], w [I, O], b [O] | None -> [..., O]
    y = x @ w
    if b is not None:
        y = y + b
    return y
