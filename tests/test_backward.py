"""The hand-written backward pass: each op against finite differences, the whole model against
finite differences on random tiny configs (hypothesis, float64), and the transformers fixtures'
float64 loss and gradients (../shared/fixtures/hf/*/expected.npz)."""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from conftest import shared_path
from refopt import backend
from refopt.backend import BACKENDS
from refopt.backward import backward
from refopt.config import OPTConfig
from refopt.errors import InputError, InputTypeError
from refopt.io.checkpoint import from_state_dict
from refopt.io.huggingface import grads_to_huggingface
from refopt.io.safetensors_io import load
from refopt.model import forward, init_params, new_cache, param_shapes
from refopt.ops.activation import relu_backward, relu_forward
from refopt.ops.attention import attention_backward, attention_forward, attention_mask
from refopt.ops.dropout import dropout_backward, dropout_forward, dropout_mask
from refopt.ops.embedding import embedding_backward, embedding_forward, lm_head_backward, lm_head_forward
from refopt.ops.layernorm import layernorm_backward, layernorm_forward
from refopt.ops.linear import linear_backward, linear_forward
from refopt.ops.loss import cross_entropy_backward, cross_entropy_forward
from refopt.testing import strategies as rst
from refopt.training import loss_and_gradients

import refopt.ops as reference  # the NumPy ops: finite differences check the reference backward
from tests_support import check_op, five_point, rel_err  # noqa: E402

RTOL = 1e-6  # finite differences (five-point stencil, float64)
BACKENDS = [name for name in BACKENDS if backend.available(name) and name != "cuda"]


# ------------------------------------------------------------------------------ ops
def test_linear_backward():
    rng = np.random.default_rng(0)
    x, w, b, c = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5), \
        rng.standard_normal((2, 3, 5))
    d_x, d_w, d_b = linear_backward(c, x, w)
    check_op(lambda x, w, b: (linear_forward(x, w, b) * c).sum(), [x, w, b], [d_x, d_w, d_b], rng)
    assert linear_backward(c, x, w, has_bias=False)[2] is None


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_backward(affine):
    rng = np.random.default_rng(1)
    x, c = rng.standard_normal((2, 3, 6)) * 3 + 1, rng.standard_normal((2, 3, 6))
    gamma, beta = (rng.standard_normal(6), rng.standard_normal(6)) if affine else (None, None)
    d_x, d_gamma, d_beta = layernorm_backward(c, x, gamma, 1e-5)
    if affine:
        check_op(lambda x, g, b: (layernorm_forward(x, g, b, 1e-5) * c).sum(), [x, gamma, beta],
                 [d_x, d_gamma, d_beta], rng)
    else:
        assert d_gamma is None
        check_op(lambda x: (layernorm_forward(x, None, None, 1e-5) * c).sum(), [x], [d_x], rng)


def test_relu_and_dropout_backward():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 7))
    x[np.abs(x) < 1e-2] = 0.5  # away from the kink
    c = rng.standard_normal((3, 7))
    check_op(lambda x: (relu_forward(x) * c).sum(), [x], [relu_backward(c, x)], rng)
    assert relu_backward(np.ones(3), np.array([-1.0, 0.0, 2.0])).tolist() == [0, 0, 1]
    keep = dropout_mask(np.random.default_rng(3), (3, 7), 0.4, np.float64)
    assert set(np.unique(keep)) <= {0.0, 1 / 0.6}
    check_op(lambda x: (dropout_forward(x, keep) * c).sum(), [x], [dropout_backward(c, keep)], rng)


def test_embedding_and_tied_head_backward():
    rng = np.random.default_rng(4)
    table = rng.standard_normal((7, 3))
    ids = np.array([[1, 4, 1], [6, 1, 0]])  # repeated ids accumulate
    c = rng.standard_normal((2, 3, 3))
    d_table = embedding_backward(c, ids, 7)
    check_op(lambda t: (embedding_forward(t, ids) * c).sum(), [table], [d_table], rng)
    assert not d_table[[2, 3, 5]].any()  # rows never gathered
    x, cl = rng.standard_normal((2, 3, 3)), rng.standard_normal((2, 3, 7))
    d_x, d_t = lm_head_backward(cl, x, table)
    check_op(lambda x, t: (lm_head_forward(x, t) * cl).sum(), [x, table], [d_x, d_t], rng)


