"""refopt.samplers: names and configs, argument checks, supports, frequencies, processors, and
conformance of min-p / typical / the processors with transformers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refopt import philox
from refopt import samplers
from refopt.errors import SamplerError
from refopt.samplers import (BeamSampler, ContrastiveSampler, GreedySampler, MinPSampler,
                             NoRepeatNGramProcessor, RandomSampler, RepetitionPenaltyProcessor,
                             SpeculativeSampler, TopKSampler, TopPSampler, TypicalSampler)


def chi2_critical(df, z=3.09):
    """Upper 0.1% point of chi-square(df) (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ---------------------------------------------------------------------------------- names, configs
@pytest.mark.parametrize("name,cls", [("greedy", GreedySampler), ("random", RandomSampler),
                                      ("top_k", TopKSampler), ("top_p", TopPSampler),
                                      ("beam", BeamSampler), ("contrastive", ContrastiveSampler),
                                      ("min_p", MinPSampler), ("typical", TypicalSampler),
                                      ("speculative", SpeculativeSampler)])
def test_get_by_name(name, cls):
    s = samplers.get(name)
    assert type(s) is cls


def test_keras_hub_defaults():
    assert samplers.get("top_k").k == 5
    assert (samplers.get("top_p").p, samplers.get("top_p").k) == (0.1, None)
    b = samplers.get("beam")
    assert (b.num_beams, b.return_all_beams) == (5, False)
    c = samplers.get("contrastive")
    assert (c.k, c.alpha) == (5, 0.6)
    sp = samplers.get("speculative")
    assert (sp.num_speculative_tokens, sp.base_sampler, sp.seed) == (5, None, None)
    assert samplers.get("greedy").temperature == 1.0


def test_get_passthrough_and_errors():
    s = TopKSampler(k=3)
    assert samplers.get(s) is s
    assert samplers.get(None) is None
    assert isinstance(samplers.get(GreedySampler), GreedySampler)
    fn = lambda *a, **k: None  # noqa: E731
    assert samplers.get(fn) is fn
    for bad in ("nucleus", "Greedy", "TOP_K", ""):
        with pytest.raises(SamplerError, match="unknown sampler"):
            samplers.get(bad)
    with pytest.raises(SamplerError):
        samplers.get(3)
    with pytest.raises(SamplerError, match="unknown sampler"):
        samplers.get({"class_name": "keras_hub>NoSuchSampler", "config": {}})


@pytest.mark.parametrize("sampler", [
    GreedySampler(temperature=0.5), RandomSampler(seed=3, temperature=2.0), TopKSampler(k=7, seed=1),
    TopPSampler(p=0.3, k=20, seed=9), BeamSampler(num_beams=2, return_all_beams=True),
    ContrastiveSampler(k=3, alpha=0.2), MinPSampler(min_p=0.2, seed=4), TypicalSampler(p=0.5),
    SpeculativeSampler(num_speculative_tokens=3, base_sampler=TopKSampler(k=2), seed=5),
    TopKSampler(k=4, repetition_penalty=1.3, no_repeat_ngram_size=2)])
def test_config_round_trip(sampler):
    config = sampler.get_config()
    again = type(sampler).from_config(config)
    assert again.get_config() == config
    ser = samplers.serialize(sampler)
    assert ser["class_name"] == type(sampler).__name__
    assert samplers.get(ser).get_config() == config
    # KerasHub's registered-name form too
    assert samplers.get({"class_name": ser["registered_name"], "config": config}).get_config() == config


def test_keras_hub_config_form():
    s = samplers.get({"class_name": "keras_hub>TopPSampler", "config": {"p": 0.5, "k": None,
                                                                       "seed": 1, "temperature": 0.7}})
    assert (type(s), s.p, s.seed, s.temperature) == (TopPSampler, 0.5, 1, 0.7)
    assert samplers.serialize(GreedySampler())["registered_name"] == "keras_hub>GreedySampler"


# ---------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("make,match", [
    (lambda: TopKSampler(k=0), "k=0"), (lambda: TopKSampler(k=-2), "k=-2"),
    (lambda: TopKSampler(k=2.5), "k=2.5"), (lambda: TopPSampler(k=0), "k=0"),
    (lambda: ContrastiveSampler(k=0), "k=0"),
    (lambda: TopPSampler(p=0), "p=0"), (lambda: TopPSampler(p=1.5), "p=1.5"),
    (lambda: TopPSampler(p=-0.1), "p=-0.1"), (lambda: TopPSampler(p=float("nan")), "p=nan"),
    (lambda: GreedySampler(temperature=0), "temperature=0"),
    (lambda: TopKSampler(temperature=-1.0), "temperature=-1.0"),
    (lambda: RandomSampler(temperature=float("inf")), "temperature=inf"),
    (lambda: BeamSampler(num_beams=0), "num_beams=0"),
    (lambda: ContrastiveSampler(alpha=1.5), "alpha=1.5"),
    (lambda: MinPSampler(min_p=1.2), "min_p=1.2"), (lambda: TypicalSampler(p=0), "p=0"),
    (lambda: SpeculativeSampler(num_speculative_tokens=0), "num_speculative_tokens=0"),
    (lambda: SpeculativeSampler(base_sampler=BeamSampler()), "base_sampler"),
    (lambda: RandomSampler(seed=-1), "seed=-1"),
    (lambda: TopKSampler(repetition_penalty=0), "repetition_penalty=0"),
    (lambda: TopKSampler(no_repeat_ngram_size=0), "no_repeat_ngram_size=0"),
])
def test_bad_arguments(make, match):
    with pytest.raises(SamplerError, match=match.replace("(", r"\(").replace(".", r"\.")):
        make()


