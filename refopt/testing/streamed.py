"""Gradients of a streamed checkpoint: refopt's float64 backward over one decoder layer at a time,
each block's gradients compared with the port's as soon as the backward has produced them.

The whole model's float64 gradients of OPT-1.3b would take 10.5 GB; here at most one block's are
held.  refopt's own forward and backward (:func:`refopt.model.forward`, :func:`refopt.backward.backward`)
run over a :class:`refopt.testing.streaming.StreamingParams` mapping with a few ops replaced:

* the tied head multiplies the token table chunk by chunk (it is never loaded whole), forward and
  backward; its share of the token table's gradient is kept as the two factors it is the product
  of (``d_logits`` and the hidden states), and the embedding lookup's share as the rows it adds;
* ``linear_backward`` and ``layernorm_backward`` hand each parameter gradient to the comparison
  (:class:`_Blocks`) and give the backward a zero-strided stand-in, so nothing is accumulated;
* ``relu_backward`` is the kink resolver's (:mod:`refopt.testing.kinks`).

Blocks (:func:`refopt.testing.reference.gradient_family`) arrive whole and in backward order, so
each block is judged against its own magnitude exactly as in memory.  The rounding-noise bound is
not measured on streamed gradients (it would need a second backward held beside the first): the
calibrated tolerance applies, and the report says so.
"""

from __future__ import annotations

import numpy as np

from refopt.testing import reference as R
from refopt.testing.tolerances import compare


def _stand_in(shape):
    return np.broadcast_to(np.float64(0.0), shape)             # no memory: the real one was compared


class _TokenTable:
    """The token table's gradient, kept factored: the head's share ``d_logits^T @ hidden`` and the
    lookup's rows.  ``rows(start, stop)`` materialises a slice of it."""

    def __init__(self, d_logits, hidden, shape):
        self.d_logits = d_logits.reshape(-1, d_logits.shape[-1])             # [N, V]
        self.hidden = hidden.reshape(-1, hidden.shape[-1])                    # [N, E]
        self.shape, self.dtype = shape, np.dtype(np.float64)
        self.lookup = None                                                    # (ids [N], d [N, E])

    def __iadd__(self, lookup):
        self.lookup = lookup
        return self

    def astype(self, dtype, copy=True):
        return self

    def rows(self, start, stop):
        out = self.d_logits[:, start:stop].T @ self.hidden                    # [n, E]
        if self.lookup is not None:
            ids, d = self.lookup
            inside = (ids >= start) & (ids < stop)
            np.add.at(out, ids[inside] - start, d[inside])
        return out


class _Blocks:
    """Compares gradients block by block as they arrive (backward order)."""

    def __init__(self, cfg, port_grads, dtype):
        self.cfg, self.port, self.dtype = cfg, port_grads, dtype
        self.pending: dict = {}
        self.family = None
        self.comparisons = []

    def add(self, name, grad):
        family = R.gradient_family(name)
        if family != self.family:
            self.flush()
            self.family = family
        self.pending[name] = np.asarray(grad, np.float64)

    def flush(self):
        scales = R.gradient_scales(self.pending)
        for name, grad in self.pending.items():
            if name in self.port:
                self.comparisons.append(compare(name, self.port[name], grad, self.dtype, self.cfg.num_layers,
                                                "gradients", scale=scales[name]))
        self.pending.clear()

    def add_table(self, name, table, chunk_rows=R.HEAD_CHUNK_ROWS):
        """The token table's gradient, judged in chunks of rows against its own magnitude (the
        port's rows read chunk by chunk where its mapping can, see
        :class:`refopt.testing.spill.GradientSpill`)."""
        self.flush()
        if name not in self.port:
            return
        shape = getattr(self.port, "shape", None)
        if tuple(shape(name) if callable(shape) else np.shape(self.port[name])) != table.shape:
            self.comparisons.append(compare(name, self.port[name], np.zeros(table.shape), self.dtype,
                                            self.cfg.num_layers, "gradients"))
            return
        rows_of = getattr(self.port, "rows", None)
        port = None if callable(rows_of) else self.port[name]
        peak = energy = 0.0
        for start in range(0, table.shape[0], chunk_rows):
            rows = table.rows(start, min(start + chunk_rows, table.shape[0]))
            peak, energy = max(peak, float(np.abs(rows).max())), energy + float(np.sum(rows * rows))
        worst = None
        for start in range(0, table.shape[0], chunk_rows):
            stop = min(start + chunk_rows, table.shape[0])
            mine = rows_of(name, start, stop) if port is None else port[start:stop]
            c = compare(name, np.asarray(mine), table.rows(start, stop), self.dtype,
                        self.cfg.num_layers, "gradients", scale=R.Scale(peak, energy))
            worst = c if worst is None else _merge(worst, c)
        self.comparisons.append(worst)


