"""The recipe's weight averaging (``average_decay``) and the ensemble figure
(:func:`refopt.recipe.token_log_probs`, :func:`refopt.recipe.ensemble_loss`), on a tiny model."""

import json
import math

import numpy as np
import pytest

from refopt import cli
from refopt import recipe
from refopt.errors import ConfigError
from refopt.models import OPTCausalLM

from test_cli import TEXT, TINY


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """(preset dir, report, validation ids): a tiny model trained 3 epochs with average_decay 0.5."""
    base = tmp_path_factory.mktemp("avg")
    text = base / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = [a if a != "2" or TINY[i - 1] != "--epochs" else "3" for i, a in enumerate(TINY)]
    assert cli.main(["train", str(text), "--out", str(base / "model"), *argv,
                     "--average-decay", "0.5"]) == 0
    path = base / "model"
    lm = OPTCausalLM.from_preset(path)
    _, val_text = recipe.split_text(TEXT, 0.1)
    ids = np.asarray(lm.preprocessor.tokenizer(val_text))
    return path, json.loads((path / "refopt_training.json").read_text()), ids


def test_the_averaged_parameters_are_shipped_and_measured(averaged, tmp_path):
    path, report, ids = averaged
    h = report["history"]
    assert len(h) == 3 and all("val_loss_average" in e for e in h)
    assert h[0]["val_loss_average"] == pytest.approx(h[0]["val_loss"], abs=1e-6)  # avg = theta
    assert report["kept_weights"] == "average"
    assert report["validation"]["loss"] == h[-1]["val_loss_average"]
    lm = OPTCausalLM.from_preset(path)
    assert recipe.validation_loss(lm, ids, 16) == pytest.approx(report["validation"]["loss"], abs=1e-4)
    assert "averaged" in (path / "MODEL_CARD.md").read_text()


