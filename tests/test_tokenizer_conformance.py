"""Byte-exactness against the peers: tiktoken (GPT-2 vocabulary), ``tokenizers`` and
transformers (OPT vocabulary), on arbitrary Unicode and on the whole Shakespeare corpus."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_path
from refopt.models import OPTTokenizer
from refopt.tokenizers import GPT2_SPLIT_PATTERN, BytePairTokenizer
from test_tokenizer import FRAGMENTS, gpt2, opt

# Arbitrary Unicode, weighted towards what GPT-2's pattern treats specially.
SPECIALS = ["</s>", "<pad>", "<s>", "</s></s>", "<pad"]
unicode_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS),
              st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
              st.text(st.sampled_from(" \t\n\r\xa0\u3000\u2009"), min_size=2, max_size=30),
              st.text(st.sampled_from("'sStTrReEvVmMlLdD"), max_size=6),
              st.text(st.characters(whitelist_categories=("Nd", "No", "Nl")), max_size=5),
              st.text(st.characters(whitelist_categories=("Mn", "Mc", "Me")), max_size=4)),
    max_size=16).map("".join)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    tiktoken = pytest.importorskip("tiktoken", reason="needs tiktoken to compare against")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    d = shared_path("data", "gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "merges.txt"), str(d / "vocab.json"))
    return tiktoken.Encoding("gpt2_shared", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def _tokenizers_opt(prefix=False, specials=False):
    tk = pytest.importorskip("tokenizers", reason="needs tokenizers to compare against")
    d = shared_path("data", "opt")
    peer = tk.Tokenizer(tk.models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    peer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    peer.decoder = tk.decoders.ByteLevel()
    if specials:
        peer.add_special_tokens(["</s>", "<pad>"])
    return peer


@pytest.fixture(scope="module")
def tokenizers_opt():
    return {(p, s): _tokenizers_opt(p, s) for p in (False, True) for s in (False, True)}


@pytest.fixture(scope="module")
def corpus():
    return shared_path("data", "corpus", "tinyshakespeare.txt").read_text(encoding="utf-8")


@settings(max_examples=400)
@given(unicode_text)
def test_gpt2_matches_tiktoken(tiktoken_gpt2, text):
    assert gpt2()(text) == tiktoken_gpt2.encode_ordinary(text)


@settings(max_examples=400)
@given(unicode_text)
def test_opt_matches_tokenizers(tokenizers_opt, text):
    ours = opt(special_tokens_in_strings=False)(text)
    assert ours == tokenizers_opt[False, False].encode(text, add_special_tokens=False).ids
    assert opt(compiled=False, special_tokens_in_strings=False)(text) == ours


@settings(max_examples=200)
@given(st.lists(st.one_of(unicode_text, st.sampled_from(SPECIALS)), max_size=5).map("".join),
       st.booleans())
def test_special_tokens_and_prefix_space_match_tokenizers(tokenizers_opt, text, prefix):
    peer = tokenizers_opt[prefix, True]
    ours = opt(add_prefix_space=prefix)(text)
    assert ours == peer.encode(text, add_special_tokens=False).ids
    assert opt(compiled=False, add_prefix_space=prefix)(text) == ours


@settings(max_examples=300)
@given(st.lists(st.integers(0, 50264), max_size=12))
def test_decode_matches_tokenizers_lossy_utf8(tokenizers_opt, ids):
    # ids that split characters: both libraries put U+FFFD where the bytes are not UTF-8
    peer = tokenizers_opt[False, False]
    assert opt().detokenize(ids) == peer.decode(ids, skip_special_tokens=False)


def test_whole_corpus(corpus, tiktoken_gpt2, tokenizers_opt):
    ids = gpt2()(corpus)
    assert ids == tiktoken_gpt2.encode_ordinary(corpus)
    assert gpt2().detokenize(ids) == corpus
    lines = corpus.splitlines(keepends=True)[:5000]
    assert gpt2()(lines) == tiktoken_gpt2.encode_ordinary_batch(lines, num_threads=1)
    opt_ids = opt(special_tokens_in_strings=False)(corpus)
    assert opt_ids == tokenizers_opt[False, False].encode(corpus, add_special_tokens=False).ids
    assert opt(compiled=False, special_tokens_in_strings=False)(corpus) == opt_ids


def test_long_words_match_tokenizers(tokenizers_opt):
    peer = tokenizers_opt[False, False]
    rng = np.random.default_rng(1)
    for text in ("x" * 30_000, " " * 20_000 + "y", "".join(rng.choice(list("abc "), 20_000)),
                 "ab" * 10_000, "!?" * 8_000 + "🚀" * 3_000):
        assert opt(special_tokens_in_strings=False)(text) == \
            peer.encode(text, add_special_tokens=False).ids


def test_transformers_checkpoint_tokenizer():
    transformers = pytest.importorskip("transformers", reason="needs transformers to compare")
    path = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    ours = OPTTokenizer.from_preset(path)
    for text in ["Hello world", "The quick brown fox", "  leading\tand\r\ntrailing  ",
                 "naïve café — 東京 🚀", "I'M sure it's ok", "a</s>b<pad>", "x" * 500]:
        assert [2] + ours(text) == hf(text)["input_ids"], text
        ids = hf(text)["input_ids"][1:]
        assert ours.detokenize(ids) == hf.decode(ids)
    generic = BytePairTokenizer.from_preset(path)
    assert generic.unsplittable_tokens == ["</s>", "<pad>"]
