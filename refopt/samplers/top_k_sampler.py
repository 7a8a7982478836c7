"""``TopKSampler``: a draw among the ``k`` most probable tokens (KerasHub's default sampler)."""

import numpy as np

from refopt import philox
from refopt.samplers.sampler import Sampler, check_positive_int


class TopKSampler(Sampler):
    """Top-k sampling: keep the ``k`` most probable tokens (ties broken towards the lower token id),
    renormalise, draw.

    Args:
        k: int >= 1, default 5 (KerasHub's); ``k`` larger than the vocabulary keeps every token.
        seed: optional int; see :class:`refopt.samplers.RandomSampler`.
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.
    """

    stochastic = True

    def __init__(self, k=5, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.k = check_positive_int(k, "k", "TopKSampler")
        self.seed = philox.check_seeds(seed)

    def device_spec(self):
        return self._spec(TopKSampler, "top_k", k=self.k)

    def next_token_distribution(self, probabilities):
        p = np.asarray(probabilities, np.float64)                              # [B, V]
        return np.where(self.ops.top_k_mask(p, self.k), p, 0.0)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "seed": self.seed}
