"""fit / evaluate / predict through OPTCausalLM: KerasHub's examples, what is reported (Keras's
reductions, recomputed independently here), dropout only in training, seeding, optimizer state,
validation data, progress output, and the errors users can cause."""

import math

import numpy as np
import pytest

from conftest import shared_path
from refopt.errors import InputError, InputTypeError, TrainingError
from refopt.model import init_params, logits_forward
from refopt.models import OPTBackbone, OPTCausalLM
from refopt.optimizers import Adam, AdamW, Optimizer
from refopt.training import History, loss_and_gradients


def tiny_lm(dropout=0.0, seed=0, vocab=50, seq=16):
    bb = OPTBackbone(vocabulary_size=vocab, num_layers=2, num_heads=2, hidden_dim=16,
                     intermediate_dim=32, max_sequence_length=seq, dropout=dropout, seed=seed)
    return OPTCausalLM(bb, preprocessor=None)


def data(n=5, s=6, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (n, s))
    mask = np.ones((n, s), int)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ids[mask == 0] = 1
    x = {"token_ids": ids, "padding_mask": mask}
    y = np.concatenate([ids[:, 1:], np.full((n, 1), 2)], axis=1)
    sw = np.concatenate([mask[:, 1:], np.zeros((n, 1), int)], axis=1) * rng.random((n, s))
    return x, y, sw


class Frozen(Optimizer):
    """Records the gradients it is given and changes nothing."""

    def __init__(self):
        super().__init__(learning_rate=1.0)
        self.seen = []

    def build_slots(self, var):
        return {}

    def apply(self, grads, params, ops=None):
        self.seen.append({k: v.copy() for k, v in grads.items()})
        return super().apply(grads, params, ops=ops)

    def update_step(self, grad, var, lr, slots):
        return var


def ce(logits, y):
    m = logits.max(-1, keepdims=True)
    return (m[..., 0] + np.log(np.exp(logits - m).sum(-1))) - np.take_along_axis(logits, y[..., None], -1)[..., 0]


def keras_report(lm, x, y, sw, batch_size):
    """What Keras reports for one pass (evaluation mode), recomputed from the logits: per batch
    sum(w * CE) / (B * S), averaged over batches weighted by B; accuracy sum(w * hit) / sum(w)."""
    total, count = 0.0, 0
    logits = logits_forward(lm.backbone.params, lm.backbone.config, x["token_ids"], x["padding_mask"])
    for s in range(0, len(y), batch_size):
        b = slice(s, s + batch_size)
        c = ce(logits[b], y[b])
        total += len(c) * float((sw[b] * c).sum() / c.size)
        count += len(c)
    acc = float((sw * (logits.argmax(-1) == y)).sum() / sw.sum())
    return total / count, acc


# ------------------------------------------------------------------------------ KerasHub's examples
def test_fit_on_dicts_as_the_kerashub_example():
    x = {"token_ids": np.array([[1, 2, 3, 4, 5]] * 2), "padding_mask": np.array([[1, 1, 1, 1, 1]] * 2)}
    y = np.array([[2, 3, 4, 5, 0]] * 2)
    sw = np.array([[1, 1, 1, 1, 1]] * 2)
    lm = tiny_lm()
    before = {k: v.copy() for k, v in lm.backbone.params.items()}
    history = lm.fit(x=x, y=y, sample_weight=sw, batch_size=2, verbose=0)
    assert isinstance(history, History)
    assert set(history.history) == {"loss", "sparse_categorical_accuracy"}
    assert history.epoch == [0] and history.params["steps"] == 1
    assert all(len(v) == 1 and math.isfinite(v[0]) for v in history.history.values())
    assert any(not np.array_equal(before[k], lm.backbone.params[k]) for k in before)
    # compile(optimizer="auto"): KerasHub's Adam with learning rate 2e-5
    assert isinstance(lm.optimizer, Adam) and lm.optimizer.learning_rate == 2e-5
    assert lm.optimizer.iterations == 1


