"""ReLU's kink in the gradient check: which side of zero did the port put each near-zero input?

ReLU's derivative jumps at 0.  An ``fc1`` output within rounding of 0 may land on either side in a
correct port, and the gradient then changes by a whole unit's share: that unit's ``fc1`` row and
bias, its ``fc2`` column, and -- through the layer's input gradient -- every gradient below.  No
tolerance can absorb that, and at real sizes every layer has such inputs (a 125m model has about a
thousand within float32's rounding envelope in a 16-token batch), so redrawing the batch until none
is near a kink cannot work.

Instead the reference *resolves* them.  Its backward runs with :meth:`KinkResolver.relu_backward`
in place of ReLU's: for each layer, last first, every real position's ``fc1`` output within the kink
margin of 0 (:meth:`KinkResolver.margin`: the activation tolerance of what ``fc1`` reads, carried
through ``|fc1.weight|``, plus the product's own rounding) is *ambiguous*.  The port's gradient of
that unit's ``fc1`` row says which side it took: with the ambiguous inputs of unit ``j`` on the
sides ``c``, the row is ``sum_t d_h[t, j] c_t x[t]``, and the ``c`` that explains the port's row best
is taken (every combination is tried for up to :data:`ENUMERATE` ambiguous inputs of one unit, a
greedy search beyond).  Every such choice is a correct gradient, so nothing a bug could hide behind
is excused -- and nothing is masked: every gradient element is still compared, at full tolerance,
against the float64 gradient of the ReLU sides the port chose.  The check reports how many inputs
were ambiguous and how many the port took the other way than float64.
"""

from __future__ import annotations

import itertools

import numpy as np

from refopt.testing.tolerances import UNIT_ROUNDOFF, canonical_dtype

#: the most ambiguous inputs of one unit whose sides are found by trying every combination
ENUMERATE = 10


class KinkResolver:
    """A ``relu_backward`` for refopt's float64 backward that takes the port's ReLU sides.

    ``acts``: the float64 named intermediates of the batch (``layers.{i}.mlp_input``);
    ``port_grads``: the port's gradients (``layers.{i}.fc1.weight`` / ``.bias``); ``tau(i)``: the
    relative tolerance of layer ``i``'s ``mlp_input`` (the port's error in what ``fc1`` reads).
    After the backward, ``masks`` holds the ReLU derivative of each layer in the order they were
    asked for (last layer first) -- what :func:`refopt.testing.noise.noisy_ops` reuses."""

    def __init__(self, params, cfg, acts, padding_mask, port_grads, dtype: str, tau):
        self.params, self.cfg, self.acts = params, cfg, acts
        self.real = np.asarray(padding_mask).astype(bool)
        self.port = port_grads
        self.u = UNIT_ROUNDOFF[canonical_dtype(dtype)]
        self.tau = tau
        self.layer = cfg.num_layers
        self.masks: list[np.ndarray] = []
        self.ambiguous = 0
        self.flipped = 0
        self.inputs = 0

    def margin(self, i: int, x: np.ndarray) -> np.ndarray:
        """``[F]``: how far from 0 an ``fc1`` output of layer ``i`` may be moved by a correct port:
        the input's tolerance through ``|W|`` plus the product's rounding, ``D u`` of its terms."""
        w = np.asarray(self.params[f"layers.{i}.fc1.weight"], np.float64)        # [F, D]
        b = self.params.get(f"layers.{i}.fc1.bias")
        peak = float(np.max(np.abs(x[self.real]))) if self.real.any() else 0.0
        terms = peak * np.abs(w).sum(axis=1) + (0.0 if b is None else np.abs(np.asarray(b, np.float64)))
        return (self.tau(i) + w.shape[1] * self.u) * terms

    def relu_backward(self, d_y, h):
        self.layer -= 1
        i = self.layer
        default = h > 0
        mask = default.copy()
        x = np.asarray(self.acts[f"layers.{i}.mlp_input"], np.float64)         # [B, S, D]
        near = (np.abs(h) <= self.margin(i, x)) & self.real[..., None]          # [B, S, F]
        self.inputs += int(self.real.sum()) * h.shape[-1]
        self.ambiguous += int(near.sum())
        w = self.port.get(f"layers.{i}.fc1.weight")
        if near.any() and w is not None and np.shape(w) == np.shape(self.params[f"layers.{i}.fc1.weight"]):
            self._resolve(i, d_y, x, near, mask, default, w)
        self.masks.append(mask)
        return d_y * mask

    def _resolve(self, i, d_y, x, near, mask, default, w):
        b = self.port.get(f"layers.{i}.fc1.bias")
        with_bias = b is not None and f"layers.{i}.fc1.bias" in self.params
        xt = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1) if with_bias else x    # [B, S, D']
        d_pre = d_y * default                                                    # [B, S, F]
        for j in np.flatnonzero(near.any(axis=(0, 1))):
            port = np.asarray(w[j], np.float64)        # w: read once (a spilled mapping reads per lookup)
            if with_bias:
                port = np.append(port, float(b[j]))
            rows = np.argwhere(near[..., j])                                     # [n, 2] (b, t)
            v = d_y[rows[:, 0], rows[:, 1], j][:, None] * xt[rows[:, 0], rows[:, 1]]   # [n, D']
            m0 = default[rows[:, 0], rows[:, 1], j].astype(np.float64)
            target = port - np.einsum("bs,bsd->d", d_pre[..., j], xt)           # what the sides explain
            best = _best_sides(target, v, m0)
            mask[rows[:, 0], rows[:, 1], j] = best.astype(bool)
            self.flipped += int(np.sum(best != m0))


def _best_sides(target, v, m0):
    """``c`` in {0, 1}^n minimising ``|target - (c - m0) @ v|``."""
    n = len(m0)

    def cost(c):
        return float(np.sum((target - (c - m0) @ v) ** 2))

    if n <= ENUMERATE:
        combos = np.array(list(itertools.product((0.0, 1.0), repeat=n)))         # [2^n, n]
        costs = np.sum((target[None, :] - (combos - m0) @ v) ** 2, axis=1)
        return combos[int(np.argmin(costs))]
    c = m0.copy()
    best = cost(c)
    for _ in range(4):                                                           # greedy flips
        improved = False
        for k in range(n):
            c[k] = 1.0 - c[k]
            trial = cost(c)
            if trial < best:
                best, improved = trial, True
            else:
                c[k] = 1.0 - c[k]
        if not improved:
            break
    return c
