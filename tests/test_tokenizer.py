"""BytePairTokenizer / OPTTokenizer: API, fixtures, presets, errors, compiled == pure Python."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_path
from refopt.errors import (ConfigError, InputTypeError, PresetNotFoundError, RefoptError,
                           TokenizerError)
from refopt.models import OPTTokenizer
from refopt.tokenizers import BytePairTokenizer, bytes_to_unicode, pretokenize
from refopt.tokenizers import _kernels
from refopt.tokenizers.bpe import bpe_merge
from refopt.tokenizers.byte_level import char_class_table

# ---------------------------------------------------------------------------------- helpers
_TOKENIZERS = {}


def gpt2(compiled=True):
    key = ("gpt2", compiled)
    if key not in _TOKENIZERS:
        d = shared_path("data", "gpt2")
        _TOKENIZERS[key] = BytePairTokenizer(str(d / "vocab.json"), str(d / "merges.txt"),
                                             compiled=compiled)
    return _TOKENIZERS[key]


def opt(compiled=True, **kwargs):
    key = ("opt", compiled, tuple(sorted(kwargs.items())))
    if key not in _TOKENIZERS:
        d = shared_path("data", "opt")
        _TOKENIZERS[key] = OPTTokenizer(str(d / "vocab.json"), str(d / "merges.txt"),
                                        compiled=compiled, **kwargs)
    return _TOKENIZERS[key]


def toy_vocab():
    """KerasHub's BytePairTokenizer docstring example."""
    merges = ["b u", "t t", "e r", "bu tt", "butt er", "f l", "fl y"]
    tokens = []
    for a, b in (m.split(" ") for m in merges):
        tokens.extend([a, b, a + b])
    vocab = {t: i for i, t in enumerate(sorted(set(tokens)))}
    return vocab, merges


# Fragments that exercise every branch of GPT-2's pattern.
FRAGMENTS = ["'s", "'S", "'t", "'re", "'RE", "'Re", "'ve", "'m", "'ll", "'LL", "'d", "'x", "''",
             " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "\x0b", "\x0c", "\x85", "\xa0",
             "\u2000", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
             "\u1680", "\u200b", "\ufeff", "\x00", "\x1c", "\x7f", "a", "Z", "é", "e\u0301",
             "\u0301", "ß", "İ", "ǅ", "東京", "한국어", "שלום", "مرحبا", "\u200f", "\u202e",
             "🚀", "👩‍💻", "🇫🇷", "1", "42", "٣", "²", "Ⅻ", "½", "३", "!", "...", "—", "$", "%",
             "_", "-", "@", "#", "I'm", "don't", "DON'T", "it's", "3.14", " x", " 1", " !",
             "\U0001f600", "\U00010000", "\U0010fffd", "\ue000", "\u0378", "ǂ", "ʰ"]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS),
                           st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)),
                 max_size=12).map("".join)


# ---------------------------------------------------------------------------------- basics
def test_keras_docstring_example():
    vocab, merges = toy_vocab()
    tokenizer = BytePairTokenizer(vocab, merges)
    assert tokenizer("butterfly") == [3, 8]
    assert tokenizer(["butterfly", "butter"]) == [[3, 8], [3]]
    padded = BytePairTokenizer(vocab, merges, sequence_length=2)(["butterfly", "butter"])
    np.testing.assert_array_equal(padded, [[3, 8], [3, 0]])
    assert padded.dtype == np.int32
    assert tokenizer.detokenize([[3, 8]]) == ["butterfly"]
    assert tokenizer.detokenize([3, 8]) == "butterfly"


def test_opt_docstring_example():
    vocab = {"<pad>": 1, "</s>": 2, "Ġ": 3, "q": 4, "u": 5, "Ġq": 6, "Ġqu": 7}
    tokenizer = OPTTokenizer(vocabulary=vocab, merges=["Ġ q", "Ġq u"])
    assert tokenizer(" qu") == [7]
    assert tokenizer(" qu</s>") == [7, 2]


