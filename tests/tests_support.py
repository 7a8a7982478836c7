"""Hypothesis strategies shared by the tests."""

import numpy as np
from hypothesis import strategies as st

from refopt.model import logits_forward
from refopt.testing import strategies as rst
from refopt.testing.adapter import Adapter, NotSupported, RefoptAdapter
from refopt.testing.reference import numpy_ops


def random_config(dtype="float64", max_len=24):
    """Small random configs from the oracle's one config space (refopt.testing.cases.ConfigSpace),
    down to one feature per head and one MLP unit."""
    return rst.configs(num_heads=(1, 3), head_dim=(1, 5), vocabulary_size=(5, 40), num_layers=(1, 3),
                       intermediate_dim=(1, 13), max_sequence_length=(max_len, max_len),
                       projection=(1, 7), dtype=dtype)


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


# ----------------------------------------------------------------- adapters for the oracle's tests
class LogitsOnly(Adapter):
    """The docs' minimal adapter (two methods): refopt's float32 forward, logits only."""

    name, dtype = "logits-only", "float32"

    def load(self, config, params):
        self.config = config
        self.params = {k: v.astype(np.float32) for k, v in params.items()}

    def logits(self, token_ids, padding_mask):
        return logits_forward(self.params, self.config, token_ids, padding_mask, ops=numpy_ops())


class PreLayerNormOnly(RefoptAdapter):
    """refopt's float32 port that refuses post-LayerNorm configs."""

    def load(self, config, params):
        if not config.do_layer_norm_before:
            raise NotSupported("pre-LayerNorm only")
        super().load(config, params)
