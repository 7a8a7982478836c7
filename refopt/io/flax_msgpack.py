"""``flax_model.msgpack``: the Flax weights of transformers' ``FlaxOPTForCausalLM``, with a small
MessagePack decoder of its own.

Flax serialises a nested dict of arrays with MessagePack (``flax.serialization.to_bytes``): maps of
string keys, each array an extension of type 1 whose payload is itself MessagePack of ``[shape,
dtype name, raw bytes]``; arrays over Flax's chunk size are split into a map
``{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...}, "chunks": {"0": array, ...}}`` of
flat pieces.
The decoder accepts only maps, arrays, strings, binary, integers, floats, booleans, nil and those
extensions, with bounded nesting; raw array bytes are memory-mapped from the file.  Names are mapped
to transformers' PyTorch names (``kernel`` ``[in, out]`` -> ``weight`` transposed, ``scale`` ->
``weight``, ``embedding`` -> ``weight``) so :mod:`refopt.io.huggingface` applies unchanged.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from refopt.errors import CheckpointError
from refopt.io import stored

MAX_NESTING = 64
_NDARRAY, _NPSCALAR = 1, 4
_CHUNKED = "__msgpack_chunked_array__"
_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": stored.BFLOAT16,
           "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8", "uint8": "u1", "bool": "?"}


class _Ext:
    def __init__(self, code, start, end):
        self.code, self.start, self.end = code, start, end


class Decoder:
    """MessagePack over a byte buffer (a mapped file), iteratively, with bounded nesting."""

    def __init__(self, buf, source, start=0, end=None):
        self.buf, self.source = buf, source
        self.pos, self.end = start, buf.shape[0] if end is None else end

    def _fail(self, msg):
        raise CheckpointError(f"{self.source}: {msg} (byte {self.pos})")

    def _take(self, n):
        if n < 0 or self.pos + n > self.end:
            self._fail(f"truncated MessagePack (needs {n} more bytes)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def _uint(self, n):
        return int.from_bytes(bytes(self._take(n)), "big")

    def _scalar_or_header(self):
        """A complete value, or ('map'|'array', count) for a container whose items follow."""
        b = int(self._take(1)[0])
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return ("map", b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return ("array", b & 0x0F)
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xC4, 0xC5, 0xC6):                                  # bin 8/16/32
            n = self._uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[b])
            start = self.pos
            self._take(n)
            return self.buf[start:start + n]
        if b in (0xC7, 0xC8, 0xC9) or 0xD4 <= b <= 0xD8:          # ext
            if b >= 0xD4:
                n = 1 << (b - 0xD4)
            else:
                n = self._uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[b])
            code = int(self._take(1).view(np.int8)[0])
            start = self.pos
            self._take(n)
            return _Ext(code, start, start + n)
        if b in (0xCA, 0xCB):
            return struct.unpack(">f" if b == 0xCA else ">d", bytes(self._take(4 if b == 0xCA else 8)))[0]
        if 0xCC <= b <= 0xCF:
            return self._uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            n = 1 << (b - 0xD0)
            return int.from_bytes(bytes(self._take(n)), "big", signed=True)
        if b in (0xD9, 0xDA, 0xDB):
            return self._str(self._uint({0xD9: 1, 0xDA: 2, 0xDB: 4}[b]))
        if b in (0xDC, 0xDD):
            return ("array", self._uint(2 if b == 0xDC else 4))
        if b in (0xDE, 0xDF):
            return ("map", self._uint(2 if b == 0xDE else 4))
        self._fail(f"byte 0x{b:02x} is not MessagePack")

    def _str(self, n):
        try:
            return bytes(self._take(n)).decode("utf-8")
        except UnicodeDecodeError:
            self._fail("a string that is not UTF-8")

    def value(self):
        """Decode one value (containers iteratively: no recursion, nesting bounded)."""
        stack = []                              # [kind, remaining, container, pending key]
        while True:
            v = self._scalar_or_header()
            if isinstance(v, tuple):
                kind, count = v
                if count > self.end - self.pos:     # every item needs at least one byte
                    self._fail(f"a {kind} of {count} items in {self.end - self.pos} bytes")
                if len(stack) >= MAX_NESTING:
                    self._fail(f"nested deeper than {MAX_NESTING} levels")
                container = {} if kind == "map" else []
                if count:
                    stack.append([kind, 2 * count if kind == "map" else count, container, None])
                    continue
                v = container
            while True:                          # attach v to the open container(s)
                if not stack:
                    return v
                frame = stack[-1]
                if frame[0] == "array":
                    frame[2].append(v)
                elif frame[1] % 2 == 0:
                    if not isinstance(v, (str, int)):
                        self._fail(f"a map key of type {type(v).__name__}")
                    frame[3] = v
                else:
                    frame[2][frame[3]] = v
                frame[1] -= 1
                if frame[1]:
                    break
                v = stack.pop()[2]


def _array(buf, ext: _Ext, source, name):
    if ext.code not in (_NDARRAY, _NPSCALAR):
        raise CheckpointError(f"{source}: {name} is a MessagePack extension of type {ext.code}, not an array")
    d = Decoder(buf, f"{source} ({name})", ext.start, ext.end)
    meta = d.value()
    if not (isinstance(meta, list) and len(meta) == 3 and isinstance(meta[0], list)
            and all(type(n) is int and n >= 0 for n in meta[0]) and isinstance(meta[1], str)
            and isinstance(meta[2], np.ndarray)):
        raise CheckpointError(f"{source}: {name} is not a Flax array ([shape, dtype, bytes])")
    shape, dtype, raw = tuple(meta[0]), meta[1], meta[2]
    if dtype not in _DTYPES:
        raise CheckpointError(f"{source}: {name} has unsupported dtype {dtype[:40]!r}")
    dt = np.dtype(_DTYPES[dtype])
    if int(np.prod(shape, dtype=object)) * dt.itemsize != raw.shape[0]:
        raise CheckpointError(f"{source}: {name} holds {raw.shape[0]} bytes, not shape {list(shape)} of {dtype}")
    return raw.view(dt).reshape(shape)


def _flatten(tree, buf, source, prefix=(), out=None):
    out = {} if out is None else out
    for key, v in tree.items():
        path = prefix + (str(key),)
        name = "/".join(path)
        if isinstance(v, dict) and v.get(_CHUNKED) is True:
            chunks, shape = v.get("chunks"), v.get("shape")      # {"0": ..., "1": ...} as Flax writes tuples
            if isinstance(shape, dict):
                shape = [shape.get(str(i)) for i in range(len(shape))]
            if not (isinstance(chunks, dict) and isinstance(shape, list)
                    and all(type(d) is int and d >= 0 for d in shape)):
                raise CheckpointError(f"{source}: chunked array {name} is malformed")
            parts = [_array(buf, chunks[k], source, name) if isinstance(chunks[k], _Ext) else None
                     for k in sorted(chunks, key=lambda k: int(k) if str(k).isdigit() else -1)]
            if any(p is None for p in parts) or len({p.dtype for p in parts}) != 1:
                raise CheckpointError(f"{source}: chunked array {name} is malformed")
            flat = np.concatenate([p.reshape(-1) for p in parts])
            if flat.size != int(np.prod(shape, dtype=object)):
                raise CheckpointError(f"{source}: chunked array {name} does not fill shape {shape}")
            out[path] = flat.reshape(shape)
        elif isinstance(v, dict):
            _flatten(v, buf, source, path, out)
        elif isinstance(v, _Ext):
            out[path] = _array(buf, v, source, name)
        else:
            raise CheckpointError(f"{source}: {name} is a {type(v).__name__}, not an array")
    return out


def torch_name(path: tuple) -> tuple[str, bool]:
    """Flax parameter path -> (transformers name, whether it is a kernel to transpose)."""
    rename = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
    parts = list(path)
    if parts[:1] != ["model"]:                    # FlaxOPTModel (no causal-LM wrapper) saves from decoder
        parts = ["model"] + parts
    if parts[-1] == "kernel" and parts[-2] == "lm_head":
        return "lm_head.weight", True
    if len(parts) >= 4 and parts[2] == "layers":
        parts[2] = "layers." + parts.pop(3)
    kernel = parts[-1] == "kernel"
    parts[-1] = rename.get(parts[-1], parts[-1])
    return ".".join(parts), kernel


def load(path) -> dict[str, np.ndarray]:
    """``{transformers name: array}`` of a ``flax_model.msgpack``."""
    path = os.fspath(path)
    buf = stored.map_file(path)
    d = Decoder(buf, path)
    tree = d.value()
    if d.pos != buf.shape[0]:
        raise CheckpointError(f"{path}: {buf.shape[0] - d.pos} bytes after the MessagePack value")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: not Flax parameters (a {type(tree).__name__}, not a map)")
    out = {}
    for p, arr in _flatten(tree, buf, path).items():
        name, kernel = torch_name(p)
        if kernel:
            if arr.ndim != 2:
                raise CheckpointError(f"{path}: kernel {'/'.join(p)} has {arr.ndim} axes, expected 2")
            arr = arr.T
        if name in out:
            raise CheckpointError(f"{path}: two arrays map to {name}")
        out[name] = arr
    return out
