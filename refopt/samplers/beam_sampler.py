"""``BeamSampler``: beam search (KerasHub's)."""

from __future__ import annotations

import numpy as np

from refopt.errors import SamplerError
from refopt.limits import check_allocation
from refopt.samplers.sampler import (Sampler, Step, cache_nbytes, check_positive_int, is_kv_cache,
                                     map_cache, stop_mask, top_k_indices)

MAX_BEAMS = 4096     # each beam is a row of every decode step: beyond this, work without end


class BeamSampler(Sampler):
    """Beam search, KerasHub's algorithm.

    Each prompt row becomes ``num_beams`` rows (beam 0 has log-likelihood 0, the others ``-1e9`` so
    the first step expands only beam 0).  Each step adds ``log p(token)`` to every beam's running
    log-likelihood, keeps the ``num_beams`` best of the ``num_beams * V`` candidates per prompt
    (largest first, ties by lower flat index ``beam * V + token``), reorders the beams and their
    caches (every array of any cache structure, as KerasHub's ``tree.map_structure``; of refopt's
    own KV cache only the positions filled so far), and writes the new tokens (prompt tokens are kept where ``mask`` is set).  With
    ``stop_token_ids`` the search ends once *every* beam holds a stop token past its prompt; beams
    keep accumulating after their stop token, as in KerasHub.

    Args:
        num_beams: int from 1 to 4096, default 5.
        return_all_beams: when True the call returns ``(token_ids [B, num_beams, T],
            log_likelihoods [B, num_beams])`` sorted best first; otherwise the best beam
            ``[B, T]`` (the first of equal ones).
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.
    """

    def __init__(self, num_beams=5, return_all_beams=False, **kwargs):
        super().__init__(**kwargs)
        self.num_beams = check_positive_int(num_beams, "num_beams", "BeamSampler")
        if self.num_beams > MAX_BEAMS:
            raise SamplerError(f"BeamSampler: num_beams={self.num_beams}; refopt searches at most "
                               f"{MAX_BEAMS} beams per prompt")
        self.return_all_beams = bool(return_all_beams)

    def steps(self, next, prompt, cache=None, index=0, mask=None, stop_token_ids=None,
              hidden_states=None, model=None, log_probs=False):
        prompt = np.asarray(prompt)
        B, T = prompt.shape
        nb = self.num_beams
        start = index = int(index)
        mask = np.zeros(prompt.shape, bool) if mask is None else np.asarray(mask, bool)
        stop = None if stop_token_ids is None else np.asarray(list(stop_token_ids), prompt.dtype)
        check_allocation((cache_nbytes(cache) + 2 * prompt.nbytes) * nb,
                         f"BeamSampler(num_beams={nb}) over {B} prompts of length {T}", SamplerError)
        prompt = np.repeat(prompt, nb, axis=0)                                 # [B*nb, T]
        mask = np.repeat(mask, nb, axis=0)
        kv_cache = is_kv_cache(cache, model)
        cache = map_cache(lambda x: np.repeat(x, nb, axis=0), cache)           # [B*nb, ...]
        scores = None                                                          # [B*nb]
        while index < T:
            if stop is not None and stop_mask(prompt, stop, mask, index).all():
                break
            logits, _, cache = next(prompt, cache, index)                       # [B*nb, V]
            logits = self.process_logits(logits, prompt, index)
            probs = self.compute_probabilities(logits)
            V = probs.shape[-1]
            if scores is None:
                scores = np.tile(np.array([0.0] + [-1e9] * (nb - 1), probs.dtype), B)
            with np.errstate(divide="ignore"):
                candidates = np.log(probs) + scores[:, None]                   # [B*nb, V]
            candidates = candidates.reshape(B, nb * V)
            best = top_k_indices(candidates, nb)                               # [B, nb]
            scores = np.take_along_axis(candidates, best, axis=-1).reshape(-1)
            source = (np.arange(B)[:, None] * nb + best // V).reshape(-1)      # beam each came from
            prompt = prompt[source]
            if kv_cache:                           # only positions < index are filled so far
                cache[:, :, :, :index] = cache[source, :, :, :index]
            else:                                  # any other structure: every array's rows
                cache = map_cache(lambda x: x[source], cache)
            token = (best % V).reshape(-1).astype(prompt.dtype)
            prompt[:, index] = np.where(mask[:, index], prompt[:, index], token)
            index += 1

        all_prompts = prompt.reshape(B, nb, T)
        all_scores = (np.zeros(B * nb) if scores is None else scores).reshape(B, nb)
        order = np.argsort(-all_scores, axis=-1, kind="stable")                # best first
        top = all_prompts[np.arange(B), order[:, 0]]                           # [B, T]
        if index > start:
            yield Step(start, index, top[:, start:index], None)
        if self.return_all_beams:
            return (np.take_along_axis(all_prompts, order[:, :, None], axis=1),
                    np.take_along_axis(all_scores, order, axis=1))
        return top

    def get_config(self):
        return {**super().get_config(), "num_beams": self.num_beams,
                "return_all_beams": self.return_all_beams}
