"""Byte-level pre-tokenization as GPT-2 defines it (OpenAI's ``encoder.py``, tiktoken, HF).

Two steps turn text into the "words" that byte-pair merging works on:

1. **Split** the text with GPT-2's pattern (:data:`GPT2_SPLIT_PATTERN`)::

       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

   contractions (lower case only), then a run of letters, digits or "other" characters with at
   most one leading ASCII space, then whitespace: a whitespace run keeps its last character for
   the next word (``"  x"`` -> ``" "``, ``" x"``) unless it ends the text.
2. **Map bytes to characters**: each word is UTF-8 encoded and every byte becomes one printable
   character (:func:`bytes_to_unicode`: ``" "`` -> ``"Ġ"``, ``"\\n"`` -> ``"Ċ"``), so vocabulary
   entries are plain strings and every byte sequence is representable.

:func:`pretokenize` is the readable reference (the ``regex`` module with the pattern above).  The
compiled encoder in :mod:`refopt.tokenizers._kernels` re-implements the same split as a scanner
over a character-class table built from the very same ``regex`` module (:func:`char_class_table`),
so both paths agree on every code point; tests check both against tiktoken and ``tokenizers``.
"""

from __future__ import annotations

import functools

import numpy as np
import regex

#: GPT-2's pre-tokenization pattern (OpenAI ``encoder.py``; tiktoken's ``r50k_base``).
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

# Character classes of the compiled scanner (values of :func:`char_class_table`).
OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3


@functools.lru_cache(maxsize=None)
def _split_regex():
    return regex.compile(GPT2_SPLIT_PATTERN)


def pretokenize(text: str) -> list[str]:
    """Split ``text`` into GPT-2 pre-tokens (the reference: ``regex.findall`` with the pattern)."""
    return _split_regex().findall(text)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table (256 entries).

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves; the other
    68 bytes (controls, space, DEL, NBSP, soft hyphen) map, in byte order, to ``chr(256)``,
    ``chr(257)``, ... so that no token contains whitespace or control characters.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@functools.lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`: character -> byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


@functools.lru_cache(maxsize=None)
def byte_symbols() -> tuple[str, ...]:
    """``byte_symbols()[b]`` is the one-character symbol of byte ``b``."""
    table = bytes_to_unicode()
    return tuple(table[b] for b in range(256))


def token_to_bytes(token: str) -> bytes:
    """The bytes a vocabulary entry stands for.

    A token whose characters all lie in :func:`bytes_to_unicode`'s image maps back character by
    character; that covers special tokens made of printable ASCII such as ``"</s>"``, because
    printable ASCII maps to itself.  Any other token is taken as its own UTF-8 text, as the
    ``tokenizers`` ByteLevel decoder does.
    """
    table = unicode_to_bytes()
    try:
        return bytes([table[c] for c in token])
    except KeyError:
        return token.encode("utf-8")


@functools.lru_cache(maxsize=None)
def char_class_table() -> tuple[np.ndarray, np.ndarray]:
    """Class of every code point for the compiled scanner, as a two-level table.

    Returns ``(index, blocks)``: the class of code point ``c`` is
    ``blocks[index[c >> 8], c & 255]``, one of :data:`OTHER`, :data:`LETTER`, :data:`NUMBER`,
    :data:`SPACE`.  The classes come from the ``regex`` module itself (``\\p{L}``, ``\\p{N}``,
    ``\\s``), in the priority GPT-2's pattern gives them, so the scanner and :func:`pretokenize`
    classify every code point alike.  Built once per process (about 0.2 s), 40 KB.
    """
    codepoints = np.arange(0x110000, dtype=np.uint32)
    codepoints = codepoints[(codepoints < 0xD800) | (codepoints >= 0xE000)]  # no surrogates
    text = codepoints.astype("<u4").tobytes().decode("utf-32-le")
    flat = np.full(0x110000, OTHER, dtype=np.uint8)
    # Later assignments win: letters outrank digits outrank whitespace, as in the pattern.
    for cls, pattern in ((SPACE, r"\s+"), (NUMBER, r"\p{N}+"), (LETTER, r"\p{L}+")):
        for m in regex.finditer(pattern, text):
            flat[codepoints[m.start():m.end()]] = cls
    rows = flat.reshape(0x1100, 256)
    seen: dict[bytes, int] = {}
    index = np.empty(0x1100, dtype=np.uint16)
    for i, row in enumerate(rows):
        index[i] = seen.setdefault(row.tobytes(), len(seen))
    blocks = np.frombuffer(b"".join(seen), dtype=np.uint8).reshape(len(seen), 256).copy()
    return index, blocks
