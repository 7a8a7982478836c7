"""Checkpoints as the hub holds them: written by PyTorch's and transformers' own writers, by
transformers 4.x's TensorFlow and Flax classes (committed fixtures), found in the hub caches, and
loaded in their stored dtype without a copy."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from refopt.errors import CheckpointError, ConfigError, PresetNotFoundError
from refopt.io import checkpoint, hub_cache, presets, stored
from refopt.models import OPTBackbone, OPTCausalLM
from refopt.quant import QuantizedMatrix

DATA = Path(__file__).parent / "data"
IDS = {"token_ids": np.array([[2, 5, 9, 33, 7, 1], [2, 40, 3, 1, 1, 1]]),
       "padding_mask": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)}


def _logits(path, **kw):
    return OPTCausalLM.from_preset(str(path), preprocessor=None, **kw).predict(IDS)


def _only(src, tmp, *names):
    tmp.mkdir(parents=True)
    for n in ("config.json",) + names:
        shutil.copy(src / n, tmp / n)
    return tmp


# ---------------------------------------------------------------------------- TensorFlow and Flax
@pytest.mark.parametrize("weights", ["tf_model.h5", "flax_model.msgpack"])
@pytest.mark.parametrize("model", ["hub_opt_tiny", "hub_opt_350m_like"])
def test_tf_and_flax_files_give_the_safetensors_logits(tmp_path, model, weights):
    src = DATA / model
    expected = _logits(_only(src, tmp_path / "st", "model.safetensors"), dtype="float64")
    got = _logits(_only(src, tmp_path / "x", weights), dtype="float64")
    np.testing.assert_array_equal(got, expected)


def test_tf_h5_missing_weight_is_named(tmp_path):
    import h5py

    d = _only(DATA / "hub_opt_tiny", tmp_path / "x", "tf_model.h5")
    with h5py.File(d / "tf_model.h5", "a") as f:
        name = [n.decode() if isinstance(n, bytes) else n for n in f["model"].attrs["weight_names"]][3]
        del f["model"][name]
    with pytest.raises(CheckpointError, match="listed but missing"):
        OPTBackbone.from_preset(d)


def test_flax_truncated_is_named(tmp_path):
    d = _only(DATA / "hub_opt_tiny", tmp_path / "x", "flax_model.msgpack")
    data = (d / "flax_model.msgpack").read_bytes()
    (d / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        OPTBackbone.from_preset(d)


@pytest.mark.parametrize("model", ["hub_opt_tiny", "hub_opt_350m_like"])
def test_save_pretrained_pickles_single_and_sharded(tmp_path, model):
    """pytorch_model.bin and its shards written by transformers 4.55's
    save_pretrained(safe_serialization=False) (scripts/make_hub_fixtures.py)."""
    expected = _logits(_only(DATA / model, tmp_path / "st", "model.safetensors"), dtype="float64")
    got = _logits(_only(DATA / model, tmp_path / "bin", "pytorch_model.bin"), dtype="float64")
    np.testing.assert_array_equal(got, expected)
    sharded = DATA / f"{model}_sharded"
    assert len(json.loads((sharded / "pytorch_model.bin.index.json").read_text())["weight_map"]) > 10
    np.testing.assert_array_equal(_logits(sharded, dtype="float64"), expected)


def test_flax_chunked_arrays():
    """Arrays over Flax's chunk size are stored as flat chunks (written by flax.serialization with a
    64-byte chunk size: scripts/make_hub_fixtures.py's environment)."""
    from refopt.io import flax_msgpack

    got = flax_msgpack.load(DATA / "flax_chunked.msgpack")
    np.testing.assert_array_equal(got["model.decoder.embed_tokens.weight"],
                                  np.arange(60, dtype=np.float32).reshape(6, 10))
    assert got["model.decoder.final_layer_norm.weight"].dtype == np.float16


def test_pickle_and_others_no_longer_refused_by_name(tmp_path):
    d = _only(DATA / "hub_opt_tiny", tmp_path / "x")
    with pytest.raises(CheckpointError, match="no weights file") as e:
        checkpoint.detect_format(d)
    assert "pytorch_model.bin" in str(e.value)          # lists what it would read


