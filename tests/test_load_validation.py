"""Loading trusts nothing: special files, KerasHub .h5 trees, non-finite weights, strict configs
and tokenizer settings, configs checked before anything is allocated, one loader for all."""

import importlib.util
import json
import os
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from refopt.errors import (CheckpointError, ConfigError, FileReadError, RefoptError,
                           TokenizerError)
from refopt.io import checkpoint, files, safetensors_io
from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor, OPTTokenizer


@pytest.fixture
def deadline():
    """Fail (instead of hanging) when a read blocks for more than 20 s."""
    def boom(*_):
        raise TimeoutError("the read blocked")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def tiny(**kw):
    args = dict(vocabulary_size=8, num_layers=2, num_heads=1, hidden_dim=4, intermediate_dim=4,
                max_sequence_length=6, dropout=0.0)
    args.update(kw)
    return OPTBackbone(**args, seed=1)


def with_tokenizer(backbone):
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "Ġ": 7}
    pre = OPTCausalLMPreprocessor(OPTTokenizer(vocabulary=vocab, merges=["a b"]), sequence_length=5)
    return OPTCausalLM(backbone, preprocessor=pre)


def load_everything(path):
    """Every loader that reads ``path``."""
    OPTCausalLM.from_preset(path)
    with checkpoint.open_checkpoint(path) as ckpt:
        ckpt.params()


SPECIALS = ["fifo", "dev-zero", "directory", "empty", "loop"]
_spec = importlib.util.spec_from_file_location(
    "refopt_fuzz", Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)
make_special = fuzz.make_special


@pytest.mark.parametrize("kind", SPECIALS)
@pytest.mark.parametrize("layout,name", [
    ("keras", "config.json"), ("keras", "model.weights.h5"), ("keras", "tokenizer.json"),
    ("keras", "assets/tokenizer/vocabulary.json"), ("keras", "assets/tokenizer/merges.txt"),
    ("keras", "preprocessor.json"), ("huggingface", "model.safetensors"),
    ("huggingface", "vocab.json"), ("huggingface", "merges.txt"),
    ("huggingface", "tokenizer_config.json")])
def test_special_files_are_refused_without_blocking(tmp_path, deadline, layout, name, kind):
    with_tokenizer(tiny()).save_to_preset(tmp_path / "p", format=layout)
    make_special(tmp_path / "p" / name, kind)
    if kind == "empty" and name.endswith("merges.txt"):
        load_everything(tmp_path / "p")              # no merges at all: a valid merges file
        return
    with pytest.raises(RefoptError) as e:
        load_everything(tmp_path / "p")
    assert name.split("/")[-1] in str(e.value)
    if kind not in ("empty", "loop"):
        assert "regular file" in str(e.value) or "directory" in str(e.value)


def test_open_regular_kinds(tmp_path, deadline):
    os.mkfifo(tmp_path / "fifo")
    for path, needle in ((tmp_path / "fifo", "FIFO"), ("/dev/zero", "character device"),
                         (tmp_path, "directory"), (tmp_path / "missing", "no such file")):
        with pytest.raises(FileReadError, match=needle) as e:
            files.read_bytes(path, 100, ConfigError)
        assert isinstance(e.value, OSError)


def test_size_caps_before_reading(tmp_path):
    big = tmp_path / "config.json"
    with open(big, "wb") as f:
        f.truncate(files.MAX_CONFIG_BYTES + 1)        # sparse: nothing is written or read
    tracemalloc.start()
    with pytest.raises(ConfigError, match="refopt reads at most"):
        files.read_json(big, ConfigError)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


@pytest.mark.parametrize("text,needle", [
    ('{"a": NaN}', "NaN"), ('{"a": Infinity}', "Infinity"), ('{"a": 1, "a": 2}', "twice"),
    ("[" * 100 + "]" * 100, "deeper"), ("[" * 100000 + "]" * 100000, "deeper"),
    ('{"a": 1', "not valid JSON"), (b'{"\xff": 1}', "not UTF-8"), ('{"a": ' + "9" * 5000 + "}", "JSON")])
