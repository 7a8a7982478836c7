"""PyTorch checkpoints (``pytorch_model.bin``, ``*.pt``) read without executing anything.

``torch.save`` writes a pickle whose tensors refer to raw storages kept beside it.  Unpickling with
the ``pickle`` module runs whatever callables the file names, so refopt never does that: this
module interprets the pickle opcodes itself and builds only ``None``, booleans, numbers, strings,
bytes, tuples, lists, dicts and tensor records.  The only globals it accepts are the few PyTorch's
tensor serialisation writes (:data:`ALLOWED_GLOBALS`: ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and its relatives, ``torch.<Dtype>Storage``); any other global
(``os.system``, ``builtins.eval`` ...) and every opcode that would construct an arbitrary object
(``INST``, ``OBJ``, ``NEWOBJ``, ``EXT*``, text persistent ids) is refused by name with
:class:`UnsafePickleError` before anything is built.

Three containers are read, as ``torch.load`` reads them:

* the zip archive (``torch.save``'s default since 1.6): ``<root>/data.pkl`` plus one record
  ``<root>/data/<key>`` per storage; records stored uncompressed (as PyTorch writes them) are
  memory-mapped, a deflated record is inflated with its size bounded by what the pickle declares;
* the legacy stream (``_use_new_zipfile_serialization=False``): magic number, protocol, system info
  and the object as four pickles, then a pickled list of storage keys and each storage's bytes
  (an 8-byte element count, then the elements), memory-mapped in place;
* the tar archive of PyTorch before 0.4 (members ``sys_info``, ``pickle``, ``storages``,
  ``tensors``), read through :mod:`tarfile` without extracting anything.

Every size is checked against the file before use; archive members that are links, lie outside the
archive, or repeat a name are refused.  Errors are :class:`refopt.errors.CheckpointError` (unsafe
content: its subclass :class:`UnsafePickleError`) naming the file and the offending item.
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
import zipfile
import zlib
from collections import OrderedDict

import numpy as np

from refopt.errors import CheckpointError
from refopt.io import stored

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAX_PICKLE_BYTES = 256 * 1024 * 1024      # the object pickle of a state dict is kilobytes
MAX_NESTING = 100                         # MARK depth / nested containers in a checkpoint
MAX_ZIP_MEMBERS = 1_000_000

STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": stored.BFLOAT16, "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"), "UntypedStorage": np.dtype("u1"),
}


class UnsafePickleError(CheckpointError):
    """A pickle that asks for something PyTorch's tensor serialisation never writes: a global
    outside the allowlist, an opcode that builds arbitrary objects, a storage outside the archive."""


# ---------------------------------------------------------------------------- what a pickle may build
class StorageType:
    """``torch.<Name>Storage`` as a pickle names it: only its element dtype matters here."""

    def __init__(self, name):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class StorageRef:
    """A persistent id resolved to a storage: its key in the container, dtype and element count."""

    def __init__(self, key, dtype, numel, view=None):
        self.key, self.dtype, self.numel, self.view = key, dtype, numel, view


class TensorRecord:
    """``_rebuild_tensor_v2(storage, offset, size, stride, ...)``, before the storage is read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Call:
    """An allowlisted global: calling it (``REDUCE``) builds a plain value or a record."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn


class _OrderedDict(OrderedDict):
    """``collections.OrderedDict`` rebuilt by a pickle; ``BUILD`` may set attributes such as the
    ``_metadata`` of a state dict, which are kept aside and ignored."""


def _ints(value, what, n=None):
    if not isinstance(value, tuple) or any(type(v) is not int for v in value) or (n is not None and len(value) != n):
        raise UnsafePickleError(f"{what}: expected a tuple of integers, got {type(value).__name__}")
    return value


def _rebuild_tensor(storage, offset, size, stride, *rest):
    if not isinstance(storage, StorageRef):
        raise UnsafePickleError(f"_rebuild_tensor: first argument is {type(storage).__name__}, not a storage")
    if type(offset) is not int:
        raise UnsafePickleError("_rebuild_tensor: storage offset is not an integer")
    size = _ints(size, "_rebuild_tensor: size")
    stride = _ints(stride, "_rebuild_tensor: stride", len(size))
    if len(size) > 64 or any(abs(v) >= 1 << 62 for v in size + stride) or abs(offset) >= 1 << 62:
        raise UnsafePickleError("_rebuild_tensor: more than 64 axes, or a size, stride or offset past 2**62")
    return TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(data, *rest):
    if not isinstance(data, TensorRecord):
        raise UnsafePickleError("_rebuild_parameter: data is not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not isinstance(func, _Call) or not isinstance(new_type, _Call) or not isinstance(args, tuple):
        raise UnsafePickleError("_rebuild_from_type_v2: unexpected arguments")
    if new_type.name not in ("torch.Tensor", "torch.nn.parameter.Parameter"):
        raise UnsafePickleError(f"_rebuild_from_type_v2: tensor type {new_type.name} is not allowed")
    return func.fn(*args)


def _ordered_dict(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
        raise UnsafePickleError("collections.OrderedDict: unexpected arguments")
    out = _OrderedDict()
    for pair in args[0] if args else ():
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise UnsafePickleError("collections.OrderedDict: items are not pairs")
        out[_key(pair[0])] = pair[1]
    return out


def _refuse_call(name):
    def fn(*args):
        raise UnsafePickleError(f"{name} is a type marker and cannot be called")
    return fn


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _refuse_call("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _refuse_call("torch.nn.parameter.Parameter"),
}


def _global(module, name):
    if not isinstance(module, str) or not isinstance(name, str):
        raise UnsafePickleError("a global named by non-strings")
    if module == "torch" and name in STORAGE_DTYPES:
        return StorageType(name)
    if module == "torch" and name.endswith("Tensor") and name[:-6] + "Storage" in STORAGE_DTYPES:
        return _Call(f"torch.{name}", _refuse_call(f"torch.{name}"))   # the tar format's type tag
    fn = ALLOWED_GLOBALS.get((module, name))
    if fn is None:
        shown = f"{module}.{name}"
        raise UnsafePickleError(f"global {shown[:200]!r} is not one PyTorch's tensor serialisation uses; "
                                "refusing to build it")
    return _Call(f"{module}.{name}", fn)


def _key(k):
    """A dict key: only scalars (hashing a nested tuple recurses in C without a depth check, so a
    deep one from a hostile pickle could crash the interpreter)."""
    if k is not None and type(k) not in (str, int, float, bool, bytes):
        raise UnsafePickleError(f"a dict key of type {type(k).__name__}")
    return k


def _shown(value) -> str:
    """``value`` for an error message, without recursing into a hostile structure."""
    return repr(value[:80]) if isinstance(value, str) else type(value).__name__


# ---------------------------------------------------------------------------- the opcode interpreter
class PickleMachine:
    """Runs a pickle's opcodes over plain values.  ``persistent_load(pid)`` resolves storage ids;
    ``source`` names the file in errors."""

    def __init__(self, data, persistent_load, source):
        self.data = memoryview(data)
        self.pos = 0
        self.persistent_load = persistent_load
        self.source = source

    def _fail(self, msg, unsafe=False):
        cls = UnsafePickleError if unsafe else CheckpointError
        raise cls(f"{self.source}: {msg} (pickle byte {self.pos})")

    def _take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            self._fail(f"truncated pickle (needs {n} more bytes)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def _uint(self, n):
        return int.from_bytes(self._take(n), "little")

    def _line(self):
        end = bytes(self.data[self.pos:self.pos + 1024]).find(b"\n")
        if end < 0:
            self._fail("unterminated text argument")
        out = bytes(self._take(end + 1)[:-1])
        return out.decode("utf-8", "replace")

    def _text(self, n):
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError:
            self._fail("a string that is not UTF-8")

    def run(self):
        stack, marks, memo = [], [], {}

        def pop_mark():
            if not marks:
                self._fail("unbalanced MARK")
            at = marks.pop()
            items = stack[at:]
            del stack[at:]
            return items

        def pop():
            if len(stack) <= (marks[-1] if marks else 0):
                self._fail("stack underflow")
            return stack.pop()

        def top(kind):
            if len(stack) <= (marks[-1] if marks else 0) or not isinstance(stack[-1], kind):
                self._fail(f"expected a {kind.__name__ if isinstance(kind, type) else 'container'} on the stack",
                           unsafe=True)
            return stack[-1]

        while True:
            if self.pos >= len(self.data):
                self._fail("pickle ends without STOP")
            op = chr(self.data[self.pos])
            self.pos += 1
            if op == "\x80":                      # PROTO
                if self._uint(1) > 5:
                    self._fail("unsupported pickle protocol")
            elif op == "\x95":                    # FRAME (a length hint)
                self._take(8)
            elif op == ".":                       # STOP
                if len(stack) != 1 or marks:
                    self._fail("malformed pickle (stack at STOP)")
                return stack[0]
            elif op == "(":                       # MARK
                if len(marks) >= MAX_NESTING:
                    self._fail(f"nested deeper than {MAX_NESTING} levels")
                marks.append(len(stack))          # marks hold stack positions
            elif op == "N":
                stack.append(None)
            elif op == "\x88":
                stack.append(True)
            elif op == "\x89":
                stack.append(False)
            elif op == "J":                       # BININT
                stack.append(int.from_bytes(self._take(4), "little", signed=True))
            elif op == "K":
                stack.append(self._uint(1))
            elif op == "M":
                stack.append(self._uint(2))
            elif op == "\x8a":                    # LONG1
                n = self._uint(1)
                if n > 16:
                    self._fail("an integer of more than 16 bytes")
                stack.append(int.from_bytes(self._take(n), "little", signed=True))
            elif op == "G":                       # BINFLOAT
                stack.append(struct.unpack(">d", self._take(8))[0])
            elif op == "X":                       # BINUNICODE
                stack.append(self._text(self._uint(4)))
            elif op == "\x8c":                    # SHORT_BINUNICODE
                stack.append(self._text(self._uint(1)))
            elif op == "\x8d":                    # BINUNICODE8
                stack.append(self._text(self._uint(8)))
            elif op == "U":                       # SHORT_BINSTRING (Python 2 str, ASCII here)
                stack.append(bytes(self._take(self._uint(1))).decode("latin-1"))
            elif op == "T":                       # BINSTRING
                stack.append(bytes(self._take(self._uint(4))).decode("latin-1"))
            elif op == "C":                       # SHORT_BINBYTES
                stack.append(bytes(self._take(self._uint(1))))
            elif op == "B":                       # BINBYTES
                stack.append(bytes(self._take(self._uint(4))))
            elif op == "}":
                stack.append({})
            elif op == "]":
                stack.append([])
            elif op == ")":
                stack.append(())
            elif op == "t":
                stack.append(tuple(pop_mark()))
            elif op == "\x85":
                stack.append((pop(),))
            elif op == "\x86":
                b, a = pop(), pop()
                stack.append((a, b))
            elif op == "\x87":
                c, b, a = pop(), pop(), pop()
                stack.append((a, b, c))
            elif op == "l":                       # LIST
                stack.append(list(pop_mark()))
            elif op == "d":                       # DICT
                items = pop_mark()
                if len(items) % 2:
                    self._fail("DICT with an odd number of items")
                stack.append({_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})
            elif op == "a":                       # APPEND
                v = pop()
                top(list).append(v)
            elif op == "e":                       # APPENDS
                items = pop_mark()
                top(list).extend(items)
            elif op == "s":                       # SETITEM
                v, k = pop(), pop()
                top(dict)[_key(k)] = v
            elif op == "u":                       # SETITEMS
                items = pop_mark()
                if len(items) % 2:
                    self._fail("SETITEMS with an odd number of items")
                d = top(dict)
                for i in range(0, len(items), 2):
                    d[_key(items[i])] = items[i + 1]
            elif op in "qr\x94":                  # BINPUT, LONG_BINPUT, MEMOIZE
                if not stack:
                    self._fail("memo of an empty stack")
                idx = self._uint(1) if op == "q" else self._uint(4) if op == "r" else len(memo)
                memo[idx] = stack[-1]
            elif op in "hj":                      # BINGET, LONG_BINGET
                idx = self._uint(1 if op == "h" else 4)
                if idx not in memo:
                    self._fail(f"memo key {idx} read before it is written")
                stack.append(memo[idx])
            elif op == "2":                       # DUP
                stack.append(stack[-1] if stack else self._fail("DUP of an empty stack"))
            elif op == "0":                       # POP
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop()
            elif op == "1":                       # POP_MARK
                pop_mark()
            elif op == "c":                       # GLOBAL module\nname\n
                module = self._line()
                stack.append(_global(module, self._line()))
            elif op == "\x93":                    # STACK_GLOBAL
                name, module = pop(), pop()
                stack.append(_global(module, name))
            elif op == "R":                       # REDUCE
                args, fn = pop(), pop()
                if not isinstance(fn, _Call):
                    self._fail(f"REDUCE of a {type(fn).__name__}, not an allowed global", unsafe=True)
                if not isinstance(args, tuple):
                    self._fail(f"REDUCE of {fn.name} with arguments that are not a tuple", unsafe=True)
                try:
                    stack.append(fn.fn(*args))
                except TypeError:
                    self._fail(f"{fn.name} called with {len(args)} arguments", unsafe=True)
            elif op == "b":                       # BUILD
                state, obj = pop(), top(object)
                if isinstance(obj, _OrderedDict) and isinstance(state, dict):
                    obj.__dict__.setdefault("_attributes", {}).update(
                        {k: v for k, v in state.items() if isinstance(k, str)})
                elif isinstance(obj, TensorRecord) and isinstance(state, (dict, tuple, type(None))):
                    pass                          # tensor attributes (parameter state): ignored
                else:
                    self._fail(f"BUILD of a {type(obj).__name__} with a {type(state).__name__} state", unsafe=True)
            elif op == "Q":                       # BINPERSID
                stack.append(self.persistent_load(pop()))
            elif op in "iobP\x81\x92\x82\x83\x84":
                names = {"i": "INST", "o": "OBJ", "P": "PERSID", "\x81": "NEWOBJ", "\x92": "NEWOBJ_EX",
                         "\x82": "EXT1", "\x83": "EXT2", "\x84": "EXT4"}
                self._fail(f"opcode {names[op]} builds arbitrary objects; PyTorch's tensor serialisation "
                           "never writes it", unsafe=True)
            else:
                self._fail(f"unsupported pickle opcode {op!r}", unsafe=True)


def unpickle(data, persistent_load, source):
    """Interpret one pickle (``data`` bytes-like) with the allowlist; returns the value and the
    number of bytes it used."""
    m = PickleMachine(data, persistent_load, source)
    try:
        value = m.run()
    except CheckpointError as e:
        if str(e).startswith(source):
            raise
        raise type(e)(f"{source}: {e} (pickle byte {m.pos})") from None
    return value, m.pos


# ---------------------------------------------------------------------------- storages and tensors
def _storage_id(pid, source, legacy):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
        raise UnsafePickleError(f"{source}: persistent id {type(pid).__name__} "
                                f"{_shown(pid[0]) if isinstance(pid, tuple) and pid else ''} is not a storage")
    n = 6 if legacy else 5
    if len(pid) not in (5, 6) or (legacy and len(pid) != 6):
        raise UnsafePickleError(f"{source}: malformed storage id of {len(pid)} fields (expected {n})")
    _, stype, key, location, numel = pid[:5]
    view = pid[5] if len(pid) == 6 else None
    if not isinstance(stype, StorageType):
        raise UnsafePickleError(f"{source}: storage id without a storage type")
    if not isinstance(key, str) or not key or not key.isalnum() or len(key) > 64:
        raise UnsafePickleError(f"{source}: storage key {_shown(key)} is not a plain record name "
                                "(it would point outside the archive)")
    if not isinstance(location, str) or type(numel) is not int or numel < 0:
        raise UnsafePickleError(f"{source}: malformed storage id for key {key!r}")
    if view is not None:
        raise UnsafePickleError(f"{source}: storage views (old PyTorch) are not supported (key {key!r})")
    return StorageRef(key, stype.dtype, numel)


def _storage_ids(source, legacy):
    """``(refs, persistent_load)``: the storages the object pickle names, filled in as it runs."""
    refs = {}

    def persistent_load(pid):
        ref = _storage_id(pid, source, legacy)
        if refs.setdefault(ref.key, ref).dtype != ref.dtype:
            raise CheckpointError(f"{source}: storage {ref.key!r} is used with two dtypes")
        return refs[ref.key]

    return refs, persistent_load


def _to_array(rec: TensorRecord, storages: dict, source: str, name: str) -> np.ndarray:
    base = storages.get(rec.storage.key)
    if base is None:
        raise UnsafePickleError(f"{source}: tensor {name} refers to storage {rec.storage.key!r}, which "
                                "the archive does not hold")
    if base.dtype != rec.storage.dtype:
        raise CheckpointError(f"{source}: storage {rec.storage.key!r} is used with two dtypes")
    if any(d < 0 for d in rec.size) or any(s < 0 for s in rec.stride) or rec.offset < 0:
        raise CheckpointError(f"{source}: tensor {name} has a negative size, stride or offset")
    count = int(np.prod(rec.size, dtype=object))
    last = rec.offset + sum((d - 1) * s for d, s in zip(rec.size, rec.stride)) if count else rec.offset - 1
    if last >= base.shape[0]:
        raise CheckpointError(f"{source}: tensor {name} (size {list(rec.size)}, stride {list(rec.stride)}, "
                              f"offset {rec.offset}) reaches past its storage of {base.shape[0]} elements")
    if count == 0:
        return np.zeros(rec.size, base.dtype)
    item = base.dtype.itemsize
    return np.lib.stride_tricks.as_strided(base[rec.offset:], shape=rec.size,
                                           strides=tuple(s * item for s in rec.stride), writeable=False)


def _tensors(obj, storages, source, prefix="", depth=0):
    """The flat ``{name: array}`` of a (possibly nested) state dict."""
    if depth > MAX_NESTING:
        raise CheckpointError(f"{source}: nested deeper than {MAX_NESTING} levels")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict of tensors")
    out = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, TensorRecord):
            out[name] = _to_array(v, storages, source, name)
        elif isinstance(v, dict):
            out.update(_tensors(v, storages, source, name + ".", depth + 1))
        elif not isinstance(v, (int, float, str, bool, type(None))):
            raise CheckpointError(f"{source}: entry {name!r} is a {type(v).__name__}, not a tensor")
    return out


def _storage_array(buf, offset, ref: StorageRef, source, what):
    nbytes = ref.numel * ref.dtype.itemsize
    if offset < 0 or offset + nbytes > buf.shape[0]:
        raise CheckpointError(f"{source}: storage {ref.key!r} ({nbytes} bytes) lies past the end of {what}")
    return buf[offset:offset + nbytes].view(ref.dtype)


# ---------------------------------------------------------------------------- the three containers
def _read_zip(path, buf):
    source = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise CheckpointError(f"{source}: not a readable zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise CheckpointError(f"{source}: more than {MAX_ZIP_MEMBERS} archive members")
        members = {}
        for info in infos:
            name = info.filename
            if (name.startswith("/") or "\\" in name or ".." in name.split("/")
                    or name.count("/") > 3):
                raise UnsafePickleError(f"{source}: archive member {name[:200]!r} has a path outside the archive")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UnsafePickleError(f"{source}: archive member {name!r} is a symbolic link")
            if name in members:
                raise UnsafePickleError(f"{source}: archive member {name!r} appears twice")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise CheckpointError(f"{source}: archive member {name!r} uses an unsupported compression")
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise CheckpointError(f"{source}: archive member {name!r} declares two sizes")
            members[name] = info
        pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{source}: a PyTorch zip checkpoint holds exactly one <name>/data.pkl "
                                  f"(found {len(pickles)})")
        root = pickles[0][: -len("data.pkl")]
        order = root + "byteorder"
        if order in members and _member_bytes(zf, members[order], buf, source, 16) not in (b"little",):
            raise CheckpointError(f"{source}: big-endian checkpoints are not supported")
        refs, persistent_load = _storage_ids(source, legacy=False)
        data = _member_bytes(zf, members[pickles[0]], buf, source, MAX_PICKLE_BYTES)
        obj, _ = unpickle(data, persistent_load, f"{source}:{pickles[0]}")
        storages = {}
        for key, ref in refs.items():
            info = members.get(f"{root}data/{key}")
            if info is None:
                raise UnsafePickleError(f"{source}: storage {key!r} has no record {root}data/{key} in the archive")
            nbytes = ref.numel * ref.dtype.itemsize
            if info.file_size < nbytes:
                raise CheckpointError(f"{source}: record {info.filename} holds {info.file_size} bytes, the "
                                      f"storage needs {nbytes}")
            if info.compress_type == zipfile.ZIP_STORED:
                storages[key] = _storage_array(buf, _data_offset(info, buf, source), ref, source, info.filename)
            else:
                raw = _member_bytes(zf, info, buf, source, nbytes)
                storages[key] = np.frombuffer(raw, np.uint8, nbytes).view(ref.dtype)
        return _tensors(obj, storages, source)


def _data_offset(info, buf, source):
    """Where a stored member's bytes start: after its local header (whose name and extra field
    lengths may differ from the central directory's)."""
    at = info.header_offset
    head = bytes(buf[at:at + 30])
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{source}: archive member {info.filename!r} has no local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return at + 30 + name_len + extra_len


