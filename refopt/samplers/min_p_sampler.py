"""``MinPSampler``: keep tokens at least ``min_p`` times as probable as the most probable one
(transformers' ``min_p``; Nguyen et al., 2024, "Min P sampling")."""

import numpy as np

from refopt import philox
from refopt.samplers.sampler import Sampler, check_float, check_positive_int


class MinPSampler(Sampler):
    """Min-p sampling, transformers' ``MinPLogitsWarper`` rule: keep token ``i`` when
    ``p_i >= min_p * max(p)``, and always the ``min_tokens_to_keep`` most probable tokens (ties by
    lower token id); renormalise and draw.

    Args:
        min_p: float in [0, 1], default 0.05 (0 keeps everything, 1 keeps only the maximum and its
            ties).
        min_tokens_to_keep: int >= 1, default 1.
        seed: optional int; see :class:`refopt.samplers.RandomSampler`.
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.
    """

    stochastic = True

    def __init__(self, min_p=0.05, min_tokens_to_keep=1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.min_p = check_float(min_p, "min_p", "MinPSampler", 0.0, 1.0, low_open=False)
        self.min_tokens_to_keep = check_positive_int(min_tokens_to_keep, "min_tokens_to_keep",
                                                     "MinPSampler")
        self.seed = philox.check_seeds(seed)

    def device_spec(self):
        return self._spec(MinPSampler, "min_p", min_p=self.min_p, k=self.min_tokens_to_keep)

    def next_token_distribution(self, probabilities):
        p = np.asarray(probabilities, np.float64)                              # [B, V]
        return self.ops.min_p_distribution(p, self.min_p, self.min_tokens_to_keep)

    def get_config(self):
        return {**super().get_config(), "min_p": self.min_p,
                "min_tokens_to_keep": self.min_tokens_to_keep, "seed": self.seed}
