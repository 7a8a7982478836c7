"""Training on the GPU with everything resident: :class:`DeviceTrainer` owns, for the length of a
``fit`` (or ``evaluate`` / ``predict``), the device copy of a model's parameters, their gradients,
the Adam(W) moments, the activations the backward reads and the batch (and keeps them while the
host parameters stay the ones it holds, so consecutive ``fit`` calls reuse it).  A step uploads
the batch and its scalars (three copies: integers, weights, the key mask), launches the forward,
the loss, the backward, the clipping and the update -- the first step of a batch shape directly,
every later one as a replay of a CUDA graph captured from the second (:mod:`refopt.kernels.cuda.graphs`;
``REFOPT_CUDA_GRAPHS=0`` turns graphs off) -- and copies back three float64 numbers (the weighted
loss sum, the weighted hits of the accuracy metric, the weight sum).  The host arrays are written
back by :meth:`DeviceTrainer.download`.

The step is :func:`refopt.training.gradients.forward_backward` followed by
:meth:`refopt.optimizers.Optimizer.apply`, op for op, on device buffers:

    forward, per layer i (pre-LayerNorm):
        A[i]   = LN1(X[i])                            (mean, 1/std kept)
        QKV[i] = A[i] @ Wqkv.T + bqkv                 q, k, v weights adjacent: one product
        CTX[i] = flash attention(QKV[i])              (row max m and sum l kept)
        R1[i]  = X[i] + keep1 * (CTX[i] @ Wo.T + bo)  residual and dropout in the epilogue
        MM[i]  = LN2(R1[i])
        H[i]   = relu(MM[i] @ W1.T + b1)
        X[i+1] = R1[i] + keep2 * (H[i] @ W2.T + b2)
    Y = LNf(X[L]);  logits = Y @ E.T;  cross-entropy, accuracy hits, d_logits in place
    backward: the same lines bottom to top (each product's input and weight gradients, the bias
    gradients as column sums, LayerNorm's backward from the kept statistics with the residual
    gradient added, the flash backward recomputing the probabilities), then the embeddings'
    scatter-adds (the token table's added to the tied head's gradient)
    update: gradient accumulation, the clipping factors from float64 sums of squares, decoupled
    weight decay and the Adam step in one pass over the flat buffers

The schedule's learning rate and Adam's bias correction are computed on the host from the
optimizer's step count and uploaded with the batch (``[weight_decay * lr, alpha]``), so a graph
replay reads each step's values from device memory.  Dropout masks
come from :func:`refopt.philox.uniform`'s Philox stream keyed by the fit's seed (index = element,
step = optimizer step, stream = 2 * layer + site), so they differ from the NumPy path's
``Generator`` draws: with dropout the device and NumPy runs are each reproducible, not equal.

What runs here (:func:`blocker` says why not otherwise): pre-LayerNorm decoders with LayerNorm
gains and biases, biased linear maps and no embedding projection (OPT-125m, 1.3b, ... and
KerasHub's presets), float32 or float64, optimized by :class:`refopt.optimizers.Adam` or
``AdamW`` (any clipping, AMSGrad, accumulation, weight-decay exclusions, schedules).
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda

from refopt.config import OPTConfig
from refopt.kernels.cuda._common import SIMULATOR
from refopt.model import positions_from_mask

from refopt.training import device_step
from refopt.training.device_buffers import Buffers, Layout, StepSums  # noqa: F401


def blocker(cfg: OPTConfig, optimizer=None) -> str:
    """Why this model / optimizer cannot train device-resident ('' when it can)."""
    from refopt.optimizers import Adam

    if not cfg.do_layer_norm_before:
        return "post-LayerNorm models (do_layer_norm_before=False)"
    if cfg.has_projection:
        return "models with an embedding projection (word_embed_proj_dim != hidden_dim)"
    if not cfg.layer_norm_elementwise_affine or not cfg.enable_bias:
        return "models without LayerNorm gains or linear biases"
    if not cfg.has_final_layer_norm:
        return "models without a final LayerNorm"
    if np.dtype(cfg.compute_dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        return f"compute dtype {cfg.compute_dtype}"
    if optimizer is not None and (not isinstance(optimizer, Adam)
                                  or type(optimizer).update_step is not Adam.update_step):
        return f"optimizer {type(optimizer).__name__} (Adam and AdamW run on the device)"
    return ""


class DeviceTrainer:
    """The device side of ``fit`` / ``evaluate`` / ``predict`` for one model (see the module
    docstring).  ``params`` are uploaded at construction (with ``optimizer``'s moments when it has
    any); :meth:`download` writes parameters and optimizer state back to the host."""

    def __init__(self, params: dict, cfg: OPTConfig, optimizer=None, *, seed=None):
        from numba import config as numba_config

        from refopt.errors import TrainingError
        from refopt.kernels.cuda._common import to_device, zeros

        # the small reduction grids of a step are deliberate: no warning per launch (its cost is
        # part of every launch's Python overhead)
        numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = False
        why = blocker(cfg, optimizer)
        if why:
            raise TrainingError(f"device-resident training does not support {why}")
        self.cfg, self.opt = cfg, optimizer
        self.dtype = np.dtype(params["embed_tokens"].dtype)
        self.layout = lay = Layout(cfg)
        host = np.zeros(lay.size, self.dtype)
        for n in lay.names:
            lay.view(host, n)[...] = params[n]
        self.P = to_device(host)
        self.G = zeros(lay.size, self.dtype)
        self._bufs: dict = {}
        self._views: dict = {}
        self._graphs: dict = {}
        self._held: list = []
        self.use_graphs = not SIMULATOR and os.environ.get("REFOPT_CUDA_GRAPHS", "1") != "0"
        self.graph_error = ""
        self.stream = cuda.stream()
        self.step_count = 0
        self.dropout_key = None
        self.reseed(seed)
        if optimizer is not None:
            self._upload_optimizer(optimizer, params)
        self._synced = self._key(params)

    # ------------------------------------------------------------------ ownership
    def _key(self, params):
        return (tuple(id(params.get(n)) for n in self.layout.names), id(params),
                getattr(params, "version", None))

    def holds(self, params: dict) -> bool:
        """Whether the device parameters are these host arrays' values: the same arrays as at the
        last upload or :meth:`download`, and no update since (the ``version`` of a
        :class:`refopt.model.Parameters`)."""
        return self._key(params) == self._synced

    def mark_synced(self, params: dict) -> None:
        """Record ``params`` (after :meth:`download`) as the host copy."""
        self._synced = self._key(params)

    def attach(self, optimizer, params) -> None:
        """Use ``optimizer`` from now on (its moments uploaded when it is not the current one)."""
        if optimizer is not None and optimizer is not self.opt:
            self.opt = optimizer
            self._upload_optimizer(optimizer, params)

    def reseed(self, seed) -> None:
        """Key the dropout masks from ``seed`` (see the module docstring)."""
        if self.cfg.dropout > 0:
            from refopt.philox import seed_to_key

            seed = int(np.random.default_rng(seed).integers(2 ** 63))
            self.dropout_key = tuple(int(k) for k in seed_to_key(seed))

    # ------------------------------------------------------------------ optimizer state
    def _upload_optimizer(self, opt, params):
        from refopt.kernels.cuda._common import to_device, zeros

        lay, dt = self.layout, self.dtype
        built = opt.built

        def flat(slot):
            host = np.zeros(lay.size, dt)
            for n in lay.names:
                lay.view(host, n)[...] = slot(n)
            return to_device(host)

        if built:
            self.M = flat(lambda n: opt.slots(n)["m"])
            self.V = flat(lambda n: opt.slots(n)["v"])
            self.Vhat = flat(lambda n: opt.slots(n)["v_hat"]) if opt.amsgrad else None
            self.ACC = flat(lambda n: opt.accumulator(n)) if opt.gradient_accumulation_steps else None
        else:
            self.M, self.V = zeros(lay.size, dt), zeros(lay.size, dt)
            self.Vhat = zeros(lay.size, dt) if opt.amsgrad else None
            self.ACC = zeros(lay.size, dt) if opt.gradient_accumulation_steps else None
        self.chunk_bounds = to_device(lay.chunk_bounds)                  # [C, 2]: [start, end)
        self.chunk_param = to_device(lay.chunk_param)
        self.param_chunks = to_device(lay.param_chunks)
        nparam = len(lay.names)
        self.decay_flag = to_device(np.array([1 if opt.uses_weight_decay(n) else 0 for n in lay.names],
                                             np.uint8))
        self.mul = to_device(np.ones(nparam, dt))
        self.div = to_device(np.ones(nparam, dt))
        self.chunk_sums = zeros(len(lay.chunk_param), np.float64)
        self.param_sums = zeros(nparam, np.float64)
        self.norm = zeros(1, np.float64)

    def download(self, params: dict) -> None:
        """Write the parameters (and the optimizer's state) back into host arrays: ``params[name]``
        and the optimizer's slots are replaced by fresh arrays the optimizer owns."""
        lay = self.layout
        host = self.P.copy_to_host()
        new = {n: np.array(lay.view(host, n), copy=True) for n in lay.names}
        params.update(new)
        opt = self.opt
        if opt is None or not hasattr(self, "M"):
            return
        m, v = self.M.copy_to_host(), self.V.copy_to_host()
        vh = self.Vhat.copy_to_host() if self.Vhat is not None else None
        slots = {}
        for n in lay.names:
            slots[n] = {"m": np.array(lay.view(m, n)), "v": np.array(lay.view(v, n))}
            if vh is not None:
                slots[n]["v_hat"] = np.array(lay.view(vh, n))
        accumulators = None
        if self.ACC is not None:
            acc = self.ACC.copy_to_host()
            accumulators = {n: np.array(lay.view(acc, n)) for n in lay.names}
        opt.restore(params, new, slots, accumulators)

    # ------------------------------------------------------------------ batches
    def _buffers(self, rows, S, train):
        key = (S, train)
        b = self._bufs.get(key)
        if b is None or b.rows < rows:
            if b is not None:
                self._views = {k: v for k, v in self._views.items() if k[1:] != key}
            b = self._bufs[key] = Buffers(self.cfg, rows, S, self.dtype, train)
        return b

    def _upload(self, buf, batch, d_ce, hyper=(0.0, 0.0)):
        """Copy one batch (token ids, positions, targets, the embedding segments, weights, key
        mask) and the step's scalars (dropout step, the update's ``[weight_decay * lr, alpha]``)
        into ``buf``: three host-to-device copies on the trainer's stream."""
        from refopt.kernels.cuda.fused import segments

        ids = np.asarray(batch.token_ids)
        B, S = ids.shape
        N = B * S
        mask = np.asarray(batch.padding_mask, bool)
        pos = positions_from_mask(mask)
        ints = np.zeros(9 * N + 7, np.int32)
        ints[:N] = ids.reshape(-1)
        ints[N:2 * N] = pos.reshape(-1)
        ints[2 * N:3 * N] = np.asarray(batch.y).reshape(-1)
        counts = []
        o = 3 * N
        for a in (ids, pos):
            order, starts, rows = segments(a)
            ints[o:o + N] = order
            ints[o + N:o + N + len(starts)] = starts
            ints[o + 2 * N + 1:o + 2 * N + 1 + len(rows)] = rows
            counts.append(len(rows))
            o += 2 * N + 1 + N
        key = self.dropout_key or (0, 0)
        ints[o:o + 5] = np.array([self.step_count, key[0], key[1], counts[0], counts[1]],
                                 np.int64).astype(np.uint32).view(np.int32)
        s = self.stream
        buf.ints[:len(ints)].copy_to_device(ints, stream=s)
        buf.floats[:2 * N + 2].copy_to_device(np.concatenate(
            [d_ce.reshape(-1), np.asarray(batch.sample_weight, self.dtype).reshape(-1),
             np.asarray(hyper, self.dtype)]), stream=s)
        buf.key_mask.reshape(-1)[:N].copy_to_device(mask.astype(np.uint8).reshape(-1), stream=s)

    def _batch_views(self, buf, B, S):
        key = (B, S, buf.train)
        v = self._views.get(key)
        if v is not None:
            return v
        N = B * S
        ints = buf.ints
        o = 3 * N
        seg = []
        for _ in range(2):
            seg.append((ints[o:o + N], ints[o + N:o + 2 * N + 1], ints[o + 2 * N + 1:o + 3 * N + 1]))
            o += 3 * N + 1
        d_ce, sw = buf.floats[:N], buf.floats[N:2 * N]
        v = dict(ids=ints[:N], pos=ints[N:2 * N], targets=ints[2 * N:3 * N], tok_seg=seg[0],
                 pos_seg=seg[1], d_ce=d_ce, sw=sw, hyper=buf.floats[2 * N:2 * N + 2],
                 dropout=ints[o:o + 3], tok_count=ints[o + 3:o + 4], pos_count=ints[o + 4:o + 5],
                 key_mask=buf.key_mask.reshape(-1)[:N].reshape(B, S))
        self._views[key] = v
        return v

    def _update(self, views):
        """Clipping and the Adam(W) step (no gradient accumulation here: see :meth:`step`)."""
        from refopt.kernels.cuda import fused

        opt, s = self.opt, self.stream
        mode, clip = ((2, opt.clipnorm) if opt.clipnorm else (1, opt.global_clipnorm)
                      if opt.global_clipnorm else (0, 0.0))
        if mode:
            fused.chunk_sumsq(self.G, self.chunk_bounds, self.chunk_sums, stream=s)
            fused.clip_factors(self.chunk_sums, self.param_chunks, self.param_sums, mode, clip,
                               self.mul, self.div, self.norm, stream=s)
        fused.adam_chunks(self.P, self.G, self.M, self.V, self.Vhat, self.chunk_bounds, self.chunk_param,
                          self.mul, self.div, self.decay_flag, views["hyper"], opt.clipvalue,
                          opt.beta_1, opt.beta_2, opt.epsilon, self._buf_sums, stream=s)

    def _train_launches(self, buf, views, B, S, update):
        """Every launch of one step, on the trainer's stream (captured once into a graph)."""
        dropout, s = self.cfg.dropout > 0, self.stream
        device_step.forward(self.cfg, self.layout, self.P, buf, views, B, S, dropout, s)
        device_step.loss(buf, views, B * S, True, s)
        device_step.backward(self.cfg, self.layout, self.P, self.G, buf, views, B, S, dropout, s)
        if update:
            self._buf_sums = buf.sums
            self._update(views)

    def _replay(self, key, launches):
        """Run ``launches`` (a function issuing kernels on the trainer's stream): directly the first
        time a batch shape is seen (compiling and loading every kernel), then captured into a CUDA
        graph, replayed for every later batch of that shape.  Graph capture failing (an old driver
        or binding) turns graphs off for this trainer and the launches run directly."""
        graph = self._graphs.get(key)
        if graph is None and self.use_graphs and key in self._graphs:
            try:
                from refopt.kernels.cuda import gemm, graphs

                graph = self._graphs[key] = graphs.capture(self.stream, launches)
                # the graph holds the split-K workspaces' addresses: keep those buffers alive
                self._held.extend(gemm.workspaces())
            except Exception as e:                    # noqa: BLE001 (any failure: run directly)
                self.use_graphs = False
                self.graph_error = f"{type(e).__name__}: {e}"
        if graph is not None:
            from refopt.kernels.cuda import graphs

            graphs.launch(graph, self.stream)
            return
        self._graphs.setdefault(key, None)
        launches()

    # ------------------------------------------------------------------ public steps
    def step(self, batch, divisor: float) -> StepSums:
        """One training step on a checked :class:`~refopt.training.gradients.Batch`: the loss is
        ``sum(w * ce) / divisor``; the parameters are updated unless it is not finite (the
        optimizer's step count then stays as it was)."""
        from refopt.kernels.cuda import fused

        opt = self.opt
        B, S = batch.token_ids.shape
        buf = self._buffers(B, S, True)
        d_ce = (batch.sample_weight / self.dtype.type(divisor)).astype(self.dtype)
        steps = opt.gradient_accumulation_steps
        finish = not steps or (opt.apply_count + 1) % steps == 0
        lr = opt.learning_rate
        t_alpha = opt.alpha(lr) if finish else 0.0
        self._upload(buf, batch, d_ce, (opt.weight_decay * lr if opt.weight_decay else 0.0, t_alpha))
        views = self._batch_views(buf, B, S)
        if steps:                                   # accumulation: launched directly, no graph
            self._train_launches(buf, views, B, S, update=False)
            fused.accumulate(self.ACC, self.G, steps, finish, stream=self.stream)
            if finish:
                self._buf_sums = buf.sums
                self._update(views)
        else:
            self._replay(("step", B, S), lambda: self._train_launches(buf, views, B, S, update=True))
        sums = StepSums(*buf.sums.copy_to_host(stream=self.stream))
        self.stream.synchronize()
        if math.isfinite(sums.loss_sum):
            opt.count_apply()
            self.step_count += 1
        return sums

    def _inference(self, batch, write_grad=False, divisor=1.0, dropout=False):
        B, S = batch.token_ids.shape
        buf = self._buffers(B, S, write_grad)
        d_ce = (batch.sample_weight / self.dtype.type(divisor)).astype(self.dtype)
        self._upload(buf, batch, d_ce)
        views = self._batch_views(buf, B, S)
        device_step.forward(self.cfg, self.layout, self.P, buf, views, B, S, dropout, self.stream)
        device_step.loss(buf, views, B * S, write_grad, self.stream)
        return buf, views

    def evaluate(self, batch) -> StepSums:
        """The forward of one batch in evaluation mode: the loss and accuracy sums."""
        buf, _ = self._inference(batch)
        sums = StepSums(*buf.sums.copy_to_host(stream=self.stream))
        self.stream.synchronize()
        return sums

    def logits(self, batch) -> np.ndarray:
        """Logits ``[B, S, V]`` of one batch (evaluation mode), copied to the host."""
        B, S = batch.token_ids.shape
        buf, _ = self._inference(batch)
        out = buf.logits[:B * S].copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return out.reshape(B, S, -1)

    def gradients(self, batch, divisor: float, dropout: bool = False) -> tuple[float, dict]:
        """``(loss, grads)`` of one batch without an update: the device counterpart of
        :func:`refopt.training.gradients.forward_backward` (for tests), in evaluation mode or, with
        ``dropout``, with this step's dropout masks."""
        B, S = batch.token_ids.shape
        buf, views = self._inference(batch, write_grad=True, divisor=divisor, dropout=dropout)
        device_step.backward(self.cfg, self.layout, self.P, self.G, buf, views, B, S, dropout,
                             self.stream)
        host = self.G.copy_to_host(stream=self.stream)
        sums = buf.sums.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return float(sums[0] / divisor), {n: np.array(self.layout.view(host, n)) for n in self.layout.names}
