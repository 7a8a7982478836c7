"""KerasHub's sampler tests (``keras_hub/src/samplers/*_test.py``: greedy, random, top-k, top-p,
beam, contrastive, serialization), ported: the same ``next`` functions, prompts, caches and
expected strings, with NumPy arrays for ``keras.ops`` tensors.

As in KerasHub, the "cache" these tests pass is a ``[B, T]`` array of the characters to produce;
samplers must carry any cache structure through (the beam and contrastive samplers reorder it).
"""

import numpy as np
import pytest

from kh_support import CHAR_LOOKUP, VOCAB_SIZE, full, ids, join_as_string, one_hot
from refopt.samplers import (BeamSampler, ContrastiveSampler, GreedySampler, RandomSampler,
                             TopKSampler, TopPSampler, deserialize, get, serialize)

BATCH, LENGTH = 1, 12


def next_from_cache(batch_hidden=5):
    # "Return a distribution favoring the next char in cache."
    def next(prompt, cache, index):
        batch_size = np.shape(prompt)[0]
        hidden_states = np.ones([batch_size, batch_hidden], np.float32)
        logits = one_hot(cache[:, index], VOCAB_SIZE) * 1e9
        return logits, hidden_states, cache
    return next


def next_first_token(prompt, cache, index):
    # "Return a distribution favoring the first token in the vocab."
    batch_size = np.shape(prompt)[0]
    logits = one_hot(np.zeros(batch_size, np.int32), VOCAB_SIZE) * 1e9
    return logits, np.ones([batch_size, 5], np.float32), cache


def next_decreasing(prompt, cache, index):
    # "Return a distribution where each id is progressively less likely."
    batch_size = np.shape(prompt)[0]
    logits = np.repeat(np.arange(VOCAB_SIZE, 0, -1, dtype=np.float32)[None, :], batch_size, axis=0)
    return logits, np.ones([batch_size, 5], np.float32), cache


Z_PROMPT = full((BATCH, LENGTH), CHAR_LOOKUP["z"])
TOKEN_SAMPLERS = {
    "greedy": lambda: GreedySampler(temperature=1.0),
    "random": lambda: RandomSampler(temperature=1.0),
    "top_k": lambda: TopKSampler(k=5, temperature=1.0),
    "top_p": lambda: TopPSampler(p=0.1),
    "beam": lambda: BeamSampler(num_beams=5, temperature=1.0),
}


# ------------------------------------------------------------ shared by greedy/random/top_k/top_p/beam
@pytest.mark.parametrize("name", TOKEN_SAMPLERS)
def test_stateless_call(name):
    output = TOKEN_SAMPLERS[name]()(next=next_first_token, prompt=Z_PROMPT, index=5)
    assert join_as_string(output) == ["zzzzzaaaaaaa"]


@pytest.mark.parametrize("name", TOKEN_SAMPLERS)
def test_stateful_call(name):
    output = TOKEN_SAMPLERS[name]()(next=next_from_cache(), prompt=Z_PROMPT, cache=ids("sequentially"))
    assert join_as_string(output) == ["sequentially"]


@pytest.mark.parametrize("name", TOKEN_SAMPLERS)
def test_early_stopping(name):
    output = TOKEN_SAMPLERS[name]()(next=next_from_cache(), prompt=Z_PROMPT, cache=ids("sequentially"),
                                    stop_token_ids=[CHAR_LOOKUP["t"]])
    assert join_as_string(output) == ["sequentzzzzz"]


# ------------------------------------------------------------ greedy_sampler_test.py
def test_greedy_multitoken_early_stopping():
    output = GreedySampler(temperature=1.0)(next=next_from_cache(), prompt=Z_PROMPT,
                                            cache=ids("sequentially"),
                                            stop_token_ids=[CHAR_LOOKUP["t"], CHAR_LOOKUP["n"]])
    assert join_as_string(output) == ["sequenzzzzzz"]


def test_greedy_is_greedy():
    output = GreedySampler(temperature=1.0)(next=next_decreasing, prompt=Z_PROMPT)
    assert set(np.asarray(output[0]).tolist()) <= {0}


# ------------------------------------------------------------ random_sampler_test.py
def test_random_temperature():
    output = RandomSampler(temperature=1e-5)(next=next_decreasing, prompt=Z_PROMPT)
    np.testing.assert_array_equal(output, np.zeros_like(output))


# ------------------------------------------------------------ top_k_sampler_test.py
def test_top_k_outputs_in_top_k():
    output = TopKSampler(k=5, temperature=1.0)(next=next_decreasing, prompt=Z_PROMPT)
    assert set(np.asarray(output[0]).tolist()) <= set(range(5))


# ------------------------------------------------------------ top_p_sampler_test.py
def test_top_p_only_sample_from_top_k_tokens():
    output = TopPSampler(p=1, k=5)(next=next_decreasing, prompt=Z_PROMPT, index=5)
    assert set(join_as_string(output[:, 5:])[0]) <= set("abcde")


def test_top_p_outputs_in_top_p():
    def next(prompt, cache, index):
        logits = np.zeros((BATCH, VOCAB_SIZE))
        logits[:, :3] = 1.0
        return logits, np.ones([BATCH, 5]), cache

    output = TopPSampler(p=(2.0 / VOCAB_SIZE))(next=next, prompt=Z_PROMPT)
    assert set(np.asarray(output[0]).tolist()) <= set(range(3))


