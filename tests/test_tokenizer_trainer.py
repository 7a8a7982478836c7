"""train_bpe: against a brute-force trainer, deterministic, and loadable in refopt, tokenizers
and transformers with identical tokenization."""

import json
import pathlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_path
from refopt.errors import InputTypeError, TrainingError
from refopt.tokenizers import (BytePairTokenizer, bytes_to_unicode, pretokenize,
                               save_vocabulary_and_merges, train_bpe)
from test_tokenizer import texts as unicode_texts

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def brute_force_train(texts, vocab_size, special_tokens=SPECIALS, min_frequency=2):
    """Recount every pair after every merge; pick the highest count, ties by (left bytes,
    right bytes).  Slow and obviously right."""
    to_char = bytes_to_unicode()
    words = Counter(w.encode() for t in texts for w in pretokenize(t))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    vocab = {t: i for i, t in enumerate(special_tokens)}
    for b in range(256):
        vocab.setdefault(to_char[b], len(vocab))
    merges = []
    while len(vocab) < vocab_size:
        counts = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                counts[pair] += words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p[0], p[1]))
        if counts[best] < min_frequency:
            break
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
        a, b = ("".join(to_char[x] for x in part) for part in best)
        merges.append(f"{a} {b}")
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


@settings(max_examples=60)
@given(st.lists(st.text("aab c\n'sé!1", max_size=30), min_size=1, max_size=6),
       st.integers(260, 300), st.integers(1, 3))
def test_matches_brute_force(texts, vocab_size, min_frequency):
    assert train_bpe(texts, vocab_size, min_frequency=min_frequency) == \
        brute_force_train(texts, vocab_size, min_frequency=min_frequency)


def test_deterministic_and_order_free():
    texts = ["the cat sat on the mat", "the dog sat", "a cat, a dog; the end"] * 3
    first = train_bpe(texts, 300)
    assert train_bpe(texts, 300) == first
    assert train_bpe(list(reversed(texts)), 300) == first


def test_layout_sizes_and_special_tokens():
    text = " ".join("".join(chr(97 + (i * k) % 26) for k in (1, 7, 3, 5)) for i in range(3000))
    vocab, merges = train_bpe(text, 280, special_tokens=["<pad>", "</s>"])
    assert list(vocab)[:2] == ["<pad>", "</s>"] and vocab["<pad>"] == 0 and vocab["</s>"] == 1
    assert [vocab[bytes_to_unicode()[b]] for b in range(256)] == list(range(2, 258))
    assert len(vocab) == 280 and len(merges) == 280 - 258
    assert sorted(vocab.values()) == list(range(280))
    few, few_merges = train_bpe("ab ab", 1000)  # runs out of pairs seen twice
    assert len(few) < 1000 and few_merges == ["a b"]
    assert train_bpe("ab ab", 1000, min_frequency=3)[1] == []


def test_files_and_texts(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello hello world\n", encoding="utf-8")
    from_file = train_bpe([path], 270)
    assert from_file == train_bpe(["hello hello world\n"], 270)
    assert train_bpe(path, 270) == from_file
    # a str is always text, never a path
    assert train_bpe(str(path), 270) != from_file


def test_errors(tmp_path):
    with pytest.raises(TrainingError, match="smaller"):
        train_bpe("abc", 100)
    with pytest.raises(TrainingError, match="duplicate"):
        train_bpe("abc", 300, special_tokens=["<s>", "<s>"])
    with pytest.raises(TrainingError, match="non-empty"):
        train_bpe("abc", 300, special_tokens=[""])
    with pytest.raises(TrainingError, match="min_frequency"):
        train_bpe("abc", 300, min_frequency=0)
    with pytest.raises(TrainingError, match="does not exist"):
        train_bpe([tmp_path / "missing.txt"], 300)
    with pytest.raises(InputTypeError):
        train_bpe([b"bytes"], 300)
    with pytest.raises(TrainingError, match="UTF-8"):
        train_bpe(["ok", "\ud800"], 300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(TrainingError, match="not UTF-8"):
        train_bpe([bad], 300)


@pytest.fixture(scope="module")
def shakespeare_8k(tmp_path_factory):
    corpus = shared_path("data", "corpus", "tinyshakespeare.txt")
    vocab, merges = train_bpe(pathlib.Path(corpus), 8192)
    directory = tmp_path_factory.mktemp("bpe8k")
    save_vocabulary_and_merges(directory, vocab, merges)
    return vocab, merges, directory, corpus.read_text(encoding="utf-8")


def test_shakespeare_8k(shakespeare_8k):
    vocab, merges, directory, corpus = shakespeare_8k
    assert len(vocab) == 8192 and list(vocab)[:4] == list(SPECIALS)
    assert merges[:3] == ["Ġ t", "h e", "Ġ a"]
    assert (directory / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert json.loads((directory / "vocab.json").read_text(encoding="utf-8")) == vocab
    tokenizer = BytePairTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    ids = tokenizer(corpus)
    assert tokenizer.detokenize(ids) == corpus
    assert len(ids) < 0.4 * len(corpus)  # it compresses the text it was trained on
    assert BytePairTokenizer(vocab, merges, compiled=False)(corpus[:50_000]) == \
        tokenizer(corpus[:50_000])


@pytest.fixture(scope="module")
def trained_three(shakespeare_8k):
    """The 8k files loaded by refopt, tokenizers and transformers' GPT2Tokenizer."""
    tk = pytest.importorskip("tokenizers", reason="needs tokenizers to load the trained files")
    transformers = pytest.importorskip("transformers",
                                       reason="needs transformers to load the trained files")
    directory = shakespeare_8k[2]
    fast = tk.Tokenizer(tk.models.BPE.from_file(str(directory / "vocab.json"),
                                                str(directory / "merges.txt")))
    fast.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = tk.decoders.ByteLevel()
    fast.add_special_tokens(list(SPECIALS))  # special tokens in text map to their ids ...
    gpt2 = transformers.GPT2Tokenizer.from_pretrained(str(directory), unk_token="<unk>",
                                                      bos_token="<s>", eos_token="</s>",
                                                      pad_token="<pad>")
    ours = BytePairTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                             unsplittable_tokens=SPECIALS)  # ... in all three
    return ours, fast, gpt2


def test_trained_files_tokenize_alike_in_tokenizers_and_transformers(shakespeare_8k,
                                                                      trained_three):
    corpus = shakespeare_8k[3]
    ours, fast, gpt2 = trained_three
    assert ours(corpus) == fast.encode(corpus, add_special_tokens=False).ids
    for text in corpus.splitlines()[:300] + ["naïve café — 東京 🚀", "  spaced\tout\r\n"]:
        want = ours(text)
        assert fast.encode(text, add_special_tokens=False).ids == want
        assert gpt2.encode(text, add_special_tokens=False) == want
        assert gpt2.decode(want) == text


@settings(max_examples=100)
@given(st.lists(st.one_of(unicode_texts, st.sampled_from(SPECIALS)), max_size=4).map("".join))
def test_trained_files_agree_on_arbitrary_unicode(trained_three, text):
    ours, fast, gpt2 = trained_three
    want = ours(text)
    assert fast.encode(text, add_special_tokens=False).ids == want
    assert gpt2.encode(text, add_special_tokens=False) == want
