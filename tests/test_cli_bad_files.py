"""Every subcommand, given bad files: one line on stderr, exit status 2, never a traceback, and
nothing written where it should not be."""

import json
import os

import pytest

from refopt import cli
from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor, OPTTokenizer

VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "Ġ": 7}


def good(path, fmt="keras"):
    pre = OPTCausalLMPreprocessor(OPTTokenizer(vocabulary=VOCAB, merges=["a b"]), sequence_length=5)
    bb = OPTBackbone(vocabulary_size=8, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4,
                     max_sequence_length=8, dropout=0.0)
    OPTCausalLM(bb, preprocessor=pre).save_to_preset(path, format=fmt)
    return path


def _fifo(p):
    os.remove(p)
    os.mkfifo(p)


def _write(name, data):
    def mutate(p):
        (p / name).write_bytes(data)
    return mutate


BAD = {
    "missing directory": lambda p: None,
    "a file, not a directory": lambda p: p.write_text("x"),
    "empty directory": lambda p: p.mkdir(),
    "config.json is a FIFO": lambda p: _fifo(good(p) / "config.json"),
    "config.json is /dev/zero": lambda p: (os.remove(good(p) / "config.json"),
                                           os.symlink("/dev/zero", p / "config.json")),
    "config.json nests 10^5 deep": lambda p: _write("config.json", b"[" * 10**5 + b"]" * 10**5)(good(p)),
    "config.json is not UTF-8": lambda p: _write("config.json", b"{\"\xff\": 1}")(good(p)),
    "config.json holds NaN": lambda p: _write("config.json", b"{\"vocabulary_size\": NaN}")(good(p)),
    "num_layers is 2**63": lambda p: _write("config.json", json.dumps(
        {"class_name": "OPTBackbone", "config": {"vocabulary_size": 8, "num_layers": 2**63,
                                                 "num_heads": 1, "hidden_dim": 4,
                                                 "intermediate_dim": 4}}).encode())(good(p)),
    "truncated safetensors": lambda p: _write("model.safetensors", b"\x10\0\0\0\0\0\0\0{")(
        good(p, "huggingface")),
    "model.weights.h5 is garbage": lambda p: _write("model.weights.h5", b"\x89HDF\r\n" * 50)(good(p)),
    "model.weights.h5 is a directory": lambda p: (os.remove(good(p) / "model.weights.h5"),
                                                  os.mkdir(p / "model.weights.h5")),
    "vocab.json is not UTF-8": lambda p: _write("vocab.json", b"\xff\xfe")(good(p, "huggingface")),
    "merges.txt is a FIFO": lambda p: _fifo(good(p, "huggingface") / "merges.txt"),
    "tokenizer_config says \"false\"": lambda p: _write("tokenizer_config.json", json.dumps(
        {"add_prefix_space": "false"}).encode())(good(p, "huggingface")),
    "preprocessor.json is a list": lambda p: _write("preprocessor.json", b"[]")(good(p)),
}


def one_line_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", list(BAD))
def test_generate_info_convert_conform_on_bad_presets(tmp_path, capsys, case):
    bad = tmp_path / "bad"
    BAD[case](bad)
    before = sorted(os.listdir(tmp_path))
    one_line_error(capsys, ["info", str(bad)])
    one_line_error(capsys, ["generate", "ab", "--preset", str(bad), "--max-length", "6",
                            "--backend", "numpy"])
    one_line_error(capsys, ["convert", str(bad), str(tmp_path / "out"), "--format", "keras"])
    assert sorted(os.listdir(tmp_path)) == before            # convert wrote nothing
    # conform: a preset it cannot read is a one-line error; a tokenizer the adapter cannot load
    # may instead fail the tokenizer checks (status 1, in the report)
    code = cli.main(["conform", "--against", "refopt", str(bad), "--no-samplers"])
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("make", ["missing", "fifo", "directory", "binary", "/dev/zero"])
def test_train_on_bad_text_files(tmp_path, capsys, make):
    text = tmp_path / "text.txt"
    if make == "fifo":
        os.mkfifo(text)
    elif make == "directory":
        text.mkdir()
    elif make == "binary":
        text.write_bytes(b"\xff\xfe\x00 not text")
    elif make == "/dev/zero":
        os.symlink("/dev/zero", text)
    one_line_error(capsys, ["train", str(text), "--out", str(tmp_path / "out"), "--max-steps", "1"])
    assert not (tmp_path / "out").exists()


def test_convert_to_bad_destinations(tmp_path, capsys):
    src = good(tmp_path / "src")
    (tmp_path / "file").write_text("precious")
    err = one_line_error(capsys, ["convert", str(src), str(tmp_path / "file"), "--format", "keras",
                                  "--force"])
    assert "not a directory" in err and (tmp_path / "file").read_text() == "precious"
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    one_line_error(capsys, ["convert", str(src), str(tmp_path / "dangling"), "--format", "keras",
                            "--force"])
    one_line_error(capsys, ["convert", str(src), str(src), "--format", "keras", "--force"])


def test_an_os_error_is_one_line_too(tmp_path, capsys, monkeypatch):
    from refopt.commands import info

    def boom(preset):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))
    monkeypatch.setattr(info, "describe", boom)
    err = one_line_error(capsys, ["info", str(tmp_path)])
    assert "Permission denied" in err and str(tmp_path / "x") in err
