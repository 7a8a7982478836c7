"""Thread count for the Numba kernels that run between BLAS products.

When NumPy was imported before refopt, its OpenBLAS keeps the default spin of its worker threads
(see ``refopt/__init__.py``): after every large product they busy-wait on the other cores for
about a tenth of a second.  A parallel Numba kernel started then shares a core with a spinning
worker and waits on it (on 2 cores, prefill 4 x 128 ran at 470 tok/s against 665 with these
kernels on one thread).  So, only in that case and only for inputs large enough to have come out
of BLAS (more than :data:`refopt.kernels.cpu.matmul.SMALL_M` rows), they run on the calling thread.
"""

from contextlib import contextmanager

import numba

import refopt
from refopt.kernels.cpu.matmul import SMALL_M


@contextmanager
def beside_blas(rows: int):
    """Run the enclosed Numba kernels on one thread if OpenBLAS's workers may be spinning."""
    if not refopt.OPENBLAS_SPINS or rows <= SMALL_M:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)
