"""Embedding gather and its backward, the scatter-add (parallel over columns, so no two threads
write the same element; rows are added in token order, as ``np.add.at`` does)."""

import numpy as np
from numba import njit, prange


_PARALLEL_ROWS = 256  # below this many rows, waking the thread pool costs more than it saves


@njit(parallel=True, cache=True)
def _gather(table, ids, out):
    # table [V, E], ids [N] -> out [N, E]
    for n in prange(ids.shape[0]):
        out[n] = table[ids[n]]


@njit(parallel=True, cache=True)
def _scatter_add(d_out, ids, d_table, chunk):
    # d_table[ids[n]] += d_out[n], threads split the E columns
    N, E = d_out.shape
    for c in prange((E + chunk - 1) // chunk):
        e0 = c * chunk
        e1 = min(E, e0 + chunk)
        for n in range(N):
            r = ids[n]
            for e in range(e0, e1):
                d_table[r, e] += d_out[n, e]


def embedding_forward(table, ids):
    # table [V, E] (float or QuantizedMatrix), ids [B, S] -> [B, S, E]
    from refopt.quant import QuantizedMatrix

    ids = np.asarray(ids)
    if isinstance(table, QuantizedMatrix) or ids.size < _PARALLEL_ROWS:
        return table[ids]                  # a few rows: NumPy's take costs less than a parallel launch
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty((flat.shape[0], table.shape[1]), table.dtype)
    _gather(table, flat, out)
    return out.reshape(ids.shape + (table.shape[1],))


def embedding_backward(d_out, ids, num_rows):
    # d_out [B, S, E], ids [B, S] -> d_table [num_rows, E]
    E = d_out.shape[-1]
    d_table = np.zeros((num_rows, E), d_out.dtype)
    _scatter_add(np.ascontiguousarray(d_out).reshape(-1, E),
                 np.ascontiguousarray(ids, dtype=np.int64).reshape(-1), d_table, 32)
    return d_table