# ---------------------------------------------------------------------------------- supports
# 1 to 4 rows of logits over a vocabulary of 2 to 30 tokens (ties are likely: few distinct values)
probability_rows = st.integers(2, 30).flatmap(lambda v: st.lists(
    st.lists(st.sampled_from([-6.0, -2.0, -0.5, 0.0, 0.5, 1.0, 3.0]) | st.floats(-6, 6),
             min_size=v, max_size=v).map(np.array), min_size=1, max_size=4))


def _probs(logits_rows, temperature=1.0):
    x = np.stack(logits_rows) / temperature
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@settings(max_examples=80)
@given(probability_rows, st.integers(1, 8), st.integers(0, 2**64 - 1))
def test_top_k_support(rows, k, seed):
    p = _probs(rows)
    token = TopKSampler(k=k, seed=seed).get_next_token(p)
    for b in range(p.shape[0]):
        # fewer than k tokens are strictly more probable than the one chosen
        assert (p[b] > p[b, token[b]]).sum() < k


@settings(max_examples=80)
@given(probability_rows, st.floats(0.01, 1.0), st.one_of(st.none(), st.integers(1, 6)),
       st.integers(0, 2**64 - 1))
def test_top_p_support(rows, top_p, k, seed):
    p = _probs(rows)
    token = TopPSampler(p=top_p, k=k, seed=seed).get_next_token(p)
    for b in range(p.shape[0]):
        order = sorted(range(p.shape[1]), key=lambda i: (-p[b, i], i))
        rank = order.index(token[b])
        if k is not None:
            assert rank < k
        # every token ranked before the chosen one leaves cumulative mass <= p
        before = sum(float(p[b, i]) for i in order[:rank])
        assert rank == 0 or before <= top_p + 1e-12


@settings(max_examples=80)
@given(probability_rows, st.floats(0.0, 1.0), st.integers(0, 2**64 - 1))
def test_min_p_support(rows, min_p, seed):
    p = _probs(rows)
    token = MinPSampler(min_p=min_p, seed=seed).get_next_token(p)
    for b in range(p.shape[0]):
        assert p[b, token[b]] >= min_p * p[b].max() or token[b] == np.argmax(p[b])


@settings(max_examples=60)
@given(probability_rows, st.floats(0.05, 3.0))
def test_top_k_one_is_greedy(rows, temperature):
    p = _probs(rows, temperature)
    for seed in (0, 1, 2**63):
        np.testing.assert_array_equal(TopKSampler(k=1, seed=seed).get_next_token(p),
                                      GreedySampler().get_next_token(p))


def test_ties_are_broken_towards_lower_ids():
    p = np.array([[0.1, 0.3, 0.2, 0.3, 0.1]], np.float32)
    dist = TopKSampler(k=1).next_token_distribution(p)
    assert dist[0].nonzero()[0].tolist() == [1]
    dist = TopKSampler(k=2).next_token_distribution(p)
    assert dist[0].nonzero()[0].tolist() == [1, 3]
    dist = TopKSampler(k=3).next_token_distribution(p)
    assert dist[0].nonzero()[0].tolist() == [1, 2, 3]
    # k beyond the vocabulary keeps everything
    assert (TopKSampler(k=50).next_token_distribution(p) > 0).sum() == 5