def _merge(a, b):
    """One comparison of two chunks of a tensor (same scale): the larger max figures, the NMSEs
    (sums of squares over one energy) added."""
    from refopt.testing.tolerances import Figures

    f = Figures(max(a.figures.max_abs, b.figures.max_abs), max(a.figures.max_rel, b.figures.max_rel),
                max(a.figures.scaled, b.figures.scaled), a.figures.nmse + b.figures.nmse)
    return a._replace(figures=f, passed=f.within(a.tolerance))


def streamed_gradients(params, cfg, token_ids, padding_mask, port_grads, dtype, relu_backward=None):
    """``(loss, comparisons in backward order)``: refopt's float64 loss and gradients over the
    streamed ``params`` (:class:`refopt.testing.streaming.StreamingParams`), each compared with
    ``port_grads`` (computed in ``dtype``) as it is produced."""
    from refopt import model as _model
    from refopt.backward import backward

    base = R.numpy_ops()
    blocks = _Blocks(cfg, port_grads, dtype)
    V = cfg.vocabulary_size
    ids = np.asarray(token_ids, np.int64)
    mask = np.asarray(padding_mask).astype(bool)

    def linear_backward(d_y, x, w, has_bias=True):
        d_x, d_w, d_b = base.linear_backward(d_y, x, w, has_bias)
        name = params.name_of(w)
        blocks.add(name, d_w)
        if d_b is not None:
            blocks.add(name.removesuffix(".weight") + ".bias", d_b)
        return d_x, _stand_in(d_w.shape), None if d_b is None else _stand_in(d_b.shape)

    def layernorm_backward(d_y, x, gamma, eps):
        d_x, d_gamma, d_beta = base.layernorm_backward(d_y, x, gamma, eps)
        if gamma is not None:
            prefix = params.name_of(gamma).removesuffix(".gamma")
            blocks.add(prefix + ".gamma", d_gamma)
            if prefix + ".beta" in params:
                blocks.add(prefix + ".beta", d_beta)
        return d_x, None if d_gamma is None else _stand_in(d_gamma.shape), _stand_in(d_beta.shape)

    def embedding_backward(d_out, lookup_ids, num_rows):
        if num_rows == V:                                           # the token table: keep the rows
            return (np.asarray(lookup_ids).reshape(-1), d_out.reshape(-1, d_out.shape[-1]))
        d_table = base.embedding_backward(d_out, lookup_ids, num_rows)
        blocks.add("embed_positions", d_table)
        return _stand_in(d_table.shape)

    overrides = dict(linear_backward=linear_backward, layernorm_backward=layernorm_backward,
                     embedding_backward=embedding_backward)
    if relu_backward is not None:
        overrides["relu_backward"] = relu_backward
    ops = R.numpy_ops(**overrides)
    tape: dict = {}
    hidden = _model.forward(params, cfg, ids, mask, tape=tape, ops=ops)         # [B, S, E]
    logits = R.head_forward(hidden, params, base)                              # [B, S, V]
    y, sw = R.loss_targets(ids, mask, cfg.pad_token_id)
    ce, probs = base.cross_entropy_forward(logits, y)
    loss = float((sw * ce).sum() / sw.sum())
    d_logits = base.cross_entropy_backward(sw / sw.sum(), probs, y)            # [B, S, V]
    del probs, logits
    d_hidden = np.zeros_like(hidden)
    for start, rows in params.head_chunks(R.HEAD_CHUNK_ROWS):                  # rows [n, E]
        d_hidden += d_logits[..., start:start + rows.shape[0]] @ rows
    table = _TokenTable(d_logits, hidden, (V, hidden.shape[-1]))
    backward(params, cfg, tape, d_hidden, d_embed_tokens=table, ops=ops)
    blocks.add_table("embed_tokens", table)
    order = {name: i for i, name in enumerate(R.gradient_order(cfg))}
    return loss, sorted(blocks.comparisons, key=lambda c: order.get(c.name, len(order)))
