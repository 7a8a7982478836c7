"""Hypothesis strategies shared by the tests."""

import numpy as np
from hypothesis import strategies as st

from refopt.config import OPTConfig


@st.composite
def random_config(draw, dtype="float64", max_len=24):
    heads = draw(st.integers(1, 3))
    hidden = heads * draw(st.integers(1, 5))
    proj = draw(st.booleans())
    return OPTConfig(vocabulary_size=draw(st.integers(5, 40)), num_layers=draw(st.integers(1, 3)),
                     num_heads=heads, hidden_dim=hidden, intermediate_dim=draw(st.integers(1, 13)),
                     max_sequence_length=max_len, dropout=0.0, do_layer_norm_before=draw(st.booleans()),
                     word_embed_proj_dim=draw(st.integers(1, 7)) if proj else None,
                     enable_bias=draw(st.booleans()), layer_norm_elementwise_affine=draw(st.booleans()),
                     remove_final_layer_norm=draw(st.booleans()), dtype=dtype)


# ----------------------------------------------------------------- kernels against the NumPy ops
DTYPES = st.sampled_from([np.float32, np.float64])


def close(a, b, dtype, what, scale=None):
    """max|a - b| relative to ``scale`` (default max|b|: pass the natural scale of the terms where
    the result is a cancellation, e.g. LayerNorm's input gradient) within 1e-12 for float64 and
    1e-5 for float32; ``a`` finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0) if scale is None else scale, 1e-30)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    err = np.abs(a - b).max(initial=0.0) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
    assert np.isfinite(a).all(), f"{what}: not finite"


def arrays(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)



# ----------------------------------------------------------------- finite differences (float64)
def five_point(f, x, direction, h=1e-4):
    """d/dt f(x + t * direction) at t=0, error O(h^4)."""
    return (f(x - 2 * h * direction) - 8 * f(x - h * direction) + 8 * f(x + h * direction)
            - f(x + 2 * h * direction)) / (12 * h)


def rel_err(num, ana):
    if num == 0 and ana == 0:
        return 0.0
    return abs(num - ana) / max(abs(num), abs(ana))


def check_op(f, inputs, grads, rng, rtol=1e-6):
    """f(*inputs) -> scalar; grads: the analytic gradient of each input. A random direction per
    input and the input's largest-gradient element are checked (five-point stencil, float64);
    returns the largest relative error seen."""
    worst = 0.0
    for i, (x, g) in enumerate(zip(inputs, grads)):
        def fi(xi, i=i):
            args = list(inputs)
            args[i] = xi
            return f(*args)
        d = rng.standard_normal(x.shape)
        e = np.zeros(x.shape)
        e[np.unravel_index(np.abs(g).argmax(), g.shape)] = 1.0
        for direction, what in ((d, "direction"), (e, "largest")):
            err = rel_err(five_point(fi, x, direction), float((g * direction).sum()))
            assert err <= rtol, f"input {i} ({what}): relative error {err:.3g}"
            worst = max(worst, err)
    return worst