def test_top_p_keeps_the_token_that_crosses_p():
    p = np.array([[0.5, 0.3, 0.15, 0.05]])
    support = lambda s: s.next_token_distribution(p)[0].nonzero()[0].tolist()  # noqa: E731
    assert support(TopPSampler(p=0.1)) == [0]
    assert support(TopPSampler(p=0.5)) == [0, 1]            # 0.5 <= p: the next token joins
    assert support(TopPSampler(p=0.79)) == [0, 1]
    assert support(TopPSampler(p=0.8)) == [0, 1, 2]
    assert support(TopPSampler(p=1.0)) == [0, 1, 2, 3]
    assert support(TopPSampler(p=1.0, k=2)) == [0, 1]


def test_temperature_scales_logits():
    logits = np.array([[1.0, 2.0, 4.0]], np.float32)
    for t in (0.5, 1.0, 3.0):
        p = GreedySampler(temperature=t).compute_probabilities(logits)
        e = np.exp(logits / t)
        np.testing.assert_allclose(p, e / e.sum(), rtol=1e-6)
        assert p.dtype == np.float32
    assert RandomSampler().compute_probabilities(logits.astype(np.float64)).dtype == np.float64


# ---------------------------------------------------------------------------------- frequencies
TARGET = np.array([0.32, 0.02, 0.18, 0.11, 0.0, 0.2, 0.07, 0.1])


def _expected_filtered(name):
    p = TARGET.copy()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    keep = np.zeros(len(p), bool)
    if name == "random":
        keep[:] = True
    elif name == "top_k":
        keep[order[:3]] = True
    elif name == "top_p":                          # 0.32, 0.2, 0.18 -> cumulative 0.7 > 0.6
        acc = 0.0
        for i in order:
            if acc <= 0.6 or not keep.any():
                keep[i] = True
            acc += p[i]
    elif name == "min_p":
        keep = p >= 0.3 * p.max()
    w = np.where(keep, p, 0.0)
    return w / w.sum()


@pytest.mark.parametrize("name,make", [
    ("random", lambda s: RandomSampler(seed=s)), ("top_k", lambda s: TopKSampler(k=3, seed=s)),
    ("top_p", lambda s: TopPSampler(p=0.6, seed=s)), ("min_p", lambda s: MinPSampler(min_p=0.3, seed=s))])
@pytest.mark.parametrize("seed", [1, 2024])
def test_sampled_frequencies_match_the_distribution(name, make, seed):
    n = 20000
    sampler = make([seed * n + r for r in range(n)])              # n rows, n seeds: n independent draws
    tokens = sampler.get_next_token(np.tile(TARGET, (n, 1)))
    counts = np.bincount(tokens, minlength=len(TARGET))
    expected = n * _expected_filtered(name)
    assert (counts[expected == 0] == 0).all()
    support = expected > 0
    chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum()
    assert chi2 < chi2_critical(support.sum() - 1)


def test_draws_are_pure_functions_of_the_row_seed_and_step():
    p = np.tile(TARGET, (6, 1))
    seeds = [11, 12, 13, 14, 15, 16]
    first = RandomSampler(seed=seeds).get_next_token(p)
    assert (RandomSampler(seed=seeds).get_next_token(p) == first).all()
    # a row's choice depends on its seed, not on its place in the batch or on the other rows
    assert (RandomSampler(seed=seeds[:3]).get_next_token(p[:3]) == first[:3]).all()
    assert (RandomSampler(seed=seeds[::-1]).get_next_token(p) == first[::-1]).all()
    assert (RandomSampler(seed=13).get_next_token(p) == first[2]).all()    # one seed: every row alike
    assert not all((RandomSampler(seed=[s + 100 for s in seeds]).get_next_token(p) == first))
    # without a seed one is drawn per row, kept in last_seed, and reproduces the draw
    s = RandomSampler()
    tokens = s.get_next_token(p)
    assert s.seed is None and isinstance(s.last_seed, list) and len(set(s.last_seed)) == 6
    assert (RandomSampler(seed=s.last_seed).get_next_token(p) == tokens).all()
    one = RandomSampler()
    one.get_next_token(p[:1])
    assert isinstance(one.last_seed, int)                         # one row: an int, as before


# ---------------------------------------------------------------------------------- processors
def test_repetition_penalty():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]])
    ids = np.array([[0, 1, 3, 3]])
    out = RepetitionPenaltyProcessor(2.0)(logits, ids, index=2)        # context: tokens 0 and 1
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 3.0]])