def _member_bytes(zf, info, buf, source, limit):
    """A member's bytes, refusing more than ``limit`` (declared or actually inflated)."""
    if info.file_size > limit:
        raise CheckpointError(f"{source}: archive member {info.filename!r} declares {info.file_size} bytes "
                              f"(more than the {limit} expected)")
    if info.compress_type == zipfile.ZIP_STORED:
        start = _data_offset(info, buf, source)
        if start + info.file_size > buf.shape[0]:
            raise CheckpointError(f"{source}: archive member {info.filename!r} lies past the end of the file")
        return buf[start:start + info.file_size].tobytes()
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, ValueError) as e:
        raise CheckpointError(f"{source}: archive member {info.filename!r} cannot be inflated ({e})") from None
    if len(data) > limit:
        raise CheckpointError(f"{source}: archive member {info.filename!r} inflates past {limit} bytes")
    return data


def _read_legacy(path, buf):
    source = str(path)
    data = memoryview(buf)

    def refuse(pid):
        raise UnsafePickleError(f"{source}: a persistent id outside the checkpoint's object pickle")

    pos = 0
    header = []
    for what in ("magic number", "protocol version", "system info"):
        value, used = unpickle(data[pos:pos + MAX_PICKLE_BYTES], refuse, f"{source} ({what})")
        header.append(value)
        pos += used
    magic, protocol, sys_info = header
    if magic != MAGIC_NUMBER:
        raise CheckpointError(f"{source}: not a PyTorch checkpoint (wrong magic number)")
    if protocol != PROTOCOL_VERSION:
        raise CheckpointError(f"{source}: unsupported PyTorch legacy protocol {protocol!r}")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError(f"{source}: big-endian or unlabelled checkpoints are not supported")
    refs, persistent_load = _storage_ids(source, legacy=True)
    obj, used = unpickle(data[pos:pos + MAX_PICKLE_BYTES], persistent_load, source)
    pos += used
    keys, used = unpickle(data[pos:pos + MAX_PICKLE_BYTES], refuse, f"{source} (storage keys)")
    pos += used
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise CheckpointError(f"{source}: malformed list of storage keys")
    storages = {}
    for key in keys:
        ref = refs.get(key)
        if ref is None:
            raise CheckpointError(f"{source}: storage {key!r} is stored but no tensor uses it")
        if pos + 8 > buf.shape[0]:
            raise CheckpointError(f"{source}: truncated (storage {key!r} is missing)")
        (count,) = struct.unpack("<q", bytes(buf[pos:pos + 8]))
        if count != ref.numel:
            raise CheckpointError(f"{source}: storage {key!r} holds {count} elements, its tensors say {ref.numel}")
        storages[key] = _storage_array(buf, pos + 8, ref, source, "the file")
        pos += 8 + ref.numel * ref.dtype.itemsize
    if pos != buf.shape[0]:
        raise CheckpointError(f"{source}: {buf.shape[0] - pos} unexpected bytes after the last storage")
    return _tensors(obj, storages, source)


