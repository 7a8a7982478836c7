"""LoRA files across refopt and KerasHub: KerasHub loads the ``.lora.h5`` refopt writes (onto the
preset refopt writes) and computes refopt's logits; refopt loads the adapters KerasHub trains and
saves, and computes KerasHub's.  KerasHub runs in a subprocess with its TensorFlow backend
(tests/keras_runner.py; needs the `keras` extra)."""

import importlib.util

import numpy as np
import pytest

from refopt.models import OPTBackbone, OPTCausalLM

import keras_runner

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras_hub") is None,
                                reason="needs keras-hub (pip install -e '.[keras]')")

KERAS_SCRIPT = r"""
import os, sys
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import keras, keras_hub
mode, preset, lora, out = sys.argv[1:5]
ids = np.load(out + ".in.npz")
x = {"token_ids": ids["token_ids"], "padding_mask": ids["padding_mask"]}
if mode == "load":               # refopt's preset and adapters, in KerasHub
    backbone = keras_hub.models.OPTBackbone.from_preset(preset)
    backbone.load_lora_weights(lora)
else:                            # KerasHub's: a random preset, then adapters with random values
    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.OPTBackbone(vocabulary_size=41, num_layers=2, num_heads=2, hidden_dim=8,
                                            intermediate_dim=12, max_sequence_length=16, dropout=0.0)
    for w in backbone.weights:
        w.assign(np.random.default_rng(len(w.path)).standard_normal(w.shape).astype("float32") * 0.3)
    backbone.save_to_preset(preset)
    backbone.enable_lora(3)
    rng = np.random.default_rng(11)
    for w in backbone.weights:
        if "lora_kernel" in w.path:
            w.assign(rng.standard_normal(w.shape).astype("float32") * 0.3)
    backbone.save_lora_weights(lora)
logits = backbone.token_embedding(backbone(x), reverse=True)
np.savez(out, logits=np.asarray(logits), trainable=np.array([w.path for w in backbone.trainable_weights]))
"""

IDS = np.array([[2, 5, 9, 11, 3, 7], [2, 4, 6, 1, 1, 1]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


def run_keras(mode, preset, lora, tmp_path):
    out = str(tmp_path / f"{mode}_out")
    np.savez(out + ".in.npz", token_ids=IDS, padding_mask=MASK)
    proc = keras_runner.run(KERAS_SCRIPT, mode, preset, lora, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out + ".npz")


def test_keras_hub_loads_refopt_lora_weights(tmp_path):
    bb = OPTBackbone(vocabulary_size=41, num_layers=3, num_heads=2, hidden_dim=8, intermediate_dim=12,
                     max_sequence_length=16, dropout=0.0)
    rng = np.random.default_rng(1)
    bb.params = {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32) for k, v in bb.params.items()}
    OPTCausalLM(bb).save_to_preset(tmp_path / "preset")          # the base model, no adapters
    bb.enable_lora(4, seed=0)
    for name in bb.lora_layers:
        bb.params[name + ".lora_b"] = (rng.standard_normal(bb.params[name + ".lora_b"].shape) * 0.3
                                       ).astype(np.float32)
    bb.save_lora_weights(tmp_path / "adapters.lora.h5")
    theirs = run_keras("load", tmp_path / "preset", tmp_path / "adapters.lora.h5", tmp_path)
    ours = OPTCausalLM(bb).predict({"token_ids": IDS, "padding_mask": MASK})
    real = MASK.astype(bool)
    assert np.abs(ours - theirs["logits"])[real].max() <= 1e-4


def test_refopt_loads_keras_hub_lora_weights(tmp_path):
    theirs = run_keras("write", tmp_path / "preset", tmp_path / "kh.lora.h5", tmp_path)
    # KerasHub trains the adapted layers' biases too (refopt freezes them: see refopt.models.lora)
    assert sorted(str(p) for p in theirs["trainable"]) == sorted(
        f"transformer_layer_{i}/self_attention/{layer}/{w}" for i in range(2)
        for layer in ("query", "value") for w in ("bias", "lora_kernel_a", "lora_kernel_b"))
    bb = OPTBackbone.from_preset(tmp_path / "preset")
    bb.load_lora_weights(tmp_path / "kh.lora.h5")
    assert bb.lora_rank == 3 and len(bb.lora_layers) == 4
    ours = OPTCausalLM(bb).predict({"token_ids": IDS, "padding_mask": MASK})
    real = MASK.astype(bool)
    assert np.abs(ours - theirs["logits"])[real].max() <= 1e-4