def test_byte_table_is_gpt2s():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("!")] == "!"
    assert all(not c.isspace() and c.isprintable() for c in table.values())
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers",
                                         reason="needs tokenizers to compare the byte alphabet")
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("text, words", [
    ("Hello world", ["Hello", " world"]),
    ("  x", [" ", " x"]),
    ("x   ", ["x", "   "]),
    ("a\n\nb", ["a", "\n", "\n", "b"]),
    ("a \n b", ["a", " \n", " b"]),
    ("I'm DON'T they'll", ["I", "'m", " DON", "'", "T", " they", "'ll"]),
    ("a\xa0b", ["a", "\xa0", "b"]),
    ("x1234 y", ["x", "1234", " y"]),
    ("!!'s", ["!!'", "s"]),
    ("\r\n", ["\r\n"]),
])
def test_pretokenize_examples(text, words):
    assert pretokenize(text) == words
    tables = gpt2()._compiled_tables()
    data = text.encode()
    bounds = _kernels.split_words(data, tables).tolist()
    assert [data[a:b].decode() for a, b in zip(bounds, bounds[1:])] == words


@settings(max_examples=300)
@given(texts)
def test_compiled_scanner_matches_regex(text):
    data = text.encode("utf-8")
    bounds = _kernels.split_words(data, gpt2()._compiled_tables()).tolist()
    assert [data[a:b].decode() for a, b in zip(bounds, bounds[1:])] == pretokenize(text)


def test_char_classes_cover_every_code_point():
    index, blocks = char_class_table()
    assert index.shape == (0x1100,) and blocks.shape[1] == 256
    classes = blocks[index[np.arange(0x110000) >> 8], np.arange(0x110000) & 255]
    assert classes[ord("a")] == 1 and classes[ord("٣")] == 2 and classes[ord("\u3000")] == 3
    assert classes[ord("!")] == 0 and classes[ord("東")] == 1 and classes[0x1F680] == 0


@settings(max_examples=200)
@given(texts)
def test_compiled_equals_pure_python_gpt2(text):
    assert gpt2(compiled=True)(text) == gpt2(compiled=False)(text)


@settings(max_examples=100)
@given(st.lists(texts, max_size=4))
def test_batch_equals_one_by_one(batch):
    tokenizer = opt()
    assert tokenizer(batch) == [tokenizer(t) for t in batch]
    assert opt(compiled=False)(batch) == tokenizer(batch)


def _odd_merges():
    # A merge list where a token is used before the rule that creates it and pairs overlap:
    # rank order, leftmost first, decides everything.
    symbols = [bytes_to_unicode()[b] for b in b"abc"]
    a, b, c = symbols
    merges = [f"{a} {a}", f"{b} {a}", f"{a}{a} {a}", f"{b} {c}", f"{a} {b}{c}",
              f"{b}{c} {a}{a}", f"{a} {b}", f"{a}{b} {c}", f"{a}{a} {b}{c}"]
    vocab = {bytes_to_unicode()[i]: i for i in range(256)}
    for rule in merges:
        vocab.setdefault(rule.replace(" ", ""), len(vocab))
    return vocab, merges


@settings(max_examples=200)
@given(st.text("abc ", max_size=40))
def test_merge_order_compiled_python_and_heap_agree(text):
    vocab, merges = _odd_merges()
    compiled = BytePairTokenizer(vocab, merges)
    python = BytePairTokenizer(vocab, merges, compiled=False)
    assert compiled(text) == python(text)
    t = compiled._tables
    heap_tables = _kernels.pack_tables(t.byte_ids, *char_class_table(), t.pair_keys, t.pair_ranks,
                                       t.pair_new, long_word=1)  # every word through the heap
    data = text.encode()
    out = np.empty(len(data) + 1, np.int32)
    n = _kernels.encode_one(data, heap_tables, _kernels.new_state(), out)
    assert out[:n].tolist() == compiled(text)


