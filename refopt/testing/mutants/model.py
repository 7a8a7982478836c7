"""Mutants of the forward pass: positions, LayerNorm, attention, the head, padding, the KV cache,
overflow and precision."""

from __future__ import annotations

import dataclasses

import numpy as np

from refopt import model as _model
from refopt.testing import reference as R
from refopt.testing.adapter import NotSupported
from refopt.testing.mutants.base import _Mutant


class PositionsOffsetByOne(_Mutant):
    bug = "position p reads row p + 1 of the position table"

    def load(self, config, params):
        super().load(config, params)
        pos = self.params["embed_positions"]
        self.params["embed_positions"] = np.concatenate([pos[1:], pos[-1:]], axis=0)


class PositionsWithoutOffset(_Mutant):
    bug = ("a loader that keeps transformers' max_position_embeddings + 2 rows and indexes them "
           "with p instead of p + 2")

    def load(self, config, params, prefix=None):
        super().load(config, params)
        pos = self.params["embed_positions"]
        if prefix is None:
            prefix = np.zeros((2, pos.shape[1]), pos.dtype)
        table = np.concatenate([np.asarray(prefix, pos.dtype), pos], axis=0)   # the checkpoint's rows
        self.params["embed_positions"] = table[:pos.shape[0]]                   # the missing offset

    def load_preset(self, path):
        from refopt.models import OPTBackbone

        backbone = OPTBackbone.from_preset(path, dtype="float64", backend="numpy")
        if backbone.position_prefix is None:
            raise NotSupported("a KerasHub preset has no offset rows; this loader bug needs a "
                               "transformers checkpoint")
        self.load(backbone.config, backbone.params, backbone.position_prefix)


class LayerNormEpsilon(_Mutant):
    bug = "LayerNorm epsilon 1e-12 (BERT's) instead of OPT's 1e-5"

    def load(self, config, params):
        super().load(config, params)
        self.config = dataclasses.replace(self.config, layer_norm_epsilon=1e-12)


class UnscaledAttention(_Mutant):
    bug = "attention scores without the 1/sqrt(head_dim) scale"

    def load(self, config, params):
        # refopt scales q by 1/sqrt(K) inside the forward; multiplying q_proj by sqrt(K) cancels it,
        # which is exactly a forward without the scale
        super().load(config, params)
        s = np.float32(np.sqrt(self.config.head_dim))
        for i in range(self.config.num_layers):
            for name in (f"layers.{i}.q_proj.weight", f"layers.{i}.q_proj.bias"):
                if name in self.params:
                    self.params[name] = self.params[name] * s


class PrePostLayerNormSwapped(_Mutant):
    bug = "do_layer_norm_before read the wrong way round (pre-LN model run as post-LN and back)"

    def load(self, config, params):
        super().load(config, params)
        self.config = dataclasses.replace(self.config, do_layer_norm_before=not config.do_layer_norm_before)


class CausalMaskShifted(_Mutant):
    bug = "the causal mask lets each query see one key ahead (an off-by-one in the triangle)"

    def __init__(self):
        super().__init__()
        base = self._ops

        def attention_mask(key_mask, query_positions):
            return base.attention_mask(key_mask, np.asarray(query_positions) + 1)

        self._ops = R.numpy_ops(attention_mask=attention_mask)


class UntiedHead(_Mutant):
    bug = "an LM head of its own (left at its random initialisation) instead of the tied embedding"

    def load(self, config, params):
        super().load(config, params)
        rng = np.random.default_rng(0)
        self.head = (rng.standard_normal(self.params["embed_tokens"].shape) * 0.02).astype(np.float32)

    def _head(self, hidden):
        return self._ops.lm_head_forward(hidden, self.head)

    def loss_and_gradients(self, token_ids, padding_mask):
        raise NotSupported("this mutant breaks the forward pass only")


class FinalLayerNormLeftOut(_Mutant):
    bug = "the decoder's final LayerNorm left out (pre-LN models: OPT-125m, 1.3b, ...)"

    def load(self, config, params):
        super().load(config, params)
        self.config = dataclasses.replace(self.config, remove_final_layer_norm=True)


class ProjectOutSkipped(_Mutant):
    bug = ("OPT-350m's project_out skipped: the hidden states go to the tied head unprojected "
           "(cut to word_embed_proj_dim features so the shapes still fit)")

    def _decoder(self, token_ids, padding_mask, tape):
        tape = {} if tape is None else tape
        super()._decoder(token_ids, padding_mask, tape)
        hidden = tape["final_norm"][..., :self.config.word_embed_proj_dim]
        tape["hidden"] = hidden
        return hidden

    def loss_and_gradients(self, token_ids, padding_mask):
        raise NotSupported("this mutant breaks the forward pass only")


