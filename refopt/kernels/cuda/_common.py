"""What every CUDA kernel module shares: whether we run on Numba's CUDA simulator, the dtype map,
launch helpers, and the host <-> device transfers of the ops namespace.

The simulator (``NUMBA_ENABLE_CUDASIM=1``) runs each CUDA thread as a Python thread: it checks
the kernels' logic on any machine, slowly, and it has no warp shuffles and no multi-block grid
synchronisation.  Under it (``SIM``) the kernels take simulator-friendly variants: reductions
through shared memory instead of shuffles, small tiles and blocks, one block for the persistent
decode kernel.

``REFOPT_CUDASIM_GPU_PATHS=1`` (with the simulator on) keeps the GPU's variants instead -- warp
shuffles (emulated here through shared state and barriers), full tiles, 32-lane warps -- so that
the code the GPU runs is checked on a machine without one (slower still).
"""

from __future__ import annotations

import linecache
import os

import numpy as np
from numba import config, cuda, float32, float64

#: Numba's CUDA simulator is on (its API lacks some options and intrinsics).
SIMULATOR = bool(config.ENABLE_CUDASIM)
#: The kernels take their simulator-friendly variants (see the module docstring).
SIM = SIMULATOR and not os.environ.get("REFOPT_CUDASIM_GPU_PATHS")
#: ``alignment=`` of shared arrays read with 16-byte loads (the simulator takes none).
ALIGN = None if SIMULATOR else 16

#: NumPy dtype -> Numba scalar type of the kernels.
NB_TYPES = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}


def nbtype(dtype):
    """The Numba scalar type for a float32 / float64 NumPy dtype."""
    try:
        return NB_TYPES[np.dtype(dtype)]
    except KeyError:
        from refopt.errors import BackendError

        raise BackendError(f"cuda backend: dtype {np.dtype(dtype)} is not supported (float32 or "
                           "float64 compute dtypes)") from None


def kernel(launch_bounds=None, **kwargs):
    """``cuda.jit`` for a kernel; options the simulator does not take are dropped there."""
    if SIMULATOR:
        return cuda.jit(**kwargs)
    if launch_bounds is not None:
        kwargs["launch_bounds"] = launch_bounds
    return cuda.jit(**kwargs)


def generated(lines, name: str, namespace: dict) -> tuple[dict, str]:
    """Run kernel source written out by a generator (``lines``, its name ``name`` as tracebacks
    and Numba's error messages show it) in ``namespace``: ``(namespace, source)``.  The source is
    registered with :mod:`linecache`, so both can quote its lines."""
    src = "\n".join(lines) + "\n"
    fname = f"<refopt {name}>"
    linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
    exec(compile(src, fname, "exec"), namespace)
    return namespace, src


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_device(a) -> bool:
    return cuda.is_cuda_array(a) if not SIMULATOR else hasattr(a, "copy_to_host")


def to_device(a, dtype=None):
    """``a`` on the device (a device array is returned as it is), C-contiguous, in ``dtype``."""
    if is_device(a):
        return a
    a = np.asarray(a)
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    return cuda.to_device(np.ascontiguousarray(a))


def empty(shape, dtype):
    return cuda.device_array(shape, dtype=np.dtype(dtype))


def zeros(shape, dtype):
    out = cuda.device_array(shape, dtype=np.dtype(dtype))
    fill(out.reshape(-1) if out.size else out, 0)
    return out


def host(a):
    """``a`` as a NumPy array (copied back from the device)."""
    return a.copy_to_host() if is_device(a) else np.asarray(a)


@cuda.jit
def _fill(a, value):
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = value


def fill(flat, value, stream=0):
    """Set every element of a 1-D device array to ``value``."""
    n = flat.shape[0]
    if n:
        _fill[cdiv(n, 256), 256, stream](flat, flat.dtype.type(value))


# ----------------------------------------------------------------------------- block reductions
def _block_reduce(combine, release: bool):
    """A block-wide reduction device function ``reduce(value, buf)``: every thread of the block
    calls it with its ``value`` and gets ``combine`` folded over all of them (a tree through
    ``buf``, shared memory of at least ``blockDim.x`` entries; ``blockDim.x`` a power of two).
    With ``release`` it waits at a barrier after reading the result, so the caller may write
    ``buf`` straight away; without, the next reduction's opening barrier protects it."""

    @cuda.jit(device=True)
    def reduce(value, buf):
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        buf[tid] = value
        cuda.syncthreads()
        w = cuda.blockDim.x // 2
        while w > 0:
            if tid < w:
                buf[tid] = combine(buf[tid], buf[tid + w])
            cuda.syncthreads()
            w //= 2
        out = buf[0]
        if release:
            cuda.syncthreads()
        return out

    return reduce


# the combining functions (device functions, for reductions written elsewhere too)
@cuda.jit(device=True)
def plus(a, b):
    return a + b


@cuda.jit(device=True)
def larger(a, b):
    return max(a, b)


@cuda.jit(device=True)
def smaller(a, b):
    return min(a, b)


block_sum = _block_reduce(plus, release=False)          # every thread gets the block's sum
block_max = _block_reduce(larger, release=False)       # ... its maximum
block_min = _block_reduce(smaller, release=True)       # ... its minimum (buffer free after)
block_sum_released = _block_reduce(plus, release=True)  # the sum, buffer free after


def _emulate_shuffles():
    """Give the simulator's in-kernel ``cuda`` module a ``shfl_xor_sync``: every thread of the
    block posts its value, waits at a barrier, reads its partner's (a warp-synchronous exchange;
    the kernels call shuffles uniformly across their blocks)."""
    from numba.cuda.simulator import kernelapi

    if hasattr(kernelapi.FakeCUDAModule, "shfl_xor_sync"):
        return

    def shfl_xor_sync(self, mask, value, offset):
        tid = self.threadIdx.x + self.blockDim.x * (self.threadIdx.y + self.blockDim.y * self.threadIdx.z)
        board = self.__dict__.setdefault("_shfl_board", {})
        self.syncthreads()
        board[tid] = value
        self.syncthreads()
        out = board[tid ^ offset]
        self.syncthreads()
        return out

    kernelapi.FakeCUDAModule.shfl_xor_sync = shfl_xor_sync


if SIMULATOR and not SIM:
    _emulate_shuffles()
