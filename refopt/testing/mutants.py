"""Mutant adapters: refopt's float32 port with one deliberate bug each -- the evidence that the
oracle catches real bugs and says where they are.

Each mutant is a small subclass of :class:`refopt.testing.RefoptAdapter` (NumPy, float32) that
changes one thing.  :data:`MUTANTS` lists them with the check that must fail first and, for model
bugs, the named tensor (or gradient) the divergence locator must name.  ``tests/test_oracle_mutants.py``
asserts exactly that, and ``refopt conform --against refopt.testing.mutants:UnscaledAttention``
shows the report a backend author would see.

The bugs: generic porting mistakes (positions off by one, a LayerNorm epsilon of 1e-12, attention
without its 1/sqrt(d) scale, pre/post-LayerNorm swapped, a causal mask shifted by one, an untied LM
head, a top-p keeping one token too many, a tokenizer merging by frequency instead of rank, a
gradient missing a residual path) and bugs OPT ports actually shipped (the final LayerNorm left
out, OPT-350m's ``project_out`` skipped, positions without transformers' offset of 2, a leading
``</s>`` dropped or doubled, ``<pad>`` split into several tokens, top-p at an exact cumulative tie,
``top_p=0`` giving NaN instead of the arg-max, temperature applied after the top-k cut, top-k then
top-p masking every token).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from refopt.philox import choose
from refopt.testing import reference as R
from refopt.testing.adapter import NotSupported, RefoptAdapter


class _Mutant(RefoptAdapter):
    """refopt's NumPy float32 port, with generation running through the (possibly broken) forward
    pass: each step recomputes the whole prefix, so a bug in ``_decoder`` / ``_head`` shows there
    too."""

    bug = ""

    def __init__(self):
        super().__init__("numpy", "float32")
        self.name = f"mutant {type(self).__name__}"

    def greedy(self, prompt_ids, max_new_tokens):
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            logits = self._forward(np.array([ids]), np.ones((1, len(ids)), bool))
            ids.append(int(np.argmax(logits[0, -1])))
        return ids[len(prompt_ids):]


# ---------------------------------------------------------------------------------- the model
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


# ---------------------------------------------------------------------------------- the tokenizer
class TokenizerMergesByFrequency(_Mutant):
    bug = ("BPE merges applied in the order of the merged token's vocabulary id (fairseq's "
           "frequency order in OPT's vocabulary) instead of merges.txt's rank")

    def load_tokenizer(self, vocabulary_path, merges_path):
        from refopt.models import OPTTokenizer

        tok = OPTTokenizer(vocabulary=str(vocabulary_path), merges=str(merges_path), compiled=False)
        tables = tok._tables
        tables._pair_dict = {pair: (new, new) for pair, (rank, new) in tables.pair_dict.items()}
        self.tokenizer = tok


class LeadingEosDropped(_Mutant):
    bug = "prompts without the leading </s> (the published OPT tokenizer prepends it)"

    def encode(self, texts):
        return [ids[1:] for ids in super().encode(texts)]


class LeadingEosDoubled(_Mutant):
    bug = "a leading </s> added twice (once by the tokenizer, once by the preprocessor)"

    def encode(self, texts):
        return [ids[:1] + ids for ids in super().encode(texts)]


class PadSplit(_Mutant):
    bug = "<pad> written in the text split into '<', 'pad', '>' (special tokens not matched in text)"

    def load_tokenizer(self, vocabulary_path, merges_path):
        from refopt.models import OPTTokenizer

        self.tokenizer = OPTTokenizer(vocabulary=str(vocabulary_path), merges=str(merges_path),
                                      special_tokens_in_strings=False)


# ---------------------------------------------------------------------------------- the samplers
def _sorted(q, k=None):
    # q [B, V] -> order [B, n] (largest first, ties by lower id), sorted values [B, n], n = k or V
    order = np.argsort(-q, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(q, order, axis=-1)


def _scatter(shape, order, values):
    out = np.zeros(shape)
    np.put_along_axis(out, order, values, axis=-1)
    return out


class _SamplerMutant(_Mutant):
    """Samplers as refopt's, except for ``top_p`` (and, in one mutant, the temperature)."""

    def top_p(self, q, p, k):
        raise NotImplementedError

    def tempered(self, probabilities, temperature):
        return R._tempered_probabilities(np.asarray(probabilities, np.float64), temperature)

    def sample(self, spec, probabilities, uniforms):
        if spec.name != "top_p":
            return super().sample(spec, probabilities, uniforms)
        q = self.tempered(probabilities, spec.temperature)
        return choose(self.top_p(q, spec.p, spec.k), uniforms)


