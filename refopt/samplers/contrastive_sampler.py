"""``ContrastiveSampler``: contrastive search (Su et al., 2022; KerasHub's)."""

from __future__ import annotations

import numpy as np

from refopt.limits import check_allocation
from refopt.samplers.sampler import (Sampler, Step, cache_nbytes, check_float, check_positive_int,
                                     is_kv_cache, map_cache, stop_mask, top_k_indices)


def cosine_similarity(h_prev, h_new):
    # h_prev [N, T, E], h_new [N, E] -> [N, T]: cos(h_prev[n, t], h_new[n])
    dots = np.einsum("nte,ne->nt", h_prev, h_new)
    norms = np.linalg.norm(h_prev, axis=-1) * np.linalg.norm(h_new, axis=-1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return dots / norms


class ContrastiveSampler(Sampler):
    """Contrastive search, KerasHub's formula.

    At position ``t``, for each of the ``k`` most probable candidates ``v`` (largest first, ties by
    lower token id), run the model on ``v`` to get its hidden state ``h_v``, and score

        score(v) = (1 - alpha) * p(v | x_<t) - alpha * max_{j < t} cos(h_j, h_v)

    where ``h_j`` are the hidden states (the final-norm output) of the tokens before ``t``.  The
    candidate of highest score wins (the first on ties); its logits, hidden state and cache are
    kept, so no step is recomputed.  The cache may be any structure of arrays (KerasHub maps over
    it); of refopt's own KV cache only the filled positions are copied.  Where ``mask`` is set the prompt token is kept.

    Args:
        k: int >= 1, default 5.
        alpha: float in [0, 1], default 0.6; the weight of the degeneration penalty.
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.

    Stopping: the search ends once every row has a stop token at a generated position (KerasHub
    looks at every non-prompt position, including not yet generated padding; the two agree unless
    the padding id is itself a stop token).
    """

    def __init__(self, k=5, alpha=0.6, **kwargs):
        super().__init__(**kwargs)
        self.k = check_positive_int(k, "k", "ContrastiveSampler")
        self.alpha = check_float(alpha, "alpha", "ContrastiveSampler", 0.0, 1.0, low_open=False)

    def steps(self, next, prompt, cache=None, index=0, mask=None, stop_token_ids=None,
              hidden_states=None, model=None, log_probs=False):
        from refopt.errors import SamplerError

        if hidden_states is None:
            raise SamplerError("ContrastiveSampler needs `hidden_states` (the prompt's hidden "
                               "states [B, T, E]), but received None")
        prompt = np.array(prompt, copy=True)                                   # [B, T]
        B, T = prompt.shape
        k = self.k
        index = int(index)
        mask = np.zeros(prompt.shape, bool) if mask is None else np.asarray(mask, bool)
        stop = None if stop_token_ids is None else np.asarray(list(stop_token_ids), prompt.dtype)
        hidden_states = np.array(hidden_states, copy=True)                     # [B, T, E]
        check_allocation((hidden_states.nbytes + cache_nbytes(cache))
                         * k, f"ContrastiveSampler(k={k}) over {B} prompts", SamplerError)
        logits, _, cache = next(prompt, cache, index)                           # [B, V] for `index`
        kv_cache = is_kv_cache(cache, model)
        rows = np.arange(B)
        while index < T:
            if stop is not None and stop_mask(prompt, stop, mask, index).all():
                break
            processed = self.process_logits(logits, prompt, index)
            probs = self.compute_probabilities(processed)                     # [B, V]
            candidates = top_k_indices(probs, min(k, probs.shape[-1]))         # [B, k]
            kk = candidates.shape[1]
            cand_probs = np.take_along_axis(probs, candidates, axis=-1)        # [B, k]

            # every candidate becomes a row: [B*k, ...], row b*k + j = candidate j of prompt b
            prompt_beams = np.repeat(prompt, kk, axis=0)
            mask_beams = np.repeat(mask, kk, axis=0)
            hidden_beams = np.repeat(hidden_states, kk, axis=0)                # [B*k, T, E]
            # the candidates share positions < index: of refopt's KV cache only the filled part is
            # copied; any other cache structure is repeated whole
            filled = (lambda x: x[:, :, :, :index + 1]) if kv_cache else (lambda x: x)
            cache_beams = map_cache(lambda x: np.repeat(filled(x), kk, axis=0), cache)
            token = candidates.reshape(-1).astype(prompt.dtype)
            prompt_beams[:, index] = np.where(mask_beams[:, index], prompt_beams[:, index], token)

            next_logits, next_hidden, cache_beams = next(prompt_beams, cache_beams, index + 1)
            similarity = cosine_similarity(hidden_beams, next_hidden)         # [B*k, T]
            similarity = np.where(np.arange(T)[None, :] < index, similarity, -1.0)
            max_similarity = similarity.max(axis=-1).astype(cand_probs.dtype)  # [B*k]
            score = (1 - self.alpha) * cand_probs.reshape(-1) - self.alpha * max_similarity
            best = np.argmax(score.reshape(B, kk), axis=-1)                    # [B]
            chosen = rows * kk + best

            prompt = prompt_beams[chosen]
            if kv_cache:
                cache[:, :, :, index] = cache_beams[chosen, :, :, index]
            else:
                cache = map_cache(lambda x: x[chosen], cache_beams)
            hidden_states[:, index] = next_hidden[chosen]
            lp = None
            if log_probs:
                lp = self.token_log_probs(processed, prompt[:, index])[:, None]
            yield Step(index, index + 1, prompt[:, index:index + 1].copy(), lp)
            logits = next_logits[chosen]
            index += 1
        return prompt

    def get_config(self):
        return {**super().get_config(), "k": self.k, "alpha": self.alpha}
