"""The gradient check: the loss, then every parameter's gradient in backward order, against
refopt's float64 gradients with the ReLU sides the port took (:mod:`refopt.testing.kinks`)."""

from __future__ import annotations

import numpy as np

from refopt.testing.adapter import NotSupported
from refopt.testing.checks.base import FAIL, PASS, CheckResult, ensure_loaded, figures, ratio
from refopt.testing.spill import KeyedMapping
from refopt.testing.tolerances import noise_bound, tolerance

#: the kink margin is this many times the tolerance of what fc1 reads: a generous margin costs no
#: strength (an ambiguous input's side is read from the port, not excused)
KINK_MARGIN_FACTOR = 1.0


class _Arrays(KeyedMapping):
    """``np.asarray`` of the port's gradients, on lookup (nothing is read ahead)."""

    def __init__(self, grads):
        self._grads = self._keys = grads

    def __getitem__(self, name):
        return np.asarray(self._grads[name])

    def shape(self, name) -> tuple:
        shape = getattr(self._grads, "shape", None)
        return tuple(shape(name)) if callable(shape) else np.shape(self[name])

    def rows(self, name, start, stop):
        """``self[name][start:stop]``: only those rows where the mapping can read them alone."""
        rows = getattr(self._grads, "rows", None)
        return np.asarray(rows(name, start, stop) if callable(rows) else self[name][start:stop])


def kink_tolerance(case, dtype: str, measured: bool = True):
    """``tau(i)``: the relative error a correct port may have in layer ``i``'s ``mlp_input``: the
    calibrated tolerance, raised by the rounding noise of this input when ``measured``."""
    def tau(i: int) -> float:
        noise = case.noise(dtype).get(f"layers.{i}.mlp_input") if measured else None
        return KINK_MARGIN_FACTOR * noise_bound(tolerance(dtype, i + 1), noise).scaled
    return tau


def check_gradients(adapter, case) -> CheckResult:
    ids, mask = case.batch()
    if not mask[:, 1:].any():
        raise NotSupported("the batch has no position with a next token to predict (one token per row)")
    ensure_loaded(adapter, case)
    loss, grads = adapter.loss_and_gradients(ids, mask)
    # each gradient as an array when it is looked up: a spilled mapping stays on disk, and the
    # comparison holds one block of gradients at a time
    grads = _Arrays(grads)
    # the kink margin of the calibrated tolerance first; where that leaves a gradient out, again
    # with the margin the measured rounding noise gives (wider: more inputs resolved, never fewer)
    v = case.compare_gradients(adapter.dtype, loss, grads, kink_tolerance(case, adapter.dtype, False))
    if not v.loss_comparison.passed or v.divergence.first is not None:
        v = case.compare_gradients(adapter.dtype, loss, grads, kink_tolerance(case, adapter.dtype))
    cl, div = v.loss_comparison, v.divergence
    worst = div.first or div.worst
    text = f"loss rel {cl.figures.scaled:.2g} (tol {cl.tolerance.scaled:.2g}); {len(div.compared)} gradients"
    if worst is not None:
        text += f"; {'first' if div.first else 'worst'}: {worst.name}: {figures(worst)}"
    failed = (not cl.passed) or div.first is not None or bool(div.missing)
    if not cl.passed:
        detail = f"loss {float(loss)!r}, expected {v.loss!r}: {cl.describe()}"
        if div.first is not None:
            detail += f"; gradients: first divergence (backward order): {div.first.describe()}"
    elif div.first is not None:
        detail = f"first divergence (backward order): {div.first.describe()}"
    elif div.missing:
        detail = f"no gradient for {', '.join(div.missing[:6])}"
    else:
        detail = div.describe()
    ambiguous, flipped, inputs = v.kinks
    if ambiguous:
        detail += (f"; ReLU inputs within the kink margin: {ambiguous} of {inputs} "
                   f"({100 * ambiguous / max(inputs, 1):.2g}%), {flipped} taken the other way than "
                   "float64 (their side read from the port's fc1 gradients)")
    if not v.noise_measured:
        detail += "; streamed model: calibrated tolerance (rounding noise not measured)"
    return CheckResult("gradients", "", FAIL if failed else PASS, text, detail,
                       {"loss": float(loss), "loss_reference": float(v.loss),
                        "first_divergence": div.name if cl.passed else "loss", "missing": div.missing,
                        "ratio": ratio([cl] + div.compared),
                        "kinks": {"ambiguous": ambiguous, "flipped": flipped, "inputs": inputs}})
