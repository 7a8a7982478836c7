"""Adapters for established OPT implementations, imported only when used:

* :class:`refopt.testing.adapters.transformers.TransformersAdapter` -- Hugging Face transformers
  (PyTorch), in process; needs ``torch`` and ``transformers`` (``pip install refopt[peers]``);
* :class:`refopt.testing.adapters.keras_hub.KerasHubAdapter` -- KerasHub with its TensorFlow backend,
  in a subprocess (TensorFlow and PyTorch never share a process); needs ``keras-hub`` and
  ``tensorflow`` (``pip install refopt[keras]``) in ``sys.executable`` or in the interpreter named by
  ``REFOPT_KERAS_PYTHON``;
* :class:`refopt.testing.adapters.ctranslate2.CTranslate2Adapter` -- CTranslate2's C++ generator, on a
  model its own converter wrote (``pip install refopt[ctranslate2]``).
"""

from __future__ import annotations

from pathlib import Path


def transformers_config(path, reader: str):
    """The :class:`refopt.OPTConfig` of a transformers checkpoint directory, for an adapter whose
    ``reader`` reads only that layout; :class:`refopt.testing.NotSupported` for anything else (the
    oracle then passes refopt's reading of the preset instead)."""
    from refopt.config import OPTConfig
    from refopt.testing.adapter import NotSupported

    from refopt.errors import RefoptError
    from refopt.io import presets

    path = Path(path)
    try:
        data = presets.read_config_json(path / "config.json")     # bounded, strict, regular files only
    except RefoptError:
        raise NotSupported(f"{path} has no readable config.json") from None
    if data.get("model_type") != "opt":
        raise NotSupported(f"{path} is not a transformers checkpoint ({reader} reads only that layout; "
                           "the oracle passes refopt's reading of it instead)")
    return OPTConfig.from_huggingface(data, str(path / "config.json"))
