"""A faster thread-block scheduler for Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), for the
test suite only.

The simulator runs a kernel one block at a time, one Python thread per CUDA thread.  Its
``BlockManager.run`` (numba-cuda 0.30) finds out that every live thread of the block has reached
``syncthreads()`` by *polling*: the launching thread loops over the block's threads calling
``is_alive()`` and reading a flag, without ever sleeping, and competes for the GIL with the threads
doing the work.  In this suite that loop took most of the simulator's time (a profile of the tiled
device-decode test: 25 million ``is_alive`` calls in 58 s).

:func:`install` replaces it with the same barrier, kept by the threads themselves: a thread that
reaches ``syncthreads()`` counts itself in under a condition variable and waits; the last live
thread to arrive -- or to exit, since a thread that returns no longer takes part, as in the
original -- opens the barrier for everyone.  The launching thread sleeps until every thread has
exited or one raised.  What a kernel can observe is unchanged: every ``syncthreads()`` (and
``syncthreads_count/and/or``, and a cooperative grid's ``sync()``, which the simulator maps onto
it) is a barrier over the block's live threads; an exception in one thread aborts the others
(``RuntimeError`` at their next barrier) and is raised by the launch, as before.

It also makes ``cuda.shared.array`` allocation atomic: the simulator looks an allocation up by
call site and creates it on a miss (``get`` then a store), so two threads switched between the two
could each get an array of their own -- "shared" memory that is not shared (garbage or NaN in the
results; more frequent with a short GIL switch interval).
"""

from __future__ import annotations

import sys
import threading

import numpy as np


class _Barrier:
    """``syncthreads()`` over a block whose threads may exit: ``live`` threads take part."""

    def __init__(self, live):
        self.cond = threading.Condition()
        self.live = live
        self.waiting = 0
        self.generation = 0
        self.failed = None            # the first thread that raised

    def _open(self):                  # with self.cond held
        self.waiting = 0
        self.generation += 1
        self.cond.notify_all()

    def wait(self, thread):
        with self.cond:
            if thread.abort:
                raise RuntimeError("abort flag set on syncthreads call")
            generation = self.generation
            self.waiting += 1
            if self.waiting == self.live:
                self._open()
            else:
                while self.generation == generation and not thread.abort:
                    self.cond.wait()
            if thread.abort:
                raise RuntimeError("abort flag set on syncthreads clear")

    def exit(self, thread):
        with self.cond:
            self.live -= 1
            if thread.exception is not None and self.failed is None:
                self.failed = thread
            if self.live and self.waiting == self.live:
                self._open()
            self.cond.notify_all()


TESTED = ("0.30.",)                   # numba-cuda versions whose simulator this was written against


def install():
    """Swap the polling scheduler and the shared-array lookup of numba-cuda's simulator for the
    ones above (idempotent).  Another numba-cuda version keeps its own simulator, unchanged."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        if not version("numba-cuda").startswith(TESTED):
            return
    except PackageNotFoundError:
        return
    from numba.cuda.simulator import kernel, kernelapi

    types, numpy_support = kernelapi.types, kernelapi.numpy_support

    if getattr(kernel.BlockManager, "_refopt_event_driven", False):
        return

    thread_run = kernel.BlockThread.run

    def run_thread(self):
        try:
            thread_run(self)              # the simulator's: runs the kernel, keeps an exception
        finally:
            self._refopt_barrier.exit(self)

    def syncthreads(self):
        self._refopt_barrier.wait(self)

    def run_block(self, grid_point, *args):
        points = list(np.ndindex(*self._block_dim))
        barrier = _Barrier(len(points))
        threads = []

        def target():
            self._f(*args)

        for block_point in points:
            t = kernel.BlockThread(target, self, grid_point, block_point, self._debug)
            t._refopt_barrier = barrier
            threads.append(t)
        for t in threads:
            t.start()
        with barrier.cond:
            while barrier.live and barrier.failed is None:
                barrier.cond.wait()
            failed = barrier.failed
            if failed is not None:        # abort the others at their next barrier, as before
                for t in threads:
                    t.abort = True
                barrier.cond.notify_all()
        if failed is not None:
            raise failed.exception[0].with_traceback(failed.exception[1])

    def shared_array(self, shape, dtype, alignment=None):
        # FakeCUDAShared.array's steps, the lookup and the store under one lock; the caller's
        # (file, line) from its frame rather than from traceback.extract_stack, which also reads
        # every frame's source line
        if alignment is not None:
            raise RuntimeError("Array alignment is not supported in cudasim")
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        if shape == 0:                    # dynamic shared memory: one buffer
            count = self._dynshared_size // dtype.itemsize
            return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with _shared_lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernel.BlockThread.run = run_thread
    kernel.BlockThread.syncthreads = syncthreads
    kernel.BlockManager.run = run_block
    kernel.BlockManager._refopt_event_driven = True
    kernelapi.FakeCUDAShared.array = shared_array


_shared_lock = threading.Lock()