def _read_tar(path, buf):
    source = str(path)
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CheckpointError(f"{source}: not a readable tar archive ({e})") from None
    with tf:
        members = {}
        for m in tf.getmembers():
            if m.name not in ("sys_info", "pickle", "storages", "tensors"):
                raise UnsafePickleError(f"{source}: unexpected tar member {m.name[:200]!r}")
            if not m.isreg():
                raise UnsafePickleError(f"{source}: tar member {m.name!r} is not a regular file (a link or device)")
            if m.name in members:
                raise UnsafePickleError(f"{source}: tar member {m.name!r} appears twice")
            if m.offset_data + m.size > buf.shape[0]:
                raise CheckpointError(f"{source}: tar member {m.name!r} lies past the end of the file")
            members[m.name] = buf[m.offset_data:m.offset_data + m.size]
    for need in ("pickle", "storages", "tensors"):
        if need not in members:
            raise CheckpointError(f"{source}: legacy tar checkpoint without its {need!r} member")

    def refuse(pid):
        raise UnsafePickleError(f"{source}: a persistent id outside the checkpoint's object pickle")

    # storages: count, then per storage a pickled (key, location, storage type) and its bytes
    st = members["storages"]
    count, pos = unpickle(st, refuse, f"{source} (storages)")
    if type(count) is not int or count < 0:
        raise CheckpointError(f"{source}: malformed storage count")
    arrays = {}
    for _ in range(count):
        entry, used = unpickle(st[pos:], refuse, f"{source} (storages)")
        pos += used
        if not (isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[2], StorageType)):
            raise UnsafePickleError(f"{source}: malformed storage entry")
        if type(entry[0]) not in (str, int):
            raise UnsafePickleError(f"{source}: malformed storage key")
        key = str(entry[0])
        if pos + 8 > st.shape[0]:
            raise CheckpointError(f"{source}: truncated storage {key!r}")
        (n,) = struct.unpack("<q", bytes(st[pos:pos + 8]))
        ref = StorageRef(key, entry[2].dtype, n)
        if n < 0:
            raise CheckpointError(f"{source}: storage {key!r} has a negative size")
        arrays[key] = _storage_array(st, pos + 8, ref, source, "the storages member")
        pos += 8 + n * ref.dtype.itemsize
    views, _ = unpickle(st[pos:], refuse, f"{source} (storage views)")
    if views:
        raise CheckpointError(f"{source}: storage views (PyTorch < 0.4) are not supported")
    # tensors: count, then per tensor a pickled (key, storage key, type) and its geometry
    ts = members["tensors"]
    count, pos = unpickle(ts, refuse, f"{source} (tensors)")
    tensors = {}
    for _ in range(count if type(count) is int else -1):
        entry, used = unpickle(ts[pos:], refuse, f"{source} (tensors)")
        pos += used
        if not (isinstance(entry, tuple) and len(entry) == 3):
            raise UnsafePickleError(f"{source}: malformed tensor entry")
        if type(entry[0]) not in (str, int) or type(entry[1]) not in (str, int):
            raise UnsafePickleError(f"{source}: malformed tensor entry")
        key, skey = str(entry[0]), str(entry[1])
        if pos + 8 > ts.shape[0]:
            raise CheckpointError(f"{source}: truncated tensor {key!r}")
        (ndim,) = struct.unpack("<i", bytes(ts[pos:pos + 4]))
        if not 0 <= ndim <= 64 or pos + 16 + 16 * ndim > ts.shape[0]:
            raise CheckpointError(f"{source}: malformed tensor {key!r}")
        pos += 8
        size = struct.unpack(f"<{ndim}q", bytes(ts[pos:pos + 8 * ndim]))
        stride = struct.unpack(f"<{ndim}q", bytes(ts[pos + 8 * ndim:pos + 16 * ndim]))
        (offset,) = struct.unpack("<q", bytes(ts[pos + 16 * ndim:pos + 16 * ndim + 8]))
        pos += 16 * ndim + 8
        if skey not in arrays:
            raise UnsafePickleError(f"{source}: tensor {key!r} refers to a storage the archive does not hold")
        tensors[key] = TensorRecord(StorageRef(skey, arrays[skey].dtype, arrays[skey].shape[0]),
                                    offset, size, stride)

    def persistent_load(pid):
        if isinstance(pid, str) and pid in tensors:
            return tensors[pid]
        raise UnsafePickleError(f"{source}: persistent id {_shown(pid)} names no tensor of the archive")

    obj, _ = unpickle(members["pickle"], persistent_load, f"{source} (pickle)")
    return _tensors(obj, arrays, source)


