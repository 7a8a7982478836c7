"""Vocabulary and merge rules of a byte-level BPE: reading, checking, and the merge itself.

A **vocabulary** maps token strings (byte-level characters, see
:mod:`refopt.tokenizers.byte_level`) to integer ids.  A list of **merges** ``"a b"`` ranks the
pairs of adjacent tokens that byte-pair encoding may join into ``"ab"``: the earlier the line, the
lower the rank, the earlier the pair is merged.

:func:`bpe_merge` is the merge loop in its readable form (the pure-Python path and the reference
for the compiled one): start from one token per byte, join the adjacent pair of lowest rank,
leftmost first when a pair occurs several times, until no adjacent pair has a rank.  This is the
order of OpenAI's ``encoder.py`` (which joins every occurrence of the best pair at once: the same
result for any merge list in which a token is created before it is used), of tiktoken and of
``tokenizers``.  When a merge line occurs twice, the later rank wins, as in ``encoder.py`` and
``tokenizers``.
"""

from __future__ import annotations

import errno
import json
import operator
import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from refopt.errors import InputTypeError, TokenizerError
from refopt.tokenizers.byte_level import byte_symbols, token_to_bytes, unicode_to_bytes

MERGES_HEADER = "#version: 0.2"
_MAX_ID = 2**31 - 2
MAX_IDS = 2**24          # an id table of 2**24 entries (refopt.config's vocabulary_size limit)


def _read_file(source: str, what: str) -> str:
    """A tokenizer file's text: a regular file (never blocking), at most 256 MiB, UTF-8."""
    from refopt.errors import FileReadError
    from refopt.io import files

    try:
        return files.read_text(source, files.MAX_TOKENIZER_BYTES, TokenizerError, what)
    except FileReadError as e:
        if e.errno == errno.ENOENT:
            raise TokenizerError(f"{what} {source!r} does not exist") from None
        raise


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _line_of(text: str, token: str) -> str:
    """' (line N)' where ``token`` first appears as a JSON key in ``text``, or '' if not found."""
    for encoded in (json.dumps(token), json.dumps(token, ensure_ascii=False)):
        at = text.find(encoded + ":")
        if at < 0:
            at = text.find(encoded)
        if at >= 0:
            return f" (line {text.count(chr(10), 0, at) + 1})"
    return ""


