"""Backend selection, and whole-model agreement of the Numba backend with the NumPy reference."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import refopt
from conftest import shared_path
from refopt import backend
from refopt.errors import BackendError, ConfigError
from refopt.model import init_params, logits_forward, new_cache
from refopt.models import OPTCausalLM
from tests_support import random_config

NUMPY, NUMBA = backend.ops("numpy"), backend.ops("numba")


def test_selection_order(monkeypatch):
    monkeypatch.delenv("REFOPT_BACKEND", raising=False)
    assert backend.get_backend() == "numba"                 # auto: the fastest available
    monkeypatch.setenv("REFOPT_BACKEND", "numpy")
    assert backend.get_backend() == "numpy"
    refopt.set_backend("numba")
    try:
        assert backend.get_backend() == "numba"             # set_backend beats the environment
        with refopt.use_backend("numpy"):
            assert backend.get_backend() == "numpy"         # the context manager beats both
            assert backend.resolve("numba") == "numba"      # a model's own choice beats everything
        assert backend.get_backend() == "numba"
    finally:
        refopt.set_backend("auto")
    assert backend.ops("numpy") is refopt.ops


def test_unknown_backend_errors(monkeypatch):
    with pytest.raises(BackendError, match="backend 'tpu'"):
        refopt.set_backend("tpu")
    with pytest.raises(BackendError, match="backend 'gpu'"):
        with refopt.use_backend("gpu"):
            pass
    monkeypatch.setenv("REFOPT_BACKEND", "fortran")
    with pytest.raises(BackendError, match="backend 'fortran'"):
        backend.get_backend()
    with pytest.raises(BackendError):
        OPTCausalLM.from_preset(shared_path("fixtures", "hf", "opt-tiny-preln"), backend="tpu")


@pytest.mark.parametrize("name", ["opt-tiny-preln", "opt-tiny-postln-proj"])
def test_fixture_logits_agree(name):
    e = np.load(shared_path("fixtures", "hf", name, "expected.npz"))
    x = {"token_ids": e["token_ids"], "padding_mask": e["left_padding_mask"]}
    out = {}
    for b in ("numpy", "numba"):
        lm = OPTCausalLM.from_preset(shared_path("fixtures", "hf", name), dtype="float64", backend=b)
        out[b] = lm.predict(x)
    real = x["padding_mask"].astype(bool)
    assert np.abs(out["numba"] - e["left_logits_f64"])[real].max() <= 1e-10
    rel = np.abs(out["numba"] - out["numpy"])[real].max() / np.abs(out["numpy"][real]).max()
    assert rel <= 1e-12


@settings(max_examples=25)
@given(cfg=random_config(dtype="float64"), data=st.data())
def test_decode_with_cache_agrees(cfg, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    params = init_params(cfg, seed=1, std=0.5)
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 10))
    ids = rng.integers(0, cfg.vocabulary_size, (B, T))
    mask = np.ones((B, T), bool)
    mask[0, : data.draw(st.integers(0, T - 1))] = False                   # left padding in row 0
    outs = {}
    for name, ops in (("numpy", NUMPY), ("numba", NUMBA)):
        cache = new_cache(cfg, B, T, np.float64)
        steps = [logits_forward(params, cfg, ids[:, :1], mask, cache=cache, cache_index=0, ops=ops)]
        for t in range(1, T):
            steps.append(logits_forward(params, cfg, ids[:, t:t + 1], mask, cache=cache, cache_index=t, ops=ops))
        outs[name] = np.concatenate(steps, axis=1)
    scale = np.abs(outs["numpy"]).max()
    assert np.abs(outs["numba"] - outs["numpy"]).max() <= 1e-12 * scale


def test_weights_dtype_logits_error_and_greedy_text():
    path = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    ref = OPTCausalLM.from_preset(path, preprocessor=None)
    ids = np.array([[2, 31414, 232, 6, 38, 524, 10]])
    base = ref.predict({"token_ids": ids})
    for weights_dtype, bound in (("bfloat16", 0.05), ("float16", 0.01), ("int8", 0.05)):
        lm = OPTCausalLM.from_preset(path, preprocessor=None, weights_dtype=weights_dtype)
        assert lm.backbone.weights_dtype == weights_dtype
        err = np.abs(lm.predict({"token_ids": ids}) - base).max() / np.abs(base).max()
        assert err <= bound, (weights_dtype, err)
        # the NumPy reference computes with the dequantised weights: same logits as the kernels
        with refopt.use_backend("numpy"):
            assert np.abs(lm.predict({"token_ids": ids}) - base).max() / np.abs(base).max() <= bound
    with pytest.raises(ConfigError, match="weights_dtype='int4'"):
        OPTCausalLM.from_preset(path, preprocessor=None, weights_dtype="int4")


@pytest.mark.parametrize("make", [
    lambda: refopt.samplers.TopKSampler(k=4, seed=11),
    lambda: refopt.samplers.TopPSampler(p=0.7, seed=12),
    lambda: refopt.samplers.TopPSampler(p=0.5, k=3, seed=13),
    lambda: refopt.samplers.MinPSampler(min_p=0.1, seed=14),
    lambda: refopt.samplers.RandomSampler(seed=15),
    lambda: refopt.samplers.GreedySampler(),
])
def test_seeded_generation_identical_across_backends(make):
    from refopt.config import OPTConfig
    from refopt.models import OPTBackbone

    cfg = OPTConfig(vocabulary_size=37, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16,
                    max_sequence_length=24, dropout=0.0, dtype="float64")
    ids = np.array([[2, 5, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                    [2, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    mask = ids != 1
    out = {}
    for b in ("numpy", "numba"):
        lm = OPTCausalLM(OPTBackbone.from_opt_config(cfg, init_params(cfg, seed=3, std=0.4)))
        lm.backend = b
        lm.compile(sampler=make())
        out[b] = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(out["numba"], out["numpy"])


def test_samplers_run_on_the_models_ops_not_the_ambient_backend(monkeypatch):
    from refopt.config import OPTConfig
    from refopt.models import OPTBackbone

    cfg = OPTConfig(vocabulary_size=23, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=8,
                    max_sequence_length=12, dropout=0.0, dtype="float64")
    lm = OPTCausalLM(OPTBackbone.from_opt_config(cfg, init_params(cfg, seed=1, std=0.4)))
    lm.compile(sampler=refopt.samplers.TopKSampler(k=3, seed=2))
    x = {"token_ids": np.array([[2, 5, 1, 1, 1]]), "padding_mask": np.array([[1, 1, 0, 0, 0]], bool)}

    def ambient(*args):
        raise AssertionError("a Numba selection step ran for a model pinned to NumPy")

    monkeypatch.setattr(NUMBA, "top_k_mask", ambient)
    monkeypatch.setattr(NUMBA, "choose", ambient)
    lm.backend = "numpy"
    with refopt.use_backend("numba"):
        want = lm.generate(x, stop_token_ids=None)["token_ids"]          # the model's choice wins
    lm.backend = "numba"
    with refopt.use_backend("numpy"), pytest.raises(AssertionError, match="Numba selection step"):
        lm.generate(x, stop_token_ids=None)                                # and reaches the sampler
    monkeypatch.undo()
    with refopt.use_backend("numpy"):
        np.testing.assert_array_equal(lm.generate(x, stop_token_ids=None)["token_ids"], want)