def test_long_words_heap_equals_reference():
    tokenizer = gpt2()
    rng = np.random.default_rng(0)
    state = _kernels.new_state()
    tables = tokenizer._compiled_tables()
    for length in (300, 700):
        word = "".join(rng.choice(list("aeinrst"), size=length))
        ids = [int(b) for b in tokenizer._tables.byte_ids[list(word.encode())]]
        fast = _kernels.merge_word(tables, state, np.array(ids, np.int64)).tolist()
        assert fast == bpe_merge(ids, tokenizer._tables.pair_dict)
        assert tokenizer(word) == fast == gpt2(compiled=False)(word)


def test_very_long_inputs_are_fast_and_round_trip():
    tokenizer = gpt2()
    text = "a" * 200_000 + " " * 50_000 + "b" + "\n" * 10_000 + "🚀" * 20_000
    ids = tokenizer(text)  # the heap keeps this O(n log n)
    assert tokenizer.detokenize(ids) == text


# ---------------------------------------------------------------------------------- API
def test_call_forms_and_shapes():
    tokenizer = opt()
    one = tokenizer("The quick brown fox jumped.")
    assert one == [133, 2119, 6219, 23602, 4262, 4]
    assert tokenizer(["The quick brown fox jumped.", ""]) == [one, []]
    assert tokenizer(("a", "b")) == [tokenizer("a"), tokenizer("b")]
    assert tokenizer(np.array("Hello world")) == [31414, 232]
    assert tokenizer(np.array(["Hello world", "x"])) == [[31414, 232], tokenizer("x")]
    assert tokenizer("") == [] and tokenizer([]) == []
    fixed = OPTTokenizer(tokenizer.vocabulary, tokenizer.merges, sequence_length=4)
    row = fixed("The quick brown fox jumped.")
    np.testing.assert_array_equal(row, one[:4])
    assert row.shape == (4,) and row.dtype == np.int32
    np.testing.assert_array_equal(fixed(["Hello world"]), [[31414, 232, 1, 1]])  # <pad> = 1
    wide = OPTTokenizer(tokenizer.vocabulary, tokenizer.merges, dtype="int64")
    assert wide("Hello world") == [31414, 232]
    strings = OPTTokenizer(tokenizer.vocabulary, tokenizer.merges, dtype="string")
    assert strings("Hello world") == ["Hello", "Ġworld"]


def test_detokenize_forms():
    tokenizer = opt()
    assert tokenizer.detokenize(31414) == "Hello"
    assert tokenizer.detokenize([31414, 232]) == "Hello world"
    assert tokenizer.detokenize((31414, 232)) == "Hello world"
    assert tokenizer.detokenize([]) == ""
    assert tokenizer.detokenize(np.array([31414, 232], np.int32)) == "Hello world"
    assert tokenizer.detokenize(np.int64(232)) == " world"
    assert tokenizer.detokenize([[31414, 232], [232]]) == ["Hello world", " world"]
    assert tokenizer.detokenize(np.array([[2, 31414, 1]])) == ["</s>Hello<pad>"]
    assert tokenizer.detokenize([np.array([232]), [31414]]) == [" world", "Hello"]


def test_vocabulary_queries():
    tokenizer = opt()
    assert tokenizer.vocabulary_size() == 50265
    vocab = tokenizer.get_vocabulary()
    assert vocab[:5] == ["<s>", "<pad>", "</s>", "<unk>", "."] and len(vocab) == 50265
    assert tokenizer.id_to_token(5) == "Ġthe" and tokenizer.token_to_id("Ġthe") == 5
    assert (tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id) == (2, 2, 1)
    assert tokenizer.special_tokens == ["</s>", "<pad>"]
    assert tokenizer.special_token_ids == [2, 1]
    with pytest.raises(TokenizerError, match="50265"):
        tokenizer.id_to_token(50265)
    with pytest.raises(TokenizerError, match="'nope'"):
        tokenizer.token_to_id("nope")
    with pytest.raises(InputTypeError):
        tokenizer.id_to_token("5")


