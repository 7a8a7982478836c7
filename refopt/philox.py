"""Counter-based random numbers for samplers: Philox-4x32-10, keyed by (a row's seed, step).

Why counter-based
-----------------
A sampler's choice must depend only on the row's seed, the position being decided and the
probabilities -- not on how many numbers were drawn before, how big the batch is, where in the
batch the row sits, or which backend (NumPy, Numba, CUDA) runs the loop.  A counter-based generator
gives that directly: the random bits for one decision are a pure function ``philox(counter, key)``,
so any backend can compute the bits of one row at position 17 without computing anything else.

Per-request seeds (as vLLM's ``SamplingParams.seed``): every row of a batch has its own seed.  A
sampler's ``seed=s`` gives every row the seed ``s``; ``generate(..., seed=[s0, s1, ...])`` gives
one per row; rows without a seed get a fresh one each (:func:`row_seeds`).  The guarantee: the
uniforms of a row are a function of its seed and the position only -- not of its index in the
batch, nor of the other rows -- so a row's tokens are a function of its prompt and its seed
wherever its probabilities are the same.  The model computes a row's probabilities from that row
alone; other rows change them only by rounding (whether a prompt token goes through the prefill or
the one-token decode depends on the batch's shortest prompt, and the prefill's path on the batch's
size: on the Numba backend the compiled step up to 32 rows of batch times prompt (256 for int8,
bfloat16 and float16 weights), op by op beyond, float32 products of more than 16 rows on BLAS),
and a rounding difference changes a draw only when the uniform lies within it of
a boundary ``c[i]`` of the selection rule below.

Philox-4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11;
the Random123 library)
---------------------------------------------------------------------------------------------
State: a counter of four 32-bit words ``(c0, c1, c2, c3)`` and a key of two ``(k0, k1)``.  One round::

    hi0, lo0 = mulhilo32(0xD2511F53, c0)          # the 64-bit product split into two words
    hi1, lo1 = mulhilo32(0xCD9E8D57, c2)
    (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

and between rounds the key is bumped by the Weyl constants ``k0 += 0x9E3779B9``,
``k1 += 0xBB67AE85`` (mod 2**32).  Ten rounds (nine bumps) give the four output words.  The
implementation is checked against Random123's published known-answer vectors (``kat_vectors``).

How refopt keys it
------------------
================  ===========================================================================
key               ``(seed mod 2**32, seed >> 32)`` for the row's seed ``0 <= seed < 2**64``
counter word c0   the step: the absolute index in the sequence of the token being decided
counter word c1   0 for a sampler's draw (the row is identified by its key, never by its index in
                  the batch); the element's index for the cuda training's dropout masks
counter word c2   the stream (:data:`STREAM_TOKEN` for an ordinary sampled token; speculative
                  decoding uses :data:`STREAM_DRAFT`, :data:`STREAM_ACCEPT`, :data:`STREAM_RESIDUAL`)
counter word c3   0
================  ===========================================================================

Uniform float
-------------
From the output words ``(x0, x1, ...)``, ``u = ((x0 >> 5) * 2**26 + (x1 >> 6)) / 2**53``: the 53-bit
construction, exact in float64, uniform on ``[0, 1)`` in steps of ``2**-53``.

Choosing a token (the selection rule every backend reproduces)
--------------------------------------------------------------
:func:`choose` takes non-negative weights ``w[0..V-1]`` in **token-id order** (a sampler's filtered
distribution: zero outside its support; they need not sum to one) and one ``u``::

    c[i] = w[0] + w[1] + ... + w[i]     accumulated left to right in float64
    t    = u * c[V-1]                   (float64)
    token = the smallest i with c[i] > t;  if rounding leaves none, the largest i with w[i] > 0

The accumulation order is part of the rule: a kernel must add sequentially in float64 from token 0
upwards.  The chosen token always has ``w[i] > 0``.  Given bit-identical weights every backend makes
the same choice; weights that differ by a rounding error change the choice only when ``t`` falls
within that error of a boundary ``c[i]``.
"""

