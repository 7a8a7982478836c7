"""KerasHub-shaped classes: OPTBackbone, OPTCausalLM, OPTTokenizer, OPTCausalLMPreprocessor."""

import importlib

_EXPORTS = {
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
