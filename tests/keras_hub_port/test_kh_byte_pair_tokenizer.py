"""KerasHub's byte-pair tokenizer tests (``keras_hub/src/tokenizers/byte_pair_tokenizer_test.py``),
ported: the same texts and expected ids.

KerasHub downloads roberta-base's ``vocab.json`` / ``merges.txt``: the fairseq GPT-2 dictionary,
which OPT shares (``../shared/data/opt``, where every expected id below is the same).  KerasHub runs
each test twice, in its Python and its TensorFlow workflow (``BytePairTokenizerTFTest``); refopt's
two encoders, the compiled kernel and the pure-Python reference, take their place.
"""

import numpy as np
import pytest

from conftest import shared_path
from kh_support import documented_difference
from refopt.tokenizers import BytePairTokenizer

pytestmark = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])


@pytest.fixture(scope="module")
def files():
    return (str(shared_path("data", "opt", "vocab.json")),
            str(shared_path("data", "opt", "merges.txt")))


def make(files, compiled, **kwargs):
    vocab, merges = files
    return BytePairTokenizer(vocabulary=vocab, merges=merges, compiled=compiled, **kwargs)


def test_tokenizer_basics(files, compiled):
    # run_preprocessing_layer_test: config round trip (attributes too), direct call, detokenize,
    # one-by-one (KerasHub: an unbatched dataset) and batched calls agree, expected ids
    input_data = ["I am just a test string", "I am also a test string"]
    layer = make(files, compiled)
    config = layer.get_config()
    revived = BytePairTokenizer.from_config(config)
    assert revived.get_config() == config
    assert set(dir(revived)) == set(dir(layer))
    output = layer(input_data)
    assert layer.detokenize(output) == input_data
    assert [layer(x) for x in input_data] == output
    assert output == [[100, 524, 95, 10, 1296, 6755], [100, 524, 67, 10, 1296, 6755]]


def test_tokenize_list_input(files, compiled):
    tokenizer = make(files, compiled)
    input_data = ["brown.", "black."]
    expected = [[31876, 4], [14178, 4]]
    assert tokenizer(input_data) == expected
    assert tokenizer.tokenize(input_data) == expected
    assert tokenizer(np.array(["brown.", "black."])) == expected      # KerasHub: a tf string tensor


def test_tokenize_string_output(files, compiled):
    tokenizer = make(files, compiled, dtype="string")
    assert tokenizer(["quick brown fox.", "slow black bear."]) == [
        ["quick", "Ġbrown", "Ġfox", "."], ["slow", "Ġblack", "Ġbear", "."]]


def test_tokenize_with_special_tokens(files, compiled):
    vocab = {"sp": 0, "s": 1, "p": 2}
    merges = ["s p"]
    tokenizer = BytePairTokenizer(vocabulary=vocab, merges=merges, unsplittable_tokens=["s", "p"],
                                  compiled=compiled)
    assert tokenizer("sp") == [1, 2]
    # If not setting special tokens, "sp" is one token.
    tokenizer = BytePairTokenizer(vocabulary=vocab, merges=merges, compiled=compiled)
    assert tokenizer("sp") == [0]


def test_tokenize_prefix_space(files, compiled):
    tokenizer = make(files, compiled, dtype="string", add_prefix_space=True)
    assert tokenizer(["brown.", "black."]) == [["Ġbrown", "."], ["Ġblack", "."]]


def test_tokenize_scalar_input(files, compiled):
    assert make(files, compiled).tokenize("brown.") == [31876, 4]


def test_detokenize_scalar_input(files, compiled):
    tokenizer = make(files, compiled)
    input_data = ["quick brown fox."]
    assert tokenizer.detokenize(tokenizer.tokenize(input_data)) == input_data


def test_detokenize_list_input(files, compiled):
    tokenizer = make(files, compiled)
    input_data = ["quick brown fox.", "slow bear"]
    assert tokenizer.detokenize(tokenizer.tokenize(input_data)) == input_data


def test_error_id_out_of_vocabulary(files, compiled):
    tokenizer = make(files, compiled)
    with pytest.raises(ValueError):
        tokenizer.id_to_token(tokenizer.vocabulary_size())
    with pytest.raises(ValueError):
        tokenizer.id_to_token(-1)


def test_whitespace_split(files, compiled):
    tokenizer = make(files, compiled)
    assert tokenizer("\n\n\n  s") == [50140, 50118, 1437, 579]
    assert tokenizer("  \n\n\ns") == [1437, 1437, 50140, 50118, 29]
    assert tokenizer("Hello\n\n") == [31414, 50140]
    assert tokenizer("Hello\n\n\n\n") == [31414, 50140, 50140]


@documented_difference("KerasHub splits a run of newlines before a letter as one piece; GPT-2's "
                       "pattern, tiktoken and transformers' OPT tokenizer (refopt's reference) "
                       "split off the last newline: 'Hello\\n\\nHello' -> [31414, 50118, 50118, 31414]")
def test_whitespace_split_newlines_before_a_word(files, compiled):
    # the part of KerasHub's test_whitespace_split where the two differ (its Llama 3 comment)
    tokenizer = make(files, compiled)
    assert tokenizer("Hello\n\nHello") == [31414, 50140, 31414]
    assert tokenizer("Hello\n\n\n\nHello") == [31414, 50140, 50140, 31414]


def test_special_whitespace(files, compiled):
    assert make(files, compiled)("\xa0 \xa0 \x3000 s") == [50141, 50143, 12096, 579]


def test_cjk_input(files, compiled):
    expected = [36714, 20024, 21402, 37127, 27, 20024, 48945, 47918]
    expected += [47780, 43251, 4394, 10172, 36484, 27969, 12410, 37127]
    expected += [10965, 10674, 1864, 42393, 15722, 18164, 43251, 10809]
    expected += [17772]
    assert make(files, compiled)("素晴らしい！芭比Q啦～") == expected


@documented_difference("Keras's safe mode refuses vocabulary files named outside a model archive; "
                       "refopt runs nothing a file or config says and parses vocabularies as bounded "
                       "data, so it has no safe mode and reads the file the caller names")
def test_safe_mode_vocabulary_file_disallowed(files, compiled, tmp_path):
    vocab_path, merges_path = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_path.write_text('{"<|endoftext|>": 0, "the": 1, "quick": 2}')
    merges_path.write_text("t h\nthe quick")
    tokenizer = BytePairTokenizer(compiled=compiled)
    with pytest.raises(ValueError, match=r"Requested the loading of a vocabulary file outside"):
        tokenizer.set_vocabulary_and_merges(str(vocab_path), str(merges_path))
