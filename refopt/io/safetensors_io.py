"""safetensors files, validated exactly as the specification and the official package do.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of a UTF-8 JSON header naming
each tensor's dtype, shape and byte range (``data_offsets``, relative to the data region), then the
data region.  :func:`parse_header` accepts a header only when the ``safetensors`` package
(``safe_open``) does -- the same limits, the same JSON subset (serde_json's: no ``NaN``, no lone
surrogates, numbers in its range, nesting under 128 levels), the same types (a tensor entry is an
object or a 3-element array; a dtype is a name or ``{"NAME": null}``; shapes and offsets are
unsigned 64-bit integers without a fraction or exponent), offsets that tile the data region from
byte 0 to its end without a gap or overlap (in offset order), byte counts that match dtype x shape
with no overflow, and a file exactly as long as header and data.  Where the specification is
stricter than the package refopt follows the specification: the header must begin with ``{`` and
no key may appear twice in an object (the package keeps the last of two equal keys).
``tests/test_safetensors_differential.py`` checks this against the package over mutated files.

:class:`SafetensorsFile` opens a file (regular files only, never blocking), validates the header and
maps tensors lazily: :meth:`SafetensorsFile.array` returns a read-only view of one tensor's bytes
(its own memory map, released with the array).  NumPy has no bfloat16: :meth:`~SafetensorsFile.tensor`
widens those to float32.  :func:`write` streams a file out through any binary file object (the
header first, then each tensor's bytes), laid out as the package lays it out.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np

from refopt.errors import CheckpointError, InputTypeError
from refopt.io import files

MAX_HEADER_BYTES = 100_000_000           # the package's MAX_HEADER_SIZE
_MAX_DEPTH = 127                         # serde_json refuses the 128th nested level
_U64 = 2**64 - 1

# dtype -> bits per element (the package's Dtype::bitsize).
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
        "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
        "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
        "U64": 64}
# dtype -> the NumPy dtype of its stored bytes (BF16 as raw uint16 bit patterns).
NUMPY = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
         "BF16": "<u2", "I32": "<i4", "U32": "<u4", "F32": "<f4", "C64": "<c8", "F64": "<f8",
         "I64": "<i8", "U64": "<u8"}
FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_WRITE_CODES = {np.dtype(v).newbyteorder("<"): k for k, v in NUMPY.items() if k != "BF16"}
_POW10 = [float(f"1e{i}") for i in range(309)]
_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([-+]?)(\d+))?")


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bfloat16 is a truncated float32)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounding to nearest even (NaN kept NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    # in 32 bits: the sum wraps only for bit patterns above 0xFFFF7FFF, which are NaNs (set below)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    rounded[np.isnan(x)] = 0x7FC0
    return rounded


# ----------------------------------------------------------------------------------- header
class _Refused(ValueError):
    """A header the package refuses (the message says why)."""


def _overflows(value: int, digit: int, limit: int) -> bool:
    return value >= limit // 10 and (value > limit // 10 or digit > limit % 10)


def _f64_from_parts(positive: bool, significand: int, exponent: int) -> float:
    f = float(significand)
    while True:
        index = abs(exponent) if exponent != -2**31 else 2**31
        if index < len(_POW10):
            if exponent >= 0:
                f *= _POW10[index]
                if f == float("inf"):
                    raise _Refused("number out of range")
            else:
                f /= _POW10[index]
            break
        if f == 0.0:
            break
        if exponent >= 0:
            raise _Refused("number out of range")
        f /= 1e308
        exponent += 308
    return f if positive else -f


def _serde_number(text: str):
    """A JSON number as serde_json 1.0 reads it (without ``float_roundtrip``): an ``int`` for
    what it keeps as u64 / i64, a ``float`` otherwise; :class:`_Refused` when out of range."""
    sign, whole, fraction, exp_sign, exp_digits = _NUMBER.fullmatch(text).groups()
    positive = not sign
    significand, exponent, long = 0, 0, False
    for c in whole:
        if long or _overflows(significand, int(c), _U64):
            long = True
            exponent += 1
        else:
            significand = significand * 10 + int(c)
    if fraction is None and exp_digits is None and not long:
        if positive:
            return significand
        return -float(significand) if significand == 0 or significand > 2**63 else -significand
    if fraction is not None:
        for c in fraction:
            if _overflows(significand, int(c), _U64):
                break
            significand = significand * 10 + int(c)
            exponent -= 1
    if exp_digits is not None:
        e = 0
        for c in exp_digits:
            if _overflows(e, int(c), 2**31 - 1):
                if significand != 0 and exp_sign != "-":
                    raise _Refused("number out of range")
                return 0.0 if positive else -0.0
            e = e * 10 + int(c)
        exponent = max(-2**31, min(2**31 - 1, exponent - e if exp_sign == "-" else exponent + e))
    return _f64_from_parts(positive, significand, exponent)


def _check_strings_and_depth(value) -> None:
    """serde_json's limits the ``json`` module lacks: no lone surrogates, < 128 levels."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > _MAX_DEPTH:
                raise _Refused("recursion limit exceeded")
            children = item.items() if isinstance(item, dict) else ((None, v) for v in item)
            for key, child in children:
                for text in (key, child):
                    if isinstance(text, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
                        raise _Refused("lone surrogate in a \\u escape")
                if isinstance(child, (dict, list)):
                    stack.append((child, depth + 1))


def _u64(value, what):
    if type(value) is not int or not 0 <= value <= _U64:
        raise _Refused(f"{what} is {value!r}, expected an unsigned 64-bit integer")
    return value


def _dtype(value, name):
    if isinstance(value, dict):                   # serde's externally tagged unit variant
        if len(value) != 1:
            raise _Refused(f"tensor {name!r}: dtype {value!r} is not a map with a single key")
        (value, unit), = value.items()
        if unit is not None:
            raise _Refused(f"tensor {name!r}: dtype {{{value!r}: {unit!r}}} must map to null")
    if not isinstance(value, str) or value not in BITS:
        raise _Refused(f"tensor {name!r}: unknown dtype {value!r} (expected one of {sorted(BITS)})")
    return value


def _entry(name, info):
    """(dtype, shape, (begin, end)) of one tensor entry, typed as the package types it."""
    if isinstance(info, list):                    # serde reads a struct from a sequence too
        if len(info) != 3:
            raise _Refused(f"tensor {name!r}: an array entry needs 3 elements, has {len(info)}")
        dtype, shape, offsets = info
    elif isinstance(info, dict):
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise _Refused(f"tensor {name!r}: missing field {missing[0]!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    else:
        raise _Refused(f"tensor {name!r}: entry is {type(info).__name__}, expected an object")
    dtype = _dtype(dtype, name)
    if not isinstance(shape, list):
        raise _Refused(f"tensor {name!r}: shape is {shape!r}, expected an array")
    shape = tuple(_u64(d, f"tensor {name!r}: a shape entry") for d in shape)
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise _Refused(f"tensor {name!r}: data_offsets is {offsets!r}, expected [begin, end]")
    begin, end = (_u64(o, f"tensor {name!r}: a data offset") for o in offsets)
    return dtype, shape, (begin, end)


def parse_header(raw: bytes, data_size: int) -> tuple[dict, dict | None]:
    """Validate header bytes ``raw`` for a data region of ``data_size`` bytes.

    Returns ``(tensors, metadata)``: ``tensors`` maps name -> (dtype, shape, (begin, end)) in
    offset order, ``metadata`` the ``__metadata__`` strings (or None); raises ``_Refused`` with the reason."""
    if not raw.startswith(b"{"):
        raise _Refused("the header does not begin with '{' (the specification requires it)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Refused(f"invalid UTF-8 in header at byte {e.start}") from None

    def pairs(items):
        out = dict(items)
        if len(out) != len(items):
            raise _Refused("a key appears twice in one object (the specification disallows it)")
        return out

    def constant(name):
        raise _Refused(f"{name} is not JSON")

    try:
        header = json.loads(text, object_pairs_hook=pairs, parse_constant=constant,
                            parse_int=_serde_number, parse_float=_serde_number)
    except json.JSONDecodeError as e:
        raise _Refused(f"invalid JSON in header ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise _Refused("recursion limit exceeded") from None
    _check_strings_and_depth(header)
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _Refused("__metadata__ must be an object of strings")
    entries = sorted(((name, _entry(name, info)) for name, info in header.items()),
                     key=lambda item: item[1][2])              # stable, as the package's sort
    start = 0
    for name, (dtype, shape, (begin, end)) in entries:
        if begin != start or end < begin:
            raise _Refused(f"invalid offset for tensor {name!r} (bytes {begin}..{end}; the data "
                           f"region must be tiled in order from byte {start})")
        start = end
        count = 1
        for d in shape:
            count *= d
            if count > _U64:
                raise _Refused(f"tensor {name!r}: overflow computing its size from shape {list(shape)}")
        bits = count * BITS[dtype]
        if bits > _U64:
            raise _Refused(f"tensor {name!r}: overflow computing its size from shape {list(shape)}")
        if bits % 8:
            raise _Refused(f"tensor {name!r}: {dtype}{list(shape)} does not end on a byte boundary")
        if end - begin != bits // 8:
            raise _Refused(f"tensor {name!r}: {dtype}{list(shape)} needs {bits // 8} bytes, its "
                           f"offsets span {end - begin}")
    if start > data_size:
        raise _Refused(f"the tensors need {start:,} bytes of data, the file has {data_size:,}: "
                       "it is truncated or corrupted")
    if start < data_size:
        raise _Refused(f"{data_size - start:,} bytes follow the last tensor's data (the tensors "
                       f"cover {start:,} of {data_size:,}): the file is corrupted")
    return dict(entries), metadata


# ----------------------------------------------------------------------------------- reading
class SafetensorsFile:
    """One validated safetensors file; tensors are read lazily by name.

    Raises :class:`~refopt.errors.FileReadError` when the file cannot be read and
    :class:`~refopt.errors.CheckpointError` naming the file when the package would refuse it."""

    def __init__(self, path):
        self.path = os.fspath(path)
        fd = files.open_regular(self.path, "safetensors file")
        try:
            self.size = os.fstat(fd).st_size
            self._file = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, why):
        raise CheckpointError(f"{self.path}: not a valid safetensors file: {why}") from None

    def _read_header(self):
        if self.size < 8:
            self._fail(f"header too small ({self.size} bytes; the file is truncated)")
        (n,) = struct.unpack("<Q", files.read_fd(self._file.fileno(), 8, self.path))
        if n > MAX_HEADER_BYTES:
            self._fail(f"header too large ({n:,} bytes claimed; the limit is {MAX_HEADER_BYTES:,})")
        if 8 + n > self.size:
            self._fail(f"invalid header length ({n:,} bytes claimed, the file has {self.size:,}): "
                       "the file is truncated or corrupted")
        raw = files.read_fd(self._file.fileno(), n, self.path, "safetensors header")
        if len(raw) != n:
            self._fail("the file shrank while being read")
        try:
            self.tensors, self.metadata = parse_header(raw, self.size - 8 - n)
        except _Refused as e:
            self._fail(str(e))
        self.data_start = 8 + n

    # -- what is in it
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def dtype(self, name) -> str:
        """The stored dtype code (``"F32"``, ``"BF16"`` ...)."""
        return self.tensors[name][0]

    def shape(self, name) -> tuple[int, ...]:
        return self.tensors[name][1]

    # -- reading
    def array(self, name) -> np.ndarray:
        """The stored elements of tensor ``name`` as a read-only NumPy array mapped from the file
        (BF16 as uint16 bit patterns).  Dtypes NumPy cannot hold (F8, F6, F4) are refused."""
        dtype, shape, (begin, end) = self.tensors[name]
        if dtype not in NUMPY:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}, which refopt "
                                  "cannot read (it reads F16, BF16, F32, F64 and integer tensors)")
        try:
            if end == begin:
                return np.zeros(shape, NUMPY[dtype])
            return np.memmap(self._file, dtype=NUMPY[dtype], mode="r",
                             offset=self.data_start + begin, shape=shape)
        except (ValueError, OSError, OverflowError, MemoryError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({dtype}{list(shape)}) cannot be "
                                  f"mapped ({e})") from None

    def tensor(self, name) -> np.ndarray:
        """:meth:`array`, with bfloat16 widened to float32 (a copy; every other dtype a view)."""
        arr = self.array(name)
        return bfloat16_to_float32(arr) if self.tensors[name][0] == "BF16" else arr

    def close(self) -> None:
        self._file.close()              # arrays already mapped stay valid

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path, names=None) -> dict[str, np.ndarray]:
    """Every tensor of a validated file (or those in ``names``), memory-mapped; bfloat16 as
    float32."""
    with SafetensorsFile(path) as f:
        return {k: f.tensor(k) for k in f.keys() if names is None or k in names}


