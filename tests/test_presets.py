"""Loading and saving presets in both layouts; every bad input raises a refopt.errors exception."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from conftest import shared_path
from refopt.errors import (CheckpointError, ConfigError, InputError, InputTypeError,
                           PresetNotFoundError)
from refopt.io import checkpoint, keras_h5, safetensors_io
from refopt.models import OPTBackbone, OPTCausalLM


def tiny(**kw):
    args = dict(vocabulary_size=40, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=12,
                max_sequence_length=16, dropout=0.0)
    args.update(kw)
    return OPTCausalLM(OPTBackbone(**args, seed=3))


IDS = np.array([[3, 5, 7, 9, 11], [2, 4, 6, 1, 1]])
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


@pytest.mark.parametrize("fmt", ["keras", "huggingface"])
@pytest.mark.parametrize("extra", [{}, {"word_embed_proj_dim": 4, "do_layer_norm_before": False},
                                   {"enable_bias": False, "layer_norm_elementwise_affine": False}])
def test_round_trip_is_exact(tmp_path, fmt, extra):
    lm = tiny(**extra)
    before = lm.predict({"token_ids": IDS, "padding_mask": MASK})
    lm.save_to_preset(tmp_path / "p", format=fmt)
    assert checkpoint.detect_format(tmp_path / "p") == fmt
    again = OPTCausalLM.from_preset(tmp_path / "p")
    for name, value in lm.backbone.params.items():
        assert np.array_equal(again.backbone.params[name], value), name
    assert np.array_equal(again.predict({"token_ids": IDS, "padding_mask": MASK}), before)


def test_fixture_round_trips_bitwise(tmp_path):
    src = shared_path("fixtures", "hf", "opt-tiny-postln-proj")
    bb = OPTBackbone.from_preset(src)
    bb.save_to_preset(tmp_path / "hf", format="huggingface")
    a = safetensors_io.load(src / "model.safetensors")
    b = safetensors_io.load(tmp_path / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    keras_src = shared_path("fixtures", "keras", "opt_tiny_keras")
    kb = OPTBackbone.from_preset(keras_src)
    kb.save_to_preset(tmp_path / "k")
    again = OPTBackbone.from_preset(tmp_path / "k")
    assert all(np.array_equal(again.params[k], v) for k, v in kb.params.items())


def test_keras_layout_matches_keras_hub_file(tmp_path):
    import h5py

    src = shared_path("fixtures", "keras", "opt_tiny_keras")
    OPTBackbone.from_preset(src).save_to_preset(tmp_path / "k")

    def tree(path):
        items = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda n, o: items.__setitem__(
                n, (o.shape, str(o.dtype)) if isinstance(o, h5py.Dataset) else dict(o.attrs)))
        return items

    assert tree(tmp_path / "k" / "model.weights.h5") == tree(src / "model.weights.h5")


def _write_bf16_safetensors(bits, path):
    """A safetensors file of BF16 tensors written byte by byte (numpy has no bfloat16 dtype)."""
    header, offset, blobs = {}, 0, []
    for name, b in bits.items():
        data = np.ascontiguousarray(b, dtype="<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(b.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


@pytest.mark.parametrize("stored", ["float16", "bfloat16", "float64"])
def test_any_stored_weight_dtype(tmp_path, stored):
    lm = tiny()
    lm.save_to_preset(tmp_path / "p", format="huggingface")
    path = tmp_path / "p" / "model.safetensors"
    # copies: the loaded arrays map the file that is rewritten below
    state = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
    if stored == "bfloat16":
        _write_bf16_safetensors({k: safetensors_io.float32_to_bfloat16(v) for k, v in state.items()}, path)
        expect = {k: safetensors_io.bfloat16_to_float32(safetensors_io.float32_to_bfloat16(v))
                  for k, v in state.items()}
    else:
        safetensors_io.save({k: v.astype(stored) for k, v in state.items()}, path)
        expect = {k: v.astype(stored).astype(np.float32) for k, v in state.items()}
    bb = OPTBackbone.from_preset(tmp_path / "p")
    assert all(v.dtype == np.float32 for v in bb.params.values())
    np.testing.assert_array_equal(bb.params["embed_tokens"], expect["model.decoder.embed_tokens.weight"])
    assert np.isfinite(OPTCausalLM(bb).predict({"token_ids": IDS, "padding_mask": MASK})).all()


def test_float64_on_request():
    lm = OPTCausalLM.from_preset(shared_path("fixtures", "hf", "opt-tiny-preln"), dtype="float64")
    assert all(v.dtype == np.float64 for v in lm.backbone.params.values())


def test_sharded_checkpoint(tmp_path):
    lm = tiny()
    lm.save_to_preset(tmp_path / "p", format="huggingface")
    state = safetensors_io.load(tmp_path / "p" / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        safetensors_io.save({k: np.array(state[k]) for k in keys}, tmp_path / "p" / shard)
    os.remove(tmp_path / "p" / "model.safetensors")
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "p" / "model.safetensors.index.json").write_text(json.dumps(index))
    again = OPTCausalLM.from_preset(tmp_path / "p")
    assert np.array_equal(again.predict({"token_ids": IDS}), lm.predict({"token_ids": IDS}))
    os.remove(tmp_path / "p" / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is missing"):
        OPTCausalLM.from_preset(tmp_path / "p")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    lm = tiny()
    lm.save_to_preset(tmp_path / "p")
    before = sorted(os.listdir(tmp_path / "p"))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(keras_h5, "write", boom)
    with pytest.raises(RuntimeError):
        lm.save_to_preset(tmp_path / "p")
    with pytest.raises(RuntimeError):
        lm.save_to_preset(tmp_path / "q")
    assert sorted(os.listdir(tmp_path)) == ["p"]           # no temporary leftovers, no "q"
    assert sorted(os.listdir(tmp_path / "p")) == before    # the earlier preset is intact


# ---------------------------------------------------------------- bad checkpoints
def _hf_copy(tmp_path):
    lm = tiny()
    lm.save_to_preset(tmp_path / "p", format="huggingface")
    return tmp_path / "p", safetensors_io.load(tmp_path / "p" / "model.safetensors")


def test_missing_extra_misshaped_tensors(tmp_path):
    path, state = _hf_copy(tmp_path)
    state = {k: np.array(v) for k, v in state.items()}
    name = "model.decoder.layers.1.fc1.weight"
    for mutate, needle in [
        (lambda s: s.pop(name), "missing tensors.*layers.1.fc1.weight"),
        (lambda s: s.__setitem__("model.decoder.layers.9.fc1.weight", s[name]), "unexpected tensors.*layers.9"),
        (lambda s: s.__setitem__(name, s[name][:, :3]), r"layers.1.fc1.weight has shape \[12, 3\], expected \[12, 8\]"),
        (lambda s: s.__setitem__("model.decoder.embed_positions.weight", s["model.decoder.embed_positions.weight"][2:]),
         "max_position_embeddings \\+ 2"),
    ]:
        s = dict(state)
        mutate(s)
        safetensors_io.save(s, path / "model.safetensors")
        with pytest.raises(CheckpointError, match=needle):
            OPTBackbone.from_preset(path)


def test_keras_missing_and_misshaped(tmp_path):
    import h5py

    tiny().save_to_preset(tmp_path / "k")
    h5 = tmp_path / "k" / "model.weights.h5"
    with h5py.File(h5, "a") as f:
        del f["layers/transformer_decoder_1/_feedforward_output_dense/vars/0"]
    with pytest.raises(CheckpointError, match="missing tensor layers/transformer_decoder_1/_feedforward_output_dense"):
        OPTBackbone.from_preset(tmp_path / "k")
    with h5py.File(h5, "a") as f:
        f.create_dataset("layers/transformer_decoder_1/_feedforward_output_dense/vars/0", data=np.zeros((3, 3)))
    with pytest.raises(CheckpointError, match=r"has shape \[3, 3\], expected \[12, 8\]"):
        OPTBackbone.from_preset(tmp_path / "k")


def test_truncated_and_corrupted_files(tmp_path):
    path, _ = _hf_copy(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        OPTBackbone.from_preset(path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file: invalid JSON in header"):
        OPTBackbone.from_preset(path)
    (path / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="header too small"):
        OPTBackbone.from_preset(path)
    tiny().save_to_preset(tmp_path / "k")
    h5 = tmp_path / "k" / "model.weights.h5"
    h5.write_bytes(h5.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.weights.h5"):
        OPTBackbone.from_preset(tmp_path / "k")


def test_pickle_checkpoint_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(shared_path("fixtures", "hf", "opt-tiny-preln", "config.json"), d / "config.json")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="io.open"):      # refused by refopt's own interpreter
        OPTCausalLM.from_preset(d)
    assert not marker.exists()


def test_directory_in_neither_format(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        OPTBackbone.from_preset(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(CheckpointError, match="neither a KerasHub preset nor a transformers checkpoint"):
        OPTBackbone.from_preset(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(CheckpointError, match="no weights file"):
        OPTBackbone.from_preset(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"class_name": "OPTBackbone"}))
    with pytest.raises(CheckpointError, match="without model.weights.h5"):
        OPTBackbone.from_preset(tmp_path)


def test_names_and_handles(tmp_path, monkeypatch):
    monkeypatch.setenv("REFOPT_HOME", str(tmp_path / "home"))
    with pytest.raises(PresetNotFoundError) as e:
        OPTCausalLM.from_preset("opt_125m_en")
    msg = str(e.value)
    assert str(tmp_path / "home" / "opt_125m_en") in msg and "facebook/opt-125m" in msg
    assert "keras/opt/keras/opt_125m_en" in msg and "REFOPT_HOME" in msg
    with pytest.raises(PresetNotFoundError, match="neither an existing directory nor a built-in name"):
        OPTCausalLM.from_preset("opt_999m_en")
    with pytest.raises(PresetNotFoundError, match="not available offline"):
        OPTCausalLM.from_preset("kaggle://keras/opt/keras/opt_125m_en/2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PresetNotFoundError, match="not available offline"):
        OPTCausalLM.from_preset("hf://facebook/opt-125m")
    # a built-in name resolves once the files are placed under REFOPT_HOME
    tiny().save_to_preset(tmp_path / "home" / "opt_125m_en", format="huggingface")
    assert OPTCausalLM.from_preset("opt_125m_en").backbone.vocabulary_size == 40


# ---------------------------------------------------------------- bad model inputs
@pytest.mark.parametrize("inputs,exc,needle", [
    ({"token_ids": [[1, 2, 40]]}, InputError, r"id 40 is out of range \[0, 40\)"),
    ({"token_ids": [[1, -1]]}, InputError, "id -1 is out of range"),
    ({"token_ids": [[1.0, 2.0]]}, InputTypeError, "expected integers"),
    ({"token_ids": ["a b"]}, InputTypeError, "got strings"),
    ({"token_ids": [[1] * 17]}, InputError, "sequence length 17 exceeds max_sequence_length 16"),
    ({"token_ids": [[1, 2, 3]], "padding_mask": [[1, 1]]}, InputError, r"padding_mask: shape \(1, 2\)"),
    ({"token_ids": [[1, 2], [3]]}, InputError, "rows of different lengths"),
    ({"token_ids": [[1, 2]], "padding_mask": [[2, 1]]}, InputError, "booleans or 0/1"),
    ({"token_ids": [[1, 2]], "mask": [[1, 1]]}, InputError, "unknown keys"),
])
def test_bad_inputs(inputs, exc, needle):
    with pytest.raises(exc, match=needle):
        tiny().predict(inputs)


def test_strings_without_preprocessor():
    with pytest.raises(InputTypeError, match="no preprocessor"):
        tiny().predict(["hello"])


def test_bad_preset_arguments(tmp_path):
    lm = tiny()
    with pytest.raises(ConfigError, match="format='onnx'"):
        lm.save_to_preset(tmp_path / "x", format="onnx")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="dtype='int4'"):
        OPTBackbone.from_preset(shared_path("fixtures", "hf", "opt-tiny-preln"), dtype="int4")
