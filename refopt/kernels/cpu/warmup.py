"""Compiling the Numba kernels in the background while the NumPy ops serve.

Numba compiles a kernel on its first call and keeps it in its on-disk cache; on a fresh install
the kernels one generation needs take several seconds of compiling (the fused decode step most of
it), and a cold call waits for all of that before its first token.  :func:`start` runs a caller's
``exercise`` -- a function that calls the kernels a generation will need, on small inputs of the
right types -- on a thread of its own, which compiles them or loads them from the cache.  Until it
finishes, every op of this namespace called from any *other* thread runs the NumPy op of the same
name instead (:func:`busy`), and ``decode_step`` declines, so the caller's work never waits on
Numba's compiler lock; from then on the compiled kernels run.

The thread is a daemon: an interpreter that exits first abandons it (each kernel already compiled
stays cached).  :meth:`Warmup.wait` waits for it.
"""

from __future__ import annotations

import threading
import time


class Warmup:
    """A background compilation (see the module docstring)."""

    def __init__(self, exercise, after=None):
        self._exercise = exercise
        self._after = after                  # a warm-up started earlier, finished first
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, name="refopt-numba-warmup", daemon=True)

    def _run(self):
        t0 = time.perf_counter()
        try:
            if self._after is not None:
                self._after.wait()
            self._exercise()
        except BaseException as e:       # kept for the caller; the NumPy ops went on serving
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0
            with _lock:
                _running.discard(threading.get_ident())

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the compilation to end (at most ``timeout`` seconds); whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


_lock = threading.Lock()
_running: set = set()                    # idents of the warm-up threads still running
_last: Warmup | None = None


def start(exercise) -> Warmup:
    """Run ``exercise()`` on a background thread, the NumPy ops standing in meanwhile (one
    warm-up at a time: a second one starts when the first ends)."""
    global _last
    with _lock:
        warmup = Warmup(exercise, after=_last if _last is not None and _last.running else None)
        warmup._thread.start()
        _running.add(warmup._thread.ident)
        _last = warmup
    return warmup


def busy() -> bool:
    """Whether a background compilation runs and the calling thread is not one of its own."""
    return bool(_running) and threading.get_ident() not in _running

