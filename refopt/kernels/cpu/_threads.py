"""How many threads the Numba kernels use, and how their threads wait.

Why decoding collapsed on a busy machine (measured on the 2-core development machine, load 7-11
from other jobs): the bundled model decoded 7-11 tok/s on two threads against 828 on one, and a
125m-shaped model 0.8-2 tok/s against 23.  A decode step is ~100 short parallel regions; GNU
OpenMP (Numba's default threading layer here) lets an idle worker spin for ~300,000 iterations
(milliseconds) before sleeping, so a spinning worker uses up its share of a busy core, the
scheduler parks it, and the next region waits a whole time slice for it.  Waiting passively cured
most of it (600 tok/s), one thread all of it; on a quiet machine two threads win, since they read
the weights a little faster (one thread streams 32 GB/s here, two 37) and batches of 8 are
compute-bound.  Hence three measures:

1. **Short spins** -- :func:`configure` sets ``GOMP_SPINCOUNT`` (unless the user set it or
   ``OMP_WAIT_POLICY``) before Numba loads its OpenMP runtime, so an idle worker spins for tens of
   microseconds (enough to bridge the gaps between the stages of one step) and then sleeps.  The
   runtime reads the variable once, when it is loaded; the variable is restored at once, so other
   OpenMP runtimes loaded later (CTranslate2 bundles its own) keep their defaults.  PyTorch's
   kernels share the system libgomp with Numba and therefore this setting.
2. **Threads by work** -- the fused decode step (:mod:`.decode`) runs a stage on several threads
   only when it reads at least ``PARALLEL_BYTES``; the per-op kernels do the same by rows.
3. **Threads by measurement** -- :class:`Governor` times every decode step and compares, now and
   then, one step on the other thread count (one thread or all of them): the faster one is kept,
   so a step that starts being slowed by a busy core falls back to one thread, and goes back to
   all of them when they are free again.  A comparison that loses makes the next one rarer.

OpenBLAS (NumPy's products) keeps threads of its own that spin after each product when NumPy was
imported before refopt (see ``refopt/__init__.py``); Numba kernels that follow products run on one
thread then (:func:`beside_blas`).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import numba

import refopt
from refopt.kernels.cpu.matmul import SMALL_M

SPIN_COUNT = "20000"    # GOMP_SPINCOUNT: tens of microseconds of spinning before a worker sleeps


def configure() -> None:
    """Load Numba's threading layer with short OpenMP spins (see the module docstring); once."""
    global _configured
    if _configured:
        return
    _configured = True
    mine = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    if mine:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        from numba.np.ufunc import parallel

        parallel._launch_threads()           # loads the OpenMP runtime, which reads the variable
    except Exception:                        # no threading layer: Numba runs prange serially
        pass
    finally:
        if mine:
            del os.environ["GOMP_SPINCOUNT"]


_configured = False


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


class Governor:
    """Picks the thread count of a repeated call (one decode step) by timing it.

    ``threads(key, most, start)`` gives the count for the next call of the kind ``key`` (``start``
    the first time); ``record(key, threads, seconds)`` reports how long it took.  The count in use
    is kept while it is the faster one: every ``interval`` calls one call runs on the other count
    (one thread, or ``most``), and when it beats the median of the last calls by 10% it becomes the
    count in use.  A comparison that loses doubles the interval (from 8 calls up to 256), one that
    wins resets it."""

    FIRST, LAST = 8, 256

    def __init__(self):
        self._state: dict = {}

    def threads(self, key, most: int, start: int) -> int:
        if most <= 1:
            return 1
        st = self._state.get(key)
        if st is None or st["most"] != most:
            st = self._state[key] = {"most": most, "use": start, "recent": [], "wait": self.FIRST,
                                     "interval": self.FIRST}
        st["wait"] -= 1
        if st["wait"] <= 0 and len(st["recent"]) >= 3:
            st["wait"] = st["interval"]
            return self._other(st)
        return st["use"]

    def record(self, key, threads: int, seconds: float) -> None:
        st = self._state.get(key)
        if st is None:
            return
        if threads == st["use"]:
            st["recent"] = (st["recent"] + [seconds])[-5:]
            return
        usual = sorted(st["recent"])[len(st["recent"]) // 2]
        if seconds < 0.9 * usual:                    # the other count is faster now: switch
            st["use"], st["recent"], st["interval"] = threads, [seconds], self.FIRST
        else:
            st["interval"] = min(2 * st["interval"], self.LAST)
        st["wait"] = st["interval"]

    @staticmethod
    def _other(st) -> int:
        return 1 if st["use"] > 1 else st["most"]

    def timed(self, key, most: int, start: int, fn):
        """``fn(threads)`` on the count chosen for ``key``, timed and recorded."""
        n = self.threads(key, most, start)
        t0 = time.perf_counter()
        out = fn(n)
        self.record(key, n, time.perf_counter() - t0)
        return out


governor = Governor()
