"""``RandomSampler``: a draw from the whole distribution (KerasHub's)."""

import numpy as np

from refopt import random as prandom
from refopt.samplers.sampler import Sampler


class RandomSampler(Sampler):
    """Random sampling: every token, with its probability.

    Args:
        seed: optional int in [0, 2**64); the draw at position ``i`` of batch row ``r`` uses the
            Philox uniform of ``(seed, r, i)`` (see :mod:`refopt.random`).  Without a seed, each
            generation draws one and keeps it in ``last_seed``.
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.
    """

    stochastic = True

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = prandom.check_seed(seed)

    def device_spec(self):
        return self._spec(RandomSampler, "random")

    def next_token_distribution(self, probabilities):
        return np.asarray(probabilities, np.float64)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