from __future__ import annotations

import os

import numpy as np

from refopt.errors import SamplerError

# Philox-4x32 constants (Random123).
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint32(0x9E3779B9)
PHILOX_W1 = np.uint32(0xBB67AE85)

STREAM_TOKEN = 0      # the token a sampler draws at a position
STREAM_DRAFT = 1      # speculative decoding: the draft model's proposal at a position
STREAM_ACCEPT = 2     # speculative decoding: the accept / reject coin at a position
STREAM_RESIDUAL = 3   # speculative decoding: the replacement drawn after a rejection

_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter, key, rounds: int = 10) -> np.ndarray:
    """Philox-4x32-``rounds`` of ``counter [..., 4]`` under ``key [..., 2]`` -> ``[..., 4]`` uint32.

    Vectorised: ``counter`` and ``key`` broadcast against each other over their leading axes."""
    counter = np.asarray(counter, dtype=np.uint32)
    key = np.asarray(key, dtype=np.uint32)
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(f"philox4x32: counter [..., 4] and key [..., 2] expected, got "
                         f"{counter.shape} and {key.shape}")
    shape = np.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    c0, c1, c2, c3 = (np.broadcast_to(counter[..., i], shape).astype(np.uint32) for i in range(4))
    k0, k1 = (np.broadcast_to(key[..., i], shape).astype(np.uint32) for i in range(2))
    with np.errstate(over="ignore"):
        for r in range(rounds):
            if r:                                                   # bump the key between rounds
                k0 = k0 + PHILOX_W0
                k1 = k1 + PHILOX_W1
            p0 = PHILOX_M0 * c0.astype(np.uint64)                   # 64-bit products
            p1 = PHILOX_M1 * c2.astype(np.uint64)
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), (p0 & _MASK32).astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), (p1 & _MASK32).astype(np.uint32)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=-1)


