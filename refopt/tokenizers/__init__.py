"""Byte-level BPE: GPT-2's tokenizer (encode, decode, stream, train).

* :class:`BytePairTokenizer` — KerasHub's API, byte-exact with tiktoken / ``tokenizers`` /
  transformers; a compiled (Numba) encoder with a pure-Python twin.
* :class:`IncrementalDetokenizer` — streaming decode that emits text only once its UTF-8 bytes
  are complete.
* :func:`train_bpe` — learn a byte-level vocabulary and merges from texts or files;
  :func:`save_vocabulary_and_merges` writes them as ``vocab.json`` / ``merges.txt``.
"""

from refopt.tokenizers.byte_level import (  # noqa: F401
    GPT2_SPLIT_PATTERN, bytes_to_unicode, pretokenize, unicode_to_bytes)
from refopt.tokenizers.byte_pair_tokenizer import (  # noqa: F401
    BytePairTokenizer, save_transformers_tokenizer)
from refopt.tokenizers.incremental import IncrementalDetokenizer  # noqa: F401
from refopt.tokenizers.trainer import save_vocabulary_and_merges, train_bpe  # noqa: F401

__all__ = ["BytePairTokenizer", "IncrementalDetokenizer", "train_bpe",
           "save_vocabulary_and_merges", "save_transformers_tokenizer", "GPT2_SPLIT_PATTERN",
           "bytes_to_unicode", "unicode_to_bytes", "pretokenize"]
