"""Mutant adapters: refopt's float32 port with one deliberate bug each -- the evidence that the
oracle catches real bugs and says where they are.

Each mutant is a small subclass of :class:`refopt.testing.RefoptAdapter` (NumPy, float32) that
changes one thing (:mod:`.model`, :mod:`.gradients`, :mod:`.tokenizer`, :mod:`.samplers`).
:data:`MUTANTS` lists them with the case they run on, the check that must fail first and where the
failure must be located: the named tensor or gradient, the decoding position, the character.
``tests/test_oracle_mutants.py`` asserts exactly that, and
``refopt conform --against refopt.testing.mutants:UnscaledAttention`` shows the report a backend
author would see.

The bugs: generic porting mistakes (positions off by one, a LayerNorm epsilon of 1e-12, attention
without its 1/sqrt(d) scale, pre/post-LayerNorm swapped, a causal mask shifted by one, an untied LM
head, a top-p keeping one token too many, a tokenizer merging by frequency instead of rank, a
gradient missing a residual path) and bugs OPT ports actually shipped (the final LayerNorm left
out, OPT-350m's ``project_out`` skipped, positions without transformers' offset of 2, a leading
``</s>`` dropped or doubled, ``<pad>`` split into several tokens, top-p at an exact cumulative tie,
``top_p=0`` giving NaN instead of the arg-max, temperature applied after the top-k cut, top-k then
top-p masking every token), and the classes that only show at real magnitudes or on real layouts:
positions counted from the row start under left padding, a KV cache read before it is written or
stepped at the cache index, a softmax (attention or loss) without its maximum subtracted, a residual
stream stored in float16, the tied head's gradient dropped, the softmax backward without its row
term, a byte the tokenizer's byte table gets wrong (DEL), sampler draws taken in another row order, a
tokenizer that splits a text into pieces before pre-tokenizing, a decoder that drops bytes that are
not UTF-8, and a draw that takes the token before a step of the
cumulative weights; and half-precision ports (:mod:`.half`, declared bfloat16): a float16 port declared
bfloat16, LayerNorm statistics and the attention softmax's row sum accumulated in bfloat16.
"""

from __future__ import annotations

from typing import NamedTuple

from refopt.testing.mutants.model import (  # noqa: F401
    PositionsOffsetByOne, PositionsWithoutOffset, LayerNormEpsilon, UnscaledAttention,
    PrePostLayerNormSwapped, CausalMaskShifted, UntiedHead, FinalLayerNormLeftOut,
    ProjectOutSkipped, LeftPaddingPositions, KVCacheStepPositions, KVCacheReadBeforeWrite,
    SoftmaxWithoutMaxSubtraction, ResidualInFloat16)
from refopt.testing.mutants.gradients import (  # noqa: F401
    GradientMissingResidual, CrossEntropyWithoutMaxSubtraction, TiedHeadGradientDropped,
    SoftmaxBackwardWithoutRowTerm)
from refopt.testing.mutants.tokenizer import (  # noqa: F401
    TokenizerMergesByFrequency, LeadingEosDropped, LeadingEosDoubled, PadSplit, TokenizerDelByte,
    DecodeDropsInvalidBytes, TokenizerInPieces)
from refopt.testing.mutants.half import (  # noqa: F401
    LayerNormWithoutFloat32Statistics, SoftmaxWithoutFloat32Sum, Float16DeclaredBfloat16, half_cases)
from refopt.testing.mutants.samplers import (  # noqa: F401
    TopPOneTooMany, TopPTieStrict, TopPZeroNaN, TopKThenTopPMasksAll, TemperatureAfterTopK,
    SamplerRowsOutOfOrder, ChooseOnTheStep)


class Mutant(NamedTuple):
    cls: type
    model: str            # "preln" | "postln_proj" | a stress case | "tokenizer" | "samplers": its case
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
    Mutant(LeftPaddingPositions, "preln", "logits.left_padding", "embeddings"),
    Mutant(KVCacheStepPositions, "preln", "incremental.left_padding", "position 5"),
    Mutant(KVCacheReadBeforeWrite, "preln", "incremental", "position 5"),
    Mutant(SoftmaxWithoutMaxSubtraction, "stress-scores", "logits", "layers.0.attention_output"),
    Mutant(ResidualInFloat16, "preln", "logits", "layers.1.output"),
    Mutant(CrossEntropyWithoutMaxSubtraction, "stress-outliers", "gradients", "loss"),
    Mutant(TiedHeadGradientDropped, "preln", "gradients", "embed_tokens"),
    Mutant(SoftmaxBackwardWithoutRowTerm, "preln", "gradients", "layers.1.q_proj.weight"),
    Mutant(TokenizerDelByte, "tokenizer", "tokenizer.bytes", "U+007F"),
    Mutant(SamplerRowsOutOfOrder, "samplers", "samplers.random", None),
    Mutant(DecodeDropsInvalidBytes, "tokenizer", "tokenizer.decode", None),
    Mutant(TokenizerInPieces, "tokenizer", "tokenizer.encode", None),
    Mutant(ChooseOnTheStep, "samplers", "samplers.greedy", None),
    # half-precision ports (declared bfloat16, held to refopt's bfloat16 reference)
    Mutant(Float16DeclaredBfloat16, "stress-scores", "logits", "layers.0.attention_output"),
    Mutant(LayerNormWithoutFloat32Statistics, "half-wide", "activations", "layers.0.attention_input"),
    Mutant(SoftmaxWithoutFloat32Sum, "half-long", "logits", "layers.0.attention_output"),
]
