"""refopt's safetensors reader against the official ``safetensors`` package, over mutated files.

For every file hypothesis makes -- valid headers, then edits of their JSON (dtypes, shapes,
offsets, fields, metadata, numbers at the edge of serde_json's range, nesting near its limit,
escapes), of their bytes (the length field, flips, truncation, padding) and of their data -- refopt
accepts it exactly when ``safetensors.safe_open`` does, except where the specification is stricter
than the package (a key twice in one object; a header not beginning with ``{``): there refopt
refuses.  When both accept, names, dtypes, shapes, metadata and every array are identical.  Any
exception other than :class:`refopt.errors.CheckpointError` is a failure.

More examples: ``REFOPT_FUZZ_EXAMPLES=5000 pytest tests/test_safetensors_differential.py``.
"""

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from refopt.errors import CheckpointError
from refopt.io import safetensors_io as sio

safetensors = pytest.importorskip("safetensors", reason="needs the safetensors package")

EXAMPLES = int(os.environ.get("REFOPT_FUZZ_EXAMPLES", "300"))
DTYPES = sorted(sio.BITS)
NUMERIC = ["F16", "F32", "F64", "BF16", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64",
           "BOOL", "C64"]
EDGE_NUMBERS = ["-0", "0", "1e2", "2.0", "1E400", "1e-400", "1.7976931348623157e308",
                "1.7976931348623159e308", "18446744073709551615", "18446744073709551616",
                "-9223372036854775808", "-9223372036854775809", "123456789012345678901234567890",
                "0e999999999999", "1e99999999999", "1.5", "-1", "9" * 400, "0.0000000000001e-300"]


# ------------------------------------------------------------------------------ valid files
@st.composite
def valid_file(draw):
    """(header dict, data bytes) of a valid file: tensors tiling the data region in order."""
    n = draw(st.integers(0, 4))
    header, blobs, offset = {}, [], 0
    names = draw(st.lists(st.text(min_size=0, max_size=6), min_size=n, max_size=n, unique=True)
                 .filter(lambda ns: "__metadata__" not in ns))
    for name in names:
        dtype = draw(st.sampled_from(NUMERIC))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * sio.BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        blobs.append(draw(st.binary(min_size=nbytes, max_size=nbytes)))
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                      max_size=2))
    order = draw(st.permutations(list(header)))
    return {k: header[k] for k in order}, b"".join(blobs)


def _json_value(depth=0):
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                       st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=3), inner,
                                                                        max_size=3)), max_leaves=6)


# ------------------------------------------------------------------------------ mutations
def _raw_header(header) -> str:
    return json.dumps(header, ensure_ascii=False)


