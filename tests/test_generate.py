"""refopt.generation: KerasHub's generate semantics, the KV-cache decode, stop tokens and the output
padding mask, reproducible sampling, streaming and log-probabilities; the KerasHub and
transformers fixtures."""

import json

import numpy as np
import pytest

from conftest import shared_path
from refopt import generation, samplers
from refopt.config import OPTConfig
from refopt.errors import InputError, InputTypeError
from refopt.model import init_params, logits_forward
from refopt.models.opt_backbone import OPTBackbone
from refopt.models.opt_causal_lm import OPTCausalLM


# ---------------------------------------------------------------------------------- tiny models
def tiny_lm(seed=0, vocab=11, layers=2, hidden=8, heads=2, ff=16, max_len=24, std=0.5,
            dtype="float64", preprocessor=None, sampler="greedy"):
    """A random OPT with a larger init scale than usual, so its distributions are far from flat."""
    cfg = OPTConfig(vocabulary_size=vocab, num_layers=layers, num_heads=heads, hidden_dim=hidden,
                    intermediate_dim=ff, max_sequence_length=max_len, dropout=0.0, dtype=dtype)
    lm = OPTCausalLM(OPTBackbone.from_opt_config(cfg, init_params(cfg, seed=seed, std=std)),
                     preprocessor=preprocessor)
    lm.compile(sampler=sampler)
    return lm


def full_logits(lm, ids):
    """Logits [B, S, V] of a whole sequence, no cache."""
    ids = np.asarray(ids)
    return logits_forward(lm.backbone.params, lm.backbone.config, ids, np.ones(ids.shape, bool))


def greedy_reference(lm, prompt, total):
    """Greedy decoding by recomputing the whole sequence at every step."""
    seq = list(prompt)
    while len(seq) < total:
        seq.append(int(np.argmax(full_logits(lm, [seq])[0, -1])))
    return seq


def pad_batch(prompts, total, pad=0):
    ids = np.full((len(prompts), total), pad, np.int64)
    mask = np.zeros((len(prompts), total), bool)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
        mask[b, :len(p)] = True
    return {"token_ids": ids, "padding_mask": mask}


# ---------------------------------------------------------------------------------- toy preprocessor
class ToyTokenizer:
    """Letters a..h are ids 3..10; <pad> = 1, </s> = 2 is the start and end token (OPT's layout)."""

    letters = "abcdefgh"
    pad_token_id, start_token_id, end_token_id = 1, 2, 2
    special_token_ids = [0, 1, 2]

    def tokenize(self, s):
        return [3 + self.letters.index(c) for c in s]

    def detokenize(self, ids):
        return "".join(self.letters[i - 3] for i in ids if i >= 3)

    def incremental_detokenizer(self):
        tok = self

        class Incremental:
            def push(self, token_id):
                return tok.detokenize([token_id])

            def flush(self):
                return ""
        return Incremental()


class ToyPreprocessor:
    """KerasHub's OPTCausalLMPreprocessor generate_preprocess / generate_postprocess contract."""

    def __init__(self, sequence_length=12):
        self.tokenizer = ToyTokenizer()
        self.sequence_length = sequence_length

    def generate_preprocess(self, x, sequence_length=None):
        length = sequence_length or self.sequence_length
        ids = np.full((len(x), length), 1, np.int64)
        mask = np.zeros((len(x), length), bool)
        for b, s in enumerate(x):
            row = ([2] + self.tokenizer.tokenize(s))[:length]
            ids[b, :len(row)] = row
            mask[b, :len(row)] = True
        return {"token_ids": ids, "padding_mask": mask}

    def generate_postprocess(self, x):
        out = []
        for ids, mask in zip(x["token_ids"], x["padding_mask"]):
            keep = [int(i) for i, m in zip(ids, mask) if m and i not in self.tokenizer.special_token_ids]
            out.append(self.tokenizer.detokenize(keep))
        return out


# ---------------------------------------------------------------------------------- fixtures
def _keras_expected():
    return json.loads(shared_path("fixtures", "keras", "expected.json").read_text())