class TopPOneTooMany(_SamplerMutant):
    bug = "top-p keeps one token more than the smallest prefix whose mass exceeds p"

    def top_p(self, q, p, k):
        order, s = _sorted(q, k)
        before = np.cumsum(s, axis=-1) - s
        keep = before <= p
        n = keep.sum(axis=-1, keepdims=True)                                   # tokens kept
        keep = np.arange(s.shape[-1])[None, :] <= n                            # ... and one more
        return _scatter(q.shape, order, np.where(keep, s, 0.0))


class TopPTieStrict(_SamplerMutant):
    bug = ("top-p keeps a token only if the mass before it is < p, so at an exact tie (the mass "
           "before it == p) it drops the token KerasHub's rule keeps")

    def top_p(self, q, p, k):
        order, s = _sorted(q, k)
        keep = (np.cumsum(s, axis=-1) - s) < p
        keep[:, 0] = True
        return _scatter(q.shape, order, np.where(keep, s, 0.0))


class TopPZeroNaN(_SamplerMutant):
    bug = ("top-p keeps tokens whose preceding mass is < p without always keeping the first: "
           "top_p=0 masks every token, and the draw divides 0 by 0 (NaN) instead of taking the arg-max")

    def top_p(self, q, p, k):
        order, s = _sorted(q, k)
        keep = (np.cumsum(s, axis=-1) - s) < p
        w = _scatter(q.shape, order, np.where(keep, s, 0.0))
        with np.errstate(invalid="ignore"):
            return w / w.sum(axis=-1, keepdims=True)                           # 0/0 when nothing kept


class TopKThenTopPMasksAll(_SamplerMutant):
    bug = ("after the top-k cut, top-p removes tokens whose ascending cumulative mass is <= 1 - p "
           "without renormalising first and without keeping the most probable token: when the k "
           "survivors hold less than 1 - p, every token is masked")

    def top_p(self, q, p, k):
        order, s = _sorted(q, k)                                               # largest first
        ascending = np.cumsum(s[:, ::-1], axis=-1)[:, ::-1]                    # mass at or below each
        keep = ascending > 1.0 - p
        w = _scatter(q.shape, order, np.where(keep, s, 0.0))
        with np.errstate(invalid="ignore"):
            return w / w.sum(axis=-1, keepdims=True)


class TemperatureAfterTopK(_SamplerMutant):
    bug = ("temperature applied after the top-k / top-p cut: the nucleus is chosen on the "
           "untempered distribution")

    def sample(self, spec, probabilities, uniforms):
        if spec.name != "top_p" or spec.temperature == 1.0:
            return RefoptAdapter.sample(self, spec, probabilities, uniforms)
        q = np.asarray(probabilities, np.float64)
        kept = R.sampler_distribution(spec._replace(temperature=1.0), q, "keras_hub")
        return choose(self.tempered(kept, spec.temperature), uniforms)


# ---------------------------------------------------------------------------------- the table
class Mutant(NamedTuple):
    cls: type
    model: str            # "preln" | "postln_proj" | "tokenizer" | "samplers": the case it is run on
    check: str            # the check that must fail first (suffix of its name)
    location: str | None  # the named tensor / gradient the locator must report


MUTANTS = [
    Mutant(PositionsOffsetByOne, "preln", "logits", "embeddings"),
    Mutant(LayerNormEpsilon, "preln", "logits", "layers.0.attention_input"),
    Mutant(UnscaledAttention, "preln", "logits", "layers.0.attention_output"),
    Mutant(PrePostLayerNormSwapped, "preln", "logits", "layers.0.attention_input"),
    Mutant(CausalMaskShifted, "preln", "logits", "layers.0.attention_output"),
    Mutant(UntiedHead, "preln", "logits", "logits"),
    Mutant(GradientMissingResidual, "preln", "gradients", "layers.0.fc2.weight"),
    Mutant(FinalLayerNormLeftOut, "preln", "logits", "final_norm"),
    Mutant(ProjectOutSkipped, "postln_proj", "logits", "hidden"),
    Mutant(PositionsWithoutOffset, "preln", "logits", "embeddings"),
    Mutant(TokenizerMergesByFrequency, "tokenizer", "tokenizer.encode", None),
    Mutant(LeadingEosDropped, "tokenizer", "tokenizer.prompt_start", None),
    Mutant(LeadingEosDoubled, "tokenizer", "tokenizer.prompt_start", None),
    Mutant(PadSplit, "tokenizer", "tokenizer.special_tokens", None),
    Mutant(TopPOneTooMany, "samplers", "samplers.top_p", None),
    Mutant(TopPTieStrict, "samplers", "samplers.top_p_tie", None),
    Mutant(TopPZeroNaN, "samplers", "samplers.top_p_zero", None),
    Mutant(TemperatureAfterTopK, "samplers", "samplers.temperature", None),
    Mutant(TopKThenTopPMasksAll, "samplers", "samplers.top_k_top_p", None),
]
