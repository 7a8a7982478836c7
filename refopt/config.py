"""OPT configuration: KerasHub's arguments plus what released OPT checkpoints need beyond them.

One dataclass, :class:`OPTConfig`, holds every architectural choice.  It reads and writes both
``config.json`` dialects:

* KerasHub: ``{"class_name": "OPTBackbone", "config": {"vocabulary_size", "num_layers", ...}}``
  (positions start at 0; the position table has ``max_sequence_length`` rows);
* transformers: ``{"model_type": "opt", "vocab_size", "hidden_size", ...}`` (the position table has
  ``max_position_embeddings + 2`` rows and positions are offset by 2).

refopt itself keeps KerasHub's layout for positions (row ``p`` is position ``p``); the two spare
rows of a transformers checkpoint are kept aside so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from refopt.errors import ConfigError

# dtype policies (refopt.dtype_policies): KerasHub's, and float64 for the oracle
_DTYPES = ("float32", "float64", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
REFOPT_REGISTERED_NAME = "refopt>OPTBackbone"

# Upper bounds of config values: far above any released model, low enough that nothing a config
# asks for is allocated before the tensors it names are found in the files.
LIMITS = {"vocabulary_size": 2**24, "num_layers": 1024, "num_heads": 1024, "hidden_dim": 2**17,
          "intermediate_dim": 2**19, "max_sequence_length": 2**20, "word_embed_proj_dim": 2**17}
MAX_PARAMETERS = 2**40


def _is_real(value) -> bool:
    """An int or float, not a bool, and finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _keras_dtype(value, source):
    """The dtype name of a KerasHub config's ``dtype`` (a name or a serialized DTypePolicy)."""
    if isinstance(value, dict):
        inner = value.get("config")
        value = inner.get("name") if isinstance(inner, dict) else None
        if not isinstance(value, str):
            raise ConfigError(f"{source}: 'dtype' is not a DTypePolicy with a name")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{source}: 'dtype' is {value!r}, expected a dtype name")
    # mixed policies ("mixed_bfloat16") are dtype policies of their own (refopt.dtype_policies)
    return value