@st.composite
def mutated_file(draw):
    header, data = draw(valid_file())
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from([
        "none", "dtype", "shape", "offsets", "field", "extra-field", "metadata", "entry",
        "duplicate", "number", "nesting", "escape", "length", "flip", "truncate", "append",
        "pad", "prefix", "array-entry", "dtype-map", "top"]))
    text = None
    if kind == "dtype" and names:
        header[draw(st.sampled_from(names))]["dtype"] = draw(
            st.sampled_from(DTYPES + ["f32", "F32 ", "", "X"]) | _json_value())
    elif kind == "shape" and names:
        entry = header[draw(st.sampled_from(names))]
        entry["shape"] = draw(st.lists(st.integers(-2, 2**65) | st.floats(0, 4)
                                       | st.sampled_from([2**63, 2**64 - 1, 2**64]), max_size=4)
                              | _json_value())
    elif kind == "offsets" and names:
        entry = header[draw(st.sampled_from(names))]
        b, e = entry["data_offsets"]
        entry["data_offsets"] = draw(st.sampled_from([
            [b + 1, e + 1], [b, e + 1], [b - 1, e], [e, b], [b, e, e], [b], [b + 2**64, e],
            [2**64 - 1, 2**64 - 1], {"0": b, "1": e}, [float(b), e]]))
    elif kind == "field" and names:
        entry = header[draw(st.sampled_from(names))]
        del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "extra-field" and names:
        header[draw(st.sampled_from(names))][draw(st.text(max_size=4))] = draw(_json_value())
    elif kind == "metadata":
        header["__metadata__"] = draw(_json_value() | st.dictionaries(st.text(max_size=3),
                                                                      st.text(max_size=3)))
    elif kind == "entry" and names:
        header[draw(st.sampled_from(names))] = draw(_json_value())
    elif kind == "array-entry" and names:
        name = draw(st.sampled_from(names))
        entry = header[name]
        header[name] = draw(st.sampled_from([
            [entry["dtype"], entry["shape"], entry["data_offsets"]],
            [entry["dtype"], entry["shape"]], [entry["dtype"], entry["shape"], entry["data_offsets"], 1]]))
    elif kind == "dtype-map" and names:
        entry = header[draw(st.sampled_from(names))]
        entry["dtype"] = draw(st.sampled_from([{entry["dtype"]: None}, {entry["dtype"]: 1},
                                               {entry["dtype"]: None, "F32": None}, {}]))
    elif kind == "top":
        text = _raw_header(draw(st.lists(_json_value(), max_size=2) | _json_value()))
    text = _raw_header(header) if text is None else text
    if kind == "duplicate":
        inner = _raw_header(header)[1:]
        key = json.dumps(draw(st.sampled_from(names + ["__metadata__", "dtype"])) if names else "a")
        text = "{" + key + ":" + json.dumps(draw(_json_value())) + ("," if inner != "}" else "") + inner
        if names and draw(st.booleans()):                 # the same entry twice, both valid
            first = names[0]
            text = "{" + json.dumps(first) + ":" + json.dumps(header[first]) + "," + _raw_header(header)[1:]
    elif kind == "number" and names:
        literal = draw(st.sampled_from(EDGE_NUMBERS))
        target = draw(st.sampled_from(["shape", "data_offsets", "extra"]))
        entry = dict(header[draw(st.sampled_from(names))])
        token = "\u0000NUM\u0000"
        if target == "extra":
            entry["x"] = token
        elif target == "shape":
            entry["shape"] = [token] + list(entry["shape"])[1:]
        else:
            entry["data_offsets"] = [token, entry["data_offsets"][1]]
        header[names[0]] = entry
        text = _raw_header(header).replace(json.dumps(token), literal)
    elif kind == "nesting" and names:
        depth = draw(st.integers(120, 130))
        entry = header[names[0]]
        entry["x"] = "\u0000DEEP\u0000"
        text = _raw_header(header).replace(json.dumps("\u0000DEEP\u0000"), "[" * depth + "]" * depth)
    elif kind == "escape":
        esc = draw(st.sampled_from(["\\ud800", "\\udc00", "\\ud83d\\ude00", "\\ude00\\ud83d",
                                    "\\u0000", "\\x41", "\\/", "\u0001", "\\ud83d\\u0041", "\u007f"]))
        text = "{" + f'"n{esc}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' + \
            ("," + _raw_header(header)[1:] if header else "}")
    raw = text.encode("utf-8", "surrogatepass")
    length = len(raw)
    if kind == "pad":
        raw += draw(st.sampled_from([b" ", b"  \n", b"\t", b"\x00", b"\r\n"]))
        length = len(raw)
    elif kind == "prefix":
        raw = draw(st.sampled_from([b" ", b"\n", b"\xef\xbb\xbf", b"\t"])) + raw
        length = len(raw)
    blob = struct.pack("<Q", length) + raw + data
    if kind == "length":
        blob = struct.pack("<Q", draw(st.sampled_from([length - 1, length + 1, 0, 2**63,
                                                       100_000_001, len(blob)])) % 2**64) + blob[8:]
    elif kind == "flip" and len(blob) > 8:
        at = draw(st.integers(8, len(blob) - 1))
        blob = blob[:at] + bytes([blob[at] ^ draw(st.integers(1, 255))]) + blob[at + 1:]
    elif kind == "truncate":
        blob = blob[:draw(st.integers(0, max(len(blob) - 1, 0)))]
    elif kind == "append":
        blob += draw(st.binary(min_size=1, max_size=9))
    return kind, blob


