"""What a tokenizer accepts, checked and put in one shape: texts to encode, ids to decode.

:func:`texts_of` and :func:`ids_of` turn what a caller passes to ``tokenize`` / ``detokenize``
(one item, a list, a nested list, a NumPy array) into a list plus whether it was a batch, and
raise :class:`~refopt.errors.InputTypeError` naming the offending item for anything else.
:func:`split_segments` cuts texts around the tokens that are never split; :func:`is_strings`
says whether a model's input is text for its preprocessor.
"""

from __future__ import annotations

import functools

import numpy as np

from refopt.errors import InputTypeError


def texts_of(inputs):
    """(list of str, batched?) from a str, a list/tuple of str or a NumPy array of str."""
    if isinstance(inputs, str):
        return [inputs], False
    if isinstance(inputs, np.ndarray):
        if inputs.dtype.kind not in "UO" or inputs.ndim > 1:
            raise InputTypeError("tokenize() takes a string, a list of strings or a 0-/1-D "
                                 f"array of strings; got an array of dtype {inputs.dtype} and "
                                 f"shape {inputs.shape}")
        if inputs.ndim == 0:
            return texts_of(inputs.item())
        inputs = inputs.tolist()
    if isinstance(inputs, (list, tuple)):
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise InputTypeError(f"tokenize() input {i} is a {type(text).__name__}; "
                                     "expected a string")
        return [str(t) for t in inputs], True
    raise InputTypeError(f"tokenize() takes a string or a list of strings; got "
                         f"{type(inputs).__name__}")


def _as_id_array(seq, where):
    array = np.asarray(seq)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu" or array.dtype == np.bool_:
        raise InputTypeError(f"detokenize() {where} holds {array.dtype} values; expected "
                             "integer token ids")
    return array.astype(np.int64, copy=False)


def ids_of(inputs):
    """(list of 1-D int64 arrays, batched?) from an int, a (nested) list or an array."""
    if isinstance(inputs, bool):
        raise InputTypeError("detokenize() got a bool; expected integer token ids")
    if isinstance(inputs, (int, np.integer)):
        return [np.array([inputs], dtype=np.int64)], False
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 0:
            return [_as_id_array(inputs.reshape(1), "input")], False
        if inputs.ndim == 1:
            return [_as_id_array(inputs, "input")], False
        if inputs.ndim == 2:
            return [_as_id_array(row, f"row {i}") for i, row in enumerate(inputs)], True
        raise InputTypeError(f"detokenize() takes 0-, 1- or 2-D ids; got shape {inputs.shape}")
    if isinstance(inputs, (list, tuple)):
        if not inputs or not isinstance(inputs[0], (list, tuple, np.ndarray)):
            for i, x in enumerate(inputs):
                if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                    raise InputTypeError(f"detokenize() input {i} is {x!r}; expected an integer "
                                         "token id")
            return [np.asarray(inputs, dtype=np.int64)], False
        seqs = []
        for i, row in enumerate(inputs):
            if not isinstance(row, (list, tuple, np.ndarray)):
                raise InputTypeError(f"detokenize() row {i} is {type(row).__name__}; expected a "
                                     "sequence of integer token ids")
            if isinstance(row, (list, tuple)):
                for j, x in enumerate(row):
                    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                        raise InputTypeError(f"detokenize() row {i} item {j} is {x!r}; expected "
                                             "an integer token id")
            seqs.append(_as_id_array(row, f"row {i}"))
        return seqs, True
    raise InputTypeError(f"detokenize() takes integer ids (an int, a list, a list of lists or an "
                         f"array); got {type(inputs).__name__}")


@functools.lru_cache(maxsize=16)
def _unsplittable_pattern(tokens: tuple):
    import regex
    ordered = sorted(tokens, key=len, reverse=True)  # longest first at one position
    return regex.compile("|".join(regex.escape(t) for t in ordered))


def split_segments(texts: list, tokens: list, add_prefix_space: bool, vocabulary: dict):
    """Split texts around the unsplittable ``tokens`` and apply ``add_prefix_space``.

    Returns ``(segments, plans)``: the pieces of plain text to encode and, per input text, a
    list whose items are either an index into ``segments`` or ``("id", token_id)``.  ``None``
    plans mean "the text is segment i" (the common case, kept cheap).
    """
    present = bool(tokens) and any(t in text for text in texts for t in tokens)
    if not present and not add_prefix_space:
        return texts, None
    split = _unsplittable_pattern(tuple(tokens)) if present else None
    segments, plans = [], []
    for text in texts:
        plan = []
        pieces = split.splititer(text) if present else [text]
        matches = split.finditer(text) if present else iter(())
        for piece in pieces:
            if piece:
                if add_prefix_space and not piece.startswith(" "):
                    piece = " " + piece
                plan.append(len(segments))
                segments.append(piece)
            match = next(matches, None)
            if match is not None:
                plan.append(("id", vocabulary[match.group()]))
        plans.append(plan)
    return segments, plans


def is_strings(x, arrays: bool = True) -> bool:
    """Whether ``x`` is text for a preprocessor: a string, a non-empty list or tuple of strings,
    or (with ``arrays``) a NumPy array of strings.  ``generate`` takes the first two (``arrays=False``),
    ``fit`` / ``evaluate`` / ``predict`` all three."""
    if isinstance(x, str):
        return True
    if arrays and isinstance(x, np.ndarray):
        return x.dtype.kind in "US" or (x.dtype == object and x.size > 0 and isinstance(x.flat[0], str))
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(s, str) for s in x)