def test_keras_fixture_generate_without_preprocessor():
    expected = _keras_expected()["generate_no_preprocessor"]
    lm = OPTCausalLM.from_preset(shared_path("fixtures", "keras", "opt_tiny_keras"), preprocessor=None)
    lm.compile(sampler="greedy")
    x = {k: np.array(v) for k, v in expected["input"].items()}
    out = lm.generate(x, stop_token_ids=None)
    assert sorted(out) == ["padding_mask", "token_ids"]
    np.testing.assert_array_equal(out["token_ids"], expected["output"]["token_ids"])
    np.testing.assert_array_equal(out["padding_mask"], np.array(expected["output"]["padding_mask"], bool))


def _keras_lm_with_preprocessor():
    try:
        from refopt.models.opt_causal_lm_preprocessor import OPTCausalLMPreprocessor  # noqa: F401
    except ImportError:
        pytest.skip("needs refopt.models.OPTCausalLMPreprocessor (the tokenizer work), not there yet")
    lm = OPTCausalLM.from_preset(shared_path("fixtures", "keras", "opt_tiny_keras"))
    if lm.preprocessor is None:
        pytest.skip("from_preset did not attach a preprocessor to the KerasHub preset yet")
    return lm


def test_keras_fixture_greedy_strings():
    expected = _keras_expected()["generate_greedy"]
    lm = _keras_lm_with_preprocessor()
    lm.compile(sampler="greedy")
    assert lm.generate(["I want to say", "Where are you"], max_length=20) == expected["max_length_20"]
    assert lm.generate("I want to say", max_length=20, strip_prompt=True) == expected["strip_prompt"]
    assert lm.generate("I want to say", max_length=20, stop_token_ids=None) == expected["no_stop"]


def test_keras_fixture_beam():
    expected = _keras_expected()["generate_beam2"]
    lm = _keras_lm_with_preprocessor()
    lm.compile(sampler=samplers.BeamSampler(num_beams=2))
    assert lm.generate("I want to say", max_length=20) == expected


def test_keras_fixture_stream_matches_generate():
    lm = _keras_lm_with_preprocessor()
    lm.compile(sampler=samplers.TopKSampler(k=5, seed=7))
    pieces = list(lm.stream("I want to say", max_length=20))
    assert "".join(pieces) == lm.generate("I want to say", max_length=20, strip_prompt=True)


