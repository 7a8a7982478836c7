"""Streaming detokenization: text out as soon as its UTF-8 bytes are complete.

A byte-level token can end in the middle of a character (``"🚀"`` is four bytes, often split over
two or more tokens).  Decoding tokens one by one would print replacement characters; this class
keeps the bytes of an unfinished character until the tokens that complete it arrive.

The concatenation of everything :meth:`IncrementalDetokenizer.push` and
:meth:`IncrementalDetokenizer.flush` return equals ``tokenizer.detokenize(all_ids)``: bytes that
can never become valid UTF-8 turn into U+FFFD as soon as that is certain, and an unfinished
character left at :meth:`flush` becomes U+FFFD.
"""

from __future__ import annotations

import codecs

import numpy as np


class IncrementalDetokenizer:
    """Decode a stream of token ids, emitting only complete characters.

    Args:
        tokenizer: a :class:`refopt.tokenizers.BytePairTokenizer` (or ``OPTTokenizer``).
        skip_special_tokens: drop the tokenizer's special tokens (``</s>``, ``<pad>``) instead of
            writing them out.

    Example::

        stream = IncrementalDetokenizer(tokenizer)
        for token_id in generated_ids:
            print(stream.push(token_id), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_ids = frozenset(tokenizer.special_token_ids if skip_special_tokens else ())
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id) -> str:
        """Add one id (or a sequence of ids); return the text that is now complete ("" if none)."""
        if isinstance(token_id, (list, tuple, np.ndarray)):
            return "".join([self.push(i) for i in np.asarray(token_id).reshape(-1).tolist()])
        data = self.tokenizer.id_bytes(token_id)  # checks the id
        if token_id in self.skip_ids:
            return ""
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End the stream: return what is left (an unfinished character becomes U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending_bytes(self) -> bytes:
        """Bytes held back because they do not yet form a complete character."""
        return self._decoder.getstate()[0]