def test_fit_on_strings_through_the_preprocessor():
    pytest.importorskip("refopt.models.opt_causal_lm_preprocessor",
                        reason="needs refopt.models.OPTCausalLMPreprocessor")
    lm = OPTCausalLM.from_preset(shared_path("fixtures", "keras", "opt_tiny_keras"))
    assert lm.preprocessor is not None
    features = ["The quick brown fox jumped.", "I forgot my homework."]
    history = lm.fit(x=features, batch_size=2, verbose=0)
    assert math.isfinite(history.history["loss"][0])
    x, y, sw = lm.preprocessor(features)
    loss, acc = lm.evaluate(x=features, batch_size=2, verbose=0)
    assert (loss, acc) == pytest.approx(keras_report(lm, x, np.asarray(y), np.asarray(sw), 2), rel=1e-5)
    logits = lm.predict(features)
    assert logits.shape == (2, np.asarray(y).shape[1], lm.backbone.vocabulary_size)
    with pytest.warns(UserWarning, match="ignored"):
        lm.fit(x=features, y=np.zeros((2, 3)), batch_size=2, verbose=0)


def test_a_tiny_model_memorises_a_sentence():
    lm = tiny_lm()
    ids = np.array([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 2]])
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((1, 10), int)}
    lm.compile(optimizer=Adam(learning_rate=2e-2))
    history = lm.fit(x, ids[:, 1:], epochs=40, verbose=0, seed=0)
    assert history.history["loss"][0] > 3.0 and history.history["loss"][-1] < 0.1
    assert history.history["sparse_categorical_accuracy"][-1] == 1.0
    assert (lm.predict(x).argmax(-1) == ids[:, 1:]).all()


# ------------------------------------------------------------------------------ what is reported
def test_reported_loss_and_accuracy_follow_keras_reductions():
    x, y, sw = data()
    lm = tiny_lm()
    lm.compile(optimizer=Frozen())
    history = lm.fit(x, y, sw, batch_size=2, epochs=2, shuffle=False, verbose=0,
                     validation_data=(x, y, sw))
    loss, acc = keras_report(lm, x, y, sw, batch_size=2)
    assert history.history["loss"] == pytest.approx([loss, loss], rel=1e-6)
    assert history.history["sparse_categorical_accuracy"] == pytest.approx([acc, acc], rel=1e-6)
    assert history.history["val_loss"] == pytest.approx([loss, loss], rel=1e-6)
    assert history.history["val_sparse_categorical_accuracy"] == pytest.approx([acc, acc], rel=1e-6)
    assert lm.evaluate(x, y, sw, batch_size=2, verbose=0) == pytest.approx([loss, acc], rel=1e-6)
    assert lm.evaluate(x, y, sw, batch_size=2, verbose=0, return_dict=True) == pytest.approx(
        {"loss": loss, "sparse_categorical_accuracy": acc}, rel=1e-6)
    # not the fixtures' sum(w * CE) / sum(w): Keras divides by the number of positions
    full = loss_and_gradients(lm.backbone.params, lm.backbone.config, x, y, sw)[0]
    assert abs(full - loss) > 0.1 * loss