def test_top_p_temperature():
    output = TopPSampler(p=0.5, temperature=1e-9)(next=next_decreasing, prompt=Z_PROMPT)
    np.testing.assert_array_equal(output, np.zeros_like(output))


# ------------------------------------------------------------ beam_sampler_test.py
def test_beam_return_all_beams():
    sorted_prompts, sorted_log_probs = BeamSampler(num_beams=5, return_all_beams=True)(
        next=next_from_cache(), prompt=Z_PROMPT, cache=ids("sequentially"))
    assert sorted_prompts.shape == (BATCH, 5, LENGTH)
    assert sorted_log_probs.shape == (BATCH, 5)
    assert np.all(sorted_log_probs[:, 1:] <= sorted_log_probs[:, :-1])
    assert join_as_string(sorted_prompts[:, 0, :]) == ["sequentially"]


# ------------------------------------------------------------ contrastive_sampler_test.py
HIDDEN_DIM = 3
HIDDEN_STATES = np.ones([BATCH, LENGTH, HIDDEN_DIM], np.float32)


def contrastive():
    return ContrastiveSampler(k=5, alpha=0.2, temperature=1.0)


def test_contrastive_stateless_call():
    def next(prompt, cache, index):
        batch_size = np.shape(prompt)[0]
        logits = one_hot(np.zeros(batch_size, np.int32), VOCAB_SIZE) * 1e9
        return logits, np.ones([batch_size, HIDDEN_DIM], np.float32), cache

    output = contrastive()(next=next, prompt=Z_PROMPT, index=5, hidden_states=HIDDEN_STATES)
    assert join_as_string(output) == ["zzzzzaaaaaaa"]


def test_contrastive_stateful_call():
    prompt = full((BATCH, LENGTH), CHAR_LOOKUP["s"])
    output = contrastive()(next=next_from_cache(HIDDEN_DIM), prompt=prompt, cache=ids("sequentiallyy"),
                           index=1, hidden_states=HIDDEN_STATES)
    assert join_as_string(output) == ["sequentially"]


def test_contrastive_early_stopping():
    prompt = full((BATCH, LENGTH), CHAR_LOOKUP["s"])
    output = contrastive()(next=next_from_cache(HIDDEN_DIM), prompt=prompt, cache=ids("sequentiallyy"),
                           stop_token_ids=[CHAR_LOOKUP["t"]], index=0, hidden_states=HIDDEN_STATES)
    assert join_as_string(output) == ["sequentsssss"]


def test_contrastive_outputs_in_top_k():
    def next(prompt, cache, index):
        batch_size = np.shape(prompt)[0]
        logits = np.repeat(np.arange(VOCAB_SIZE, 0, -1, dtype=np.float32)[None, :], batch_size, axis=0)
        return logits, np.ones([batch_size, HIDDEN_DIM], np.float32), cache

    output = contrastive()(next=next, prompt=Z_PROMPT, index=1, hidden_states=HIDDEN_STATES)
    assert set(np.asarray(output[0, 1:]).tolist()) <= set(range(5))


def test_contrastive_alpha_penalty():
    rng = np.random.default_rng(0)     # KerasHub: np.random.uniform

    def next(prompt, cache, index):
        batch_size = np.shape(prompt)[0]
        best_token_id = CHAR_LOOKUP["h"]
        logits = np.ones([batch_size, VOCAB_SIZE], np.float32)
        # Favoring `best_token_id` in the logits.
        logits += one_hot(np.zeros(BATCH, np.int32) + best_token_id, VOCAB_SIZE) * 1e9
        # The hidden states for `best_token_id` are [1, 1, ..., 1]: the largest similarity penalty.
        mask_of_best_token = prompt[:, index - 1] == best_token_id
        random_states = rng.uniform(size=[batch_size, HIDDEN_DIM]).astype(np.float32) * (
            1 - mask_of_best_token.astype(np.float32)[:, None])
        hidden_states = np.ones([batch_size, HIDDEN_DIM], np.float32) * \
            mask_of_best_token.astype(np.float32)[:, None]
        return logits, hidden_states + random_states, cache

    prompt = full((1, LENGTH), CHAR_LOOKUP["z"])
    hidden_states = np.ones([1, LENGTH, HIDDEN_DIM], np.float32) + 1e-5
    output = contrastive()(next=next, prompt=prompt, index=5, hidden_states=hidden_states)
    assert join_as_string(output) == ["zzzzzhhhhhhh"]
    output = ContrastiveSampler(k=5, alpha=1.0)(next=next, prompt=prompt, index=5,
                                                hidden_states=hidden_states)
    assert "h" not in join_as_string(output)[0]


# ------------------------------------------------------------ serialization_test.py
def test_serialization():
    sampler = TopKSampler(k=5)
    restored = deserialize(serialize(sampler))
    assert sampler.get_config() == restored.get_config()


def test_get():
    assert isinstance(get("top_k"), TopKSampler)
    original = TopKSampler(k=7)
    assert serialize(get(serialize(original))) == serialize(original)
    original = TopKSampler(k=7)
    assert get(original) == original
