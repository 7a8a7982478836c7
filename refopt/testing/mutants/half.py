"""Mutants of a half-precision port: refopt's bfloat16 policy model (KerasHub's rounding,
:func:`refopt.dtype_policies.ops_for`) with one precision bug each, declared ``dtype="bfloat16"``
and so held to refopt's bfloat16 reference with the bfloat16 tolerance."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from refopt import backend as _backend
from refopt.dtype_policies import ops_for, round_to
from refopt.testing.adapter import NotSupported, RefoptAdapter
from refopt.testing.mutants.base import ForwardGreedy

_R = functools.partial(round_to, dtype="bfloat16")


class _HalfMutant(ForwardGreedy, RefoptAdapter):
    """refopt's NumPy port under the ``"bfloat16"`` policy with some ops replaced; generation
    runs through the forward pass."""

    bug = ""

    def __init__(self):
        super().__init__("numpy", "bfloat16")
        self.name = f"mutant {type(self).__name__}"
        self._ops = self.ops(self._ops)

    def ops(self, policy_ops):
        """The ops namespace with the bug, from the correct policy's."""
        return policy_ops

    def loss_and_gradients(self, token_ids, padding_mask):
        raise NotSupported("this mutant breaks the forward pass only")


def _replace(ops, **changes):
    return SimpleNamespace(**{**vars(ops), **changes})


def _sequential_sum(x, dtype: str):
    """``x.sum(-1, keepdims=True)`` accumulated in ``dtype`` term by term (each partial sum rounded),
    as a kernel without a float32 accumulator computes it."""
    acc = np.zeros(x.shape[:-1] + (1,), np.float32)
    for j in range(x.shape[-1]):
        acc = round_to(acc + x[..., j:j + 1], dtype)
    return acc


class LayerNormWithoutFloat32Statistics(_HalfMutant):
    bug = ("LayerNorm's mean and variance accumulated in bfloat16 (each partial sum rounded) where "
           "KerasHub and transformers keep float32 statistics")

    def ops(self, policy_ops):
        def layernorm_forward(x, gamma, beta, eps):
            R = _R
            x = R(np.asarray(x, np.float32))
            D = x.shape[-1]
            mean = R(_sequential_sum(x, "bfloat16") / np.float32(D))
            c = R(x - mean)
            var = R(_sequential_sum(R(c * c), "bfloat16") / np.float32(D))
            y = R(c * R(1 / np.sqrt(var + np.float32(eps))))
            if gamma is not None:
                y = R(y * gamma)
            if beta is not None:
                y = R(y + beta)
            return y
        return _replace(policy_ops, layernorm_forward=layernorm_forward)


class SoftmaxWithoutFloat32Sum(_HalfMutant):
    bug = ("the attention softmax computed in bfloat16 with its row sum accumulated in bfloat16 "
           "(each partial sum rounded) where the reference sums in float32")

    def ops(self, policy_ops):
        def attention_forward(q, k, v, mask):
            R = _R
            scale = q.shape[-1] ** -0.5
            query = R(q / np.float32(scale))
            scores = R(R(query * R(np.float32(scale))) @ k.transpose(0, 1, 3, 2))   # [B, H, S, T]
            scores = np.where(mask, scores, R(np.float32(-1e9)))
            e = np.where(mask, R(np.exp(R(scores - scores.max(axis=-1, keepdims=True)))), 0)
            with np.errstate(invalid="ignore"):      # padding queries: no key, 0 / 0
                probs = np.where(mask, R(e / _sequential_sum(e, "bfloat16")), np.float32(0))
            return R(probs @ v), probs
        return _replace(policy_ops, attention_forward=attention_forward)


class Float16DeclaredBfloat16(_HalfMutant):
    bug = ("a float16 port declared bfloat16: its attention scores, computed in float16 (Keras's "
           "explicit softmax path), overflow float16's 65504 where bfloat16's range holds them")

    def ops(self, policy_ops):
        return ops_for("float16", _backend.ops("numpy"), fused_attention=False)

    def load(self, config, params):
        super().load(config, params)
        self.params = {k: round_to(v, "float16") for k, v in self.params.items()}


def half_cases() -> dict:
    """The two cases the half-precision mutants need besides the stress cases (their bugs are
    accumulation errors, which grow with the number of terms summed):

    ``half-wide``  width 1024 (LayerNorm sums 1024 terms), 2 layers, std 0.2, 2 x 11 tokens
    ``half-long``  384 tokens with nearly flat attention (std 0.05: every key weighs about the
                   same, so a bfloat16 row sum stalls at 256) and the value biases raised by 2 (the
                   attention output then carries the row sum's error instead of averaging it away)"""
    from refopt.config import OPTConfig
    from refopt.testing.cases import CaseSpec, Magnitudes, make_inputs, random_weights
    from refopt.testing.modelcase import ModelCase

    def config(**changes):
        return OPTConfig(**{**dict(vocabulary_size=64, num_layers=2, dropout=0.0, dtype="float64"), **changes})

    wide = CaseSpec(config(num_heads=8, hidden_dim=1024, intermediate_dim=128, max_sequence_length=64),
                    61, Magnitudes(0.2), 62, 2, 11).build("half-wide")
    cfg = config(num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=400)
    rng = np.random.default_rng(71)
    params = random_weights(cfg, rng, magnitudes=Magnitudes(0.05))
    for i in range(cfg.num_layers):
        params[f"layers.{i}.v_proj.bias"] = params[f"layers.{i}.v_proj.bias"] + 2.0
    long = ModelCase("half-long", cfg, params, *make_inputs(cfg, rng, 2, 384))
    return {"half-wide": wide, "half-long": long}


__all__ = ["LayerNormWithoutFloat32Statistics", "SoftmaxWithoutFloat32Sum", "Float16DeclaredBfloat16",
           "half_cases"]
