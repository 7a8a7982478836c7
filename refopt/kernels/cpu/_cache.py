"""Numba's on-disk cache of this package's kernels, kept fresh when *any* of their modules changes.

Numba stamps a cached kernel with the source of the one file that defines it, and loads it again
while that file is unchanged.  But a kernel's machine code also holds what it calls and inlines
from other files: :func:`.matmul.product` compiles in :mod:`.int8`'s tiles, the fused decode step
(:mod:`.decode`) nearly every module here.  Edit :mod:`.int8` alone and Numba kept serving the old
``product`` and decode step from the cache -- the tests then passed on code that no longer existed
(seen in session 17: the edited int8 tiles ran in ``int8.int_dots``, compiled afresh, and not in
``matmul.product``, loaded as before, until the cache was deleted by hand).  A learner who edits a
kernel to see what happens meets the same silence.

:func:`install` (run when this module is imported, first thing in the package) puts a locator
in front of each of Numba's file-backed ones that stamps every kernel of this package with the
contents of all the package's modules (their SHA-256, as Numba hashes one file); one edit anywhere
here makes every kernel here compile again.  Where the cache
lives is Numba's choice as before (``NUMBA_CACHE_DIR``, the package's ``__pycache__``, or the
user-wide directory); functions outside this package keep Numba's own locators.
"""

from __future__ import annotations

import functools
import hashlib
import os

from numba.core import caching

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def _digest(path: str, mtime_ns: int, size: int) -> bytes:
    # keyed by the file's time and size, so a file changed while the process runs is hashed again
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def package_stamp() -> tuple:
    """(module name, SHA-256 of its source) for every module of the package, sorted."""
    stamp = []
    for name in sorted(os.listdir(HERE)):
        if name.endswith(".py"):
            path = os.path.join(HERE, name)
            st = os.stat(path)
            stamp.append((name, _digest(path, st.st_mtime_ns, st.st_size)))
    return tuple(stamp)


def _package_locator(base):
    class Locator(base):
        refopt_package_stamp = True

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != HERE:
                return None                  # not one of ours: Numba's own locators decide
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return super().get_source_stamp(), package_stamp()

    Locator.__name__ = Locator.__qualname__ = "Package" + base.__name__
    return Locator


def install() -> None:
    """Put the package-stamped locators first in Numba's list (once; before any kernel of this
    package is decorated, since Numba picks a function's locator when it is decorated)."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl      # named so from 0.68
    classes = impl._locator_classes
    if any(getattr(c, "refopt_package_stamp", False) for c in classes):
        return
    mine = [_package_locator(c) for c in classes
            if issubclass(c, caching._SourceFileBackedLocatorMixin)]
    classes[:0] = mine


install()
