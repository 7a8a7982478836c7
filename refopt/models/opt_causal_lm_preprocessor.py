"""``OPTCausalLMPreprocessor``: KerasHub's OPT causal-LM preprocessor, a
:class:`~refopt.models.CausalLMPreprocessor` with an :class:`~refopt.models.OPTTokenizer`
(``</s>`` starts and ends a sequence, ``<pad>`` pads)."""

from refopt.models.causal_lm_preprocessor import CausalLMPreprocessor, pack_start_end  # noqa: F401
from refopt.models.opt_backbone import OPTBackbone
from refopt.models.opt_tokenizer import OPTTokenizer


class OPTCausalLMPreprocessor(CausalLMPreprocessor):
    """OPT causal-LM preprocessing: KerasHub's ``OPTCausalLMPreprocessor`` (see
    :class:`~refopt.models.CausalLMPreprocessor` for the arguments and outputs).

    Examples::

        preprocessor = refopt.models.OPTCausalLMPreprocessor.from_preset("path/to/opt_125m")
        x, y, sample_weight = preprocessor(["The quick brown fox jumped.", "Call me Ishmael."])
        x = preprocessor.generate_preprocess(["Hello world"], sequence_length=10)
        text = preprocessor.generate_postprocess(x)       # ["Hello world"]
    """

    backbone_cls = OPTBackbone
    tokenizer_cls = OPTTokenizer
    keras_module = "keras_hub.src.models.opt.opt_causal_lm_preprocessor"
    keras_class_name = "OPTCausalLMPreprocessor"
    default_name = "opt_causal_lm_preprocessor"