def _realvocab():
    path = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    expected = json.loads((path / "expected_generate.json").read_text())
    lm = OPTCausalLM.from_preset(path, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm, expected


def test_transformers_realvocab_greedy_ids():
    lm, expected = _realvocab()
    for text, case in expected.items():
        prompt, want = case["prompt_ids"], case["greedy_ids"]
        out = lm.generate(pad_batch([prompt], len(want), pad=1), stop_token_ids=None)
        assert out["token_ids"][0].tolist() == want, text


def test_transformers_realvocab_greedy_batched():
    # prompts of different lengths in one batch: each row as if alone
    lm, expected = _realvocab()
    cases = list(expected.values())
    total = max(len(c["greedy_ids"]) for c in cases)
    out = lm.generate(pad_batch([c["prompt_ids"] for c in cases], total, pad=1), stop_token_ids=None)
    for b, case in enumerate(cases):
        want = case["greedy_ids"]
        assert out["token_ids"][b, :len(want)].tolist() == want


def test_transformers_realvocab_greedy_text():
    try:
        from refopt.models.opt_causal_lm_preprocessor import OPTCausalLMPreprocessor  # noqa: F401
    except ImportError:
        pytest.skip("needs refopt.models.OPTCausalLMPreprocessor (the tokenizer work), not there yet")
    path = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    expected = json.loads((path / "expected_generate.json").read_text())
    lm = OPTCausalLM.from_preset(path)
    assert lm.preprocessor is not None
    lm.compile(sampler="greedy")
    for text, case in expected.items():
        out = lm.generate(text, max_length=len(case["greedy_ids"]), stop_token_ids=None)
        assert out == case["greedy_text"]


# ---------------------------------------------------------------------------------- decoding
def test_cached_decode_equals_full_recompute():
    lm = tiny_lm(seed=1)
    prompts = [[2, 5, 7], [2, 4], [2, 9, 3, 3, 8]]
    out = lm.generate(pad_batch(prompts, 12), stop_token_ids=None)
    for b, p in enumerate(prompts):
        assert out["token_ids"][b].tolist() == greedy_reference(lm, p, 12)
    assert out["padding_mask"].all()


def test_float32_model_decodes_too():
    lm = tiny_lm(seed=4, dtype="float32")
    out = lm.generate(pad_batch([[2, 3, 4]], 9), stop_token_ids=None)
    assert out["token_ids"][0].tolist() == greedy_reference(lm, [2, 3, 4], 9)


def test_unbatched_dict():
    lm = tiny_lm(seed=1)
    x = pad_batch([[2, 5, 7]], 8)
    one = lm.generate({k: v[0] for k, v in x.items()}, stop_token_ids=None)
    assert one["token_ids"].shape == (8,)
    np.testing.assert_array_equal(one["token_ids"], lm.generate(x, stop_token_ids=None)["token_ids"][0])


def test_prompt_tokens_are_kept_and_positions_are_absolute():
    # the longer row keeps its prompt while the shorter one generates
    lm = tiny_lm(seed=2)
    prompts = [[2, 3], [2, 3, 10, 10, 10, 10]]
    out = lm.generate(pad_batch(prompts, 10), stop_token_ids=None)["token_ids"]
    assert out[1, :6].tolist() == prompts[1]
    assert out[1].tolist() == greedy_reference(lm, prompts[1], 10)


class CountingLM:
    """Wraps a model and counts call_with_cache calls."""

    def __init__(self, lm):
        self.lm, self.calls = lm, 0

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def call_with_cache(self, *args, **kwargs):
        self.calls += 1
        return self.lm.call_with_cache(*args, **kwargs)


def test_stop_tokens_and_output_padding_mask():
    prompts = [[2, 5], [2, 6, 7]]
    for seed in range(3, 40):   # a model where row 0's token at position 4 never appears in row 1
        lm = tiny_lm(seed=seed)
        free = lm.generate(pad_batch(prompts, 14), stop_token_ids=None)["token_ids"]
        stop_row0 = int(free[0, 4])                  # the token row 0 generates at position 4
        if stop_row0 not in free[1, 3:]:
            break
    first0 = 2 + list(free[0, 2:]).index(stop_row0)  # its first generated occurrence
    counted = CountingLM(lm)
    out = generation.generate(counted, pad_batch(prompts, 14), stop_token_ids=(stop_row0,))
    mask = out["padding_mask"]
    assert mask[0, :first0 + 1].all() and not mask[0, first0 + 1:].any()
    assert stop_row0 not in free[1, 3:]              # row 1 never stops: all of it is kept
    assert mask[1].all()
    # tokens before every row stopped are those of the unstopped run
    np.testing.assert_array_equal(out["token_ids"][mask], free[mask])


def test_generation_stops_once_every_row_has_stopped():
    lm = tiny_lm(seed=3)
    prompts = [[2, 5], [2, 5]]
    free = lm.generate(pad_batch(prompts, 16), stop_token_ids=None)["token_ids"]
    stop = int(free[0, 3])
    counted = CountingLM(lm)
    out = generation.generate(counted, pad_batch(prompts, 16), stop_token_ids=(stop,))
    first = 2 + list(free[0, 2:]).index(stop)
    # one prefill call plus one call per generated position up to the first stop
    assert counted.calls == 1 + (first - 2 + 1)
    assert not out["padding_mask"][:, first + 1:].any()


def test_stop_token_inside_the_prompt_does_not_stop():
    prompt = [2, 5, 6]
    for seed in range(3, 40):   # a model that never generates 5 after this prompt
        lm = tiny_lm(seed=seed)
        free = lm.generate(pad_batch([prompt], 10), stop_token_ids=None)["token_ids"]
        if 5 not in free[0, 3:]:
            break
    assert 5 not in free[0, 3:]                      # 5 only occurs in the prompt
    out = lm.generate(pad_batch([prompt], 10), stop_token_ids=(5,))
    assert out["padding_mask"].all()
    np.testing.assert_array_equal(out["token_ids"], free)


def test_strip_prompt_on_arrays():
    lm = tiny_lm(seed=5)
    prompts = [[2, 5, 7], [2, 4]]
    x = pad_batch(prompts, 9)
    full = lm.generate(x, stop_token_ids=None)
    out = lm.generate(x, stop_token_ids=None, strip_prompt=True)
    for b, p in enumerate(prompts):
        n = 9 - len(p)
        assert out["token_ids"][b, :n].tolist() == full["token_ids"][b, len(p):].tolist()
        assert out["padding_mask"][b, :n].all() and not out["padding_mask"][b, n:].any()


# ---------------------------------------------------------------------------------- strings
def test_strings_through_a_preprocessor():
    pre = ToyPreprocessor(sequence_length=10)
    lm = tiny_lm(seed=6, preprocessor=pre)
    texts = lm.generate(["ab", "cdef"], max_length=10, stop_token_ids=None)
    assert isinstance(texts, list) and len(texts) == 2
    single = lm.generate("ab", max_length=10, stop_token_ids=None)
    assert single == texts[0]
    ids = pre.generate_preprocess(["ab"], 10)["token_ids"][0, :3].tolist()
    want = greedy_reference(lm, ids, 10)
    assert single == pre.tokenizer.detokenize([i for i in want if i >= 3])
    stripped = lm.generate("ab", max_length=10, stop_token_ids=None, strip_prompt=True)
    assert single == "ab" + stripped
    # "auto" stops at the tokenizer's end token (2)
    auto = lm.generate(["ab", "cdef"], max_length=10)
    assert isinstance(auto, list)


def test_seeded_sampling_is_reproducible_across_runs_and_batches():
    pre = ToyPreprocessor(sequence_length=14)
    lm = tiny_lm(seed=7, preprocessor=pre, sampler=samplers.TopKSampler(k=4, seed=123))
    a = lm.generate(["ab", "cdefg"], stop_token_ids=None)
    assert lm.generate(["ab", "cdefg"], stop_token_ids=None) == a          # same run twice
    assert lm.generate(["ab"], stop_token_ids=None) == a[:1]               # other batch
    assert lm.generate(["ab", "hhh", "c"], stop_token_ids=None)[0] == a[0]
    lm.compile(sampler=samplers.TopKSampler(k=4, seed=124))
    others = [lm.generate(["ab"], stop_token_ids=None)[0]]
    lm.compile(sampler=samplers.TopKSampler(k=4, seed=125))
    others.append(lm.generate(["ab"], stop_token_ids=None)[0])
    assert any(o != a[0] for o in others)


def test_unseeded_sampling_exposes_its_seed():
    lm = tiny_lm(seed=7, preprocessor=ToyPreprocessor(14), sampler="random")
    first = lm.generate("ab", stop_token_ids=None)
    seed = lm.sampler.last_seed
    assert isinstance(seed, int) and lm.sampler.seed is None
    lm2 = tiny_lm(seed=7, preprocessor=ToyPreprocessor(14), sampler=samplers.RandomSampler(seed=seed))
    assert lm2.generate("ab", stop_token_ids=None) == first


def test_per_request_seeds_make_a_prompts_text_independent_of_its_row():
    lm = tiny_lm(seed=7, preprocessor=ToyPreprocessor(14), sampler=samplers.TopKSampler(k=4, seed=9))
    a = lm.generate(["ab", "ab", "cd"], stop_token_ids=None)
    assert a[0] == a[1]                                           # same prompt, same seed, any row
    assert lm.generate(["cd", "ab"], stop_token_ids=None) == [a[2], a[0]]
    # one seed per prompt: each row's text is what that prompt gives alone with that seed
    mixed = lm.generate(["ab", "cd", "ab"], stop_token_ids=None, seed=[5, 6, 9])
    assert mixed[2] == a[0]
    assert mixed[0] == lm.generate("ab", stop_token_ids=None, seed=5)
    assert [mixed[1]] == lm.generate(["cd"], stop_token_ids=None, seed=[6])
    others = {lm.generate("ab", stop_token_ids=None, seed=s) for s in range(10, 16)}
    assert len(others) > 1                                        # the seed does change the text
    with pytest.raises(samplers.sampler.SamplerError, match="2 seeds for a batch of 3"):
        lm.generate(["ab", "cd", "ef"], seed=[1, 2])
    # the stream gives generate's text for the same seed
    assert "".join(lm.stream("ab", stop_token_ids=None, seed=5)) == lm.generate(
        "ab", stop_token_ids=None, seed=5, strip_prompt=True)
    # greedy ignores seeds
    greedy = tiny_lm(seed=7, preprocessor=ToyPreprocessor(14))
    assert greedy.generate(["ab"], seed=[3]) == greedy.generate(["ab"])


def test_unseeded_batches_draw_a_seed_per_row_and_expose_them():
    lm = tiny_lm(seed=7, preprocessor=ToyPreprocessor(14), sampler="random")
    texts = lm.generate(["ab"] * 6, stop_token_ids=None)
    seeds = lm.sampler.last_seed
    assert isinstance(seeds, list) and len(set(seeds)) == 6       # fresh per row: samples differ
    assert lm.generate(["ab"] * 6, stop_token_ids=None, seed=seeds) == texts


def test_top_k_one_generates_like_greedy():
    x = pad_batch([[2, 3, 4], [2, 8]], 11)
    greedy = tiny_lm(seed=8).generate(x, stop_token_ids=None)
    top1 = tiny_lm(seed=8, sampler=samplers.TopKSampler(k=1, seed=5)).generate(x, stop_token_ids=None)
    np.testing.assert_array_equal(greedy["token_ids"], top1["token_ids"])


def test_every_named_sampler_generates():
    x = pad_batch([[2, 3, 4], [2, 8]], 9)
    for name in ("greedy", "random", "top_k", "top_p", "beam", "contrastive", "min_p", "typical"):
        out = tiny_lm(seed=9, sampler=name).generate(x, stop_token_ids=(2,))
        assert out["token_ids"].shape == (2, 9)
        assert out["token_ids"][0, :3].tolist() == [2, 3, 4]


def test_beam_return_all_beams():
    lm = tiny_lm(seed=10, sampler=samplers.BeamSampler(num_beams=3, return_all_beams=True))
    x = pad_batch([[2, 3, 4], [2, 8, 5]], 7)
    out = lm.generate(x, stop_token_ids=None)
    assert out["token_ids"].shape == (2, 3, 7) and out["log_probs"].shape == (2, 3)
    assert (np.diff(out["log_probs"], axis=1) <= 0).all()
    for b in range(2):
        for j in range(3):
            seq = out["token_ids"][b, j]
            logits = full_logits(lm, [seq])[0]
            lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            score = sum(lsm[t - 1, seq[t]] for t in range(3, 7))
            assert out["log_probs"][b, j] == pytest.approx(score, rel=1e-9)
    texts = tiny_lm(seed=10, preprocessor=ToyPreprocessor(8),
                    sampler=samplers.BeamSampler(num_beams=3, return_all_beams=True)).generate(
        ["ab", "c"], stop_token_ids=None)
    assert len(texts) == 2 and all(len(t) == 3 for t in texts)


# ---------------------------------------------------------------------------------- streaming
def test_stream_pieces_and_log_probs():
    pre = ToyPreprocessor(sequence_length=12)
    lm = tiny_lm(seed=11, preprocessor=pre, sampler=samplers.TopKSampler(k=3, seed=99))
    pieces = list(lm.stream("abc", stop_token_ids=None))
    assert "".join(pieces) == lm.generate("abc", stop_token_ids=None, strip_prompt=True)
    tokens = list(generation.stream(lm, "abc", stop_token_ids=None, return_logprobs=True))
    assert "".join(t.text for t in tokens) == "".join(pieces)
    seq = [2, 3, 4, 5] + [t.token_id for t in tokens]
    logits = full_logits(lm, [seq])[0]
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for j, t in enumerate(tokens):
        assert t.log_prob == pytest.approx(lsm[3 + j, t.token_id], rel=1e-9)


def test_stream_stops_at_the_stop_token():
    pre = ToyPreprocessor(sequence_length=16)
    lm = tiny_lm(seed=12, preprocessor=pre)
    free = list(generation.stream(lm, "ab", stop_token_ids=None, return_logprobs=True))
    stop = free[2].token_id
    first = [t.token_id for t in free].index(stop)
    cut = list(generation.stream(lm, "ab", stop_token_ids=(stop,), return_logprobs=True))
    assert [t.token_id for t in cut] == [t.token_id for t in free[:first]]


def test_stream_with_beam_search_rescores():
    pre = ToyPreprocessor(sequence_length=8)
    lm = tiny_lm(seed=13, preprocessor=pre, sampler=samplers.BeamSampler(num_beams=2))
    tokens = list(lm.stream("ab", stop_token_ids=None, return_logprobs=True))
    assert "".join(t.text for t in tokens) == lm.generate("ab", stop_token_ids=None, strip_prompt=True)
    assert all(t.log_prob <= 0 for t in tokens)


# ---------------------------------------------------------------------------------- errors
def test_auto_stop_tokens_need_a_preprocessor():
    lm = tiny_lm()
    with pytest.raises(InputError, match="A `preprocessor` must be attached"):
        lm.generate(pad_batch([[2, 3]], 6))


@pytest.mark.parametrize("make,error,match", [
    (lambda: pad_batch([[2, 3]], 30), InputError, "exceeds the model's max_sequence_length 24"),
    (lambda: pad_batch([[2, 3, 4]], 3), InputError, "not above the prompt: row 0"),
    (lambda: pad_batch([[2, 3], []], 6), InputError, "row 1 has no prompt token"),
    (lambda: {"token_ids": np.array([[2, 3, 4, 0]]), "padding_mask": np.array([[1, 0, 1, 0]])},
     InputError, "row 0 is not right-padded"),
    (lambda: {"token_ids": np.array([[2, 99, 0]]), "padding_mask": np.array([[1, 1, 0]])},
     InputError, "id 99 is out of range"),
    (lambda: {"token_ids": np.array([[2.0, 3.0, 0]]), "padding_mask": np.array([[1, 1, 0]])},
     InputTypeError, "integer token ids"),
    (lambda: ["some text"], InputTypeError, "no preprocessor"),
    (lambda: {"ids": np.array([[2]])}, InputError, "expected keys"),
])
def test_bad_inputs_without_preprocessor(make, error, match):
    with pytest.raises(error, match=match):
        tiny_lm().generate(make(), stop_token_ids=None)


def test_bad_arguments_with_preprocessor():
    lm = tiny_lm(preprocessor=ToyPreprocessor(10))
    with pytest.raises(InputError, match="max_length=25 exceeds the model's max_sequence_length 24"):
        lm.generate("ab", max_length=25)
    with pytest.raises(InputError, match="max_length=4 is not above the prompt"):
        lm.generate("abcdef", max_length=4)
    with pytest.raises(InputError, match="max_length=0"):
        lm.generate("ab", max_length=0)
    with pytest.raises(InputTypeError, match="stop_token_ids"):
        lm.generate("ab", stop_token_ids="eos")
    with pytest.raises(InputError, match="out of range"):
        lm.generate("ab", stop_token_ids=(11,))
    with pytest.raises(InputTypeError, match="preprocessor"):
        lm.generate({"token_ids": [[2]], "padding_mask": [[1]]})
    with pytest.raises(InputTypeError, match="string"):
        lm.generate(5)
    with pytest.raises(InputError, match="preprocessor"):
        generation.stream(tiny_lm(), "ab").__next__()


def test_logits_processors_in_generation():
    x = pad_batch([[2, 5], [2, 6, 7]], 14)
    plain = tiny_lm(seed=3).generate(x, stop_token_ids=None)["token_ids"]
    assert any(len(set(zip(r[:-1], r[1:]))) < len(r) - 1 for r in plain.tolist())  # it repeats
    for sampler in (samplers.GreedySampler(no_repeat_ngram_size=2),
                    samplers.TopKSampler(k=3, seed=1, no_repeat_ngram_size=2),
                    samplers.BeamSampler(num_beams=2, no_repeat_ngram_size=2),
                    samplers.ContrastiveSampler(k=3, no_repeat_ngram_size=2)):
        out = tiny_lm(seed=3, sampler=sampler).generate(x, stop_token_ids=None)["token_ids"]
        for row in out.tolist():
            bigrams = list(zip(row[:-1], row[1:]))
            assert len(set(bigrams)) == len(bigrams), (sampler, row)
    penalised = tiny_lm(seed=3, sampler=samplers.GreedySampler(repetition_penalty=50.0)).generate(
        x, stop_token_ids=None)["token_ids"]
    for b, prompt in enumerate([[2, 5], [2, 6, 7]]):
        seq = list(prompt)                               # the penalty written out, no cache
        while len(seq) < 14:
            logits = full_logits(tiny_lm(seed=3), [seq])[0, -1].copy()
            for t in set(seq):
                logits[t] = logits[t] * 50.0 if logits[t] < 0 else logits[t] / 50.0
            seq.append(int(np.argmax(logits)))
        assert penalised[b].tolist() == seq
    assert (penalised != plain).any()
