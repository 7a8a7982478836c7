"""``RandomSampler``: a draw from the whole distribution (KerasHub's)."""

import numpy as np

from refopt import philox
from refopt.samplers.sampler import Sampler


class RandomSampler(Sampler):
    """Random sampling: every token, with its probability.

    Args:
        seed: optional int in [0, 2**64), the seed of every row, or a list of them, one per row;
            the draw at position ``i`` of a row uses the Philox uniform of ``(row's seed, i)`` (see
            :mod:`refopt.philox`), so a prompt's text depends on its seed, not on its row.  Without
            a seed, each generation draws one per row and keeps them in ``last_seed``.
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.
    """

    stochastic = True

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = philox.check_seeds(seed)

    def device_spec(self):
        return self._spec(RandomSampler, "random")

    def next_token_distribution(self, probabilities):
        return np.asarray(probabilities, np.float64)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