class LeftPaddingPositions(_Mutant):
    bug = ("positions counted from the start of the row, not from its first real token: right "
           "padding is right, left-padded rows get the wrong position embeddings")

    def _decoder(self, token_ids, padding_mask, tape):
        # every column counts as a position (an all-ones mask), attention still masks the padding
        real = np.asarray(padding_mask).astype(bool)
        ops = R.numpy_ops(attention_mask=lambda key_mask, q: R.numpy_ops().attention_mask(real, q))
        return _model.forward(self.params, self.config, np.asarray(token_ids, np.int64),
                              np.ones(real.shape, bool), tape=tape, ops=ops)


class _CacheMutant(_Mutant):
    """refopt's incremental decoding with one thing changed in the cached steps (``_step_ops``)."""

    def _step_ops(self, real):
        raise NotImplementedError

    def _step_mask(self, real):
        return real

    def incremental_logits(self, token_ids, padding_mask, prefill):
        ids = np.asarray(token_ids, np.int64)
        real = np.asarray(padding_mask).astype(bool)
        cache = _model.new_cache(self.config, ids.shape[0], ids.shape[1], self.dtype)
        out = [self._head(_model.forward(self.params, self.config, ids[:, :prefill], real, cache=cache,
                                         ops=self._ops))]
        for s in range(prefill, ids.shape[1]):
            out.append(self._head(_model.forward(self.params, self.config, ids[:, s:s + 1], self._step_mask(real),
                                                 cache=cache, cache_index=s, ops=self._step_ops(real))))
        return np.concatenate(out, axis=1)


class KVCacheStepPositions(_CacheMutant):
    bug = ("a cached step takes its position from the cache index, not from the padding mask: right "
           "padding is right, left-padded rows decode at the wrong positions")

    def _step_mask(self, real):
        return np.ones(real.shape, bool)                        # positions = the column index

    def _step_ops(self, real):
        return R.numpy_ops(attention_mask=lambda key_mask, q: R.numpy_ops().attention_mask(
            real[:, :key_mask.shape[1]], q))


class KVCacheReadBeforeWrite(_CacheMutant):
    bug = "a cached step attends to the cache before its own key and value are written into it"

    def _step_ops(self, real):
        return R.numpy_ops(attention_mask=lambda key_mask, q: R.numpy_ops().attention_mask(key_mask, q - 1))


class SoftmaxWithoutMaxSubtraction(_Mutant):
    bug = ("attention softmax as exp(s) / sum(exp(s)) without subtracting the row's maximum: "
           "exp overflows float32 for scores above 88")

    def __init__(self):
        super().__init__()

        def attention_forward(q, k, v, mask):
            scores = np.where(mask, q @ k.transpose(0, 1, 3, 2), np.finfo(np.float32).min)
            with np.errstate(over="ignore", invalid="ignore"):
                e = np.exp(scores)
                probs = e / e.sum(axis=-1, keepdims=True)
            return probs @ v, probs

        self._ops = R.numpy_ops(attention_forward=attention_forward)


class ResidualInFloat16(_Mutant):
    bug = ("the residual stream stored in float16 after the MLP block of the middle layer (a "
           "mixed-precision port's residual buffer)")

    def _decoder(self, token_ids, padding_mask, tape):
        cfg, params, base = self.config, self.params, R.numpy_ops()
        mid = cfg.num_layers // 2
        fc2 = params[f"layers.{mid}.fc2.weight"]
        held = {"calls": 0}

        def to_half(x):
            return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)

        def layernorm_forward(x, g, b, eps):
            # LayerNorm calls: layer i's attention norm is call 2i, its MLP norm call 2i + 1
            call, held["calls"] = held["calls"], held["calls"] + 1
            if call == 2 * mid + 1:
                if cfg.do_layer_norm_before:
                    held["residual"] = x                       # what the MLP branch is added to
                else:
                    x = to_half(x)                             # post-LN: the sum, normalised next
            return base.layernorm_forward(x, g, b, eps)

        def linear_forward(x, w, b=None):
            y = base.linear_forward(x, w, b)
            if w is fc2 and "residual" in held:
                held["branch"] = y
                return to_half(held["residual"] + y) - held["residual"]    # residual + this: stored in half
            return y

        tape = {} if tape is None else tape
        ops = R.numpy_ops(layernorm_forward=layernorm_forward, linear_forward=linear_forward)
        hidden = _model.forward(params, cfg, np.asarray(token_ids, np.int64), np.asarray(padding_mask, bool),
                                tape=tape, ops=ops)
        if "branch" in held:
            tape[f"layers.{mid}.mlp_output"] = held["branch"]       # fc2's own output is right
        return hidden

    def loss_and_gradients(self, token_ids, padding_mask):
        raise NotSupported("this mutant breaks the forward pass only")
