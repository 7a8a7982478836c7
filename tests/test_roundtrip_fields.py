"""Round trips keep everything: every config, tokenizer and preprocessor field survives a save and a
load in both layouts, and JSON values are parsed strictly."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refopt.config import OPTConfig
from refopt.errors import ConfigError, TokenizerError
from refopt.io.presets import read_config
from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor, OPTTokenizer

EXAMPLES = int(os.environ.get("REFOPT_FUZZ_EXAMPLES", "25"))


@st.composite
def configs(draw):
    heads = draw(st.integers(1, 3))
    hidden = heads * draw(st.integers(1, 3))
    proj = draw(st.booleans())
    return OPTConfig(
        vocabulary_size=draw(st.integers(3, 12)), num_layers=draw(st.integers(1, 2)),
        num_heads=heads, hidden_dim=hidden, intermediate_dim=draw(st.integers(1, 5)),
        max_sequence_length=draw(st.integers(1, 6)),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.25, 0.999])),
        dtype=draw(st.sampled_from([None, "float64", "float16", "bfloat16"])),
        do_layer_norm_before=draw(st.booleans()),
        word_embed_proj_dim=draw(st.integers(1, 4)) if proj else None,
        enable_bias=draw(st.booleans()), layer_norm_elementwise_affine=draw(st.booleans()),
        remove_final_layer_norm=draw(st.booleans()),
        layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-3, 1e-12, 0.5, 3.14159e-7])),
        pad_token_id=draw(st.integers(0, 5)), bos_token_id=draw(st.integers(0, 5)),
        eos_token_id=draw(st.integers(0, 5)))


@settings(max_examples=EXAMPLES)
@given(cfg=configs(), fmt=st.sampled_from(["keras", "huggingface"]))
def test_every_config_field_survives_both_layouts(tmp_path_factory, cfg, fmt):
    bb = OPTBackbone.from_opt_config(cfg)
    if fmt == "huggingface":
        bb.position_prefix = np.full((2, cfg.hidden_dim), 0.5, bb.params["embed_positions"].dtype)
    path = tmp_path_factory.mktemp("rt") / "p"
    bb.save_to_preset(path, format=fmt)
    assert read_config(path) == cfg                     # the files keep every field, dtype included
    # KerasHub's rule: from_preset applies a saved half-precision policy only when asked to
    kept = cfg.dtype if cfg.dtype in (None, "float64") else None
    assert OPTBackbone.from_preset(path, load_weights=False).config.dtype == kept
    again = OPTBackbone.from_preset(path, dtype=cfg.dtype)
    assert again.config == cfg
    for name, value in bb.params.items():
        assert np.array_equal(again.params[name], value), name
    if fmt == "huggingface":
        assert np.array_equal(again.position_prefix, bb.position_prefix)
    ids = np.arange(min(cfg.max_sequence_length, 4))[None] % cfg.vocabulary_size
    np.testing.assert_array_equal(OPTCausalLM(again).predict({"token_ids": ids}),
                                  OPTCausalLM(bb).predict({"token_ids": ids}))


VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "Ġ": 7, "Ġa": 8}


@settings(max_examples=EXAMPLES)
@given(fmt=st.sampled_from(["keras", "huggingface"]),
       add_prefix_space=st.booleans(), tokenizer_length=st.sampled_from([None, 0, 3, 7]),
       unsplittable=st.sampled_from([None, [], ["</s>"], ["ab", "<pad>"]]),
       sequence_length=st.integers(1, 9), add_start=st.booleans(), add_end=st.booleans(),
       name=st.sampled_from([None, "pre", "ü ñ"]))
def test_tokenizer_and_preprocessor_fields_survive_both_layouts(
        tmp_path_factory, fmt, add_prefix_space, tokenizer_length, unsplittable, sequence_length,
        add_start, add_end, name):
    tok = OPTTokenizer(vocabulary=VOCAB, merges=["a b", "Ġ a"], add_prefix_space=add_prefix_space,
                       sequence_length=tokenizer_length, unsplittable_tokens=unsplittable)
    pre = OPTCausalLMPreprocessor(tok, sequence_length=sequence_length, add_start_token=add_start,
                                  add_end_token=add_end, name=name)
    lm = OPTCausalLM(OPTBackbone(vocabulary_size=9, num_layers=1, num_heads=1, hidden_dim=2,
                                 intermediate_dim=2, max_sequence_length=4), preprocessor=pre)
    path = tmp_path_factory.mktemp("tok") / "p"
    lm.save_to_preset(path, format=fmt)
    again = OPTCausalLM.from_preset(path).preprocessor
    for field in ("sequence_length", "add_start_token", "add_end_token", "name"):
        assert getattr(again, field) == getattr(pre, field), field
    t = again.tokenizer
    for field in ("add_prefix_space", "sequence_length", "unsplittable_tokens", "vocabulary",
                  "merges", "dtype", "name"):
        assert getattr(t, field) == getattr(tok, field), field
    for text in ("ab a</s>b", "aab<pad>", " a"):
        assert _outcome(t, text) == _outcome(tok, text), text
        assert _outcome(lambda x: again(x)[0]["token_ids"], [text]) == \
            _outcome(lambda x: pre(x)[0]["token_ids"], [text])


def _outcome(f, x):
    try:
        return np.asarray(f(x)).tolist()
    except TokenizerError as e:
        return str(e)


def test_transformers_reads_refopt_tokenizer_config(tmp_path):
    """The "refopt" entry refopt adds to tokenizer_config.json does not disturb transformers."""
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    tok = OPTTokenizer(vocabulary=VOCAB, merges=["a b", "Ġ a"], sequence_length=5)
    pre = OPTCausalLMPreprocessor(tok, sequence_length=3)
    pre.export_to_transformers(tmp_path / "t")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    plain = OPTTokenizer(vocabulary=VOCAB, merges=["a b", "Ġ a"])
    assert hf("ab a")["input_ids"] == [2] + plain("ab a")


@pytest.mark.parametrize("key,value", [
    ("enable_bias", "false"), ("enable_bias", 1), ("num_layers", 1.0), ("num_layers", True),
    ("dropout", False), ("layer_norm_epsilon", True), ("layer_norm_epsilon", float("inf")),
    ("max_sequence_length", "16"), ("pad_token_id", 1.0)])
def test_json_values_are_parsed_strictly(key, value):
    args = dict(vocabulary_size=8, num_layers=1, num_heads=1, hidden_dim=2, intermediate_dim=2)
    args[key] = value
    with pytest.raises(ConfigError, match=key):
        OPTConfig(**args)
    with pytest.raises(ConfigError, match=key):
        OPTConfig.from_keras({"class_name": "OPTBackbone", "config": json.loads(json.dumps(
            args, allow_nan=True))})