# ---------------------------------------------------------------------------------- seeds
def check_seed(seed, name: str = "seed"):
    """``None`` or an integer in ``[0, 2**64)``; anything else raises SamplerError."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise SamplerError(f"{name}={seed!r}: expected None or an integer in [0, 2**64)")
    seed = int(seed)
    if not 0 <= seed < 2 ** 64:
        raise SamplerError(f"{name}={seed}: expected an integer in [0, 2**64)")
    return seed


def check_seeds(seed, name: str = "seed"):
    """A seed argument: None, an integer in ``[0, 2**64)`` (every row), or a list of them (one per
    row; None entries draw fresh seeds) -> None, an int or a tuple; anything else raises
    SamplerError."""
    if isinstance(seed, (list, tuple, np.ndarray)):
        return tuple(check_seed(s, name) for s in np.asarray(seed, dtype=object).reshape(-1))
    return check_seed(seed, name)


def draw_seed() -> int:
    """A fresh seed in ``[0, 2**64)`` from the operating system (``os.urandom``)."""
    return int.from_bytes(os.urandom(8), "little")


def seed_to_key(seed: int) -> np.ndarray:
    """The Philox key ``[k0, k1]`` of a 64-bit seed (low word first)."""
    seed = check_seed(seed)
    return np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)


def as_seeds(seeds) -> np.ndarray:
    """Integers in ``[0, 2**64)`` -> a uint64 array of the same shape (checked, never wrapped)."""
    if isinstance(seeds, np.ndarray) and seeds.dtype == np.uint64:
        return seeds
    flat = [check_seed(s) for s in np.asarray(seeds, dtype=object).reshape(-1)]
    if any(s is None for s in flat):
        raise SamplerError("uniform: every row needs a seed (None given)")
    return np.array(flat, dtype=np.uint64).reshape(np.shape(seeds))


def row_seeds(seed, batch: int, name: str = "seed") -> np.ndarray:
    """The seeds of the ``batch`` rows of one generation (uint64 ``[batch]``): ``seed`` an integer
    -> every row has it; a sequence of ``batch`` integers (or None) -> one per row; None (or a None
    entry) -> a fresh seed from :func:`draw_seed` for that row."""
    if seed is None or isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        per_row = [seed] * batch
    elif isinstance(seed, (list, tuple, np.ndarray)):
        per_row = list(np.asarray(seed, dtype=object).reshape(-1)) if isinstance(seed, np.ndarray) else list(seed)
        if len(per_row) != batch:
            raise SamplerError(f"{name}: {len(per_row)} seeds for a batch of {batch} rows; give one "
                               "seed per prompt, or a single integer for all of them")
    else:
        raise SamplerError(f"{name}={seed!r}: expected None, an integer in [0, 2**64) or a list of "
                           "them (one per prompt)")
    seeds = [check_seed(s, name) for s in per_row]
    return np.array([draw_seed() if s is None else s for s in seeds], dtype=np.uint64)


# ---------------------------------------------------------------------------------- uniforms
def bits_to_uniform(x0, x1) -> np.ndarray:
    """Two uint32 words -> float64 in ``[0, 1)`` with 53 random bits."""
    hi = (np.asarray(x0, np.uint32) >> np.uint32(5)).astype(np.float64)    # 27 bits
    lo = (np.asarray(x1, np.uint32) >> np.uint32(6)).astype(np.float64)    # 26 bits
    return (hi * 67108864.0 + lo) / 9007199254740992.0                      # (hi * 2**26 + lo) / 2**53


def uniform(seeds, step, stream: int = STREAM_TOKEN, index=0) -> np.ndarray:
    """Uniform floats in ``[0, 1)``, one per seed: ``seeds [...]`` (each row's seed, integers in
    ``[0, 2**64)``) at ``step`` (broadcast against ``seeds``).

    Counter ``(step, index, stream, 0)``, key from the row's seed: the value for one (seed, step,
    stream, index) is the same whatever else is drawn.  Samplers leave ``index`` at 0 (see the
    module docstring); a stream of many numbers under one seed (the cuda backend's dropout masks:
    one per element) numbers them with ``index`` (broadcast too)."""
    seeds = as_seeds(seeds)
    step = np.asarray(step, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    for name, v in (("steps", step), ("indices", index)):
        if (v < 0).any() or (v >= 2 ** 32).any():
            raise SamplerError(f"uniform: {name} must lie in [0, 2**32)")
    seeds, step, index = np.broadcast_arrays(seeds, step, index)
    counter = np.stack([step.astype(np.uint32), index.astype(np.uint32),
                        np.full(seeds.shape, stream, np.uint32), np.zeros(seeds.shape, np.uint32)],
                       axis=-1)                                               # [..., 4]
    key = np.stack([(seeds & _MASK32).astype(np.uint32), (seeds >> np.uint64(32)).astype(np.uint32)],
                   axis=-1)                                                   # [..., 2]
    out = philox4x32(counter, key)                                            # [..., 4]
    return bits_to_uniform(out[..., 0], out[..., 1])


# ---------------------------------------------------------------------------------- selection
def choose(weights, u) -> np.ndarray:
    """The selection rule (module docstring): ``weights [B, V] >= 0`` in token-id order and
    ``u [B]`` in [0, 1) -> token ids ``[B]``, each with a positive weight."""
    w = np.asarray(weights, dtype=np.float64)                                 # [B, V]
    u = np.asarray(u, dtype=np.float64)                                       # [B]
    c = np.cumsum(w, axis=-1)                                                 # sequential, float64
    total = c[:, -1]                                                          # [B]
    bad = ~(np.isfinite(total) & (total > 0)) | (w < 0).any(axis=-1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SamplerError(f"cannot sample row {row}: its weights must be finite, non-negative and "
                           f"not all zero (sum {total[row]!r}); are the logits NaN?")
    t = u * total                                                             # [B]
    idx = (c <= t[:, None]).sum(axis=-1)                                      # first i with c[i] > t
    last_positive = w.shape[-1] - 1 - np.argmax((w > 0)[:, ::-1], axis=-1)    # [B]
    return np.where(idx < w.shape[-1], idx, last_positive).astype(np.int64)
