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

The NumPy reference path sees a QuantizedMatrix through ``__array__`` (the dequantised float32
matrix), ``.T`` and row indexing, so the reference ops need no change; the Numba kernels read
``data`` directly (:mod:`refopt.kernels.cpu.matmul`).
"""

from __future__ import annotations

import numpy as np

from refopt.errors import ConfigError
from refopt.io.safetensors_io import bfloat16_to_float32, float32_to_bfloat16

WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "int8")


class QuantizedMatrix:
    """A float32 matrix stored in ``kind`` (``"float16"``, ``"bfloat16"`` or ``"int8"``)."""

    def __init__(self, data, kind, scale=None):
        self.data = data              # [out, in]: uint16 (bfloat16 bits), float16 or int8
        self.kind = kind
        self.scale = scale            # [out] float32 for int8, else None

    @classmethod
    def quantize(cls, a, kind: str) -> "QuantizedMatrix":
        rows = np.ascontiguousarray(a, dtype=np.float32)
        if kind == "bfloat16":
            return cls(float32_to_bfloat16(rows), kind)
        if kind == "float16":
            return cls(rows.astype(np.float16), kind)
        if kind == "int8":
            scale = np.abs(rows).max(axis=1) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
            return cls(q, kind, scale)
        raise ConfigError(f"weights_dtype={kind!r}: expected one of {WEIGHT_DTYPES}")

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
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)

    @property
    def T(self):
        return np.asarray(self).T

    def __getitem__(self, index):
        return self.rows_float32(index)         # rows: the embedding lookup of token ids

    def __matmul__(self, other):
        return np.asarray(self) @ other

    def __rmatmul__(self, other):
        return other @ np.asarray(self)


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
