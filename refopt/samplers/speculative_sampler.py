"""``SpeculativeSampler``: speculative decoding with a draft ``OPTCausalLM`` (Leviathan et al., 2023,
"Fast Inference from Transformers via Speculative Decoding"; Chen et al., 2023).

KerasHub's arguments (``num_speculative_tokens=5``, ``base_sampler=None``, ``seed=None``) plus
``draft_model``: the small model that proposes tokens.  Each cycle, at position ``i``:

1. **Draft** ``kk = min(num_speculative_tokens, T - 1 - i)`` tokens with the draft model, one at a
   time: token ``x_j`` (position ``i + j``) is drawn from the draft's distribution ``q_j`` (the
   ``base_sampler``'s distribution applied to the draft's probabilities; the arg-max when there is
   no base sampler) with the Philox uniform of ``(row's seed, i + j, STREAM_DRAFT)``.
2. **Verify**: one target forward pass over positions ``i - 1 .. i + kk - 1`` gives the target's
   distributions ``p_0 .. p_kk`` (same construction as ``q``).
3. **Accept** ``x_j`` when ``u_j * q_j(x_j) < p_j(x_j)`` with ``u_j`` the uniform of
   ``(row's seed, i + j, STREAM_ACCEPT)`` -- probability ``min(1, p/q)``.  Positions the prompt fixes
   (``mask``) are always accepted.  ``m_b`` = the length of row ``b``'s accepted prefix.
4. The batch advances by ``m = min_b m_b`` plus one token at position ``i + m``: row ``b``'s accepted
   draft token if ``m_b > m``; else a draw from the residual ``max(0, p_m - q_m)`` (renormalised;
   ``p_m`` if it is all zero) when ``m < kk``; else a draw from ``p_kk`` -- with the uniform of
   ``(row's seed, i + m, STREAM_RESIDUAL)``.

Every emitted token is therefore distributed exactly as the base sampler would draw it from the
target (the rejection-sampling argument; cutting the batch at ``m`` depends only on other rows'
randomness).  Without a base sampler, ``q`` and ``p`` are one-hot, a draft token is accepted iff it
is the target's arg-max, and the output is the target's greedy output.  The target's logits
processors and temperature are this sampler's own (``base_sampler``'s temperature is set to this
sampler's, as KerasHub does); the base sampler supplies only the truncation (top-k, top-p, ...).

Caches: the target's KV cache is the one ``generate`` built; the draft keeps its own, which it
catches up (feeding the tokens it has not yet seen) before each proposal.

Differences from KerasHub: KerasHub always proposes the draft's arg-max yet accepts against its
softmax, and resamples row by row without the per-row accepted prefix; that does not preserve the
target distribution, so refopt follows the published algorithm instead.
"""

from __future__ import annotations

import numpy as np

from refopt import philox
from refopt.errors import SamplerError
from refopt.samplers.sampler import (Sampler, Step, check_positive_int, normalize, one_hot_argmax)