def test_no_repeat_ngram():
    proc = NoRepeatNGramProcessor(2)
    ids = np.array([[5, 6, 5, 7, 5, 0]])
    out = proc(np.zeros((1, 8)), ids, index=5)                          # seen bigrams after 5: 6, 7
    assert np.isneginf(out[0]).nonzero()[0].tolist() == [6, 7]
    assert NoRepeatNGramProcessor(3)(np.zeros((1, 8)), ids, index=2).min() == 0  # too short


def test_processors_apply_in_every_sampler():
    # a strong repetition penalty makes greedy avoid its favourite once it has been seen
    logits = np.array([[0.0, 5.0, 4.0]])
    prompt = np.array([[1, 0, 0]])
    s = GreedySampler(repetition_penalty=10.0)
    processed = s.process_logits(logits, prompt, 1)
    assert s.get_next_token(s.compute_probabilities(processed))[0] == 2
    assert GreedySampler().get_next_token(logits)[0] == 1


# ---------------------------------------------------------------------------------- transformers
def _hf():
    torch = pytest.importorskip("torch", reason="conformance with transformers needs torch")
    gen = pytest.importorskip("transformers.generation.logits_process",
                              reason="conformance needs transformers")
    return torch, gen


def _random_logits(seed, b=3, v=40):
    return np.random.default_rng(seed).normal(0, 2.0, (b, v))


@pytest.mark.parametrize("seed", range(4))
def test_min_p_and_typical_match_transformers(seed):
    torch, gen = _hf()
    logits = _random_logits(seed)
    t = torch.tensor(logits)
    probs = np.asarray(GreedySampler().compute_probabilities(logits))
    for ours, theirs in [
        (MinPSampler(min_p=0.1), gen.MinPLogitsWarper(min_p=0.1)),
        (MinPSampler(min_p=0.6, min_tokens_to_keep=3), gen.MinPLogitsWarper(min_p=0.6, min_tokens_to_keep=3)),
        (TypicalSampler(p=0.9), gen.TypicalLogitsWarper(mass=0.9)),
        (TypicalSampler(p=0.3, min_tokens_to_keep=2), gen.TypicalLogitsWarper(mass=0.3, min_tokens_to_keep=2)),
        (TopKSampler(k=4), gen.TopKLogitsWarper(top_k=4)),
    ]:
        support = ours.next_token_distribution(probs) > 0
        hf = np.isfinite(theirs(None, t.clone()).numpy())
        np.testing.assert_array_equal(support, hf, err_msg=repr(ours))


@pytest.mark.parametrize("seed", range(3))
def test_processors_match_transformers(seed):
    torch, gen = _hf()
    rng = np.random.default_rng(seed)
    logits = _random_logits(seed, v=6)
    ids = rng.integers(0, 6, (3, 9))
    for ours, theirs in [(RepetitionPenaltyProcessor(1.7), gen.RepetitionPenaltyLogitsProcessor(1.7)),
                         (RepetitionPenaltyProcessor(0.5), gen.RepetitionPenaltyLogitsProcessor(0.5)),
                         (NoRepeatNGramProcessor(2), gen.NoRepeatNGramLogitsProcessor(2)),
                         (NoRepeatNGramProcessor(3), gen.NoRepeatNGramLogitsProcessor(3)),
                         (NoRepeatNGramProcessor(1), gen.NoRepeatNGramLogitsProcessor(1))]:
        got = ours(logits, ids, ids.shape[1])
        want = theirs(torch.tensor(ids), torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(got, want, err_msg=repr(ours))


def test_keras_hub_custom_sampler_protocol():
    # KerasHub's documented extension point: override get_next_token only
    class Forbid(samplers.Sampler):
        def __init__(self, forbidden, **kwargs):
            super().__init__(**kwargs)
            self.forbidden = forbidden

        def get_next_token(self, probs):
            probs = np.array(probs)
            probs[:, self.forbidden] = 0
            return np.argmax(probs, axis=-1)

    logits = {3: np.array([[0.0, 1.0, 9.0, 3.0]])}

    def next(prompt, cache, index):
        return logits[3], None, cache

    out = Forbid([2])(next, np.zeros((1, 4), np.int64), index=3)
    assert out[0, 3] == 3
    with pytest.raises(NotImplementedError):
        samplers.Sampler().get_next_token(np.ones((1, 3)) / 3)
    assert philox.STREAM_TOKEN == 0
