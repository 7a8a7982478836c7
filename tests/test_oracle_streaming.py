"""The streaming float64 reference (refopt.testing.streaming): the same numbers as the in-memory
reference, one decoder layer held at a time."""

import numpy as np
import pytest

from conftest import shared_path
from refopt.config import OPTConfig
from refopt.models import OPTBackbone
from refopt.testing import reference as R
from refopt.testing.streaming import (StreamingParams, layer_bytes_float64, streaming_logits,
                                      write_random_checkpoint)


def _batch(cfg, seed=0, B=2, S=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocabulary_size, (B, S))
    mask = np.ones((B, S), bool)
    mask[1, S - 3:] = False
    return ids, mask


@pytest.mark.parametrize("fixture", [("hf", "opt-tiny-preln"), ("hf", "opt-tiny-postln-proj"),
                                     ("keras", "opt_tiny_keras")])
def test_streaming_matches_the_in_memory_reference(fixture):
    path = shared_path("fixtures", *fixture)
    bb = OPTBackbone.from_preset(path, dtype="float64")
    ids, mask = _batch(bb.config)
    ref = R.run_forward(bb.params, bb.config, ids, mask)
    params = StreamingParams(path)
    tape = {}
    logits = streaming_logits(path, ids, mask, params=params, tape=tape, chunk_rows=333)
    # the same NumPy forward: bit-identical activations; the head, taken in chunks of the vocabulary,
    # may round its products differently (BLAS blocking)
    for name in R.activation_names(bb.config)[:-1]:
        np.testing.assert_array_equal(tape[name], ref[name], err_msg=name)
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-14 * np.abs(ref["logits"]).max())
    assert params.layers_loaded == bb.config.num_layers


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sharded_checkpoint_one_layer_at_a_time(tmp_path, dtype):
    cfg = OPTConfig(vocabulary_size=300, num_layers=4, num_heads=4, hidden_dim=32, intermediate_dim=64,
                    max_sequence_length=40, dropout=0.0)
    size = write_random_checkpoint(tmp_path / "ckpt", cfg, dtype, seed=3)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "ckpt").glob("model-layer-*.safetensors"))) == 4
    assert size == cfg.parameter_count(cfg.max_sequence_length + 2) * np.dtype(dtype).itemsize
    ids, mask = _batch(cfg, 1)
    params = StreamingParams(tmp_path / "ckpt")
    logits = streaming_logits(tmp_path / "ckpt", ids, mask, params=params, chunk_rows=64)
    bb = OPTBackbone.from_preset(tmp_path / "ckpt", dtype="float64")
    ref = R.run_forward(bb.params, bb.config, ids, mask)["logits"]
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    # never more than one layer's tensors (plus the final LayerNorm) held at once
    final = 2 * cfg.hidden_dim * 8
    assert layer_bytes_float64(cfg) <= params.peak_bytes <= layer_bytes_float64(cfg) + final
    assert params.layers_loaded == cfg.num_layers


def test_streaming_logits_feed_the_locator(tmp_path):
    # a port checked against the streamed reference: the same comparison as in memory
    from refopt.testing.locator import compare_activations
    from refopt.testing.mutants import LayerNormEpsilon

    cfg = OPTConfig(vocabulary_size=200, num_layers=3, num_heads=2, hidden_dim=16, intermediate_dim=24,
                    max_sequence_length=32, dropout=0.0)
    write_random_checkpoint(tmp_path / "c", cfg, "float32", seed=5)
    ids, mask = _batch(cfg, 2)
    tape = {}
    streaming_logits(tmp_path / "c", ids, mask, tape=tape)
    bb = OPTBackbone.from_preset(tmp_path / "c", dtype="float64")
    port = LayerNormEpsilon()
    port.load(bb.config, bb.params)
    acts = port.activations(ids, mask, R.activation_names(cfg))
    div = compare_activations(bb.config, acts, tape, "float32", mask)
    assert div.name == "layers.0.attention_input"
