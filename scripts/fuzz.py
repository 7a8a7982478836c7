"""A seeded fuzz run over refopt's file and API boundaries.

    python scripts/fuzz.py --cases 10000 --seed 0 [--kinds safetensors,h5,...] [--timeout 20]

Each case draws one input of a kind -- a mutated ``model.safetensors`` or ``model.weights.h5``, a
mutated ``config.json`` (either dialect), mutated tokenizer files, a special file (FIFO,
``/dev/zero``, a directory) in place of a preset file, random API arguments, a save into a random
destination, a save killed after a random file-system call -- runs refopt on it and classifies the
outcome against an independent oracle:

* ``accepted``: refopt accepted it and the result is what the oracle computes (the official
  ``safetensors`` package's or h5py's tensors, the JSON values typed strictly, a tokenizer that
  round-trips, well-formed logits, the saved preset, the old or new preset after a kill);
* ``refused``: refopt raised a named :class:`refopt.errors.RefoptError` (for a file the oracle says
  is valid, that is a ``wrong`` outcome instead);
* failures: ``escaped`` (any other exception), ``wrong`` (a silent wrong result or a wrong refusal),
  ``hang`` (over ``--timeout`` seconds), ``lost`` (a file that is not part of a preset changed or
  vanished).

It prints the counts by kind and outcome and exits with status 1 if any case failed (with the
seed of the first failures, to reproduce one: ``--seed S --cases 1``).  ``tests/test_fuzz.py`` runs
the same cases, driven by hypothesis, a few hundred per kind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("REFOPT_BACKEND", "numpy")

from refopt.errors import RefoptError  # noqa: E402

FAILURES = ("escaped", "wrong", "hang", "lost")
VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "Ġ": 4, "a": 5, "b": 6, "c": 7, "ab": 8,
         "Ġa": 9, "abc": 10}
MERGES = ["a b", "Ġ a", "ab c"]
PROBES = ["abc", " a b", "cab</s>", "", "a" * 7]


class Wrong(AssertionError):
    """The oracle disagrees with what refopt returned."""


class Lost(AssertionError):
    """A file that is not part of a preset changed or vanished."""


class Hang(BaseException):
    pass


# ------------------------------------------------------------------------------------ fixtures
class Fixtures:
    """Small presets in both layouts, made once per run, and scratch space per case."""

    def __init__(self, root: Path):
        from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor, OPTTokenizer

        self.root = root
        tok = OPTTokenizer(vocabulary=VOCAB, merges=MERGES, compiled=False)
        pre = OPTCausalLMPreprocessor(tok, sequence_length=6)
        self.cfg_args = dict(vocabulary_size=11, num_layers=2, num_heads=2, hidden_dim=4,
                             intermediate_dim=6, max_sequence_length=8, dropout=0.0)
        self.model = OPTCausalLM(OPTBackbone(**self.cfg_args, seed=7), preprocessor=pre)
        self.model.backbone.backend = "numpy"
        self.presets = {}
        for fmt in ("keras", "huggingface"):
            self.presets[fmt] = root / f"base-{fmt}"
            self.model.save_to_preset(self.presets[fmt], format=fmt)
        self.counter = 0

    def scratch(self) -> Path:
        self.counter += 1
        path = self.root / f"case{self.counter}"
        path.mkdir()
        return path

    def copy(self, fmt: str) -> Path:
        dst = self.scratch() / "preset"
        shutil.copytree(self.presets[fmt], dst)
        return dst


# ------------------------------------------------------------------------------------ helpers
def json_value(rng: random.Random, depth: int = 0):
    """A random JSON value, biased to the ones that confuse lenient parsers."""
    pool = ["false", "true", "0", "1", "", "null", True, False, None, 0, 1, -1, 2, 1.0, 0.5, -0.0,
            2**31, 2**63, 2**64, 10**30, 1e-300, 1e300, "float32", "relu", [], {}, [1], {"a": 1}]
    if depth < 3 and rng.random() < 0.15:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and rng.random() < 0.1:
        return {rng.choice(["a", "name", "config", "dtype"]): json_value(rng, depth + 1)}
    return rng.choice(pool)


def raw_edits(rng: random.Random, text: str) -> str:
    """Textual JSON damage: NaN, duplicate keys, deep nesting, truncation."""
    choice = rng.randrange(5)
    if choice == 0 and "{" in text:
        return text.replace("{", '{"x": NaN, ', 1)
    if choice == 1 and text.startswith("{") and len(text) > 2:
        inner = text[1:]
        key = inner.split(":", 1)[0]
        return "{" + key + ": 1, " + inner
    if choice == 2:
        depth = rng.choice([50, 100, 200, 100000])
        return text.replace("{", '{"deep": ' + "[" * depth + "]" * depth + ", ", 1)
    if choice == 3:
        return text[:rng.randrange(len(text) + 1)]
    return text + rng.choice(["", " ", "x", "}", "\x00"])


def flip_bytes(rng: random.Random, data: bytes, n: int = 4, start: int = 0) -> bytes:
    out = bytearray(data)
    for _ in range(n):
        if len(out) > start:
            at = rng.randrange(start, len(out))
            out[at] ^= rng.randrange(1, 256)
    return bytes(out)


def tree(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            try:
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, root)] = fh.read()
            except OSError:
                out[os.path.relpath(p, root)] = None
    return out


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k]),
                                                       equal_nan=True) for k in a)


def cli_one_line(argv) -> None:
    """Run the CLI; a failure must be status 2 with one line on stderr."""
    from refopt import cli

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(argv)
    if code not in (0, 2):
        raise Wrong(f"refopt {' '.join(argv)}: exit status {code}: {err.getvalue().strip()}")
    if code == 2 and len(err.getvalue().strip().splitlines()) != 1:
        raise Wrong(f"refopt {' '.join(argv)}: not one line: {err.getvalue()!r}")


# ------------------------------------------------------------------------------------ oracles
def official_state(path: Path):
    """The tensors of a transformers checkpoint as the official package reads them, or None when
    the package (or the specification) refuses the file."""
    from safetensors import safe_open

    from refopt.io import safetensors_io as sio

    blob = path.read_bytes()
    if len(blob) >= 9:
        (n,) = struct.unpack("<Q", blob[:8])
        raw = blob[8:8 + n]
        dup = []
        try:
            json.loads(raw.decode("utf-8"), object_pairs_hook=lambda items: dup.append(
                len({k for k, _ in items}) != len(items)) or dict(items))
        except (ValueError, RecursionError):
            pass
        if not raw.startswith(b"{") or any(dup):
            return None                          # the specification forbids it
    try:
        with safe_open(str(path), framework="np") as f:
            out = {}
            for k in f.keys():
                dtype = f.get_slice(k).get_dtype()
                if dtype == "BF16":
                    b, e = json.loads(raw)[k]["data_offsets"]
                    bits = np.frombuffer(blob[8 + n + b:8 + n + e], "<u2")
                    out[k] = (dtype, sio.bfloat16_to_float32(bits).reshape(f.get_slice(k).get_shape()))
                else:
                    out[k] = (dtype, f.get_tensor(k))
            return out
    except Exception:
        return None


def expected_hf(state, cfg):
    """refopt's parameters from an official state dict, or None when the model cannot be one."""
    from refopt.io import huggingface
    from refopt.model import param_shapes

    if state is None:
        return None
    state = {huggingface.canonical_name(k): v for k, v in state.items()}
    mapping = huggingface.name_map(cfg)
    shapes = param_shapes(cfg)
    wanted = set(mapping.values()) | {huggingface.POSITIONS_NAME}
    if set(state) - {"lm_head.weight"} != wanted:
        return None
    out = {}
    for ours, theirs in list(mapping.items()) + [("embed_positions", huggingface.POSITIONS_NAME)]:
        dtype, arr = state[theirs]
        want = shapes[ours] if ours != "embed_positions" else (shapes[ours][0] + 2, shapes[ours][1])
        if dtype not in ("F16", "BF16", "F32", "F64") or tuple(arr.shape) != tuple(want):
            return None
        if not np.isfinite(arr).all():
            return None
        out[ours] = arr[2:] if ours == "embed_positions" else arr
    if "lm_head.weight" in state:
        dtype, arr = state["lm_head.weight"]
        if tuple(arr.shape) != tuple(shapes["embed_tokens"]) or dtype not in ("F16", "BF16", "F32", "F64"):
            return None
    return {k: np.asarray(v).astype(np.float32) for k, v in out.items()}