def test_attention_backward_with_causal_and_padding_masks():
    rng = np.random.default_rng(5)
    B, H, S, K = 2, 3, 5, 4
    q, k, v = (rng.standard_normal((B, H, S, K)) for _ in range(3))
    key_mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], bool)  # right and left padding
    mask = attention_mask(key_mask, np.arange(S))                    # row 1 has fully masked queries
    c = rng.standard_normal((B, H, S, K))
    out, probs = attention_forward(q, k, v, mask)
    d_q, d_k, d_v = attention_backward(c, q, k, v, probs, mask)
    check_op(lambda q, k, v: (attention_forward(q, k, v, mask)[0] * c).sum(), [q, k, v], [d_q, d_k, d_v], rng)
    # masked keys get no gradient through the scores; padding keys' values get none either
    assert not d_k[0, :, 3:].any() and not d_v[0, :, 3:].any()


def test_cross_entropy_backward():
    rng = np.random.default_rng(6)
    logits, y, w = rng.standard_normal((2, 3, 9)) * 3, rng.integers(0, 9, (2, 3)), rng.random((2, 3))
    ce, probs = cross_entropy_forward(logits, y)
    ref = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, ref, rtol=1e-13)
    d = cross_entropy_backward(w, probs, y)
    check_op(lambda z: (w * cross_entropy_forward(z, y)[0]).sum(), [logits], [d], rng)


# ------------------------------------------------------------------------------ whole model
def tiny_configs():
    # the oracle's one config space (refopt.testing.cases.ConfigSpace), with dropout
    return rst.configs(num_heads=(1, 3), hidden=(8, 24), vocabulary_size=(20, 50), num_layers=(1, 3),
                       intermediate_dim=(4, 24), max_sequence_length=(8, 12), projection=(4, 6),
                       dropout=(0.0, 0.3))


