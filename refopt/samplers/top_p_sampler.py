"""``TopPSampler``: nucleus sampling (KerasHub's, with its optional top-k cutoff)."""

import numpy as np

from refopt import philox
from refopt.samplers.sampler import Sampler, check_float, check_positive_int


class TopPSampler(Sampler):
    """Top-p (nucleus) sampling, KerasHub's rule.

    Sort the tokens by probability (largest first, ties by lower token id), optionally keep only the
    first ``k``; accumulate the sorted probabilities left to right in float64; keep the first token
    and every token whose *preceding* cumulative sum is ``<= p`` (so the smallest prefix whose sum
    exceeds ``p`` is kept whole); renormalise and draw.

    Args:
        p: float in (0, 1], default 0.1 (KerasHub's).
        k: optional int >= 1; the top-k cutoff applied before the top-p one.
        seed: optional int; see :class:`refopt.samplers.RandomSampler`.
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.
    """

    stochastic = True

    def __init__(self, p=0.1, k=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.p = check_float(p, "p", "TopPSampler", 0.0, 1.0, low_open=True)
        self.k = None if k is None else check_positive_int(k, "k", "TopPSampler")
        self.seed = philox.check_seeds(seed)

    def device_spec(self):
        return self._spec(TopPSampler, "top_p", p=self.p, k=self.k)

    def next_token_distribution(self, probabilities):
        p = np.asarray(probabilities, np.float64)                              # [B, V]
        return self.ops.top_p_distribution(p, self.p, self.k)

    def get_config(self):
        return {**super().get_config(), "p": self.p, "k": self.k, "seed": self.seed}