def test_strict_json(tmp_path, text, needle):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=needle):
        files.read_json(path, ConfigError)


# ------------------------------------------------------------------------------ KerasHub .h5
def _h5_case(tmp_path, mutate):
    import h5py

    tiny().save_to_preset(tmp_path / "k")
    with h5py.File(tmp_path / "k" / "model.weights.h5", "a") as f:
        mutate(f, h5py)
    return tmp_path / "k"


FC2 = "layers/transformer_decoder_1/_feedforward_output_dense/vars/0"
LN_BETA = "layers/transformer_decoder/_self_attention_layer_norm/vars/1"


@pytest.mark.parametrize("mutate,needle", [
    (lambda f, h: f.__delitem__(FC2), "missing tensor " + FC2),
    (lambda f, h: (f.__delitem__(LN_BETA), f.__setitem__(LN_BETA, h.SoftLink("/" + FC2))),
     "soft link"),
    (lambda f, h: (f.__delitem__(LN_BETA), f.__setitem__(LN_BETA, h.ExternalLink("other.h5", "/x"))),
     "external link"),
    (lambda f, h: f.create_dataset("layers/extra/vars/0", data=np.zeros(3)), "unexpected tensors"),
    (lambda f, h: (f.__delitem__(LN_BETA), f.create_dataset(LN_BETA, data=np.zeros(4, np.int32))),
     "dtype int32"),
    (lambda f, h: (f.__delitem__(LN_BETA), f.create_dataset(LN_BETA, data=np.zeros(5))),
     r"shape \[5\], expected \[4\]"),
    (lambda f, h: (f.__delitem__(LN_BETA), f.create_dataset(LN_BETA, shape=(4,), dtype="f4",
                                                             external=[("raw.bin", 0, 16)])),
     "outside the file"),
])
def test_kerashub_h5_tree_is_checked(tmp_path, mutate, needle):
    path = _h5_case(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=needle):
        OPTBackbone.from_preset(path)


def test_streaming_reference_never_takes_a_missing_tensor_for_an_absent_one(tmp_path):
    from refopt.testing.streaming import streaming_logits

    path = _h5_case(tmp_path, lambda f, h: f.move(LN_BETA, LN_BETA.replace("vars/1", "vars/9")))
    with pytest.raises(CheckpointError, match="missing tensor"):
        streaming_logits(path, np.array([[1, 2, 3]]))
    tiny().save_to_preset(tmp_path / "hf", format="huggingface")
    st = safetensors_io.load(tmp_path / "hf" / "model.safetensors")
    st = {k.replace("layers.1.fc1.bias", "layers.1.fc1.biass"): np.array(v) for k, v in st.items()}
    safetensors_io.save(st, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="fc1.bias"):
        streaming_logits(tmp_path / "hf", np.array([[1, 2, 3]]))


def test_corrupted_h5_bytes(tmp_path):
    tiny().save_to_preset(tmp_path / "k")
    h5 = tmp_path / "k" / "model.weights.h5"
    data = bytearray(h5.read_bytes())
    rng = np.random.default_rng(0)
    for _ in range(20):
        mutated = bytearray(data)
        for at in rng.integers(0, len(data), 8):
            mutated[at] ^= int(rng.integers(1, 256))
        h5.write_bytes(bytes(mutated))
        try:
            OPTBackbone.from_preset(tmp_path / "k")
        except CheckpointError:
            pass


# ------------------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("fmt", ["keras", "huggingface"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_refused_by_name(tmp_path, fmt, value):
    bb = tiny()
    bb.params["layers.1.fc1.weight"][2, 3] = value
    bb.save_to_preset(tmp_path / "p", format=fmt)
    with pytest.raises(CheckpointError, match=r"fc1.*allow_nonfinite=True"):
        OPTBackbone.from_preset(tmp_path / "p")
    again = OPTBackbone.from_preset(tmp_path / "p", allow_nonfinite=True)
    got = again.params["layers.1.fc1.weight"][2, 3]
    assert (np.isnan(got) and np.isnan(value)) or got == value
    with pytest.raises(ConfigError, match="allow_nonfinite"):
        OPTBackbone.from_preset(tmp_path / "p", allow_nonfinite="yes")


