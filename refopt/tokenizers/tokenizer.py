"""``Tokenizer``: the base class of refopt's tokenizers (KerasHub's ``keras_hub.tokenizers.Tokenizer``,
also exported as ``refopt.models.Tokenizer``).

Subclasses implement ``tokenize``, ``detokenize``, ``vocabulary_size``, ``get_vocabulary``,
``id_to_token``, ``token_to_id`` and ``_load_preset`` (read a preset directory).  The base class
gives them KerasHub's ``from_preset``: called on a base class (``Tokenizer.from_preset(...)`` or
``BytePairTokenizer.from_preset(...)``) it returns the subclass made for the preset's backbone
(an :class:`~refopt.models.OPTTokenizer` for an OPT preset), and ``presets``, the built-in presets
of the class's family.
"""

from __future__ import annotations

from refopt import registry
from refopt.tokenizers import preset_files as pf


class Tokenizer:
    """Base class of tokenizers: text -> token ids (``tokenize``, also ``__call__``) and back
    (``detokenize``)."""

    #: the backbone class a model-specific tokenizer is made for (None: generic)
    backbone_cls = None

    def tokenize(self, inputs):
        raise NotImplementedError(f"{type(self).__name__} does not implement tokenize()")

    def detokenize(self, inputs):
        raise NotImplementedError(f"{type(self).__name__} does not implement detokenize()")

    def __call__(self, inputs):
        return self.tokenize(inputs)

    @registry.classproperty
    def presets(cls) -> dict:
        """The built-in presets (name -> metadata and handles) of this class's family."""
        return registry.builtin_presets(cls)

    @classmethod
    def from_preset(cls, preset, config_file=pf.TOKENIZER_CONFIG_FILE, **kwargs):
        """The tokenizer of a preset: a KerasHub preset directory, a transformers checkpoint
        directory, a tokenizer-only directory, a built-in name or a hub handle.  On a base class
        the subclass made for the preset's backbone is built (KerasHub's rule); ``kwargs``
        override saved settings (``sequence_length=...``)."""
        backbone = registry.backbone_class(preset)
        if backbone is not None:
            cls = registry.find_subclass(preset, cls, backbone)
        from refopt.io import presets

        return cls._load_preset(presets.resolve(preset), config_file=config_file, **kwargs)

    @classmethod
    def _load_preset(cls, directory, config_file=pf.TOKENIZER_CONFIG_FILE, **kwargs):
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from a preset")
