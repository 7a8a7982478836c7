"""safetensors files: memory-mapped reading (bfloat16 included) and atomic writing.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw bytes.  Reading maps the file (``np.memmap``) and hands out views,
so a float32 checkpoint loaded for float32 compute costs no copy.  NumPy has no bfloat16: those
tensors are widened to float32 (bfloat16 is the top half of a float32).

Writing goes through the ``safetensors`` package.  Every header and byte range is checked, and a
truncated or corrupted file raises :class:`refopt.errors.CheckpointError` naming the file and
tensor.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from refopt.errors import CheckpointError
from refopt.io import stored

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bfloat16 is a truncated float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounding to nearest even (NaN kept NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    # in 32 bits: the sum wraps only for bit patterns above 0xFFFF7FFF, which are NaNs (set below)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    rounded[np.isnan(x)] = 0x7FC0
    return rounded


def read_header(path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: corrupted safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_start = 8 + n
    data_size = size - data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        count = int(np.prod(shape, dtype=np.int64))
        width = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != count * width:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype}{list(shape)}) lies outside the file or has the "
                f"wrong byte length (bytes {begin}..{end} of {data_size}): the file is truncated or corrupted")
    return header, data_start


def load(path, names=None, raw_bfloat16=False) -> dict[str, np.ndarray]:
    """Memory-mapped tensors of a safetensors file (all, or those in ``names``).  bfloat16 tensors
    are returned as float32 (a copy), or with ``raw_bfloat16`` as views of dtype
    :data:`refopt.io.stored.BFLOAT16`; every other dtype as a read-only view of the file."""
    path = os.fspath(path)
    header, start = read_header(path)
    out = {}
    if os.path.getsize(path) == start:
        mm = np.zeros(0, np.uint8)
    else:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__" or (names is not None and name not in names):
            continue
        begin, end = info["data_offsets"]
        raw = mm[start + begin:start + end]
        arr = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = arr.view(stored.BFLOAT16) if raw_bfloat16 else bfloat16_to_float32(arr)
        out[name] = arr
    return out


def save(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors with the safetensors package into a temporary file renamed over ``path``: a
    failure leaves nothing half-written, and arrays still mapped from an old ``path`` stay valid."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