def read_vocabulary(vocabulary) -> dict[str, int]:
    """A vocabulary from a JSON file path or a dict, checked: string tokens, distinct ids >= 0.

    Raises :class:`TokenizerError` naming the file, line and token at fault.
    """
    text = None
    source = "vocabulary"
    if isinstance(vocabulary, (str, os.PathLike)):
        source = os.fspath(vocabulary)
        text = _read_file(source, "vocabulary file")
        duplicates = []

        def pairs_to_dict(pairs):
            d = dict(pairs)
            if len(d) != len(pairs):
                seen = set()
                duplicates.extend(k for k, _ in pairs if k in seen or seen.add(k))
            return d

        try:
            vocabulary = json.loads(text, object_pairs_hook=pairs_to_dict,
                                    parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise TokenizerError(
                f"vocabulary file {source!r} line {e.lineno} column {e.colno}: malformed JSON "
                f"({e.msg}); expected an object mapping token strings to integer ids") from None
        except RecursionError:
            raise TokenizerError(f"vocabulary file {source!r}: nested too deeply; expected an "
                                 "object mapping token strings to integer ids") from None
        except ValueError as e:
            raise TokenizerError(f"vocabulary file {source!r}: {e}") from None
        if duplicates:
            raise TokenizerError(f"vocabulary file {source!r}: token {duplicates[0]!r} appears "
                                 f"twice{_line_of(text, duplicates[0])}")
        if not isinstance(vocabulary, dict):
            raise TokenizerError(f"vocabulary file {source!r} holds a JSON "
                                 f"{type(vocabulary).__name__}; expected an object mapping token "
                                 "strings to integer ids")
    elif isinstance(vocabulary, dict):
        vocabulary = dict(vocabulary)
    else:
        # a ValueError, as KerasHub raises for a vocabulary of the wrong kind (a list, say)
        raise TokenizerError("`vocabulary` must be a path to a JSON file or a dict mapping token "
                             f"strings to integer ids; got {type(vocabulary).__name__}")
    values = list(vocabulary.values())
    fine = (all(type(t) is str and t for t in vocabulary)
            and all(type(v) is int and 0 <= v <= _MAX_ID for v in values)
            and len(set(values)) == len(values))
    if fine:
        return vocabulary
    by_id: dict[int, str] = {}
    for token, index in vocabulary.items():
        if not isinstance(token, str) or not token:
            raise TokenizerError(f"{source}: token {token!r} is not a non-empty string")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
                or not 0 <= index <= _MAX_ID:
            where = _line_of(text, token) if text is not None else ""
            raise TokenizerError(f"{source}: token {token!r}{where} has id {index!r}; expected "
                                 f"an integer in [0, {_MAX_ID}]")
        index = int(index)
        vocabulary[token] = index
        if index in by_id:
            where = _line_of(text, token) if text is not None else ""
            raise TokenizerError(f"{source}: tokens {by_id[index]!r} and {token!r}{where} share "
                                 f"id {index}; ids must be distinct")
        by_id[index] = token
    return vocabulary


def read_merges(merges) -> tuple[list[str], list[str], list[str], object]:
    """Merge rules from a ``merges.txt`` path or a list of ``"a b"`` strings / ``(a, b)`` pairs.

    Returns ``(rules, lefts, rights, where)``: the rules as ``"a b"`` strings (``#version`` lines
    and trailing blank lines dropped), their two sides, and ``where(i)``, a description of rule
    ``i``'s origin (``"'merges.txt' line 7"``) for error messages.  A rule that is not two
    non-empty tokens separated by one space raises :class:`TokenizerError` with its line number.
    """
    if isinstance(merges, (str, os.PathLike)):
        source = os.fspath(merges)
        lines = _read_file(source, "merges file").split("\n")
        if any(line.endswith("\r") for line in lines):
            lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        while lines and lines[-1] == "":
            lines.pop()

        def origin(n):
            return f"{source!r} line {n + 1}"
    elif isinstance(merges, Iterable) and not isinstance(merges, (bytes, dict)):
        lines = []
        for n, rule in enumerate(merges):
            if isinstance(rule, (tuple, list)) and len(rule) == 2 \
                    and all(isinstance(p, str) for p in rule):
                rule = f"{rule[0]} {rule[1]}"
            elif not isinstance(rule, str):
                raise InputTypeError(f"merges[{n}] is {rule!r}; expected a string 'a b' or a "
                                     "pair of strings")
            lines.append(rule)

        def origin(n):
            return f"merges[{n}]"
    else:
        raise TokenizerError("`merges` must be a path to a merges.txt file or a list of merge "
                             f"rules; got {type(merges).__name__}")
    kept = [n for n, line in enumerate(lines) if not line.startswith("#version")]
    rules = lines if len(kept) == len(lines) else [lines[n] for n in kept]
    parts = [rule.split(" ") for rule in rules]
    if not all(len(p) == 2 and p[0] and p[1] for p in parts):
        i = next(i for i, p in enumerate(parts) if not (len(p) == 2 and p[0] and p[1]))
        raise TokenizerError(f"merges {origin(kept[i])}: {rules[i]!r} is not a merge rule; "
                             "expected two tokens separated by one space")
    lefts = [p[0] for p in parts]
    rights = [p[1] for p in parts]
    return rules, lefts, rights, lambda i: origin(kept[i])


@dataclass
class BPETables:
    """Everything encoding and decoding need, derived once from a vocabulary and merges.

    ``pair_keys[r] = a << 32 | b``, ``pair_ranks[r]`` and ``pair_new[r]`` describe merge rule
    ``"a b"`` (ids), its rank and the id of ``"ab"``, in rank order.  ``byte_ids[b]`` is the id of
    the one-byte token of byte ``b``; a byte the vocabulary lacks gets the placeholder id
    ``num_ids + b`` (no merge uses it, and an encoded text that still holds it is an error).
    ``merges`` and ``id_to_bytes`` are rebuilt from the arrays when first used, which keeps a
    loaded vocabulary small.
    """

    vocabulary: dict[str, int]
    id_to_token: list  # id -> token string (None for unused ids)
    byte_ids: np.ndarray  # int32[256]
    pair_keys: np.ndarray  # int64[num_rules]: (a << 32) | b
    pair_ranks: np.ndarray  # int32[num_rules]
    pair_new: np.ndarray  # int32[num_rules]
    num_ids: int  # max id + 1
    rules: list | None = None  # the rules as read, kept only when some were duplicates
    _pair_dict: dict | None = field(default=None, repr=False)
    _id_to_bytes: list | None = field(default=None, repr=False)

    @property
    def merges(self) -> list:
        """The merge rules ``"a b"``, lowest rank first."""
        if self.rules is not None:
            return self.rules
        tokens = self.id_to_token
        a = (self.pair_keys >> 32).tolist()
        b = (self.pair_keys & 0xFFFFFFFF).tolist()
        return [f"{tokens[i]} {tokens[j]}" for i, j in zip(a, b)]

    @property
    def id_to_bytes(self) -> list:
        """id -> the bytes the token stands for (None for unused ids)."""
        if self._id_to_bytes is None:
            self._id_to_bytes = tokens_to_bytes(self.id_to_token)
        return self._id_to_bytes

    @property
    def pair_dict(self) -> dict:
        """``{(a, b): (rank, new_id)}`` for the pure-Python merge loop (built on first use)."""
        if self._pair_dict is None:
            a = (self.pair_keys >> 32).tolist()
            b = (self.pair_keys & 0xFFFFFFFF).tolist()
            self._pair_dict = dict(zip(zip(a, b), zip(self.pair_ranks.tolist(),
                                                      self.pair_new.tolist())))
        return self._pair_dict


def build_tables(vocabulary, merges) -> BPETables:
    """Read and check ``vocabulary`` and ``merges``; build :class:`BPETables`.

    Every merge ``"a b"`` must have ``a``, ``b`` and ``ab`` in the vocabulary; otherwise
    :class:`TokenizerError` names the rule and its line.
    """
    vocabulary = read_vocabulary(vocabulary)
    rules, lefts, rights, where = read_merges(merges)
    num_ids = max(vocabulary.values(), default=-1) + 1
    if num_ids > MAX_IDS:
        raise TokenizerError(f"vocabulary: the largest id is {num_ids - 1:,}; refopt's tables hold "
                             f"ids up to {MAX_IDS - 1:,} (as its models' vocabulary_size)")
    get = vocabulary.get
    ia = list(map(get, lefts))
    ib = list(map(get, rights))
    iab = list(map(get, map(operator.add, lefts, rights)))
    if None in ia or None in ib or None in iab:
        i = next(i for i in range(len(rules)) if None in (ia[i], ib[i], iab[i]))
        missing = (lefts[i] if ia[i] is None else rights[i] if ib[i] is None
                   else lefts[i] + rights[i])
        what = "produces" if ia[i] is not None and ib[i] is not None else "uses"
        raise TokenizerError(f"merges {where(i)}: rule {rules[i]!r} {what} token {missing!r}, "
                             "which is not in the vocabulary")
    n = len(rules)
    keys = (np.array(ia, dtype=np.int64).reshape(n) << 32) | np.array(ib, dtype=np.int64)
    new = np.array(iab, dtype=np.int32).reshape(n)
    # A pair listed twice keeps its last rank (encoder.py and tokenizers do the same).
    _, last = np.unique(keys[::-1], return_index=True)
    keep = np.sort(n - 1 - last)
    ranks = np.arange(n, dtype=np.int32)
    id_to_token = [None] * num_ids
    for token, index in vocabulary.items():
        id_to_token[index] = token
    symbols = byte_symbols()
    byte_ids = np.array([vocabulary.get(symbols[b], num_ids + b) for b in range(256)],
                        dtype=np.int32)
    return BPETables(vocabulary=vocabulary, id_to_token=id_to_token, byte_ids=byte_ids,
                     pair_keys=keys[keep], pair_ranks=ranks[keep], pair_new=new[keep],
                     num_ids=num_ids, rules=rules if len(keep) < n else None)


def tokens_to_bytes(tokens: list) -> list:
    """:func:`refopt.tokenizers.byte_level.token_to_bytes` of every token (None stays None),
    in bulk: one ``str.translate`` over all tokens when they are all byte-level strings."""
    present = [t for t in tokens if t is not None]
    joined = "".join(present)
    to_latin1 = {ord(c): b for c, b in unicode_to_bytes().items()}
    if joined.translate(dict.fromkeys(to_latin1)):  # some token has other characters
        return [None if t is None else token_to_bytes(t) for t in tokens]
    data = joined.translate(to_latin1).encode("latin-1")
    out, at = [], 0
    for t in tokens:
        if t is None:
            out.append(None)
        else:
            out.append(data[at:at + len(t)])
            at += len(t)
    return out


def bpe_merge(ids: list[int], pair_dict: dict) -> list[int]:
    """Merge a word's token ids: join the lowest-rank adjacent pair (leftmost first) until none.

    ``pair_dict`` maps ``(a, b)`` to ``(rank, id of "ab")``.  The reference for the compiled loop.
    """
    ids = list(ids)
    while len(ids) > 1:
        best_rank, best_at, best_new = None, -1, -1
        for i in range(len(ids) - 1):
            entry = pair_dict.get((ids[i], ids[i + 1]))
            if entry is not None and (best_rank is None or entry[0] < best_rank):
                best_rank, best_at, best_new = entry[0], i, entry[1]
        if best_rank is None:
            break
        ids[best_at:best_at + 2] = [best_new]
    return ids


def merges_text(merges: list[str]) -> str:
    """The text of a ``merges.txt``: the ``#version: 0.2`` header, then one rule per line."""
    return MERGES_HEADER + "\n" + "".join(rule + "\n" for rule in merges)


def write_vocabulary(path, vocabulary: dict[str, int], *, ensure_ascii: bool = False) -> None:
    """Write ``vocabulary`` as one JSON object (tokens in the dict's order), atomically.

    ``ensure_ascii=True`` writes ``\\uXXXX`` escapes as KerasHub's ``vocabulary.json`` does;
    ``False`` writes UTF-8 as transformers' ``vocab.json`` does.
    """
    from refopt.io.saving import write_file_atomically

    data = json.dumps(vocabulary, ensure_ascii=ensure_ascii).encode("utf-8")
    write_file_atomically(path, lambda f: f.write(data))


def write_merges(path, merges: list[str]) -> None:
    """Write ``merges.txt`` (:func:`merges_text`), atomically."""
    from refopt.io.saving import write_file_atomically

    data = merges_text(merges).encode("utf-8")
    write_file_atomically(path, lambda f: f.write(data))


WORD_CACHE_LIMIT = 1 << 17  # the pure-Python word cache is emptied beyond this many words


def encode_words(words, byte_ids: list, pair_dict: dict, cache: dict) -> list[int]:
    """Token ids of pre-tokenized ``words``: each word's bytes mapped through ``byte_ids`` and
    merged by :func:`bpe_merge`, remembered in ``cache`` (word -> ids; emptied when it holds
    :data:`WORD_CACHE_LIMIT` words)."""
    ids = []
    for word in words:
        merged = cache.get(word)
        if merged is None:
            merged = bpe_merge([byte_ids[b] for b in word.encode("utf-8")], pair_dict)
            if len(cache) >= WORD_CACHE_LIMIT:
                cache.clear()
            cache[word] = merged
        ids.extend(merged)
    return ids
