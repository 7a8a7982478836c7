"""KerasHub's ``opt_causal_lm_preprocessor_test.py``, ported: the same vocabulary, texts and
expected ids, masks, labels and weights."""

import numpy as np

from kh_support import opt_test_vocab, presets_or_skip, run_serialization_test
from refopt.models import OPTCausalLMPreprocessor, OPTTokenizer

VOCAB, MERGES = opt_test_vocab(sort_specials=True)


def init_kwargs():
    return {"tokenizer": OPTTokenizer(vocabulary=VOCAB, merges=MERGES), "sequence_length": 8}


INPUT_DATA = ["airplane at airport"]


def test_preprocessor_basics():
    # run_preprocessor_test -> run_preprocessing_layer_test: config round trip, call, one by one ==
    # batched, expected output; then the output follows sequence_length, also when it changes
    layer = OPTCausalLMPreprocessor(**init_kwargs())
    run_serialization_test(layer)
    x, y, sw = layer(INPUT_DATA)
    one = [layer(text) for text in INPUT_DATA]
    np.testing.assert_array_equal(np.stack([o[0]["token_ids"] for o in one]), x["token_ids"])
    np.testing.assert_array_equal(np.stack([o[1] for o in one]), y)
    np.testing.assert_array_equal(x["token_ids"], [[0, 4, 16, 26, 25, 18, 0, 1]])
    np.testing.assert_array_equal(x["padding_mask"], [[1, 1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(y, [[4, 16, 26, 25, 18, 0, 1, 1]])          # pass through labels
    np.testing.assert_array_equal(sw, [[1, 1, 1, 1, 1, 1, 0, 0]])             # and sample weights
    assert x["token_ids"].shape[-1] == layer.sequence_length
    layer.sequence_length = 17
    assert layer(INPUT_DATA)[0]["token_ids"].shape[-1] == 17


def test_no_start_end_token():
    input_data = ["airplane at airport"] * 4
    preprocessor = OPTCausalLMPreprocessor(**init_kwargs(), add_start_token=False, add_end_token=False)
    x, y, sw = preprocessor(input_data)
    np.testing.assert_array_equal(x["token_ids"], [[4, 16, 26, 25, 18, 1, 1, 1]] * 4)
    np.testing.assert_array_equal(x["padding_mask"], [[1, 1, 1, 1, 1, 0, 0, 0]] * 4)
    np.testing.assert_array_equal(y, [[16, 26, 25, 18, 1, 1, 1, 1]] * 4)
    np.testing.assert_array_equal(sw, [[1, 1, 1, 1, 0, 0, 0, 0]] * 4)


def test_generate_preprocess():
    x = OPTCausalLMPreprocessor(**init_kwargs()).generate_preprocess("airplane at airport")
    np.testing.assert_array_equal(x["token_ids"], [0, 4, 16, 26, 25, 18, 1, 1])
    np.testing.assert_array_equal(x["padding_mask"], [1, 1, 1, 1, 1, 1, 0, 0])


def test_generate_postprocess():
    input_data = {"token_ids": [0, 4, 16, 26, 25, 18, 0, 1], "padding_mask": [1, 1, 1, 1, 1, 1, 1, 0]}
    assert OPTCausalLMPreprocessor(**init_kwargs()).generate_postprocess(input_data) == \
        "airplane at airport"


def test_all_presets():
    for preset in presets_or_skip(OPTCausalLMPreprocessor):
        OPTCausalLMPreprocessor.from_preset(preset)(INPUT_DATA)
