"""Subcommands of the ``refopt`` command (see :mod:`refopt.cli`)."""


def warn_if_simulated(command: str, backend: str | None) -> None:
    """Say on stderr when the backend a command resolves to is Numba's CUDA simulator
    (``NUMBA_ENABLE_CUDASIM=1``): it runs each GPU thread in Python, to test the kernels on small
    shapes, and takes minutes per token on the bundled model."""
    import os
    import sys

    from refopt import backend as _backend

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") and _backend.resolve(backend) == "cuda":
        print(f"refopt {command}: the cuda backend is Numba's CUDA simulator here "
              "(NUMBA_ENABLE_CUDASIM=1), which exists to test the GPU kernels on tiny shapes: expect "
              "minutes per token on a real model; unset NUMBA_ENABLE_CUDASIM or use --backend numba",
              file=sys.stderr, flush=True)
