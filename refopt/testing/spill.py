"""Gradients handed over one tensor at a time: :class:`GradientSpill`.

A port's backward produces every parameter gradient before the oracle compares the first one, so
holding them as arrays costs the model's size again (a 125m float32 model: 478 MiB; 1.3b: 5 GB).
An adapter can instead put each gradient into a :class:`GradientSpill` as soon as its backward has
produced it and free its own copy (PyTorch: a post-accumulate-grad hook per parameter, see
:class:`refopt.testing.adapters.transformers.TransformersAdapter`).  The spill keeps the bytes in
an unlinked temporary file -- on disk, not in the process's memory, and gone with the process
whatever happens to it -- and reads a gradient back each time it is looked up, so the comparison,
which walks the gradients block by block, holds one block at a time.

It is a read-only mapping ``name -> array`` (a fresh array on every lookup), which is what
:meth:`refopt.testing.Adapter.loss_and_gradients` may return instead of a dict.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np


class KeyedMapping(Mapping):
    """A read-only mapping whose names are known without reading a value (``self._keys``, a
    collection): membership, iteration and length never read an array -- ``Mapping``'s own
    ``__contains__`` would look the value up, which here means reading it from disk."""

    _keys: object = ()

    def __contains__(self, name):
        return name in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


class GradientSpill(KeyedMapping):
    """``name -> array``, the arrays kept in an unlinked temporary file in ``directory`` (default:
    the temporary directory, ``TMPDIR``).  :meth:`put` writes one; lookups read it back."""

    def __init__(self, directory: str | None = None):
        self._directory = directory or tempfile.gettempdir()
        try:
            self._file = tempfile.TemporaryFile(dir=directory)
        except OSError as e:
            raise self._error("create", e) from None
        self._index: dict[str, tuple[int, np.dtype, tuple]] = {}
        self._keys = self._index
        self._end = 0

    def put(self, name: str, array) -> None:
        """Store ``array`` (copied to the file: the caller may free it at once)."""
        a = np.asarray(array, order="C")      # (ascontiguousarray would make a 0-d array 1-d)
        self.put_parts(name, a.dtype, a.shape, [a])

    def put_parts(self, name: str, dtype, shape, parts) -> None:
        """Store the array of ``dtype`` and ``shape`` whose rows are the rows of ``parts`` in order
        (an iterable of arrays, e.g. a generator of row blocks: one block is held at a time)."""
        dtype, shape = np.dtype(dtype), tuple(shape)
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        done = 0
        try:
            self._file.seek(self._end)
            for part in parts:
                a = np.asarray(part, dtype=dtype, order="C")
                if done + a.nbytes > nbytes:
                    raise ValueError(f"gradient spill: the parts of {name} exceed its shape {shape}")
                self._file.write(memoryview(a.reshape(-1)).cast("B"))
                done += a.nbytes
        except OSError as e:                  # a full disk, a quota: refopt's error, naming where
            raise self._error(f"write {name} ({nbytes:,} bytes) to", e) from None
        if done != nbytes:
            raise ValueError(f"gradient spill: the parts of {name} hold {done:,} of its {nbytes:,} bytes")
        self._index[name] = (self._end, dtype, shape)
        self._end += nbytes

    def __getitem__(self, name):
        offset, dtype, shape = self._index[name]
        return self._read(name, offset, dtype, shape)

    def shape(self, name) -> tuple:
        """The shape of ``name``, read from the index (no bytes read)."""
        return self._index[name][2]

    def rows(self, name, start: int, stop: int):
        """``self[name][start:stop]``, reading only those rows."""
        offset, dtype, shape = self._index[name]
        if not shape:
            raise IndexError(f"{name} is a scalar")
        start, stop, _ = slice(start, stop).indices(shape[0])
        stop = max(start, stop)
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        return self._read(name, offset + start * row, dtype, (stop - start, *shape[1:]))

    def _error(self, what, e):
        from refopt.errors import RefoptOSError

        return RefoptOSError(f"gradient spill: could not {what} a temporary file in "
                             f"{self._directory} ({e.strerror or e}); free space there or set TMPDIR",
                             e.errno, self._directory)

    def _read(self, name, offset, dtype, shape):
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1)).cast("B")
        try:
            self._file.flush()                 # puts still in the file object's buffer
        except OSError as e:
            raise self._error(f"write {name} to", e) from None
        done = 0
        while done < len(view):                     # preadv may return short counts
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise self._error(f"read {name} back from", OSError("short read"))
            done += n
        return out

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self._end

    def close(self) -> None:
        self._file.close()