def test_special_tokens_in_strings():
    text = "a</s>b <pad></s>"
    default = opt()
    assert default(text) == default("a") + [2] + default("b") + default(" ") + [1, 2]
    plain = opt(special_tokens_in_strings=False)
    assert plain.unsplittable_tokens == []
    assert plain("</s>") == plain("</") + plain("s") + plain(">")
    assert 2 not in plain(text) and 1 not in plain(text)
    explicit = opt(unsplittable_tokens=("<pad>",))
    assert explicit(text) == explicit("a</s>b ") + [1] + explicit("</s>")
    assert 2 not in explicit(text)
    # the pure-Python path splits the same way
    assert opt(compiled=False)(text) == default(text)
    assert opt(compiled=False, special_tokens_in_strings=False)(text) == plain(text)


def test_invalid_utf8_decodes_to_replacement_characters():
    tokenizer = gpt2()
    lead_byte = tokenizer.token_to_id(bytes_to_unicode()[0xE2])  # first byte of "—"
    assert tokenizer.detokenize([lead_byte]) == "\ufffd"
    rocket = tokenizer("🚀")
    assert len(rocket) > 1 and tokenizer.detokenize(rocket[:-1]) == "\ufffd"
    assert tokenizer.detokenize(rocket) == "🚀"


@settings(max_examples=200)
@given(texts)
def test_round_trip(text):
    assert opt().detokenize(opt()(text)) == text
    assert gpt2().detokenize(gpt2()(text)) == text


# ---------------------------------------------------------------------------------- fixtures
def test_transformers_fixture_ids():
    expected = json.loads(shared_path("fixtures", "hf", "tokenizer_expected.json").read_text())
    tokenizer = OPTTokenizer.from_preset(shared_path("fixtures", "hf", "opt-tiny-realvocab"),
                                         special_tokens_in_strings=False)
    assert tokenizer(expected["texts"]) == expected["ids"]
    for text, ids in zip(expected["texts"], expected["ids"]):
        assert tokenizer(text) == ids
        assert tokenizer.detokenize(ids) == text
    python = OPTTokenizer.from_preset(shared_path("fixtures", "hf", "opt-tiny-realvocab"),
                                      special_tokens_in_strings=False, compiled=False)
    assert python(expected["texts"]) == expected["ids"]


def test_transformers_fixture_prompts():
    path = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    expected = json.loads((path / "expected_generate.json").read_text())
    tokenizer = OPTTokenizer.from_preset(path)
    for text, case in expected.items():
        assert [tokenizer.start_token_id] + tokenizer(text) == case["prompt_ids"]
        assert tokenizer.detokenize(case["greedy_ids"][1:]) == case["greedy_text"]


def test_keras_fixture_tokenize_detokenize():
    expected = json.loads(shared_path("fixtures", "keras", "expected.json").read_text())
    tokenizer = OPTTokenizer.from_preset(shared_path("fixtures", "keras", "opt_tiny_keras"))
    assert tokenizer(expected["texts"]) == expected["tokenize"]
    assert tokenizer.detokenize(tokenizer(expected["texts"][0])) == expected["detokenize"]
    assert tokenizer.unsplittable_tokens == ["</s>", "<pad>"]


# ---------------------------------------------------------------------------------- presets
def test_save_to_preset_writes_kerashub_files_byte_for_byte(tmp_path):
    fixture = shared_path("fixtures", "keras", "opt_tiny_keras")
    tokenizer = OPTTokenizer.from_preset(fixture)
    tokenizer.save_to_preset(tmp_path)
    for name in ("tokenizer.json", "assets/tokenizer/vocabulary.json",
                 "assets/tokenizer/merges.txt"):
        assert (tmp_path / name).read_bytes() == (fixture / name).read_bytes(), name
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    again = OPTTokenizer.from_preset(tmp_path, sequence_length=8)
    assert again.sequence_length == 8 and again.vocabulary == tokenizer.vocabulary
    assert again.merges == tokenizer.merges


