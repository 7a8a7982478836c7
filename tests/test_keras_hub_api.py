"""KerasHub's base-class examples with `keras_hub` replaced by `refopt` (the bundled preset standing
in for a downloaded one), and the API items KerasHub's docs name: presets on every class, subclass
dispatch from base classes, configs, compile=False, the reversible embedding."""

import json

import numpy as np
import pytest

import refopt
from refopt.errors import ConfigError
from refopt.models import (Backbone, CausalLM, CausalLMPreprocessor, OPTBackbone, OPTCausalLM,
                           OPTCausalLMPreprocessor, OPTTokenizer, Preprocessor, Task, Tokenizer)
from refopt.tokenizers import BytePairTokenizer


def test_causal_lm_docstring_example():
    # keras_hub.models.CausalLM's docstring: a base-class from_preset, compile, generate; and the
    # same at bfloat16 precision
    causal_lm = refopt.models.CausalLM.from_preset()
    assert type(causal_lm) is OPTCausalLM
    causal_lm.compile(sampler="top_k")
    assert isinstance(causal_lm.generate("Keras is a", max_length=16), str)
    causal_lm = refopt.models.CausalLM.from_preset(None, dtype="bfloat16")
    causal_lm.compile(sampler="greedy")
    assert causal_lm.backbone.compute_dtype == "bfloat16"
    assert causal_lm.generate("Keras is a", max_length=16).startswith("Keras is a")


def test_base_classes_build_the_presets_own_classes():
    assert type(Backbone.from_preset()) is OPTBackbone
    assert type(Tokenizer.from_preset(None)) is OPTTokenizer
    assert type(BytePairTokenizer.from_preset(None)) is OPTTokenizer       # KerasHub's rule
    assert type(Preprocessor.from_preset(None)) is OPTCausalLMPreprocessor
    assert type(CausalLMPreprocessor.from_preset(None, sequence_length=7)) is OPTCausalLMPreprocessor
    with pytest.raises(ConfigError, match="Task.from_preset"):
        Task.from_preset(None)
    names = set(OPTBackbone.presets)
    assert {"opt_125m_en", "opt_1.3b_en", "opt_2.7b_en", "opt_6.7b_en"} <= names
    for cls in (Backbone, CausalLM, Tokenizer, Preprocessor, CausalLMPreprocessor, OPTCausalLM,
                OPTTokenizer, OPTCausalLMPreprocessor):
        assert set(cls.presets) == names, cls
    assert OPTBackbone.presets["opt_125m_en"]["metadata"]["params"] == 125237760   # KerasHub's figure


def test_a_preset_of_another_class_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"class_name": "GPT2Backbone", "config": {}}))
    with pytest.raises(ConfigError, match="GPT2Backbone"):
        CausalLM.from_preset(tmp_path)


def test_task_config_round_trip_and_compile_false():
    lm = OPTCausalLM.from_preset()
    config = lm.get_config()
    assert config["backbone"]["class_name"] == "OPTBackbone"
    assert config["preprocessor"]["class_name"] == "OPTCausalLMPreprocessor"
    revived = OPTCausalLM.from_config(json.loads(json.dumps(config)))
    assert revived.get_config() == config
    uncompiled = OPTCausalLM(lm.backbone, lm.preprocessor, compile=False)
    for call in (lambda: uncompiled.fit(["a b"]), lambda: uncompiled.evaluate(["a b"]),
                 lambda: uncompiled.generate("a")):
        with pytest.raises(ValueError, match="You must call `compile"):
            call()
    uncompiled.compile()
    assert uncompiled.generate_function is None
    uncompiled.generate("a", max_length=8)
    assert uncompiled.generate_function == uncompiled.generate_step


