"""``Preprocessor``: the base class of preprocessors (KerasHub's ``keras_hub.models.Preprocessor``).

A preprocessor turns raw inputs into what a task's backbone reads, through its ``tokenizer``.
Subclasses set ``backbone_cls`` and ``tokenizer_cls`` and implement ``__call__``,
``get_config`` and ``_load_preset``; this class gives them KerasHub's ``from_preset`` (on a base
class it builds the subclass made for the preset's backbone), ``presets``, ``serialize`` and
``save_to_preset``.
"""

from __future__ import annotations

from refopt import registry
from refopt.tokenizers import preset_files as pf


class Preprocessor:
    """Base class of preprocessors."""

    #: the backbone class this preprocessor is made for, and its tokenizer class (None: generic)
    backbone_cls = None
    tokenizer_cls = None
    keras_module = "keras_hub.src.models.preprocessor"
    keras_class_name = "Preprocessor"

    @registry.classproperty
    def presets(cls) -> dict:
        """The built-in presets (name -> metadata and handles) of this class's family."""
        return registry.builtin_presets(cls)

    @classmethod
    def from_preset(cls, preset, config_file=pf.PREPROCESSOR_CONFIG_FILE, **kwargs):
        """The preprocessor of a preset (a KerasHub preset directory, a transformers checkpoint
        directory, a built-in name or a hub handle).  On a base class the subclass made for the
        preset's backbone is built; ``kwargs`` override saved settings (``sequence_length=...``)."""
        from refopt.errors import ConfigError
        from refopt.io import presets

        backbone = registry.backbone_class(preset)
        if backbone is not None:
            cls = registry.find_subclass(preset, cls, backbone)
        elif cls.tokenizer_cls is None:
            raise ConfigError(f"preset {str(preset)!r} has no config.json naming its model: call "
                              "from_preset on the model's own preprocessor class")
        if config_file != pf.PREPROCESSOR_CONFIG_FILE:
            raise ConfigError(f"from_preset: config_file={config_file!r}; refopt reads "
                              f"{pf.PREPROCESSOR_CONFIG_FILE!r}")
        return cls._load_preset(presets.resolve(preset), **kwargs)

    @classmethod
    def _load_preset(cls, directory, **kwargs):
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from a preset")

    def serialize(self) -> dict:
        """The object KerasHub writes to ``preprocessor.json``."""
        return {"module": self.keras_module, "class_name": self.keras_class_name,
                "config": self.get_config(),
                "registered_name": f"keras_hub>{self.keras_class_name}"}

    def save_to_preset(self, preset_dir, overwrite=False) -> None:
        """Write ``preprocessor.json`` and the tokenizer (``tokenizer.json``, assets) in KerasHub's
        layout.  Other preset files there (a model's) are kept; see :mod:`refopt.io.saving`."""
        from refopt.io import saving

        with saving.PresetSave(preset_dir, overwrite=overwrite, replaces=saving.PREPROCESSOR_FILES,
                               what="preprocessor") as staging:
            self.write_preset_files(staging)

    def write_preset_files(self, staging) -> None:
        """Write ``preprocessor.json`` and the tokenizer's files into a
        :class:`refopt.io.saving.PresetSave`."""
        staging.write_json(self.config_file, self.serialize(), newline=False)
        self.tokenizer.write_preset_files(staging)
