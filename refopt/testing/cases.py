"""What the oracle checks a port on: one random-config space, weights at normal and stress
magnitudes, right- and left-padded batches, and case ids that rebuild a case exactly.

One generator, two drivers.  :func:`draw_config` and :func:`draw_spec` take a *draw* object with
four methods (``integer``, ``boolean``, ``choice``, ``real``); :class:`NumpyDraw` answers them from
a NumPy generator (``random_case(seed)``, ``refopt conform --random-configs``) and
:class:`refopt.testing.strategies.HypothesisDraw` from hypothesis (``rst.configs()``,
``rst.model_cases()``, every test that needs a random model), so the library and the tests draw from
the same :class:`ConfigSpace`.

A :class:`CaseSpec` (a config, a weight seed and :class:`Magnitudes`, an input seed and the batch
shape) is everything a case is made of; its :attr:`CaseSpec.id` is a short string
(``v40l2h2d12f20p24.post.j6-w3141-s0.2.o300-i2718-b3x11``) that :meth:`CaseSpec.parse` turns back
into the same spec, so a failure reproduces from ``refopt conform --case ID``.

Stress magnitudes (:class:`Magnitudes`, :func:`stress_specs`) reach the ranges where real ports
break: residual-stream outlier features in the hundreds (OPT's massive activations), attention
scores past float16's range (65504) and far past ``exp``'s float32 range (89), logits in the
hundreds, and sequences of hundreds of tokens.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import numpy as np

from refopt.config import OPTConfig
from refopt.errors import ConfigError
from refopt.testing.modelcase import ModelCase, make_inputs  # noqa: F401  (make_inputs: here too)

SWITCHES = ("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine",
            "remove_final_layer_norm", "word_embed_proj_dim")


# ---------------------------------------------------------------------------------- drawing
class NumpyDraw:
    """The draw interface over a NumPy generator (inclusive integer bounds, as hypothesis's)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def boolean(self) -> bool:
        return bool(self.rng.integers(0, 2))

    def choice(self, options):
        return options[int(self.rng.integers(0, len(options)))]

    def real(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))


@dataclasses.dataclass(frozen=True)
class ConfigSpace:
    """The ranges random configs are drawn from (bounds inclusive).

    ``family``: ``"opt"`` varies every switch in ``vary`` (pre/post-LayerNorm, biases, affine
    LayerNorms, the final LayerNorm, a ``word_embed_proj_dim`` projection); ``"keras_hub"`` keeps to
    what KerasHub's ``OPTBackbone`` builds (pre-LN, biases, affine LayerNorms, a final LayerNorm, no
    projection).  The width is ``heads * head_dim``, with ``head_dim`` drawn from ``head_dim`` when
    given, else so that the width lies in ``hidden`` (the default keeps at least 4 features per
    LayerNorm: over one or two a LayerNorm's output is nearly constant and its gradients are pure
    cancellation)."""

    family: str = "opt"
    vocabulary_size: tuple = (8, 80)
    num_layers: tuple = (1, 3)
    num_heads: tuple = (1, 4)
    hidden: tuple = (4, 24)
    head_dim: tuple | None = None
    intermediate_dim: tuple = (2, 48)
    max_sequence_length: tuple = (8, 24)
    projection: tuple = (2, 9)
    dropout: tuple = (0.0,)
    vary: tuple = SWITCHES
    dtype: str = "float64"

    def replace(self, **changes) -> "ConfigSpace":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"ConfigSpace has no field {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