def test_nonfinite_bfloat16_and_overflowing_sums(tmp_path):
    bb = tiny()
    bb.params["embed_tokens"][:] = 3e38                # finite, but its sum overflows
    bb.save_to_preset(tmp_path / "p", format="huggingface")
    assert np.isfinite(OPTBackbone.from_preset(tmp_path / "p").params["embed_tokens"]).all()
    assert checkpoint.first_nonfinite(np.array([1.0, np.inf, 2.0])) == (1,)
    assert checkpoint.first_nonfinite(np.full((3, 4), 6e4, np.float16)) is None


# ------------------------------------------------------------------------------ configs
def _hf_with_config(tmp_path, **changes):
    tiny().save_to_preset(tmp_path / "p", format="huggingface")
    path = tmp_path / "p" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return tmp_path / "p"


@pytest.mark.parametrize("key,value,needle", [
    ("do_layer_norm_before", "false", "do_layer_norm_before='false'"),
    ("enable_bias", 0, "enable_bias=0"),
    ("num_hidden_layers", 2.0, "num_layers=2.0"),
    ("num_hidden_layers", True, "num_layers=True"),
    ("num_hidden_layers", 2**63, "num_layers"),
    ("hidden_size", -4, "hidden_dim=-4"),
    ("vocab_size", 2**40, "vocabulary_size"),
    ("dropout", True, "dropout=True"),
    ("layer_norm_epsilon", 0, "layer_norm_epsilon"),
    ("_remove_final_layer_norm", "no", "remove_final_layer_norm"),
    ("pad_token_id", -1, "pad_token_id=-1"),
    ("dtype", ["float32"], "dtype"),
    ("word_embed_proj_dim", 3.5, "word_embed_proj_dim"),
])
def test_strict_config_values(tmp_path, key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        OPTBackbone.from_preset(_hf_with_config(tmp_path, **{key: value}))


def test_keras_config_types(tmp_path):
    tiny().save_to_preset(tmp_path / "k")
    path = tmp_path / "k" / "config.json"
    good = json.loads(path.read_text())
    for mutate, needle in [(lambda c: c.__setitem__("config", [1]), "'config' is list"),
                           (lambda c: c["config"].__setitem__("dtype", {"config": 5}), "DTypePolicy"),
                           (lambda c: c["config"].__setitem__("dtype", ["float32"]), "dtype name"),
                           (lambda c: c.__setitem__("registered_name", "evil>X"), "registered_name"),
                           (lambda c: c["config"].__setitem__("num_layers", "2"), "num_layers='2'")]:
        cfg = json.loads(json.dumps(good))
        mutate(cfg)
        path.write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=needle):
            OPTBackbone.from_preset(tmp_path / "k")


def test_config_is_checked_against_the_files_before_allocating(tmp_path):
    """A config claiming a 2**38-parameter model beside a tiny weights file: refused from the
    headers, without allocating the model."""
    path = _hf_with_config(tmp_path, hidden_size=2**13, ffn_dim=2**15, num_hidden_layers=256,
                           num_attention_heads=32, vocab_size=2**16)
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="missing tensors|has shape"):
        OPTCausalLM.from_preset(path)
    assert tracemalloc.get_traced_memory()[1] < 64 << 20
    tracemalloc.stop()
    path = _hf_with_config(tmp_path, hidden_size=2**17, ffn_dim=2**19, num_hidden_layers=1024,
                           num_attention_heads=1024, vocab_size=2**24)
    with pytest.raises(ConfigError, match="parameters"):
        OPTCausalLM.from_preset(path)


