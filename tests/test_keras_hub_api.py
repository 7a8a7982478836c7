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
    assert emb.embeddings is bb.params["embed_tokens"] and emb.input_dim == 8192 and emb.output_dim == 256
    np.testing.assert_array_equal(emb(x["token_ids"]), bb.params["embed_tokens"][x["token_ids"]])
    np.testing.assert_allclose(emb(hidden, reverse=True), lm.predict(x), rtol=1e-5, atol=1e-5)