# ---------------------------------------------------------------------------- hub caches, offline
def _hf_cache(root, repo, src, commit="a" * 40, ref=True):
    owner, name = repo.split("/")
    base = root / f"models--{owner}--{name}"
    snap = base / "snapshots" / commit
    (base / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():                          # the hub client's layout: links into blobs/
        blob = base / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if ref:
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(commit)
    return snap


def test_hf_cache_names_resolve_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = _hf_cache(tmp_path / "hub", "facebook/opt-125m", _only(DATA / "hub_opt_tiny", tmp_path / "src",
                                                                   "pytorch_model.bin", "tf_model.h5"))
    assert presets.resolve("facebook/opt-125m") == snap
    assert presets.resolve("hf://facebook/opt-125m") == snap
    assert presets.resolve("opt_125m_en") == snap                 # a built-in name, REFOPT_HOME empty
    expected = _logits(_only(DATA / "hub_opt_tiny", tmp_path / "st", "model.safetensors"), dtype="float64")
    np.testing.assert_array_equal(_logits("facebook/opt-125m", dtype="float64"), expected)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "hub").rename(tmp_path / "hub2")
    (tmp_path / "hub2").rename(tmp_path / "hub")
    assert hub_cache.hf_cache_dir() == tmp_path / "hub"
    assert presets.resolve("facebook/opt-125m@" + "a" * 40) == snap


