"""Which implementation of the ops runs: ``"numpy"`` (the readable reference, always available),
``"numba"`` (compiled CPU kernels, :mod:`refopt.kernels.cpu`) or ``"cuda"`` (``numba.cuda``
kernels, :mod:`refopt.kernels.cuda`, when a GPU is present -- or Numba's CUDA simulator, with
``NUMBA_ENABLE_CUDASIM=1``, which runs them on the CPU for testing).

The choice, from the most specific to the least:

1. a model's own backend (``from_preset(..., backend=...)`` or ``model.backend = ...``);
2. ``with refopt.use_backend("numpy"): ...`` (a context manager, per thread / task);
3. ``refopt.set_backend("numba")``;
4. the ``REFOPT_BACKEND`` environment variable;
5. ``"auto"``: the fastest available, which is ``"numba"`` whenever Numba imports, else ``"numpy"``.

The choice is read once, at the public entry points (``predict``, ``generate``, ``fit``, a direct
call of a sampler or an optimizer), as an ops namespace (:func:`ops`), which then travels
explicitly: to :func:`refopt.model.forward` (``ops=``), to the sampler's loop (the model's
``backbone.ops``, through its ``model`` argument), to the optimizer (``apply(..., ops=)``).
Nothing below those reads the ambient choice.

Every backend computes the same function: the Numba kernels are property-tested against the NumPy
ops (float64 within 1e-12 relative, float32 within 1e-5, sampler choices identical).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os

from refopt.errors import BackendError

BACKENDS = ("numpy", "numba", "cuda")
_MODULES = {"numpy": "refopt.ops", "numba": "refopt.kernels.cpu", "cuda": "refopt.kernels.cuda"}
_global: str | None = None
_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("refopt_backend", default=None)


def _check(name) -> str:
    if name == "auto":
        return name
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r}: expected one of {BACKENDS} or 'auto'")
    return name


_cuda_ok: bool | None = None


def _probe_cuda() -> None:
    global _cuda_ok
    _cuda_ok = False
    from numba import config, cuda

    if config.ENABLE_CUDASIM or cuda.is_available():
        importlib.import_module("refopt.kernels.cuda")
        _cuda_ok = True


def available(name: str) -> bool:
    """Whether backend ``name`` can run here."""
    _check(name)
    if name == "numpy":
        return True
    try:
        if name == "numba":
            importlib.import_module("numba")
            return True
        # "cuda": numba.cuda imports and either a CUDA GPU with a working driver is present, or
        # Numba's CUDA simulator is switched on (NUMBA_ENABLE_CUDASIM=1): the simulator runs the
        # same kernels on the CPU, slowly, which is how CI tests them; "auto" never picks "cuda".
        if _cuda_ok is None:
            _probe_cuda()
        return bool(_cuda_ok)
    except Exception:  # a broken numba or CUDA installation means "not available"
        return False


def resolve(name: str | None = None) -> str:
    """The backend a call site runs on (see the module docstring for the order)."""
    for candidate in (name, _context.get(), _global, os.environ.get("REFOPT_BACKEND") or None):
        if candidate is not None:
            candidate = _check(candidate)
            if candidate != "auto":
                if not available(candidate):
                    raise BackendError(f"backend {candidate!r} is not available on this machine"
                                       + (" (no CUDA GPU or numba.cuda)" if candidate == "cuda" else
                                          " (numba does not import)"))
                return candidate
            break
    return "numba" if available("numba") else "numpy"


def set_backend(name: str) -> None:
    """Make ``name`` (``"numpy"``, ``"numba"``, ``"cuda"`` or ``"auto"``) the process default."""
    global _global
    _check(name)
    if name != "auto" and not available(name):
        raise BackendError(f"backend {name!r} is not available on this machine")
    _global = None if name == "auto" else name


def get_backend() -> str:
    """The backend used when no model-level choice is made."""
    return resolve(None)


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("numpy"): ...`` runs the block on that backend."""
    _check(name)
    if name != "auto" and not available(name):
        raise BackendError(f"backend {name!r} is not available on this machine")
    token = _context.set(name)
    try:
        yield
    finally:
        _context.reset(token)


def ops(name: str | None = None):
    """The ops namespace (a module with the names of :mod:`refopt.ops`) of a backend."""
    return importlib.import_module(_MODULES[resolve(name)])