class SpeculativeSampler(Sampler):
    """Speculative decoding driven by a draft model (see the module docstring).

    Args:
        draft_model: the draft ``OPTCausalLM`` (anything with ``call_with_cache``, ``new_cache``
            and ``backbone.config``); its vocabulary size must equal the target's.  Required before
            ``generate``; not part of ``get_config`` (pass it again after ``from_config``).
        num_speculative_tokens: int >= 1, default 5: tokens drafted per cycle.
        base_sampler: optional sampler (object, name or config) whose distribution both models
            draw from (stochastic acceptance); None = greedy acceptance.
        seed: optional int (every row) or list of ints (one per row); keys the Philox streams
            (``last_seed`` when drawn).
        temperature, repetition_penalty, no_repeat_ngram_size, logits_processors: see ``Sampler``.
    """

    stochastic = True

    def __init__(self, draft_model=None, num_speculative_tokens=5, base_sampler=None, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_speculative_tokens = check_positive_int(
            num_speculative_tokens, "num_speculative_tokens", "SpeculativeSampler")
        if base_sampler is not None:
            from refopt.samplers.serialization import get

            base_sampler = get(base_sampler)
            if not isinstance(base_sampler, Sampler) or (
                    type(base_sampler).next_token_distribution is Sampler.next_token_distribution):
                raise SamplerError(
                    f"SpeculativeSampler: base_sampler {base_sampler!r} must be a token-level "
                    "sampler with next_token_distribution() (greedy, random, top_k, top_p, min_p, "
                    "typical), not beam, contrastive or speculative")
            base_sampler.temperature = self.temperature
        self.base_sampler = base_sampler
        self.seed = philox.check_seeds(seed)
        self.draft_model = draft_model
        if draft_model is not None:
            _check_draft(draft_model)

    # ------------------------------------------------------------------ checks
    def check_model(self, model) -> None:
        if self.draft_model is None:
            raise SamplerError("SpeculativeSampler needs a draft model: "
                               "SpeculativeSampler(draft_model=small_lm, ...)")
        target_v = _vocabulary_size(model, "target model")
        draft_v = _vocabulary_size(self.draft_model, "draft model")
        if target_v != draft_v:
            raise SamplerError(f"SpeculativeSampler: the draft model's vocabulary ({draft_v} tokens) "
                               f"differs from the target model's ({target_v} tokens); both must "
                               "share one vocabulary")

    # ------------------------------------------------------------------ distributions
    def _distribution(self, logits, token_ids, index):
        # logits [B, V] at `index` -> the distribution tokens are drawn from, rows sum to one
        probs = self.compute_probabilities(self.process_logits(logits, token_ids, index))
        if self.base_sampler is None:
            return one_hot_argmax(probs)
        return normalize(self.base_sampler.next_token_distribution(probs))

    # ------------------------------------------------------------------ the loop
    def steps(self, next, prompt, cache=None, index=0, mask=None, stop_token_ids=None,
              hidden_states=None, model=None, log_probs=False, seed=None, draft_next=None,
              draft_cache=None, verify_next=None):
        """KerasHub's sampler protocol, with ``seed`` (this loop's seed(s), overriding the
        sampler's) and three optional arguments of its own.

        Args:
            draft_next: ``draft_next(prompt, draft_cache, index) -> (logits [B, V], hidden,
                draft_cache)``, the draft's distribution for ``index`` (feeding the token at
                ``index - 1``); built from ``draft_model`` when absent.
            draft_cache: the draft's KV cache when ``draft_next`` is given (valid up to
                ``index - 1``); built and filled with the prompt otherwise.
            verify_next: ``verify_next(prompt, cache, index, k) -> (logits [B, k+1, V], cache)``
                or ``(logits, hidden, cache)``, the target on positions ``index - 1 .. index + k -
                1``; built from ``model.call_with_cache`` when absent (falling back to ``k + 1``
                calls of ``next``).
        """
        prompt = np.array(prompt, copy=True)                                   # [B, T]
        B, T = prompt.shape
        rows = np.arange(B)
        index = int(index)
        mask = np.zeros(prompt.shape, bool) if mask is None else np.asarray(mask, bool)
        stop = None if stop_token_ids is None else np.asarray(list(stop_token_ids), prompt.dtype)
        generated = np.arange(T)[None, :] >= mask.sum(axis=-1)[:, None]
        finished = np.zeros(B, bool)
        seeds = self.begin(B, model=model, seed=seed)
        if self.base_sampler is not None:
            self.base_sampler.begin(B, model=model)                           # its ops: the model's

        if draft_next is None:
            draft_next, draft_cache = self._draft_from_model(prompt, index, T)
        draft_valid = index - 1                          # draft cache holds positions < draft_valid
        if verify_next is None:
            verify_next = _verify_from(model, next)

        while index < T and not (stop is not None and finished.all()):
            kk = min(self.num_speculative_tokens, T - 1 - index)
            # 1. draft kk tokens
            current = prompt.copy()
            q = []
            for j in range(kk):
                pos = index + j
                for p in range(draft_valid + 1, pos + 1):                      # catch up, then propose
                    d_logits, _, draft_cache = draft_next(current, draft_cache, p)
                draft_valid = pos
                q.append(self._distribution(d_logits, current, pos))
                x = philox.choose(q[-1], philox.uniform(seeds, pos, philox.STREAM_DRAFT))
                current[:, pos] = np.where(mask[:, pos], prompt[:, pos], x)
            # 2. verify: the target's logits for positions index .. index + kk
            result = verify_next(current, cache, index, kk)
            t_logits, cache = result[0], result[-1]                            # [B, kk+1, V]
            p = [self._distribution(t_logits[:, j], current, index + j) for j in range(kk + 1)]
            # 3. accept or reject each draft token
            accepted = np.ones((B, 0), bool)
            if kk:
                x = current[:, index:index + kk]                               # [B, kk]
                px = np.stack([p[j][rows, x[:, j]] for j in range(kk)], axis=1)
                qx = np.stack([q[j][rows, x[:, j]] for j in range(kk)], axis=1)
                u = np.stack([philox.uniform(seeds, index + j, philox.STREAM_ACCEPT)
                              for j in range(kk)], axis=1)
                accepted = (u * qx < px) | mask[:, index:index + kk]
            n_accepted = np.cumprod(accepted, axis=1).sum(axis=1)              # [B]
            m = int(n_accepted.min())
            # 4. positions index .. index+m-1 take the accepted drafts; index+m one more token
            pos = index + m
            if m < kk:
                residual = np.maximum(p[m] - q[m], 0.0)
                empty = residual.sum(axis=-1) <= 0
                residual[empty] = p[m][empty]
                fresh = philox.choose(residual, philox.uniform(seeds, pos,
                                                                 philox.STREAM_RESIDUAL))
                token = np.where(n_accepted > m, current[:, pos], fresh)
            else:
                token = philox.choose(p[kk], philox.uniform(seeds, pos, philox.STREAM_RESIDUAL))
            token = np.where(mask[:, pos], prompt[:, pos], token)
            prompt[:, index:pos] = current[:, index:pos]
            prompt[:, pos] = token
            for j in range(index, pos + 1):
                if stop is not None:
                    finished |= generated[:, j] & np.isin(prompt[:, j], stop)
            draft_valid = min(draft_valid, pos)
            lp = None
            if log_probs:
                lp = np.stack([self.token_log_probs(
                    self.process_logits(t_logits[:, j], prompt, index + j), prompt[:, index + j])
                    for j in range(m + 1)], axis=1)
            yield Step(index, pos + 1, prompt[:, index:pos + 1].copy(), lp)
            index = pos + 1
        return prompt

    def _draft_from_model(self, prompt, index, T):
        draft = self.draft_model
        if draft is None:
            raise SamplerError("SpeculativeSampler needs a draft model (draft_model=...) or a "
                               "draft_next callable")
        max_len = draft.backbone.config.max_sequence_length
        if T > max_len:
            raise SamplerError(f"SpeculativeSampler: sequence length {T} exceeds the draft model's "
                               f"max_sequence_length {max_len}")
        B = prompt.shape[0]
        draft_cache = draft.new_cache(B, T)
        if index > 1:                                                          # prefill, positions < index-1
            _, _, draft_cache = draft.call_with_cache(prompt[:, :index - 1], draft_cache, 0)

        def draft_next(tokens, cache, idx):
            logits, hidden, cache = draft.call_with_cache(tokens[:, idx - 1:idx], cache, idx - 1)
            return logits[:, 0], hidden[:, 0], cache

        return draft_next, draft_cache

    def get_config(self):
        from refopt.samplers.serialization import serialize

        return {**super().get_config(), "num_speculative_tokens": self.num_speculative_tokens,
                "base_sampler": None if self.base_sampler is None else serialize(self.base_sampler),
                "seed": self.seed}


def _verify_from(model, next):
    """The target's logits on positions ``index .. index + k`` in one call when the model has
    ``call_with_cache``; otherwise ``k + 1`` calls of ``next``."""
    if model is not None and hasattr(model, "call_with_cache"):
        def verify(tokens, cache, index, k):
            logits, hidden, cache = model.call_with_cache(tokens[:, index - 1:index + k], cache, index - 1)
            return logits, hidden, cache
        return verify

    def verify_serial(tokens, cache, index, k):
        out = []
        for j in range(k + 1):
            logits, _, cache = next(tokens, cache, index + j)
            out.append(logits)
        return np.stack(out, axis=1), cache
    return verify_serial


def _vocabulary_size(model, what):
    try:
        return int(model.backbone.config.vocabulary_size)
    except AttributeError:
        raise SamplerError(f"SpeculativeSampler: the {what} has no backbone.config.vocabulary_size; "
                           "expected an OPTCausalLM") from None


def _check_draft(draft):
    for attr in ("call_with_cache", "new_cache"):
        if not hasattr(draft, attr):
            raise SamplerError(f"SpeculativeSampler: draft_model {type(draft).__name__} has no "
                               f"{attr}(); expected an OPTCausalLM")
    _vocabulary_size(draft, "draft model")
