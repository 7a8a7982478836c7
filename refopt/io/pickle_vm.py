"""A pickle interpreter that builds plain values only: the core of :mod:`refopt.io.torch_pickle`.

:class:`PickleMachine` runs a pickle's opcodes itself (the ``pickle`` module is never used to
load): it builds ``None``, booleans, numbers, strings, bytes, tuples, lists and dicts, and calls
only the globals in :data:`ALLOWED_GLOBALS` -- the few PyTorch's tensor serialisation writes
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and relatives) -- each
reimplemented here to return a plain record (:class:`TensorRecord`), plus ``torch.<Dtype>Storage``
names as dtype tags.  Any other global, and every opcode that constructs arbitrary objects
(``INST``, ``OBJ``, ``NEWOBJ``, ``EXT*``, text ``PERSID``), raises :class:`UnsafePickleError` naming
it before anything is built.  Dict keys are scalars only (hashing a deeply nested tuple recurses in
C without a depth check), nesting by ``MARK`` is bounded, and every length is checked against the
bytes that remain.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

import numpy as np

from refopt.errors import CheckpointError
from refopt.io import stored

MAX_NESTING = 100                         # MARK depth / nested containers in a checkpoint

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
