"""How many threads the Numba kernels use, and how their threads wait.

Why decoding collapsed on a busy machine (the 2-core development machine, load 3-11 from other
jobs): the bundled model decoded 7-11 tok/s on two threads against 828 on one, and a 125m-shaped
model 0.8-2 tok/s against 23.  A decode step runs dozens of short parallel regions, and GNU OpenMP
(Numba's threading layer here) lets a thread that waits -- a worker between regions, the caller at
the end of one -- spin for up to 300,000 iterations before it sleeps.  On a loaded machine the
spinning thread uses up its share of a core, the scheduler parks it, and the next region waits for
it: 3,000 calls of a two-item parallel loop took, at load 3.1, p50 33 us but p90 8 ms and 8.4 s in
all with the default spin, 3.3 s with GOMP_SPINCOUNT=20000, 0.24 s with OMP_WAIT_POLICY=passive
(p99 97 us) and 0.21 s on one thread.  Hence three measures:

1. **Passive waiting** -- :func:`configure` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set
   it or ``GOMP_SPINCOUNT``) just while Numba loads its OpenMP runtime, which reads it once then;
   the variable is removed at once, so runtimes loaded later with a copy of their own
   (CTranslate2 bundles one) keep their defaults.  When refopt's kernels load first, PyTorch
   (which asks for ``libgomp.so.1``) shares Numba's runtime and the setting.  When PyTorch came
   first, its own ``libgomp`` had read its settings (spinning) at import, and Numba's OpenMP calls
   bound to it: the passive setting never applied, and a two-item parallel region took p50 1.5 us
   but p99 26 ms at load 6 (against p50 9.5 us, p99 34 us passive); the threads used 25-96% of a
   core while the process slept between regions.  So when an OpenMP runtime is already loaded,
   Numba's threading layer is loaded with ``RTLD_DEEPBIND`` and calls a passive runtime of its own.
2. **Few regions, threads by work** -- the fused decode step (:mod:`.decode`) opens one
   parallel region per step, in which the threads claim chunks of every stage (:mod:`.sync`), and
   only when the step reads at least ``PARALLEL_BYTES``; the per-op kernels split products by
   their bytes and rows.
3. **Threads by measurement** -- :class:`Governor` times every decode step and compares, now and
   then, one step on the other thread count (one thread or all of them): the faster one is kept,
   so a step slowed by a busy core falls back to one thread, and goes back to all of them when
   they are free again.  A comparison that loses makes the next one rarer (up to 256 calls
   apart, and no more than about two seconds of calls apart).  One thread reads
   memory almost as fast as two here (32 against 37 GB/s), so batch-1 decoding loses little on
   one thread; batches of 8 are compute-bound and gain from two.

OpenBLAS (NumPy's products) keeps threads of its own that spin after each product when NumPy was
imported before refopt (see ``refopt/__init__.py``); Numba kernels that follow products run on one
thread then (:func:`beside_blas`).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

import numba

import refopt
from refopt.kernels.cpu.matmul import SMALL_M



def configure() -> None:
    """Load Numba's threading layer with passive OpenMP waiting (see the module docstring); once."""
    global _configured
    if _configured:
        return
    _configured = True
    mine = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    if mine:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    # An OpenMP runtime loaded before this one (PyTorch's own libgomp, imported first) has read its
    # settings already, and Numba's OpenMP calls bind to it -- spinning waits.  Deep binding makes
    # Numba's threading layer call the runtime it links (the system's libgomp, a copy of its own,
    # loaded now and reading the variable above).
    deep = mine and hasattr(os, "RTLD_DEEPBIND") and openmp_loaded()
    flags = sys.getdlopenflags()
    if deep:
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        from numba.np.ufunc import parallel

        parallel._launch_threads()           # loads the OpenMP runtime, which reads the variable
    except Exception:                        # no threading layer: Numba runs prange serially
        pass
    finally:
        sys.setdlopenflags(flags)
        if mine:
            del os.environ["OMP_WAIT_POLICY"]