def test_fit_descends_on_the_keras_loss():
    x, y, sw = data(n=4)
    lm = tiny_lm()
    opt = Frozen()
    lm.compile(optimizer=opt)
    lm.fit(x, y, sw, batch_size=2, shuffle=False, verbose=0)
    cfg, params = lm.backbone.config, lm.backbone.params
    for i, grads in enumerate(opt.seen):
        b = slice(2 * i, 2 * i + 2)
        xb = {k: v[b] for k, v in x.items()}
        _, ref = loss_and_gradients(params, cfg, xb, y[b], sw[b], reduction="sum_over_batch_size")
        _, mean = loss_and_gradients(params, cfg, xb, y[b], sw[b])
        scale = sw[b].sum() / sw[b].size
        for k in params:
            np.testing.assert_allclose(grads[k], ref[k], rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(grads[k], scale * mean[k], rtol=1e-4, atol=1e-7)


def test_gradient_accumulation_and_optimizer_state_carry_over():
    x, y, sw = data(n=4)
    lm = tiny_lm()
    lm.compile(optimizer=AdamW(learning_rate=1e-3, gradient_accumulation_steps=2))
    lm.fit(x, y, sw, batch_size=1, epochs=1, verbose=0, seed=0)
    assert lm.optimizer.iterations == 2
    lm.fit(x, y, sw, batch_size=1, epochs=2, verbose=0, seed=0)
    assert lm.optimizer.iterations == 6  # the same optimizer object goes on


# ------------------------------------------------------------------------------ dropout and seeds
def test_dropout_acts_only_in_training_and_is_seeded():
    x, y, sw = data()
    lm = tiny_lm(dropout=0.5)
    # weights large enough that the residual branches (where dropout acts) matter
    lm.backbone.params = init_params(lm.backbone.config, seed=0, std=0.3)
    assert lm.evaluate(x, y, sw, verbose=0) == lm.evaluate(x, y, sw, verbose=0)
    np.testing.assert_array_equal(lm.predict(x), lm.predict(x))
    lm.compile(optimizer=Frozen())
    train_loss = lm.fit(x, y, sw, batch_size=5, verbose=0, seed=1).history["loss"][0]
    assert abs(train_loss - lm.evaluate(x, y, sw, batch_size=5, verbose=0)[0]) > 0.01 * train_loss

    def trained(seed):
        m = tiny_lm(dropout=0.5)
        m.compile(optimizer=Adam(learning_rate=1e-2))
        h = m.fit(x, y, sw, batch_size=2, epochs=2, verbose=0, seed=seed)
        return h.history["loss"], m.backbone.params

    (l1, p1), (l2, p2), (l3, _) = trained(3), trained(3), trained(4)
    assert l1 == l2 and all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert l1 != l3


# ------------------------------------------------------------------------------ predict, progress
def test_predict_batches_and_dtype():
    x, _, _ = data()
    lm = tiny_lm()
    whole = lm.predict(x)
    from refopt import training

    np.testing.assert_allclose(training.predict(lm, x, batch_size=2, verbose=0), whole, rtol=1e-5, atol=1e-6)
    assert whole.shape == (5, 6, 50) and whole.dtype == np.float32


def test_progress_output(capsys):
    x, y, sw = data()
    lm = tiny_lm()
    lm.fit(x, y, sw, batch_size=2, epochs=2, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out and "loss=" in out
    lm.fit(x, y, sw, batch_size=2, epochs=1, verbose=2, validation_data=(x, y))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("Epoch 1/1") and "val_loss" in line
    lm.fit(x, y, sw, batch_size=2, verbose=0)
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_refopt_errors():
    x, y, sw = data()
    lm = tiny_lm()
    with pytest.raises(InputError, match="y: shape"):
        lm.fit(x, y[:, :-1], verbose=0)
    with pytest.raises(InputError, match="sample_weight: shape"):
        lm.fit(x, y, sw[:3], verbose=0)
    with pytest.raises(InputError, match="batch_size"):
        lm.fit(x, y, batch_size=0, verbose=0)
    with pytest.raises(InputError, match="batch_size"):
        lm.evaluate(x, y, batch_size=-2, verbose=0)
    with pytest.raises(InputError, match="epochs"):
        lm.fit(x, y, epochs=0, verbose=0)
    with pytest.raises(InputError, match="y: missing"):
        lm.fit(x, verbose=0)
    with pytest.raises(InputTypeError, match="no preprocessor"):
        lm.fit(["some text"], verbose=0)
    with pytest.raises(InputTypeError, match="no preprocessor"):
        lm.evaluate(["some text"], verbose=0)
    with pytest.raises(InputError, match="validation_data"):
        lm.fit(x, y, validation_data=(x, y, sw, sw), verbose=0)


def test_learning_rate_must_be_positive():
    for bad in (0.0, -1e-3, float("inf")):
        with pytest.raises(TrainingError, match="learning_rate"):
            Adam(learning_rate=bad)
    lm = tiny_lm()
    lm.compile(optimizer="sgd")
    x, y, _ = data()
    with pytest.raises(TrainingError, match="sgd"):
        lm.fit(x, y, verbose=0)


class Explodes(Adam):
    """Adam whose second update turns every weight into NaN."""

    def update_step(self, grad, var, lr, slots):
        new = super().update_step(grad, var, lr, slots)
        return new * np.nan if self.iterations == 1 else new


def test_non_finite_loss_stops_training_naming_the_step():
    x, y, sw = data(n=6)
    lm = tiny_lm()
    lm.compile(optimizer=Explodes(learning_rate=1e-3))
    with pytest.raises(TrainingError, match=r"non-finite loss .* epoch 1, step 3 of 3"):
        lm.fit(x, y, sw, batch_size=2, epochs=2, shuffle=False, verbose=0)
    assert lm.optimizer.iterations == 2  # the failing step was not applied
