"""Logits processors usable with any sampler (transformers' semantics).

A processor is a callable ``(logits [B, V], token_ids [B, T], index) -> logits [B, V]``: positions
``0 .. index-1`` of ``token_ids`` are the sequence so far (prompt and generated tokens; the token at
``index`` is being chosen).  Samplers apply them before the temperature, as transformers applies
its processors before its warpers.  Pass them as ``Sampler(repetition_penalty=...,
no_repeat_ngram_size=..., logits_processors=[...])``.
"""

from __future__ import annotations

import numpy as np

from refopt.errors import SamplerError


class RepetitionPenaltyProcessor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` (Keskar et al., 2019): the logit of every
    token already in the sequence is divided by ``penalty`` when positive and multiplied by it when
    negative, so ``penalty > 1`` discourages repeats and ``penalty < 1`` encourages them."""

    def __init__(self, penalty):
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float, np.floating)) or not (
                np.isfinite(penalty) and penalty > 0):
            raise SamplerError(f"repetition_penalty={penalty!r}; expected a finite number > 0")
        self.penalty = float(penalty)

    def __call__(self, logits, token_ids, index):
        out = np.array(logits, copy=True)                                      # [B, V]
        for b in range(out.shape[0]):
            seen = np.unique(np.asarray(token_ids)[b, :index])                 # tokens so far
            vals = out[b, seen]
            out[b, seen] = np.where(vals < 0, vals * self.penalty, vals / self.penalty)
        return out

    def get_config(self):
        return {"penalty": self.penalty}


class NoRepeatNGramProcessor:
    """transformers' ``NoRepeatNGramLogitsProcessor``: forbids (logit ``-inf``) every token that
    would complete an n-gram of size ``ngram_size`` already present in the sequence."""

    def __init__(self, ngram_size):
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, (int, np.integer)) or ngram_size < 1:
            raise SamplerError(f"no_repeat_ngram_size={ngram_size!r}; expected an integer >= 1")
        self.ngram_size = int(ngram_size)

    def banned_tokens(self, sequence):
        """Tokens that would repeat an n-gram of ``sequence`` (1-D) if appended to it."""
        n = self.ngram_size
        if len(sequence) < n:                                                  # no n-gram yet
            return np.zeros(0, np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(sequence, n)       # [len-n+1, n]
        prefix = sequence[len(sequence) - n + 1:]                              # last n-1 tokens
        hits = (windows[:, :-1] == prefix[None, :]).all(axis=-1)
        return np.unique(windows[hits, -1])

    def __call__(self, logits, token_ids, index):
        out = np.array(logits, copy=True)                                      # [B, V]
        token_ids = np.asarray(token_ids)
        for b in range(out.shape[0]):
            out[b, self.banned_tokens(token_ids[b, :index])] = -np.inf
        return out

    def get_config(self):
        return {"ngram_size": self.ngram_size}
