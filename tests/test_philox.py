"""refopt.philox: Philox-4x32-10 against Random123's known answers, the (row's seed, step) keying,
the 53-bit uniforms and the documented selection rule."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refopt import philox
from refopt.errors import SamplerError

# Random123 kat_vectors: name rounds counter[4] key[2] -> output[4]
KAT = """
philox4x32 7 00000000 00000000 00000000 00000000 00000000 00000000 5f6fb709 0d893f64 4f121f81 4f730a48
philox4x32 7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 5207ddc2 45165e59 4d8ee751 8c52f662
philox4x32 7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 4dfccaba 190a87f0 c47362ba b6b5242a
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000 6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 d16cfe09 94fdcceb 5001e420 24126ea1
"""


def _kat():
    for line in KAT.strip().splitlines():
        name, rounds, *words = line.split()
        words = [int(w, 16) for w in words]
        yield int(rounds), words[:4], words[4:6], words[6:]


@pytest.mark.parametrize("rounds,counter,key,expected", list(_kat()))
def test_philox4x32_known_answers(rounds, counter, key, expected):
    out = philox.philox4x32(counter, key, rounds=rounds)
    assert [int(x) for x in out] == expected


def philox_python(counter, key, rounds, width):
    """Scalar Philox-4xW from the published description (Python integers), W = 32 or 64."""
    mask = (1 << width) - 1
    if width == 32:
        m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    else:
        m0, m1, w0, w1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157, 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
    c, k = list(counter), list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + w0) & mask, (k[1] + w1) & mask]
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> width) ^ c[1] ^ k[0], p1 & mask, (p0 >> width) ^ c[3] ^ k[1], p0 & mask]
    return c


def test_scalar_reference_matches_numpy_philox4x64():
    # The scalar reference (shared round structure and key schedule) agrees with NumPy's
    # independent Philox-4x64-10, which increments its 256-bit counter before each block.
    for key, counter in [(5, 0), (2**100 + 12345, 7), (2**128 - 1, 2**64 + 3)]:
        bg = np.random.Philox(key=key, counter=counter)
        got = [int(x) for x in bg.random_raw(8)]
        for block in range(2):
            c = counter + 1 + block
            words = [(c >> (64 * i)) & (2**64 - 1) for i in range(4)]
            kw = [key & (2**64 - 1), key >> 64]
            assert philox_python(words, kw, 10, 64) == got[4 * block:4 * block + 4]


def test_scalar_reference_matches_known_answers():
    for rounds, counter, key, expected in _kat():
        assert philox_python(counter, key, rounds, 32) == expected


def test_vectorised_matches_scalar_reference():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64).astype(np.uint32)
    keys = rng.integers(0, 2**32, size=(64, 2), dtype=np.uint64).astype(np.uint32)
    out = philox.philox4x32(counters, keys)
    for i in range(64):
        assert [int(x) for x in out[i]] == philox_python([int(x) for x in counters[i]],
                                                         [int(x) for x in keys[i]], 10, 32)


def test_uniform_layout_and_construction():
    seeds = [0x0123456789ABCDEF, 5, 2**64 - 1]
    u = philox.uniform(seeds, step=17, stream=philox.STREAM_TOKEN)
    for r, seed in enumerate(seeds):
        words = philox_python([17, 0, 0, 0], [seed & 0xFFFFFFFF, seed >> 32], 10, 32)
        expected = ((words[0] >> 5) * 2**26 + (words[1] >> 6)) / 2**53
        assert u[r] == expected
    # a row's number depends on its seed only: not on which rows are drawn with it, nor where
    assert philox.uniform([seeds[2]], 17)[0] == u[2]
    assert philox.uniform([seeds[2], seeds[0]], 17)[0] == u[2]
    assert philox.uniform(seeds[0], 17) == u[0]                     # a scalar seed, a scalar
    # streams, steps and seeds all change the number
    assert philox.uniform(seeds[:1], 17, philox.STREAM_ACCEPT)[0] != u[0]
    assert philox.uniform(seeds[:1], 18)[0] != u[0]
    assert philox.uniform([seeds[0] + 1], 17)[0] != u[0]


def test_uniforms_are_uniform():
    u = philox.uniform(np.arange(20000, dtype=np.uint64), step=3)     # 20000 seeds, one step
    assert ((u >= 0) & (u < 1)).all()
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    chi2 = ((counts - 1000.0) ** 2 / 1000.0).sum()
    assert chi2 < chi2_critical(19)
    v = philox.uniform(np.full(20000, 42, np.uint64), step=np.arange(20000))   # one seed, 20000 steps
    counts = np.histogram(v, bins=20, range=(0, 1))[0]
    assert ((counts - 1000.0) ** 2 / 1000.0).sum() < chi2_critical(19)


def test_row_seeds():
    assert philox.row_seeds(7, 3).tolist() == [7, 7, 7]
    assert philox.row_seeds([1, 2**64 - 1], 2).tolist() == [1, 2**64 - 1]
    fresh = philox.row_seeds(None, 4)
    assert fresh.dtype == np.uint64 and len(set(fresh.tolist())) == 4      # 64 random bits each
    mixed = philox.row_seeds((5, None), 2)
    assert mixed[0] == 5
    for bad, match in (([1, 2, 3], "3 seeds for a batch of 2"), ([1, -1], "seed=-1"), ("x", "seed="),
                       (True, "seed=True"), ([1.5, 2], "seed=1.5")):
        with pytest.raises(SamplerError, match=match):
            philox.row_seeds(bad, 2)
    assert philox.check_seeds([3, None]) == (3, None) and philox.check_seeds(4) == 4


def chi2_critical(df, z=3.09):
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def choose_reference(w, u):
    """The documented rule, one row, written out with Python floats."""
    c, total = [], 0.0
    for x in w:
        total += float(x)
        c.append(total)
    t = u * total
    for i, ci in enumerate(c):
        if ci > t:
            return i
    return max(i for i, x in enumerate(w) if x > 0)


@settings(max_examples=60)
@given(st.lists(st.sampled_from([0.0, 0.0, 1e-9, 0.1, 0.25, 0.5, 1.0, 3.0]), min_size=1, max_size=12)
       .filter(lambda w: sum(w) > 0),
       st.floats(0, 1, exclude_max=True))
def test_choose_follows_the_documented_rule(w, u):
    got = philox.choose(np.array([w]), np.array([u]))[0]
    assert got == choose_reference(w, u)
    assert w[got] > 0


def test_choose_edges():
    w = np.array([[0.0, 0.5, 0.0, 0.5, 0.0]])
    assert philox.choose(w, [0.0])[0] == 1
    assert philox.choose(w, [0.5])[0] == 3               # c = [0, .5, .5, 1, 1]; first c > .5
    assert philox.choose(w, [1 - 2**-53])[0] == 3
    with pytest.raises(SamplerError, match="row 0"):
        philox.choose(np.zeros((1, 3)), [0.3])
    with pytest.raises(SamplerError, match="NaN"):
        philox.choose(np.array([[np.nan, 1.0]]), [0.3])


def test_choose_frequencies():
    p = np.array([0.5, 0.0, 0.2, 0.25, 0.05])
    n = 20000
    tokens = philox.choose(np.tile(p, (n, 1)), philox.uniform(np.arange(n, dtype=np.uint64), 0))
    counts = np.bincount(tokens, minlength=5)
    assert counts[1] == 0
    support = p > 0
    expected = n * p[support]
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    assert chi2 < chi2_critical(support.sum() - 1)


def test_seeds():
    assert philox.check_seed(None) is None
    assert philox.check_seed(2**64 - 1) == 2**64 - 1
    for bad in (-1, 2**64, 1.5, "3", True):
        with pytest.raises(SamplerError, match="seed"):
            philox.check_seed(bad)
    s = philox.draw_seed()
    assert 0 <= s < 2**64
    assert list(philox.seed_to_key(0x0123456789ABCDEF)) == [0x89ABCDEF, 0x01234567]