def test_averaging_leaves_training_alone(averaged, tmp_path):
    # the same recipe without averaging trains the same parameters (same losses epoch by epoch),
    # and ships other weights than the averaged run
    path, report, ids = averaged
    assert report["recipe"]["average_decay"] == 0.5
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = [a if a != "2" or TINY[i - 1] != "--epochs" else "3" for i, a in enumerate(TINY)]
    assert cli.main(["train", str(text), "--out", str(tmp_path / "plain"), *argv]) == 0
    plain = json.loads((tmp_path / "plain" / "refopt_training.json").read_text())
    # averaging leaves training alone: the same trained losses epoch by epoch
    for a, b in zip(plain["history"], report["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    trained = OPTCausalLM.from_preset(tmp_path / "plain").backbone.params
    shipped = OPTCausalLM.from_preset(path).backbone.params
    assert max(np.abs(trained[k] - shipped[k]).max() for k in trained) > 1e-4


def test_keep_best_chooses_among_trained_and_averaged(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = [a if a != "2" or TINY[i - 1] != "--epochs" else "3" for i, a in enumerate(TINY)]
    assert cli.main(["train", str(text), "--out", str(tmp_path / "m"), *argv, "--average-decay",
                     "0.5", "--keep-best", "1"]) == 0
    report = json.loads((tmp_path / "m" / "refopt_training.json").read_text())
    figures = [(e["val_loss"], e["epoch"], "trained") for e in report["history"]] + \
              [(e["val_loss_average"], e["epoch"], "average") for e in report["history"]]
    val, epoch, kind = min(figures)
    assert (report["validation"]["loss"], report["kept_epoch"]) == (val, epoch)
    assert report["kept_weights"] == kind


def test_average_decay_is_checked():
    with pytest.raises(ConfigError, match="average_decay"):
        recipe.Recipe(average_decay=1.0).check()
    with pytest.raises(ConfigError, match="average_decay"):
        recipe.Recipe(average_decay=-0.1).check()


def test_token_log_probs_are_the_validation_loss(averaged):
    path, report, ids = averaged
    lm = OPTCausalLM.from_preset(path)
    lp = recipe.token_log_probs(lm, ids, 16, batch_size=3)
    assert lp.shape == (len(ids),) and (lp < 0).all()
    assert -lp.mean() == pytest.approx(recipe.validation_loss(lm, ids, 16), rel=1e-5)
    # the log-probability of one token, from predict's logits by hand
    x, mask, y, w = recipe.evaluation_windows(ids, 16, 2, 1)
    logits = np.asarray(lm.predict({"token_ids": x[1:2], "padding_mask": mask[1:2]}, verbose=0),
                        np.float64)[0, 5]
    want = logits[y[1, 5]] - math.log(np.exp(logits).sum())
    assert lp[16 + 5] == pytest.approx(want, abs=1e-5)   # (float32 logits, other batch)


def test_ensemble_loss_is_the_mean_probability():
    rng = np.random.default_rng(1)
    a, b = np.log(rng.uniform(0.01, 1, 50)), np.log(rng.uniform(0.01, 1, 50))
    assert recipe.ensemble_loss([a]) == pytest.approx(-a.mean(), rel=1e-12)
    assert recipe.ensemble_loss([a, a]) == pytest.approx(-a.mean(), rel=1e-12)
    want = -np.mean(np.log((np.exp(a) + np.exp(b)) / 2))
    assert recipe.ensemble_loss([a, b]) == pytest.approx(want, rel=1e-12)
    # Jensen: never worse than the members' mean loss
    assert recipe.ensemble_loss([a, b]) <= (-a.mean() - b.mean()) / 2 + 1e-12
    # far below underflow, still exact (log-sum-exp)
    assert recipe.ensemble_loss([a - 1000, b - 1000]) == pytest.approx(want + 1000, rel=1e-12)


def test_ensemble_script(averaged, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path, report, ids = averaged
    script = Path(__file__).resolve().parents[1] / "scripts" / "ensemble_eval.py"
    spec = importlib.util.spec_from_file_location("ensemble_eval", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    corpus = tmp_path / "t.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    assert mod.main([str(corpus), str(path), str(path), "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())
    want = report["validation"]["nats_per_character"]
    assert [r["ensemble_of"] for r in rows] == [1, 2]
    for r in rows:      # an ensemble of one model twice is that model
        assert r["ensemble_nats_per_character"] == pytest.approx(want, rel=1e-4)


def test_the_preset_keeps_the_positions_training_reached(averaged):
    # TINY trains windows of 16 in a table of 48 positions: the preset ships 16 (shipped_model)
    path, report, _ = averaged
    lm = OPTCausalLM.from_preset(path)
    assert report["recipe"]["max_sequence_length"] == 48
    assert report["max_sequence_length"] == lm.backbone.config.max_sequence_length == 16
    assert lm.backbone.params["embed_positions"].shape == (16, 16)
    assert lm.preprocessor.sequence_length == 16
    assert report["parameters"] == lm.backbone.count_params()
    assert "the 32 past the window, never trained, are not shipped" in (path / "MODEL_CARD.md").read_text()


def test_shipped_model_gives_the_same_logits_up_to_the_window():
    from refopt.errors import InputError
    from refopt.models import OPTBackbone, OPTCausalLMPreprocessor, OPTTokenizer
    from refopt.tokenizers import train_bpe

    vocabulary, merges = train_bpe([TEXT], vocab_size=270)
    tokenizer = OPTTokenizer(vocabulary=vocabulary, merges=merges)
    backbone = OPTBackbone(vocabulary_size=len(vocabulary), num_layers=1, num_heads=2, hidden_dim=8,
                           intermediate_dim=16, max_sequence_length=40, seed=3)
    lm = OPTCausalLM(backbone, preprocessor=OPTCausalLMPreprocessor(tokenizer, sequence_length=40))
    short = recipe.shipped_model(lm, backbone.params, 12)
    assert short.backbone.config.max_sequence_length == 12
    ids = np.random.default_rng(0).integers(0, len(vocabulary), (3, 12))
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    logits = short.predict(x, verbose=0)
    assert logits.shape == (3, 12, len(vocabulary))
    np.testing.assert_array_equal(logits, lm.predict(x, verbose=0))
    np.testing.assert_array_equal(short.backbone.params["embed_positions"],
                                  backbone.params["embed_positions"][:12])
    with pytest.raises(InputError, match="max_sequence_length"):
        short.generate("ROMEO:", max_length=13)
    assert recipe.shipped_model(lm, backbone.params, 40) is lm      # nothing past the window