def draw_config(draw, space: ConfigSpace = ConfigSpace()) -> OPTConfig:
    """A random :class:`OPTConfig` from ``space``: the one config generator of the library and the
    tests."""
    heads = draw.integer(*space.num_heads)
    if space.head_dim is not None:
        head_dim = draw.integer(*space.head_dim)
    else:
        lo = -(-space.hidden[0] // heads)
        head_dim = draw.integer(lo, max(lo, space.hidden[1] // heads))
    hidden = heads * head_dim
    common = dict(vocabulary_size=draw.integer(*space.vocabulary_size),
                  num_layers=draw.integer(*space.num_layers), num_heads=heads, hidden_dim=hidden,
                  intermediate_dim=draw.integer(*space.intermediate_dim),
                  max_sequence_length=draw.integer(*space.max_sequence_length),
                  dropout=draw.choice(space.dropout), dtype=space.dtype)
    if space.family == "keras_hub":
        return OPTConfig(**common)
    if space.family != "opt":
        raise ConfigError(f"config family {space.family!r}: expected 'opt' or 'keras_hub'")
    switches = {}
    for name in ("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine",
                 "remove_final_layer_norm"):
        if name in space.vary:
            switches[name] = draw.boolean()
    if "word_embed_proj_dim" in space.vary and draw.boolean():
        switches["word_embed_proj_dim"] = draw.integer(*space.projection)
    return OPTConfig(**common, **switches)


# ---------------------------------------------------------------------------------- magnitudes
class Magnitudes(NamedTuple):
    """How large the weights make the activations.

    ``std``       standard deviation of the weight matrices and embeddings
    ``outliers``  size of two outlier features of the residual stream (0: none): the position
                  table carries them into every position, and the LayerNorm gains on those features
                  are large, as in released OPT checkpoints (massive activations)
    ``scores``    multiplies every attention score (the q and k projections each scaled by its
                  square root); 1e5 puts the scores past float16's range
    ``offset``    a common offset added to every feature of the positions (LayerNorm's mean
                  subtraction cancels it: a variance computed as E[x^2] - E[x]^2 does not).  Not
                  drawn: real checkpoints' residual streams have outliers in a few features, not a
                  common offset, and engines that use the one-pass variance (CTranslate2) are right
                  on them; ask for it by case id (``...-s0.2.c300-...``)"""

    std: float = 0.2
    outliers: float = 0.0
    scores: float = 1.0
    offset: float = 0.0

    @property
    def stressed(self) -> bool:
        return bool(self.outliers or self.scores != 1.0 or self.offset)


def draw_magnitudes(draw, stress: float = 0.3) -> Magnitudes:
    """Normal weights (std 0.05, 0.2 or 0.5), and with probability about ``stress`` outlier
    features or large attention scores (see :class:`Magnitudes`)."""
    std = draw.choice((0.05, 0.2, 0.5))
    if draw.real(0.0, 1.0) >= stress:
        return Magnitudes(std)
    outliers = draw.choice((0.0, 30.0, 300.0, 1000.0))
    # outliers already make the scores large (the LayerNorm gains carry them into q and k): a score
    # multiplier on top would put them past 1e8, beyond anything float32 computes to any accuracy
    scores = draw.choice((1.0, 10.0) if outliers else (1.0, 100.0, 1e4, 1e5))
    return Magnitudes(std, outliers=outliers, scores=scores)


def random_weights(cfg: OPTConfig, rng: np.random.Generator, std: float | None = None,
                   magnitudes: Magnitudes | None = None) -> dict[str, np.ndarray]:
    """float64 weights: normal(0, std) matrices and embeddings (std drawn in [0.1, 0.5] when neither
    is given), LayerNorm gains near 1 and biases near 0 but not equal to them, so their handling
    shows; then the stress of ``magnitudes`` (see :class:`Magnitudes`)."""
    from refopt.model import param_shapes

    if magnitudes is None:
        magnitudes = Magnitudes(float(rng.uniform(0.1, 0.5)) if std is None else std)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".gamma"):
            out[name] = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith((".beta", ".bias")):
            out[name] = 0.3 * rng.standard_normal(shape)
        else:
            out[name] = magnitudes.std * rng.standard_normal(shape)
    _stress(cfg, out, magnitudes, rng)
    return out


def _stress(cfg: OPTConfig, params: dict, m: Magnitudes, rng: np.random.Generator) -> None:
    D = cfg.hidden_dim
    if m.outliers:
        dims = rng.choice(D, size=min(2, D), replace=False)
        signs = rng.choice((-1.0, 1.0), size=len(dims))
        params["embed_positions"][:, dims] += m.outliers * signs            # every position
        gain = max(1.0, m.outliers / 10.0)
        for name in params:
            if name.endswith(".gamma"):
                params[name][dims] *= gain
    if m.offset:
        params["embed_positions"] += m.offset
    if m.scores != 1.0:
        root = np.sqrt(m.scores)
        for i in range(cfg.num_layers):
            for proj in ("q_proj", "k_proj"):
                for part in ("weight", "bias"):
                    name = f"layers.{i}.{proj}.{part}"
                    if name in params:
                        params[name] = params[name] * root


# ---------------------------------------------------------------------------------- specs and ids
_FLAGS = (("post", "do_layer_norm_before", False), ("nb", "enable_bias", False),
          ("na", "layer_norm_elementwise_affine", False), ("nf", "remove_final_layer_norm", True))
_MAGS = (("s", "std", 0.2), ("o", "outliers", 0.0), ("q", "scores", 1.0), ("c", "offset", 0.0))


def _num(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """Everything a random model case is made of; ``id`` is its reproducible name."""

    config: OPTConfig
    weights_seed: int
    magnitudes: Magnitudes
    inputs_seed: int
    batch: int
    length: int

    @property
    def id(self) -> str:
        c = self.config
        code = (f"v{c.vocabulary_size}l{c.num_layers}h{c.num_heads}d{c.hidden_dim}"
                f"f{c.intermediate_dim}p{c.max_sequence_length}")
        code += "".join(f".{flag}" for flag, field, value in _FLAGS if getattr(c, field) == value)
        if c.has_projection:
            code += f".j{c.word_embed_proj_dim}"
        if c.dropout:
            code += f".r{round(c.dropout * 100)}"                 # percent
        mags = ".".join(f"{key}{_num(getattr(self.magnitudes, field))}" for key, field, default
                        in _MAGS if key == "s" or getattr(self.magnitudes, field) != default)
        return f"{code}-w{self.weights_seed}-{mags}-i{self.inputs_seed}-b{self.batch}x{self.length}"

    @classmethod
    def parse(cls, text: str) -> "CaseSpec":
        """The spec of a case id (:attr:`id`); raises ConfigError for anything else."""
        m = re.fullmatch(r"v(\d+)l(\d+)h(\d+)d(\d+)f(\d+)p(\d+)((?:\.[a-z]+\d*)*)"
                         r"-w(\d+)-([a-z0-9.e+-]+)-i(\d+)-b(\d+)x(\d+)", text)
        if m is None:
            raise ConfigError(f"case id {text!r}: expected the form "
                              "'v40l2h2d12f20p24[.post][.nb][.na][.nf][.jN]-wSEED-s0.2[.oX][.qX][.cX]-iSEED-bBxS'")
        V, L, H, D, F, P = (int(g) for g in m.groups()[:6])
        kwargs = dict(vocabulary_size=V, num_layers=L, num_heads=H, hidden_dim=D, intermediate_dim=F,
                      max_sequence_length=P, dropout=0.0, dtype="float64")
        for part in filter(None, m.group(7).split(".")):           # flags hold no dots
            flag = next((f for f in _FLAGS if f[0] == part), None)
            if flag is not None:
                kwargs[flag[1]] = flag[2]
            elif part.startswith("j"):
                kwargs["word_embed_proj_dim"] = int(part[1:])
            elif part.startswith("r"):
                kwargs["dropout"] = int(part[1:]) / 100
            else:
                raise ConfigError(f"case id {text!r}: unknown config flag {part!r}")
        mags = {}
        number = r"-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"
        parts = re.findall(rf"([a-z])({number})", m.group(9))
        if ".".join(k + v for k, v in parts) != m.group(9):
            raise ConfigError(f"case id {text!r}: cannot read the magnitudes {m.group(9)!r}")
        for key, value in parts:
            field = next((f[1] for f in _MAGS if f[0] == key), None)
            if field is None:
                raise ConfigError(f"case id {text!r}: unknown magnitude {key + value!r}")
            mags[field] = float(value)
        return cls(OPTConfig(**kwargs), int(m.group(8)), Magnitudes(**mags), int(m.group(10)),
                   int(m.group(11)), int(m.group(12)))

    def build(self, name: str | None = None):
        """The :class:`refopt.testing.modelcase.ModelCase` of this spec."""
        params = random_weights(self.config, np.random.default_rng(self.weights_seed),
                                magnitudes=self.magnitudes)
        ids, right, ids_left, left = make_inputs(self.config, np.random.default_rng(self.inputs_seed),
                                                 self.batch, self.length)
        return ModelCase(name or self.id, self.config, params, ids, right, ids_left, left, spec=self)


def draw_spec(draw, space: ConfigSpace = ConfigSpace(), min_length: int = 2,
              stress: float = 0.3, seed: int = 0) -> CaseSpec:
    """A random case: a config from ``space``, weight magnitudes (stressed with probability
    ``stress``), seeds and a batch shape of 1 to 3 rows, at least ``min_length`` tokens long.
    ``seed`` shifts the weight and input seeds drawn (hypothesis's simplest example, all zeros,
    then still differs from one ``--refopt-seed`` to another)."""
    cfg = draw_config(draw, space)
    mags = draw_magnitudes(draw, stress)
    weights_seed = (draw.integer(0, 2**31 - 1) + seed) % 2**31
    inputs_seed = (draw.integer(0, 2**31 - 1) + 7919 * seed) % 2**31
    batch = draw.integer(1, 3)
    length = draw.integer(min(min_length, cfg.max_sequence_length), cfg.max_sequence_length)
    return CaseSpec(cfg, weights_seed, mags, inputs_seed, batch, length)


def random_case(seed: int, name: str | None = None, family: str = "opt", stress: float = 0.3):
    """The case ``random-<seed>``: :func:`draw_spec` driven by ``np.random.default_rng(seed)``."""
    spec = draw_spec(NumpyDraw(np.random.default_rng(seed)), ConfigSpace(family=family), stress=stress)
    return spec.build(name or f"random-{seed}")


# ---------------------------------------------------------------------------------- stress cases
def _stress_config(family: str, **changes) -> OPTConfig:
    base = dict(vocabulary_size=64, num_layers=3, num_heads=4, hidden_dim=32, intermediate_dim=64,
                max_sequence_length=64, dropout=0.0, dtype="float64")
    base.update(changes)
    if family == "keras_hub":
        for key in ("do_layer_norm_before", "word_embed_proj_dim"):
            base.pop(key, None)
    return OPTConfig(**base)


def stress_specs(family: str = "opt") -> dict[str, CaseSpec]:
    """The fixed stress cases, by name (each run on right- and left-padded batches):

    ``stress-outliers``  residual outlier features of 500 (LayerNorm gains x50 on them), logits
                         in the hundreds
    ``stress-scores``    attention scores up to about 1e5: past float16's range, and exp overflows
                         float32 without the max subtracted
    ``stress-long``      384 tokens
    ``stress-post``      (``opt`` family) post-LayerNorm with a projection, outliers and large
                         scores together"""
    specs = {
        "stress-outliers": CaseSpec(_stress_config(family), 11, Magnitudes(0.2, outliers=500.0), 12, 3, 24),
        "stress-scores": CaseSpec(_stress_config(family), 21, Magnitudes(0.5, scores=4e4), 22, 3, 24),
        "stress-long": CaseSpec(_stress_config(family, num_layers=2, hidden_dim=16, num_heads=2,
                                               intermediate_dim=32, max_sequence_length=400),
                                41, Magnitudes(0.5, scores=100.0), 42, 2, 384),
    }
    if family == "opt":
        specs["stress-post"] = CaseSpec(_stress_config(family, do_layer_norm_before=False,
                                                       word_embed_proj_dim=16),
                                        51, Magnitudes(0.2, outliers=300.0, scores=1e3), 52, 3, 24)
    return specs


def case_by_id(case_id: str, family: str = "opt"):
    """A case from its name: ``random-N``, a ``stress-*`` name or a :class:`CaseSpec` id."""
    if re.fullmatch(r"random-\d+", case_id):
        return random_case(int(case_id.split("-")[1]), family=family)
    stress = stress_specs(family)
    if case_id in stress:
        return stress[case_id].build(case_id)
    return CaseSpec.parse(case_id).build()
