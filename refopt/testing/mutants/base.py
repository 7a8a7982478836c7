"""The mutants' common base: refopt's NumPy float32 port, generation through its forward pass."""

from __future__ import annotations

import numpy as np

from refopt.testing.adapter import RefoptAdapter


class ForwardGreedy:
    """Generation through the (possibly broken) forward pass of a :class:`RefoptAdapter`: each step
    recomputes the whole prefix, so a bug in ``_decoder`` / ``_head`` shows there too."""

    def greedy(self, prompt_ids, max_new_tokens):
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            logits = self._forward(np.array([ids]), np.ones((1, len(ids)), bool))
            ids.append(int(np.argmax(logits[0, -1])))
        return ids[len(prompt_ids):]


class _Mutant(ForwardGreedy, RefoptAdapter):
    """refopt's NumPy float32 port, with generation running through the forward pass."""

    bug = ""

    def __init__(self):
        super().__init__("numpy", "float32")
        self.name = f"mutant {type(self).__name__}"
