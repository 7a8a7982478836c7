"""Search samplers against their definitions on tiny random models: beam search against exhaustive
search, contrastive search against its formula written out, speculative decoding against the
target's greedy output and (with a base sampler) the target's distribution."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refopt import samplers
from refopt.config import OPTConfig
from refopt.errors import SamplerError
from refopt.model import forward, init_params, logits_forward
from refopt.models.opt_backbone import OPTBackbone
from refopt.models.opt_causal_lm import OPTCausalLM


def tiny_lm(seed=0, vocab=5, layers=2, hidden=8, heads=2, ff=16, max_len=16, std=0.5, sampler="greedy"):
    cfg = OPTConfig(vocabulary_size=vocab, num_layers=layers, num_heads=heads, hidden_dim=hidden,
                    intermediate_dim=ff, max_sequence_length=max_len, dropout=0.0, dtype="float64")
    lm = OPTCausalLM(OPTBackbone.from_opt_config(cfg, init_params(cfg, seed=seed, std=std)))
    lm.compile(sampler=sampler)
    return lm


def pad_batch(prompts, total):
    ids = np.zeros((len(prompts), total), np.int64)
    mask = np.zeros((len(prompts), total), bool)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
        mask[b, :len(p)] = True
    return {"token_ids": ids, "padding_mask": mask}


def log_softmax(x):
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def run(lm, seqs):
    """(hidden [N, S, E], logits [N, S, V]) of whole sequences, no cache."""
    seqs = np.asarray(seqs)
    ones = np.ones(seqs.shape, bool)
    hidden = forward(lm.backbone.params, lm.backbone.config, seqs, ones)
    return hidden, logits_forward(lm.backbone.params, lm.backbone.config, seqs, ones)


def greedy_reference(lm, prompt, total):
    seq = list(prompt)
    while len(seq) < total:
        seq.append(int(np.argmax(run(lm, [seq])[1][0, -1])))
    return seq


# ---------------------------------------------------------------------------------- beam search
@settings(max_examples=6)
@given(st.integers(0, 10_000), st.lists(st.integers(0, 4), min_size=2, max_size=3))
def test_beam_search_with_a_covering_beam_is_exhaustive(seed, prompt):
    V, new = 5, 3
    lm = tiny_lm(seed=seed, vocab=V, sampler=samplers.BeamSampler(num_beams=V ** (new - 1)))
    total = len(prompt) + new
    out = lm.generate(pad_batch([prompt, prompt[::-1]], total), stop_token_ids=None)["token_ids"]
    for b, p in enumerate([prompt, prompt[::-1]]):
        candidates = [list(p) + list(c) for c in itertools.product(range(V), repeat=new)]
        lsm = log_softmax(run(lm, candidates)[1])
        scores = [sum(lsm[i, t - 1, seq[t]] for t in range(len(p), total))
                  for i, seq in enumerate(candidates)]
        assert out[b].tolist() == candidates[int(np.argmax(scores))]


def test_single_beam_is_greedy():
    lm = tiny_lm(seed=3, vocab=9, sampler=samplers.BeamSampler(num_beams=1))
    out = lm.generate(pad_batch([[1, 2], [3, 4, 5]], 9), stop_token_ids=None)["token_ids"]
    assert out[0].tolist() == greedy_reference(lm, [1, 2], 9)
    assert out[1].tolist() == greedy_reference(lm, [3, 4, 5], 9)


# ---------------------------------------------------------------------------------- contrastive
def contrastive_reference(lm, prompt, total, k, alpha):
    """Contrastive search from its definition, recomputing everything at each step."""
    seq = list(prompt)
    while len(seq) < total:
        t = len(seq)
        hidden, logits = run(lm, [seq])
        probs = np.exp(log_softmax(logits[0, -1]))
        candidates = sorted(range(len(probs)), key=lambda v: (-probs[v], v))[:k]
        best, best_score = None, -np.inf
        for v in candidates:
            h_v = run(lm, [seq + [v]])[0][0, t]
            sims = [h_v @ hidden[0, j] / (np.linalg.norm(h_v) * np.linalg.norm(hidden[0, j]))
                    for j in range(t)]
            score = (1 - alpha) * probs[v] - alpha * max(sims)
            if score > best_score:
                best, best_score = v, score
        seq.append(best)
    return seq


@settings(max_examples=5)
@given(st.integers(0, 10_000), st.sampled_from([1, 3, 6]), st.sampled_from([0.0, 0.4, 0.6, 1.0]))
def test_contrastive_search_is_its_formula(seed, k, alpha):
    lm = tiny_lm(seed=seed, vocab=7, sampler=samplers.ContrastiveSampler(k=k, alpha=alpha))
    prompts = [[1, 2], [3, 4, 5, 6]]
    out = lm.generate(pad_batch(prompts, 9), stop_token_ids=None)["token_ids"]
    for b, p in enumerate(prompts):
        assert out[b].tolist() == contrastive_reference(lm, p, 9, k, alpha)


def test_contrastive_alpha_zero_is_greedy():
    lm = tiny_lm(seed=5, vocab=9, sampler=samplers.ContrastiveSampler(k=4, alpha=0.0))
    out = lm.generate(pad_batch([[1, 2, 3]], 10), stop_token_ids=None)["token_ids"]
    assert out[0].tolist() == greedy_reference(lm, [1, 2, 3], 10)


def test_contrastive_needs_hidden_states():
    with pytest.raises(SamplerError, match="hidden_states"):
        samplers.ContrastiveSampler()(lambda p, c, i: None, np.zeros((1, 3), np.int64), index=1)


# ---------------------------------------------------------------------------------- speculative
@settings(max_examples=6)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_speculative_greedy_equals_target_greedy(seed, k):
    target = tiny_lm(seed=seed, vocab=9)
    draft = tiny_lm(seed=seed + 1, vocab=9, layers=1)
    target.compile(sampler=samplers.SpeculativeSampler(draft_model=draft, num_speculative_tokens=k))
    prompts = [[1, 2], [3, 4, 5, 6], [7]]
    out = target.generate(pad_batch(prompts, 12), stop_token_ids=None)["token_ids"]
    for b, p in enumerate(prompts):
        assert out[b].tolist() == greedy_reference(target, p, 12)


def test_speculative_with_the_target_as_draft_accepts_everything():
    target = tiny_lm(seed=21, vocab=9)
    sampler = samplers.SpeculativeSampler(draft_model=target, num_speculative_tokens=4)
    calls = []
    original = target.call_with_cache

    def counting(token_ids, *args, **kwargs):
        calls.append(np.asarray(token_ids).shape[1])
        return original(token_ids, *args, **kwargs)

    target.call_with_cache = counting
    target.compile(sampler=sampler)
    out = target.generate(pad_batch([[1, 2]], 12), stop_token_ids=None)["token_ids"]
    target.call_with_cache = original
    assert out[0].tolist() == greedy_reference(target, [1, 2], 12)
    # 10 new tokens in cycles of 4 accepted + 1 bonus: verify passes of 5, 5, then 1 token
    assert sorted(n for n in calls if n > 1)[-2:] == [5, 5]


def chi2_critical(df, z=3.09):
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def target_joint(lm, prompt, new, base):
    """Exact distribution of the `new` next tokens under `base` applied to the target, by
    enumerating every continuation."""
    V = lm.backbone.config.vocabulary_size
    joint = {}
    for cont in itertools.product(range(V), repeat=new):
        logits = run(lm, [list(prompt) + list(cont)])[1][0]
        prob = 1.0
        for j, tok in enumerate(cont):
            p = base.next_token_distribution(base.compute_probabilities(logits[len(prompt) - 1 + j][None]))[0]
            prob *= p[tok] / p.sum()
        joint[cont] = prob
    return joint


@pytest.mark.parametrize("make_base,temperature", [(lambda: samplers.RandomSampler(), 1.0),
                                                   (lambda: samplers.TopKSampler(k=3), 0.7)])
def test_speculative_sampling_keeps_the_target_distribution(make_base, temperature):
    V, new, n = 4, 3, 6000
    target = tiny_lm(seed=31, vocab=V, std=0.6)
    draft = tiny_lm(seed=32, vocab=V, layers=1, std=0.6)
    prompt = [1, 2]
    sampler = samplers.SpeculativeSampler(draft_model=draft, num_speculative_tokens=2,
                                          base_sampler=make_base(), seed=2024, temperature=temperature)
    target.compile(sampler=sampler)
    # n rows of one prompt with n seeds (one per request): n independent samples
    out = target.generate(pad_batch([prompt] * n, len(prompt) + new), stop_token_ids=None,
                          seed=[2024 * n + r for r in range(n)])["token_ids"]
    observed = {}
    for row in out[:, len(prompt):]:
        observed[tuple(row)] = observed.get(tuple(row), 0) + 1
    base = make_base()
    base.temperature = temperature
    joint = target_joint(target, prompt, new, base)
    assert all(joint[c] > 0 for c in observed)           # never outside the support
    # chi-square over the cells, pooling those with small expectations
    chi2, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for c, prob in joint.items():
        e = n * prob
        if e < 5:
            pooled_obs += observed.get(c, 0)
            pooled_exp += e
        else:
            chi2 += (observed.get(c, 0) - e) ** 2 / e
            cells += 1
    if pooled_exp > 0:
        chi2 += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    assert cells > 10
    assert chi2 < chi2_critical(cells - 1)


def test_speculative_checks_its_draft():
    target = tiny_lm(seed=1, vocab=9)
    target.compile(sampler=samplers.SpeculativeSampler(draft_model=tiny_lm(seed=2, vocab=10)))
    with pytest.raises(SamplerError, match="draft model's vocabulary \\(10 tokens\\) differs"):
        target.generate(pad_batch([[1, 2]], 6), stop_token_ids=None)
    target.compile(sampler=samplers.SpeculativeSampler())
    with pytest.raises(SamplerError, match="needs a draft model"):
        target.generate(pad_batch([[1, 2]], 6), stop_token_ids=None)
    with pytest.raises(SamplerError, match="expected an OPTCausalLM"):
        samplers.SpeculativeSampler(draft_model=object())
    short = tiny_lm(seed=2, vocab=9, max_len=8)
    target.compile(sampler=samplers.SpeculativeSampler(draft_model=short))
    with pytest.raises(SamplerError, match="max_sequence_length 8"):
        target.generate(pad_batch([[1, 2]], 12), stop_token_ids=None)


@pytest.mark.parametrize("sampler", [samplers.BeamSampler(num_beams=3), samplers.ContrastiveSampler(k=3)])
def test_search_samplers_carry_any_cache_structure(sampler):
    # the model's KV cache wrapped in a dict with a list beside it, as a `next` of another library
    # might keep its state: the samplers reorder every array, and decode what they decode with the
    # bare cache (whose filled positions alone they copy)
    from refopt import generation

    lm = tiny_lm(seed=3, vocab=7)
    batch = pad_batch([[2, 4], [3, 1, 5]], 7)
    ids, mask = batch["token_ids"], batch["padding_mask"]
    index = int(mask.sum(1).min())
    cache, hidden = generation.prefill(lm, ids, index)
    plain_next = generation.make_next(lm)

    def next(prompt, state, i):
        logits, h, kv = plain_next(prompt, state["kv"], i)
        return logits, h, {"kv": kv, "extra": [state["extra"][0] + 1]}

    state = {"kv": cache.copy(), "extra": [np.zeros((ids.shape[0], 1))]}
    wrapped = sampler(next=next, prompt=ids, cache=state, index=index, mask=mask, hidden_states=hidden)
    bare = sampler(next=plain_next, prompt=ids, cache=cache, index=index, mask=mask, hidden_states=hidden,
                   model=lm)
    np.testing.assert_array_equal(wrapped, bare)
