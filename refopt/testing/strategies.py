"""Hypothesis strategies for conformance tests: configs, weights, padding masks, prompts, texts,
whole model cases and sampler steps.  Needs ``hypothesis`` (refopt's ``test`` extra).

    from hypothesis import given, settings
    from refopt.testing import strategies as rst
    from refopt.testing.checks import check_logits

    @settings(max_examples=20, derandomize=True, deadline=None)
    @given(case=rst.model_cases())
    def test_my_port(case):
        assert check_logits(MyAdapter(), case).status == "pass"

Weights are drawn from a seed (NumPy's generator), not element by element: hypothesis explores the
config and the seed, and a failing example reproduces from both.  ``derandomize=True`` (or a fixed
``@seed``) makes every pytest-xdist worker draw the same examples.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from refopt.config import OPTConfig
from refopt.testing.adapter import SamplerSpec
from refopt.testing.checks import ModelCase, make_inputs, random_weights

SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")


@st.composite
def configs(draw, family: str = "opt", max_layers: int = 3, max_vocab: int = 80,
            max_width: int = 24, max_length: int = 24) -> OPTConfig:
    """Small OPT configs (float64).  ``family="opt"`` varies every switch transformers models
    (pre/post-LayerNorm, ``word_embed_proj_dim``, biases, affine LayerNorms, the final LayerNorm);
    ``"keras_hub"`` keeps to what KerasHub's OPTBackbone builds."""
    heads = draw(st.integers(1, 4))
    # at least 4 features per LayerNorm: over one or two, a LayerNorm's output is (nearly) constant
    # and its gradients are pure cancellation, which no float32 port reproduces to the last bits
    hidden = heads * draw(st.integers(-(-4 // heads), max(-(-4 // heads), max_width // heads)))
    common = dict(vocabulary_size=draw(st.integers(8, max_vocab)), num_layers=draw(st.integers(1, max_layers)),
                  num_heads=heads, hidden_dim=hidden, intermediate_dim=draw(st.integers(2, 2 * max_width)),
                  max_sequence_length=draw(st.integers(8, max_length)), dropout=0.0, dtype="float64")
    if family == "keras_hub":
        return OPTConfig(**common)
    proj = draw(st.booleans())
    return OPTConfig(**common, do_layer_norm_before=draw(st.booleans()),
                     word_embed_proj_dim=draw(st.integers(2, 9)) if proj else None,
                     enable_bias=draw(st.booleans()), layer_norm_elementwise_affine=draw(st.booleans()),
                     remove_final_layer_norm=draw(st.booleans()))


@st.composite
def weights(draw, cfg: OPTConfig) -> dict[str, np.ndarray]:
    """float64 weights for ``cfg``: normal matrices with a drawn standard deviation, LayerNorm
    gains near 1 and biases near 0 (never exactly), from a drawn seed."""
    seed = draw(st.integers(0, 2**32 - 1))
    std = draw(st.sampled_from([0.05, 0.2, 0.5]))
    return random_weights(cfg, np.random.default_rng(seed), std)


@st.composite
def padding_masks(draw, batch: int, length: int, side: str = "right") -> np.ndarray:
    """bool ``[batch, length]`` with at least one real token per row, padded on ``side``
    (``"right"``, ``"left"``)."""
    lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    cols = np.arange(length)
    if side == "left":
        return np.stack([cols >= length - n for n in lengths])
    return np.stack([cols < n for n in lengths])


@st.composite
def prompts(draw, cfg: OPTConfig, min_length: int = 1, max_length: int | None = None) -> list[int]:
    """Token ids of a prompt, never the pad id."""
    hi = min(max_length or cfg.max_sequence_length, cfg.max_sequence_length)
    ids = draw(st.lists(st.integers(0, cfg.vocabulary_size - 1).filter(lambda i: i != cfg.pad_token_id),
                        min_size=min_length, max_size=max(min_length, hi)))
    return ids


def texts(max_size: int = 40):
    """Unicode text (no lone surrogates, which have no UTF-8 form), sometimes with OPT's special
    tokens written into it."""
    plain = st.text(st.characters(exclude_categories=("Cs",)), max_size=max_size)
    pieces = st.lists(st.one_of(plain, st.sampled_from(SPECIAL_TOKENS)), max_size=4)
    return st.one_of(plain, pieces.map("".join))


@st.composite
def model_cases(draw, family: str = "opt", min_length: int = 1, **config_kwargs) -> ModelCase:
    """A :class:`refopt.testing.ModelCase`: a config, weights, a right-padded batch and its
    left-padded twin (pad id only at padding positions), at least ``min_length`` tokens long
    (2 or more gives the loss a target)."""
    cfg = draw(configs(family, **config_kwargs))
    params = draw(weights(cfg))
    seed = draw(st.integers(0, 2**32 - 1))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(min(min_length, cfg.max_sequence_length), cfg.max_sequence_length))
    ids, right, ids_left, left = make_inputs(cfg, np.random.default_rng(seed), batch, length)
    return ModelCase(f"hypothesis-{seed}", cfg, params, ids, right, ids_left, left)


def sampler_specs(names=("greedy", "random", "top_k", "top_p")):
    """:class:`refopt.testing.SamplerSpec` values with KerasHub's argument ranges."""
    temperature = st.sampled_from([1.0, 0.5, 0.7, 1.5, 2.0])
    return st.one_of(*[{
        "greedy": st.just(SamplerSpec("greedy")),
        "random": st.builds(SamplerSpec, st.just("random"), temperature=temperature),
        "top_k": st.builds(SamplerSpec, st.just("top_k"), k=st.integers(1, 12), temperature=temperature),
        "top_p": st.builds(SamplerSpec, st.just("top_p"), k=st.none() | st.integers(1, 12),
                           p=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0]), temperature=temperature),
    }[n] for n in names])


@st.composite
def probabilities(draw, rows: int = 4, vocab: int | None = None) -> np.ndarray:
    """float64 ``[rows, vocab]`` softmax rows, flat to peaked, from a drawn seed."""
    vocab = vocab or draw(st.integers(2, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.sampled_from([0.3, 1.0, 3.0, 8.0]))
    logits = np.random.default_rng(seed).standard_normal((rows, vocab)) * spread
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
