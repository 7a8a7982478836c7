"""``TypicalSampler``: locally typical sampling (Meister et al., 2022; transformers' ``typical_p``)."""

import numpy as np

from refopt import philox
from refopt.samplers.sampler import Sampler, check_float, check_positive_int


class TypicalSampler(Sampler):
    """Locally typical sampling, transformers' ``TypicalLogitsWarper`` rule.

    With ``H = -sum p log p`` (the entropy), order the tokens by ``|-log p_i - H|`` (closest to the
    entropy first, ties by lower token id), accumulate their probabilities in that order (float64,
    left to right), find the first position ``j`` whose cumulative sum reaches ``p`` (the last
    position when none does), and keep every token whose score is ``<=`` the score at ``j``, plus
    the first ``min_tokens_to_keep`` tokens of the order; renormalise and draw.

    Args:
        p: float in (0, 1], default 0.9 (transformers' ``typical_p`` default mass).
        min_tokens_to_keep: int >= 1, default 1.
        seed: optional int; see :class:`refopt.samplers.RandomSampler`.
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.
    """

    stochastic = True

    def __init__(self, p=0.9, min_tokens_to_keep=1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.p = check_float(p, "p", "TypicalSampler", 0.0, 1.0, low_open=True)
        self.min_tokens_to_keep = check_positive_int(min_tokens_to_keep, "min_tokens_to_keep",
                                                     "TypicalSampler")
        self.seed = philox.check_seeds(seed)

    def next_token_distribution(self, probabilities):
        p = np.asarray(probabilities, np.float64)                              # [B, V]
        B, V = p.shape
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(p)                                                   # -inf where p == 0
            entropy = -np.nansum(p * logp, axis=-1, keepdims=True)             # [B, 1]
            score = np.abs(-logp - entropy)                                    # inf where p == 0
        order = np.argsort(score, axis=-1, kind="stable")                      # most typical first
        sorted_score = np.take_along_axis(score, order, axis=-1)
        cumulative = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
        last = np.minimum((cumulative < self.p).sum(axis=-1), V - 1)           # [B]
        threshold = sorted_score[np.arange(B), last][:, None]
        keep_sorted = sorted_score <= threshold
        keep_sorted[:, :self.min_tokens_to_keep] = True
        keep = np.zeros((B, V), bool)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        return np.where(keep, p, 0.0)

    def get_config(self):
        return {**super().get_config(), "p": self.p, "min_tokens_to_keep": self.min_tokens_to_keep,
                "seed": self.seed}
