"""refopt: the OPT causal language model as plain arrays.

A readable NumPy reference (``refopt.ops``, ``refopt.model``), Numba kernels that must agree with
it, and a conformance oracle (``refopt.testing``).  The public API mirrors KerasHub's OPT classes.

The rooms, what may import what (kernels are leaves; the reference imports no kernel) and the path
of one token from ``generate`` to a kernel and back are described in ``docs/architecture.md``;
``tests/test_import_rules.py`` checks the import rules.
"""

import os

import sys

# OpenBLAS's worker threads spin for a long while after each product (2^28 cycles by default).
# The Numba backend's parallel kernels run between products on the same cores, and against
# spinning workers they run several times slower (LayerNorm after a product: 1.8 ms instead of
# 0.2 ms, median, on a 2-core machine).  Have them sleep soon instead.  That takes effect only when
# NumPy is first imported after this line (never overriding the user's own setting); when NumPy
# came first, the Numba kernels that follow products run on one thread instead
# (:mod:`refopt.kernels.cpu._threads`).
OPENBLAS_SPINS = "numpy" in sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in os.environ
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from refopt import errors  # noqa: E402, F401
from refopt.backend import get_backend, set_backend, use_backend  # noqa: E402, F401
from refopt.config import OPTConfig  # noqa: E402, F401

__version__ = "0.1.0"


def __getattr__(name):
    # Submodules are imported lazily so `import refopt` stays cheap.
    import importlib

    if name in {"models", "samplers", "tokenizers", "io", "ops", "model", "testing", "training",
                "optimizers", "backend"}:
        return importlib.import_module(f"refopt.{name}")
    raise AttributeError(f"module 'refopt' has no attribute {name!r}")
