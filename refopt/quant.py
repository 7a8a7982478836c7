"""Weights stored in fewer bytes: float16, bfloat16, and int8 with per-output-channel scales.

Decoding one token reads every weight once, so its speed is bounded by memory bandwidth: weights in
two bytes (bfloat16, float16) or one (int8) make it up to two or four times faster.

A :class:`QuantizedMatrix` stands for a float32 matrix ``A [out, in]`` -- a weight, or the token
table ``[V, E]`` -- stored row by row: ``data[o]`` holds everything output ``o`` reads, so
``x @ A.T`` is one dot product per output over a contiguous row.  Row ``v`` of the token table is
both the embedding of token ``v`` and the tied LM head's output channel ``v``.

int8 uses symmetric per-row quantisation: ``scale[o] = max|A_o| / 127``, ``data = round(A_o /
scale[o])`` in ``[-127, 127]``; the value represented is ``data * scale``.  bfloat16 rounds to
nearest even; float16 uses NumPy's conversion.

Loading converts a checkpoint tensor by tensor (:func:`load_params`): a matrix already stored in
the requested dtype is wrapped without a copy (a memory-mapped float16 file stays mapped), any
other is converted in blocks of rows and its file pages released before the next, so the peak is
the result plus one block.  ``weights_dtype="auto"`` keeps each matrix in the dtype the checkpoint
stores it in (transformers' ``torch_dtype="auto"``).

**Activations in int8** (``activations="int8"``, int8 weights only; CTranslate2's int8 compute):
a product's activations are quantised too, per row, dynamically and symmetrically, and multiplied
with the int8 weights in integers (:func:`int8_matmul`; the Numba kernel is
:mod:`refopt.kernels.cpu.int8`, VNNI ``vpdpbusd``).  The integer sums are exact, so only the
activations' rounding (at most half of ``max|x| / 127`` per element) separates it from the
default int8 path, which widens int8 weights to float32 inside a float32 product and never rounds
the activations.  Opt in only where that rounding is acceptable: OPT models from 6.7b on carry
activation outliers (LLM.int8(), Dettmers et al. 2022) that per-row int8 rounds the rest of the row
against.

The NumPy reference path sees a QuantizedMatrix through ``__array__`` (the dequantised float32
matrix), ``.T`` and row indexing, so the reference ops need no change; the Numba kernels read
``data`` directly (:mod:`refopt.kernels.cpu.matmul`).
"""

from __future__ import annotations

import numpy as np

from refopt.errors import CheckpointError, ConfigError
from refopt.io import stored
from refopt.io.safetensors_io import bfloat16_to_float32, float32_to_bfloat16

WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "int8")
ACTIVATIONS = (None, "int8")  # None: products in the compute dtype; "int8": see int8_matmul
AUTO = "auto"                 # each matrix in the dtype the checkpoint stores it in
_BLOCK_BYTES = 16 << 20       # rows converted at a time (float32 bytes), bounding the extra memory
_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}


