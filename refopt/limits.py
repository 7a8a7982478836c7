"""Bounds on what a caller can make refopt allocate.

Sizes a caller chooses (a config's widths, ``num_beams``, batch x length, ``max_length``) are
checked before the arrays they imply are made: :func:`check_allocation` refuses, with a refopt
error naming the argument, a request larger than the memory this machine has available, instead
of letting NumPy fail with ``MemoryError`` -- or the kernel kill the process -- part-way.
"""

from __future__ import annotations

import os

from refopt.errors import InputError

# Never refuse less than this (a small request on a machine reporting little free memory).
FLOOR_BYTES = 256 * 2**20


def available_memory() -> int:
    """Bytes of memory available to this process now (``MemAvailable``; the physical memory
    when that is unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def check_allocation(nbytes: int, what: str, error=InputError) -> None:
    """Raise ``error`` when ``nbytes`` (for ``what``, e.g. ``"num_beams=64 x batch 8 x ..."``)
    exceeds the memory available now."""
    if nbytes <= FLOOR_BYTES:
        return
    free = available_memory()
    if nbytes > free:
        raise error(f"{what} needs {nbytes / 2**30:,.2f} GiB, more than the "
                    f"{free / 2**30:,.2f} GiB of memory available")
