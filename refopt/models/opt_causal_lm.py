"""``OPTCausalLM``: KerasHub's OPT task class (backbone + tied LM head + optional preprocessor)."""

from __future__ import annotations

import numpy as np

from refopt import dtype_policies
from refopt import model as _model
from refopt.limits import check_allocation
from refopt.models.causal_lm import CausalLM
from refopt.models.opt_backbone import OPTBackbone
from refopt.models.opt_causal_lm_preprocessor import OPTCausalLMPreprocessor


class OPTCausalLM(CausalLM):
    """An OPT model for next-token prediction, with KerasHub's API.

    ``predict`` returns logits ``(batch, seq, vocab)`` as a NumPy array; ``generate`` decodes with the
    KV cache and the sampler chosen in ``compile``; ``fit`` / ``evaluate`` train with refopt's
    hand-written backward pass.

    Args:
        backbone: an :class:`~refopt.models.OPTBackbone`.
        preprocessor: an :class:`~refopt.models.OPTCausalLMPreprocessor` or None.
        compile: compile with KerasHub's defaults now (``compile=False``: call ``compile()`` before
            ``fit``, ``evaluate`` or ``generate``).
    """

    backbone_cls = OPTBackbone
    preprocessor_cls = OPTCausalLMPreprocessor
    keras_module = "keras_hub.src.models.opt.opt_causal_lm"
    keras_class_name = "OPTCausalLM"
    default_name = "opt_causal_lm"

    def __call__(self, inputs, *, tape=None):
        """Logits ``(batch, seq, vocab)`` in the compute dtype of the backbone's policy."""
        from refopt.models.opt_backbone import validate_inputs

        bb = self.backbone
        ids, mask = validate_inputs(bb.config, inputs)
        ops = bb.ops
        hidden = _model.forward(bb.params, bb.config, ids, mask, tape=tape, ops=ops)
        logits = ops.lm_head_forward(hidden, bb.params["embed_tokens"])
        return dtype_policies.to_public(logits, bb.compute_dtype)

    def new_cache(self, batch: int, length: int) -> np.ndarray:
        """A zero KV cache ``[batch, num_layers, 2, length, num_heads, head_dim]``."""
        cfg = self.backbone.config
        check_allocation(int(batch) * int(length) * 2 * cfg.num_layers * cfg.hidden_dim
                         * np.dtype(cfg.compute_dtype).itemsize,
                         f"a KV cache for {batch} rows of {length} positions")
        return _model.new_cache(cfg, batch, length, cfg.compute_dtype)

    def call_with_cache(self, token_ids, cache, cache_update_index, padding_mask=None, logits=True):
        """Run ``token_ids [B, S]`` at indices ``cache_update_index ..`` against ``cache``.

        Returns ``(logits [B, S, V], hidden_states [B, S, E], cache)``; the cache is updated in place.
        Arrays are refopt's (float32 under a half-precision policy, holding its values).
        ``padding_mask`` covers indices ``0 .. cache_update_index + S`` (None: every token is real,
        the causal mask alone applies, as in KerasHub's generation).  ``logits=False``: the logits
        are not computed (None in their place; a prefill discards them)."""
        token_ids = np.asarray(token_ids)
        end = cache_update_index + token_ids.shape[1]
        if padding_mask is None:
            padding_mask = np.ones((token_ids.shape[0], end), bool)
        ops = self.backbone.ops
        # a backend's compiled step (one token per row, or a short prompt's tokens; None where it
        # does not take the call): the base weights in float32, so not with adapters (a
        # half-precision policy's ops have none: refopt.dtype_policies)
        step = None if self.backbone.lora_enabled else getattr(ops, "decode_step", None)
        if step is not None and cache is not None:
            out = step(self.backbone.params, self.backbone.config, token_ids, padding_mask, cache,
                       cache_update_index, logits=logits)
            if out is not None:
                return out[0], out[1], cache
        hidden = _model.forward(self.backbone.params, self.backbone.config, token_ids, padding_mask,
                                cache=cache, cache_index=cache_update_index, ops=ops)
        if not logits:
            return None, hidden, cache
        return ops.lm_head_forward(hidden, self.backbone.params["embed_tokens"]), hidden, cache

    def greedy_steps(self, token_ids, cache, index, prompt_mask, generated, stop, finished, temperature=1.0):
        """Greedy decoding steps from position ``index`` in one call of the backend's compiled loop
        (the Numba backend's ``decode_greedy``: :func:`refopt.kernels.cpu.decode.decode_greedy`),
        ``token_ids [B, T]`` (int64), ``finished`` and ``cache`` updated in place; returns
        ``(index, logits)`` as that function does, or None where it does not apply (another
        backend, LoRA adapters, a subclass with its own ``call_with_cache``, a cache of another
        kind): the caller then runs ordinary steps.  :class:`refopt.samplers.GreedySampler` calls
        it through :func:`refopt.generation.make_next`."""
        if type(self).call_with_cache is not OPTCausalLM.call_with_cache or self.backbone.lora_enabled:
            return None
        fn = getattr(self.backbone.ops, "decode_greedy", None)
        cfg = self.backbone.config
        if (fn is None or not isinstance(cache, np.ndarray) or not cache.flags.c_contiguous
                or cache.dtype != np.dtype(cfg.compute_dtype)):
            return None
        return fn(self.backbone.params, cfg, token_ids, prompt_mask, generated, stop, finished, cache,
                  index, temperature)
