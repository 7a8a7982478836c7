"""refopt: the OPT causal language model as plain arrays.

A readable NumPy reference (``refopt.ops``, ``refopt.model``), Numba kernels that must agree with
it, and a conformance oracle (``refopt.testing``).  The public API mirrors KerasHub's OPT classes.
"""

from refopt import errors  # noqa: F401
from refopt.backend import get_backend, set_backend, use_backend  # noqa: F401
from refopt.config import OPTConfig  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    # Submodules are imported lazily so `import refopt` stays cheap.
    import importlib

    if name in {"models", "samplers", "tokenizers", "io", "ops", "model", "testing", "training",
                "optimizers", "backend"}:
        return importlib.import_module(f"refopt.{name}")
    raise AttributeError(f"module 'refopt' has no attribute {name!r}")
