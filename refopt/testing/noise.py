"""The rounding-noise model: how far a correct port in a given dtype may drift on *this* input.

The calibrated tolerance (:func:`refopt.testing.tolerances.tolerance`) bounds the error of a correct
port on well-conditioned inputs.  Where the input is ill-conditioned -- attention scores of 1e4 whose
rounding moves the softmax, a residual stream offset by thousands that LayerNorm subtracts away, a
query attending one key so that its score gradient is a difference of two equal numbers -- a correct
port's error is larger, and by how much depends on the input.  This module measures it the way
stochastic arithmetic does (Monte Carlo arithmetic, CADNA): refopt's float64 forward and backward are
run again with every op perturbed as rounding in ``dtype`` would perturb it, and the distance of
that run from the clean float64 run says how much rounding in ``dtype`` moves each tensor here.

Each op of the ops namespace (:mod:`refopt.ops`) is replaced by one that

* rounds what it reads and what it writes: each element multiplied by ``1 + u * r``, ``r`` uniform
  in ``[-1, 1]`` (``u`` the unit roundoff of ``dtype``: a stored float32, float16 or bfloat16) --
  in float16 and bfloat16 the attention scores too, which eager kernels store before the softmax;
* adds the accumulation error of every sum it forms -- products, means, reductions --
  ``u_acc * sqrt(n) * sqrt(sum of the squared terms) * g``, ``g`` standard normal, ``n`` the number
  of terms (``u_acc`` is float32's unit roundoff for half-precision dtypes: such ports accumulate in
  float32);
* in the attention backward, models what flash and fused kernels do besides the plain formulas:
  the probabilities are *recomputed* from ``q`` and ``k`` (``exp(s - lse)``, so they carry the
  scores' rounding a second time, which with scores of 1e4 is a relative error of 1e-3 in ``P``),
  and the softmax Jacobian's row term is ``rowsum(dO * O)`` rather than ``sum(P * dP)``: where a
  query attends one key both are nearly its ``dP``, and what is left after the subtraction is pure
  rounding, differently so in each formulation.

ReLU's derivative in a noisy backward is the clean run's (``relu_masks``): which side of the kink
an input lies on is decided apart (:mod:`refopt.testing.kinks`), not by the noise.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from refopt.testing.tolerances import UNIT_ROUNDOFF, Figures, canonical_dtype, error_figures

_HALF = ("float16", "bfloat16")


class Rounding:
    """Random rounding perturbations of ``dtype`` (see the module docstring)."""

    def __init__(self, dtype: str, seed: int):
        dtype = canonical_dtype(dtype)
        self.u = UNIT_ROUNDOFF[dtype]
        self.u_acc = UNIT_ROUNDOFF["float32"] if dtype in _HALF else self.u
        self.rng = np.random.default_rng(seed)

    def store(self, x):
        """``x`` as stored in the dtype: each element off by up to ``u`` relative."""
        if x is None or not np.issubdtype(np.asarray(x).dtype, np.floating):
            return x
        x = np.asarray(x, np.float64)
        return x * (1.0 + self.u * self.rng.uniform(-1.0, 1.0, x.shape))

    def accumulate(self, value, squares, n: int):
        """``value`` (a sum of ``n`` terms whose squares sum to ``squares``) with accumulation noise."""
        sigma = self.u_acc * np.sqrt(max(n, 1)) * np.sqrt(squares)
        return value + sigma * self.rng.standard_normal(np.shape(value))

    def matmul(self, a, b):
        """``a @ b`` with the accumulation noise of its inner dimension."""
        return self.accumulate(a @ b, (a * a) @ (b * b), a.shape[-1])

    def total(self, x, axis):
        """``x.sum(axis)`` with accumulation noise (``axis`` an int or a tuple)."""
        axes = axis if isinstance(axis, tuple) else (axis,)
        n = int(np.prod([x.shape[a] for a in axes]))
        return self.accumulate(x.sum(axis=axis), (x * x).sum(axis=axis), n)


def noisy_ops(dtype: str, seed: int, relu_masks=None) -> SimpleNamespace:
    """The NumPy ops (float64) with the rounding perturbations of ``dtype``.

    ``relu_masks``: a list of ReLU derivative masks, taken in the order the backward asks for them
    (last layer first), used in place of ``x > 0``."""
    from refopt.testing.reference import numpy_ops

    base = numpy_ops()
    z = Rounding(dtype, seed)
    half = canonical_dtype(dtype) in _HALF
    s = z.store
    masks = list(relu_masks) if relu_masks is not None else None

    def linear_forward(x, w, b=None):
        y = z.matmul(s(x), s(w).T)                                           # [..., O]
        return s(y if b is None else y + s(b))

    def linear_relu_forward(x, w, b=None):
        return np.maximum(linear_forward(x, w, b), 0.0)

    def linear_backward(d_y, x, w, has_bias=True):
        d_y, x, w = s(d_y), s(x), s(w)
        O, I = w.shape
        d_x = z.matmul(d_y, w)                                               # [..., I]
        d_w = z.matmul(d_y.reshape(-1, O).T, x.reshape(-1, I))               # [O, I]
        d_b = z.total(d_y.reshape(-1, O), 0) if has_bias else None           # [O]
        return s(d_x), s(d_w), s(d_b)

    def layernorm_forward(x, gamma, beta, eps):
        x = s(x)
        D = x.shape[-1]
        mean = z.total(x, -1)[..., None] / D                                 # [..., 1]
        c = x - mean
        var = z.total(c * c, -1)[..., None] / D
        y = c / np.sqrt(var + eps)
        if gamma is not None:
            y = y * s(gamma)
        if beta is not None:
            y = y + s(beta)
        return s(y)

    def layernorm_backward(d_y, x, gamma, eps):
        d_y, x = s(d_y), s(x)
        d_x, d_gamma, d_beta = base.layernorm_backward(d_y, x, None if gamma is None else s(gamma), eps)
        D = x.shape[-1]
        mean = x.mean(axis=-1, keepdims=True)
        rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
        xhat = (x - mean) * rstd
        d_xhat = d_y * gamma if gamma is not None else d_y
        # d_x = rstd (d_xhat - mean(d_xhat) - xhat mean(d_xhat xhat)): three terms, two reductions
        terms = (np.abs(d_xhat) + np.abs(d_xhat).mean(-1, keepdims=True)
                 + np.abs(xhat) * np.abs(d_xhat * xhat).mean(-1, keepdims=True)) * rstd
        d_x = z.accumulate(d_x, terms * terms, D)
        N = int(np.prod(x.shape[:-1]))
        if d_gamma is not None:
            d_gamma = z.accumulate(d_gamma, ((d_y * xhat) ** 2).reshape(-1, D).sum(0), N)
        d_beta = z.accumulate(d_beta, (d_y * d_y).reshape(-1, D).sum(0), N)
        return s(d_x), s(d_gamma), s(d_beta)

    def attention_forward(q, k, v, mask):
        q, k, v = s(q), s(k), s(v)
        scores = z.matmul(q, k.transpose(0, 1, 3, 2))                       # [B, H, S, T]
        if half:
            # a half-precision port may store the scores in its dtype before a float32 softmax
            # (transformers' eager attention in bfloat16); at scores of 1e4 that rounding moves it
            scores = s(scores)
        scores = np.where(mask, scores, np.finfo(np.float64).min)
        probs = s(base.softmax(scores, axis=-1))
        return s(z.matmul(probs, v)), probs

    def attention_backward(d_out, q, k, v, probs, mask):
        d_out, q, k, v, probs = s(d_out), s(q), s(k), s(v), s(probs)
        # the probabilities recomputed from the scores (flash), which carry their rounding again
        scores = q @ k.transpose(0, 1, 3, 2)                                 # [B, H, S, T]
        again = z.matmul(q, k.transpose(0, 1, 3, 2)) - scores
        again = again + z.u * np.abs(scores) * z.rng.uniform(-1.0, 1.0, scores.shape)
        # (clipped: scores so large that their rounding moves exp by e^30 leave nothing to compare)
        recomputed = np.where(mask, probs * np.exp(np.clip(again, -30.0, 30.0)), 0.0)
        d_probs = z.matmul(d_out, v.transpose(0, 1, 3, 2))                   # [B, H, S, T]
        d_v = z.matmul(recomputed.transpose(0, 1, 3, 2), d_out)              # [B, H, T, K]
        # the row term from the forward: sum(P dP) (autograd) or rowsum(dO O) (flash), each rounded
        row = (d_probs * probs).sum(-1, keepdims=True)                       # [B, H, S, 1]
        by_probs = (d_probs * probs) ** 2
        by_out = (d_out * (probs @ v)) ** 2
        squares = np.maximum(by_probs.sum(-1, keepdims=True) * by_probs.shape[-1],
                             by_out.sum(-1, keepdims=True) * by_out.shape[-1])
        row = row + z.u_acc * np.sqrt(squares) * z.rng.standard_normal(row.shape)
        d_scores = np.where(mask, recomputed * (d_probs - row), 0.0)
        d_q = z.matmul(d_scores, k)                                          # [B, H, S, K]
        d_k = z.matmul(d_scores.transpose(0, 1, 3, 2), q)                   # [B, H, T, K]
        return s(d_q), s(d_k), s(d_v)

    def relu_backward(d_y, x):
        mask = masks.pop(0) if masks else (x > 0)
        return d_y * mask

    def lm_head_forward(x, table):
        return s(z.matmul(s(x), s(table).T))

    def lm_head_backward(d_logits, x, table):
        d_logits, x, table = s(d_logits), s(x), s(table)
        V, E = table.shape
        d_x = z.matmul(d_logits, table)
        d_table = z.matmul(d_logits.reshape(-1, V).T, x.reshape(-1, E))
        return s(d_x), s(d_table)

    def embedding_backward(d_out, ids, num_rows):
        return s(base.embedding_backward(s(d_out), ids, num_rows))

    def cross_entropy_forward(logits, targets):
        ce, probs = base.cross_entropy_forward(s(logits), targets)
        return s(ce), s(probs)

    def cross_entropy_backward(d_ce, probs, targets):
        return s(base.cross_entropy_backward(s(d_ce), s(probs), targets))

    def embedding_forward(table, ids):
        return s(base.embedding_forward(table, ids))

    return SimpleNamespace(**{**vars(base), **{name: fn for name, fn in locals().items()
                                               if callable(fn) and name not in ("s",)
                                               and hasattr(base, name)}})


def noise_figures(reference: dict, scales: dict, runs, real=None) -> dict[str, Figures]:
    """Per tensor, the largest figures of the noisy ``runs`` against ``reference`` (restricted to
    the ``real`` positions when given)."""
    out: dict[str, Figures] = {}
    for run in runs:
        for name, ref in reference.items():
            ref = np.asarray(ref)
            noisy = np.asarray(run[name])
            if real is not None:
                ref, noisy = ref[real], noisy[real]
            out[name] = error_figures(noisy, ref, scales.get(name)).worst(out.get(name))
    return out
