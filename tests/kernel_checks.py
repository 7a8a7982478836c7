"""Checks shared by the Numba (test_kernels_cpu.py) and CUDA (test_kernels_cuda.py) kernel tests:
each takes the backend's ops namespace and compares it with the NumPy reference (refopt.ops) on
one hypothesis-drawn shape."""

import numpy as np

import refopt.ops as ref
from tests_support import arrays, close


def probabilities(rng, B, V, ties):
    """Rows of probabilities ``[B, V]``; with ``ties``, many exactly equal entries."""
    logits = rng.standard_normal((B, V)) * 2
    if ties:
        logits = np.round(logits)                       # many exact ties
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def check_layernorm(ops, dtype, N, D, affine, seed):
    rng = np.random.default_rng(seed)
    x = arrays(rng, (N, 2, D), dtype, 3.0) + 1.0
    gamma = arrays(rng, (D,), dtype) if affine else None
    beta = arrays(rng, (D,), dtype) if affine else None
    close(ops.layernorm_forward(x, gamma, beta, 1e-5), ref.layernorm_forward(x, gamma, beta, 1e-5), dtype, "y")
    d_y = arrays(rng, x.shape, dtype)
    ours, theirs = ops.layernorm_backward(d_y, x, gamma, 1e-5), ref.layernorm_backward(d_y, x, gamma, 1e-5)
    # d_x = rstd * (g - mean(g) - xhat * mean(g * xhat)) cancels (exactly, for D <= 2): measure
    # it against the size of its terms, rstd * |g|
    x64 = x.astype(np.float64)
    rstd = 1 / np.sqrt(x64.var(axis=-1) + 1e-5)
    g = np.abs(d_y * (gamma if affine else 1)).max()
    scales = (rstd.max() * g, None, None)
    for a, b, what, scale in zip(ours, theirs, ("d_x", "d_gamma", "d_beta"), scales):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b, dtype, what, scale)


def check_cross_entropy(ops, dtype, B, S, V, seed):
    rng = np.random.default_rng(seed)
    logits = arrays(rng, (B, S, V), dtype, 4.0)
    targets = rng.integers(0, V, (B, S))
    ce, probs = ops.cross_entropy_forward(logits, targets)
    r_ce, r_probs = ref.cross_entropy_forward(logits, targets)
    close(ce, r_ce, dtype, "ce")
    close(probs, r_probs, dtype, "probs")
    d_ce = arrays(rng, (B, S), dtype)
    close(ops.cross_entropy_backward(d_ce, probs, targets), ref.cross_entropy_backward(d_ce, r_probs, targets),
          dtype, "d_logits")


def check_embedding(ops, dtype, V, E, N, seed, exact_backward):
    """The gather exactly; the scatter-add exactly when ``exact_backward`` (each row summed in
    token order, as np.add.at: the same additions, so the same bits), else within tolerance."""
    rng = np.random.default_rng(seed)
    table = arrays(rng, (V, E), dtype)
    ids = rng.integers(0, V, (2, N))
    assert np.array_equal(ops.embedding_forward(table, ids), ref.embedding_forward(table, ids))
    d_out = arrays(rng, (2, N, E), dtype)
    got, want = ops.embedding_backward(d_out, ids, V), ref.embedding_backward(d_out, ids, V)
    if exact_backward:
        assert np.array_equal(got, want)
    else:
        close(got, want, dtype, "d_table")
