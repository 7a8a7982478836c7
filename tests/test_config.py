"""OPTConfig: both config.json dialects, released sizes, validation errors."""

import json

import pytest

from conftest import shared_path
from refopt.config import RELEASED, OPTConfig, released_config
from refopt.errors import ConfigError
from refopt.models import OPTBackbone


def test_released_parameter_counts_match_published():
    # KerasHub's preset table lists these two exactly (its 2.7b/6.7b entries are the rounded
    # 2.7e9/6.7e9); transformers' facebook/opt-* report the same figures plus 2 position rows.
    assert released_config("125m").parameter_count() == 125_237_760
    assert released_config("1.3b").parameter_count() == 1_315_753_984
    assert round(released_config("2.7b").parameter_count() / 1e9, 2) == 2.65
    assert round(released_config("6.7b").parameter_count() / 1e9, 2) == 6.66
    assert round(released_config("350m").parameter_count(2050) / 1e6, 1) == 331.2
    assert set(RELEASED) == {"125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b"}


def test_parameter_count_equals_materialised_model():
    cfg = dict(vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=12,
               max_sequence_length=16)
    for extra in ({}, {"word_embed_proj_dim": 4, "do_layer_norm_before": False},
                  {"enable_bias": False, "layer_norm_elementwise_affine": False}):
        bb = OPTBackbone(**cfg, **extra)
        assert bb.count_params() == bb.config.parameter_count()


def test_keras_defaults():
    bb = OPTBackbone(vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4)
    assert bb.dropout == 0.1 and bb.max_sequence_length == 2048 and bb.config.dtype is None
    # KerasHub's get_config: name, trainable, the serialized dtype policy, then the arguments
    assert bb.get_config() == dict(
        name="opt_backbone", trainable=True,
        dtype={"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
               "registered_name": None},
        vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4, dropout=0.1,
        max_sequence_length=2048)
    assert OPTBackbone.from_config(bb.get_config()).get_config() == bb.get_config()


@pytest.mark.parametrize("size", sorted(RELEASED))
def test_dialect_round_trips(size):
    cfg = released_config(size)
    assert OPTConfig.from_json_dict(cfg.to_huggingface()) == cfg
    if cfg.keras_compatible:
        assert OPTConfig.from_json_dict(cfg.to_keras()) == cfg


def test_reads_fixture_configs():
    hf = OPTConfig.from_file(shared_path("fixtures", "hf", "opt-tiny-postln-proj", "config.json"))
    assert (hf.do_layer_norm_before, hf.word_embed_proj_dim, hf.hidden_dim) == (False, 8, 24)
    assert not hf.has_final_layer_norm and hf.has_projection
    keras = OPTConfig.from_file(shared_path("fixtures", "keras", "opt_tiny_keras", "config.json"))
    assert (keras.vocabulary_size, keras.num_layers, keras.max_sequence_length) == (50272, 2, 64)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(num_heads=3, hidden_dim=8), "num_heads=3 does not divide hidden_dim=8"),
    (dict(num_layers=0), "num_layers=0"),
    (dict(hidden_dim=8.0), "hidden_dim=8.0"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(do_layer_norm_before="yes"), "do_layer_norm_before='yes'"),
])
def test_inconsistent_config_values(kwargs, needle):
    base = dict(vocabulary_size=10, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=4)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        OPTConfig(**base)


def test_unknown_config_keys(tmp_path):
    bad = released_config("125m").to_keras()
    bad["config"]["num_experts"] = 4
    with pytest.raises(ConfigError, match="unknown OPTBackbone config key 'num_experts'"):
        OPTConfig.from_json_dict(bad)
    hf = released_config("125m").to_huggingface()
    hf["activation_function"] = "gelu"
    with pytest.raises(ConfigError, match="activation_function 'gelu'"):
        OPTConfig.from_json_dict(hf)
    del hf["hidden_size"]
    hf["activation_function"] = "relu"
    with pytest.raises(ConfigError, match="hidden_size"):
        OPTConfig.from_json_dict(hf)
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OPTConfig.from_file(path)
    path.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ConfigError, match="neither a KerasHub"):
        OPTConfig.from_file(path)
    with pytest.raises(ConfigError, match="unknown arguments"):
        OPTBackbone(vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4,
                    num_expert=3)
