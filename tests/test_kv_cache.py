"""A prefill followed by one-token steps gives the logits of one full forward."""

import numpy as np
from hypothesis import given, settings, strategies as st

from refopt.model import init_params, logits_forward, new_cache
from tests_support import random_config


def configs():
    return random_config()


@settings(max_examples=60)
@given(cfg=configs(), data=st.data())
def test_prefill_then_steps_equals_full_forward(cfg, data):
    B = data.draw(st.integers(1, 3))
    T = data.draw(st.integers(2, 12))
    prefill = data.draw(st.integers(1, T - 1))
    left_pad = data.draw(st.booleans())
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    cols = np.arange(T)
    mask = np.stack([(cols >= T - n) if left_pad else (cols < n) for n in lengths])
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed, std=0.5)
    for name in params:
        if name.endswith((".gamma", ".beta", ".bias")):
            params[name] = params[name] + rng.standard_normal(params[name].shape) * 0.3
    ids = rng.integers(0, cfg.vocabulary_size, (B, T))

    full = logits_forward(params, cfg, ids, mask)
    cache = new_cache(cfg, B, cfg.max_sequence_length, np.float64)
    steps = [logits_forward(params, cfg, ids[:, :prefill], mask, cache=cache, cache_index=0)]
    for t in range(prefill, T):
        steps.append(logits_forward(params, cfg, ids[:, t:t + 1], mask, cache=cache, cache_index=t))
    cached = np.concatenate(steps, axis=1)
    assert np.isfinite(cached).all()
    np.testing.assert_allclose(cached[mask], full[mask], rtol=1e-10, atol=1e-10)
