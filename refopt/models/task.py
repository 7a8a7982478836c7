"""``Task``: the base class of tasks (KerasHub's ``keras_hub.models.Task``): a backbone, an
optional preprocessor and what they are trained for.

``from_preset`` on a task base class (``CausalLM.from_preset(...)``) builds the subclass made for
the preset's backbone (``OPTCausalLM`` for an OPT preset); on ``Task`` itself it refuses, as
KerasHub does.  ``compile=False`` leaves the task uncompiled: ``fit``, ``evaluate`` and
``generate`` then ask for ``compile()`` first.
"""

from __future__ import annotations

from refopt import registry
from refopt.errors import ConfigError, InputTypeError

AUTO = "auto"
NOT_COMPILED = "You must call `compile()` before using the model."


class Task:
    """Base class of tasks: ``backbone``, ``preprocessor``, ``compile``, ``from_preset``,
    ``presets``, ``get_config`` / ``from_config``."""

    backbone_cls = None
    preprocessor_cls = None
    keras_module = "keras_hub.src.models.task"
    keras_class_name = "Task"
    default_name = "task"

    def __init__(self, backbone, preprocessor=None, name=None, compile=True, **kwargs):
        kwargs.pop("trainable", None)
        kwargs.pop("dtype", None)
        if kwargs:
            raise ConfigError(f"{type(self).__name__} got unknown argument(s) {sorted(kwargs)}")
        if self.backbone_cls is not None and not isinstance(backbone, self.backbone_cls):
            raise InputTypeError(f"backbone: expected an {self.backbone_cls.__name__}, got "
                                 f"{type(backbone).__name__}")
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.name = name or self.default_name
        self.compiled = False
        if compile:
            self.compile()

    def compile(self, *args, **kwargs):
        self.compiled = True

    def _require_compiled(self):
        if not getattr(self, "compiled", False):
            raise ConfigError(NOT_COMPILED)

    # ------------------------------------------------------------------ presets and configs
    @registry.classproperty
    def presets(cls) -> dict:
        """The built-in presets (name -> metadata and handles) of this class's family."""
        return registry.builtin_presets(cls)

    @classmethod
    def from_preset(cls, preset=None, load_weights=True, **kwargs):
        """A task from a preset (a KerasHub preset directory, a transformers checkpoint
        directory, a built-in name, a hub handle, or nothing for the bundled model).  On a task
        base class the subclass made for the preset's backbone is built."""
        if cls is Task:
            raise ConfigError("Do not call `Task.from_preset()` directly. Instead call a particular "
                              "task class, e.g. `refopt.models.CausalLM.from_preset()`.")
        backbone = registry.backbone_class(preset)
        if backbone is None:              # no config.json: the class's own loader says what is wrong
            if cls.backbone_cls is None:
                raise ConfigError(f"preset {str(preset)!r} has no config.json: it holds no model")
            backbone = cls.backbone_cls
        if cls.backbone_cls is not backbone:
            cls = registry.find_subclass(preset, cls, backbone)
        return cls._load_preset(preset, load_weights=load_weights, **kwargs)

    @classmethod
    def _load_preset(cls, preset, load_weights=True, **kwargs):
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from a preset")

    def get_config(self) -> dict:
        """KerasHub's task config: the serialized backbone and preprocessor, and the name."""
        return {"backbone": self.backbone.serialize(),
                "preprocessor": None if self.preprocessor is None else self.preprocessor.serialize(),
                "name": self.name}

    @classmethod
    def from_config(cls, config: dict):
        """A task from :meth:`get_config`'s dict: a backbone with random weights, and the
        preprocessor (whose tokenizer has no vocabulary: a config carries none)."""
        config = dict(config)
        backbone = config.pop("backbone")
        if isinstance(backbone, dict):
            backbone = cls.backbone_cls.from_config(backbone.get("config", backbone))
        preprocessor = config.pop("preprocessor", None)
        if isinstance(preprocessor, dict):
            preprocessor = cls.preprocessor_cls.from_config(preprocessor.get("config", preprocessor))
        return cls(backbone=backbone, preprocessor=preprocessor, **config)

    def serialize(self) -> dict:
        """The object KerasHub writes to ``task.json``."""
        return {"module": self.keras_module, "class_name": self.keras_class_name,
                "config": self.get_config(), "registered_name": f"keras_hub>{self.keras_class_name}"}
