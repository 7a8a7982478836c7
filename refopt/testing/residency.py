"""A memory-mapped checkpoint's pages dropped from this process's resident set between uses.

A port that loads a checkpoint by mapping its files (transformers does, for safetensors) holds
the weights as pages of those files: once read they count in the process's resident memory as
long as the mapping lives, a 125m checkpoint's 478 MiB through the whole conform, while refopt's
float64 reference is reading the same files a layer at a time.  Between the port's passes the
oracle tells the kernel it no longer needs them (``madvise(MADV_DONTNEED)``): the pages leave the
resident set but stay in the page cache, and the port's next pass maps them again from there
(a minor fault per page, a few milliseconds per 100 MiB).

Only clean pages are dropped.  A private mapping's pages that something wrote to (the kernel's
private copies, ``Anonymous`` in ``/proc/self/smaps``) would go back to the file's contents, so a
mapping holding any is left as it is, whole.  Linux only; elsewhere nothing is released.
"""

from __future__ import annotations

import os
from pathlib import Path

MADV_DONTNEED = 4
_SMAPS = "/proc/self/smaps"


def mapped_files(folder) -> frozenset:
    """The real paths of the regular files directly in ``folder`` (a checkpoint's weight files,
    whatever their format), as ``/proc/self/smaps`` names the mappings of them."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return frozenset()
    return frozenset(os.path.realpath(p) for p in entries if p.is_file())


def file_mappings(paths) -> list:
    """``[(start, end, rss_bytes, anonymous_bytes)]`` of this process's mappings of ``paths``."""
    paths = frozenset(paths)
    found, current = [], None
    try:
        with open(_SMAPS, encoding="utf-8", errors="replace") as f:
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:   # a mapping's first line
                    current = None
                    if len(head) == 6 and head[5].rstrip("\n") in paths:
                        start, end = (int(x, 16) for x in head[0].split("-"))
                        current = [start, end, 0, 0]
                        found.append(current)
                elif current is not None and head[0] in ("Rss:", "Anonymous:"):
                    current[2 if head[0] == "Rss:" else 3] = int(head[1]) * 1024
    except OSError:
        return []
    return [tuple(m) for m in found]


class Pages:
    """The pages of this process's mappings of ``paths`` (a checkpoint's files).

    :meth:`check` finds the mappings and keeps those that hold no private copies; :meth:`drop`
    drops their resident pages, as often as needed while nothing can have written to them since
    the check (the port's own forward or backward pass, which reads its weights); :meth:`release`
    is both.  Linux only: elsewhere nothing is found and nothing dropped."""

    def __init__(self, paths):
        self.paths = frozenset(paths)
        self._ranges: list = []
        self._madvise = None

    def check(self) -> int:
        """How many mappings :meth:`drop` will drop (found now, holding no private copies)."""
        self._ranges = [(start, end) for start, end, _, anonymous in file_mappings(self.paths)
                        if not anonymous]
        return len(self._ranges)

    def drop(self) -> int:
        """``madvise(MADV_DONTNEED)`` over the mappings found by the last :meth:`check`; returns how
        many were dropped."""
        if not self._ranges:
            return 0
        if self._madvise is None:
            import ctypes

            try:
                madvise = ctypes.CDLL(None, use_errno=True).madvise
            except (OSError, AttributeError):
                self._ranges = []
                return 0
            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            madvise.restype = ctypes.c_int
            self._madvise = madvise
        return sum(self._madvise(start, end - start, MADV_DONTNEED) == 0 for start, end in self._ranges)

    def release(self) -> int:
        self.check()
        return self.drop()
