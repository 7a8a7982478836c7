"""LoRA: the adapter op's backward against finite differences (float64) and torch autograd, the
model's adapter gradients against finite differences, fit training the adapters alone (every other
weight bitwise unchanged), the .lora.h5 round trip, merging, and the errors KerasHub raises."""

import numpy as np
import pytest

from refopt.errors import CheckpointError, ConfigError
from refopt.model import init_params
from refopt.models import OPTBackbone, OPTCausalLM
from refopt.ops import lora_backward, lora_forward, lora_merge
from refopt.training.gradients import check_batch, forward_backward
from tests_support import check_op, five_point, rel_err

# (x shape, a shape as Keras stores it, b shape): a query/key/value projection ([D, H, r], b
# shared by the H heads), the attention output ([H, K, r] over the H*K inputs), a plain dense
CASES = {"query": ((2, 3, 6), (6, 2, 3), (3, 4)),
         "attention_output": ((2, 3, 8), (2, 4, 3), (3, 6)),
         "dense": ((5, 6), (6, 2), (2, 7))}


def _case(name, rng):
    xs, as_, bs = CASES[name]
    return rng.standard_normal(xs), rng.standard_normal(as_), rng.standard_normal(bs)


def _keras_delta_kernel(a, b, width):
    # Keras's LoRA: kernel + a @ b, with a @ b over the last axis of a; read as [in, out]
    return (a @ b).reshape(width, -1)


@pytest.mark.parametrize("name", CASES)
def test_lora_forward_is_kerass_kernel_update(name):
    rng = np.random.default_rng(0)
    x, a, b = _case(name, rng)
    expected = x @ _keras_delta_kernel(a, b, x.shape[-1])
    np.testing.assert_allclose(lora_forward(x, a, b), expected, rtol=1e-12, atol=1e-12)
    w = rng.standard_normal((expected.shape[-1], x.shape[-1]))          # refopt's [out, in]
    np.testing.assert_allclose(x @ lora_merge(w, a, b).T, x @ w.T + expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_lora_backward_matches_finite_differences(name):
    rng = np.random.default_rng(1)
    x, a, b = _case(name, rng)
    c = rng.standard_normal(lora_forward(x, a, b).shape)
    d_x, d_a, d_b = lora_backward(c, x, a, b)
    assert d_a.shape == a.shape and d_b.shape == b.shape and d_x.shape == x.shape
    check_op(lambda x, a, b: (lora_forward(x, a, b) * c).sum(), [x, a, b], [d_x, d_a, d_b], rng)


@pytest.mark.parametrize("name", CASES)
def test_lora_backward_matches_torch_autograd(name):
    torch = pytest.importorskip("torch", reason="needs torch (pip install -e '.[peers]')")
    rng = np.random.default_rng(2)
    x, a, b = _case(name, rng)
    c = rng.standard_normal(lora_forward(x, a, b).shape)
    tx, ta, tb = (torch.tensor(v, requires_grad=True) for v in (x, a, b))
    # Keras's formulation, written independently: the merged kernel update a @ b
    delta = tx @ torch.matmul(ta, tb).reshape(x.shape[-1], -1)
    (delta * torch.tensor(c)).sum().backward()
    for ours, theirs in zip(lora_backward(c, x, a, b), (tx.grad, ta.grad, tb.grad)):
        theirs = theirs.numpy()
        assert np.abs(ours - theirs).max() <= 1e-12 * np.abs(theirs).max()


# ------------------------------------------------------------------------------ the model
def _backbone(dtype="float32", **kwargs):
    bb = OPTBackbone(vocabulary_size=37, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=12,
                     max_sequence_length=16, dropout=0.0, dtype=dtype, **kwargs)
    bb.params = init_params(bb.config, seed=3, dtype=bb.config.compute_dtype, std=0.3)
    return bb


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocabulary_size, (3, 7))
    mask = np.ones((3, 7), bool)
    mask[1, 5:] = False
    y = rng.integers(3, cfg.vocabulary_size, (3, 7))
    return {"token_ids": ids, "padding_mask": mask}, y, mask.astype(float)


