"""What a correct sampler step draws from: KerasHub's rules and transformers' rules.

:func:`sampler_distribution` gives the weights (zero outside the support) a correct port draws from
for a :class:`refopt.testing.SamplerSpec`; :func:`fragile_rows` the rows whose decision sits within
rounding of a threshold, which random sampler cases leave out.
"""

from __future__ import annotations

import numpy as np

CONVENTIONS = ("keras_hub", "transformers")


def tempered_probabilities(p, temperature):
    # p [B, V] float64 (softmax of the logits) -> softmax(log(p) / T); exact when T == 1
    if temperature == 1.0:
        return p
    with np.errstate(divide="ignore"):
        scores = np.log(p) / temperature                                       # -inf where p == 0
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def sampler_distribution(spec, probabilities, convention: str = "keras_hub", backend: str = "numpy",
                         tie_kept: bool = False):
    """The weights ``[B, V]`` (float64, zero outside the support) a correct port draws from.

    ``probabilities [B, V]``: the model's softmax before temperature.  Conventions:

    ``"keras_hub"`` (refopt's samplers, KerasHub's): ``q = softmax(log p / T)``; greedy is the
    first arg-max; top-k keeps exactly ``k`` tokens (ties to the lower id); top-p sorts ``q``
    (largest first, ties by lower id), keeps at most ``k``, and keeps every token whose *preceding*
    sum (of the un-renormalised ``q``) is ``<= p`` -- at least the first, so ``p = 0`` is the arg-max.

    ``"transformers"`` (``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``):
    scores ``log p / T``; top-k keeps every score ``>=`` the k-th largest (ties at the k-th are
    all kept); top-p renormalises what top-k kept, sorts ascending, removes tokens whose ascending
    cumulative probability is ``<= 1 - p`` but never the most probable, so a token is kept when the
    mass *before* it (largest first) is ``< p``.

    The two agree except at exact ties: a cumulative sum equal to ``p`` (keras_hub keeps one token
    more), equal probabilities at the k-th place, and top-k followed by top-p (keras_hub does not
    renormalise in between).

    ``tie_kept`` (transformers only): keep the token whose preceding mass equals ``p`` exactly.
    transformers applies its rule to ``softmax(log p)``, whose rounding decides such a tie either
    way (float32 keeps ``[.5, .25, .125, .125]`` exact at ``p = .75``, float64 does not), so the tie
    checks accept both outcomes for that convention."""
    from refopt import backend as _backend
    from refopt.samplers.sampler import one_hot_argmax

    if convention not in CONVENTIONS:
        raise ValueError(f"sampler convention {convention!r}: expected one of {CONVENTIONS}")
    p = np.asarray(probabilities, np.float64)
    name, k, top_p, T = spec.name, spec.k, spec.p, float(spec.temperature)
    if name not in ("greedy", "random", "top_k", "top_p"):
        raise ValueError(f"sampler {name!r}: the oracle checks greedy, random, top_k and top_p")
    if convention == "keras_hub":
        ops = _backend.ops(backend)
        q = tempered_probabilities(p, T)
        if name == "greedy":
            return one_hot_argmax(q)
        if name == "random":
            return q
        if name == "top_k":
            return np.where(ops.top_k_mask(q, int(k)), q, 0.0)
        return ops.top_p_distribution(q, float(top_p), None if k is None else int(k))
    # transformers works on scores log(p) / T; the same rule in probability space, which keeps
    # exact ties exact (softmax(log p) == p in exact arithmetic, not always after rounding)
    q = tempered_probabilities(p, T)                                          # [B, V]
    if name == "greedy":
        return one_hot_argmax(q)
    V = q.shape[-1]
    if k is not None and name in ("top_k", "top_p"):
        kk = min(max(int(k), 1), V)
        kth = -np.sort(-q, axis=-1)[:, kk - 1:kk]                              # [B, 1]
        q = np.where(q >= kth, q, 0.0)                                         # ties at the k-th kept
    q = q / q.sum(axis=-1, keepdims=True)                                      # renormalised
    if name == "top_p":
        order = np.argsort(q, axis=-1, kind="stable")                         # ascending
        s = np.take_along_axis(q, order, axis=-1)
        cumulative = np.cumsum(s, axis=-1)
        remove = (cumulative < 1.0 - float(top_p)) if tie_kept else (cumulative <= 1.0 - float(top_p))
        remove[:, -1] = False                                                  # min_tokens_to_keep=1
        np.put_along_axis(q, order, np.where(remove, 0.0, s), axis=-1)
        q = q / q.sum(axis=-1, keepdims=True)
    return q


def fragile_rows(spec, probabilities, convention: str = "keras_hub", margin: float = 1e-6):
    """``[B]`` bool: rows whose filtering decision lies within ``margin`` of a threshold (a near-tie
    for the arg-max or the k-th place, a cumulative sum within ``margin`` of ``p``).  Rounding in a
    correct float32 port may decide those either way, so random test cases leave them out; the
    exact-tie cases are built on purpose and always judged."""
    p = tempered_probabilities(np.asarray(probabilities, np.float64), float(spec.temperature))
    srt = -np.sort(-p, axis=-1)                                                # [B, V] largest first
    B, V = p.shape
    fragile = np.zeros(B, bool)
    if spec.name == "greedy" and V > 1:
        fragile |= (srt[:, 0] - srt[:, 1]) <= margin * srt[:, 0]
    k = spec.k if spec.name in ("top_k", "top_p") else None
    if k is not None and k < V:
        fragile |= (srt[:, k - 1] - srt[:, k]) <= margin * srt[:, 0]
    if spec.name == "top_p":
        kept = srt[:, :k] if k is not None else srt
        if convention == "transformers" and k is not None:
            kept = kept / kept.sum(axis=-1, keepdims=True)
        before = (np.cumsum(kept, axis=-1) - kept)[:, 1:]      # the first token is always kept
        fragile |= (np.abs(before - spec.p) <= margin).any(axis=-1)
    return fragile