@dataclasses.dataclass
class OPTConfig:
    """Every architectural choice of an OPT decoder.

    The first eight fields are KerasHub's ``OPTBackbone`` arguments with its defaults.  The rest
    cover released checkpoints KerasHub does not model: OPT-350m (post-LayerNorm, no final
    LayerNorm, a 512-wide embedding projected to the 1024-wide decoder) and models without biases or
    LayerNorm affine parameters.
    """

    vocabulary_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    intermediate_dim: int
    dropout: float = 0.1
    max_sequence_length: int = 2048
    dtype: str | None = None
    # Beyond KerasHub (transformers' OPTConfig names where they exist).
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_dim
        if self.dtype == "float32":  # the default compute dtype; one spelling keeps configs comparable
            self.dtype = None
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def has_projection(self) -> bool:
        """True when the embedding is narrower than the decoder (OPT-350m), so project_in/out exist."""
        return self.word_embed_proj_dim != self.hidden_dim

    @property
    def has_final_layer_norm(self) -> bool:
        """transformers builds the decoder's final LayerNorm only for pre-LN models."""
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @property
    def compute_dtype(self) -> str:
        """The NumPy dtype of refopt's arrays: float64 on request, else float32 (a half-precision
        dtype policy computes in float32 and rounds where KerasHub rounds; see :attr:`policy`)."""
        return "float64" if self.dtype == "float64" else "float32"

    @property
    def policy(self):
        """The dtype policy (:class:`refopt.dtype_policies.DTypePolicy`) ``dtype`` names."""
        from refopt.dtype_policies import get

        return get(self.dtype)

    def validate(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ConfigError(f"config value {name}={value!r}: expected an integer from 1 to "
                                  f"{limit:,}")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"config value num_heads={self.num_heads} does not divide "
                f"hidden_dim={self.hidden_dim}: each head needs hidden_dim / num_heads features")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
                raise ConfigError(f"config value {name}={value!r}: expected a token id (an "
                                  "integer from 0 to 2**31 - 1)")
        if not (_is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"config value dropout={self.dropout!r}: expected a number in [0, 1)")
        if self.dtype is not None and (not isinstance(self.dtype, str) or self.dtype not in _DTYPES):
            raise ConfigError(f"config value dtype={self.dtype!r}: expected one of {_DTYPES} or None")
        if not (_is_real(self.layer_norm_epsilon) and 0 < self.layer_norm_epsilon < 1):
            raise ConfigError(
                f"config value layer_norm_epsilon={self.layer_norm_epsilon!r}: expected a number "
                "in (0, 1)")
        for name in ("do_layer_norm_before", "enable_bias", "layer_norm_elementwise_affine",
                     "remove_final_layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config value {name}={getattr(self, name)!r}: expected true or false")
        if self.parameter_count() > MAX_PARAMETERS:
            raise ConfigError(f"config describes {self.parameter_count():,} parameters; refopt "
                              f"handles models of up to {MAX_PARAMETERS:,}")

    # ------------------------------------------------------------------ dialects
    def backbone_kwargs(self) -> dict[str, Any]:
        """Arguments of ``OPTBackbone(...)``: KerasHub's, plus ours where they differ from default."""
        out = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in list(out)[8:]:
            if key == "word_embed_proj_dim" and out[key] == self.hidden_dim:
                del out[key]
            elif key != "word_embed_proj_dim" and out[key] == defaults[key]:
                del out[key]
        return out

    def to_keras(self) -> dict[str, Any]:
        """KerasHub's ``config.json`` for an ``OPTBackbone``.  Fields KerasHub does not know are only
        written when they differ from its architecture; such a config names refopt's class
        (``refopt>OPTBackbone``), not KerasHub's, since KerasHub cannot build the model."""
        kwargs = self.backbone_kwargs()
        kwargs.pop("dtype")
        cfg = {"name": "opt_backbone", "trainable": True,
               "dtype": {"module": "keras", "class_name": "DTypePolicy",
                         "config": {"name": self.dtype or "float32"}, "registered_name": None},
               **kwargs}
        if self.keras_compatible:
            return {"module": "keras_hub.src.models.opt.opt_backbone", "class_name": "OPTBackbone",
                    "config": cfg, "registered_name": "keras_hub>OPTBackbone"}
        return {"module": "refopt.models.opt_backbone", "class_name": "OPTBackbone", "config": cfg,
                "registered_name": REFOPT_REGISTERED_NAME}

    def keras_incompatibilities(self) -> list[str]:
        """Why KerasHub's ``OPTBackbone`` cannot build this model (empty when it can)."""
        out = []
        if not self.do_layer_norm_before:
            out.append("post-LayerNorm (do_layer_norm_before=false)")
        if self.has_projection:
            out.append(f"an embedding projection (word_embed_proj_dim={self.word_embed_proj_dim} "
                       f"!= hidden_dim={self.hidden_dim})")
        if not self.enable_bias:
            out.append("no biases")
        if not self.layer_norm_elementwise_affine:
            out.append("LayerNorms without gain and bias")
        if self.remove_final_layer_norm:
            out.append("no final LayerNorm")
        if self.layer_norm_epsilon != 1e-5:
            out.append(f"layer_norm_epsilon={self.layer_norm_epsilon:g} (KerasHub uses 1e-5)")
        for name, default in (("pad_token_id", 1), ("bos_token_id", 2), ("eos_token_id", 2)):
            if getattr(self, name) != default:
                out.append(f"{name}={getattr(self, name)} (KerasHub's OPT uses {default})")
        return out

    @property
    def keras_compatible(self) -> bool:
        """KerasHub's OPTBackbone models pre-LN, biased, affine, final-LN, unprojected OPT only."""
        return not self.keras_incompatibilities()

    def huggingface_incompatibilities(self) -> list[str]:
        """Why transformers' ``OPTForCausalLM`` would compute another model from this config."""
        if self.layer_norm_epsilon != 1e-5:
            return [f"layer_norm_epsilon={self.layer_norm_epsilon:g} (transformers' OPT uses 1e-5)"]
        return []

    @classmethod
    def from_keras(cls, data: dict[str, Any], source: str = "config.json") -> "OPTConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        cfg = data.get("config", data)
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: 'config' is {type(cfg).__name__}, expected an object")
        if data.get("class_name", "OPTBackbone") != "OPTBackbone":
            raise ConfigError(f"{source}: class_name {data.get('class_name')!r} is not OPTBackbone")
        if data.get("registered_name") not in (None, "keras_hub>OPTBackbone", REFOPT_REGISTERED_NAME):
            raise ConfigError(f"{source}: registered_name {data.get('registered_name')!r} is neither "
                              "KerasHub's nor refopt's OPTBackbone")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in cfg.items():
            if key in ("name", "trainable", "registered_name"):
                continue
            if key == "dtype":
                value = _keras_dtype(value, source)
            if key not in known:
                raise ConfigError(f"{source}: unknown OPTBackbone config key {key!r}")
            kwargs[key] = value
        missing = [k for k in ("vocabulary_size", "num_layers", "num_heads", "hidden_dim",
                               "intermediate_dim") if k not in kwargs]
        if missing:
            raise ConfigError(f"{source}: missing OPTBackbone config keys {missing}")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_huggingface(self) -> dict[str, Any]:
        """transformers' ``config.json`` for ``OPTForCausalLM`` (plus ``layer_norm_epsilon`` when it
        is not transformers' 1e-5: refopt reads it back, transformers ignores it)."""
        out = {
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "activation_function": "relu",
            "architectures": ["OPTForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "do_layer_norm_before": self.do_layer_norm_before,
            "dropout": self.dropout,
            "dtype": self.dtype or "float32",
            "enable_bias": self.enable_bias,
            "eos_token_id": self.eos_token_id,
            "ffn_dim": self.intermediate_dim,
            "hidden_size": self.hidden_dim,
            "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
            "layerdrop": 0.0,
            "max_position_embeddings": self.max_sequence_length,
            "model_type": "opt",
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": True,
            "use_cache": True,
            "vocab_size": self.vocabulary_size,
            "word_embed_proj_dim": self.word_embed_proj_dim,
        }
        if self.layer_norm_epsilon != 1e-5:
            out["layer_norm_epsilon"] = self.layer_norm_epsilon
        return out

    @classmethod
    def from_huggingface(cls, data: dict[str, Any], source: str = "config.json") -> "OPTConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        if data.get("model_type", "opt") != "opt":
            raise ConfigError(f"{source}: model_type {data.get('model_type')!r} is not 'opt'")
        act = data.get("activation_function", "relu")
        if act != "relu":
            raise ConfigError(f"{source}: activation_function {act!r} is not supported (OPT uses 'relu')")
        if data.get("tie_word_embeddings", True) is not True:
            raise ConfigError(f"{source}: tie_word_embeddings=false is not supported: OPT ties its LM "
                              "head to the token embedding")
        names = {"vocab_size": "vocabulary_size", "num_hidden_layers": "num_layers",
                 "num_attention_heads": "num_heads", "hidden_size": "hidden_dim",
                 "ffn_dim": "intermediate_dim", "max_position_embeddings": "max_sequence_length"}
        missing = [k for k in names if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing transformers OPT config keys {missing}")
        kwargs = {ours: data[theirs] for theirs, ours in names.items()}
        for key in ("do_layer_norm_before", "word_embed_proj_dim", "enable_bias",
                    "layer_norm_elementwise_affine", "dropout", "pad_token_id", "bos_token_id",
                    "eos_token_id", "layer_norm_epsilon"):
            if data.get(key) is not None:
                kwargs[key] = data[key]
        if data.get("_remove_final_layer_norm") is not None:
            kwargs["remove_final_layer_norm"] = data["_remove_final_layer_norm"]
        dtype = data.get("dtype", data.get("torch_dtype"))
        if dtype is not None and not isinstance(dtype, str):
            raise ConfigError(f"{source}: dtype {dtype!r} is not a dtype name")
        kwargs["dtype"] = dtype if dtype in _DTYPES else None
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], source: str = "config.json") -> "OPTConfig":
        """Either dialect, recognised by its keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        if "model_type" in data or "hidden_size" in data:
            return cls.from_huggingface(data, source)
        if "class_name" in data or "vocabulary_size" in data:
            return cls.from_keras(data, source)
        raise ConfigError(f"{source}: neither a KerasHub OPTBackbone config nor a transformers OPT "
                          "config (no 'class_name' or 'model_type' key)")

    @classmethod
    def from_file(cls, path) -> "OPTConfig":
        """Read a ``config.json`` (a regular file, strict JSON; see :mod:`refopt.io.files`)."""
        from refopt.io import files

        return cls.from_json_dict(files.read_json(path, ConfigError, "config file"), str(path))

    # ------------------------------------------------------------------ sizes
    def parameter_count(self, position_rows: int | None = None) -> int:
        """Number of parameters (the tied LM head counted once).  ``position_rows`` defaults to
        KerasHub's ``max_sequence_length``; transformers stores two more."""
        d, f, e, v = self.hidden_dim, self.intermediate_dim, self.word_embed_proj_dim, self.vocabulary_size
        rows = self.max_sequence_length if position_rows is None else position_rows
        b = 1 if self.enable_bias else 0
        ln = 2 * d if self.layer_norm_elementwise_affine else 0
        layer = 4 * (d * d + b * d) + (d * f + b * f) + (f * d + b * d) + 2 * ln
        total = v * e + rows * d + self.num_layers * layer
        if self.has_projection:
            total += 2 * d * e
        if self.has_final_layer_norm:
            total += ln
        return total


