"""A model and its inputs, with the float64 reference results (and their rounding noise) it is
judged against, computed on first use and kept.

A :class:`ModelCase` comes from a preset (:func:`case_from_preset`), from a seed or an id
(:mod:`refopt.testing.cases`), or from hypothesis (:func:`refopt.testing.strategies.model_cases`).
A preset too large to hold in float64 is *streamed*: its reference runs over a
:class:`refopt.testing.streaming.StreamingParams` mapping, one decoder layer resident at a time
(:class:`StreamingCase`, ``refopt conform --streaming``).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np

from refopt.config import OPTConfig
from refopt.testing import reference as R
from refopt.testing.noise import noise_figures
from refopt.testing.tolerances import NOISE_SAMPLES, Figures

_SERIALS = itertools.count()


class Reference(NamedTuple):
    """Named intermediates of one batch and what each is measured against: float64, or computed in
    a half-precision dtype with ``error`` (``{name: Figures}``) its own error against float64."""

    acts: dict
    scales: dict
    error: dict | None = None

    def error_of(self, name: str):
        """The reference's own error on ``name`` (None: the float64 reference)."""
        return None if self.error is None else self.error.get(name)


class GradientVerdict(NamedTuple):
    """The gradient comparison of one port: the float64 loss, the loss's comparison, the
    gradients' (:class:`refopt.testing.locator.Divergence`), the ReLU inputs ambiguous / taken the
    other way / in all, and whether the rounding noise was measured."""

    loss: float
    loss_comparison: object
    divergence: object
    kinks: tuple
    noise_measured: bool


class GradientReference(NamedTuple):
    """The float64 loss and gradients with the port's ReLU sides (:mod:`refopt.testing.kinks`), what
    each is measured against, a function giving the rounding noise of each (``{name: Figures}``,
    the loss's under ``"loss"``; run on first call), and how many ReLU inputs were ambiguous /
    taken the other way than float64, of how many."""

    loss: float
    grads: dict
    scales: dict
    noise: object
    kinks: tuple


