"""KerasHub loads what refopt writes, and refopt loads what KerasHub writes (needs the `keras`
extra). KerasHub runs in a subprocess with its TensorFlow backend (tests/keras_runner.py: one for the
test process), so TensorFlow and torch never share a process."""

import importlib.util
import json

import numpy as np
import pytest

from refopt.models import OPTBackbone, OPTCausalLM

import keras_runner

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras_hub") is None,
                                reason="needs keras-hub (pip install -e '.[keras]')")

KERAS_SCRIPT = r"""
import os, sys, json
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import keras_hub
mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "shards":  # load refopt's sharded preset, then write KerasHub's own, sharded alike
    ids = np.load(out + ".in.npz")
    x = {"token_ids": ids["token_ids"], "padding_mask": ids["padding_mask"]}
    backbone = keras_hub.models.Backbone.from_preset(path)
    loaded = np.asarray(backbone.token_embedding(backbone(x), reverse=True))
    for w in backbone.weights:
        w.assign(np.random.default_rng(len(w.path) + 1).standard_normal(w.shape).astype("float32") * 0.3)
    written = np.asarray(backbone.token_embedding(backbone(x), reverse=True))
    backbone.save_to_preset(sys.argv[4], max_shard_size=float(sys.argv[5]))
    np.savez(out, loaded=loaded, written=written)
elif mode == "load":
    ids = np.load(out + ".in.npz")
    lm = keras_hub.models.OPTCausalLM.from_preset(path)
    # call the model itself: predict() would run the attached preprocessor on the dict
    logits = np.asarray(lm({"token_ids": ids["token_ids"], "padding_mask": ids["padding_mask"]}))
    tok = lm.preprocessor.tokenizer("The quick brown fox") if lm.preprocessor is not None else None
    np.savez(out, logits=logits, tok=np.asarray(tok if tok is not None else []))
else:  # write a random KerasHub preset
    import keras
    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.OPTBackbone(vocabulary_size=53, num_layers=2, num_heads=2, hidden_dim=8,
                                            intermediate_dim=12, max_sequence_length=16, dropout=0.0)
    for w in backbone.weights:
        w.assign(np.random.default_rng(len(w.path)).standard_normal(w.shape).astype("float32") * 0.3)
    ids = np.load(out + ".in.npz")
    logits = np.asarray(backbone.token_embedding(backbone({"token_ids": ids["token_ids"],
                                                            "padding_mask": ids["padding_mask"]}),
                                                  reverse=True))
    backbone.save_to_preset(path)
    np.savez(out, logits=logits)
"""


def run_keras(mode, path, tmp_path, ids, mask, *args):
    out = str(tmp_path / f"{mode}_out")
    np.savez(out + ".in.npz", token_ids=ids, padding_mask=mask)
    proc = keras_runner.run(KERAS_SCRIPT, mode, path, out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out + ".npz")


IDS = np.array([[2, 5, 9, 11, 3, 7], [2, 4, 6, 1, 1, 1]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


def test_keras_hub_loads_refopt_preset(tmp_path, shared):
    # the fixture preset, loaded and written back by refopt, with its tokenizer and preprocessor
    lm = OPTCausalLM.from_preset(shared("fixtures", "keras", "opt_tiny_keras"))
    lm.save_to_preset(tmp_path / "ours")
    theirs = run_keras("load", tmp_path / "ours", tmp_path, IDS, MASK)
    ours = lm.predict({"token_ids": IDS, "padding_mask": MASK})
    real = MASK.astype(bool)
    assert np.abs(ours - theirs["logits"])[real].max() <= 1e-4
    if lm.preprocessor is not None:
        assert list(theirs["tok"]) == list(lm.preprocessor.tokenizer("The quick brown fox"))


def test_keras_hub_loads_random_refopt_model(tmp_path):
    bb = OPTBackbone(vocabulary_size=53, num_layers=3, num_heads=2, hidden_dim=8, intermediate_dim=12,
                     max_sequence_length=16, dropout=0.0)
    rng = np.random.default_rng(1)
    bb.params = {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32) for k, v in bb.params.items()}
    lm = OPTCausalLM(bb)
    lm.save_to_preset(tmp_path / "rand")
    theirs = run_keras("load", tmp_path / "rand", tmp_path, IDS, MASK)
    real = MASK.astype(bool)
    assert np.abs(lm.predict({"token_ids": IDS, "padding_mask": MASK}) - theirs["logits"])[real].max() <= 1e-4


def test_refopt_loads_keras_hub_written_preset(tmp_path):
    theirs = run_keras("write", tmp_path / "kh", tmp_path, IDS, MASK)
    lm = OPTCausalLM.from_preset(tmp_path / "kh", preprocessor=None)
    ours = lm.predict({"token_ids": IDS, "padding_mask": MASK})
    real = MASK.astype(bool)
    assert np.abs(ours - theirs["logits"])[real].max() <= 1e-4


def test_sharded_presets_both_ways(tmp_path):
    # save_to_preset(max_shard_size=...) in KerasHub's sharded layout: KerasHub loads refopt's
    # shards, and refopt loads KerasHub's, whose index is the very one refopt writes
    limit = 2500 / 1024 ** 3                                # GB: a few variables per shard
    bb = OPTBackbone(vocabulary_size=53, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=12,
                     max_sequence_length=16, dropout=0.0)
    rng = np.random.default_rng(2)
    bb.params = {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32) for k, v in bb.params.items()}
    bb.save_to_preset(tmp_path / "ours", max_shard_size=limit)
    assert not (tmp_path / "ours" / "model.weights.h5").exists()
    assert len(list((tmp_path / "ours").glob("model_*.weights.h5"))) > 2
    theirs = run_keras("shards", tmp_path / "ours", tmp_path, IDS, MASK, tmp_path / "kh", limit)
    real = MASK.astype(bool)
    ours = OPTCausalLM(bb).predict({"token_ids": IDS, "padding_mask": MASK})
    assert np.abs(ours - theirs["loaded"])[real].max() <= 1e-4
    again = OPTBackbone.from_preset(tmp_path / "kh")
    assert np.abs(OPTCausalLM(again).predict({"token_ids": IDS, "padding_mask": MASK})
                  - theirs["written"])[real].max() <= 1e-4
    again.save_to_preset(tmp_path / "ours_again", max_shard_size=limit)
    index = json.loads((tmp_path / "kh" / "model.weights.json").read_text())
    assert json.loads((tmp_path / "ours_again" / "model.weights.json").read_text()) == index
    assert list(index["weight_map"]) == list(json.loads(
        (tmp_path / "ours_again" / "model.weights.json").read_text())["weight_map"])