def test_random_weights_are_bounded_too():
    with pytest.raises(ConfigError, match="GiB"):
        OPTBackbone(vocabulary_size=2**24, num_layers=64, num_heads=64, hidden_dim=2**14,
                    intermediate_dim=2**16, max_sequence_length=2**14)


# ------------------------------------------------------------------------------ tokenizer settings
def test_tokenizer_settings_are_strict(tmp_path):
    with_tokenizer(tiny()).save_to_preset(tmp_path / "hf", format="huggingface")
    cfg_path = tmp_path / "hf" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_prefix_space"] = "false"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="add_prefix_space.*'false'.*true or false"):
        OPTTokenizer.from_preset(tmp_path / "hf")
    with_tokenizer(tiny()).save_to_preset(tmp_path / "k")
    tok_path = tmp_path / "k" / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["config"]["add_prefix_space"] = "false"
    tok_path.write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="add_prefix_space"):
        OPTTokenizer.from_preset(tmp_path / "k")
    with pytest.raises(ConfigError, match="add_prefix_space"):
        OPTTokenizer(vocabulary={"a": 0}, merges=[], add_prefix_space="false")
    with pytest.raises(TokenizerError, match="largest id"):
        OPTTokenizer(vocabulary={"<pad>": 1, "</s>": 2**31 - 2}, merges=[])


def test_fast_tokenizer_file_types(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    for data, needle in [({"model": {"type": "BPE", "vocab": [], "merges": []},
                           "pre_tokenizer": {"type": "ByteLevel"}}, "model.vocab"),
                          ({"model": {"type": "BPE", "vocab": {}, "merges": {}},
                            "pre_tokenizer": {"type": "ByteLevel"}}, "merges"),
                          ({"model": {"type": "BPE", "vocab": {}, "merges": []},
                            "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [{"id": "1"}]},
                           "added_tokens"),
                          ({"model": {"type": "BPE"}, "pre_tokenizer": "x"}, "pre-tokenizer"),
                          ([], "expected a JSON object")]:
        (d / "tokenizer.json").write_text(json.dumps(data))
        with pytest.raises(TokenizerError, match=needle):
            OPTTokenizer.from_preset(d)


def test_shard_index_cannot_escape_the_directory(tmp_path):
    tiny().save_to_preset(tmp_path / "p", format="huggingface")
    os.rename(tmp_path / "p" / "model.safetensors", tmp_path / "elsewhere.safetensors")
    names = list(safetensors_io.load(tmp_path / "elsewhere.safetensors"))
    (tmp_path / "p" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../elsewhere.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="shards must be file names"):
        OPTBackbone.from_preset(tmp_path / "p")


def test_info_uses_the_validated_loader(tmp_path, capsys):
    from refopt import cli

    tiny().save_to_preset(tmp_path / "p", format="huggingface")
    (tmp_path / "p" / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{]      ")
    assert cli.main(["info", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.safetensors" in err


def test_a_compressed_h5_cannot_make_refopt_allocate_without_bound(tmp_path):
    """Datasets of the right shapes that HDF5 stores as unwritten chunks (a tiny file describing a
    32 GiB model): refused before any weight is read."""
    import h5py

    from refopt.config import OPTConfig
    from refopt.io import keras_h5

    cfg = OPTConfig(vocabulary_size=2**20, num_layers=1, num_heads=1, hidden_dim=2**13,
                    intermediate_dim=8, max_sequence_length=8)
    d = tmp_path / "bomb"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_keras()))
    with h5py.File(d / "model.weights.h5", "w") as f:
        for where, shape in keras_h5.layout(cfg).values():
            f.create_dataset(where, shape=shape, dtype="f4", chunks=tuple(min(s, 64) for s in shape),
                             compression="gzip")
    assert os.path.getsize(d / "model.weights.h5") < 1 << 20
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="GiB"):
        OPTBackbone.from_preset(d)
    assert tracemalloc.get_traced_memory()[1] < 64 << 20
    tracemalloc.stop()
