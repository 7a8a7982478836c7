"""The pickle-free PyTorch checkpoint reader: real checkpoints load, planted ones never run.

Every malicious file here would leave a marker file if unpickled (the first tests prove the
payloads work by unpickling them with the ``pickle`` module in a subprocess); refopt must refuse each
with a named error and leave no marker.  The fuzz test mutates the committed ``torch.save`` files
(tests/data/torch_tiny, written by scripts/make_torch_fixture.py) and allows only a named error or a
correct load.
"""

import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from refopt.errors import CheckpointError, RefoptError
from refopt.io import stored, torch_pickle
from refopt.io.torch_pickle import UnsafePickleError

DATA = Path(__file__).parent / "data" / "torch_tiny"
EXPECTED = dict(np.load(DATA / "expected.npz"))


def _values(tensors):
    return {k: stored.widen(v) if stored.is_bfloat16(v) else np.asarray(v) for k, v in tensors.items()}


# ---------------------------------------------------------------------------- real checkpoints
@pytest.mark.parametrize("name", ["zip.pt", "legacy.pt"])
def test_torch_save_files_load_exactly(name):
    got = torch_pickle.load(DATA / name)
    assert set(got) == set(EXPECTED)
    for k, v in _values(got).items():
        assert v.shape == EXPECTED[k].shape and v.dtype == EXPECTED[k].dtype, k
        np.testing.assert_array_equal(v, EXPECTED[k], err_msg=k)
    assert stored.is_bfloat16(got["w.bfloat16"]) and got["w.float16"].dtype == np.float16


def test_tensors_are_views_of_the_file():
    got = torch_pickle.load(DATA / "zip.pt")
    assert not got["w.float16"].flags.writeable
    assert np.shares_memory(got["tied"], got["w.slice"])          # one storage, mapped once


def _str(s):
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _int(i):
    return b"J" + struct.pack("<i", i)


def _legacy_tar(path, entries):
    """A PyTorch < 0.4 tar checkpoint, written as torch's legacy loader reads it (a format torch
    can no longer write): members sys_info, pickle (persistent ids are tensor keys), storages and
    tensors.  Pickles are assembled from opcodes, so nothing needs importing."""
    storages, tensors = [pickle.dumps(len(entries), protocol=2)], [pickle.dumps(len(entries), protocol=2)]
    obj = b"\x80\x02}"
    for i, (name, arr) in enumerate(entries.items()):
        storages.append(b"\x80\x02" + _int(i) + _str("cpu") + b"ctorch\nFloatStorage\n\x87.")
        storages.append(struct.pack("<q", arr.size) + np.ascontiguousarray(arr, "<f4").tobytes())
        tensors.append(b"\x80\x02" + _int(1000 + i) + _int(i) + b"ctorch\nFloatTensor\n\x87.")
        strides = [s // 4 for s in np.ascontiguousarray(arr).strides]
        tensors.append(struct.pack("<ii", arr.ndim, 0) + struct.pack(f"<{arr.ndim}q", *arr.shape)
                       + struct.pack(f"<{arr.ndim}q", *strides) + struct.pack("<q", 0))
        obj += _str(name) + _str(str(1000 + i)) + b"Qs"
    storages.append(pickle.dumps([], protocol=2))
    members = {"sys_info": pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
               "pickle": obj + b".", "storages": b"".join(storages), "tensors": b"".join(tensors)}
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_legacy_tar_checkpoint(tmp_path):
    entries = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    _legacy_tar(tmp_path / "old.tar", entries)
    got = torch_pickle.load(tmp_path / "old.tar")
    for k, v in entries.items():
        np.testing.assert_array_equal(got[k], v)
    torch = pytest.importorskip("torch", reason="the peers extra (torch) checks the tar against torch.load")
    ref = torch.load(tmp_path / "old.tar", weights_only=False)
    for k in entries:
        np.testing.assert_array_equal(got[k], ref[k].numpy())


# ---------------------------------------------------------------------------- malicious files
def _zip_checkpoint(path, pkl, records=None, **member_opts):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for name, data in (records or {}).items():
            zf.writestr(name, data)
    return path


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _touch_payloads(marker):
    """name -> pickle bytes whose unpickling creates ``marker``."""
    m = str(marker)
    return {
        "os.system": pickle.dumps(_Reduce(os.system, (f"touch {m}",)), protocol=2),
        "builtins.exec writes a file": pickle.dumps(_Reduce(exec, (f"open({m!r}, 'w').write('x')",)), protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(eval, (f"open({m!r}, 'w')",)), protocol=2),
        "subprocess.call": pickle.dumps(_Reduce(subprocess.call, (["touch", m],)), protocol=2),
        "STACK_GLOBAL os.system (protocol 4)": pickle.dumps(_Reduce(os.system, (f"touch {m}",)), protocol=4),
        "INST os.system (protocol 0)": f"(S'touch {m}'\nios\nsystem\n.".encode(),
        "getattr(builtins, 'exec')": (b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\nX\x08\x00\x00\x00builtins"
                                      b"\x85RX\x04\x00\x00\x00exec\x86R" + b"X" + struct.pack("<I", len(f"open({m!r},'w')"))
                                      + f"open({m!r},'w')".encode() + b"\x85R."),
    }


def test_payloads_are_live(tmp_path):
    """The planted payloads do run under pickle (so the refusals below are meaningful)."""
    for name, data in _touch_payloads(tmp_path / "m").items():
        marker = tmp_path / "m"
        (tmp_path / "p.pkl").write_bytes(data)
        subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.load(open(sys.argv[1],'rb'))",
                        str(tmp_path / "p.pkl")], capture_output=True)
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_code_execution_payloads_are_refused(tmp_path, container):
    marker = tmp_path / "marker"
    for name, data in _touch_payloads(marker).items():
        path = tmp_path / f"{container}.pt"
        if container == "zip":
            _zip_checkpoint(path, data)
        else:
            head = (pickle.dumps(torch_pickle.MAGIC_NUMBER, protocol=2) + pickle.dumps(1001, protocol=2)
                    + pickle.dumps({"little_endian": True}, protocol=2))
            path.write_bytes(head + data + pickle.dumps([], protocol=2))
        with pytest.raises(UnsafePickleError) as e:
            torch_pickle.load(path)
        assert not marker.exists(), name
        assert isinstance(e.value, ValueError) and isinstance(e.value, RefoptError)
        assert str(path) in str(e.value)


