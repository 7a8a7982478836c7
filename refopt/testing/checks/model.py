"""The model checks: logits on right- and left-padded batches, and every named intermediate (the
divergence locator)."""

from __future__ import annotations

import numpy as np

from refopt.testing import reference as R
from refopt.testing.adapter import NotSupported, capabilities_of
from refopt.testing.checks.base import FAIL, PASS, CheckResult, ensure_loaded, figures, ratio
from refopt.testing.locator import compare_activations
from refopt.testing.tolerances import compare


def locate(adapter, case, left: bool = False):
    """The divergence locator on one of the case's batches, or None when the adapter has no
    activations."""
    ids, mask = case.batch(left)
    try:
        acts = adapter.activations(ids, mask, R.activation_names(case.config))
    except NotSupported:
        return None
    ref = case.reference(left, adapter.dtype)
    return compare_activations(case.config, acts, ref.acts, adapter.dtype, mask, ref.scales,
                               lambda: case.noise(adapter.dtype, left), reference_error=ref.error)


def undeclared_half(values, declared: str) -> str | None:
    """``"bfloat16"`` or ``"float16"`` when a port declaring float32 or float64 returned values of
    that half-precision dtype (its array dtype, or every finite value exactly one of that dtype's
    and at least 64 of them), else None."""
    from refopt.dtype_policies import round_to

    if declared in R.HALF:
        return None
    values = np.asarray(values)
    name = values.dtype.name
    if name in R.HALF:
        return name
    finite = values[np.isfinite(values)].astype(np.float32) if values.dtype.kind == "f" else values[:0]
    if finite.size < 64:
        return None
    for half in R.HALF:
        if np.array_equal(round_to(finite, half), finite):
            return half
    return None


def _side(left: bool) -> str:
    return "left-padded" if left else "right-padded"


def check_logits(adapter, case, left: bool = False) -> CheckResult:
    """The logits of the right-padded batch (or, ``left``, its left-padded twin) at real
    positions; on failure the first diverging named intermediate."""
    if left and "left_padding" not in capabilities_of(adapter):
        raise NotSupported(f"{adapter.name} handles right padding only (supports_left_padding is False)")
    how = ensure_loaded(adapter, case)
    ids, mask = case.batch(left)
    logits = np.asarray(adapter.logits(ids, mask))
    ref = case.reference(left, adapter.dtype)
    expected = ref.acts["logits"]
    if logits.shape != expected.shape:
        return CheckResult("logits", "", FAIL, f"shape {list(logits.shape)}",
                           f"logits have shape {list(logits.shape)}, expected {list(expected.shape)}")
    real = mask.astype(bool)
    c = compare("logits", logits[real], expected[real], adapter.dtype, case.config.num_layers,
                scale=ref.scales["logits"], noise=lambda: case.noise(adapter.dtype, left)["logits"],
                reference_error=ref.error_of("logits"))
    detail = f"loaded with {how}; {_side(left)} batch {list(ids.shape)}"
    if ref.error is not None:
        detail += f"; against refopt's {adapter.dtype} reference (KerasHub's rounding)"
    data = {"figures": c.figures._asdict(), "tolerance": c.tolerance._asdict(), "widened": c.widened,
            "ratio": ratio([c])}
    if not c.passed:
        div = locate(adapter, case, left)
        if div is not None and div.first is not None:
            data["first_divergence"] = div.name
            detail = f"{div.describe()} [{detail}]"
        else:
            detail = f"{c.describe()} [{detail}; no intermediates to locate it]"
        half = undeclared_half(logits[real], adapter.dtype)
        if half is not None:
            data["undeclared_dtype"] = half
            detail = (f"the port computes in {half}: its logits are {half} values, but it declares "
                      f"dtype {adapter.dtype!r}, whose tolerance is far tighter than {half} rounding; "
                      f"declare dtype = {half!r} in the adapter (or pass refopt conform --dtype {half}) "
                      f"to hold it to refopt's {half} reference. {detail}")
    elif c.widened:
        detail += "; " + c.describe()
    return CheckResult("logits", "", PASS if c.passed else FAIL, figures(c), detail, data)


def check_activations(adapter, case, left: bool = False) -> CheckResult:
    """Every named intermediate the adapter produces, in forward order; fails at the first out of
    tolerance."""
    ensure_loaded(adapter, case)
    div = locate(adapter, case, left)
    if div is None or not div.compared:
        raise NotSupported(f"{adapter.name} produced none of the named intermediates")
    shown = div.first or div.worst
    detail = div.describe()
    if div.missing:
        detail += f"; not produced by the port: {', '.join(div.missing[:6])}" + (
            " ..." if len(div.missing) > 6 else "")
    data = {"first_divergence": div.name, "compared": [c.name for c in div.compared],
            "missing": div.missing, "figures": {c.name: c.figures._asdict() for c in div.compared},
            "ratio": ratio(div.compared)}
    return CheckResult("activations", "", FAIL if div.first else PASS,
                       f"{len(div.compared)} tensors; {'first' if div.first else 'worst'}: "
                       f"{shown.name}: {figures(shown)}", detail, data)
