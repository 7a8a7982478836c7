"""KerasHub's ``opt_tokenizer_test.py``, ported: the same vocabulary, merges, texts and ids."""

import pytest

from conftest import shared_path
from kh_support import available_presets, opt_test_vocab, presets_or_skip, run_serialization_test
from refopt.models import OPTTokenizer

VOCAB, MERGES = opt_test_vocab(sort_specials=False)
INIT_KWARGS = {"vocabulary": VOCAB, "merges": MERGES}
INPUT_DATA = [" airplane at airport</s>", " airplane airport"]


def test_tokenizer_basics():
    # run_preprocessing_layer_test: config round trip, call, detokenize, one by one == batched
    tokenizer = OPTTokenizer(**INIT_KWARGS)
    run_serialization_test(tokenizer)
    output = tokenizer(INPUT_DATA)
    assert tokenizer.detokenize(output) == [" airplane at airport</s>", " airplane airport"]
    assert [tokenizer(x) for x in INPUT_DATA] == output
    assert output == [[23, 14, 24, 23, 16, 30], [23, 14, 23, 16]]


def test_errors_missing_special_tokens():
    with pytest.raises(ValueError):
        OPTTokenizer(vocabulary=["a", "b", "c"], merges=[])


def test_smallest_preset():
    # opt_125m_en's tokenizer: OPT's vocabulary and GPT-2's merges, which ../shared/data/opt holds
    # (the preset itself when it is on this machine)
    if "opt_125m_en" in available_presets(OPTTokenizer):
        tokenizer = OPTTokenizer.from_preset("opt_125m_en")
    else:
        tokenizer = OPTTokenizer(vocabulary=str(shared_path("data", "opt", "vocab.json")),
                                 merges=str(shared_path("data", "opt", "merges.txt")))
    assert tokenizer(["The quick brown fox."]) == [[133, 2119, 6219, 23602, 4]]


def test_all_presets():
    for preset in presets_or_skip(OPTTokenizer):
        OPTTokenizer.from_preset(preset)(INPUT_DATA)
