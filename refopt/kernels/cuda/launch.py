"""Kernel launches without Numba's per-call dispatch: arrays described by pointer and shape
(:class:`View`), the compiled kernel looked up once per argument kind, the arguments marshalled the
way Numba's dispatcher marshals them.

Why: a ``kernel[grid, block, stream](*args)`` call types every argument, reshapes and slices of a
device array each ask the driver for the current context, and the dispatcher rebuilds the launch's
argument list -- measured on an H200 (``benchmarks/gemm_shapes.py``, session 6): 340 us of host
time for one GEMM launch, 370-650 us for a split-K product (two launches), against 0.12-0.17 ms
for cuBLAS's whole product at the training shapes.  :func:`launcher` keeps the compiled kernel and
launches it through ``cuda.core`` with the argument list Numba would build (``meminfo, parent,
size, itemsize, data, *shape, *strides`` per array; ``ctypes`` values for scalars).

Under Numba's simulator (no pointers, no driver) and with ``REFOPT_FAST_LAUNCH=0`` the kernels
are launched through the dispatcher as usual, with :func:`as_shape` giving reshaped device arrays
instead of views: one code path for callers.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

import numpy as np
from numba import from_dtype, types

from refopt.kernels.cuda._common import SIMULATOR, nbtype

#: launches go through :func:`launcher`'s cached path (off under the simulator, or with
#: ``REFOPT_FAST_LAUNCH=0``)
FAST = not SIMULATOR and os.environ.get("REFOPT_FAST_LAUNCH", "1") != "0"


class View(NamedTuple):
    """A C-contiguous device array described by its data pointer, shape and dtype."""

    ptr: int
    shape: tuple
    dtype: np.dtype


def pointer(a) -> int:
    """The device address of ``a``'s first element (a Numba device array or any CUDA array)."""
    if isinstance(a, View):
        return a.ptr
    try:
        return a.device_ctypes_pointer.value or 0
    except AttributeError:
        return a.__cuda_array_interface__["data"][0]


def as_shape(a, shape):
    """``a`` (C-contiguous, at least ``prod(shape)`` elements) as an array of ``shape`` over its
    first elements: a :class:`View` on the fast path, a reshaped (sliced) device array otherwise."""
    shape = tuple(int(s) for s in shape)
    if FAST:
        return View(pointer(a), shape, np.dtype(a.dtype))
    n = 1
    for s in shape:
        n *= s
    flat = a.reshape(-1)
    return (flat if flat.shape[0] == n else flat[:n]).reshape(shape)


def _kind(a):
    if type(a) is View:
        return (a.dtype.char, len(a.shape))
    return type(a)


def _numba_type(a):
    if type(a) is View:
        dt = nbtype(a.dtype) if a.dtype.kind == "f" else from_dtype(a.dtype)
        return types.Array(dt, len(a.shape), "C")
    if isinstance(a, np.int32):
        return types.int32
    if isinstance(a, (int, np.int64)):
        return types.int64
    if isinstance(a, np.float32):
        return types.float32
    if isinstance(a, float):
        return types.float64
    raise TypeError(f"launch: argument of type {type(a).__name__} is not supported")


def _marshal(args):
    out = []
    for a in args:
        if type(a) is View:
            itemsize = a.dtype.itemsize
            shape = a.shape
            strides = [itemsize] * len(shape)
            size = 1
            for d in range(len(shape) - 1, -1, -1):
                strides[d] = itemsize * size
                size *= shape[d]
            out += [0, 0, size, itemsize, a.ptr, *shape, *strides]
        elif isinstance(a, np.int32):
            out.append(ctypes.c_int32(int(a)))
        elif isinstance(a, (int, np.int64)):
            out.append(ctypes.c_int64(int(a)))
        elif isinstance(a, np.float32):
            out.append(ctypes.c_float(float(a)))
        else:
            out.append(ctypes.c_double(float(a)))
    return out


_STREAMS: dict = {}
_CONFIGS: dict = {}


def _core_stream(stream):
    from numba.cuda.cudadrv import driver

    key = id(stream) if stream else 0
    hit = _STREAMS.get(key)
    if hit is None or hit[0] is not stream:
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        hit = _STREAMS[key] = (stream, driver._to_core_stream(stream))  # keeps the stream alive
    return hit[1]