def openmp_loaded() -> bool:
    """Whether an OpenMP runtime (GNU, LLVM or Intel) is already mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            return any(name in line for line in f for name in ("libgomp", "libomp", "libiomp"))
    except OSError:
        return False


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
    count in use.  A comparison that loses doubles the interval (from 8 calls up to 256, and, when
    ``record`` is told how long calls take, no further than ``SECONDS`` of calls on the count in
    use), one that wins resets it.  Three calls in a row that take over ``SLOWER`` times the
    recent median (a core got busy) bring the comparison forward to the next call, against those
    three, so a change of load is followed within a few calls, not after up to 256.  The load
    going away makes nothing slower, so only the comparisons find it: the time cap bounds how long
    decoding stays on one thread after a busy core is free again (without it, 256 greedy calls of
    32 steps: over a minute of a 125m int8 model decoding at half speed; session 23)."""

    FIRST, LAST = 8, 256
    SLOWER = 1.5
    SECONDS = 2.0

    def __init__(self):
        self._state: dict = {}

    def threads(self, key, most: int, start: int) -> int:
        if most <= 1:
            return 1
        st = self._state.get(key)
        if st is None or st["most"] != most:
            st = self._state[key] = {"most": most, "use": start, "recent": [], "wait": self.FIRST,
                                     "interval": self.FIRST, "first": True}
        st["wait"] -= 1
        if st["wait"] <= 0 and len(st["recent"]) >= 3:
            st["wait"] = st["interval"]
            return self._other(st)
        return st["use"]

    def record(self, key, threads: int, seconds: float, call_seconds: float | None = None) -> None:
        """Report a call of ``key`` on ``threads``: ``seconds`` per unit of work (what is compared)
        and, optionally, ``call_seconds``, the whole call's (what caps the interval)."""
        st = self._state.get(key)
        if st is None:
            return
        if st.pop("first", False):               # the first call compiles or warms caches
            return
        if threads == st["use"]:
            recent = st["recent"]
            slow = len(recent) >= 3 and seconds > self.SLOWER * sorted(recent)[len(recent) // 2]
            st["slow"] = st.get("slow", 0) + 1 if slow else 0
            st["recent"] = (recent + [seconds])[-5:]
            if call_seconds is not None:
                st["calls"] = (st.get("calls", []) + [call_seconds])[-5:]
            if st["slow"] >= 3:                      # the load changed: compare on the next call,
                st["slow"], st["wait"] = 0, 0        # against the calls since the change
                st["recent"] = st["recent"][-3:]
            return
        usual = sorted(st["recent"])[len(st["recent"]) // 2]
        if seconds < 0.9 * usual:                    # the other count is faster now: switch
            st["use"], st["recent"], st["interval"] = threads, [seconds], self.FIRST
            st["calls"] = []                         # the old count's call times cap nothing now
        else:
            st["interval"] = min(2 * st["interval"], self.LAST)
            calls = st.get("calls")
            if calls:                                # at most SECONDS of calls on the count in use
                call = sorted(calls)[len(calls) // 2]
                st["interval"] = min(st["interval"], max(self.FIRST, int(self.SECONDS / max(call, 1e-9))))
        st["wait"] = st["interval"]

    def probing(self, key, threads: int) -> bool:
        """Whether a call of ``key`` on ``threads`` is a comparison (not on the count in use)."""
        st = self._state.get(key)
        return st is not None and threads != st["use"]

    @staticmethod
    def _other(st) -> int:
        return 1 if st["use"] > 1 else st["most"]

    def timed(self, key, most: int, start: int, fn, units=None):
        """``fn(threads)`` on the count chosen for ``key``, timed and recorded: its seconds per
        unit of work, ``units(result)`` of them (default 1; 0: nothing recorded)."""
        n = self.threads(key, most, start)
        t0 = time.perf_counter()
        out = fn(n)
        count = 1 if units is None else units(out)
        if count > 0:
            took = time.perf_counter() - t0
            self.record(key, n, took / count, took)
        return out


governor = Governor()
