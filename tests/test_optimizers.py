"""Adam / AdamW with Keras semantics: Keras's own golden values (keras/src/optimizers/*_test.py),
torch.optim.AdamW where the two definitions coincide, clipping, gradient accumulation, schedules,
argument errors."""

import math

import numpy as np
import pytest

from refopt import optimizers
from refopt.errors import TrainingError
from refopt.optimizers import Adam, AdamW
from refopt.training import clip_by_global_norm, global_norm
from refopt.training.schedules import CosineDecay


def _apply(opt, grad, var, name="w"):
    params = {name: var}
    opt.apply({name: np.asarray(grad, var.dtype)}, params)
    return params[name]


# ------------------------------------------------------------------------------ Keras's golden values
def test_keras_defaults():
    a, w = Adam(), AdamW()
    assert (a.learning_rate, a.beta_1, a.beta_2, a.epsilon, a.amsgrad, a.weight_decay) == \
        (0.001, 0.9, 0.999, 1e-7, False, None)
    assert (w.learning_rate, w.weight_decay, w.epsilon) == (0.001, 0.004, 1e-7)
    auto = optimizers.get("auto")
    assert isinstance(auto, Adam) and not isinstance(auto, AdamW) and auto.learning_rate == 2e-5
    assert isinstance(optimizers.get("adamw"), AdamW)
    assert optimizers.get(w) is w


def test_adam_single_step_keras_golden():
    var = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    out = _apply(Adam(learning_rate=0.5), [1.0, 6.0, 7.0, 2.0], var)
    np.testing.assert_allclose(out, [0.5, 1.5, 2.5, 3.5], rtol=1e-4, atol=1e-4)
    out = _apply(AdamW(learning_rate=0.5), [1.0, 6.0, 7.0, 2.0], var)
    np.testing.assert_allclose(out, [0.4980, 1.4960, 2.494, 3.492], rtol=1e-4, atol=1e-4)


def test_adam_amsgrad_keras_golden():
    opt = Adam(amsgrad=True)
    x = np.ones(10, np.float32)
    grads = np.arange(0.1, 1.1, 0.1, dtype=np.float32)
    golden = [0.999, 0.9982, 0.9974, 0.9965, 0.9955]
    x = _apply(opt, np.full(10, 0.01, np.float32), x)
    for g in golden:
        np.testing.assert_allclose(x, g, rtol=5e-4, atol=5e-4)
        x = _apply(opt, grads, x)