def test_enable_lora_keeps_the_outputs_and_adds_kerashubs_adapters():
    bb = _backbone()
    x, _, _ = _batch(bb.config)
    before = bb(x)
    bb.enable_lora(4, seed=0)
    assert sorted(bb.lora_layers) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj",
                                      "layers.1.v_proj"]
    assert bb.params["layers.0.q_proj.lora_a"].shape == (8, 2, 4)      # [D, H, r]
    assert bb.params["layers.0.q_proj.lora_b"].shape == (4, 4)         # [r, K]
    assert not bb.params["layers.0.q_proj.lora_b"].any()
    np.testing.assert_array_equal(bb(x), before)                        # b = 0: nothing changes
    assert bb.trainable_names() == {n for n in bb.params if ".lora_" in n}
    with pytest.raises(ConfigError, match="already enabled"):
        bb.enable_lora(4)
    other = _backbone()
    other.enable_lora(2, ["query", "feedforward_output_dense"], seed=0)
    assert sorted(other.lora_layers) == ["layers.0.fc2", "layers.0.q_proj", "layers.1.fc2",
                                         "layers.1.q_proj"]
    assert other.params["layers.0.fc2.lora_a"].shape == (12, 2)
    with pytest.raises(ConfigError, match="no layer"):
        _backbone().enable_lora(2, ["query_dense"])


@pytest.mark.parametrize("targets", [None, ["key", "attention_output", "feedforward_intermediate_dense",
                                            "feedforward_output_dense"]])
def test_every_adapted_layer_applies_in_inference_and_training(targets):
    from refopt.model import forward

    bb = _backbone("float64")
    bb.enable_lora(2, targets, seed=0)
    rng = np.random.default_rng(6)
    for name in bb.lora_layers:
        bb.params[name + ".lora_b"] = rng.standard_normal(bb.params[name + ".lora_b"].shape)
    x, _, _ = _batch(bb.config)
    ids, mask = x["token_ids"], x["padding_mask"]
    inference = forward(bb.params, bb.config, ids, mask, ops=bb.ops)
    training = forward(bb.params, bb.config, ids, mask, ops=bb.ops, tape={})
    np.testing.assert_allclose(inference, training, rtol=1e-12, atol=1e-12)
    merged = dict(bb.base_params())
    np.testing.assert_allclose(forward(merged, bb.config, ids, mask, ops=bb.ops), inference,
                               rtol=1e-10, atol=1e-10)


def test_model_adapter_gradients_match_finite_differences():
    bb = _backbone("float64")
    bb.enable_lora(2, seed=1)
    rng = np.random.default_rng(4)
    for name in bb.lora_layers:                 # b != 0, so a has a gradient too
        bb.params[name + ".lora_b"] = rng.standard_normal(bb.params[name + ".lora_b"].shape)
    x, y, sw = _batch(bb.config)
    batch = check_batch(bb.config, x, y, sw, np.float64)
    trainable = bb.trainable_names()
    result = forward_backward(bb.params, bb.config, batch, trainable=trainable)
    assert set(result.grads) == trainable
    full = forward_backward(bb.params, bb.config, batch)           # every parameter's gradient
    for name in trainable:
        np.testing.assert_allclose(result.grads[name], full.grads[name], rtol=1e-12, atol=1e-15)

    def loss(name, value):
        params = dict(bb.params, **{name: value})
        return forward_backward(params, bb.config, batch, trainable=set()).loss

    worst = 0.0
    for name in sorted(trainable):
        g = result.grads[name]
        for direction in (rng.standard_normal(g.shape), np.eye(g.size)[np.abs(g).argmax()].reshape(g.shape)):
            num = five_point(lambda v: loss(name, v), bb.params[name], direction)
            err = rel_err(num, float((g * direction).sum()))
            worst = max(worst, err)
            assert err <= 1e-6, f"{name}: relative error {err:.3g}"


def test_fit_trains_the_adapters_alone():
    bb = _backbone()
    bb.enable_lora(4, seed=0)
    lm = OPTCausalLM(bb)
    lm.compile(optimizer="adam")
    frozen = {k: v.copy() for k, v in bb.params.items() if ".lora_" not in k}
    adapters = {k: v.copy() for k, v in bb.params.items() if ".lora_" in k}
    x, y, sw = _batch(bb.config)
    first = lm.evaluate(x, y, sample_weight=sw, verbose=0)[0]
    lm.fit(x, y, sample_weight=sw, batch_size=2, epochs=20, verbose=0, seed=0)
    for k, v in frozen.items():                       # bitwise: the base weights are untouched
        assert bb.params[k].dtype == v.dtype and np.array_equal(bb.params[k], v), k
    assert all(not np.array_equal(bb.params[k], v) for k, v in adapters.items())
    assert lm.evaluate(x, y, sample_weight=sw, verbose=0)[0] < first
    assert set(lm.optimizer.get_config()) and len(adapters) == 8


