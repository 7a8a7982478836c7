"""KerasHub-shaped classes: the base classes ``Backbone``, ``Task``, ``CausalLM``, ``Tokenizer``,
``Preprocessor``, ``CausalLMPreprocessor`` (whose ``from_preset`` builds the class made for the
preset's model) and OPT's ``OPTBackbone``, ``OPTCausalLM``, ``OPTTokenizer``,
``OPTCausalLMPreprocessor``."""

import importlib

_EXPORTS = {
    "Backbone": "refopt.models.backbone",
    "Task": "refopt.models.task",
    "CausalLM": "refopt.models.causal_lm",
    "Tokenizer": "refopt.tokenizers.tokenizer",
    "Preprocessor": "refopt.models.preprocessor",
    "CausalLMPreprocessor": "refopt.models.causal_lm_preprocessor",
    "ReversibleEmbedding": "refopt.models.backbone",
    "OPTBackbone": "refopt.models.opt_backbone",
    "OPTCausalLM": "refopt.models.opt_causal_lm",
    "OPTTokenizer": "refopt.models.opt_tokenizer",
    "OPTCausalLMPreprocessor": "refopt.models.opt_causal_lm_preprocessor",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refopt.models' has no attribute {name!r}")