def expected_h5(path: Path, cfg):
    """refopt's parameters read directly with h5py, or None when the tree is not a valid one."""
    import h5py

    from refopt.io import keras_h5
    from refopt.model import param_shapes

    layout = keras_h5.layout(cfg)
    shapes = param_shapes(cfg)
    try:
        with h5py.File(path, "r") as f:
            links, datasets = [], []
            f.visititems_links(lambda n, link: links.append((n, type(link).__name__)))
            if any(kind != "HardLink" for _, kind in links):
                return None
            f.visititems(lambda n, o: datasets.append(n) if isinstance(o, h5py.Dataset) else None)
            if sorted(datasets) != sorted(where for where, _ in layout.values()):
                return None
            out = {}
            for ours, (where, stored) in layout.items():
                ds = f[where]
                if ds.dtype.kind != "f" or ds.dtype.itemsize not in (2, 4, 8) or ds.shape != stored \
                        or ds.external or ds.is_virtual:
                    return None
                arr = np.asarray(ds[()])
                if not np.isfinite(arr).all():
                    return None
                out[ours] = keras_h5.from_keras(ours, arr, shapes[ours]).astype(np.float32)
            return out
    except Exception:
        return None


def write_text_damaged(rng, path: Path, text: str, preset: Path) -> None:
    """Write ``text`` (a few flipped bytes, one time in twenty); sometimes run ``refopt info``."""
    path.write_bytes(text.encode("utf-8", "surrogatepass") if rng.random() < 0.95
                     else flip_bytes(rng, text.encode(), 2))
    if rng.random() < 0.1:
        cli_one_line(["info", str(preset)])