# Released OPT sizes (Zhang et al., 2022, table 1; transformers' facebook/opt-* configs).
RELEASED = {
    "125m": dict(num_layers=12, num_heads=12, hidden_dim=768, intermediate_dim=3072),
    "350m": dict(num_layers=24, num_heads=16, hidden_dim=1024, intermediate_dim=4096,
                 word_embed_proj_dim=512, do_layer_norm_before=False),
    "1.3b": dict(num_layers=24, num_heads=32, hidden_dim=2048, intermediate_dim=8192),
    "2.7b": dict(num_layers=32, num_heads=32, hidden_dim=2560, intermediate_dim=10240),
    "6.7b": dict(num_layers=32, num_heads=32, hidden_dim=4096, intermediate_dim=16384),
    "13b": dict(num_layers=40, num_heads=40, hidden_dim=5120, intermediate_dim=20480),
    "30b": dict(num_layers=48, num_heads=56, hidden_dim=7168, intermediate_dim=28672),
    "66b": dict(num_layers=64, num_heads=72, hidden_dim=9216, intermediate_dim=36864),
}

# KerasHub's preset names for the sizes it ships.
KERAS_PRESETS = {"opt_125m_en": "125m", "opt_1.3b_en": "1.3b", "opt_2.7b_en": "2.7b",
                 "opt_6.7b_en": "6.7b"}


def released_config(size: str, **overrides) -> OPTConfig:
    """The configuration of a released OPT size (``"125m"``, ``"350m"``, ... ``"66b"``)."""
    if size not in RELEASED:
        raise ConfigError(f"unknown OPT size {size!r}: expected one of {list(RELEASED)}")
    kwargs = dict(vocabulary_size=50272, max_sequence_length=2048, dropout=0.1)
    kwargs.update(RELEASED[size])
    kwargs.update(overrides)
    return OPTConfig(**kwargs)
