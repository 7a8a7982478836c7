"""Where device-resident training keeps things (:mod:`refopt.training.device`): the flat parameter
layout (:class:`Layout`), the activations and work arrays of one batch shape (:class:`Buffers`),
and what a step copies back (:class:`StepSums`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refopt.config import OPTConfig

LAYER_WEIGHTS = ("self_attn_layer_norm.gamma", "self_attn_layer_norm.beta",
                 "q_proj.weight", "k_proj.weight", "v_proj.weight",
                 "q_proj.bias", "k_proj.bias", "v_proj.bias",
                 "out_proj.weight", "out_proj.bias",
                 "mlp_layer_norm.gamma", "mlp_layer_norm.beta",
                 "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
CHUNK = 8192          # elements per optimizer chunk (a chunk never straddles two parameters)
ALIGN = 32            # parameters start at multiples of 32 elements


class Layout:
    """Where each parameter lives in one flat buffer: layer by layer, q/k/v weights (and biases)
    adjacent so that ``[3D, D]`` and ``[3D]`` views of them exist."""

    def __init__(self, cfg: OPTConfig):
        from refopt.model import param_shapes

        shapes = param_shapes(cfg)
        names = ["embed_tokens", "embed_positions"]
        for i in range(cfg.num_layers):
            names += [f"layers.{i}.{n}" for n in LAYER_WEIGHTS]
        names += ["final_layer_norm.gamma", "final_layer_norm.beta"]
        assert set(names) == set(shapes), sorted(set(names) ^ set(shapes))
        self.names, self.shapes, self.offsets = names, shapes, {}
        off = 0
        for n in names:
            if not n.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
                off = -(-off // ALIGN) * ALIGN          # q/k/v stay adjacent
            self.offsets[n] = off
            off += int(np.prod(shapes[n]))
        self.size = off
        # optimizer chunks: (start, parameter index), parameter k covering chunks seg[k]..seg[k+1]
        starts, seg_of, seg = [], [], [0]
        for k, n in enumerate(names):
            a, size = self.offsets[n], int(np.prod(shapes[n]))
            for c in range(a, a + size, CHUNK):
                starts.append(c)
                seg_of.append(k)
            seg.append(len(starts))
        ends = starts[1:] + [self.size]
        # a chunk ends where its parameter does (the gaps left by alignment are never touched)
        for j, k in enumerate(seg_of):
            n = names[k]
            ends[j] = min(ends[j], self.offsets[n] + int(np.prod(shapes[n])))
        self.chunk_bounds = np.array(list(zip(starts, ends)), np.int64)     # [C, 2]
        self.chunk_param = np.array(seg_of, np.int32)
        self.param_chunks = np.array(seg, np.int32)

    def view(self, flat, name):
        a = self.offsets[name]
        return flat[a:a + int(np.prod(self.shapes[name]))].reshape(self.shapes[name])

    def span(self, flat, first, rows_shape):
        """A view of ``rows_shape`` starting where parameter ``first`` starts (q/k/v together)."""
        a = self.offsets[first]
        return flat[a:a + int(np.prod(rows_shape))].reshape(rows_shape)


class StepSums(NamedTuple):
    """What a step copies back: ``sum(w * ce)``, ``sum(w * hit)``, ``sum(w)`` (float64)."""

    loss_sum: float
    hit_sum: float
    weight_sum: float


class Buffers:
    """Activations and work arrays for batches of up to ``rows`` sequences of length ``S``."""

    def __init__(self, cfg: OPTConfig, rows: int, S: int, dtype, train: bool):
        from refopt.kernels.cuda._common import empty
        from refopt.kernels.cuda.fused import CHUNKS

        L, D, F, V, H = cfg.num_layers, cfg.hidden_dim, cfg.intermediate_dim, cfg.vocabulary_size, cfg.num_heads
        N = rows * S
        self.rows, self.S, self.train = rows, S, train
        keep = L if train else 1                 # evaluation reuses one layer's activations
        self.X = empty((L + 1 if train else 2, N, D), dtype)
        self.A = empty((keep, N, D), dtype)
        self.QKV = empty((keep, N, 3 * D), dtype)
        self.CTX = empty((keep, N, D), dtype)
        self.R1 = empty((keep, N, D), dtype)
        self.MM = empty((keep, N, D), dtype)
        self.H = empty((keep, N, F), dtype)
        self.stats = empty((keep, 6, max(N, rows * H * S)), dtype)   # LN1 mean/rstd, LN2, m, l
        self.Y = empty((N, D), dtype)
        self.final_stats = empty((2, N), dtype)
        self.logits = empty((N, V), dtype)
        self.ce = empty(N, dtype)
        self.hit = empty(N, dtype)
        self.sums = empty(3, np.float64)
        # ids, pos, targets, 2 x (order, starts, rows), then the dropout step and key words, the
        # token and position row counts
        self.ints = empty(9 * N + 7, np.int32)
        self.floats = empty(2 * N + 2, dtype)     # loss weights d_ce, sample weights, [decay, alpha]
        self.key_mask = empty((rows, S), np.uint8)
        if train:
            self.keep = empty((L, 2, N * D), dtype) if cfg.dropout > 0 else None
            self.dX = empty((2, N, D), dtype)
            self.dM = empty((N, D), dtype)
            self.dF = empty((N, D), dtype)
            self.dH = empty((N, F), dtype)
            self.dQKV = empty((N, 3 * D), dtype)
            self.dlt = empty(rows * H * S, dtype)
            self.part = empty((2, CHUNKS, max(3 * D, F)), dtype)