def test_lora_weights_round_trip_and_merge(tmp_path):
    bb = _backbone()
    bb.enable_lora(3, seed=2)
    rng = np.random.default_rng(5)
    for name in bb.lora_layers:
        bb.params[name + ".lora_b"] = rng.standard_normal(bb.params[name + ".lora_b"].shape).astype(np.float32)
    x, _, _ = _batch(bb.config)
    adapted = bb(x)
    bb.save_lora_weights(tmp_path / "adapters.lora.h5")
    other = _backbone()
    other.load_lora_weights(tmp_path / "adapters.lora.h5")             # enables rank 3 itself
    assert other.lora_rank == 3
    np.testing.assert_array_equal(other(x), adapted)
    # a preset saves the merged weights, as Keras saves a LoRA layer's kernel
    lm = OPTCausalLM(bb)
    lm.save_to_preset(tmp_path / "merged")
    reloaded = OPTBackbone.from_preset(tmp_path / "merged")
    assert not reloaded.lora_enabled
    np.testing.assert_allclose(reloaded(x), adapted, rtol=1e-5, atol=1e-5)
    bb.merge_lora_weights()
    assert not bb.lora_enabled and bb.trainable_names() is None
    np.testing.assert_allclose(bb(x), adapted, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bb.params["layers.0.q_proj.weight"],
                                  reloaded.params["layers.0.q_proj.weight"])


def test_lora_errors(tmp_path):
    bb = _backbone()
    with pytest.raises(ConfigError, match="no lora-enabled layers"):
        bb.save_lora_weights(tmp_path / "a.lora.h5")
    with pytest.raises(ConfigError, match="not enabled"):
        bb.merge_lora_weights()
    bb.enable_lora(2, seed=0)
    with pytest.raises(ConfigError, match=r"must end in `\.lora\.h5`"):
        bb.save_lora_weights(tmp_path / "a.h5")
    bb.save_lora_weights(tmp_path / "a.lora.h5")
    other = _backbone()
    other.enable_lora(4, seed=0)
    with pytest.raises(ConfigError, match="rank=2.*rank=4"):
        other.load_lora_weights(tmp_path / "a.lora.h5")
    (tmp_path / "bad.lora.h5").write_bytes(b"not hdf5")
    with pytest.raises(CheckpointError):
        _backbone().load_lora_weights(tmp_path / "bad.lora.h5")
    with pytest.raises(ConfigError, match="merge_lora_weights"):
        bb.quantize("int8")


def test_lora_files_are_checked_before_the_model_changes(tmp_path):
    import h5py

    from refopt.errors import DestinationError

    bb = _backbone()
    bb.enable_lora(2, ["query", "value", "key"], seed=0)
    bb.save_lora_weights(tmp_path / "qkv.lora.h5")
    (tmp_path / "dir.lora.h5").mkdir()
    with pytest.raises(DestinationError):                 # a directory is never replaced
        bb.save_lora_weights(tmp_path / "dir.lora.h5")
    fresh = _backbone()
    with pytest.raises(CheckpointError, match="not LoRA-enabled here"):   # key adapters not dropped
        fresh.load_lora_weights(tmp_path / "qkv.lora.h5")
    assert not fresh.lora_enabled                          # the model did not change

    def variant(name, edit):
        path = tmp_path / f"{name}.lora.h5"
        path.write_bytes((tmp_path / "qkv.lora.h5").read_bytes())
        with h5py.File(path, "a") as f:
            del f["lora/11"], f["lora/21"]         # the key adapters: KerasHub's default layers only
            edit(f)
        return path

    ok = variant("ok", lambda f: None)
    fresh.load_lora_weights(ok)
    assert fresh.lora_rank == 2 and sorted(fresh.lora_layers) == sorted(
        p for p in bb.lora_layers if "k_proj" not in p)

    def wide(f):
        del f["lora/10/vars/lora_kernel_a"]
        f.create_dataset("lora/10/vars/lora_kernel_a", shape=(1 << 20, 1 << 20), dtype="f4")

    def nan(f):
        f["lora/10/vars/lora_kernel_b"][0, 0] = np.nan

    def link(f):
        f["lora/extra"] = h5py.SoftLink("/lora/10")

    def rank(f):
        del f["lora/vars/rank"]
        f.create_dataset("lora/vars/rank", data=[2])

    for name, edit, message in (("wide", wide, r"expected floats of shape \[8, 2, 2\]"),
                                ("nan", nan, "non-finite"), ("link", link, "soft link"),
                                ("rank", rank, "integer scalar")):
        other = _backbone()
        with pytest.raises(CheckpointError, match=message):
            other.load_lora_weights(variant(name, edit))
        assert not other.lora_enabled
