"""Samplers: how ``generate`` turns the model's distribution into tokens (KerasHub's family).

``GreedySampler``, ``RandomSampler``, ``TopKSampler`` (the default of ``compile``), ``TopPSampler``,
``BeamSampler``, ``ContrastiveSampler``, ``SpeculativeSampler`` -- KerasHub's arguments and
behaviour -- and, as transformers offers them, ``MinPSampler``, ``TypicalSampler`` and the logits
processors ``RepetitionPenaltyProcessor`` / ``NoRepeatNGramProcessor`` (also reachable as the
``repetition_penalty=`` / ``no_repeat_ngram_size=`` arguments of every sampler).

Random choices use the counter-based Philox generator of :mod:`refopt.philox`, keyed by
``(the row's seed, position)``: seeds are per request (``generate(..., seed=[s0, s1])``, or the
sampler's ``seed`` for every row), and a prompt's tokens depend on its seed, never on its row in
the batch or on the other prompts.
"""

from refopt.samplers.beam_sampler import BeamSampler
from refopt.samplers.contrastive_sampler import ContrastiveSampler
from refopt.samplers.greedy_sampler import GreedySampler
from refopt.samplers.logits_processors import NoRepeatNGramProcessor, RepetitionPenaltyProcessor
from refopt.samplers.min_p_sampler import MinPSampler
from refopt.samplers.random_sampler import RandomSampler
from refopt.samplers.sampler import Sampler, SamplerSpec, Step
from refopt.samplers.serialization import deserialize, get, serialize
from refopt.samplers.speculative_sampler import SpeculativeSampler
from refopt.samplers.top_k_sampler import TopKSampler
from refopt.samplers.top_p_sampler import TopPSampler
from refopt.samplers.typical_sampler import TypicalSampler

__all__ = [
    "Sampler", "SamplerSpec", "Step", "GreedySampler", "RandomSampler", "TopKSampler", "TopPSampler", "BeamSampler",
    "ContrastiveSampler", "SpeculativeSampler", "MinPSampler", "TypicalSampler",
    "RepetitionPenaltyProcessor", "NoRepeatNGramProcessor", "get", "serialize", "deserialize",
]
