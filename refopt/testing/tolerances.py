"""How close is close enough: error figures per tensor, and the tolerance model per dtype and depth.

Figures (:func:`error_figures`), for a candidate tensor ``x`` against the float64 reference ``r``
(both restricted to the positions that count, real tokens only):

``max_abs``     ``max |x - r|``
``max_rel``     ``max |x - r| / max(|r|, 1e-6 * max|r|)``: the largest elementwise relative error
                (entries a million times smaller than the tensor's largest are judged against
                that floor, so an exact zero in ``r`` does not make the figure infinite)
``scaled``      ``max |x - r| / max |r|``: the error in units of the tensor's own magnitude, the
                figure the tolerance bounds
``nmse``        ``sum (x - r)^2 / sum r^2``: the normalised mean squared error, as llama.cpp's
                ``test-backend-ops`` reports it (its ``nmse(a, b)`` with ``a`` the reference)

``scaled`` and ``nmse`` are measured against the tensor's *family* magnitude where it has one
(:class:`refopt.testing.reference.Scale`: an MLP branch against the residual stream it joins, a
gradient against its block's gradients), so a tensor that is zero in exact arithmetic is judged
against the size of the terms its rounding noise comes from, not against its own vanishing size.

A tensor passes when ``scaled <= tol.scaled`` and ``nmse <= tol.nmse``, where ``tol`` is the larger
of two bounds:

* the *calibrated* tolerance (:func:`tolerance`) for the candidate's compute dtype and the tensor's
  *depth*: 0 for the embeddings, ``i + 1`` for anything inside decoder layer ``i``, the number of
  layers for what follows the last layer (final norm, ``project_out``, logits) and for gradients --
  what a correct port reaches on well-conditioned inputs;
* :data:`NOISE_FACTOR` times the *rounding noise* measured on this very input
  (:mod:`refopt.testing.noise`: refopt's float64 run perturbed as rounding in the dtype perturbs it)
  -- what ill-conditioned inputs (attention scores of 1e4, a residual stream offset by thousands, a
  score gradient that is a difference of two equal numbers) add to it.

The tolerance model
-------------------
Rounding errors of a transformer forward grow with depth: each layer adds its own rounding and
passes on (and may amplify) what came in.  ``python -m refopt.testing.calibration`` measures that
growth: random OPT configs of 1 to 24 layers, widths 64 and 256, three weight scales, pre- and
post-LayerNorm, random padding; refopt's float32 forward and backward (and float32-arithmetic
emulations of bfloat16 and float16: weights and every op's output rounded) against its float64
ones, and float64 against an extended-precision (``np.longdouble``) run.  It records, per depth,
the largest ``scaled`` error and ``sqrt(nmse)`` over every tensor of that depth and every example.
The measured growth is fast over the first layers and then flattens (the LayerNorms rescale what
each layer passes on), so the envelope is fitted with a logarithm of the depth::

    scaled(d) <= u * (a + b * log2(1 + d))       sqrt(nmse(d)) <= u * (c + e * log2(1 + d))

(``u`` the dtype's unit roundoff; ``a``, ``c`` the depth-0 values, ``b``, ``e`` the smallest slopes
bounding every measured depth).  :data:`MEASURED` holds ``(a, b, c, e)`` per dtype, for
activations and for gradients; :func:`tolerance` multiplies them by :data:`SAFETY` (8 in float64
and float32: room for other summation orders than refopt's, BLAS blocking, fused kernels, GPU
reductions; 2 in float16 and bfloat16, whose error is dominated by the storage rounding the
emulation already reproduces).  ``docs/ORACLE.md``
shows the measured tables.  A correct port sits well inside; a wrong one (a missing scale, a
position off by one, a LayerNorm epsilon off by seven orders) misses by orders of magnitude.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

#: unit roundoff of each compute dtype (half the machine epsilon)
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11,
                 "bfloat16": 2.0 ** -8}

#: multiplies the measured envelope (see the module docstring): room for other summation orders
#: than refopt's in float64 and float32; in half precision the error is dominated by storing each
#: op's output in the format, which the emulation reproduces, so less room is left
SAFETY = {"float64": 8.0, "float32": 8.0, "float16": 2.0, "bfloat16": 2.0}

#: (a, b, c, e) per dtype and kind, fitted by ``python -m refopt.testing.calibration`` (before
#: SAFETY): scaled(d) <= u * (a + b * log2(1 + d)), sqrt(nmse(d)) <= u * (c + e * log2(1 + d));
#: each the larger of two runs' fits (this release's, gradients against their block's magnitude,
#: and the previous one's, against 1% of the model's largest gradient), so both runs are bounded.
#: "activations" covers
#: the named intermediates, the logits and the loss; "gradients" the parameter gradients (judged at
#: depth = number of layers, each against its block's largest gradient).
MEASURED = {
    "float64": {"activations": (7.08, 36.32, 3.26, 17.04), "gradients": (0.0, 158.90, 0.0, 111.82)},
    "float32": {"activations": (6.38, 47.78, 3.23, 20.75), "gradients": (0.0, 141.91, 0.0, 119.65)},
    "bfloat16": {"activations": (1.01, 15.87, 0.72, 4.63), "gradients": (0.0, 81.66, 0.0, 70.25)},
    "float16": {"activations": (1.01, 8.73, 0.72, 3.93), "gradients": (0.0, 473.83, 0.0, 326.92)},
}

#: the rounding-noise bound is this many times the noise measured on the input (the largest of
#: :data:`NOISE_SAMPLES` noisy runs): room for summation orders the noise model draws less often
NOISE_FACTOR = 8.0

#: how many noisy runs measure the rounding noise of one input
NOISE_SAMPLES = 2


class Tolerance(NamedTuple):
    """Bounds for one tensor: ``scaled`` (max error over max magnitude) and ``nmse``."""

    scaled: float
    nmse: float


def tolerance(dtype: str, depth: int, kind: str = "activations") -> Tolerance:
    """The tolerance for a tensor ``depth`` layers deep computed in ``dtype``; ``kind`` is
    ``"activations"`` (intermediates, logits, loss) or ``"gradients"``."""
    dtype = canonical_dtype(dtype)
    u = UNIT_ROUNDOFF[dtype]
    a, b, c, e = MEASURED[dtype][kind]
    grow = math.log2(1 + max(int(depth), 0))
    k = SAFETY[dtype]
    return Tolerance(k * u * (a + b * grow), (k * u * (c + e * grow)) ** 2)


def canonical_dtype(dtype) -> str:
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) or dtype not in UNIT_ROUNDOFF else dtype
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"dtype {dtype!r}: the oracle has tolerances for {sorted(UNIT_ROUNDOFF)}")
    return name


class Figures(NamedTuple):
    """Error figures of one tensor against the float64 reference (see the module docstring)."""

    max_abs: float
    max_rel: float
    scaled: float
    nmse: float

    def within(self, tol: Tolerance) -> bool:
        return self.scaled <= tol.scaled and self.nmse <= tol.nmse

    def worst(self, other: "Figures | None") -> "Figures":
        """Elementwise the larger figures of the two (``other`` None: these)."""
        return self if other is None else Figures(*(max(a, b) for a, b in zip(self, other)))


INFINITE = Figures(math.inf, math.inf, math.inf, math.inf)


def error_figures(candidate, reference, scale=None) -> Figures:
    """:class:`Figures` of ``candidate`` against ``reference`` (same shape; computed in float64).

    ``scale``: a :class:`refopt.testing.reference.Scale` (``scale`` divides ``max|Δ|``, ``energy``
    divides ``sum Δ²``; each at least the tensor's own) or a number (the magnitude alone); None: the
    tensor's own magnitude.  A NaN or infinity in the candidate (where the reference is finite)
    gives infinite figures."""
    x, r = np.asarray(candidate), np.asarray(reference)
    if x.shape != r.shape:
        raise ValueError(f"shapes differ: candidate {list(x.shape)}, reference {list(r.shape)}")
    if r.size == 0:
        return Figures(0.0, 0.0, 0.0, 0.0)
    # walked in blocks of FIGURE_BLOCK elements, each widened to float64 on its own: a gradient's
    # figures never hold more than a few blocks' temporaries beside the two tensors
    x, r = x.reshape(-1), r.reshape(-1)
    blocks = [slice(i, i + FIGURE_BLOCK) for i in range(0, r.size, FIGURE_BLOCK)]
    peaks, energy = [], 0.0
    for b in blocks:
        if not np.all(np.isfinite(x[b])):
            return INFINITE
        rb = r[b].astype(np.float64)
        peaks.append(np.max(np.abs(rb)))
        energy += float(np.dot(rb, rb))
    peak = float(np.max(peaks))          # (np.max: a NaN in the reference stays NaN)
    if scale is not None:
        family = (scale, 0.0) if isinstance(scale, (int, float)) else (scale.scale, scale.energy)
        peak, energy = max(peak, float(family[0])), max(energy, float(family[1]))
    floor = max(peak * 1e-6, np.finfo(np.float64).tiny)
    abs_, rel, sq = [], [], 0.0
    for b in blocks:
        rb = r[b].astype(np.float64)
        diff = np.abs(x[b].astype(np.float64) - rb)
        abs_.append(diff.max())
        rel.append(np.max(diff / np.maximum(np.abs(rb), floor)))
        sq += float(np.dot(diff, diff))
    max_abs, max_rel = float(np.max(abs_)), float(np.max(rel))
    if peak == 0.0:
        zero = 0.0 if max_abs == 0.0 else math.inf
        return Figures(max_abs, max_rel, zero, zero)
    return Figures(max_abs, max_rel, max_abs / peak, sq / max(energy, 1e-300))


#: elements per block of :func:`error_figures` (8 MiB of float64)
FIGURE_BLOCK = 1 << 20


def plus_reference_error(tol: Tolerance, error: Figures | None) -> Tolerance:
    """``tol`` widened by the error of a half-precision reference against float64 (``error``: its
    figures, measured on this input): the triangle inequality.  A correct port is within ``tol`` of
    float64 and the reference is ``error`` away from it, so the port is within the sum of the two
    of the reference (``scaled`` adds; ``sqrt(nmse)`` adds, a norm over the same denominator)."""
    if error is None:
        return tol
    return Tolerance(tol.scaled + error.scaled, (math.sqrt(tol.nmse) + math.sqrt(error.nmse)) ** 2)


def noise_bound(tol: Tolerance, noise: Figures | None) -> Tolerance:
    """The calibrated ``tol``, raised to :data:`NOISE_FACTOR` times the measured rounding noise."""
    if noise is None or not math.isfinite(noise.scaled) or not math.isfinite(noise.nmse):
        return tol
    return Tolerance(max(tol.scaled, NOISE_FACTOR * noise.scaled),
                     max(tol.nmse, NOISE_FACTOR ** 2 * noise.nmse))


class Comparison(NamedTuple):
    """The verdict on one named tensor."""

    name: str
    figures: Figures
    tolerance: Tolerance
    passed: bool
    noise: Figures | None = None     # the rounding noise measured on this input (None: not measured)
    calibrated: Tolerance | None = None   # the calibrated tolerance before the noise raised it
    reference_error: Figures | None = None   # a half-precision reference's own error (None: float64)

    @property
    def widened(self) -> bool:
        """Whether the measured rounding noise raised the tolerance above the calibrated one."""
        return self.calibrated is not None and self.tolerance != self.calibrated

    def describe(self) -> str:
        f, t = self.figures, self.tolerance
        text = (f"{self.name}: max|Δ| {f.max_abs:.3g}, max rel {f.max_rel:.3g}, scaled {f.scaled:.3g} "
                f"(tol {t.scaled:.3g}), NMSE {f.nmse:.3g} (tol {t.nmse:.3g})")
        if self.widened:
            text += (f"; tolerance raised by the rounding noise of this input (noise: scaled "
                     f"{self.noise.scaled:.3g}, NMSE {self.noise.nmse:.3g})")
        if self.reference_error is not None:
            text += (f"; against the half-precision reference, whose own error against float64 "
                     f"(scaled {self.reference_error.scaled:.3g}) is in the tolerance")
        return text


def compare(name: str, candidate, reference64, dtype: str, depth: int, kind: str = "activations",
            scale=None, noise: Figures | None = None, reference_error: Figures | None = None) -> Comparison:
    """Judge ``candidate`` (computed in ``dtype``) against the reference: float64, or (a
    half-precision port) the reference computed in its dtype with KerasHub's rounding.

    ``scale``: what the errors are measured against (see :func:`error_figures`); ``noise``: the
    rounding noise of this input (:mod:`refopt.testing.noise`), the same figures of refopt's noisy
    runs, which raises the tolerance (:func:`noise_bound`) -- or a function returning them, called
    only when the calibrated tolerance is exceeded (the noisy runs cost more than the comparison;
    the verdict is the same); ``reference_error``: a half-precision reference's figures against
    float64 on this input, added to the tolerance (:func:`plus_reference_error`).  A shape
    mismatch fails with infinite figures."""
    # against a half-precision reference the depth's calibrated envelope (the worst over many
    # models) gives way to the depth-0 bound (one storage rounding), raised by what rounding in
    # ``dtype`` measurably does on *this* input (the noise), plus the reference's own measured error
    base = tolerance(dtype, 0 if reference_error is not None else depth, kind)
    calibrated = plus_reference_error(base, reference_error)
    cand = np.asarray(candidate)
    ref = np.asarray(reference64)
    if cand.shape != ref.shape:
        return Comparison(f"{name} (shape {list(cand.shape)}, expected {list(ref.shape)})", INFINITE,
                          calibrated, False, None, calibrated, reference_error)
    figures = error_figures(cand, ref, scale)
    if figures.within(calibrated):
        return Comparison(name, figures, calibrated, True, None, calibrated, reference_error)
    if callable(noise):
        noise = noise()
    if reference_error is not None:
        # the half-precision reference is itself a run rounded in ``dtype``: its error against
        # float64 is one more sample of the rounding noise (the noisy runs can miss a flip that
        # real rounding makes, e.g. which key wins a softmax at scores of 1e4)
        noise = reference_error.worst(noise)
    tol = plus_reference_error(noise_bound(base, noise), reference_error)
    return Comparison(name, figures, tol, figures.within(tol), noise, calibrated, reference_error)
