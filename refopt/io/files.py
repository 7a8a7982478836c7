"""Reading files refopt does not trust.

Every file refopt reads goes through :func:`open_regular`: it is opened without blocking
(``O_NONBLOCK``, so a FIFO named ``config.json`` cannot hang the reader) and refused unless it is a
regular file (a directory, FIFO, socket or device such as ``/dev/zero`` is refused before a byte is
read).  :func:`read_bytes` caps what it reads; :func:`loads_json` parses strictly: no ``NaN`` /
``Infinity``, no key twice in an object, nesting at most ``max_depth`` deep.  Every failure is a
refopt error naming the file: :class:`~refopt.errors.FileReadError` (an ``OSError``) when the file
cannot be read, or the caller's ``error`` class (a ``ValueError``: ``ConfigError``,
``TokenizerError``, ``CheckpointError``) when its content is malformed.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import stat

from refopt.errors import FileReadError

MiB = 2**20
MAX_CONFIG_BYTES = 16 * MiB          # config.json, tokenizer/preprocessor configs, shard indexes
MAX_TOKENIZER_BYTES = 256 * MiB      # vocabulary.json / vocab.json, merges.txt, tokenizer.json
MAX_JSON_DEPTH = 64                  # configs and tokenizer files nest 5 deep at most


def _describe_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what: str = "file") -> int:
    """A read-only file descriptor of ``path``, which must be a regular file (symlinks followed).

    Never blocks: the file is opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open
    descriptor (no window between the check and the use).  Raises :class:`FileReadError`."""
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileReadError(f"{path}: no such file (the {what})", _errno.ENOENT, path) from None
    except IsADirectoryError:
        raise FileReadError(f"{path}: {what} is a directory, expected a regular file",
                            _errno.EISDIR, path) from None
    except PermissionError:
        raise FileReadError(f"{path}: no permission to read the {what}", _errno.EACCES, path) from None
    except ValueError:                        # a NUL byte in the name
        raise FileReadError(f"{path!r}: not a file name (the {what}'s name holds a NUL byte)",
                            _errno.EINVAL, path) from None
    except OSError as e:
        if e.errno == _errno.ENXIO:           # a socket, or a FIFO opened for writing only
            raise FileReadError(f"{path}: {what} is not a regular file", e.errno, path) from None
        raise FileReadError(f"{path}: cannot open the {what} ({e.strerror or e})", e.errno,
                            path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileReadError(f"{path}: {what} is {_describe_kind(mode)}, expected a regular file",
                                _errno.EISDIR if stat.S_ISDIR(mode) else _errno.EINVAL, path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, count: int, path, what: str = "file") -> bytes:
    """Up to ``count`` bytes from ``fd`` (fewer only at the end of the file)."""
    chunks, left = [], count
    try:
        while left > 0:
            chunk = os.read(fd, min(left, 16 * MiB))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise FileReadError(f"{os.fspath(path)}: reading the {what} failed ({e.strerror or e})",
                            e.errno, path) from None
    return b"".join(chunks)


def read_bytes(path, max_bytes: int, error, what: str = "file") -> bytes:
    """The whole content of the regular file ``path``; ``error`` (a refopt ``ValueError`` class)
    when it holds more than ``max_bytes``."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise error(f"{os.fspath(path)}: {what} is {size:,} bytes; refopt reads at most "
                        f"{max_bytes:,} bytes from a {what}")
        data = read_fd(fd, min(size, max_bytes) + 1, path, what)
    finally:
        os.close(fd)
    if len(data) > max_bytes:                 # it grew while being read
        raise error(f"{os.fspath(path)}: {what} holds more than {max_bytes:,} bytes")
    return data


def decode_utf8(data: bytes, source, error, what: str = "file") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{source}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                    f"{e.start})") from None


def read_text(path, max_bytes: int, error, what: str = "file") -> str:
    """:func:`read_bytes` decoded as UTF-8 (``error`` if it is not UTF-8)."""
    return decode_utf8(read_bytes(path, max_bytes, error, what), os.fspath(path), error, what)


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return out


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def json_depth(value) -> int:
    """How deeply ``value`` nests (a scalar 0, ``[]`` 1, ``{"a": [1]}`` 2), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return deepest


def loads_json(text, source, error, what: str = "file", max_depth: int = MAX_JSON_DEPTH, **hooks):
    """Strict JSON: ``error`` names ``source`` for malformed JSON, ``NaN``/``Infinity``, a key
    given twice in one object, or nesting deeper than ``max_depth``."""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_constant=hooks.pop("parse_constant", _reject_constant), **hooks)
    except json.JSONDecodeError as e:
        raise error(f"{source} line {e.lineno} column {e.colno}: {what} is not valid JSON "
                    f"({e.msg})") from None
    except _Duplicate as e:
        raise error(f"{source}: {what} gives the key {e.args[0]!r} twice in one object") from None
    except RecursionError:
        raise error(f"{source}: {what} nests deeper than {max_depth} levels") from None
    except ValueError as e:                   # a hook's refusal (NaN, Infinity, numbers too large)
        raise error(f"{source}: {what} is not valid JSON ({e})") from None
    if json_depth(value) > max_depth:
        raise error(f"{source}: {what} nests deeper than {max_depth} levels")
    return value


def read_json(path, error, what: str = "JSON file", max_bytes: int = MAX_CONFIG_BYTES,
              max_depth: int = MAX_JSON_DEPTH):
    """A JSON file read with every check of this module."""
    text = read_text(path, max_bytes, error, what)
    return loads_json(text, os.fspath(path), error, what, max_depth)
