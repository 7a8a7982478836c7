"""``GreedySampler``: always the most probable token (KerasHub's)."""

import numpy as np

from refopt.samplers.sampler import Sampler, commit, loop_state, one_hot_argmax


class GreedySampler(Sampler):
    """Greedy search: the token of largest probability (the first one on ties).

    ``temperature`` does not change the choice.  As a speculative ``base_sampler`` its distribution
    is the one-hot vector of the arg-max.
    """

    def device_spec(self):
        return self._spec(GreedySampler, "greedy")

    def __call__(self, next, prompt, cache=None, index=0, mask=None, stop_token_ids=None,
                 hidden_states=None, model=None, **kwargs):
        """The loop of :meth:`Sampler.steps` run to the end, several steps at a time in one
        compiled call where ``next`` offers it (``next.greedy_steps``: the Numba backend's,
        :func:`refopt.generation.make_next`) and this sampler is a plain ``GreedySampler`` (no
        logits processors, no subclass): the same tokens, the choice certain from the logits or
        else made here as :meth:`Sampler.steps` makes it."""
        fused = getattr(next, "greedy_steps", None)
        prompt = np.asarray(prompt)
        if (fused is None or type(self) is not GreedySampler or self.logits_processors
                or kwargs.get("log_probs") or prompt.dtype != np.int64 or prompt.ndim != 2):
            return super().__call__(next, prompt, cache=cache, index=index, mask=mask,
                                    stop_token_ids=stop_token_ids, hidden_states=hidden_states,
                                    model=model, **kwargs)
        prompt, mask, index, stop, generated, finished = loop_state(prompt, mask, index, stop_token_ids)
        B, T = prompt.shape
        self.begin(B, model=model, seed=kwargs.get("seed"))
        while index < T and not (stop is not None and finished.all()):
            got = fused(prompt, cache, index, mask, generated, stop, finished, self.temperature)
            if got is None:                        # not available now: one ordinary step
                logits, _, cache = next(prompt, cache, index)
            else:
                index, logits = got
                if logits is None:
                    continue
            # a step whose choice the compiled loop left to the NumPy path (as Sampler.steps)
            logits = self.process_logits(logits, prompt, index)
            probabilities = self.compute_probabilities(logits)
            self._index = index
            token = np.asarray(self.get_next_token(probabilities)).astype(prompt.dtype)
            commit(prompt, index, token, mask, generated, stop, finished)
            index += 1
        return prompt

    def get_next_token(self, probabilities):
        return np.argmax(np.asarray(probabilities), axis=-1)

    def next_token_distribution(self, probabilities):
        return one_hot_argmax(np.asarray(probabilities))