OPCODE_TRICKS = {
    # name: (pickle bytes, text the error must contain)
    "OBJ on an allowed global": (b"\x80\x02(ccollections\nOrderedDict\no.", "OBJ"),
    "NEWOBJ": (b"\x80\x02ccollections\nOrderedDict\n)\x81.", "NEWOBJ"),
    "NEWOBJ_EX": (b"\x80\x04ccollections\nOrderedDict\n)}\x92.", "NEWOBJ_EX"),
    "EXT1 (copyreg registry)": (b"\x80\x02\x82\x01.", "EXT1"),
    "EXT2": (b"\x80\x02\x83\x01\x00.", "EXT2"),
    "EXT4": (b"\x80\x02\x84\x01\x00\x00\x00.", "EXT4"),
    "text PERSID": (b"\x80\x02P0\n.", "PERSID"),
    "REDUCE of a string": (b"\x80\x02X\x01\x00\x00\x00a)R.", "REDUCE"),
    "REDUCE with a non-tuple": (b"\x80\x02ccollections\nOrderedDict\n]R.", "not a tuple"),
    "BUILD on a global": (b"\x80\x02ccollections\nOrderedDict\n}b.", "BUILD"),
    "dunder attribute of an allowed global": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2.__globals__\n.", "not one"),
    "STACK_GLOBAL os.system from the memo": (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93.", "os.system"),
    "nested: a tensor whose offset is os.system()": (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(cos\nsystem\nX\x01\x00\x00\x00x\x85R)tR.", "os.system"),
    "numpy reconstruct": (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n.", "numpy.core.multiarray._reconstruct"),
    "torch.load of a module class": (b"\x80\x02ctorch.nn.modules.linear\nLinear\n.", "torch.nn.modules.linear.Linear"),
    "persistent id that is not a storage": (b"\x80\x02X\x01\x00\x00\x00xQ.", "not a storage"),
    "persistent id leaving the archive": (
        b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x0b\x00\x00\x00../../x/y/zX\x03\x00\x00\x00cpuK\x01tQ.",
        "outside the archive"),
    "dict key that is a list": (b"\x80\x02}]K\x01s.", "dict key"),
    "dict key 300,000 tuples deep (hash() would overflow the C stack)": (
        b"\x80\x02})" + b"\x85" * 300_000 + b"K\x01s.", "dict key"),
    "storage key 300,000 tuples deep (repr() would recurse)": (
        b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\n)" + b"\x85" * 300_000
        + b"X\x03\x00\x00\x00cpuK\x01tQ.", "not a plain record name"),
    "a tensor of 2**80 elements": (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00\x8a\x0b" + (1 << 80).to_bytes(11, "little")
        + b"\x85K\x01\x85\x89)tR.", "2**62"),
}


@pytest.mark.parametrize("name", sorted(OPCODE_TRICKS))
def test_opcode_tricks_are_refused(tmp_path, name):
    data, text = OPCODE_TRICKS[name]
    path = _zip_checkpoint(tmp_path / "x.pt", data)
    with pytest.raises(UnsafePickleError, match=None) as e:
        torch_pickle.load(path)
    assert text in str(e.value), str(e.value)


def _storage_pickle(key):
    k = key.encode()
    return (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
            b"ctorch\nFloatStorage\nX" + struct.pack("<I", len(k)) + k + b"X\x03\x00\x00\x00cpuK\x02tQK\x00K\x02\x85K\x01"
            b"\x85\x89ccollections\nOrderedDict\n)RtRs.")


def test_a_valid_handmade_checkpoint_loads(tmp_path):
    path = _zip_checkpoint(tmp_path / "ok.pt", _storage_pickle("0"),
                           {"archive/data/0": np.array([1.5, -2], "<f4").tobytes()})
    np.testing.assert_array_equal(torch_pickle.load(path)["w"], [1.5, -2])


def test_storage_record_missing(tmp_path):
    path = _zip_checkpoint(tmp_path / "x.pt", _storage_pickle("7"))
    with pytest.raises(UnsafePickleError, match="no record"):
        torch_pickle.load(path)


def test_storage_too_short_for_its_tensor(tmp_path):
    path = _zip_checkpoint(tmp_path / "x.pt", _storage_pickle("0"), {"archive/data/0": b"\0\0\0\0"})
    with pytest.raises(CheckpointError, match="holds 4 bytes"):
        torch_pickle.load(path)


def test_zip_bomb_pickle_is_refused(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(300):                    # 300 MB of zeros, a few hundred KB compressed
                f.write(chunk)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(CheckpointError, match="declares|inflates"):
        torch_pickle.load(path)


def test_zip_bomb_record_lying_about_its_size(tmp_path):
    path = tmp_path / "bomb.pt"
    _zip_checkpoint(path, _storage_pickle("0"))
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data/0", b"\0" * (50 << 20))      # 8 bytes needed, 50 MB inflated
    with pytest.raises(CheckpointError, match="holds|declares"):
        torch_pickle.load(path)


@pytest.mark.parametrize("member", ["../evil", "/etc/evil", "archive/../../evil", "a/b/c/d/e"])
def test_zip_member_paths_outside_are_refused(tmp_path, member):
    path = _zip_checkpoint(tmp_path / "x.pt", _storage_pickle("0"), {member: b"x"})
    with pytest.raises(UnsafePickleError, match="outside"):
        torch_pickle.load(path)


def test_zip_symlink_member_is_refused(tmp_path):
    path = _zip_checkpoint(tmp_path / "x.pt", _storage_pickle("0"))
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("archive/data/0")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafePickleError, match="symbolic link"):
        torch_pickle.load(path)


def test_zip_duplicate_member_is_refused(tmp_path):
    path = _zip_checkpoint(tmp_path / "x.pt", _storage_pickle("0"), {"archive/data/0": b"\0" * 8})
    with zipfile.ZipFile(path, "a") as zf:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zf.writestr("archive/data/0", b"\1" * 8)
    with pytest.raises(UnsafePickleError, match="twice"):
        torch_pickle.load(path)


@pytest.mark.parametrize("kind", ["traversal", "symlink", "extra"])
def test_tar_members_outside_are_refused(tmp_path, kind):
    path = tmp_path / "old.tar"
    _legacy_tar(path, {"a": np.ones(2, np.float32)})
    with tarfile.open(path, "a") as tf:
        if kind == "symlink":
            info = tarfile.TarInfo("tensors")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
        else:
            info = tarfile.TarInfo("../evil" if kind == "traversal" else "evil.py")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UnsafePickleError):
        torch_pickle.load(path)


def test_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        torch_pickle.load(tmp_path / "fifo.pt")


def test_sharded_index_cannot_name_files_elsewhere(tmp_path):
    (tmp_path / "pytorch_model.bin.index.json").write_text('{"weight_map": {"w": "../outside.bin"}}')
    with pytest.raises(UnsafePickleError, match="beside the index"):
        torch_pickle.load_sharded(tmp_path / "pytorch_model.bin.index.json")


def test_deep_nesting_is_bounded(tmp_path):
    path = _zip_checkpoint(tmp_path / "x.pt", b"\x80\x02" + b"(" * 10_000 + b"t" * 10_000 + b".")
    with pytest.raises(CheckpointError, match="nested"):
        torch_pickle.load(path)


# ---------------------------------------------------------------------------- fuzz
SEEDS = {name: (DATA / name).read_bytes() for name in ("zip.pt", "legacy.pt")}


def _mutate(data, edits):
    b = bytearray(data)
    for kind, at, value in edits:
        at %= max(len(b), 1)
        if kind == 0:
            b[at] = value
        elif kind == 1:
            del b[at:at + 1 + value % 16]
        elif kind == 2:
            b[at:at] = bytes([value]) * (1 + value % 8)
        else:
            b[at:at + 8] = struct.pack("<q", (value << 24) - 7)     # a plausible bogus length
    return bytes(b)


def _check_outcome(path):
    import tracemalloc

    tracemalloc.start()
    try:
        got = torch_pickle.load(path)
    except CheckpointError:
        return "error"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 32 << 20, f"reading a {path.stat().st_size}-byte file allocated {peak} bytes"
    assert isinstance(got, dict)
    for v in got.values():                   # loads must give arrays readable end to end
        assert isinstance(v, np.ndarray)
        np.asarray(v).sum() if v.dtype != stored.BFLOAT16 else stored.bits(v).sum()
    return "load"


@settings(max_examples=int(os.environ.get("REFOPT_FUZZ_EXAMPLES", 150)), deadline=2000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_fuzz_mutated_checkpoints(tmp_path, seed, edits):
    path = tmp_path / "fuzz.pt"
    path.write_bytes(_mutate(SEEDS[seed], edits))
    _check_outcome(path)


@settings(max_examples=int(os.environ.get("REFOPT_FUZZ_EXAMPLES", 150)), deadline=2000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 12), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_fuzz_mutated_object_pickle(tmp_path, edits):
    """Mutations of the object pickle inside an intact zip archive (where the interpreter works)."""
    with zipfile.ZipFile(DATA / "zip.pt") as zf:
        records = {i.filename: zf.read(i) for i in zf.infolist()}
    path = tmp_path / "fuzz.pt"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, _mutate(data, edits) if name.endswith("data.pkl") else data)
    _check_outcome(path)


HUB = Path(__file__).parent / "data" / "hub_opt_tiny"
HUB_WEIGHTS = {name: (HUB / name).read_bytes() for name in ("flax_model.msgpack", "tf_model.h5")}


@pytest.mark.parametrize("name", sorted(HUB_WEIGHTS))
@settings(max_examples=int(os.environ.get("REFOPT_FUZZ_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 17), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_fuzz_mutated_flax_and_tf_weights(tmp_path, name, edits):
    """flax_model.msgpack (refopt's MessagePack decoder) and tf_model.h5 (transformers' TensorFlow
    weights, through h5py) mutated: only named errors or loads whose arrays read end to end.
    (Before the TensorFlow reader caught h5py's errors on every call, one mutated file in six
    escaped as h5py's RuntimeError -- a damaged heap or link -- or ValueError -- a datatype of no
    NumPy dtype.)"""
    from refopt.io import flax_msgpack, tf_keras_h5

    path = tmp_path / name
    path.write_bytes(_mutate(HUB_WEIGHTS[name], edits))
    try:
        got = {"flax_model.msgpack": flax_msgpack.load, "tf_model.h5": tf_keras_h5.load}[name](path)
    except CheckpointError:
        return
    for v in got.values():
        assert isinstance(v, np.ndarray)
        np.asarray(v).sum()


def test_tf_h5_declared_size_checked_before_reading(tmp_path, monkeypatch):
    """A chunked dataset is read into memory: the bytes its declared shape implies are checked
    against the memory available before h5py allocates them."""
    import h5py

    from refopt import limits
    from refopt.io import tf_keras_h5

    path = tmp_path / "tf_model.h5"
    name = "tfopt_for_causal_lm/model/decoder/embed_tokens/weight:0"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"model"]
        g = f.create_group("model")
        g.attrs["weight_names"] = [name.encode()]
        g.create_dataset(name, shape=(1 << 20, 1 << 16), dtype="f4", chunks=(64, 64))   # 256 GiB, empty
    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 30)
    with pytest.raises(CheckpointError, match="reading weight .* needs 256.00 GiB"):
        tf_keras_h5.load(path)
