"""OPTCausalLMPreprocessor: KerasHub's outputs reproduced, packing rules, presets, errors."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_path
from refopt.errors import ConfigError, InputError, InputTypeError
from refopt.models import OPTCausalLMPreprocessor, OPTTokenizer
from refopt.models.opt_causal_lm_preprocessor import pack_start_end
from test_tokenizer import opt, texts


def keras_preset():
    return shared_path("fixtures", "keras", "opt_tiny_keras")


def keras_expected():
    return json.loads(shared_path("fixtures", "keras", "expected.json").read_text())


def test_keras_fixture_preprocess():
    expected = keras_expected()
    preprocessor = OPTCausalLMPreprocessor.from_preset(keras_preset())
    assert preprocessor.sequence_length == 16
    x, y, sample_weight = preprocessor(expected["texts"])
    want = expected["preprocess"]
    np.testing.assert_array_equal(x["token_ids"], want["token_ids"])
    np.testing.assert_array_equal(x["padding_mask"], np.array(want["padding_mask"], bool))
    np.testing.assert_array_equal(y, want["y"])
    np.testing.assert_array_equal(sample_weight, np.array(want["sample_weight"], bool))
    assert x["token_ids"].dtype == np.int32 and y.dtype == np.int32
    assert x["padding_mask"].dtype == bool and sample_weight.dtype == bool


def test_keras_fixture_generate_preprocess_and_postprocess():
    expected = keras_expected()["generate_preprocess"]
    preprocessor = OPTCausalLMPreprocessor.from_preset(keras_preset())
    x = preprocessor.generate_preprocess(["Hello world", "Where are you"], sequence_length=10)
    assert sorted(x) == ["padding_mask", "token_ids"]
    np.testing.assert_array_equal(x["token_ids"], expected["token_ids"])
    np.testing.assert_array_equal(x["padding_mask"], np.array(expected["padding_mask"], bool))
    assert preprocessor.generate_postprocess(x) == ["Hello world", "Where are you"]
    assert preprocessor.tokenizer.detokenize(x["token_ids"][0][:3]) == "</s>Hello world"


def test_generate_postprocess_strips_special_tokens_and_masked_positions():
    preprocessor = OPTCausalLMPreprocessor(opt(), sequence_length=8)
    hello = opt()("Hello world")
    ids = np.array([[2, *hello, 2, 1, 1, 77, 1], [2, 1, *hello, 2, 5, 5, 5]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], bool)
    assert preprocessor.generate_postprocess({"token_ids": ids, "padding_mask": mask}) == \
        ["Hello world", "Hello world"]
    one = preprocessor.generate_postprocess({"token_ids": ids[0], "padding_mask": mask[0]})
    assert one == "Hello world"


def test_unbatched_inputs_give_1d_outputs():
    preprocessor = OPTCausalLMPreprocessor(opt(), sequence_length=6)
    x, y, sample_weight = preprocessor("Hello world")
    np.testing.assert_array_equal(x["token_ids"], [2, 31414, 232, 2, 1, 1])
    np.testing.assert_array_equal(x["padding_mask"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(y, [31414, 232, 2, 1, 1, 1])
    np.testing.assert_array_equal(sample_weight, [1, 1, 1, 0, 0, 0])
    g = preprocessor.generate_preprocess("Hello world")
    np.testing.assert_array_equal(g["token_ids"], [2, 31414, 232, 1, 1, 1])
    assert preprocessor.generate_postprocess(g) == "Hello world"


def test_truncation_keeps_the_end_token():
    preprocessor = OPTCausalLMPreprocessor(opt(), sequence_length=4)
    ids = opt()("The quick brown fox jumped.")
    x, y, sample_weight = preprocessor(["The quick brown fox jumped."])
    # packed to 5 = start + 3 tokens + end, then shifted
    np.testing.assert_array_equal(x["token_ids"], [[2, *ids[:3]]])
    np.testing.assert_array_equal(y, [[*ids[:3], 2]])
    assert sample_weight.all() and x["padding_mask"].all()
    g = preprocessor.generate_preprocess(["The quick brown fox jumped."])
    np.testing.assert_array_equal(g["token_ids"], [[2, *ids[:3]]])  # no end token
    x, y, _ = preprocessor(["The quick brown fox jumped."], sequence_length=2)
    np.testing.assert_array_equal(x["token_ids"], [[2, ids[0]]])


def test_start_and_end_tokens_optional():
    ids = opt()("Hello world")
    no_start = OPTCausalLMPreprocessor(opt(), sequence_length=4, add_start_token=False)
    x, y, _ = no_start("Hello world")
    np.testing.assert_array_equal(x["token_ids"], [*ids, 2, 1])
    neither = OPTCausalLMPreprocessor(opt(), sequence_length=4, add_start_token=False,
                                      add_end_token=False)
    x, y, w = neither("Hello world")
    np.testing.assert_array_equal(x["token_ids"], [*ids, 1, 1])
    np.testing.assert_array_equal(w, [1, 0, 0, 0])


def test_pack_start_end_matches_kerashub_docstrings():
    # KerasHub StartEndPacker examples
    ids, mask = pack_start_end([[5, 6, 7]], 7, start_value=1, end_value=2)
    np.testing.assert_array_equal(ids, [[1, 5, 6, 7, 2, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1, 0, 0]])
    ids, _ = pack_start_end([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]], 6, start_value=1,
                            end_value=2)
    np.testing.assert_array_equal(ids, [[1, 5, 6, 7, 2, 0], [1, 8, 9, 10, 11, 2]])


@settings(max_examples=100)
@given(st.lists(texts, min_size=1, max_size=4), st.integers(1, 24))
def test_labels_are_the_next_tokens(batch, length):
    preprocessor = OPTCausalLMPreprocessor(opt(), sequence_length=length)
    x, y, sample_weight = preprocessor(batch)
    packed, packed_mask = pack_start_end(opt()(batch), length + 1, 2, 2, 1)
    np.testing.assert_array_equal(x["token_ids"], packed[:, :-1])
    np.testing.assert_array_equal(y, packed[:, 1:])
    np.testing.assert_array_equal(sample_weight, packed_mask[:, 1:])
    assert x["token_ids"].shape == (len(batch), length)
    for row, text in enumerate(batch):
        ids = [2] + opt()(text) + [2]
        n = min(len(ids), length + 1)
        assert packed_mask[row].sum() == n
        if len(ids) <= length + 1:  # not truncated: the text comes back
            kept = x["token_ids"][row][1:n - 1]
            assert opt().detokenize(kept) == text


def test_from_preset_transformers_directory_and_overrides():
    path = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    preprocessor = OPTCausalLMPreprocessor.from_preset(path)
    assert preprocessor.sequence_length == 1024
    expected = json.loads((path / "expected_generate.json").read_text())
    for text, case in expected.items():
        x = preprocessor.generate_preprocess([text], sequence_length=len(case["prompt_ids"]))
        assert x["token_ids"][0].tolist() == case["prompt_ids"]
    shorter = OPTCausalLMPreprocessor.from_preset(keras_preset(), sequence_length=5,
                                                  add_end_token=False)
    assert shorter.sequence_length == 5 and not shorter.add_end_token


def test_save_to_preset_writes_kerashub_files_byte_for_byte(tmp_path):
    fixture = keras_preset()
    preprocessor = OPTCausalLMPreprocessor.from_preset(fixture)
    preprocessor.save_to_preset(tmp_path)
    for name in ("preprocessor.json", "tokenizer.json", "assets/tokenizer/vocabulary.json",
                 "assets/tokenizer/merges.txt"):
        assert (tmp_path / name).read_bytes() == (fixture / name).read_bytes(), name
    again = OPTCausalLMPreprocessor.from_preset(tmp_path)
    assert again.get_config() == preprocessor.get_config()
    texts_ = keras_expected()["texts"]
    (ax, ay, aw), (bx, by, bw) = again(texts_), preprocessor(texts_)
    for key in ("token_ids", "padding_mask"):
        np.testing.assert_array_equal(ax[key], bx[key])
    np.testing.assert_array_equal(ay, by)
    np.testing.assert_array_equal(aw, bw)


def test_config_round_trip():
    fixture = keras_preset()
    preprocessor = OPTCausalLMPreprocessor.from_preset(fixture)
    saved = json.loads((fixture / "preprocessor.json").read_text())
    assert preprocessor.serialize() == saved
    clone = OPTCausalLMPreprocessor.from_config(preprocessor.get_config(),
                                                tokenizer=preprocessor.tokenizer)
    assert clone.get_config() == preprocessor.get_config()
    bare = OPTCausalLMPreprocessor.from_config(preprocessor.get_config())
    assert isinstance(bare.tokenizer, OPTTokenizer) and bare.tokenizer.vocabulary is None
    bare.tokenizer.load_assets(fixture / "assets" / "tokenizer")
    np.testing.assert_array_equal(bare("Hello world")[0]["token_ids"],
                                  preprocessor("Hello world")[0]["token_ids"])


def test_export_to_transformers(tmp_path):
    preprocessor = OPTCausalLMPreprocessor.from_preset(keras_preset())
    preprocessor.export_to_transformers(tmp_path)
    back = OPTCausalLMPreprocessor.from_preset(tmp_path)
    assert back.tokenizer.vocabulary == preprocessor.tokenizer.vocabulary


def test_errors():
    preprocessor = OPTCausalLMPreprocessor(opt(), sequence_length=8)
    with pytest.raises(InputError, match="labels"):
        preprocessor(["a"], y=[1])
    with pytest.raises(InputTypeError):
        preprocessor([1, 2])
    with pytest.raises(InputTypeError):
        preprocessor(None)
    with pytest.raises(ConfigError, match="sequence_length"):
        OPTCausalLMPreprocessor(opt(), sequence_length=0)
    with pytest.raises(ConfigError, match="sequence_length"):
        preprocessor("a", sequence_length=-3)
    with pytest.raises(ConfigError, match="unknown"):
        OPTCausalLMPreprocessor(opt(), sequence_lenght=8)
    with pytest.raises(InputTypeError, match="tokenizer"):
        OPTCausalLMPreprocessor("not a tokenizer")
    with pytest.raises(InputTypeError):
        preprocessor.generate_postprocess([[1, 2]])
    with pytest.raises(InputError, match="shape"):
        preprocessor.generate_postprocess({"token_ids": np.ones((2, 3), int),
                                           "padding_mask": np.ones((2, 4), bool)})