class QuantizedMatrix:
    """A float32 matrix stored in ``kind`` (``"float16"``, ``"bfloat16"`` or ``"int8"``)."""

    def __init__(self, data, kind, scale=None, activations=None):
        self.data = data              # [out, in]: uint16 (bfloat16 bits), float16 or int8
        self.kind = kind
        self.scale = scale            # [out] float32 for int8, else None
        self.activations = activations  # "int8": products quantise the activations (int8_matmul)
        self._row_sums = None

    def with_activations(self, activations) -> "QuantizedMatrix":
        """This matrix (sharing its data) with products that quantise the activations
        (``"int8"``, int8 weights only) or not (``None``)."""
        if activations not in ACTIVATIONS:
            raise ConfigError(f"activations={activations!r}: expected one of {ACTIVATIONS}")
        if activations is not None and self.kind != "int8":
            raise ConfigError(f"activations={activations!r} needs int8 weights (these are {self.kind})")
        return QuantizedMatrix(self.data, self.kind, self.scale, activations)

    def row_sums(self) -> np.ndarray:
        """``data.sum(axis=1)`` as int64 ``[out]`` (computed once): the kernel's correction for its
        unsigned activations (:mod:`refopt.kernels.cpu.int8`)."""
        if self._row_sums is None:
            self._row_sums = self.data.sum(axis=1, dtype=np.int64)
        return self._row_sums

    @classmethod
    def quantize(cls, a, kind: str) -> "QuantizedMatrix":
        """``a`` (float32 rows; or a stored checkpoint matrix, converted in blocks of rows so the
        extra memory is one block) stored as ``kind``.  A contiguous matrix already stored as
        ``kind`` is wrapped as it is, without a copy."""
        if kind not in WEIGHT_DTYPES[1:]:
            raise ConfigError(f"weights_dtype={kind!r}: expected one of {WEIGHT_DTYPES}")
        a_dtype = stored.stored_dtype_name(a)
        if a_dtype == kind and a.ndim == 2 and a.flags.c_contiguous:
            return cls(stored.bits(a) if kind == "bfloat16" else a, kind)
        if getattr(a, "ndim", 0) != 2 or a.shape[0] * a.shape[1] * 4 <= _BLOCK_BYTES:
            a = a if isinstance(a, np.ndarray) else np.asarray(a)
            wide = stored.widen(a)
            return cls._quantize_rows(wide, kind, scratch=wide is not a)
        data = np.empty(a.shape, _STORAGE[kind])
        scale = np.empty(a.shape[0], np.float32) if kind == "int8" else None
        step = max(1, _BLOCK_BYTES // (4 * a.shape[1]))
        for i in range(0, a.shape[0], step):
            block = a[i:i + step]
            wide = stored.widen(block)
            q = cls._quantize_rows(wide, kind, scratch=wide is not block)
            data[i:i + step] = q.data
            if scale is not None:
                scale[i:i + step] = q.scale
            stored.release(block)            # this block's file pages, if ``a`` is mapped
        return cls(data, kind, scale)

    @classmethod
    def _quantize_rows(cls, a, kind, scratch=False):
        # ``scratch``: ``a`` is a temporary this call may overwrite
        rows = np.ascontiguousarray(a, dtype=np.float32)
        if kind == "bfloat16":
            return cls(float32_to_bfloat16(rows), kind)
        if kind == "float16":
            return cls(rows.astype(np.float16), kind)
        if kind == "int8":
            scale = np.maximum(rows.max(axis=1), -rows.min(axis=1)) / 127.0        # max |row| / 127
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            work = rows if scratch or not np.may_share_memory(rows, a) else rows.copy()
            np.divide(work, scale[:, None], out=work)          # in place: one block of temporaries
            np.rint(work, out=work)
            np.clip(work, -127, 127, out=work)
            return cls(work.astype(np.int8), kind, scale)
        raise ConfigError(f"weights_dtype={kind!r}: expected one of {WEIGHT_DTYPES}")  # pragma: no cover

    # ------------------------------------------------------------------ the logical matrix
    def rows_float32(self, index=slice(None)) -> np.ndarray:
        """Dequantised stored rows ``data[index]`` as float32."""
        d = self.data[index]
        if self.kind == "bfloat16":
            return bfloat16_to_float32(d)
        if self.kind == "float16":
            return d.astype(np.float32)
        return d.astype(np.float32) * self.scale[index][..., None]

    def __array__(self, dtype=None, copy=None):
        a = self.rows_float32()
        return a if dtype is None else a.astype(dtype)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def size(self):
        return self.data.size

    @property
    def nbytes(self):
        # with int8 activations, the row sums the kernel reads too (8 bytes per row)
        return (self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)
                + (8 * self.shape[0] if self.activations == "int8" else 0))

    @property
    def T(self):
        return _Int8Transposed(self) if self.activations == "int8" else np.asarray(self).T

    def __getitem__(self, index):
        return self.rows_float32(index)         # rows: the embedding lookup of token ids

    def __matmul__(self, other):
        return np.asarray(self) @ other

    def __rmatmul__(self, other):
        return other @ np.asarray(self)


class _Int8Transposed:
    """``m.T`` of a matrix with ``activations="int8"``: ``x @ m.T`` is :func:`int8_matmul`, so the
    reference ops' ``x @ w.T`` needs no change (``__array_ufunc__ = None`` makes NumPy hand the
    product to ``__rmatmul__``)."""

    __array_ufunc__ = None

    def __init__(self, m):
        self.m = m
        self.shape = m.shape[::-1]

    def __rmatmul__(self, x):
        return int8_matmul(x, self.m)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.m, dtype).T


def quantize_activations(x):
    """Rows of activations ``x [N, I]`` (float32) in int8: ``scale = max|x_row| / 127`` and ``q =
    clip(rint(x / scale), -127, 127)``, so ``q * scale`` is ``x`` to within ``scale / 2``.  A row of
    zeros (or so small that ``scale`` underflows to 0) gives zeros; a row holding inf or NaN gives
    zeros with ``scale = NaN``, so every output of that row is NaN.  -> ``(q [N, I] int8, scale [N]
    float32)``"""
    amax = np.abs(x).max(axis=1)                                       # [N]; NaN if one is
    scale = (amax / np.float32(127)).astype(np.float32)                # [N]
    scale[~np.isfinite(scale)] = np.nan                                # inf -> NaN too
    ok = scale > 0                                                     # neither zero nor NaN
    q = np.zeros(x.shape, np.int8)                                     # [N, I]
    q[ok] = np.clip(np.rint(x[ok] / scale[ok, None]), -127, 127)
    return q, scale


