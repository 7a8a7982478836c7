"""Training a byte-level BPE: vocabulary and merges of a requested size from texts or files.

The algorithm is GPT-2's (and ``tokenizers``' ``BpeTrainer``'s):

1. split every text with GPT-2's pattern and count the words;
2. start from one token per byte; count every adjacent pair of tokens over all words, each word
   weighted by its count;
3. repeatedly merge the most frequent pair into a new token, in every word, and update the
   counts of the pairs around it; stop when the vocabulary has ``vocab_size`` tokens or no pair
   occurs ``min_frequency`` times.

Ties are broken deterministically: among pairs of equal count the one whose (left token's bytes,
right token's bytes) is smallest in byte order wins.  The result depends only on the texts (their
order does not matter) and the arguments.

Vocabulary layout: the special tokens first (ids 0, 1, ... in the order given; OPT's default
order ``<s>``, ``<pad>``, ``</s>``, ``<unk>``), then the 256 one-byte tokens in byte order, then
merged tokens in the order they were learned.  When a merge produces a string that is already a
token (``"ab c"`` after ``"a bc"``), the rule is kept and the token keeps its id, as
``tokenizers`` does.

The vocabulary and merges load in refopt, in ``tokenizers`` (``models.BPE`` with a ``ByteLevel``
pre-tokenizer) and in transformers' ``GPT2Tokenizer``, and all three tokenize text identically.
"""

from __future__ import annotations

import errno
import heapq
import os
from collections import Counter, defaultdict

from refopt.errors import InputTypeError, TrainingError
from refopt.tokenizers.bpe import write_merges, write_vocabulary
from refopt.tokenizers.byte_level import byte_symbols, pretokenize


MAX_TEXT_BYTES = 16 * 2**30


def read_training_text(path) -> str:
    """The UTF-8 text of a training file (a regular file, never blocking); TrainingError when it
    is missing, not a regular file, not UTF-8 or over 16 GiB."""
    from refopt.errors import FileReadError
    from refopt.io import files

    try:
        return files.read_text(path, MAX_TEXT_BYTES, TrainingError, "training file")
    except FileReadError as e:
        if e.errno == errno.ENOENT:
            raise TrainingError(f"training file {os.fspath(path)!r} does not exist: no such "
                                "file") from None
        raise TrainingError(str(e)) from None


def _read_texts(texts_or_files):
    """Yield the texts: ``str`` items are text, ``os.PathLike`` items are UTF-8 files."""
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    for i, item in enumerate(texts_or_files):
        if isinstance(item, str):
            yield item
        elif isinstance(item, os.PathLike):
            yield read_training_text(item)
        else:
            raise InputTypeError(f"train_bpe() input {i} is a {type(item).__name__}; expected a "
                                 "str (text) or a pathlib.Path (a UTF-8 file)")


def count_words(texts_or_files) -> Counter:
    """Counts of the UTF-8 bytes of every GPT-2 pre-token in the texts."""
    counts: Counter = Counter()
    for i, text in enumerate(_read_texts(texts_or_files)):
        try:
            counts.update(word.encode("utf-8") for word in pretokenize(text))
        except UnicodeEncodeError as e:
            raise TrainingError(f"training text {i} cannot be encoded as UTF-8 at index "
                                f"{e.start} ({e.reason})") from None
    return counts


