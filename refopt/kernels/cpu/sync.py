"""Work shared by threads inside ONE parallel region: stages of chunks claimed through atomic
counters (the fused decode step, :mod:`.decode`, runs a whole step this way).

Why: a parallel region costs ~35 us here (waking a passively waiting OpenMP thread, see
:mod:`._threads`), and a 125m decode step has 61 stages of 10-200 us each; one region per stage
spent more time waking threads than the second thread saved, so the step ran them on one thread.
Inside one region, each stage's work is cut into chunks, and the chunks into one contiguous
segment per thread.  A thread claims the chunks of its own segment from the front, in order (one
atomic fetch-and-add on the segment's word, a line no other thread touches until it runs dry),
and, when its segment is done, those of another segment from the back; it then adds the count it
did to the stage's ``done`` counter once and waits (spinning with ``pause``) until ``done`` reaches
the stage's chunk count.  Each thread so streams one run of weights per stage: when the chunks of
a stage went to whichever thread asked next, the two threads' reads interleaved chunk by chunk
(64 KB: each thread's stream restarted at every chunk, its hardware prefetcher likely running on
into the chunk the other one read), and a 125m int8 step's layers (62 stages, so 62 waits, a token)
streamed at 21-26 GB/s against the 41-44 GB/s a two-thread read reaches
(2026-12-02, ``benchmarks/profile_cpu_step.py``; measured after this change: see :mod:`.decode`).

A segment's word holds two counts: the owner's claims from the front (low 32 bits) and the others'
from the back (high 32 bits); a claim adds 1 to its half and holds the chunk ``front`` (or ``count -
1 - back``) when the old counts summed below the segment's ``count``, so each chunk goes to exactly
one thread.

No thread ever waits for work that no running thread holds: a chunk is only waited for once a
thread has claimed it, so the step is correct (and cannot deadlock) with any number of threads
actually running the region -- one (the threading layer ran the iterations one after the
other: it drains every segment), or a worker that woke late and finds the first stages done.  A
thread that is descheduled while holding a chunk delays the others by that chunk; the decode
step's thread count is then chosen by timing (:class:`._threads.Governor`).

``sync`` is an int64 array of :func:`counters`: per stage, ``parts + 1`` cache lines, the ``done``
counter first, then one word per segment.
"""

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 8        # int64s in a cache line
LOW = (1 << 32) - 1


def counters(stages: int, parts: int) -> np.ndarray:
    """Zeroed counters for ``stages`` stages shared by ``parts`` threads."""
    return np.zeros(LINE * (parts + 1) * stages, np.int64)


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


@njit(cache=True)
def block(parts):
    """int64s a stage's counters take: the done counter and one word per segment, each on a line."""
    return LINE * (parts + 1)


@njit(cache=True)
def _segment(n, parts, t):
    # chunks [first, first + count) of segment t
    first = t * n // parts
    return first, (t + 1) * n // parts - first


@njit(cache=True)
def claim(sync, s, n, tid, parts):
    """The next chunk of stage ``s`` (``n`` chunks) for thread ``tid`` of ``parts``, -1 when none is
    left: the front of its own segment, else the back of another's."""
    base = block(parts) * s
    for k in range(parts):
        t = (tid + k) % parts
        first, count = _segment(n, parts, t)
        word = base + LINE * (t + 1)
        old = load(sync, word)
        if (old & LOW) + (old >> 32) >= count:
            continue                                   # this segment is taken
        old = fetch_add(sync, word, 1 if k == 0 else 1 << 32)
        lo, hi = old & LOW, old >> 32
        if lo + hi < count:
            return first + lo if k == 0 else first + count - 1 - hi
    return -1


@njit(cache=True)
def left(sync, s, n, parts):
    """Whether stage ``s`` (of ``n`` chunks) still has unclaimed chunks."""
    base = block(parts) * s
    for t in range(parts):
        old = load(sync, base + LINE * (t + 1))
        if (old & LOW) + (old >> 32) < _segment(n, parts, t)[1]:
            return True
    return False


@njit(cache=True)
def done(sync, s, parts, k):
    """Report ``k`` chunks of stage ``s`` finished (their writes published)."""
    if k > 0:
        fetch_add(sync, block(parts) * s, k)


_sched_yield = types.ExternalFunction("sched_yield", types.int32())
SPINS = 2000      # pauses (~50-100 us) before a waiting thread yields its core at each check


@njit(cache=True)
def wait(sync, s, n, parts):
    """Wait until all ``n`` chunks of stage ``s`` are finished: spinning, then, when the chunk's
    holder is slow (descheduled on a busy machine), yielding the core to it or to others."""
    spins = 0
    while load(sync, block(parts) * s) < n:
        if spins < SPINS:
            pause()
            spins += 1
        else:
            _sched_yield()


@njit(cache=True)
def spread(sync, stages, n, out, tid):
    """Test helper: ``stages`` stages of ``n`` chunks; chunk ``c`` of stage ``s`` adds ``1 + 100 *
    tid`` (its claimer's) to ``out[s, c]`` after checking that the previous stage is complete
    (``out[s - 1]`` all set, else it adds -100000)."""
    parts = sync.shape[0] // LINE // stages - 1
    for s in range(stages):
        k = 0
        c = claim(sync, s, n, tid, parts)
        while c >= 0:
            ok = True
            if s > 0:
                for j in range(n):
                    if out[s - 1, j] == 0:
                        ok = False
            out[s, c] += (1 + 100 * tid) if ok else -100000
            k += 1
            c = claim(sync, s, n, tid, parts)
        done(sync, s, parts, k)
        wait(sync, s, n, parts)