def compare_load(preset: Path, expected, oracle: str) -> str:
    """Load ``preset``; it must succeed exactly when ``expected`` (the oracle's parameters) is not
    None, and then give those parameters."""
    from refopt.models import OPTBackbone

    try:
        got = OPTBackbone.from_preset(preset)
    except RefoptError:
        if expected is not None:
            raise Wrong(f"refused a checkpoint that {oracle} reads as a valid model") from None
        return "refused"
    if expected is None:
        raise Wrong(f"accepted a checkpoint that {oracle} refuses or that is not a valid model")
    if not same_params(got.params, expected):
        raise Wrong(f"loaded tensors differ from {oracle}'s")
    return "accepted"


def make_special(path: Path, kind: str) -> None:
    """Replace ``path`` by a FIFO, a link to /dev/zero, a directory, an empty file or a symlink
    loop."""
    if os.path.lexists(path):
        os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "loop":
        os.symlink(path, path)
    else:
        path.touch()


# ------------------------------------------------------------------------------------ case kinds
def case_safetensors(rng, fx: Fixtures):
    """A mutated model.safetensors in a transformers preset."""
    d = fx.copy("huggingface")
    path = d / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = bytearray(blob[8 + n:])
    names = [k for k in header if k != "__metadata__"]
    how = rng.randrange(10)
    text = None
    if how == 0:                                          # a JSON value changed
        name = rng.choice(names)
        field = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        header[name][field] = json_value(rng) if rng.random() < 0.6 else rng.choice(
            ["F16", "BF16", "F64", "I32", "U8", "F8_E4M3"])
    elif how == 1:                                        # a tensor dropped or renamed
        name = rng.choice(names)
        info = header.pop(name)
        if rng.random() < 0.5:
            header[name.replace("decoder", rng.choice(["decoders", "decoder.x"]))] = info
    elif how == 2:                                        # offsets shifted
        name = rng.choice(names)
        b, e = header[name]["data_offsets"]
        delta = rng.choice([-4, -1, 1, 4])
        header[name]["data_offsets"] = [max(b + delta, 0), max(e + delta, 0)]
    elif how == 3:                                        # non-finite values in the data
        name = rng.choice(names)
        b, e = header[name]["data_offsets"]
        if e > b:
            at = b + 4 * rng.randrange((e - b) // 4)
            data[at:at + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf")]))
    elif how == 4:                                        # a valid re-encoding in another dtype
        dtype = rng.choice(["F16", "F64", "BF16"])
        from refopt.io import safetensors_io as sio
        state = sio.load(path)
        if dtype == "BF16":
            new_header, offset, blobs = {}, 0, []
            for k, v in state.items():
                bits = sio.float32_to_bfloat16(np.asarray(v, np.float32)).tobytes()
                new_header[k] = {"dtype": "BF16", "shape": list(v.shape),
                                 "data_offsets": [offset, offset + len(bits)]}
                blobs.append(bits)
                offset += len(bits)
            raw = json.dumps(new_header).encode()
            path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
        else:
            sio.save({k: np.asarray(v).astype({"F16": np.float16, "F64": np.float64}[dtype])
                      for k, v in state.items()}, path)
        blob = path.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
        data = bytearray(blob[8 + n:])
    elif how == 5:
        text = raw_edits(rng, json.dumps(header))
    if how in (0, 1, 2, 3, 4, 5):
        raw = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
        blob = struct.pack("<Q", len(raw)) + raw + bytes(data)
    elif how == 6:
        blob = flip_bytes(rng, blob, rng.randint(1, 6))
    elif how == 7:
        blob = blob[:rng.randrange(len(blob))]
    elif how == 8:
        blob = struct.pack("<Q", (n + rng.choice([-1, 1, 7, 2**40])) % 2**64) + blob[8:]
    else:
        blob = blob + bytes(rng.randrange(1, 16))
    path.write_bytes(blob)
    expected = expected_hf(official_state(path), fx.model.backbone.config)
    if rng.random() < 0.1:
        cli_one_line(["info", str(d)])
    return compare_load(d, expected, "the official safetensors package")


def case_h5(rng, fx: Fixtures):
    """A mutated KerasHub model.weights.h5."""
    import h5py

    from refopt.io import keras_h5

    d = fx.copy("keras")
    path = d / "model.weights.h5"
    cfg = fx.model.backbone.config
    paths = [where for where, _ in keras_h5.layout(cfg).values()]
    how = rng.randrange(9)
    if how == 8:
        path.write_bytes(flip_bytes(rng, path.read_bytes(), rng.randint(1, 8)))
    else:
        with h5py.File(path, "a") as f:
            where = rng.choice(paths)
            data = np.asarray(f[where][()])
            if how == 0:
                del f[where]
            elif how == 1:
                f.move(where, where.replace("vars/", "vars_x/"))
            elif how == 2:
                del f[where]
                f.create_dataset(where, data=data.astype(rng.choice(["int32", "float16", "float64",
                                                                      ">f4", "int8"])))
            elif how == 3:
                del f[where]
                f.create_dataset(where, data=np.zeros(data.size + rng.choice([-1, 1]), np.float32))
            elif how == 4:
                del f[where]
                f[where] = rng.choice([h5py.SoftLink("/" + rng.choice(paths)),
                                       h5py.ExternalLink("elsewhere.h5", "/x")])
            elif how == 5:
                f.create_dataset(f"layers/extra_{rng.randrange(9)}/vars/0", data=np.zeros(2))
            elif how == 6:
                flat = data.reshape(-1).copy()
                if flat.size:
                    flat[rng.randrange(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
                f[where][...] = flat.reshape(data.shape)
            else:
                f[where].attrs["note"] = "harmless"
    return compare_load(d, expected_h5(path, cfg), "h5py")


# config.json keys -> (refopt field, type) in either dialect
TYPED = {"keras": {"vocabulary_size": int, "num_layers": int, "num_heads": int, "hidden_dim": int,
                   "intermediate_dim": int, "max_sequence_length": int, "dropout": float,
                   "do_layer_norm_before": bool, "enable_bias": bool,
                   "layer_norm_elementwise_affine": bool, "remove_final_layer_norm": bool,
                   "layer_norm_epsilon": float, "pad_token_id": int, "bos_token_id": int,
                   "eos_token_id": int, "word_embed_proj_dim": int},
         "huggingface": {"vocab_size": ("vocabulary_size", int), "num_hidden_layers": ("num_layers", int),
                         "num_attention_heads": ("num_heads", int), "hidden_size": ("hidden_dim", int),
                         "ffn_dim": ("intermediate_dim", int),
                         "max_position_embeddings": ("max_sequence_length", int),
                         "dropout": ("dropout", float), "do_layer_norm_before": ("do_layer_norm_before", bool),
                         "enable_bias": ("enable_bias", bool),
                         "layer_norm_elementwise_affine": ("layer_norm_elementwise_affine", bool),
                         "_remove_final_layer_norm": ("remove_final_layer_norm", bool),
                         "pad_token_id": ("pad_token_id", int), "bos_token_id": ("bos_token_id", int),
                         "eos_token_id": ("eos_token_id", int),
                         "word_embed_proj_dim": ("word_embed_proj_dim", int),
                         "layer_norm_epsilon": ("layer_norm_epsilon", float)}}


def _strict(value, kind) -> bool:
    if kind is bool:
        return type(value) is bool
    if kind is int:
        return type(value) is int
    return type(value) in (int, float)


def case_config(rng, fx: Fixtures):
    """A mutated config.json (either dialect)."""
    from refopt.models import OPTBackbone

    fmt = rng.choice(["keras", "huggingface"])
    d = fx.copy(fmt)
    path = d / "config.json"
    data = json.loads(path.read_text())
    inner = data["config"] if fmt == "keras" else data
    keys = list(TYPED[fmt])
    how = rng.randrange(6)
    if how in (0, 1, 2):
        inner[rng.choice(keys)] = json_value(rng)
    elif how == 3:
        inner.pop(rng.choice(list(inner)), None)
    elif how == 4:
        inner[rng.choice(["extra", "nam", "Dtype"])] = json_value(rng)
    text = json.dumps(data)
    if how == 5:
        text = raw_edits(rng, text)
    write_text_damaged(rng, path, text, d)
    try:
        got = OPTBackbone.from_preset(d)
    except RefoptError:
        return "refused"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise Wrong("accepted a config.json that is not strict JSON") from None
    inner = saved["config"] if fmt == "keras" else saved
    for key, spec in TYPED[fmt].items():
        field, kind = (key, spec) if fmt == "keras" else spec
        if key in inner and inner[key] is not None:
            if not _strict(inner[key], kind):
                raise Wrong(f"accepted {key}={inner[key]!r} for a {kind.__name__}")
            if getattr(got.config, field) != inner[key]:
                raise Wrong(f"{key}={inner[key]!r} read as {getattr(got.config, field)!r}")
    if not np.array_equal(got.params["embed_tokens"], fx.model.backbone.params["embed_tokens"]):
        raise Wrong("weights changed")
    return "accepted"


TOKENIZER_FILES = {"keras": ["tokenizer.json", "preprocessor.json", "assets/tokenizer/vocabulary.json",
                             "assets/tokenizer/merges.txt"],
                   "huggingface": ["vocab.json", "merges.txt", "tokenizer_config.json"]}


def case_tokenizer(rng, fx: Fixtures):
    """Mutated tokenizer files (vocabulary, merges, tokenizer and preprocessor configs)."""
    from refopt.models import OPTCausalLMPreprocessor

    fmt = rng.choice(["keras", "huggingface"])
    d = fx.copy(fmt)
    name = rng.choice(TOKENIZER_FILES[fmt])
    path = d / name
    text = path.read_text(encoding="utf-8")
    how = rng.randrange(6)
    if name.endswith("merges.txt"):
        lines = text.split("\n")
        if how < 3:
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(
                ["a", "a  b", "x y", "Ġ", "a b c", "#version: 0.2", "", "\r", "ab\tc", "ab c"]))
        elif how == 3:
            lines = lines[:rng.randrange(len(lines) + 1)]
        text = "\n".join(lines) if how < 5 else text.replace("\n", "\r\n")
    else:
        data = json.loads(text)
        target = data.get("config", data) if isinstance(data, dict) else data
        if how < 4 and isinstance(target, dict) and target:
            key = rng.choice(list(target))
            target[key] = json_value(rng)
            if name.endswith(("vocab.json", "vocabulary.json")) and rng.random() < 0.5:
                target[rng.choice(list(target))] = rng.choice([10, 2**31, -1, "1", 1.5, 3])
            if name == "tokenizer_config.json" and rng.random() < 0.5:
                target["add_prefix_space"] = json_value(rng)
        text = json.dumps(data)
        if how >= 4:
            text = raw_edits(rng, text)
    write_text_damaged(rng, path, text, d)
    try:
        pre = OPTCausalLMPreprocessor.from_preset(d, compiled=False)
    except RefoptError:
        return "refused"
    tok = pre.tokenizer
    if fmt == "huggingface":
        cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        if "add_prefix_space" in cfg and (type(cfg["add_prefix_space"]) is not bool
                                          or cfg["add_prefix_space"] != tok.add_prefix_space):
            raise Wrong(f"add_prefix_space={cfg['add_prefix_space']!r} read as {tok.add_prefix_space}")
    for text in PROBES:
        try:
            ids = tok(text)
        except RefoptError:
            continue
        if tok.sequence_length is not None:              # padded to a length: ids in range only
            ids = np.asarray(ids).tolist()
            if any(not 0 <= i < tok.vocabulary_size() + 64 for i in ids):
                raise Wrong(f"ids {ids} outside the vocabulary")
            continue
        if any(not 0 <= i < tok.vocabulary_size() + 64 for i in ids):
            raise Wrong(f"ids {ids} outside the vocabulary")
        back = tok.detokenize(ids) if ids else ""
        specials = set(tok.special_tokens)
        if not any(s in text for s in specials) and back != (" " + text if tok.add_prefix_space
                                                            and text and not text.startswith(" ")
                                                            else text):
            raise Wrong(f"{text!r} -> {ids} -> {back!r}")
    return "accepted"


def case_special(rng, fx: Fixtures):
    """A FIFO, /dev/zero, a directory, an empty file or a symlink loop instead of a preset file."""
    from refopt.models import OPTCausalLM

    fmt = rng.choice(["keras", "huggingface"])
    d = fx.copy(fmt)
    names = [str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()]
    name = rng.choice(names)
    kind = rng.choice(["fifo", "dev-zero", "directory", "empty", "loop"])
    make_special(d / name, kind)
    try:
        OPTCausalLM.from_preset(d, preprocessor="auto")
    except RefoptError:
        return "refused"
    unread = ("metadata.json", "task.json", "generation_config.json", "special_tokens_map.json")
    if name not in unread and not (kind == "empty" and name.endswith("merges.txt")):
        raise Wrong(f"accepted a preset whose {name} is {kind}")
    return "accepted"


def _random_ids(rng, V):
    kind = rng.randrange(10)
    B, S = rng.randint(0, 3), rng.randint(0, 9)
    if kind == 0:
        return [[rng.randrange(V) for _ in range(S)] for _ in range(B)]
    if kind == 1:
        return np.array([[rng.choice([-1, V, 2**40, 0]) for _ in range(S)] for _ in range(B)])
    if kind == 2:
        return [[rng.randrange(V) for _ in range(rng.randint(0, 4))] for _ in range(B)]
    if kind == 3:
        return np.zeros((B, S), rng.choice(["float32", "bool", "uint8", "int8", "object"]))
    if kind == 4:
        return rng.choice(["text", ["a", "b"], None, 3, {"x": 1}, np.zeros((1, 2, 3), int)])
    return np.array([[rng.randrange(V) for _ in range(S)] for _ in range(B)], np.int64)


def case_api(rng, fx: Fixtures):
    """Random arguments to predict, generate, samplers, the tokenizer and the preprocessor."""
    from refopt import samplers

    lm = fx.model
    V = lm.backbone.vocabulary_size
    what = rng.randrange(7)
    try:
        if what == 0:
            ids = _random_ids(rng, V)
            x = ids if rng.random() < 0.3 else {"token_ids": ids}
            if isinstance(x, dict) and rng.random() < 0.5:
                try:
                    shape = np.shape(ids)
                except ValueError:                        # ragged rows
                    shape = (1, 2)
                x["padding_mask"] = rng.choice([None, [[1, 0]], np.ones(shape, int) * 2,
                                                np.ones(shape, bool)])
            out = lm.predict(x, batch_size=rng.choice([None, 1, 0, -1, True, 2.5, 10**9]))
            arr = np.asarray(ids)
            if out.ndim != 3 or out.shape[-1] != V or not np.isfinite(out).all():
                raise Wrong(f"predict returned shape {out.shape}")
            if arr.ndim == 2 and out.shape[:2] != arr.shape:
                raise Wrong(f"predict returned shape {out.shape} for ids {arr.shape}")
        elif what == 1:
            sampler = rng.choice([
                "greedy", "top_k", "random", lambda: samplers.BeamSampler(num_beams=rng.choice([1, 2, 10**6, 0, -3])),
                lambda: samplers.TopKSampler(k=rng.choice([1, 3, 10**9, 0, 2.5])),
                lambda: samplers.TopPSampler(p=rng.choice([0.5, 1.0, 0.0, 2.0, float("nan")])),
                lambda: samplers.ContrastiveSampler(k=rng.choice([2, 10**7]))])
            lm.compile(sampler=sampler() if callable(sampler) else sampler)
            prompt = rng.choice(["ab", ["a", "abc"], "", ["</s>"], 5, None, [""], "cab", ["b", "ca"]])
            out = lm.generate(prompt, max_length=rng.choice([None, 3, 8, 8, 6, 9, 0, -1, 2.0, 10**12,
                                                             True]))
            if not isinstance(out, (str, list)):
                raise Wrong(f"generate returned {type(out).__name__}")
        elif what == 2:
            tok = lm.preprocessor.tokenizer
            arg = rng.choice(["abc", ["a", 1], None, b"ab", "\ud800", np.array(["ab"]), 5, ["x" * 50]])
            tok(arg)
            tok.detokenize(rng.choice([[1, 2], [[1], [2, 3]], [-1], [2**40], "ab", [1.5], [True],
                                       np.array([[1, 2]]), 3]))
        elif what == 3:
            pre = lm.preprocessor
            pre(rng.choice(["ab", ["ab", "c"], 3, None]),
                sequence_length=rng.choice([None, 1, 4, 0, -2, 2**40, 1.5]))
        elif what == 4:
            from refopt.models import OPTTokenizer
            OPTTokenizer(vocabulary=rng.choice([VOCAB, {"a": 1}, {"<pad>": 1, "</s>": 2**31}, [], "x"]),
                         merges=rng.choice([MERGES, ["a"], [("a", "b")], [1], None]),
                         sequence_length=rng.choice([None, 4, -1, 2**40, "4"]),
                         add_prefix_space=rng.choice([True, False, "false", 1]))
        elif what == 6:                                    # odd preset and save arguments
            from refopt.models import OPTCausalLM
            odd = rng.choice([5, b"x", None, "x" * 5000, "a\0b", "hf://x/y", "kaggle://x",
                              "opt_999m_en", fx.root / "nope", "", ".", ["p"]])
            if rng.random() < 0.5:
                OPTCausalLM.from_preset(odd)
            else:                                          # saves land in scratch space only
                where = fx.scratch()
                target = where / odd if isinstance(odd, str) and odd not in ("", ".") else (
                    where / "x" if odd in (None, "", ".") else odd)
                lm.backbone.save_to_preset(target,
                                           format=rng.choice(["keras", "huggingface", "onnx", 1]),
                                           overwrite=rng.choice([False, True, "yes", 1]))
        else:
            from refopt.models import OPTBackbone
            args = dict(fx.cfg_args)
            key = rng.choice(list(args))
            args[key] = rng.choice([0, -1, 2**20, 2**40, 1.5, True, "2", None])
            OPTBackbone(**args)
    except RefoptError:
        return "refused"
    finally:
        lm.compile(sampler="greedy")
    return "accepted"


def _user_files(rng, d: Path) -> None:
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["notes.txt", ".hidden", "sub/data.bin", "assets/logo.png",
                           "assets/tokenizer/extra.txt", "README.md", "config.json.bak"])
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(os.urandom(rng.randint(0, 16)))


def case_save(rng, fx: Fixtures):
    """A save (model, backbone, tokenizer, preprocessor, convert) into a random destination."""
    from refopt.errors import DestinationError, SaveError
    from refopt.io import preset_layout
    from refopt.models import OPTCausalLM

    base = fx.scratch()
    state = rng.choice(["missing", "empty", "preset", "preset+user", "user", "file", "symlink",
                        "dangling", "cwd", "empty-string"])
    dst = base / "dst"
    if state == "empty":
        dst.mkdir()
    elif state in ("preset", "preset+user"):
        shutil.copytree(fx.presets[rng.choice(["keras", "huggingface"])], dst)
        if state == "preset+user":
            _user_files(rng, dst)
    elif state == "user":
        dst.mkdir()
        _user_files(rng, dst)
    elif state == "file":
        dst.write_bytes(b"precious")
    elif state == "symlink":
        (base / "real").mkdir()
        _user_files(rng, base / "real")
        os.symlink(base / "real", dst)
    elif state == "dangling":
        os.symlink(base / "nowhere", dst)
    before = tree(base)
    overwrite = rng.random() < 0.5
    what = rng.choice(["lm-keras", "lm-hf", "backbone", "tokenizer", "preprocessor", "convert"])
    target = dst
    cwd = os.getcwd()
    if state in ("cwd", "empty-string"):
        dst.mkdir()
        _user_files(rng, dst)
        before = tree(base)
        os.chdir(dst)
        target = "." if state == "cwd" else ""
    try:
        lm = fx.model
        if what == "lm-keras":
            lm.save_to_preset(target, overwrite=overwrite)
        elif what == "lm-hf":
            lm.save_to_preset(target, format="huggingface", overwrite=overwrite)
        elif what == "backbone":
            lm.backbone.save_to_preset(target, overwrite=overwrite)
        elif what == "tokenizer":
            lm.preprocessor.tokenizer.save_to_preset(target, overwrite=overwrite)
        elif what == "preprocessor":
            lm.preprocessor.save_to_preset(target, overwrite=overwrite)
        else:
            cli_one_line(["convert", str(fx.presets["keras"]), str(target), "--format",
                          rng.choice(["keras", "huggingface"])] + (["--force"] if overwrite else []))
        outcome = "accepted"
    except (DestinationError, SaveError):
        outcome = "refused"
    finally:
        os.chdir(cwd)
    after = tree(base)
    real = dst if state != "symlink" else base / "real"
    for rel, data in before.items():
        inside = os.path.relpath(base / rel, real)
        if not inside.startswith("..") and preset_layout.is_preset_file(inside.replace(os.sep, "/")):
            continue                                       # a preset file may be replaced
        if after.get(rel) != data:
            raise Lost(f"{rel} changed or vanished ({state}, {what}, overwrite={overwrite})")
    if outcome == "refused" and after != before:
        raise Lost(f"a refused save changed files ({state}, {what})")
    if outcome == "accepted" and what in ("lm-keras", "lm-hf") and state != "file":
        got = OPTCausalLM.from_preset(real)
        if not same_params(got.backbone.params, lm.backbone.params):
            raise Wrong("the saved preset loads other weights")
    return outcome


def case_kill(rng, fx: Fixtures):
    """A save over an existing preset (user files beside it) killed after a random call."""
    from refopt.io import journal, preset_layout
    from refopt.models import OPTCausalLM

    class Killed(BaseException):
        pass

    class Dying(journal.FileSystem):
        def __init__(self, limit):
            self.limit, self.calls = limit, 0

        def __getattribute__(self, name):
            attr = object.__getattribute__(self, name)
            if name in ("mkdir", "create", "pwrite", "truncate", "fsync", "close", "replace",
                        "rename", "unlink", "rmdir", "fsync_dir"):
                def step(*args):
                    if self.calls >= self.limit:
                        raise Killed(name)
                    self.calls += 1
                    return attr(*args)
                return step
            return attr

    fmt_old, fmt_new = rng.choice(["keras", "huggingface"]), rng.choice(["keras", "huggingface"])
    base = fx.scratch()
    dst = base / "p"
    shutil.copytree(fx.presets[fmt_old], dst)
    _user_files(rng, dst)
    user = {k: v for k, v in tree(dst).items() if not preset_layout.is_preset_file(k.replace(os.sep, "/"))}
    old = OPTCausalLM.from_preset(dst).backbone.params
    from refopt.models import OPTBackbone
    new_lm = OPTCausalLM(OPTBackbone(**fx.cfg_args, seed=rng.randrange(1000)),
                         preprocessor=fx.model.preprocessor)
    limit = rng.randrange(300)
    real = journal.fs
    journal.fs = Dying(limit)
    try:
        new_lm.save_to_preset(dst, format=fmt_new, overwrite=True)
        killed = False
    except Killed:
        killed = True
    finally:
        journal.fs = real
    got = OPTCausalLM.from_preset(dst).backbone.params
    if not (same_params(got, new_lm.backbone.params) or (killed and same_params(got, old))):
        raise Wrong(f"after a kill at call {limit}: neither the old nor the new preset")
    for rel, data in user.items():
        if tree(dst).get(rel) != data:
            raise Lost(f"{rel} changed after a kill at call {limit}")
    return "accepted"                                      # old or new preset, verified


KINDS = {"safetensors": case_safetensors, "h5": case_h5, "config": case_config,
         "tokenizer": case_tokenizer, "special-file": case_special, "api": case_api,
         "save": case_save, "kill": case_kill}


# ------------------------------------------------------------------------------------ the run
def run_case(kind: str, rng: random.Random, fx: Fixtures, timeout: float = 20.0):
    """(outcome, detail) of one case."""
    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return KINDS[kind](rng, fx), ""
    except Hang:
        return "hang", f"over {timeout} s"
    except Lost as e:
        return "lost", str(e)
    except Wrong as e:
        return "wrong", str(e)
    except RefoptError as e:
        return "refused", str(e)
    except Exception as e:
        return "escaped", "".join(traceback.format_exception_only(type(e), e)).strip() + "\n" + \
            "".join(traceback.format_tb(e.__traceback__)[-3:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of "
                        + ", ".join(KINDS))
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a case is a hang")
    parser.add_argument("--show", type=int, default=5, help="failures to print in full")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    counts: dict[str, Counter] = defaultdict(Counter)
    failures = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="refopt-fuzz-") as tmp:
        fx = Fixtures(Path(tmp))
        for i in range(args.cases):
            seed = args.seed + i
            kind = kinds[i % len(kinds)]
            outcome, detail = run_case(kind, random.Random(seed), fx, args.timeout)
            counts[kind][outcome] += 1
            if outcome in FAILURES:
                failures.append((seed, kind, outcome, detail))
            if fx.counter > 200:                          # keep the scratch space small
                for p in Path(tmp).glob("case*"):
                    _remove(p)
                fx.counter = 0
    outcomes = ["accepted", "refused", *FAILURES]
    width = max(len(k) for k in counts) + 2
    print(f"{'kind'.ljust(width)}" + "".join(o.rjust(10) for o in outcomes) + "total".rjust(10))
    for kind in kinds:
        c = counts[kind]
        print(kind.ljust(width) + "".join(str(c[o]).rjust(10) for o in outcomes)
              + str(sum(c.values())).rjust(10))
    total = Counter()
    for c in counts.values():
        total.update(c)
    print("all".ljust(width) + "".join(str(total[o]).rjust(10) for o in outcomes)
          + str(sum(total.values())).rjust(10))
    print(f"{args.cases} cases, seed {args.seed}, {time.time() - started:.0f} s")
    for seed, kind, outcome, detail in failures[:args.show]:
        print(f"\n--- {outcome}: kind {kind}, seed {seed} (--seed {seed} --cases 1 --kinds {kind})\n"
              f"{detail}")
    return 1 if failures else 0


def _remove(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