def random_params(cfg, seed):
    """Random weights, LayerNorm gains/biases away from 1/0 so their gradients are exercised."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.standard_normal(v.shape) * 0.3 if k.endswith((".gamma", ".beta", ".bias")) else v)
            for k, v in init_params(cfg, seed=seed, dtype="float64", std=0.5).items()}


def random_batch(rng, cfg, B, S):
    """Token ids, masks (each row right- or left-padded, at least one real token), next-token
    targets and weights: random positive weights where both the input and the target are real."""
    ids = rng.integers(0, cfg.vocabulary_size, (B, S))
    lengths = rng.integers(1, S + 1, B)
    cols = np.arange(S)
    mask = np.stack([cols < n if rng.random() < 0.5 else cols >= S - n for n in lengths]).astype(np.int64)
    y = rng.integers(0, cfg.vocabulary_size, (B, S))
    sw = rng.random((B, S)) * mask * np.roll(mask, -1, axis=1)
    sw[0, np.flatnonzero(mask[0])[0]] = 1.0  # at least one position counts
    return {"token_ids": ids, "padding_mask": mask}, y, sw


def loss_and_kinks(params, cfg, x, y, sw, dropout_seed):
    """The fixtures' loss, written out independently of refopt.training, and the sign pattern of
    every ReLU input (finite differences are only valid when it does not change)."""
    tape = {}
    rng = np.random.default_rng(dropout_seed) if dropout_seed is not None else None
    hidden = forward(params, cfg, x["token_ids"], x["padding_mask"], tape=tape, dropout_rng=rng,
                     ops=reference)
    logits = hidden @ params["embed_tokens"].T
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(logits, y[..., None], -1)[..., 0]
    signs = [tape[f"layers.{i}.fc1_output"] > 0 for i in range(cfg.num_layers)]
    return (sw * ce).sum() / sw.sum(), signs


@settings(max_examples=40)
@given(cfg=tiny_configs(), seed=st.integers(0, 2**16), B=st.integers(1, 3), S=st.integers(1, 8))
def test_model_gradients_match_finite_differences(cfg, seed, B, S):
    rng = np.random.default_rng(seed)
    params = random_params(cfg, seed)
    x, y, sw = random_batch(rng, cfg, B, S)
    dropout_seed = seed if cfg.dropout else None
    _, base_signs = loss_and_kinks(params, cfg, x, y, sw, dropout_seed)
    loss, grads = loss_and_gradients(params, cfg, x, y, sw, ops=reference,
                                     dropout_rng=np.random.default_rng(seed) if cfg.dropout else None)
    assert set(grads) == set(params)
    assert np.isclose(loss, loss_and_kinks(params, cfg, x, y, sw, dropout_seed)[0], rtol=1e-13)

    for name, p in params.items():
        g = grads[name]
        assert g.shape == p.shape and g.dtype == np.float64

        def f(value, name=name):
            q = dict(params)
            q[name] = value
            value_loss, signs = loss_and_kinks(q, cfg, x, y, sw, dropout_seed)
            # a ReLU input crossing 0 makes the loss non-differentiable along this path
            assume(all((a == b).all() for a, b in zip(signs, base_signs)))
            return value_loss

        # a random direction moves every element (small step, so no ReLU input crosses 0), and the
        # element with the largest gradient alone
        e = np.zeros(p.shape)
        e[np.unravel_index(np.abs(g).argmax(), g.shape)] = 1.0
        for d, h in ((rng.standard_normal(p.shape), 2e-5), (e, 1e-4)):
            num, ana = five_point(f, p, d, h), float((g * d).sum())
            # Some gradients are exactly zero: k_proj.bias always (a constant added to every key
            # shifts all of a query's scores alike, which softmax ignores), q/k weights when each
            # query sees a single key.  There the stencil returns only its rounding noise, at most
            # (1 + 8 + 8 + 1) / 12 * eps * |loss| / h; below 100x that, a difference is not resolved.
            resolution = 100 * 1.5 * np.finfo(np.float64).eps * abs(loss) / h
            assert abs(num - ana) <= max(RTOL * max(abs(num), abs(ana)), resolution), \
                (name, num, ana, cfg)


def test_dropout_is_reproducible_and_changes_the_gradient():
    cfg = OPTConfig(vocabulary_size=30, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=12,
                    max_sequence_length=8, dropout=0.3, dtype="float64")
    params = random_params(cfg, 0)
    x, y, sw = random_batch(np.random.default_rng(0), cfg, 2, 6)
    a = loss_and_gradients(params, cfg, x, y, sw, dropout_rng=np.random.default_rng(7))
    b = loss_and_gradients(params, cfg, x, y, sw, dropout_rng=np.random.default_rng(7))
    c = loss_and_gradients(params, cfg, x, y, sw)  # no rng: inference mode, no dropout
    assert a[0] == b[0] and all((a[1][k] == b[1][k]).all() for k in params)
    assert a[0] != c[0]
    assert c[0] == loss_and_gradients(params, cfg, x, y, sw)[0]


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs a second backend (numba) to compare with NumPy")
@settings(max_examples=10)
@given(cfg=tiny_configs(), seed=st.integers(0, 2**16), B=st.integers(1, 3), S=st.integers(1, 8))
def test_backends_give_the_same_gradients(cfg, seed, B, S):
    params = random_params(cfg, seed)
    x, y, sw = random_batch(np.random.default_rng(seed), cfg, B, S)
    drop = (lambda: np.random.default_rng(seed)) if cfg.dropout else (lambda: None)
    ref_loss, ref = loss_and_gradients(params, cfg, x, y, sw, dropout_rng=drop(), ops=reference)
    for name in BACKENDS[1:]:
        loss, grads = loss_and_gradients(params, cfg, x, y, sw, dropout_rng=drop(), ops=backend.ops(name))
        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
        largest = max(np.abs(g).max() for g in ref.values())
        for k in ref:
            assert np.abs(grads[k] - ref[k]).max() <= 1e-10 * max(np.abs(ref[k]).max(), 1e-3 * largest), k


def test_float32_gradients_follow_float64():
    cfg = OPTConfig(vocabulary_size=40, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=24,
                    max_sequence_length=8, dropout=0.0)
    p64 = random_params(cfg, 3)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    x, y, sw = random_batch(np.random.default_rng(3), cfg, 2, 7)
    l64, g64 = loss_and_gradients(p64, cfg, x, y, sw)
    l32, g32 = loss_and_gradients(p32, cfg, x, y, sw)
    assert abs(l32 - l64) <= 1e-5 * abs(l64)
    for k in p64:
        assert g32[k].dtype == np.float32
        if not k.endswith("k_proj.bias"):
            assert np.abs(g32[k] - g64[k]).max() <= 1e-4 * np.abs(g64[k]).max(), k


def test_zero_total_weight_gives_zero_loss_and_gradients():
    cfg = OPTConfig(vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=8,
                    max_sequence_length=8, dtype="float64")
    params = random_params(cfg, 0)
    x, y, _ = random_batch(np.random.default_rng(0), cfg, 2, 5)
    loss, grads = loss_and_gradients(params, cfg, x, y, np.zeros((2, 5)))
    assert loss == 0.0 and not any(g.any() for g in grads.values())


def test_backward_refuses_a_cached_forward():
    cfg = OPTConfig(vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=8,
                    max_sequence_length=8, dtype="float64")
    params = random_params(cfg, 0)
    tape = {}
    cache = new_cache(cfg, 1, 8, np.float64)
    hidden = forward(params, cfg, np.array([[3, 4]]), np.ones((1, 3)), cache=cache, cache_index=1, tape=tape)
    with pytest.raises(InputError, match="cache"):
        backward(params, cfg, tape, np.ones_like(hidden))
    with pytest.raises(InputError, match="tape"):
        backward(params, cfg, {}, np.ones_like(hidden))


@pytest.mark.parametrize("bad,match", [
    (dict(y=np.zeros((2, 4), int)), "y: shape"),
    (dict(sample_weight=np.ones((2,))), "sample_weight: shape"),
    (dict(sample_weight=np.ones((2, 5)) * np.nan), "non-finite"),
    (dict(y=np.full((2, 5), 99)), "y: id 99"),
    (dict(x={"token_ids": np.full((2, 5), -1)}), "token_ids"),
    (dict(x={"token_ids": np.zeros((2, 5), int), "padding_mask": np.ones((2, 4))}), "padding_mask"),
    (dict(y=None), "y: missing"),
])
def test_bad_batches_raise_input_errors(bad, match):
    cfg = OPTConfig(vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=8,
                    max_sequence_length=8, dtype="float64")
    args = dict(x={"token_ids": np.zeros((2, 5), int), "padding_mask": np.ones((2, 5))},
                y=np.zeros((2, 5), int), sample_weight=None)
    args.update(bad)
    with pytest.raises(InputError, match=match):
        loss_and_gradients(init_params(cfg), cfg, **args)
    with pytest.raises(InputTypeError):
        loss_and_gradients(init_params(cfg), cfg, np.zeros((2, 5), int), np.zeros((2, 5), int))


# ------------------------------------------------------------------------------ transformers fixtures
HF_MODELS = ["opt-tiny-preln", "opt-tiny-postln-proj"]


def _fixture(name):
    d = shared_path("fixtures", "hf", name)
    cfg = OPTConfig.from_file(d / "config.json")
    params, _ = from_state_dict(load(d / "model.safetensors"), cfg)
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    e = np.load(d / "expected.npz")
    ids, mask = e["token_ids"], e["padding_mask"]
    # the fixture's loss: logits at t against the token at t+1, weighted by the mask at t+1
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    return cfg, params, e, x, ids[:, 1:], mask[:, 1:]


def _assert_matches_fixture_gradients(grads_hf, e, tol=1e-9):
    expected = {k[len("grad/"):]: e[k] for k in e.files if k.startswith("grad/")}
    assert set(grads_hf) == set(expected)
    largest = max(np.abs(g).max() for g in expected.values())
    for name, ref in expected.items():
        ours = grads_hf[name]
        assert ours.shape == ref.shape and ours.dtype == np.float64, name
        if name.endswith("k_proj.bias"):
            # analytically zero (softmax shift invariance): both sides hold only round-off
            assert np.abs(ours).max() <= 1e-12 * largest and np.abs(ref).max() <= 1e-12 * largest
            continue
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err <= tol, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", HF_MODELS)
def test_fixture_loss_and_gradients(name, backend_name):
    cfg, params, e, x, y, sw = _fixture(name)
    loss, grads = loss_and_gradients(params, cfg, x, y, sw, ops=backend.ops(backend_name))
    assert abs(loss - float(e["loss_f64"])) <= 1e-9 * abs(float(e["loss_f64"]))
    hf = grads_to_huggingface(grads, cfg)
    # the two offset position rows of transformers' table never receive gradient
    assert not hf["model.decoder.embed_positions.weight"][:2].any()
    _assert_matches_fixture_gradients(hf, e)


@pytest.mark.parametrize("name", HF_MODELS)
def test_fixture_gradients_through_the_model_class(name):
    from refopt.models import OPTCausalLM

    lm = OPTCausalLM.from_preset(shared_path("fixtures", "hf", name), dtype="float64", preprocessor=None)
    _, _, e, x, y, sw = _fixture(name)
    loss, grads = lm.loss_and_gradients(x, y, sw, naming="huggingface")
    assert abs(loss - float(e["loss_f64"])) <= 1e-9 * abs(float(e["loss_f64"]))
    _assert_matches_fixture_gradients(grads, e)
    loss2, ours = lm.loss_and_gradients(x, y, sw)  # refopt's names by default
    assert loss2 == loss and set(ours) == set(param_shapes(lm.backbone.config))
