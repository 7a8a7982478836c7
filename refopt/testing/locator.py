"""The divergence locator: where, layer by layer, two implementations of OPT part ways.

Given a reference and a candidate adapter loaded with the same model, and one input, it compares
their named intermediates (:func:`refopt.testing.reference.activation_names`) in forward order and
reports the first one whose difference exceeds the tolerance, with its figures::

    first divergence: layers.0.attention_output: max|Δ| 0.41, max rel 3.2, scaled 0.35 (tol 2.4e-06),
    NMSE 0.12 (tol 1.4e-13)

Everything before it agreed, so the bug sits between the last tensor that agreed and that one --
in the example, inside layer 0's attention (the LayerNorm before it produced
``layers.0.attention_input`` correctly).  Gradients are located the same way, in backward order
(:func:`refopt.testing.reference.gradient_order`): the first diverging gradient is the one nearest
the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refopt.testing import reference as R
from refopt.testing.tolerances import Comparison, compare


class Divergence(NamedTuple):
    """The result of locating: ``first`` is the first comparison that failed (None: none did)."""

    first: Comparison | None
    compared: list            # every Comparison made, in order
    missing: list             # names the candidate did not produce

    @property
    def name(self) -> str | None:
        return None if self.first is None else self.first.name.split(" ")[0]

    @property
    def worst(self) -> Comparison | None:
        """The comparison with the largest ``scaled`` error relative to its tolerance."""
        if not self.compared:
            return None
        return max(self.compared, key=lambda c: c.figures.scaled / max(c.tolerance.scaled, 1e-300))

    def describe(self) -> str:
        if self.first is None:
            worst = self.worst
            text = f"all {len(self.compared)} tensors within tolerance"
            if worst is not None:
                text += f"; closest to its bound: {worst.describe()}"
            return text
        return f"first divergence: {self.first.describe()}"


def real_positions(padding_mask) -> np.ndarray:
    return np.asarray(padding_mask).astype(bool)


def _lazy(noise):
    """``noise`` (None, a dict, or a function returning a dict) as a function called at most once."""
    if not callable(noise):
        return lambda: noise or {}
    held = []

    def get():
        if not held:
            held.append(noise() or {})
        return held[0]
    return get


def compare_activations(cfg, candidate: dict, reference64: dict, dtype: str, padding_mask,
                        scales: dict | None = None, noise: dict | None = None,
                        stop_at_first: bool = False, names: list | None = None,
                        reference_error: dict | None = None) -> Divergence:
    """Compare named intermediates at real positions, in forward order.

    ``scales``: what each is measured against (:func:`refopt.testing.reference.activation_scales`;
    default: computed here); ``noise``: the rounding noise of each on this input
    (:meth:`refopt.testing.modelcase.ModelCase.noise`), which raises its tolerance, or a function
    returning it (called only if a tensor exceeds its calibrated tolerance); ``reference_error``:
    for a half-precision reference, each tensor's own error against float64 (added to its
    tolerance, :func:`refopt.testing.tolerances.plus_reference_error`)."""
    real = real_positions(padding_mask)
    scales = R.activation_scales(reference64, cfg, padding_mask) if scales is None else scales
    noise = _lazy(noise)
    compared, missing, first = [], [], None
    for name in names or R.activation_names(cfg):
        if name not in reference64:
            continue
        if name not in candidate:
            missing.append(name)
            continue
        cand = np.asarray(candidate[name])
        ref = np.asarray(reference64[name])
        depth = R.depth_of(name, cfg)
        if cand.shape[:2] != ref.shape[:2]:
            c = compare(name, cand, ref, dtype, depth)
        else:
            c = compare(name, cand[real], ref[real], dtype, depth, scale=scales.get(name),
                        noise=lambda name=name: noise().get(name),
                        reference_error=(reference_error or {}).get(name))
        compared.append(c)
        if not c.passed and first is None:
            first = c
            if stop_at_first:
                break
    return Divergence(first, compared, missing)


def compare_gradients(cfg, candidate: dict, reference64: dict, dtype: str, scales: dict | None = None,
                      noise: dict | None = None) -> Divergence:
    """Compare gradients in backward order (nearest the loss first), each against its block's
    magnitude (:func:`refopt.testing.reference.gradient_scales`) with the tolerance raised by its
    rounding noise when ``noise`` (a dict, or a function returning one) is given."""
    scales = R.gradient_scales(reference64) if scales is None else scales
    noise = _lazy(noise)
    compared, missing, first = [], [], None
    for name in R.gradient_order(cfg):
        if name not in candidate:
            missing.append(name)
            continue
        c = compare(name, candidate[name], reference64[name], dtype, cfg.num_layers, "gradients",
                    scale=scales.get(name), noise=lambda name=name: noise().get(name))
        compared.append(c)
        if not c.passed and first is None:
            first = c
    return Divergence(first, compared, missing)


def locate_divergence(reference, candidate, token_ids, padding_mask) -> Divergence:
    """The first named intermediate where ``candidate`` leaves ``reference`` (two adapters loaded
    with the same model) on one input, judged with the candidate's dtype tolerance.

    When ``reference`` is refopt's own adapter in float64, the tolerance is raised by the rounding
    noise of the candidate's dtype on this input (:mod:`refopt.testing.noise`).  Raises
    :class:`refopt.testing.NotSupported` when either adapter cannot produce intermediates."""
    from refopt.testing.adapter import RefoptAdapter
    from refopt.testing.noise import noise_figures, noisy_ops
    from refopt.testing.tolerances import NOISE_SAMPLES

    cfg = reference.config
    names = R.activation_names(cfg)
    ref = reference.activations(token_ids, padding_mask, names)
    cand = candidate.activations(token_ids, padding_mask, names)
    scales = R.activation_scales(ref, cfg, padding_mask)
    noise = None
    if isinstance(reference, RefoptAdapter) and reference.dtype == "float64":
        def noise():
            runs = (R.run_forward(reference.params, cfg, token_ids, padding_mask,
                                  ops=noisy_ops(candidate.dtype, seed)) for seed in range(NOISE_SAMPLES))
            return noise_figures(ref, scales, runs, real_positions(padding_mask))
    return compare_activations(cfg, cand, ref, candidate.dtype, padding_mask, scales, noise)