# ---------------------------------------------------------------------------- public entry points
def load(path) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``torch.save``'d state dict.  Arrays are read-only views of the mapped
    file where the storage is stored uncompressed; bfloat16 ones have dtype
    :data:`refopt.io.stored.BFLOAT16`."""
    path = os.fspath(path)
    buf = stored.map_file(path)
    head = bytes(buf[:4])
    if head == b"PK\x03\x04":
        return _read_zip(path, buf)
    if head[:1] == b"\x80":
        return _read_legacy(path, buf)
    if buf.shape[0] >= 512 and bytes(buf[257:262]) == b"ustar":
        return _read_tar(path, buf)
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive, a legacy pickle "
                          "stream nor a legacy tar archive)")


def load_sharded(index_path) -> dict[str, np.ndarray]:
    """All tensors of a sharded checkpoint listed by ``pytorch_model.bin.index.json``."""
    index_path = os.fspath(index_path)
    folder = os.path.dirname(index_path)
    try:
        with open(index_path, "rb") as f:
            raw = f.read(64 * 1024 * 1024 + 1)
        weight_map = json.loads(raw)["weight_map"]
        if len(raw) > 64 * 1024 * 1024 or not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        shards = sorted(set(weight_map.values()))
        if not all(isinstance(s, str) for s in shards):
            raise TypeError("shard names are not strings")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: malformed shard index ({e})") from None
    state = {}
    for shard in shards:
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise UnsafePickleError(f"{index_path}: shard {shard[:200]!r} is not a file beside the index")
        tensors = load(os.path.join(folder, shard))
        names = {k for k, v in weight_map.items() if v == shard}
        missing = names - set(tensors)
        if missing:
            raise CheckpointError(f"{shard}: tensors {sorted(missing)[:5]} listed in the index are missing")
        state.update({k: tensors[k] for k in names})
    return state
