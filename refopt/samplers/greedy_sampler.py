"""``GreedySampler``: always the most probable token (KerasHub's)."""

import numpy as np

from refopt.samplers.sampler import Sampler, one_hot_argmax


class GreedySampler(Sampler):
    """Greedy search: the token of largest probability (the first one on ties).

    ``temperature`` does not change the choice.  As a speculative ``base_sampler`` its distribution
    is the one-hot vector of the arg-max.
    """

    def device_spec(self):
        return self._spec(GreedySampler, "greedy")

    def get_next_token(self, probabilities):
        return np.argmax(np.asarray(probabilities), axis=-1)

    def next_token_distribution(self, probabilities):
        return one_hot_argmax(np.asarray(probabilities))
