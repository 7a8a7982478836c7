"""What every check shares: a result row, a runnable check, and loading a case into an adapter."""

from __future__ import annotations

import dataclasses
import traceback
import weakref
from pathlib import Path
from typing import Callable

from refopt.testing.adapter import NotSupported

PASS, FAIL, SKIP = "pass", "FAIL", "skip"


@dataclasses.dataclass
class CheckResult:
    """One row of the report."""

    group: str        # logits | activations | gradients | generation | incremental | tokenizer | samplers
    name: str         # unique, e.g. "opt-tiny-preln/logits", "samplers.top_p"
    status: str       # PASS | FAIL | SKIP
    figures: str = ""
    detail: str = ""  # the located divergence, the first mismatch, or why it was skipped
    data: dict = dataclasses.field(default_factory=dict)
    reproduce: str = ""   # a command that runs this check alone again (failures)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Check:
    """A named, runnable check: ``run()`` never raises -- an exception from the adapter is a
    failure naming it, :class:`NotSupported` a skip with its reason.

    ``needs``: the adapter capabilities it exercises (:data:`refopt.testing.adapter.CAPABILITIES`);
    ``case``: the model case it runs on (None for tokenizer and sampler checks)."""

    def __init__(self, group: str, name: str, fn: Callable[[], CheckResult], needs=("logits",), case=None):
        self.group, self.name, self._fn = group, name, fn
        self.needs, self.case = tuple(needs), case

    def run(self) -> CheckResult:
        try:
            result = self._fn()
        except NotSupported as e:
            return CheckResult(self.group, self.name, SKIP, detail=f"skipped: {e}")
        except Exception as e:  # the adapter under test raised: that is the finding
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return CheckResult(self.group, self.name, FAIL,
                               detail=f"raised {type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})")
        result.group, result.name = self.group, self.name
        return result

    def __repr__(self):
        return f"<Check {self.name}>"


def fmt(f) -> str:
    return (f"max|Δ| {f.max_abs:.2g}  max rel {f.max_rel:.2g}  scaled {f.scaled:.2g}  "
            f"NMSE {f.nmse:.2g}")


def ratio(comparisons) -> float:
    """The largest error-to-tolerance ratio (``scaled`` or ``nmse``) of some comparisons: how close
    to failing they came (above 1: failed)."""
    out = 0.0
    for c in comparisons:
        for got, tol in ((c.figures.scaled, c.tolerance.scaled), (c.figures.nmse, c.tolerance.nmse)):
            out = max(out, got / tol if tol > 0 else (0.0 if got == 0 else float("inf")))
    return out


def figures(c) -> str:
    """A comparison's figures with its tolerance, for a report row."""
    return f"{fmt(c.figures)}  (tol {c.tolerance.scaled:.2g} / {c.tolerance.nmse:.2g})"


# which case each adapter holds, and how it was loaded (or why it could not be), kept here rather
# than on the adapter: an adapter is the user's object
_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def ensure_loaded(adapter, case) -> str:
    """Load ``case``'s model into the adapter (once per case); returns how: "own loader" or
    "parameters".  A :class:`NotSupported` from the adapter is remembered and raised again for the
    case's other checks without asking the adapter twice."""
    from refopt.testing.modelcase import StreamingCase

    held = _LOADED.get(adapter)
    if held is not None and held[0] == case.key:
        if isinstance(held[1], NotSupported):
            raise held[1]
        return held[1]
    try:
        how = _load(adapter, case, isinstance(case, StreamingCase) and case.forced)
    except NotSupported as e:
        _LOADED[adapter] = (case.key, e)
        raise
    _LOADED[adapter] = (case.key, how)
    return how


def _load(adapter, case, streaming: bool) -> str:
    if streaming:
        try:
            adapter.load_preset(case.preset)
        except NotSupported as e:
            raise NotSupported(f"streaming mode needs the adapter's own checkpoint loader ({e})") from None
        return "own loader"
    if case.preset is not None:
        try:
            adapter.load_preset(case.preset)
            return "own loader"
        except NotSupported:
            pass
    params = case.params if isinstance(case.params, dict) else case.params.materialize()
    adapter.load(case.config, params)
    return "parameters"