def test_hf_cache_missing_says_hf_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("REFOPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    with pytest.raises(PresetNotFoundError, match="hf download facebook/opt-350m"):
        presets.resolve("facebook/opt-350m")
    with pytest.raises(PresetNotFoundError, match="`hf download facebook/opt-1.3b`") as e:
        presets.resolve("opt_1.3b_en")
    assert "huggingface-cli" not in str(e.value)


@pytest.mark.parametrize("name", ["../etc/passwd", "facebook/../../x", "a/b c", "facebook/opt-125m@../../x"])
def test_hf_cache_names_cannot_leave_the_cache(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises((PresetNotFoundError, CheckpointError)):
        presets.resolve(name)


def test_kaggle_cache_latest_version(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    monkeypatch.setenv("REFOPT_HOME", str(tmp_path / "home"))
    base = tmp_path / "models" / "keras" / "opt" / "keras" / "opt_125m_en"
    for version in ("1", "2", "10"):
        _only(DATA / "hub_opt_tiny", base / version, "model.safetensors")
    assert presets.resolve("opt_125m_en") == base / "10"
    assert presets.resolve("kaggle://keras/opt/keras/opt_125m_en/2") == base / "2"
    assert hub_cache.find_kaggle("keras/opt/keras/../../x") is None


# ---------------------------------------------------------------------------- stored dtype, no copy
@pytest.mark.parametrize("stored_as", ["float16", "bfloat16"])
def test_auto_keeps_the_file_mapped(tmp_path, stored_as):
    lm = OPTCausalLM.from_preset(str(DATA / "hub_opt_tiny"), preprocessor=None)
    lm.backbone.quantize(stored_as)
    d = tmp_path / "p"
    lm.backbone.quantize("float32")
    OPTBackbone.from_opt_config(lm.backbone.config, {k: np.asarray(v) for k, v in lm.backbone.params.items()}
                                ).save_to_preset(d, format="huggingface")
    _cast_safetensors(d / "model.safetensors", stored_as)
    bb = OPTBackbone.from_preset(d, weights_dtype="auto")
    assert bb.weights_dtype == stored_as
    for name in ("embed_tokens", "layers.0.fc1.weight"):
        w = bb.params[name]
        assert isinstance(w, QuantizedMatrix) and w.kind == stored_as
        assert not w.data.flags.owndata and not w.data.flags.writeable       # a view of the file
    assert bb.params["layers.0.fc1.bias"].dtype == np.float32               # vectors widened
    wide = OPTBackbone.from_preset(d)                                        # default: widened
    assert wide.weights_dtype == "float32" and wide.params["embed_tokens"].dtype == np.float32
    for name, w in bb.params.items():
        np.testing.assert_array_equal(np.asarray(w), wide.params[name], err_msg=name)


def _cast_safetensors(path, kind):
    from refopt.io import safetensors_io

    tensors = {k: np.array(v) for k, v in safetensors_io.load(path).items()}
    if kind == "float16":
        safetensors_io.save({k: v.astype(np.float16) for k, v in tensors.items()}, path)
        return
    import struct as _struct

    header, blobs, at = {}, [], 0
    for k, v in tensors.items():
        raw = safetensors_io.float32_to_bfloat16(v).tobytes()
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(_struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_int8_streaming_equals_quantizing_the_widened_weights(tmp_path, monkeypatch):
    import refopt.quant as quant

    monkeypatch.setattr(quant, "_BLOCK_BYTES", 256)          # many blocks even at this size
    streamed = OPTBackbone.from_preset(DATA / "hub_opt_tiny", weights_dtype="int8")
    whole = OPTBackbone.from_preset(DATA / "hub_opt_tiny")
    whole.quantize("int8")
    for name, w in whole.params.items():
        s = streamed.params[name]
        if isinstance(w, QuantizedMatrix):
            np.testing.assert_array_equal(s.data, w.data, err_msg=name)
            np.testing.assert_array_equal(s.scale, w.scale, err_msg=name)
        else:
            np.testing.assert_array_equal(s, w, err_msg=name)


def test_release_drops_pages_but_keeps_values(tmp_path):
    data = np.arange(1 << 20, dtype=np.float32)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    mapped = stored.map_file(tmp_path / "f.bin").view(np.float32)
    total = float(mapped.sum())
    stored.release(mapped)
    stored.release(mapped[5:77])                               # smaller than a page: nothing
    assert float(mapped.sum()) == total                        # pages fault back in


def test_weights_dtype_checked_before_reading(tmp_path):
    with pytest.raises(ConfigError, match="weights_dtype"):
        OPTBackbone.from_preset(DATA / "hub_opt_tiny", weights_dtype="int4")
    with pytest.raises(ConfigError, match="float32 compute"):
        OPTBackbone.from_preset(DATA / "hub_opt_tiny", weights_dtype="int8", dtype="float64")


# ---------------------------------------------------------------------------- PyTorch's writers
try:
    import torch
    import transformers
except ImportError:                     # the peers extra
    torch = transformers = None
peers = pytest.mark.skipif(torch is None, reason="the peers extra (torch, transformers) writes these checkpoints")


def _hf_model(tie=True, dtype=None, **kw):
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                 num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
                                 tie_word_embeddings=tie, **kw)
    model = transformers.OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype or torch.float32)


@peers
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("legacy", [False, True])
def test_torch_save_both_formats_give_the_safetensors_logits(tmp_path, dtype, legacy):
    model = _hf_model(dtype=getattr(torch, dtype))
    model.save_pretrained(tmp_path / "st")
    _torch_dir(model, tmp_path / "bin", legacy=legacy)
    for kw in ({"dtype": "float64"}, {"weights_dtype": "auto"}):
        np.testing.assert_array_equal(_logits(tmp_path / "bin", **kw), _logits(tmp_path / "st", **kw))


def _torch_dir(model, path, shards=1, legacy=False, config_says_tied=True):
    """``model`` saved with torch.save as pytorch_model.bin, or as ``shards`` files with the index
    transformers writes (``weight_map``: name -> file)."""
    path.mkdir()
    config = model.config.to_dict()
    config["tie_word_embeddings"] = config_says_tied or config.get("tie_word_embeddings", True)
    (path / "config.json").write_text(json.dumps(config))
    sd = model.state_dict()
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return path
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i::shards]}
        torch.save(part, path / file, _use_new_zipfile_serialization=not legacy)
        weight_map.update({k: file for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@peers
@pytest.mark.parametrize("legacy", [False, True])
def test_torch_save_shards_and_tied_head(tmp_path, legacy):
    model = _hf_model(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "st")
    assert "lm_head.weight" in model.state_dict()                 # tied: one storage, two names
    got = _logits(_torch_dir(model, tmp_path / "bin", shards=3, legacy=legacy), weights_dtype="auto")
    np.testing.assert_array_equal(got, _logits(tmp_path / "st", weights_dtype="auto"))


@peers
def test_untied_head_is_refused_not_ignored(tmp_path):
    """refopt's OPT ties the head (as every released OPT); an untied checkpoint whose head differs
    is an error, not a silently different model."""
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        OPTBackbone.from_preset(_torch_dir(_hf_model(tie=False), tmp_path / "p"))
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        OPTBackbone.from_preset(_torch_dir(_hf_model(tie=False), tmp_path / "q", config_says_tied=False))


@peers
def test_untied_head_equal_to_embedding_loads(tmp_path):
    model = _hf_model(tie=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.decoder.embed_tokens.weight)
    model.config.tie_word_embeddings = True
    model.save_pretrained(tmp_path / "st")
    np.testing.assert_array_equal(_logits(_torch_dir(model, tmp_path / "p"), dtype="float64"),
                                  _logits(tmp_path / "st", dtype="float64"))




def test_shard_name_with_nul_byte_is_named(tmp_path):
    """An index naming a shard file with a NUL byte in it (os.open's ValueError escaped)."""
    d = tmp_path / "x"
    shutil.copytree(DATA / "hub_opt_tiny_sharded", d)
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "pytorch_model-00001\x00-of-00002.bin"
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="NUL"):
        OPTBackbone.from_preset(d)


@pytest.mark.parametrize("key", ["model_type", "class_name"])
@pytest.mark.parametrize("value", [["opt"], {"opt": 1}, 3])
def test_config_model_name_not_a_string_is_named(tmp_path, key, value):
    """A config.json whose model_type / class_name is a list or an object (the registry's lookup
    raised TypeError: unhashable)."""
    d = _only(DATA / "hub_opt_tiny", tmp_path / "x", "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError):
        OPTCausalLM.from_preset(d, preprocessor=None)
