"""Forward logits against outputs computed by transformers and KerasHub (../shared/fixtures)."""

import numpy as np
import pytest

from conftest import shared_path
from refopt.models import OPTBackbone, OPTCausalLM

HF_MODELS = ["opt-tiny-preln", "opt-tiny-postln-proj"]


def _expected(name):
    return np.load(shared_path("fixtures", "hf", name, "expected.npz"))


@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize("mask_key,logits_key", [("padding_mask", "logits_f64"),
                                                 ("left_padding_mask", "left_logits_f64")])
def test_hf_float64_logits(name, mask_key, logits_key):
    e = _expected(name)
    lm = OPTCausalLM.from_preset(shared_path("fixtures", "hf", name), dtype="float64", preprocessor=None)
    logits = lm.predict({"token_ids": e["token_ids"], "padding_mask": e[mask_key]})
    assert logits.dtype == np.float64
    real = e[mask_key].astype(bool)
    err = np.abs(logits - e[logits_key])[real].max()
    assert err <= 1e-10, f"{name} {mask_key}: max |Δlogit| {err:.3g} on non-padding positions"


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_float32_logits(name):
    e = _expected(name)
    lm = OPTCausalLM.from_preset(shared_path("fixtures", "hf", name), preprocessor=None)
    logits = lm.predict({"token_ids": e["token_ids"], "padding_mask": e["padding_mask"]})
    assert logits.dtype == np.float32
    real = e["padding_mask"].astype(bool)
    assert np.abs(logits - e["logits_f32"])[real].max() <= 1e-4


def test_keras_preset_logits():
    e = np.load(shared_path("fixtures", "keras", "expected_logits.npz"))
    lm = OPTCausalLM.from_preset(shared_path("fixtures", "keras", "opt_tiny_keras"), preprocessor=None)
    logits = lm.predict({"token_ids": e["token_ids"], "padding_mask": e["padding_mask"]})
    real = e["padding_mask"].astype(bool)
    assert np.abs(logits[..., :2048] - e["logits_first_2048"])[real].max() <= 1e-4
    assert (logits.argmax(-1) == e["argmax"])[real].all()
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    assert np.abs(lse - e["logsumexp"])[real].max() <= 1e-4


@pytest.mark.parametrize("name", HF_MODELS)
def test_all_padding_rows_are_finite(name):
    lm = OPTCausalLM.from_preset(shared_path("fixtures", "hf", name), preprocessor=None)
    ids = np.array([[5, 6, 7, 8], [1, 1, 1, 1]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])
    logits = lm.predict({"token_ids": ids, "padding_mask": mask})
    assert np.isfinite(logits).all()
    # a padding row does not change the real row
    alone = lm.predict({"token_ids": ids[:1], "padding_mask": mask[:1]})
    np.testing.assert_allclose(logits[:1], alone, rtol=0, atol=1e-5)


def test_backbone_returns_hidden_states():
    path = shared_path("fixtures", "hf", "opt-tiny-postln-proj")
    bb = OPTBackbone.from_preset(path)
    ids = np.array([[5, 6, 7]])
    h = bb({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    # the projection model's hidden states are project_out's output (word_embed_proj_dim wide)
    assert h.shape == (1, 3, bb.word_embed_proj_dim)
    bb2 = OPTBackbone.from_preset(shared_path("fixtures", "hf", "opt-tiny-preln"))
    assert bb2({"token_ids": ids, "padding_mask": np.ones_like(ids)}).shape == (1, 3, bb2.hidden_dim)