def test_adamw_keras_golden_with_large_epsilon():
    # epsilon=2 makes Keras's placement of epsilon (outside the bias correction) visible
    opt = AdamW(learning_rate=1.0, weight_decay=0.5, epsilon=2)
    x = np.ones(10)
    grads = np.arange(0.1, 1.1, 0.1)
    golden = np.array([
        [0.4998] * 10,
        [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
        [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
        [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
        [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159]])
    x = _apply(opt, np.full(10, 0.01), x)
    for row in golden:
        np.testing.assert_allclose(x, row, rtol=5e-4, atol=5e-4)
        x = _apply(opt, grads, x)


def test_weight_decay_and_exclusion_keras_golden():
    params = {"w": np.array(2.0), "exclude.w": np.array(2.0)}
    zero = {"w": np.array(0.0), "exclude.w": np.array(0.0)}
    for _ in range(3):
        opt = AdamW(learning_rate=1.0, weight_decay=0.004)
        opt.exclude_from_weight_decay(var_names=["exclude"])
        opt.apply(zero, params)
    assert abs(params["w"] - 1.9760959) < 1e-6 and params["exclude.w"] == 2.0
    with pytest.raises(TrainingError, match="before"):
        opt.exclude_from_weight_decay(var_names=["bias"])


# ------------------------------------------------------------------------------ torch.optim.AdamW
def _torch():
    return pytest.importorskip("torch", reason="needs torch (pip install -e '.[peers]')")


def test_one_adamw_step_equals_torch_in_float64():
    torch = _torch()
    rng = np.random.default_rng(0)
    lr, wd, b1, b2, eps = 3e-3, 0.1, 0.9, 0.95, 1e-8
    params = {"a": rng.standard_normal((4, 5)), "b": rng.standard_normal(5)}
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    grads["a"][0, 0] = 0.0  # a zero gradient: only epsilon keeps the denominator off zero
    tparams = [torch.tensor(params[k], requires_grad=True) for k in params]
    topt = torch.optim.AdamW(tparams, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for p, k in zip(tparams, params):
        p.grad = torch.tensor(grads[k])
    topt.step()
    # torch adds eps to sqrt(v) / sqrt(1 - beta_2**t), Keras adds epsilon to sqrt(v): at step 1
    # the same update is Keras's epsilon = eps * sqrt(1 - beta_2)
    opt = AdamW(learning_rate=lr, weight_decay=wd, beta_1=b1, beta_2=b2, epsilon=eps * math.sqrt(1 - b2))
    ours = dict(params)
    opt.apply(grads, ours)
    for p, k in zip(tparams, params):
        ref = p.detach().numpy()
        assert ours[k].dtype == np.float64
        np.testing.assert_allclose(ours[k], ref, rtol=1e-14, atol=1e-15)
        assert not np.array_equal(ours[k], params[k])


def test_adamw_steps_equal_torch_without_epsilon():
    # with epsilon 0 the two definitions coincide at every step
    torch = _torch()
    rng = np.random.default_rng(1)
    lr, wd = 1e-2, 0.01
    params = {"a": rng.standard_normal((3, 4))}
    tp = torch.tensor(params["a"], requires_grad=True)
    topt = torch.optim.AdamW([tp], lr=lr, eps=0.0, weight_decay=wd)
    opt = AdamW(learning_rate=lr, weight_decay=wd, epsilon=0.0)
    ours = dict(params)
    for _ in range(5):
        g = rng.standard_normal((3, 4))
        tp.grad = torch.tensor(g)
        topt.step()
        opt.apply({"a": g}, ours)
    np.testing.assert_allclose(ours["a"], tp.detach().numpy(), rtol=1e-13, atol=1e-14)
    assert opt.iterations == 5


# ------------------------------------------------------------------------------ clipping
def test_global_clipnorm():
    grads = {"a": np.array([50.0, 100.0]), "b": np.array([[0.0, 20.0]])}
    norm = math.sqrt(50 ** 2 + 100 ** 2 + 20 ** 2)
    assert abs(global_norm(grads) - norm) < 1e-12
    clipped = clip_by_global_norm(grads, 1.0)
    np.testing.assert_allclose(global_norm(clipped), 1.0, rtol=1e-14)
    np.testing.assert_allclose(clipped["a"], grads["a"] / norm)
    np.testing.assert_array_equal(clip_by_global_norm(grads, 1e6)["a"], grads["a"])
    assert np.isnan(clip_by_global_norm({"a": np.array([np.inf, 1.0])}, 1.0)["a"]).all()
    # inside the optimizer (Adam's first step is sign-like, so its first moment shows the clipping)
    opt = Adam(global_clipnorm=1.0)
    params = {k: np.zeros_like(v) for k, v in grads.items()}
    opt.apply(grads, params)
    np.testing.assert_allclose(opt._slots["a"]["m"], 0.1 * grads["a"] / norm)


def test_clipnorm_and_clipvalue_keras_golden():
    for kw, expected in ((dict(clipnorm=1), [2 ** 0.5 / 2] * 2), (dict(clipvalue=1), [1.0, 1.0])):
        opt = Adam(**kw)
        params = {"w": np.zeros(2)}
        opt.apply({"w": np.array([100.0, 100.0])}, params)
        np.testing.assert_allclose(opt._slots["w"]["m"] / 0.1, expected)


# ------------------------------------------------------------------------------ accumulation
def test_gradient_accumulation_averages_and_counts_updates():
    rng = np.random.default_rng(2)
    start = {"w": rng.standard_normal(6)}
    g = [rng.standard_normal(6) for _ in range(6)]
    acc = AdamW(learning_rate=0.1, gradient_accumulation_steps=3, global_clipnorm=0.5)
    ref = AdamW(learning_rate=0.1, global_clipnorm=0.5)
    p_acc, p_ref = dict(start), dict(start)
    for i in range(6):
        before = p_acc["w"].copy()
        acc.apply({"w": g[i]}, p_acc)
        if (i + 1) % 3:
            np.testing.assert_array_equal(p_acc["w"], before)  # accumulating only
        else:
            ref.apply({"w": sum(g[i - 2:i + 1]) / 3}, p_ref)     # one update with the mean
            np.testing.assert_allclose(p_acc["w"], p_ref["w"], rtol=1e-14)
    assert acc.iterations == 2 and acc._iterations == 6


# ------------------------------------------------------------------------------ schedules
def test_cosine_decay_with_warmup_keras_formula():
    s = CosineDecay(0.0, decay_steps=10, alpha=0.1, warmup_target=1e-3, warmup_steps=4)
    assert s(0) == 0.0 and s(2) == pytest.approx(5e-4) and s(4) == pytest.approx(1e-3)
    assert s(9) == pytest.approx(1e-3 * (0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)) + 0.1))
    assert s(14) == pytest.approx(1e-4) and s(100) == pytest.approx(1e-4)
    plain = CosineDecay(1.0, decay_steps=4)
    assert [plain(i) for i in (0, 2, 4, 8)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    flat = CosineDecay(0.0, 5, alpha=1.0, warmup_target=0.1, warmup_steps=2)  # warm-up then constant
    assert [flat(i) for i in (1, 2, 50)] == pytest.approx([0.05, 0.1, 0.1])


def test_schedule_drives_the_learning_rate_by_raw_call_count():
    s = CosineDecay(0.0, decay_steps=10, warmup_target=1.0, warmup_steps=4)
    opt = Adam(learning_rate=s, gradient_accumulation_steps=2)
    params = {"w": np.ones(2)}
    seen = []
    for _ in range(4):
        seen.append(opt.learning_rate)
        opt.apply({"w": np.ones(2)}, params)
    # Keras: schedules see every apply() call, Adam's step counts updates
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75]) and opt.iterations == 2
    with pytest.raises(TrainingError, match="schedule"):
        opt.learning_rate = 0.1


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=0.0), "positive"),
    (dict(learning_rate=-1e-3), "positive"),
    (dict(learning_rate=float("nan")), "positive"),
    (dict(learning_rate="fast"), "learning_rate"),
    (dict(beta_1=1.0), "beta_1"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(clipnorm=1.0, global_clipnorm=1.0), "only one"),
    (dict(clipnorm=0.0), "clipnorm"),
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_optimizer_arguments(kwargs, match):
    with pytest.raises(TrainingError, match=match):
        Adam(**kwargs)


