"""Mutants of the backward pass and the loss."""

from __future__ import annotations

import numpy as np

from refopt.testing import reference as R
from refopt.testing.adapter import NotSupported
from refopt.testing.mutants.base import _Mutant


class GradientMissingResidual(_Mutant):
    bug = ("the backward pass of the last layer's attention block drops the residual path: the "
           "gradient reaching the layer's input is the attention branch's alone")

    def loss_and_gradients(self, token_ids, padding_mask):
        from refopt.training.gradients import loss_and_gradients

        cfg, params, base = self.config, self.params, R.numpy_ops()
        p = f"layers.{cfg.num_layers - 1}."
        out_proj, v_proj = params[p + "out_proj.weight"], params[p + "v_proj.weight"]
        gamma = params.get(p + "self_attn_layer_norm.gamma")
        held = {}

        # refopt's backward computes d_input = d_residual + d_attention_branch; these two
        # overrides subtract d_residual (the gradient arriving at the block, which out_proj's
        # backward receives) from the branch's last term, leaving the branch alone
        def linear_backward(d_y, x, w, has_bias=True):
            d_x, d_w, d_b = base.linear_backward(d_y, x, w, has_bias)
            if w is out_proj:
                held["d_residual"] = d_y
            elif w is v_proj and not cfg.do_layer_norm_before:
                d_x = d_x - held.pop("d_residual")
            return d_x, d_w, d_b

        def layernorm_backward(d_y, x, g, eps):
            d_x, d_g, d_b = base.layernorm_backward(d_y, x, g, eps)
            if cfg.do_layer_norm_before and "d_residual" in held and (g is gamma and g is not None):
                d_x = d_x - held.pop("d_residual")
            return d_x, d_g, d_b

        ops = R.numpy_ops(linear_backward=linear_backward, layernorm_backward=layernorm_backward)
        if cfg.do_layer_norm_before and gamma is None:
            raise NotSupported("this mutant needs LayerNorm gains to find the attention block")
        y, sw = R.loss_targets(token_ids, padding_mask, cfg.pad_token_id)
        x = {"token_ids": np.asarray(token_ids, np.int64), "padding_mask": np.asarray(padding_mask, bool)}
        return loss_and_gradients(params, cfg, x, y, sw, ops=ops)


class CrossEntropyWithoutMaxSubtraction(_Mutant):
    bug = ("the loss's log-softmax as logits - log(sum(exp(logits))) without subtracting the maximum: "
           "exp overflows float32 for logits above 88")

    def loss_and_gradients(self, token_ids, padding_mask):
        from refopt.training.gradients import loss_and_gradients

        base = R.numpy_ops()

        def cross_entropy_forward(logits, targets):
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            ce = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return ce, np.exp(logp)

        y, sw = R.loss_targets(token_ids, padding_mask, self.config.pad_token_id)
        x = {"token_ids": np.asarray(token_ids, np.int64), "padding_mask": np.asarray(padding_mask, bool)}
        ops = R.numpy_ops(cross_entropy_forward=cross_entropy_forward,
                          cross_entropy_backward=base.cross_entropy_backward)
        with np.errstate(invalid="ignore", over="ignore"):
            return loss_and_gradients(self.params, self.config, x, y, sw, ops=ops)


class TiedHeadGradientDropped(_Mutant):
    bug = ("the tied LM head's share of the token table's gradient dropped: embed_tokens gets the "
           "embedding lookup's gradient only (a port that unties the head for training)")

    def loss_and_gradients(self, token_ids, padding_mask):
        base = R.numpy_ops()

        def lm_head_backward(d_logits, x, table):
            d_x, d_table = base.lm_head_backward(d_logits, x, table)
            return d_x, np.zeros_like(d_table)

        return self._gradients(token_ids, padding_mask, lm_head_backward=lm_head_backward)

    def _gradients(self, token_ids, padding_mask, **overrides):
        from refopt.training.gradients import loss_and_gradients

        y, sw = R.loss_targets(token_ids, padding_mask, self.config.pad_token_id)
        x = {"token_ids": np.asarray(token_ids, np.int64), "padding_mask": np.asarray(padding_mask, bool)}
        return loss_and_gradients(self.params, self.config, x, y, sw, ops=R.numpy_ops(**overrides))


class SoftmaxBackwardWithoutRowTerm(TiedHeadGradientDropped):
    bug = ("the attention softmax's backward as P * dP, without subtracting the row term "
           "sum(P * dP): the score gradients no longer sum to zero")

    def loss_and_gradients(self, token_ids, padding_mask):
        def attention_backward(d_out, q, k, v, probs, mask):
            d_probs = d_out @ v.transpose(0, 1, 3, 2)
            d_v = probs.transpose(0, 1, 3, 2) @ d_out
            d_scores = np.where(mask, probs * d_probs, 0)
            return d_scores @ k, d_scores.transpose(0, 1, 3, 2) @ q, d_v

        return self._gradients(token_ids, padding_mask, attention_backward=attention_backward)
