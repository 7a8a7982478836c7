"""KerasHub's ``opt_backbone_test.py``, ported: the same config, inputs and expectations, with
KerasHub's ``run_backbone_test`` / ``run_model_saving_test`` / ``run_preset_test`` written out."""

import re

import numpy as np
import pytest

from kh_support import documented_difference, presets_or_skip, require_preset, run_serialization_test
from refopt.errors import RefoptError
from refopt.models import OPTBackbone

INIT_KWARGS = {"vocabulary_size": 10, "num_layers": 2, "num_heads": 2, "hidden_dim": 2,
               "intermediate_dim": 4, "max_sequence_length": 5}
INPUT_DATA = {"token_ids": np.ones((2, 5), dtype="int32"), "padding_mask": np.ones((2, 5), dtype="int32")}


def test_backbone_basics():
    backbone = OPTBackbone(**INIT_KWARGS)
    run_serialization_test(backbone)
    output = backbone(INPUT_DATA)
    assert output.shape == (2, 5, 2)
    # the token embedding can embed tokens eagerly
    assert backbone.token_embedding(np.zeros((2, 3), dtype="int32")).shape == (2, 3, 2)
    # variable length sequences
    for seq_length in (2, 3, 4):
        assert backbone({k: v[:, :seq_length] for k, v in INPUT_DATA.items()}).shape == (2, seq_length, 2)
    # predict, on the whole input and batch by batch (KerasHub: a tf.data dataset batched by 2)
    np.testing.assert_allclose(backbone.predict(INPUT_DATA), output, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(backbone.predict(INPUT_DATA, batch_size=1), output, rtol=1e-6, atol=1e-6)
    # the name maps to the class name
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", "OPTBackbone")
    assert re.search(re.sub("([a-z])([A-Z])", r"\1_\2", name).lower(), backbone.name)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "bfloat16"])
def test_backbone_basics_precision(policy):
    # run_precision_test: outputs in the policy's compute dtype, weights in its variable dtype
    from refopt.dtype_policies import DTypePolicy

    policy = DTypePolicy(policy)
    if "bfloat16" in policy.name:
        pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes (pip install ml_dtypes)")
    backbone = OPTBackbone(**INIT_KWARGS, dtype=policy.name)
    output = backbone(INPUT_DATA)
    assert policy.standardize(output.dtype) == policy.compute_dtype
    for weight in backbone.weights:
        assert policy.standardize(weight.dtype) == policy.variable_dtype
    assert backbone.compute_dtype == policy.compute_dtype
    assert backbone.variable_dtype == policy.variable_dtype


def test_backbone_basics_quantization():
    # run_quantization_test, int8 (the mode refopt offers): every dense kernel quantised, the model
    # still runs, its config round-trips and its weights load into a revived model
    backbone = OPTBackbone(**INIT_KWARGS)
    backbone.quantize("int8")
    assert backbone.weights_dtype == "int8"
    assert backbone(INPUT_DATA).shape == (2, 5, 2)
    revived = OPTBackbone.from_config(backbone.get_config())
    assert revived.get_config() == backbone.get_config()
    revived.quantize("int8")
    revived.params = dict(backbone.params)
    np.testing.assert_array_equal(revived(INPUT_DATA), backbone(INPUT_DATA))


@documented_difference("refopt quantises with backbone.quantize('int8') (or from_preset("
                       "weights_dtype=...)), a storage choice kept out of the config; Keras's "
                       "DTypePolicyMap of int8_from_float32 / float8_from_float32 layer policies, "
                       "recorded in get_config, and float8 are not offered")
def test_backbone_basics_quantization_policy_map():
    policy_map = {"module": "keras", "class_name": "DTypePolicyMap",
                  "config": {"default_policy": "int8_from_float32", "policy_map": {}}}
    backbone = OPTBackbone(**INIT_KWARGS, dtype=policy_map)
    assert backbone.weights_dtype == "int8"


def test_saved_model(tmp_path):
    # KerasHub saves a .keras file and reloads it; refopt's saved form is the preset
    model = OPTBackbone(**INIT_KWARGS)
    model_output = model(INPUT_DATA)
    model.save_to_preset(tmp_path / "model")
    restored = OPTBackbone.from_preset(tmp_path / "model")
    assert isinstance(restored, OPTBackbone)
    np.testing.assert_allclose(restored(INPUT_DATA), model_output, atol=1e-6, rtol=1e-6)


def test_smallest_preset():
    with pytest.raises(RefoptError):
        OPTBackbone.from_preset("clowntown")
    require_preset(OPTBackbone, "opt_125m_en")
    backbone = OPTBackbone.from_preset("opt_125m_en")
    x = {"token_ids": np.array([[133, 2119, 6219, 23602, 4]]), "padding_mask": np.ones((1, 5), "int32")}
    output = backbone(x)
    assert output.shape == (1, 5, 768)
    # "The forward pass from a preset should be stable!"
    np.testing.assert_allclose(output.reshape(-1)[:5], [-0.246, -1.004, -0.072, 0.097, 0.533],
                               atol=0.01, rtol=0.01)
    OPTBackbone.from_preset("opt_125m_en", load_weights=False)(x)


def test_all_presets():
    for preset in presets_or_skip(OPTBackbone):
        OPTBackbone.from_preset(preset)(INPUT_DATA)
        OPTBackbone.from_preset(preset, load_weights=False)(INPUT_DATA)