def test_config_round_trip():
    fixture = shared_path("fixtures", "keras", "opt_tiny_keras")
    tokenizer = OPTTokenizer.from_preset(fixture)
    saved = json.loads((fixture / "tokenizer.json").read_text())
    assert tokenizer.serialize() == saved
    assert tokenizer.get_config() == saved["config"]
    clone = OPTTokenizer.from_config(tokenizer.get_config(), vocabulary=tokenizer.vocabulary,
                                     merges=tokenizer.merges)
    assert clone.get_config() == tokenizer.get_config()
    assert clone("Hello world") == tokenizer("Hello world")
    empty = OPTTokenizer.from_config(tokenizer.get_config())  # KerasHub: assets come later
    with pytest.raises(TokenizerError, match="no vocabulary"):
        empty("x")
    empty.load_assets(fixture / "assets" / "tokenizer")
    assert empty("Hello world") == [31414, 232]


def test_from_preset_tokenizers_json_only(tmp_path):
    source = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    shutil.copy(source / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(source / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    tokenizer = OPTTokenizer.from_preset(tmp_path)
    assert tokenizer("Hello world") == [31414, 232]
    generic = BytePairTokenizer.from_preset(tmp_path)
    assert generic("<pad> x</s>") == [1, 3023, 2]


def test_from_preset_errors(tmp_path):
    with pytest.raises(PresetNotFoundError):
        OPTTokenizer.from_preset(tmp_path / "missing")
    with pytest.raises(PresetNotFoundError, match="holds no tokenizer"):
        OPTTokenizer.from_preset(tmp_path)


def test_export_to_transformers(tmp_path):
    tokenizer = OPTTokenizer.from_preset(shared_path("fixtures", "keras", "opt_tiny_keras"))
    tokenizer.export_to_transformers(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer_config.json",
                     "special_tokens_map.json"}
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "GPT2Tokenizer"
    back = OPTTokenizer.from_preset(tmp_path)
    assert back.vocabulary == tokenizer.vocabulary and back.merges == tokenizer.merges
    transformers = pytest.importorskip("transformers", reason="needs transformers to load it")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "The quick brown fox jumped. naïve café 🚀"
    assert hf(text)["input_ids"] == [2] + tokenizer(text)
    assert hf.pad_token_id == 1 and hf.eos_token_id == 2


# ---------------------------------------------------------------------------------- errors
def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


BAD_VOCABULARY_FILES = [  # (file text, what the error must say)
    ('{"a": 0,\n "b": 1,\n "c" 2}', "line 3"),
    ('["a", "b"]', "list"),
    ('{"a": 0,\n"b": "one"}', r"'b' \(line 2\) has id 'one'"),
    ('{"a": -1}', "-1"),
    ('{"a": 0,\n"b": 0}', "share id 0"),
    ('{"a": 0,\n"a": 1}', "appears twice"),
]


def test_malformed_vocabulary_files(tmp_path):
    merges = _write(tmp_path / "merges.txt", "#version: 0.2\n")
    for n, (text, message) in enumerate(BAD_VOCABULARY_FILES):
        with pytest.raises(TokenizerError, match=message):
            BytePairTokenizer(_write(tmp_path / f"v{n}.json", text), merges)
    with pytest.raises(TokenizerError, match="does not exist"):
        BytePairTokenizer(str(tmp_path / "none.json"), merges)


def test_malformed_merges_files(tmp_path):
    vocab = {"a": 0, "b": 1, "ab": 2, "c": 3}
    for n, (text, message) in enumerate([("#version: 0.2\na b\nab  c\n", "line 3"),
                                         ("a b\nabc\n", "line 2.*'abc'"),
                                         ("#version: 0.2\na b\na x\n", "line 3.*uses token 'x'"),
                                         ("#version: 0.2\na b\nab c\n", "line 3.*produces token 'abc'")]):
        with pytest.raises(TokenizerError, match=message):
            BytePairTokenizer(vocab, _write(tmp_path / f"m{n}.txt", text))
    with pytest.raises(TokenizerError, match=r"merges\[1\].*produces token 'abc'"):
        BytePairTokenizer(vocab, ["a b", "ab c"])
    with pytest.raises(InputTypeError):
        BytePairTokenizer(vocab, [("a", "b"), 3])
    with pytest.raises(TokenizerError, match="vocabulary"):   # a ValueError, as KerasHub's
        BytePairTokenizer(["a"], [])
    with pytest.raises(TokenizerError, match="merges"):
        BytePairTokenizer(vocab, 5)
    assert BytePairTokenizer(vocab, [("a", "b")])("ab") == [2]
    crlf = tmp_path / "m5.txt"
    crlf.write_bytes(b"#version: 0.2\r\na b\r\n")
    assert BytePairTokenizer(vocab, str(crlf)).merges == ["a b"]


def test_bad_inputs():
    tokenizer = opt()
    for bad in (3, None, b"bytes", ["ok", 3], np.array([1, 2])):
        with pytest.raises(InputTypeError):
            tokenizer(bad)
    with pytest.raises(TokenizerError, match="UTF-8"):
        tokenizer("abc\ud800def")
    with pytest.raises(TokenizerError, match="input 1 .*UTF-8.*index 0"):
        opt(compiled=False)(["fine", "\udfff"])
    with pytest.raises(TokenizerError, match="50265"):
        tokenizer.detokenize([31414, 50265])
    with pytest.raises(TokenizerError, match="-1"):
        tokenizer.detokenize(np.array([[1, -1]]))
    with pytest.raises(InputTypeError):
        tokenizer.detokenize([1.0, 2.0])
    with pytest.raises(InputTypeError):
        tokenizer.detokenize(np.array([0.5]))
    with pytest.raises(InputTypeError):
        tokenizer.detokenize("hello")
    with pytest.raises(InputTypeError):
        tokenizer.detokenize([True])
    with pytest.raises(InputTypeError):
        tokenizer.detokenize(np.zeros((1, 1, 1), int))
    # every error is a RefoptError and the matching built-in
    with pytest.raises(ValueError):
        tokenizer.detokenize([-5])
    with pytest.raises(TypeError):
        tokenizer(7)


def test_bad_construction():
    vocab, merges = toy_vocab()
    with pytest.raises(ConfigError, match="unknown"):
        BytePairTokenizer(vocab, merges, lowercase=True)
    with pytest.raises(ConfigError, match="dtype"):
        BytePairTokenizer(vocab, merges, dtype="float32")
    with pytest.raises(ConfigError, match="together"):
        BytePairTokenizer(vocab, None)
    with pytest.raises(ConfigError, match="sequence_length"):
        BytePairTokenizer(vocab, merges, sequence_length=-1)
    with pytest.raises(TokenizerError, match="special token '</s>'"):
        OPTTokenizer(vocab, merges)
    with pytest.raises(TokenizerError, match="unsplittable token '<x>'"):
        BytePairTokenizer(vocab, merges, unsplittable_tokens=["<x>"])
    with pytest.raises(TokenizerError, match="no vocabulary"):
        BytePairTokenizer()("x")
    assert issubclass(TokenizerError, RefoptError)


def test_vocabulary_without_some_bytes():
    vocab, merges = toy_vocab()
    tokenizer = BytePairTokenizer(vocab, merges)
    assert tokenizer("butter") == [3]
    for compiled in (True, False):
        with pytest.raises(TokenizerError, match="byte 0x7a"):  # "z" is not in the vocabulary
            BytePairTokenizer(vocab, merges, compiled=compiled)("buzz")


def test_duplicate_merge_rules_keep_the_last_rank():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4}
    # "b c" listed first and again last: its last rank (after "a b") decides
    tokenizer = BytePairTokenizer(vocab, ["b c", "a b", "b c"])
    assert tokenizer("abc") == [3, 2]
    assert BytePairTokenizer(vocab, ["b c", "a b", "b c"], compiled=False)("abc") == [3, 2]
    assert tokenizer.merges == ["b c", "a b", "b c"]
    assert BytePairTokenizer(vocab, ["b c", "a b"])("abc") == [0, 4]
