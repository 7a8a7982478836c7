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

The simulated threads run on a pool of OS threads reused from block to block and launch to launch
(the simulator creates, starts and joins one per simulated thread and block: 18,832 of them for
one hypothesis test of the attention, about a fifth of its CPU time, and far more of its wall time
on a loaded machine).  A pool thread is a ``BlockThread`` given that block's fields before each
run, so the simulator's ``cuda.threadIdx`` & co. (read from ``threading.current_thread()``) are
unchanged.

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
        self.cond = threading.Condition()  # the barrier's waiters
        self.done = threading.Event()      # every thread has exited, or one raised: for the launcher
        self.live = live
        self.waiting = 0
        self.generation = 0
        self.failed = None                 # the first thread that raised

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
                self.done.set()
            if not self.live:
                self.done.set()
            elif self.waiting == self.live:  # the others all wait for this one: it no longer counts
                self._open()


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
    Dim3 = kernelapi.Dim3

    class PoolThread(kernel.BlockThread):
        """An OS thread that runs one simulated thread after another (see the module docstring)."""

        def __init__(self):
            threading.Thread.__init__(self, daemon=True)
            self.ready = threading.Semaphore(0)
            self.task = None

        def assign(self, manager, target, grid_point, block_point, barrier):
            self.task = (manager, target, grid_point, block_point, barrier)
            self.ready.release()

        def run(self):
            while True:
                self.ready.acquire()
                manager, target, grid_point, block_point, barrier = self.task
                self.task = None
                # BlockThread.__init__'s fields, for this block's thread
                self._manager, self.debug = manager, manager._debug
                self.blockIdx, self.threadIdx = Dim3(*grid_point), Dim3(*block_point)
                block = Dim3(*manager._block_dim)
                self.thread_id = self.threadIdx.x + block.x * (self.threadIdx.y + block.y * self.threadIdx.z)
                self.exception, self.abort = None, False
                self._refopt_barrier = barrier
                if self.debug:
                    def checked(target=target):     # the simulator's debug mode: as BlockThread's
                        with np.errstate(divide="raise"):
                            target()
                    target = checked
                self._target, self._args, self._kwargs = target, (), {}
                try:
                    thread_run(self)      # the simulator's: runs the kernel, keeps an exception
                finally:
                    barrier.exit(self)
                    with pool_lock:
                        idle.append(self)

    idle: list = []
    pool_lock = threading.Lock()

    def syncthreads(self):
        self._refopt_barrier.wait(self)

    def run_block(self, grid_point, *args):
        points = list(np.ndindex(*self._block_dim))
        barrier = _Barrier(len(points))

        def target():
            self._f(*args)

        with pool_lock:
            threads = [idle.pop() for _ in range(min(len(points), len(idle)))]
        while len(threads) < len(points):
            t = PoolThread()
            t.start()
            threads.append(t)
        for t, block_point in zip(threads, points):
            t.assign(self, target, grid_point, block_point, barrier)
        barrier.done.wait()
        with barrier.cond:
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

    kernel.BlockThread.syncthreads = syncthreads
    kernel.BlockManager.run = run_block
    kernel.BlockManager._refopt_event_driven = True
    kernelapi.FakeCUDAShared.array = shared_array


_shared_lock = threading.Lock()
