"""PyTorch checkpoints (``pytorch_model.bin``, ``*.pt``) read without executing anything.

``torch.save`` writes a pickle whose tensors refer to raw storages kept beside it.  Unpickling with
the ``pickle`` module runs whatever callables the file names, so refopt never does that:
:mod:`refopt.io.pickle_vm` interprets the opcodes itself and builds only plain values and tensor
records from an allowlist of the globals PyTorch's tensor serialisation writes
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and its relatives,
``torch.<Dtype>Storage``); any other global (``os.system``, ``builtins.eval`` ...) and every
opcode that would construct an arbitrary object is refused by name with
:class:`UnsafePickleError` before anything is built.  This module resolves the storages.

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

import numpy as np

from refopt.errors import CheckpointError
from refopt.io import stored
from refopt.io.pickle_vm import (  # noqa: F401  (UnsafePickleError is part of this module's API)
    MAX_NESTING, StorageRef, StorageType, TensorRecord, UnsafePickleError, _shown, unpickle)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAX_PICKLE_BYTES = 256 * 1024 * 1024      # the object pickle of a state dict is kilobytes
MAX_ZIP_MEMBERS = 1_000_000

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
