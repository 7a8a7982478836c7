"""The recipe's temperature (``calibration_fraction``: :func:`refopt.recipe.fit_temperature`,
:func:`refopt.recipe.fold_temperature`) and its overlapping-window figure
(``evaluation_stride``: :func:`refopt.recipe.sliding_windows`, :func:`refopt.recipe.sliding_nats`),
on small arrays and a tiny model."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refopt import cli, recipe
from refopt.errors import ConfigError
from refopt.models import OPTBackbone, OPTCausalLM

from test_cli import TEXT, TINY


# ------------------------------------------------------------------ windows
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), S=st.integers(2, 40), data=st.data())
def test_sliding_windows_score_every_token_once_with_its_context(n, S, data):
    stride = data.draw(st.integers(1, S))
    ids = np.arange(10, 10 + n)                 # token i is 10 + i: positions are readable
    x, mask, y, w = recipe.sliding_windows(ids, S, stride, 2, 1)
    assert x.shape == y.shape == w.shape == mask.shape
    assert (x[:, 0] == 2).all() and (x[:, 1:] == y[:, :-1]).all()
    targets = y[w]
    assert sorted(targets.tolist()) == ids.tolist()            # every token once
    if n > S:
        assert mask.all()
        for row in range(1, len(x)):                           # after the first window: context
            cols = np.flatnonzero(w[row])
            assert cols.size and cols[0] >= S - stride and (np.diff(y[row]) == 1).all()
            assert cols[-1] == S - 1                           # the block ends the window


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 6), S=st.integers(2, 24))
def test_stride_of_a_window_gives_the_non_overlapping_windows(k, S):
    ids = np.random.default_rng(k * S).integers(4, 50, k * S)
    a = recipe.sliding_windows(ids, S, S, 2, 1)
    b = recipe.evaluation_windows(ids, S, 2, 1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# ------------------------------------------------------------------ temperature
def _nll(z, y, t):
    z = np.asarray(z, np.float64) / t
    top = z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z - top).sum(axis=1)) + top[:, 0] - z[np.arange(len(y)), y]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31), scale=st.floats(0.05, 20), n=st.integers(1, 300),
       V=st.integers(2, 40))
def test_fit_temperature_finds_the_minimum(seed, scale, n, V):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, V)) * scale
    y = rng.integers(0, V, n)
    t = recipe.fit_temperature(z.astype(np.float32), y)
    assert 1 / 64 <= t < math.inf
    best = _nll(z.astype(np.float32), y, t)
    slack = 1e-9 * max(1.0, best)                              # the fit sums float32 terms
    for f in (0.97, 0.995, 1.005, 1.03):                       # no nearby temperature does better
        if 1 / 64 <= t * f <= 64:                               # (the interval it searches)
            assert best <= _nll(z.astype(np.float32), y, t * f) + slack
    # and none on a wide grid (the loss is convex in 1 / T)
    grid = np.exp(np.linspace(np.log(1 / 60), np.log(60), 200))
    assert best <= min(_nll(z.astype(np.float32), y, g) for g in grid) + slack


def test_fit_temperature_recovers_a_known_temperature():
    # targets drawn from softmax(z / 1.7): the fitted temperature is close to 1.7
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20000, 16)) * 3
    p = np.exp(z / 1.7)
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(16, p=row) for row in p])
    assert recipe.fit_temperature(z, y) == pytest.approx(1.7, rel=0.05)


def test_fit_temperature_of_uninformative_logits_is_the_start():
    z = np.zeros((5, 7))
    assert recipe.fit_temperature(z, np.arange(5)) == 1.0
    assert recipe.fit_temperature(z, np.arange(5), start=2.5) == 2.5


def test_fold_temperature_divides_every_logit():
    backbone = OPTBackbone(vocabulary_size=40, num_layers=2, num_heads=2, hidden_dim=8,
                           intermediate_dim=16, max_sequence_length=12, dropout=0.0, seed=3)
    backbone.backend = "numpy"
    lm = OPTCausalLM(backbone)
    params = {k: np.array(v, copy=True) for k, v in backbone.params.items()}
    rng = np.random.default_rng(1)
    for k in ("final_layer_norm.gamma", "final_layer_norm.beta"):   # not the initial 1 and 0
        params[k] = (params[k] + rng.standard_normal(params[k].shape)).astype(params[k].dtype)
    backbone.set_params(params)
    x = {"token_ids": rng.integers(4, 40, (3, 12)), "padding_mask": np.ones((3, 12), bool)}
    before = np.asarray(lm.predict(x, verbose=0), np.float64)
    folded = recipe.fold_temperature(params, 1.37)
    assert all(folded[k] is params[k] for k in params if not k.startswith("final_layer_norm"))
    backbone.set_params(folded)
    after = np.asarray(lm.predict(x, verbose=0), np.float64)
    np.testing.assert_allclose(after, before / 1.37, rtol=2e-5, atol=2e-5 * np.abs(before).max())
    assert np.abs(after - before).max() > 0.2 * np.abs(before).max()   # it sees a temperature


def test_an_empty_calibration_part_is_a_clear_error(tmp_path):
    from refopt.errors import TrainingError

    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    with pytest.raises(TrainingError, match="calibration part is empty"):
        recipe.train(text, tmp_path / "m", recipe.Recipe(calibration_fraction=1e-9, vocab_size=300,
                                                        num_layers=1, hidden_dim=16, num_heads=2,
                                                        intermediate_dim=32, sequence_length=16,
                                                        max_sequence_length=48, epochs=1),
                     backend="numpy")


def test_calibration_settings_are_checked():
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="calibration_fraction"):
            recipe.Recipe(calibration_fraction=bad).check()
    for bad in (-1, True, 2.5):
        with pytest.raises(ConfigError, match="evaluation_stride"):
            recipe.Recipe(evaluation_stride=bad).check()


# ------------------------------------------------------------------ the recipe
@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(preset dir, report, validation ids, calibration ids): a tiny model trained with a fifth of
    its training text kept for the temperature, averaged, the best epoch kept."""
    base = tmp_path_factory.mktemp("cal")
    text = base / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = [a if a != "2" or TINY[i - 1] != "--epochs" else "3" for i, a in enumerate(TINY)]
    assert cli.main(["train", str(text), "--out", str(base / "model"), *argv, "--calibration-fraction",
                     "0.2", "--average-decay", "0.5", "--keep-best", "1", "--evaluation-stride",
                     "4"]) == 0
    path = base / "model"
    lm = OPTCausalLM.from_preset(path)
    train_text, val_text = recipe.split_text(TEXT, 0.1)
    cal_text, fit_text = recipe.calibration_split(train_text, 0.2)
    assert cal_text + fit_text == train_text and len(cal_text) == int(0.2 * len(train_text))
    tok = lm.preprocessor.tokenizer
    report = json.loads((path / "refopt_training.json").read_text())
    assert report["fit_characters"] == len(fit_text) and report["calibration_characters"] == len(cal_text)
    assert report["train_characters"] == len(train_text)
    return path, report, np.asarray(tok(val_text)), np.asarray(tok(cal_text))