def _config(grid, block):
    key = (grid, block)
    config = _CONFIGS.get(key)
    if config is None:
        from cuda.core import LaunchConfig

        if len(_CONFIGS) > 4096:
            _CONFIGS.clear()
        config = _CONFIGS[key] = LaunchConfig(grid=grid, block=block, shmem_size=0)
    return config


class _Launcher:
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.kernels: dict = {}

    def _kernel(self, args):
        key = tuple(_kind(a) for a in args)
        kernel = self.kernels.get(key)
        if kernel is None:
            compiled = self.dispatcher.compile(tuple(_numba_type(a) for a in args))
            kernel = self.kernels[key] = compiled._codelibrary.get_cufunc().kernel
        return kernel

    def __call__(self, grid, block, stream, *args):
        if not FAST:
            self.dispatcher[grid, block, stream](*args)
            return
        from cuda.core import launch

        launch(_core_stream(stream), _config(grid, block), self._kernel(args), *_marshal(args))

    def bind(self, grid, block, stream, *args):
        """A function of no arguments that makes this launch again: the kernel looked up, the
        stream and configuration converted and the arguments marshalled once, for a launch
        repeated with the same arguments (:func:`refopt.kernels.cuda.gemm.gemm`'s plans).  Off
        the fast path it calls the dispatcher each time, as ``__call__`` does."""
        if not FAST:
            return lambda: self.dispatcher[grid, block, stream](*args)
        kernel, s, marshalled = self._kernel(args), _core_stream(stream), _marshal(args)
        direct = _direct(kernel, s, grid, block, marshalled)
        if direct is not None:
            return direct
        from cuda.core import launch

        config = _config(grid, block)
        return lambda: launch(s, config, kernel, *marshalled)


#: bound launches call the driver's ``cuLaunchKernel`` directly (``REFOPT_DIRECT_LAUNCH=0``: through
#: ``cuda.core.launch``, which marshals the arguments and converts the configuration every call)
DIRECT = os.environ.get("REFOPT_DIRECT_LAUNCH", "1") != "0"


def _direct(kernel, stream, grid, block, marshalled):
    """A launch of ``kernel`` bound once: the arguments marshalled by ``cuda.core``'s own
    ``ParamHolder`` (so exactly as ``cuda.core.launch`` passes them) into an array of pointers that
    the returned function hands to ``cuLaunchKernel`` with the grid, block and stream as plain
    values.  None where ``cuda.core`` or ``cuda.bindings`` lack what it needs (then the caller
    launches through ``cuda.core.launch``)."""
    if not DIRECT:
        return None
    try:
        from cuda.bindings import driver as cu
        try:
            from cuda.core._kernel_arg_handler import ParamHolder
        except ImportError:
            from cuda.core.experimental._kernel_arg_handler import ParamHolder
        holder = ParamHolder(marshalled)
        f = cu.CUfunction(int(kernel.handle))
        h = stream.handle
        ok = cu.CUresult.CUDA_SUCCESS
        launch_kernel = cu.cuLaunchKernel
    except Exception:            # another cuda.core / cuda.bindings layout: the general path
        return None
    ptr = holder.ptr
    (gx, gy, gz), (bx, by, bz) = (tuple(int(v) for v in grid), tuple(int(v) for v in block))

    def go():
        err = launch_kernel(f, gx, gy, gz, bx, by, bz, 0, h, ptr, 0)[0]
        if err != ok:
            raise RuntimeError(f"cuLaunchKernel failed: {err!r}")
    go.keep = (holder, marshalled, kernel, stream)       # what the pointers point into
    return go


def launcher(dispatcher) -> _Launcher:
    """``launcher(kernel)(grid, block, stream, *args)``: launch the ``cuda.jit`` kernel with
    ``args`` (:class:`View` for arrays on the fast path; 3-tuples ``grid`` and ``block``)."""
    hit = getattr(dispatcher, "_refopt_launcher", None)
    if hit is None:
        hit = _Launcher(dispatcher)
        dispatcher._refopt_launcher = hit
    return hit