def make_inputs(cfg: OPTConfig, rng: np.random.Generator, batch: int = 3, seq: int = 11):
    """A right-padded batch (row 0 full, the others shorter), its left-padded twin (same tokens,
    padding moved to the front), with the pad id only at padding positions (transformers' embedding
    gives the pad row no gradient, so a pad id among real tokens would make the two libraries'
    correct gradients differ)."""
    S = min(seq, cfg.max_sequence_length)
    lengths = rng.integers(max(1, S // 2), S + 1, batch)
    lengths[0] = S
    pool = np.array([i for i in range(cfg.vocabulary_size) if i != cfg.pad_token_id] or [0])
    ids = pool[rng.integers(0, len(pool), (batch, S))]
    cols = np.arange(S)
    right = cols[None, :] < lengths[:, None]
    ids_right = np.where(right, ids, cfg.pad_token_id)
    left = cols[None, :] >= (S - lengths)[:, None]
    ids_left = np.full_like(ids_right, cfg.pad_token_id)
    for b, n in enumerate(lengths):
        ids_left[b, S - n:] = ids_right[b, :n]
    return ids_right, right, ids_left, left


class ModelCase:
    """A model (float64 parameters) and a right-padded batch with its left-padded twin."""

    def __init__(self, name: str, config: OPTConfig, params, token_ids, padding_mask,
                 left_token_ids=None, left_padding_mask=None, preset=None, spec=None):
        self.name = name
        self.spec = spec
        self.config = dataclasses.replace(config, dtype="float64", dropout=0.0)
        self.params = {k: np.asarray(v, np.float64) for k, v in params.items()} if isinstance(params, dict) \
            else params
        self.token_ids = np.asarray(token_ids, np.int64)
        self.padding_mask = np.asarray(padding_mask, bool)
        self.left_token_ids = None if left_token_ids is None else np.asarray(left_token_ids, np.int64)
        self.left_padding_mask = None if left_padding_mask is None else np.asarray(left_padding_mask, bool)
        self.preset = preset
        self._cache: dict = {}
        self._serial = next(_SERIALS)

    @property
    def id(self) -> str:
        """The name ``refopt conform --case`` finds or rebuilds this case by: a preset's name,
        ``random-N``, ``stress-*`` or a :class:`refopt.testing.cases.CaseSpec` id."""
        return self.name

    @property
    def key(self):
        # unique for the process's lifetime (an id() may be reused once a case is collected)
        return (self.name, self._serial)

    def __repr__(self):
        c = self.config
        shape = "x".join(str(n) for n in self.token_ids.shape)
        return (f"ModelCase({self.id!r}: {c.num_layers} layers, {c.num_heads} heads, width "
                f"{c.hidden_dim}, mlp {c.intermediate_dim}, vocab {c.vocabulary_size}, "
                f"{'pre' if c.do_layer_norm_before else 'post'}-LN, batch {shape})")

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def batch(self, left: bool = False):
        """``(token_ids, padding_mask)`` of the right-padded batch or its left-padded twin."""
        if left:
            return self.left_token_ids, self.left_padding_mask
        return self.token_ids, self.padding_mask

    # ------------------------------------------------------------------ forward
    def reference(self, left: bool = False, dtype: str = "float64") -> Reference:
        """Float64 named intermediates and their :class:`refopt.testing.reference.Scale`; for a
        half-precision ``dtype``, those computed in it with KerasHub's rounding
        (:func:`refopt.testing.reference.run_forward_half`), measured against the larger of the two
        runs' magnitudes, with their own error against float64 (real positions)."""
        if dtype in R.HALF:
            return self.cached(("reference", dtype, left), lambda: self._half_reference(left, dtype))

        def run():
            ids, mask = self.batch(left)
            acts = R.run_forward(self.params, self.config, ids, mask)
            return Reference(acts, R.activation_scales(acts, self.config, mask))
        return self.cached(("reference", left), run)

    def _half_reference(self, left: bool, dtype: str) -> Reference:
        from refopt.testing.tolerances import error_figures

        exact = self.reference(left)
        ids, mask = self.batch(left)
        acts = R.run_forward_half(self.params, self.config, ids, mask, dtype)
        own = R.activation_scales(acts, self.config, mask)
        # the larger magnitude of the two: the port's error is then measured against a denominator
        # no smaller than the one the reference's error and the float64 tolerance were measured with
        scales = {k: R.Scale(max(v.scale, own[k].scale), max(v.energy, own[k].energy))
                  for k, v in exact.scales.items()}
        real = np.asarray(mask, bool)
        error = {k: error_figures(acts[k][real], exact.acts[k][real], exact.scales[k]) for k in exact.acts}
        return Reference(acts, scales, error)

    def activations(self, mask=None, dtype: str = "float64"):
        """The float64 named intermediates of the batch whose mask is ``mask`` (default: right)."""
        return self.reference(mask is not None and mask is self.left_padding_mask).acts

    def noise(self, dtype: str, left: bool = False) -> dict[str, Figures]:
        """The rounding noise of each named intermediate in ``dtype`` (:mod:`refopt.testing.noise`)."""
        def run():
            from refopt.testing.noise import noisy_ops

            ref = self.reference(left)
            ids, mask = self.batch(left)
            runs = (R.run_forward(self.params, self.config, ids, mask, ops=noisy_ops(dtype, seed))
                    for seed in range(NOISE_SAMPLES))
            return noise_figures(ref.acts, ref.scales, runs, mask)
        return self.cached(("noise", dtype, left), run)

    # ------------------------------------------------------------------ gradients
    def gradients(self, dtype: str, port_grads: dict, tau) -> GradientReference:
        """The float64 gradients of the right-padded batch with the ReLU sides the port's
        ``port_grads`` show (``tau(i)``: the relative tolerance of layer ``i``'s ``mlp_input``)."""
        from refopt.testing.kinks import KinkResolver
        from refopt.testing.noise import noisy_ops

        ids, mask = self.batch()
        resolver = KinkResolver(self.params, self.config, self.reference().acts, mask, port_grads, dtype, tau)
        loss, grads = R.run_gradients(self.params, self.config, ids, mask,
                                      ops=R.numpy_ops(relu_backward=resolver.relu_backward))
        scales = R.gradient_scales(grads)
        held: dict = {}

        def noise():
            if not held:
                runs = [R.run_gradients(self.params, self.config, ids, mask,
                                        ops=noisy_ops(dtype, seed, relu_masks=resolver.masks))
                        for seed in range(NOISE_SAMPLES)]
                if dtype in R.HALF:
                    # one more sample, rounded for real: refopt's model in the dtype (KerasHub's
                    # rounding, the backward in float32 on the rounded activations)
                    runs.append(R.run_gradients_half(self.params, self.config, ids, mask, dtype))
                held.update(noise_figures(grads, scales, [g for _, g in runs]))
                held.update(noise_figures({"loss": np.array([loss])}, {},
                                          [{"loss": np.array([value])} for value, _ in runs]))
            return held
        return GradientReference(loss, grads, scales, noise,
                                 (resolver.ambiguous, resolver.flipped, resolver.inputs))

    def compare_gradients(self, dtype: str, loss, port_grads: dict, tau) -> GradientVerdict:
        """The port's loss and gradients against refopt's float64 ones (see :meth:`gradients`)."""
        from refopt.testing.locator import compare_gradients
        from refopt.testing.tolerances import compare

        ref = self.gradients(dtype, port_grads, tau)
        L = self.config.num_layers
        cl = compare("loss", np.array([float(loss)]), np.array([ref.loss]), dtype, L,
                     noise=lambda: ref.noise()["loss"])
        div = compare_gradients(self.config, port_grads, ref.grads, dtype, ref.scales, ref.noise)
        return GradientVerdict(ref.loss, cl, div, ref.kinks, True)

    # ------------------------------------------------------------------ generation
    def reference_adapter(self):
        """refopt itself (NumPy, float64) loaded with this case's model."""
        from refopt.testing.adapter import RefoptAdapter

        def make():
            ref = RefoptAdapter("numpy", "float64")
            ref.load(self.config, self.params)
            return ref
        return self.cached("adapter", make)

    def prompts(self, n_new: int = 6, max_prompt: int = 5) -> list[list[int]]:
        """The first ``max_prompt`` real tokens of each row, where ``n_new`` more still fit."""
        out = []
        room = min(max_prompt, self.config.max_sequence_length - n_new)
        for row, mask in zip(self.token_ids, self.padding_mask):
            real = [int(t) for t, m in zip(row, mask) if m][:room]
            if real:
                out.append(real)
        return out


#: presets with more parameters than this are streamed (:class:`StreamingCase`) unless told otherwise
STREAM_ABOVE = 20_000_000


def preset_case(path, seed: int = 0, streaming: bool | None = None) -> ModelCase:
    """A case for a preset: streamed when ``streaming`` says so, or (None) when it has more than
    :data:`STREAM_ABOVE` parameters; else held in memory in float64."""
    from refopt.io import presets

    if streaming is None:
        if presets.read_config(Path(path)).parameter_count() > STREAM_ABOVE:
            return StreamingCase(path, seed=seed, forced=False)
        streaming = False
    return StreamingCase(path, seed=seed) if streaming else case_from_preset(path, seed=seed)


def case_from_preset(path, name: str | None = None, seed: int = 0, batch: int = 3,
                     seq: int = 11) -> ModelCase:
    """A case for a preset directory (KerasHub or transformers layout), weights read by refopt."""
    from refopt.models import OPTBackbone

    path = Path(path)
    backbone = OPTBackbone.from_preset(path, dtype="float64", backend="numpy")
    cfg = backbone.config
    ids, right, ids_left, left = make_inputs(cfg, np.random.default_rng(seed), batch, seq)
    return ModelCase(name or path.name, cfg, backbone.params, ids, right, ids_left, left, preset=path)


class StreamingCase(ModelCase):
    """A checkpoint too large to hold in float64: the reference runs over a
    :class:`refopt.testing.streaming.StreamingParams` mapping (one decoder layer resident at a
    time) -- forward, noise runs, generation -- and the gradients are compared block by block
    (:mod:`refopt.testing.streamed`); the adapter loads the checkpoint with its own loader."""

    def __init__(self, path, name=None, seed: int = 0, batch: int = 3, seq: int = 11, forced: bool = True):
        from refopt.testing.streaming import StreamingParams

        path = Path(path)
        params = StreamingParams(path)
        cfg = params.config
        ids, right, ids_left, left = make_inputs(cfg, np.random.default_rng(seed), batch, seq)
        super().__init__(name or path.name, cfg, params, ids, right, ids_left, left, preset=path)
        self.forced = forced     # False: streamed because it is large; an adapter without a loader gets it whole

    def reference(self, left: bool = False, dtype: str = "float64") -> Reference:
        """The float64 reference whatever ``dtype``: a half-precision port is held to it with its
        dtype's tolerance (the half-precision reference would need the whole model in memory)."""
        return super().reference(left)

    def compare_gradients(self, dtype: str, loss, port_grads: dict, tau) -> GradientVerdict:
        """As :meth:`ModelCase.compare_gradients`, one block at a time (:mod:`refopt.testing.streamed`);
        the calibrated tolerance (the rounding noise is not measured on streamed gradients)."""
        from refopt.testing.kinks import KinkResolver
        from refopt.testing.locator import Divergence
        from refopt.testing.streamed import streamed_gradients
        from refopt.testing.tolerances import compare

        ids, mask = self.batch()
        resolver = KinkResolver(self.params, self.config, self.reference().acts, mask, port_grads, dtype, tau)
        try:
            loss64, comparisons = streamed_gradients(self.params, self.config, ids, mask, port_grads, dtype,
                                                     resolver.relu_backward)
        finally:
            self.params.release()
        cl = compare("loss", np.array([float(loss)]), np.array([loss64]), dtype, self.config.num_layers)
        first = next((c for c in comparisons if not c.passed), None)
        compared = {c.name for c in comparisons}
        missing = [n for n in R.gradient_order(self.config) if n not in compared]
        return GradientVerdict(loss64, cl, Divergence(first, comparisons, missing),
                               (resolver.ambiguous, resolver.flipped, resolver.inputs), False)

    def reference_adapter(self):
        from refopt.testing.adapter import NotSupported

        raise NotSupported("streaming mode keeps one layer in memory: no in-memory reference model")