# ----------------------------------------------------------------------------------- writing
def _code(arr: np.ndarray, name) -> str:
    try:
        return _WRITE_CODES[arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype]
    except KeyError:
        raise InputTypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors "
                             "by refopt") from None


def layout(tensors: dict, metadata: dict | None = None) -> tuple[bytes, list]:
    """``(header bytes with its 8-byte length, [(name, array), ...] in data order)``: the layout
    the package writes (largest dtype first, then by name; header padded with spaces to 8 bytes)."""
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise InputTypeError("safetensors metadata must map strings to strings")
    arrays = []
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise InputTypeError(f"tensor name {name!r}: expected a string other than '__metadata__'")
        arrays.append((name, np.asarray(value)))
    arrays.sort(key=lambda item: (-item[1].dtype.itemsize, item[0]))
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, arr in arrays:
        header[name] = {"dtype": _code(arr, name), "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, arrays


def write(out, tensors: dict, metadata: dict | None = None, chunk_bytes: int = 64 * 2**20) -> None:
    """Write a safetensors file to the binary file object ``out`` (header, then each tensor's
    little-endian bytes in chunks, so a large tensor is never copied whole)."""
    head, arrays = layout(tensors, metadata)
    out.write(head)
    for _, arr in arrays:
        flat = np.ascontiguousarray(arr).reshape(-1)
        if flat.dtype.byteorder == ">":
            flat = flat.astype(flat.dtype.newbyteorder("<"))
        step = max(1, chunk_bytes // max(flat.itemsize, 1))
        for start in range(0, flat.size, step):
            out.write(flat[start:start + step].tobytes())


def save(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write one safetensors file at ``path`` (through a temporary name in the same directory and
    a rename, so a reader never sees half a file; arrays still mapped from an old ``path`` stay
    valid).  Presets are saved with :mod:`refopt.io.saving`, which also protects the directory."""
    from refopt.io import saving

    saving.write_file_atomically(path, lambda f: write(f, tensors, metadata))
