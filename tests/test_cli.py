"""The `refopt` command: generate, info, convert, train, bench; help everywhere; one-line errors with
exit status 2.  A tiny model is trained once by `refopt train` and used by the other commands."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refopt import cli
from refopt.commands import bench, generate
from refopt import recipe as train
from refopt.models import OPTCausalLM

ROOT = Path(__file__).resolve().parents[1]

TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.
""" * 6 + "Naïve café, 🚀 unicode at the end.\n"

TINY = ["--vocab-size", "300", "--num-layers", "1", "--num-heads", "2", "--hidden-dim", "16",
        "--intermediate-dim", "32", "--sequence-length", "16", "--max-sequence-length", "48",
        "--epochs", "2", "--batch-size", "4", "--warmup-steps", "5", "--keep-best", "0",
        "--average-decay", "0", "--calibration-fraction", "0"]
# the last epoch's parameters, as trained, with no temperature (the tests say when not); the preset
# keeps the 16 positions its windows train (refopt.recipe.shipped_model)
LONG = [*TINY, "--sequence-length", "48"]   # windows of the whole table: 48 positions, for generating


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(preset dir, training report): a model trained on TEXT by `refopt train`."""
    base = tmp_path_factory.mktemp("tiny")
    text = base / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    code = cli.main(["train", str(text), "--out", str(base / "model"), *LONG])
    assert code == 0
    return base / "model", json.loads((base / "model" / "refopt_training.json").read_text())


# ------------------------------------------------------------------------------------ help
def test_help_everywhere(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("generate", "info", "convert", "train", "bench", "conform"):
        assert name in out
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "usage: refopt " + name in text
        assert "%%" not in text, f"refopt {name} --help prints a doubled percent sign"


def test_entry_point_module():
    proc = subprocess.run([sys.executable, "-m", "refopt", "generate", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--temperature" in proc.stdout


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------ train
def test_train_writes_a_loadable_preset(tiny):
    path, report = tiny
    for name in ("config.json", "model.weights.h5", "tokenizer.json", "preprocessor.json",
                 "task.json", "MODEL_CARD.md", "refopt_training.json"):
        assert (path / name).exists(), name
    lm = OPTCausalLM.from_preset(path)
    assert lm.backbone.num_layers == 1 and lm.backbone.hidden_dim == 16
    assert lm.backbone.count_params() == report["parameters"]
    assert lm.preprocessor.tokenizer.vocabulary_size() == report["vocabulary_size"] <= 300
    assert report["steps"] == report["history"][-1]["steps"] > 0
    assert report["recipe"]["epochs"] == 2 and len(report["history"]) == 2
    # the reported validation loss is the model's (recomputed from the saved weights)
    text = TEXT[int(len(TEXT) * 0.9):]
    ids = np.asarray(lm.preprocessor.tokenizer(text))
    assert report["validation_tokens"] == len(ids)
    assert lm.backbone.config.max_sequence_length == report["recipe"]["sequence_length"] == 48
    assert abs(train.validation_loss(lm, ids, 48) - report["validation"]["loss"]) < 1e-4
    card = (path / "MODEL_CARD.md").read_text()
    assert f"{report['validation']['loss']:.4f}" in card and "Witten-Bell" in card


def test_train_learns(tiny):
    _, report = tiny
    first = report["history"][0]["train_loss"]
    assert report["history"][-1]["train_loss"] < first < math.log(report["vocabulary_size"]) + 0.5


def test_train_is_reproducible(tiny, tmp_path):
    path, report = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert cli.main(["train", str(text), "--out", str(tmp_path / "again"), *LONG]) == 0
    again = json.loads((tmp_path / "again" / "refopt_training.json").read_text())
    assert again["history"][-1]["train_loss"] == pytest.approx(report["history"][-1]["train_loss"], rel=1e-5)
    a = OPTCausalLM.from_preset(path).backbone.params
    b = OPTCausalLM.from_preset(tmp_path / "again").backbone.params
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-4


def test_train_errors(tmp_path, capsys):
    code, _, err = run_cli(["train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    code, _, err = run_cli(["train", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not UTF-8" in err
    good = tmp_path / "t.txt"
    good.write_text(TEXT)
    code, _, err = run_cli(["train", str(good), "--out", str(tmp_path / "o"), "--hidden-dim", "10",
                            "--num-heads", "3"], capsys)
    assert code == 2 and "num_heads" in err
    code, _, err = run_cli(["train", str(good), "--out", str(tmp_path / "o"), "--sequence-length", "4096"], capsys)
    assert code == 2 and "sequence_length" in err
    assert not (tmp_path / "o").exists()


def test_windows_cover_every_token_once():
    ids = np.arange(10, 47)
    x, mask, y, w = train.evaluation_windows(ids, 8, start_id=2, pad_id=1)
    assert sorted(y[w].tolist()) == ids.tolist()
    assert (x[:, 0] == 2).all() and (x[:, 1:][mask[:, 1:]] == y[:, :-1][mask[:, 1:]]).all()
    x, y = train.training_windows(ids, 8, offset=3, start_id=2)
    assert x.shape == y.shape == (4, 8) and y[0, 0] == 13 and (x[:, 0] == 2).all()
    assert (x[:, 1:] == y[:, :-1]).all()


def test_ngram_baselines_by_brute_force():
    rng = np.random.default_rng(0)
    V = 7
    tr, va = rng.integers(0, V, 200), rng.integers(0, V, 30)
    got = train.ngram_baselines(tr, va, V, sequence_length=8, start_id=2)
    uni = [(np.sum(tr == w) + 1) / (len(tr) + V) for w in range(V)]
    pairs = list(zip(tr[:-1], tr[1:]))
    lp_uni, lp_add, lp_wb = 0.0, 0.0, 0.0
    for i, w in enumerate(va):
        v = 2 if i % 8 == 0 else va[i - 1]
        c_vw = sum(1 for a, b in pairs if a == v and b == w)
        c_v = sum(1 for a, _ in pairs if a == v)
        t_v = len({b for a, b in pairs if a == v})
        lp_uni += math.log(uni[w])
        lp_add += math.log((c_vw + 1) / (c_v + V))
        lp_wb += math.log((c_vw + t_v * uni[w]) / (c_v + t_v) if c_v else uni[w])
    n = len(va)
    assert got["unigram_add_one"]["loss"] == pytest.approx(-lp_uni / n, rel=1e-12)
    assert got["bigram_add_one"]["loss"] == pytest.approx(-lp_add / n, rel=1e-12)
    assert got["bigram_witten_bell"]["loss"] == pytest.approx(-lp_wb / n, rel=1e-12)
    assert got["bigram_witten_bell"]["perplexity"] == pytest.approx(math.exp(-lp_wb / n))


# ------------------------------------------------------------------------------------ generate
def test_generate_streams_the_greedy_text(tiny, capsys):
    path, _ = tiny
    code, out, err = run_cli(["generate", "First Citizen:", "--preset", str(path), "--sampler", "greedy",
                              "--max-length", "40"], capsys)
    assert code == 0, err
    lm = OPTCausalLM.from_preset(path)
    lm.compile(sampler="greedy")
    expected = lm.generate("First Citizen:", max_length=40, strip_prompt=True)
    assert out == "First Citizen:" + expected + "\n"
    assert len(expected) > 0


def test_generate_writes_piece_by_piece(tiny, monkeypatch):
    path, _ = tiny
    writes = []

    class Recorder:
        def write(self, s):
            writes.append(s)

        def flush(self):
            writes.append(None)

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert cli.main(["generate", "All:", "--preset", str(path), "--sampler", "greedy", "--no-echo",
                     "--max-length", "30"]) == 0
    pieces = [w for w in writes if w]
    assert len(pieces) > 3                        # one write per decoded piece, not one at the end
    assert all(writes[2 * i + 1] is None for i in range(len(writes) // 2))  # each flushed at once


def test_generate_seeded_samplers_repeat(tiny, capsys):
    path, _ = tiny
    outs = {}
    for sampler, extra in (("top_k", ["--top-k", "3"]), ("top_p", ["--top-p", "0.8"]),
                           ("random", ["--temperature", "0.7"]), ("min_p", []), ("typical", [])):
        runs = [run_cli(["generate", "All:", "--preset", str(path), "--sampler", sampler, "--seed", "7",
                         "--max-length", "30", *extra], capsys) for _ in range(2)]
        assert runs[0][0] == 0 and runs[0][1] == runs[1][1], sampler
        outs[sampler] = runs[0][1]
    for sampler in ("beam", "contrastive"):
        code, out, err = run_cli(["generate", "All:", "--preset", str(path), "--sampler", sampler,
                                  "--max-length", "24"], capsys)
        assert code == 0 and out.startswith("All:"), err


def test_make_sampler_arguments():
    s = generate.make_sampler("top_p", temperature=0.5, top_p=0.3, top_k=4, seed=1)
    assert (s.p, s.k, s.seed, s.temperature) == (0.3, 4, 1, 0.5)
    assert generate.make_sampler("top_k").k == 5
    assert generate.make_sampler("beam", num_beams=3).num_beams == 3


@pytest.mark.parametrize("argv, needle", [
    (["--sampler", "greedy", "--top-p", "0.5"], "--top-p does not apply to --sampler greedy"),
    (["--sampler", "beam", "--seed", "1"], "--seed does not apply"),
    (["--temperature", "0"], "temperature"),
    (["--sampler", "top_p", "--top-p", "1.5"], "p="),
    (["--max-length", "100000"], "max_sequence_length"),
    (["--max-length", "0"], "max_length"),
    (["--backend", "cuda"], "cuda"),
])
def test_generate_errors_are_one_line(tiny, capsys, monkeypatch, argv, needle):
    from refopt import backend

    # a pinned backend: no "kernels not compiled yet" notice on stderr (a fresh clone's cache)
    monkeypatch.setenv("REFOPT_BACKEND", "numpy")

    if argv[:2] == ["--backend", "cuda"] and backend.available("cuda"):
        pytest.skip("the cuda backend is available here (a GPU, or NUMBA_ENABLE_CUDASIM=1)")
    path, _ = tiny
    code, out, err = run_cli(["generate", "All:", "--preset", str(path), *argv], capsys)
    assert code == 2 and needle in err, err
    assert out == "", "the prompt was echoed before the error"
    assert err.startswith("refopt generate: error: ") and len(err.strip().splitlines()) == 1


def test_simulator_says_it_is_for_tests(capsys, monkeypatch):
    from refopt import backend
    from refopt.commands import warn_if_simulated

    warn_if_simulated("generate", "numpy")
    assert capsys.readouterr().err == ""
    if not (backend.available("cuda") and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"):
        pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 and numba-cuda (the simulator)")
    warn_if_simulated("generate", "cuda")
    err = capsys.readouterr().err
    assert "simulator" in err and "test the GPU kernels" in err and len(err.strip().splitlines()) == 1


def test_generate_missing_preset(tmp_path, capsys):
    code, _, err = run_cli(["generate", "x", "--preset", str(tmp_path / "nope")], capsys)
    assert code == 2 and "nope" in err and err.startswith("refopt generate: error:")
    code, _, err = run_cli(["generate", "x", "--preset", "opt_125m_en"], capsys)
    if code == 0:
        pytest.skip("opt_125m_en is installed under REFOPT_HOME")
    assert code == 2 and "REFOPT_HOME" in err


def test_generate_without_tokenizer(tiny, tmp_path, capsys):
    path, _ = tiny
    lm = OPTCausalLM.from_preset(path, preprocessor=None)
    lm.save_to_preset(tmp_path / "bare")
    code, _, err = run_cli(["generate", "x", "--preset", str(tmp_path / "bare")], capsys)
    assert code == 2 and "tokenizer" in err


# ------------------------------------------------------------------------------------ info
def test_info(tiny, capsys):
    path, report = tiny
    code, out, _ = run_cli(["info", str(path)], capsys)
    assert code == 0
    assert f"{report['parameters']:,}" in out and "float32" in out and "KerasHub preset" in out
    assert "num_layers" in out and "MB on disk" in out or "KB on disk" in out
    code, out, _ = run_cli(["info", str(path), "--json"], capsys)
    info = json.loads(out)
    assert info["parameters"] == report["parameters"]
    assert info["stored_dtype"] == "float32"
    assert info["config"]["hidden_dim"] == 16
    assert info["size_bytes"] == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert info["tokenizer"]["tokens"] == report["vocabulary_size"]


def test_info_huggingface_float16(tiny, tmp_path, capsys):
    from refopt.io import safetensors_io

    path, report = tiny
    lm = OPTCausalLM.from_preset(path)
    lm.save_to_preset(tmp_path / "hf", format="huggingface")
    f = tmp_path / "hf" / "model.safetensors"
    tensors = safetensors_io.load(f)
    safetensors_io.save({k: v.astype(np.float16) for k, v in tensors.items()}, f, metadata={"format": "pt"})
    code, out, _ = run_cli(["info", str(tmp_path / "hf"), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["format"] == "transformers checkpoint" and info["stored_dtype"] == "float16"
    assert info["parameters"] == report["parameters"]


def test_info_errors(tmp_path, capsys):
    code, _, err = run_cli(["info", str(tmp_path)], capsys)
    assert code == 2 and "config.json" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ convert
def test_convert_round_trip(tiny, tmp_path, capsys):
    path, _ = tiny
    code, out, _ = run_cli(["convert", str(path), str(tmp_path / "hf"), "--format", "huggingface"], capsys)
    assert code == 0 and "transformers checkpoint" in out and "with its tokenizer" in out
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "vocab.json").exists()
    code, out, _ = run_cli(["convert", str(tmp_path / "hf"), str(tmp_path / "k"), "--format", "keras"], capsys)
    assert code == 0
    ids = {"token_ids": np.array([[2, 40, 41, 42, 43]]), "padding_mask": np.ones((1, 5), bool)}
    a, b = OPTCausalLM.from_preset(path), OPTCausalLM.from_preset(tmp_path / "k")
    np.testing.assert_array_equal(a.predict(ids), b.predict(ids))
    assert a.preprocessor.tokenizer("All: speak") == b.preprocessor.tokenizer("All: speak")


def test_convert_refuses_to_overwrite(tiny, tmp_path, capsys):
    path, _ = tiny
    (tmp_path / "there").mkdir()
    code, _, err = run_cli(["convert", str(path), str(tmp_path / "there"), "--format", "keras"], capsys)
    assert code == 2 and "--force" in err
    code, _, _ = run_cli(["convert", str(path), str(tmp_path / "there"), "--format", "keras", "--force"], capsys)
    assert code == 0 and (tmp_path / "there" / "model.weights.h5").exists()
    code, _, err = run_cli(["convert", str(path), str(path), "--format", "keras", "--force"], capsys)
    assert code == 2 and "source preset itself" in err
    code, _, err = run_cli(["convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--format", "keras"], capsys)
    assert code == 2


# ------------------------------------------------------------------------------------ bench
def test_bench_lists_the_benchmarks(capsys):
    if bench.benchmarks_dir() is None:
        pytest.skip("benchmarks/ is not beside the package (installed from a wheel)")
    code, out, _ = run_cli(["bench"], capsys)
    assert code == 0
    for name in ("forward", "generate", "train", "tokenizer"):
        assert f"  {name}" in out


def test_bench_passes_arguments(capfd):
    if bench.benchmarks_dir() is None:
        pytest.skip("benchmarks/ is not beside the package (installed from a wheel)")
    assert cli.main(["bench", "tokenizer", "--help"]) == 0
    assert "--repeat" in capfd.readouterr().out


def test_bench_errors(capsys, monkeypatch):
    if bench.benchmarks_dir() is not None:
        code, _, err = run_cli(["bench", "nonsense"], capsys)
        assert code == 2 and "no benchmark 'nonsense'" in err
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: None)
    code, _, err = run_cli(["bench", "forward"], capsys)
    assert code == 2 and "source tree" in err and len(err.strip().splitlines()) == 1


def test_commands_import_lightly():
    # the parser (and so `refopt --help`) must not import the model stack
    code = ("import sys; from refopt import cli; cli.build_parser(); "
            "print(sorted(m for m in ('refopt.model', 'refopt.training', 'numba', 'h5py') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_generate_into_a_closed_pipe(tiny):
    # `refopt generate ... | head -c 5`: the reader leaves early; no traceback, status 0
    path, _ = tiny
    proc = subprocess.Popen([sys.executable, "-m", "refopt", "generate", "All:", "--preset", str(path),
                             "--max-length", "48", "--seed", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.read(3) == b"All"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_generate_on_a_fresh_install_starts_at_once_and_compiles_in_the_background(tiny, tmp_path):
    # an empty Numba cache (a fresh install): the NumPy ops serve while the kernels compile on a
    # background thread; the text is the library's, stderr says at most that the compilation is
    # being finished, and afterwards the compiled decode step is in the cache
    path, _ = tiny
    env = {k: v for k, v in os.environ.items() if k != "REFOPT_BACKEND"}
    # The checkout's own cache when it holds no compiled decode step yet (a fresh clone: this test
    # runs first on its worker), so that what this install compiles serves the rest of the suite
    # (the same kernels cost the suite ~40 CPU-seconds more when compiled into a throw-away
    # folder); an empty folder of its own otherwise.
    in_tree = ROOT / "refopt" / "kernels" / "cpu" / "__pycache__"
    if "NUMBA_CACHE_DIR" not in env and not any(in_tree.glob("decode.*.nbi")):
        cache = in_tree
    else:
        cache = tmp_path / "nbc"
        env["NUMBA_CACHE_DIR"] = str(cache)
    argv = [sys.executable, "-m", "refopt", "generate", "All:", "--preset", str(path), "--sampler",
            "greedy", "--max-length", "30"]
    cold = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": str(ROOT)})
    assert cold.returncode == 0, cold.stderr
    assert cold.stderr in ("", "refopt generate: finishing the compilation of the Numba kernels (once per "
                               "install; later runs start at full speed; Ctrl-C skips it) ...\n"), cold.stderr
    assert any("decode" in p.name for p in cache.rglob("*.nbi"))
    lm = OPTCausalLM.from_preset(path)
    lm.compile(sampler="greedy")
    assert cold.stdout == "All:" + lm.generate("All:", max_length=30, strip_prompt=True) + "\n"
    pinned = subprocess.run(argv + ["--backend", "numpy"], capture_output=True, text=True, timeout=300,
                            env={**env, "PYTHONPATH": str(ROOT)})
    assert pinned.returncode == 0 and pinned.stderr == "" and pinned.stdout == cold.stdout