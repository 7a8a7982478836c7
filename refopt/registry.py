"""Which classes a preset is for: KerasHub's ``from_preset`` on a base class (``CausalLM``,
``Backbone``, ``Tokenizer``, ``Preprocessor``, ``CausalLMPreprocessor``) returns the subclass made for
the preset's backbone, and every class lists the built-in presets of its family (``presets``).

A preset's ``config.json`` names its backbone: ``"class_name": "OPTBackbone"`` (KerasHub) or
``"model_type": "opt"`` (transformers).  :data:`FAMILIES` says which module defines the classes
of each family; it is imported by name when first needed, so this module imports no model code
(the tokenizers, below the models, can dispatch through it without a cycle).
"""

from __future__ import annotations

import importlib
import os

from refopt.errors import ConfigError

#: backbone class name (KerasHub) or model_type (transformers) -> (module, backbone class name)
FAMILIES = {"OPTBackbone": ("refopt.models.opt_backbone", "OPTBackbone"),
            "opt": ("refopt.models.opt_backbone", "OPTBackbone")}
#: modules that define every class of a family (imported before a subclass search)
FAMILY_MODULES = ("refopt.models.opt_backbone", "refopt.models.opt_tokenizer",
                  "refopt.models.opt_causal_lm_preprocessor", "refopt.models.opt_causal_lm")


class classproperty:
    """A read-only property of the class (KerasHub's ``presets``)."""

    def __init__(self, fget):
        self.fget = fget

    def __get__(self, instance, owner):
        return self.fget(owner)


def load_families() -> None:
    """Import every family's classes, so subclass searches see them all."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def preset_config(preset):
    """The parsed ``config.json`` of ``preset`` (a path, a built-in name or a hub handle), or
    None when the preset directory has none (a tokenizer-only directory)."""
    from refopt.io import presets

    path = presets.resolve(preset) / "config.json"
    if not os.path.lexists(path):
        return None
    data = presets.read_config_json(path)      # a regular file, bounded, strict JSON
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def backbone_class(preset):
    """The backbone class ``preset`` is for; None when its ``config.json`` is absent or names no
    model (a concrete class's loader then says what is wrong)."""
    data = preset_config(preset)
    if data is None:
        return None
    key = data.get("class_name") or data.get("model_type")
    if key is None:
        return None
    if not isinstance(key, str) or key not in FAMILIES:   # a list or object there: no family either
        raise ConfigError(f"preset {str(preset)!r}: its config.json is for "
                          f"{(key or 'an unknown model') if isinstance(key, str) else str(key)[:100]!r}; refopt has classes for "
                          f"{sorted(k for k in FAMILIES if k[0].isupper())} (KerasHub) and "
                          f"model_type {sorted(k for k in FAMILIES if k[0].islower())} (transformers)")
    module, name = FAMILIES[key]
    return getattr(importlib.import_module(module), name)


def subclasses(cls) -> list:
    """Every subclass of ``cls`` (recursively), in definition order."""
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(s for s in subclasses(sub) if s not in out)
    return out


def find_subclass(preset, cls, backbone_cls):
    """The class to build for ``preset``: ``cls`` itself when it is made for ``backbone_cls``,
    else its subclass that is (KerasHub's ``find_subclass``; ValueError when there is none)."""
    if getattr(cls, "backbone_cls", None) is backbone_cls:
        return cls
    load_families()
    found = [c for c in subclasses(cls) if getattr(c, "backbone_cls", None) is backbone_cls]
    if not found:
        raise ConfigError(f"Unable to find a subclass of {cls.__name__} that is compatible with "
                          f"{backbone_cls.__name__} found in preset '{preset}'.")
    direct = [c for c in found if cls in c.__bases__]
    return (direct or found)[0]


def builtin_presets(cls) -> dict:
    """The built-in presets of ``cls``'s family, of its ``backbone_cls`` and of every subclass
    (KerasHub's ``builtin_presets``): name -> ``{"metadata": ..., handles}``."""
    load_families()
    out = dict(getattr(cls, "backbone_presets", None) or {})
    backbone = getattr(cls, "backbone_cls", None)
    if backbone is not None:
        out.update(getattr(backbone, "backbone_presets", None) or {})
    for sub in subclasses(cls):
        out.update(getattr(sub, "backbone_presets", None) or {})
        backbone = getattr(sub, "backbone_cls", None)
        if backbone is not None:
            out.update(getattr(backbone, "backbone_presets", None) or {})
    return out
