"""OPT's built-in presets (KerasHub's ``opt_presets.py`` layout): name -> metadata and where to get
it.  ``from_preset(name)`` looks for the files under ``$REFOPT_HOME/<name>`` (see
:mod:`refopt.io.presets`); the handles say where to download them on a machine with network access.

KerasHub ships the four sizes in :data:`refopt.config.KERAS_PRESETS` (Kaggle handles); every
released size is listed here, with the transformers checkpoint it converts from.
"""

from refopt.config import KERAS_PRESETS, RELEASED, released_config


def _description(size: str) -> str:
    cfg = released_config(size)
    norm = "post-LayerNorm, 512-wide embedding projected" if not cfg.do_layer_norm_before else "pre-LayerNorm"
    return (f"{cfg.num_layers}-layer OPT model ({norm}) where case is maintained. Trained on "
            "BookCorpus, CommonCrawl, Pile, and PushShift.io corpora.")


backbone_presets = {}
for _size in RELEASED:
    _name = f"opt_{_size}_en"
    backbone_presets[_name] = {
        "metadata": {"description": _description(_size),
                     "params": released_config(_size).parameter_count(), "path": "opt"},
        "hf_handle": f"hf://facebook/opt-{_size}",
    }
    if _name in KERAS_PRESETS:
        backbone_presets[_name]["kaggle_handle"] = f"kaggle://keras/opt/keras/{_name}/3"
