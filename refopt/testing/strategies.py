"""Hypothesis strategies for conformance tests: configs, weights, padding masks, prompts, texts,
whole model cases and sampler steps.  Needs ``hypothesis`` (refopt's ``test`` extra).

    from hypothesis import given, settings
    from refopt.testing import check_case, strategies as rst

    @settings(max_examples=20, deadline=None)
    @given(case=rst.model_cases())
    def test_my_port(case):
        failed = [r for r in check_case(MyAdapter(), case) if r.failed]
        assert not failed, failed[0].detail

Configs come from :class:`refopt.testing.cases.ConfigSpace` through :class:`HypothesisDraw` -- the
same space the seeded ``random-N`` cases are drawn from; weights and inputs from drawn seeds (NumPy's
generator), not element by element: hypothesis explores the config and the seeds, and a failing case
prints as its id (``ModelCase('v40l2h2d12f20p24-w3141-s0.2-i2718-b3x11': ...)``), which
``refopt conform --case ID`` rebuilds.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from refopt.config import OPTConfig
from refopt.testing.adapter import SamplerSpec
from refopt.testing.cases import ConfigSpace, Magnitudes, draw_config, draw_spec, random_weights

SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")


class HypothesisDraw:
    """The draw interface of :mod:`refopt.testing.cases` over hypothesis's ``draw``: the same
    config space as the seeded :class:`refopt.testing.cases.NumpyDraw`, explored (and shrunk) by
    hypothesis."""

    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def boolean(self) -> bool:
        return self.draw(st.booleans())

    def choice(self, options):
        return self.draw(st.sampled_from(options))

    def real(self, lo: float, hi: float) -> float:
        return self.draw(st.floats(lo, hi, exclude_max=True))


def _space(space: ConfigSpace | None, family: str | None, max_layers, max_vocab, max_width,
           max_length, changes) -> ConfigSpace:
    space = (space or ConfigSpace()).replace(**changes)
    if family is not None:
        space = space.replace(family=family)
    for field, top in (("num_layers", max_layers), ("vocabulary_size", max_vocab), ("hidden", max_width),
                       ("max_sequence_length", max_length)):
        if top is not None:
            space = space.replace(**{field: (min(getattr(space, field)[0], top), top)})
    return space


@st.composite
def configs(draw, family: str | None = None, max_layers: int | None = None, max_vocab: int | None = None,
            max_width: int | None = None, max_length: int | None = None, space: ConfigSpace | None = None,
            **ranges) -> OPTConfig:
    """Random OPT configs from :class:`refopt.testing.cases.ConfigSpace` (float64 by default):
    ``family="opt"`` varies every switch transformers models (pre/post-LayerNorm,
    ``word_embed_proj_dim``, biases, affine LayerNorms, the final LayerNorm); ``"keras_hub"`` keeps
    to what KerasHub's OPTBackbone builds.  Any ``ConfigSpace`` field may be given as a keyword
    (``num_heads=(1, 3)``, ``head_dim=(1, 5)``, ``dropout=(0.0, 0.3)``, ``dtype="float32"``)."""
    return draw_config(HypothesisDraw(draw), _space(space, family, max_layers, max_vocab, max_width,
                                                    max_length, ranges))


@st.composite
def weights(draw, cfg: OPTConfig, stress: bool = False) -> dict[str, np.ndarray]:
    """float64 weights for ``cfg``: normal matrices with a drawn standard deviation, LayerNorm
    gains near 1 and biases near 0 (never exactly), from a drawn seed; ``stress``: with the
    magnitudes of :func:`refopt.testing.cases.draw_magnitudes` (outliers, large scores, offsets)."""
    from refopt.testing.cases import draw_magnitudes

    seed = draw(st.integers(0, 2**32 - 1))
    mags = draw_magnitudes(HypothesisDraw(draw), 1.0) if stress else Magnitudes(draw(st.sampled_from([0.05, 0.2, 0.5])))
    return random_weights(cfg, np.random.default_rng(seed), magnitudes=mags)


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
def model_cases(draw, family: str = "opt", min_length: int = 1, stress: float = 0.3,
                space: ConfigSpace | None = None, seed: int = 0, **config_kwargs):
    """A :class:`refopt.testing.ModelCase`: a config, weights (stressed magnitudes with probability
    ``stress``), a right-padded batch and its left-padded twin (pad id only at padding positions),
    at least ``min_length`` tokens long (2 or more gives the loss a target).  Its name is its case
    id: ``refopt conform --case ID`` rebuilds it.  ``seed`` shifts the drawn weight and input seeds
    (the plugin's ``--refopt-seed``)."""
    hd = HypothesisDraw(draw)
    spec = draw_spec(hd, _space(space, family, config_kwargs.pop("max_layers", None),
                                config_kwargs.pop("max_vocab", None), config_kwargs.pop("max_width", None),
                                config_kwargs.pop("max_length", None), config_kwargs),
                     min_length=min_length, stress=stress, seed=seed)
    return spec.build()


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
