"""Tensors as a checkpoint stores them: memory-mapped files, bfloat16 bits, and releasing pages.

Readers of every format hand out NumPy arrays that are views of the mapped file wherever the bytes
are stored uncompressed, in the dtype they are stored in.  NumPy has no bfloat16, so bfloat16
tensors are views of dtype :data:`BFLOAT16`, a one-field structured dtype over the raw ``uint16``
bits: arithmetic on them fails loudly instead of computing with bit patterns, :func:`bits` gives
the ``uint16`` view and :func:`widen` the exact float32 (or float64) values.

Converting a mapped checkpoint tensor by tensor touches every page of the file once; the pages
stay counted in the process's resident memory until unmapped.  :func:`release` drops a converted
tensor's pages from this process (``madvise(MADV_DONTNEED)``; the kernel's page cache keeps them,
and they fault back in if read again), so widening or quantising a file holds the result plus one
tensor, not the result plus the file.
"""

from __future__ import annotations

import mmap
import os
import stat

import numpy as np

from refopt.errors import CheckpointError

BFLOAT16 = np.dtype([("bfloat16", "<u2")])
_PAGE = mmap.PAGESIZE


def is_bfloat16(arr) -> bool:
    return getattr(arr, "dtype", None) == BFLOAT16


def bits(arr: np.ndarray) -> np.ndarray:
    """The ``uint16`` bit patterns of a :data:`BFLOAT16` array (a view, no copy)."""
    return arr.view(np.uint16) if arr.ndim else arr.reshape(1).view(np.uint16).reshape(())


def widen(arr: np.ndarray, dtype=np.float32) -> np.ndarray:
    """A stored float array as ``dtype`` (bfloat16 exactly, via float32).  No copy when ``arr``
    already has that dtype."""
    if is_bfloat16(arr):
        wide = (bits(arr).astype(np.uint32) << 16).view(np.float32)
        return wide if np.dtype(dtype) == np.float32 else wide.astype(dtype)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def stored_dtype_name(arr) -> str:
    return "bfloat16" if is_bfloat16(arr) else str(getattr(arr, "dtype", type(arr).__name__))


def open_regular(path) -> int:
    """A read-only descriptor of ``path``, refusing anything but a regular file (a FIFO, device or
    directory would block or never end) without blocking on it."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror})") from None
    except ValueError:                   # a NUL byte in the name (as a file's index may hold)
        raise CheckpointError(f"{path!r}: not a file name (it holds a NUL byte)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file")
    return fd


def map_file(path) -> np.ndarray:
    """The bytes of a regular file as a read-only ``uint8`` array backed by a shared mapping."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return np.zeros(0, np.uint8)
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return np.frombuffer(mm, np.uint8)


def _mapping(arr):
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return base


def release(arr) -> None:
    """Drop the whole pages under ``arr`` from this process's resident set, when ``arr`` is a view
    of a file mapped by :func:`map_file` (a no-op otherwise).  Neighbouring tensors that share a
    boundary page stay valid: a dropped page of a read-only file mapping is read back on access."""
    mm = _mapping(arr) if isinstance(arr, np.ndarray) else None
    if mm is None or not hasattr(mm, "madvise") or arr.size == 0 or not arr.flags.c_contiguous:
        return
    start_addr = arr.__array_interface__["data"][0]
    base_addr = np.frombuffer(mm, np.uint8).__array_interface__["data"][0]
    lo = start_addr - base_addr
    hi = lo + arr.nbytes
    lo = -(-lo // _PAGE) * _PAGE                     # whole pages inside [lo, hi)
    hi = hi // _PAGE * _PAGE
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