def int8_matmul(x, m):
    """``x [..., I] @ m.T`` for int8 weights ``m [O, I]`` with activations quantised per row
    (:func:`quantize_activations`): the products of integers, summed exactly, then scaled.
    -> ``[..., O]`` float32"""
    I = x.shape[-1]
    q, sx = quantize_activations(np.asarray(x, np.float32).reshape(-1, I))   # [N, I], [N]
    # sum_i q_i w_i exactly: float64 holds every integer below 2^53, and these sums stay below
    # 127 * 127 * I (BLAS-fast, and exact in any order of summation)
    acc = q.astype(np.float64) @ m.data.astype(np.float64).T            # [N, O] integers
    y = acc.astype(np.float32) * sx[:, None] * m.scale                 # [N, O]
    return y.reshape(x.shape[:-1] + (m.shape[0],))


def set_activations(params: dict, activations) -> dict:
    """``params`` with every int8 matrix's products quantising the activations (``"int8"``) or
    not (``None``); the data is shared.  ``"int8"`` needs int8 weights."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations={activations!r}: expected one of {ACTIVATIONS}")
    matrices = [v for v in params.values() if isinstance(v, QuantizedMatrix)]
    if activations is not None and (not matrices or any(v.kind != "int8" for v in matrices)):
        raise ConfigError(f"activations={activations!r} needs weights_dtype='int8'")
    return {k: v.with_activations(activations) if isinstance(v, QuantizedMatrix) else v
            for k, v in params.items()}


def quantizable(name: str) -> bool:
    """Whether a parameter is stored quantised: the weights and the token table.  LayerNorm
    parameters, biases and positions stay float32: they are small."""
    return name == "embed_tokens" or name.endswith(".weight")


def quantize_params(params: dict, weights_dtype: str) -> dict:
    """``params`` with every matrix stored as ``weights_dtype`` (``"float32"``: unchanged)."""
    if weights_dtype in (None, "float32"):
        return params
    if weights_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weights_dtype={weights_dtype!r}: expected one of {WEIGHT_DTYPES}")
    return {name: QuantizedMatrix.quantize(value, weights_dtype) if quantizable(name) else value
            for name, value in params.items()}


def matrices_stored_dtype(params: dict) -> str:
    """The dtype a checkpoint stores its matrices in (the most common one, by parameter count)."""
    count: dict[str, int] = {}
    for name, value in params.items():
        if quantizable(name):
            d = stored.stored_dtype_name(value)
            count[d] = count.get(d, 0) + int(np.prod(value.shape))
    return max(count, key=count.get) if count else "float32"


def resolve_weights_dtype(weights_dtype, params: dict, compute_dtype: str) -> str:
    """``weights_dtype`` as one of :data:`WEIGHT_DTYPES`: ``None`` is float32 (every weight widened
    to the compute dtype), ``"auto"`` the dtype the checkpoint stores its matrices in (float16 and
    bfloat16 kept, anything else float32)."""
    if weights_dtype is None:
        return "float32"
    if weights_dtype == AUTO:
        kind = matrices_stored_dtype(params)
        kind = kind if kind in ("float16", "bfloat16") else "float32"
        return "float32" if compute_dtype == "float64" and kind != "float32" else kind
    if weights_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weights_dtype={weights_dtype!r}: expected 'auto' or one of {WEIGHT_DTYPES}")
    if weights_dtype != "float32" and compute_dtype != "float32":
        raise ConfigError(f"weights_dtype={weights_dtype!r} needs the float32 compute dtype (got {compute_dtype})")
    return weights_dtype


def load_params(params: dict, compute_dtype: str, weights_dtype: str, source: str = "checkpoint") -> dict:
    """Checkpoint tensors (in their stored dtypes, possibly mapped from a file) -> the model's
    parameters, one tensor at a time: matrices as ``weights_dtype`` (float32: widened to the
    compute dtype), everything else widened to the compute dtype.  A matrix stored in
    ``weights_dtype`` is used in place; every other tensor's file pages are released once it is
    converted, so the peak memory is the result plus one tensor (one block of rows)."""
    dtype = np.dtype(compute_dtype)
    out = {}
    for name, value in params.items():
        if not (stored.is_bfloat16(value) or np.issubdtype(value.dtype, np.floating)):
            raise CheckpointError(f"{source}: tensor {name} has dtype {value.dtype}, expected floats")
        if weights_dtype != "float32" and quantizable(name) and value.ndim == 2:
            out[name] = QuantizedMatrix.quantize(value, weights_dtype)
            kept = out[name].data
        else:
            out[name] = kept = np.ascontiguousarray(stored.widen(value, dtype))
        if not np.may_share_memory(kept, value):
            stored.release(value)
    return out