# ------------------------------------------------------------------------------ the oracle
def _official(path):
    """(accepted?, {name: (dtype, shape, array, or None where the package cannot make one)},
    metadata) by the package."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            keys, metadata = list(f.keys()), f.metadata()
            out = {}
            for k in keys:
                sl = f.get_slice(k)
                dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                try:
                    array = f.get_tensor(k)
                except Exception:          # NumPy has no bfloat16 / float8, or no such shape
                    array = None
                out[k] = (dtype, shape, array)
    except Exception:            # the package's refusal of the file (SafetensorError)
        return False, None, None
    return True, out, metadata


def _spec_stricter(blob: bytes) -> bool:
    """Files the specification forbids but the package accepts: a key twice in one object, or a
    header that does not begin with '{'."""
    if len(blob) < 9:
        return False
    (n,) = struct.unpack("<Q", blob[:8])
    raw = blob[8:8 + n]
    if not raw.startswith(b"{"):
        return True
    seen = []

    def pairs(items):
        if len({k for k, _ in items}) != len(items):
            seen.append(True)
        return dict(items)

    try:
        json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return False
    return bool(seen)


def check_file(path, blob):
    path.write_bytes(blob)
    accepted, tensors, metadata = _official(str(path))
    try:
        ours = sio.SafetensorsFile(path)
    except CheckpointError:
        assert not accepted or _spec_stricter(blob), \
            "refopt refused a file the safetensors package accepts"
        return "refused"
    with ours:
        assert accepted, "refopt accepted a file the safetensors package refuses"
        assert set(ours.keys()) == set(tensors)
        assert ours.metadata == metadata
        for k, (dtype, shape, array) in tensors.items():
            assert (ours.dtype(k), ours.shape(k)) == (dtype, shape), k
            try:
                mine = ours.array(k)
            except CheckpointError:
                # refopt reads no float8/float6/float4 tensors (the package does when ml_dtypes
                # is installed); for the dtypes it reads, it must read what the package reads
                assert array is None or dtype not in sio.NUMPY, \
                    f"refopt cannot read tensor {k!r}, the package can"
                continue
            if array is not None:
                assert mine.shape == array.shape, k
                assert dtype == "BF16" or mine.dtype == array.dtype, k   # BF16: raw uint16 bits
                assert mine.tobytes() == array.tobytes(), k
    return "accepted"


@settings(max_examples=EXAMPLES)
@given(mutated_file())
def test_refopt_accepts_exactly_what_the_package_accepts(tmp_path_factory, case):
    kind, blob = case
    event(f"{kind}: {check_file(tmp_path_factory.mktemp('st') / 'f.safetensors', blob)}")


@settings(max_examples=max(EXAMPLES // 3, 20))
@given(valid_file())
def test_written_files_read_back_in_both_readers(tmp_path_factory, made):
    """refopt's writer: the package reads what refopt writes, identically."""
    header, data = made
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype == "BF16":
            continue
        b, e = info["data_offsets"]
        tensors[name] = np.frombuffer(data[b:e], sio.NUMPY[dtype]).reshape(info["shape"])
    metadata = header.get("__metadata__")
    path = tmp_path_factory.mktemp("w") / "f.safetensors"
    sio.save(tensors, path, metadata=metadata)
    assert check_file(path, path.read_bytes()) == "accepted"
    accepted, official, meta = _official(str(path))
    assert meta == metadata
    for name, arr in tensors.items():
        assert official[name][2].tobytes() == arr.tobytes()


def test_bfloat16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch for the package's bfloat16 reader")
    from safetensors.torch import save_file
    values = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": values}, str(tmp_path / "b.safetensors"))
    with sio.SafetensorsFile(tmp_path / "b.safetensors") as f:
        ours = f.tensor("w")
    np.testing.assert_array_equal(ours, values.float().numpy())


@pytest.mark.parametrize("text,accepted", [
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1.7976931348623157e308}}', True),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1.7976931348623158e308}}', False),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":0e999999999999}}', True),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e99999999999}}', False),
    ('{"a":["F32",[2],[0,8]]}', True),
    ('{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', True),
    ('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,8]}}', False),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', None),
    (' {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', None),
])
def test_known_edges(tmp_path, text, accepted):
    """serde_json's number range and struct forms; None: the package accepts, the spec forbids."""
    blob = struct.pack("<Q", len(text)) + text.encode() + b"\0" * 8
    outcome = check_file(tmp_path / "f.safetensors", blob)
    assert outcome == {True: "accepted", False: "refused", None: "refused"}[accepted]
    if accepted is None:
        assert _official(str(tmp_path / "f.safetensors"))[0]