def test_reversible_embedding_and_backbone_predict():
    lm = OPTCausalLM.from_preset(preprocessor=None)
    bb = lm.backbone
    x = {"token_ids": np.array([[2, 5, 9, 11], [2, 7, 1, 1]]), "padding_mask": np.array([[1] * 4, [1, 1, 0, 0]])}
    hidden = bb.predict(x, batch_size=1)
    np.testing.assert_allclose(hidden, bb(x), rtol=1e-6, atol=1e-6)
    emb = bb.token_embedding
    assert emb.embeddings is bb.params["embed_tokens"] and emb.input_dim == bb.config.vocabulary_size and emb.output_dim == bb.config.hidden_dim
    np.testing.assert_array_equal(emb(x["token_ids"]), bb.params["embed_tokens"][x["token_ids"]])
    np.testing.assert_allclose(emb(hidden, reverse=True), lm.predict(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- save_to_preset(max_shard_size=...)
def _random_backbone(seed=0):
    bb = OPTBackbone(vocabulary_size=41, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=12,
                     max_sequence_length=16, dropout=0.0)
    rng = np.random.default_rng(seed)
    bb.params = {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32) for k, v in bb.params.items()}
    return bb


def test_sharded_save_fills_shards_as_keras_and_loads_back(tmp_path):
    from refopt.io import keras_h5

    bb = _random_backbone()
    limit = 1500                                             # bytes: 6,144 of weights -> 6 shards
    lm = OPTCausalLM(bb)
    lm.save_to_preset(tmp_path / "p", max_shard_size=limit / 1024 ** 3)
    files = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert "model.weights.h5" not in files and "task.json" in files
    index = json.loads((tmp_path / "p" / "model.weights.json").read_text())
    shards = [f for f in files if f.startswith("model_")]
    assert shards == [f"model_{i:05}.weights.h5" for i in range(6)]
    assert index["metadata"]["total_size"] == 6144.0
    # Keras's rule: variables in its save order, a new shard when the next one would pass the limit
    sizes = {}
    for name in keras_h5.keras_order(bb.config):
        where = "/" + keras_h5.layout(bb.config)[name][0].rsplit("/", 1)[0]
        shard = index["weight_map"][where]
        shard = shard if isinstance(shard, str) else shard[-1]
        sizes[shard] = sizes.get(shard, 0) + bb.params[name].nbytes
    assert all(0 < size <= limit for size in sizes.values()) and len(sizes) == 6
    for again in (OPTCausalLM.from_preset(tmp_path / "p"), CausalLM.from_preset(tmp_path / "p")):
        for k, v in bb.params.items():
            assert np.array_equal(again.backbone.params[k], v), k
    # KerasHub's default (10 GB) and None keep one file; a sharded save over it removes the shards
    lm.save_to_preset(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if p.name.startswith("model")) == \
        ["model.weights.h5"]
    bb.save_to_preset(tmp_path / "q", max_shard_size=None)
    assert (tmp_path / "q" / "model.weights.h5").exists()


def test_sharded_save_refusals(tmp_path):
    bb = _random_backbone()
    for bad in (0, -1.0, float("nan"), True, "10GB"):
        with pytest.raises(ConfigError, match="max_shard_size"):
            bb.save_to_preset(tmp_path / "x", max_shard_size=bad)
    with pytest.raises(ConfigError, match="format='huggingface'"):     # format passed second
        bb.save_to_preset(tmp_path / "x", "huggingface")
    with pytest.raises(ConfigError, match="exceeds the maximum shard size"):   # as Keras refuses
        bb.save_to_preset(tmp_path / "x", max_shard_size=1000 / 1024 ** 3)     # the 1,312-byte table
    assert not (tmp_path / "x").exists()


def test_sharded_preset_is_validated(tmp_path):
    from refopt.errors import CheckpointError

    bb = _random_backbone()
    bb.save_to_preset(tmp_path / "p", max_shard_size=1500 / 1024 ** 3)
    index_path = tmp_path / "p" / "model.weights.json"
    index = json.loads(index_path.read_text())

    def broken(edit):
        import shutil

        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "p", d)
        edit(d, json.loads(json.dumps(index)))
        return d

    def write_index(d, data):
        (d / "model.weights.json").write_text(json.dumps(data))

    def escape(d, data):
        data["weight_map"]["/layers/layer_normalization/vars"] = ["../model_00005.weights.h5"]
        write_index(d, data)

    def unlisted(d, data):                   # a tensor in a shard the index does not name for it
        data["weight_map"]["/layers/layer_normalization/vars"] = ["model_00004.weights.h5",
                                                                  "model_00000.weights.h5"]
        write_index(d, data)

    def twice(d, data):                      # the same tensor in two shards
        import h5py

        with h5py.File(d / "model_00000.weights.h5", "a") as f:
            f.create_dataset("layers/layer_normalization/vars/0", data=np.ones(8, np.float32))
        data["weight_map"]["/layers/layer_normalization/vars"] = ["model_00000.weights.h5",
                                                                  "model_00005.weights.h5"]
        write_index(d, data)

    cases = {"shards must be file names": escape, "does not list this shard": unlisted,
             "stored twice": twice,
             "shard model_00003.weights.h5 is missing": lambda d, _: (d / "model_00003.weights.h5").unlink(),
             "malformed shard index": lambda d, _: write_index(d, {"weights": {}})}
    for message, edit in cases.items():
        with pytest.raises(CheckpointError, match=message):
            OPTBackbone.from_preset(broken(edit))
