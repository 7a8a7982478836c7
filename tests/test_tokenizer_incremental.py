"""IncrementalDetokenizer: streaming text that waits for complete UTF-8 characters."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refopt.errors import InputTypeError, TokenizerError
from refopt.tokenizers import IncrementalDetokenizer
from test_tokenizer import opt, texts


def stream(tokenizer, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


@settings(max_examples=200)
@given(texts)
def test_stream_of_valid_text_is_the_text(text):
    tokenizer = opt()
    ids = tokenizer(text)
    pieces, tail = stream(tokenizer, ids)
    assert "".join(pieces) + tail == text
    assert tail == ""
    if "\ufffd" not in text:  # never a replacement character for valid text
        assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=300)
@given(st.lists(st.integers(0, 50264), max_size=15))
def test_stream_equals_detokenize_for_any_ids(ids):
    # arbitrary ids may split or corrupt characters: same U+FFFD placement as detokenize
    tokenizer = opt()
    pieces, tail = stream(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.detokenize(ids)


def test_holds_back_incomplete_characters():
    tokenizer = opt()
    ids = tokenizer("🚀!")
    assert len(ids) >= 3  # the rocket's four bytes span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.push(i) for i in ids]
    assert out[0] == ""
    assert "".join(out) == "🚀!"
    first = IncrementalDetokenizer(tokenizer)
    assert first.push(ids[0]) == ""
    assert len(first.pending_bytes) > 0
    assert first.flush() == "\ufffd"  # an unfinished character at the end
    assert first.push(tokenizer("a")[0]) == "a"  # flush starts a new stream


def test_push_sequences_and_special_tokens():
    tokenizer = opt()
    ids = [2] + tokenizer("Hello world") + [1]
    assert IncrementalDetokenizer(tokenizer).push(ids) == "</s>Hello world<pad>"
    quiet = tokenizer.incremental_detokenizer(skip_special_tokens=True)
    assert quiet.push(np.array(ids)) == "Hello world"


def test_bad_ids():
    detok = IncrementalDetokenizer(opt())
    with pytest.raises(TokenizerError, match="50265"):
        detok.push(50265)
    with pytest.raises(TokenizerError):
        detok.push(-1)
    with pytest.raises(InputTypeError):
        detok.push(1.5)
    with pytest.raises(InputTypeError):
        detok.push(True)