def test_the_shipped_model_carries_its_fitted_temperature(calibrated):
    path, report, val_ids, cal_ids = calibrated
    v = report["validation"]
    lm = OPTCausalLM.from_preset(path)
    # the shipped figure is the preset's own, and the kept candidate's in the history
    assert recipe.validation_loss(lm, val_ids, 16) == pytest.approx(v["loss"], abs=1e-5)
    h = report["history"][report["kept_epoch"] - 1]
    kind = "" if report["kept_weights"] == "trained" else "_average"
    assert h["val_loss" + kind] == v["loss"] and h["temperature" + kind] == v["temperature"]
    # the temperature was fitted on the calibration part: refitting the shipped model there gives 1
    logits, targets = recipe.calibration_logits(lm, cal_ids, 16)
    assert recipe.fit_temperature(logits, targets) == pytest.approx(1.0, abs=2e-3)
    # unfolding it gives the parameters as trained, whose figure is the uncalibrated one
    params = dict(lm.backbone.params)
    lm.backbone.set_params(recipe.fold_temperature(params, 1 / v["temperature"]))
    assert recipe.validation_loss(lm, val_ids, 16) == pytest.approx(v["uncalibrated_loss"], abs=1e-5)
    assert v["temperature"] != 1.0


def test_the_sliding_figure_adds_up_and_is_recomputed(calibrated):
    path, report, val_ids, _ = calibrated
    s = report["validation"]["sliding"]
    assert s["stride"] == 4
    nats = np.asarray(s["window_nats"])
    assert len(nats) == len(recipe.sliding_windows(val_ids, 16, 4, 2, 1)[0])
    assert nats.sum() / len(val_ids) == pytest.approx(s["loss"], abs=1e-6)
    lm = OPTCausalLM.from_preset(path)
    some = [0, len(nats) // 2, len(nats) - 1]
    np.testing.assert_allclose(recipe.sliding_nats(lm, val_ids, 16, 4, windows=some), nats[some],
                               rtol=1e-5, atol=1e-5)
    # with a stride of a whole window the figure is validation_loss's (a multiple of 16 tokens)
    n = len(val_ids) // 16 * 16
    whole = recipe.sliding_nats(lm, val_ids[:n], 16, 16).sum() / n
    assert whole == pytest.approx(recipe.validation_loss(lm, val_ids[:n], 16), abs=1e-5)
    assert "Temperature" in (path / "MODEL_CARD.md").read_text()