def test_bad_schedule_and_names():
    with pytest.raises(TrainingError, match="decay_steps"):
        CosineDecay(0.1, decay_steps=0)
    with pytest.raises(TrainingError, match="weight_decay"):
        AdamW(weight_decay=None)
    with pytest.raises(TrainingError, match="'sgd'"):
        optimizers.get("sgd")
    opt = Adam()
    opt.apply({"a": np.ones(2)}, {"a": np.ones(2)})
    with pytest.raises(TrainingError, match="differing names"):
        opt.apply({"b": np.ones(2)}, {"b": np.ones(2)})
    with pytest.raises(TrainingError, match="shape"):
        opt.apply({"a": np.ones(3)}, {"a": np.ones(2)})


def test_only_arrays_the_optimizer_allocated_are_written():
    w = np.ones(3)
    w.setflags(write=False)                  # e.g. a memory-mapped checkpoint tensor
    shared = np.ones(2)                      # e.g. an array another model also holds
    params = {"w": w, "s": shared}
    opt = AdamW()
    opt.apply({"w": np.ones(3), "s": np.ones(2)}, params)
    assert params["w"] is not w and (w == 1).all() and (params["w"] < 1).all()
    assert params["s"] is not shared and (shared == 1).all()
    owned = params["w"]
    opt.apply({"w": np.ones(3), "s": np.ones(2)}, params)
    assert params["w"] is owned              # from then on, updated in place
    params["w"] = np.ones(3)                 # replaced from outside: copied again, not written
    outside = params["w"]
    opt.apply({"w": np.ones(3), "s": np.ones(2)}, params)
    assert params["w"] is not outside and (outside == 1).all()


@pytest.mark.skipif(not __import__("refopt.backend").backend.available("numba"), reason="needs numba")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_numba_update_equals_the_numpy_reference_bit_for_bit(dtype, amsgrad):
    from refopt import backend
    from refopt.model import Parameters

    rng = np.random.default_rng(3)
    start = {"w": rng.standard_normal((33, 7)).astype(dtype), "exclude.b": rng.standard_normal(5).astype(dtype)}
    grads = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in start.items()} for _ in range(4)]
    out = {}
    for name in ("numpy", "numba"):
        opt = AdamW(learning_rate=CosineDecay(0.0, 6, warmup_target=0.1, warmup_steps=2), weight_decay=0.1,
                    amsgrad=amsgrad, global_clipnorm=3.0)
        opt.exclude_from_weight_decay(var_names=["exclude"])
        params = Parameters({k: v.copy() for k, v in start.items()})
        version = params.version
        for g in grads:
            opt.apply(g, params, ops=backend.ops(name))             # the ops given, not the ambient ones
        assert params.version > version                             # updates advance the version
        out[name] = params
    for k in start:
        assert out["numba"][k].dtype == dtype
        np.testing.assert_array_equal(out["numba"][k], out["numpy"][k])


def test_ops_are_explicit_and_every_backend_has_adam_update():
    from refopt import backend, ops as reference

    calls = []

    class Recording:
        def adam_update(self, *args):
            calls.append(args[0].shape)
            return reference.adam_update(*args)

    opt = Adam(learning_rate=0.1)
    params = {"w": np.ones(3)}
    with backend.use_backend("numpy"):
        opt.apply({"w": np.ones(3)}, params, ops=Recording())
    assert calls == [(3,)] and (params["w"] < 1).all()
    for name in ("numpy", "numba"):
        if backend.available(name):
            assert callable(backend.ops(name).adam_update)
