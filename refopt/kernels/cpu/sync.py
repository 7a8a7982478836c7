"""Work shared by threads inside ONE parallel region: stages of chunks claimed through atomic
counters (the fused decode step, :mod:`.decode`, runs a whole step this way).

Why: a parallel region costs ~35 us here (waking a passively waiting OpenMP thread, see
:mod:`._threads`), and a 125m decode step has 61 stages of 10-200 us each; one region per stage
spent more time waking threads than the second thread saved, so the step ran them on one thread.
Inside one region, each stage's work is cut into chunks; a thread claims the next chunk with an
atomic fetch-and-add on the stage's ``next`` counter, does it, adds one to the stage's ``done``
counter, and claims again; when no chunk is left it waits (spinning with ``pause``) until
``done`` reaches the stage's chunk count, then goes on to the next stage.

No thread ever waits for work that no running thread holds: a chunk is only waited for once a
thread has claimed it, so the step is correct (and cannot deadlock) with any number of threads
actually running the region -- one (the threading layer ran the iterations one after the
other), or a worker that woke late and finds the first stages done.  A thread that is descheduled
while holding a chunk delays the others by that chunk; the decode step's thread count is then
chosen by timing (:class:`._threads.Governor`).

``sync`` is an int64 array of ``16 * stages`` zeros: stage ``s``'s ``next`` counter at ``16 * s``
and ``done`` counter at ``16 * s + 8`` (separate 64-byte cache lines).
"""

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

STRIDE = 16     # int64s per stage: two counters, each on a cache line of its own


def counters(stages: int) -> np.ndarray:
    """Zeroed counters for ``stages`` stages."""
    return np.zeros(STRIDE * stages, np.int64)


@intrinsic
def fetch_add(typingctx, arr, i, v):
    """``arr[i] += v`` atomically (sequentially consistent); returns the old value."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], a, [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def load(typingctx, arr, i):
    """``arr[i]``, an atomic load with acquire ordering (writes made before the matching
    :func:`fetch_add` are visible after it)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        return None
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], a, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


_X86 = llvm_binding.get_process_triple().startswith(("x86_64", "i386", "i686"))


@intrinsic
def pause(typingctx):
    """A spin-wait hint (x86 ``pause``; nothing elsewhere)."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def claim(sync, s):
    """The next chunk of stage ``s`` for this thread (>= the stage's count: none left)."""
    return fetch_add(sync, STRIDE * s, 1)


@njit(inline="always")
def left(sync, s, n):
    """Whether stage ``s`` (of ``n`` chunks) still has unclaimed chunks."""
    return load(sync, STRIDE * s) < n


@njit(inline="always")
def done(sync, s):
    """Report one chunk of stage ``s`` finished (its writes published)."""
    fetch_add(sync, STRIDE * s + 8, 1)


_sched_yield = types.ExternalFunction("sched_yield", types.int32())
SPINS = 2000      # pauses (~50-100 us) before a waiting thread yields its core at each check


@njit(inline="always")
def wait(sync, s, n):
    """Wait until all ``n`` chunks of stage ``s`` are finished: spinning, then, when the chunk's
    holder is slow (descheduled on a busy machine), yielding the core to it or to others."""
    spins = 0
    while load(sync, STRIDE * s + 8) < n:
        if spins < SPINS:
            pause()
            spins += 1
        else:
            _sched_yield()


@njit(cache=True)
def spread(sync, stages, n, out, tid):
    """Test helper: ``stages`` stages of ``n`` chunks; chunk ``c`` of stage ``s`` adds its claimer's
    ``tid + 1`` to ``out[s, c]`` and checks the previous stage is complete (``out[s - 1]`` all
    set, else it records -1 at ``out[s, c]``)."""
    for s in range(stages):
        c = claim(sync, s)
        while c < n:
            ok = True
            if s > 0:
                for j in range(n):
                    if out[s - 1, j] == 0:
                        ok = False
            out[s, c] += (tid + 1) if ok else -1000
            done(sync, s)
            c = claim(sync, s)
        wait(sync, s, n)