def train_bpe(texts_or_files, vocab_size: int,
              special_tokens=("<s>", "<pad>", "</s>", "<unk>"), min_frequency: int = 2):
    """Learn a byte-level BPE vocabulary and merges.

    Args:
        texts_or_files: a text (``str``), a file (``pathlib.Path``, read as UTF-8), or a list of
            them.  Plain ``str`` items are always text, never paths.
        vocab_size: the number of tokens wanted, special tokens and the 256 byte tokens
            included.  Fewer are returned when no pair occurs ``min_frequency`` times any more.
        special_tokens: strings reserved first in the vocabulary (ids 0, 1, ...).
        min_frequency: the least count a pair needs to be merged.

    Returns:
        ``(vocabulary, merges)``: a ``{token: id}`` dict and a list of ``"a b"`` rules, ready for
        :class:`refopt.tokenizers.BytePairTokenizer` or :func:`save_vocabulary_and_merges`.
    """
    special_tokens = list(special_tokens)
    for token in special_tokens:
        if not isinstance(token, str) or not token:
            raise TrainingError(f"special token {token!r} is not a non-empty string")
    if len(set(special_tokens)) != len(special_tokens):
        raise TrainingError(f"special tokens {special_tokens} contain a duplicate")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TrainingError(f"vocab_size must be an integer; got {vocab_size!r}")
    symbols = byte_symbols()
    vocabulary = {token: i for i, token in enumerate(special_tokens)}
    for b in range(256):
        vocabulary.setdefault(symbols[b], len(vocabulary))
    if vocab_size < len(vocabulary):
        raise TrainingError(f"vocab_size {vocab_size} is smaller than the {len(special_tokens)} "
                            f"special tokens plus the 256 byte tokens ({len(vocabulary)})")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise TrainingError(f"min_frequency must be an integer >= 1; got {min_frequency!r}")

    counts = count_words(texts_or_files)
    # Tokens are worked on as ids; token_bytes[i] is what id i stands for.
    token_bytes = [bytes([b]) for b in range(256)]
    token_string = list(symbols)
    byte_to_token = {tb: i for i, tb in enumerate(token_bytes)}
    words = [list(w) for w in counts]  # each word as token ids (initially its bytes)
    freqs = list(counts.values())

    pair_count: dict = defaultdict(int)
    where: dict = defaultdict(set)  # pair -> indices of the words holding it
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += freq
            where[pair].add(w)

    def key(pair):  # heap order: highest count, then smallest (left bytes, right bytes)
        return (-pair_count[pair], token_bytes[pair[0]], token_bytes[pair[1]], pair)

    heap = [key(pair) for pair in pair_count]
    heapq.heapify(heap)
    merges = []
    while len(vocabulary) < vocab_size and heap:
        negcount, _, _, pair = heapq.heappop(heap)
        current = pair_count.get(pair, 0)
        if current != -negcount:  # stale entry: counts of old pairs only ever fall
            if current > 0:
                heapq.heappush(heap, key(pair))
            continue
        if current < min_frequency:
            break
        a, b = pair
        merged = token_bytes[a] + token_bytes[b]
        new = byte_to_token.get(merged)
        if new is None:
            new = len(token_bytes)
            token_bytes.append(merged)
            token_string.append(token_string[a] + token_string[b])
            byte_to_token[merged] = new
        merges.append(f"{token_string[a]} {token_string[b]}")
        vocabulary.setdefault(token_string[new], len(vocabulary))
        touched = set()
        for w in where.pop(pair):
            word, freq = words[w], freqs[w]
            for old in zip(word, word[1:]):
                pair_count[old] -= freq
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
            old_pairs = set(zip(word, word[1:]))
            new_pairs = set(zip(out, out[1:]))
            for p in zip(out, out[1:]):
                pair_count[p] += freq
            for p in old_pairs - new_pairs:
                where[p].discard(w)
            for p in new_pairs - old_pairs:
                where[p].add(w)
            touched.update(p for p in new_pairs if new in p)
        pair_count.pop(pair, None)
        for p in touched:  # pairs with the new token: their counts rose (the others only fell)
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, key(p))
    return vocabulary, merges


def save_vocabulary_and_merges(directory, vocabulary: dict, merges: list, *,
                               vocab_filename: str = "vocab.json",
                               merges_filename: str = "merges.txt") -> tuple[str, str]:
    """Write ``vocab.json`` (UTF-8 JSON) and ``merges.txt`` (``#version: 0.2`` header) into
    ``directory``; returns their paths.  transformers, ``tokenizers`` and refopt read them."""
    os.makedirs(directory, exist_ok=True)
    vocab_path = os.path.join(directory, vocab_filename)
    merges_path = os.path.join(directory, merges_filename)
    write_vocabulary(vocab_path, vocabulary)
    write_merges(merges_path, merges)
    return vocab_path, merges_path
