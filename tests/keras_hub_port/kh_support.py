"""What KerasHub's test cases share, without Keras: the alphabet the sampler tests decode into, and
the documented-difference marker.

A KerasHub test that refopt deliberately answers differently stays here with KerasHub's own inputs
and expected values, marked ``documented_difference(why)``: an xfail that must fail (``strict``),
so the count of documented differences is exact and a change of behaviour is noticed.  The
reasons are listed in docs/KERAS_HUB.md.
"""

import numpy as np
import pytest

# KerasHub's sampler tests: a simple alphabet of lowercase characters, ids [0, 26)
INT_LOOKUP = {i: chr(i + ord("a")) for i in range(26)}
CHAR_LOOKUP = {v: k for k, v in INT_LOOKUP.items()}
VOCAB_SIZE = len(INT_LOOKUP)


def join_as_string(x):
    return ["".join(INT_LOOKUP[int(i)] for i in row) for row in np.asarray(x)]


def ids(text):
    return np.array([[CHAR_LOOKUP[c] for c in text]])


def one_hot(index, depth):
    # keras.ops.one_hot: [B] int -> [B, depth] float32
    return np.eye(depth, dtype=np.float32)[np.asarray(index)]


def full(shape, value):
    return np.full(shape, value, dtype=np.int32)


def documented_difference(reason):
    return pytest.mark.xfail(strict=True, reason=f"documented difference: {reason}")


def opt_test_vocab(sort_specials):
    """The vocabulary and merges KerasHub's OPT tests build (opt_*_test.py ``setUp``); the
    tokenizer test sorts before adding ``<pad>``/``</s>``, the others after."""
    merges = ["Ġ a", "Ġ t", "Ġ i", "Ġ b", "a i", "p l", "n e"]
    merges += ["Ġa t", "p o", "r t", "Ġt h", "ai r", "pl a", "po rt"]
    merges += ["Ġai r", "Ġa i", "pla ne"]
    vocab = []
    for merge in merges:
        a, b = merge.split(" ")
        vocab.extend([a, b, a + b])
    if sort_specials:
        vocab += ["<pad>", "</s>"]
        vocab = sorted(set(vocab))
    else:
        vocab = sorted(set(vocab))
        vocab += ["<pad>", "</s>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def run_serialization_test(instance):
    """KerasHub's ``run_serialization_test``: ``from_config(get_config())`` gives the same config
    (as JSON) and an object with the same attributes."""
    import json

    cls = type(instance)
    cfg = instance.get_config()
    revived = cls.from_config(cfg)
    assert json.dumps(revived.get_config(), sort_keys=True) == json.dumps(cfg, sort_keys=True)
    assert set(dir(revived)) == set(dir(instance))
    return revived


def available_presets(cls):
    """The built-in presets of ``cls`` present on this machine (under ``$REFOPT_HOME``)."""
    from refopt.errors import PresetNotFoundError
    from refopt.io import presets

    found = []
    for name in cls.presets:
        try:
            presets.resolve(name)
        except PresetNotFoundError:
            continue
        found.append(name)
    return found


def require_preset(cls, name):
    if name not in available_presets(cls):
        pytest.skip(f"needs the {name} preset under $REFOPT_HOME (KerasHub's extra_large test "
                    "downloads it; this machine has no network)")


def presets_or_skip(cls):
    """KerasHub's ``test_all_presets`` loop: the presets of ``cls`` on this machine, or a skip."""
    found = available_presets(cls)
    if not found:
        pytest.skip(f"needs one of {sorted(cls.presets)} under $REFOPT_HOME (KerasHub downloads them; "
                    "this machine has no network)")
    return found
