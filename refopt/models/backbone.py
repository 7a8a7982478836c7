"""``Backbone``: the base class of backbones (KerasHub's ``keras_hub.models.Backbone``).

A backbone is the network without a task head: called on ``{"token_ids", "padding_mask"}`` it
returns hidden states.  Subclasses (:class:`~refopt.models.OPTBackbone`) hold ``params`` (a flat
dict of arrays) and ``config``, and implement ``__call__`` and ``_load_preset``; this class gives
them KerasHub's ``from_preset`` (on the base class it builds the preset's own backbone class),
``presets``, ``predict``, ``token_embedding`` and LoRA (:mod:`refopt.models.lora`).
"""

from __future__ import annotations

import numpy as np

from refopt import registry
from refopt.errors import ConfigError, InputError
from refopt.models.lora import LoRAMixin


SAVE_FORMATS = ("keras", "huggingface")


def check_save_format(format) -> None:
    """``save_to_preset``'s ``format``: KerasHub's layout or transformers'."""
    if format not in SAVE_FORMATS:
        raise ConfigError(f"save_to_preset: format={format!r}; expected one of {SAVE_FORMATS}")


def check_shard_size(max_shard_size):
    """``save_to_preset``'s ``max_shard_size`` (GB, or None) -> the limit in bytes (None: one
    weights file), checked."""
    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, str) and max_shard_size in SAVE_FORMATS:
        raise ConfigError(f"save_to_preset: max_shard_size={max_shard_size!r}; the second argument is "
                          f"KerasHub's max_shard_size (GB): pass format={max_shard_size!r}")
    if isinstance(max_shard_size, bool) or not isinstance(
            max_shard_size, (int, float, np.integer, np.floating)) \
            or not np.isfinite(max_shard_size) or max_shard_size <= 0:
        raise ConfigError(f"save_to_preset: max_shard_size={max_shard_size!r}; expected a positive "
                          "number of gigabytes (or None)")
    return float(max_shard_size) * 1024 ** 3


class ReversibleEmbedding:
    """KerasHub's ``ReversibleEmbedding`` over a backbone's token table: ``(ids)`` looks rows up,
    ``(hidden, reverse=True)`` gives logits with the same table transposed (the tied LM head),
    ``.embeddings`` is the table ``[V, E]`` itself (read live from the backbone, so it follows
    training and loading).  The model's own forward reads the table directly; this object is for
    callers, and adds nothing to the hot path."""

    tie_weights = True

    def __init__(self, backbone, name="token_embedding"):
        self._backbone = backbone
        self.name = name

    @property
    def embeddings(self):
        return self._backbone.params["embed_tokens"]

    @property
    def input_dim(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __call__(self, inputs, reverse=False):
        ops = self._backbone.ops
        if reverse:
            # inputs [..., E] -> logits [..., V]
            hidden = np.asarray(inputs)
            if hidden.shape[-1] != self.output_dim:
                raise InputError(f"token_embedding(reverse=True): inputs have {hidden.shape[-1]} "
                                 f"features, the table {self.output_dim}")
            flat = hidden.reshape((1, -1, self.output_dim)).astype(self._backbone.config.compute_dtype,
                                                                    copy=False)
            logits = ops.lm_head_forward(flat, self.embeddings)
            return self._public(logits.reshape(hidden.shape[:-1] + (self.input_dim,)))
        # inputs [...] int -> [..., E]
        ids = np.asarray(inputs)
        if ids.dtype == object or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"token_embedding: expected integer ids, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.input_dim):
            raise InputError(f"token_embedding: ids must be in [0, {self.input_dim})")
        return self._public(ops.embedding_forward(self.embeddings, ids.astype(np.int64)))

    def _public(self, x):
        from refopt.dtype_policies import to_public

        return to_public(x, self._backbone.compute_dtype)

    def __repr__(self):
        return f"ReversibleEmbedding(input_dim={self.input_dim}, output_dim={self.output_dim})"


class Backbone(LoRAMixin):
    """Base class of backbones (KerasHub's): ``from_preset``, ``presets``, ``predict``,
    ``token_embedding``, ``count_params``, ``get_config`` / ``from_config`` and LoRA
    (``enable_lora``, ``save_lora_weights``, ``load_lora_weights``)."""

    #: built-in presets of this backbone's family (name -> metadata), set by each family
    backbone_presets: dict = {}
    keras_module = "keras_hub.src.models.backbone"

    @registry.classproperty
    def presets(cls) -> dict:
        """The built-in presets of this class (and its subclasses): name -> metadata and handles."""
        return registry.builtin_presets(cls)

    @classmethod
    def from_preset(cls, preset=None, load_weights=True, **kwargs):
        """Load a backbone from a preset: a KerasHub preset directory, a transformers checkpoint
        directory, a built-in name (``cls.presets``) or a hub handle.  On the base class the
        preset's own backbone class is built; on a subclass the preset must be of that class
        (ValueError otherwise, as KerasHub)."""
        backbone_cls = registry.backbone_class(preset)
        if backbone_cls is None:          # no config.json: the class's own loader says what is wrong
            if cls is Backbone:
                raise ConfigError(f"preset {str(preset)!r} has no config.json: it holds no backbone")
            backbone_cls = cls
        if not issubclass(backbone_cls, cls):
            raise ConfigError(f"Saved preset has type `{backbone_cls.__name__}` which is not a "
                              f"subclass of calling class `{cls.__name__}`. Call `from_preset` "
                              f"directly on `{backbone_cls.__name__}` instead.")
        return backbone_cls._load_preset(preset, load_weights=load_weights, **kwargs)

    @classmethod
    def _load_preset(cls, preset, load_weights=True, **kwargs):
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from a preset")

    @classmethod
    def from_config(cls, config: dict):
        """A backbone from :meth:`get_config`'s dict (random weights)."""
        return cls(**dict(config))

    def serialize(self) -> dict:
        """The object KerasHub writes to a preset's ``config.json``."""
        name = type(self).__name__
        return {"module": self.keras_module, "class_name": name, "config": self.get_config(),
                "registered_name": f"keras_hub>{name}"}

    # ------------------------------------------------------------------ KerasHub's accessors
    @property
    def token_embedding(self) -> ReversibleEmbedding:
        """The token embedding as KerasHub's ``ReversibleEmbedding``: ``(ids)``, ``(hidden,
        reverse=True)`` and ``.embeddings``."""
        return ReversibleEmbedding(self)

    def count_params(self) -> int:
        """Number of parameter elements (the tied LM head counted once; LoRA adapters included,
        as Keras counts every weight)."""
        return int(sum(p.size for p in self.params.values()))

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """Hidden states ``(batch, seq, hidden)`` for ``{"token_ids", "padding_mask"}``, computed
        ``batch_size`` rows at a time (None: 32, Keras's default), as a NumPy array."""
        if steps is not None or callbacks is not None:
            raise ConfigError("predict: steps and callbacks are Keras-loop arguments refopt does not "
                              "take; pass the whole input")
        if batch_size is None:
            batch_size = 32
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ConfigError(f"predict: batch_size={batch_size!r}; expected a positive integer")
        if isinstance(x, dict):
            ids = np.asarray(x.get("token_ids"))
            n = ids.shape[0] if ids.ndim == 2 else None
        else:
            n = None
        if n is None or n <= batch_size:
            return np.asarray(self(x))
        parts = [self({k: np.asarray(v)[i:i + batch_size] for k, v in x.items()})
                 for i in range(0, n, batch_size)]
        return np.concatenate(parts, axis=0)
