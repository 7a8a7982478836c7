"""``OPTTokenizer``: the byte-level BPE tokenizer of OPT models (KerasHub's ``OPTTokenizer``).

OPT uses GPT-2's merges with fairseq's vocabulary order: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2,
``<unk>`` = 3.  ``</s>`` is both the start and the end token; ``<pad>`` pads.
"""

from __future__ import annotations

from refopt.models.opt_backbone import OPTBackbone
from refopt.tokenizers.byte_pair_tokenizer import BytePairTokenizer


class OPTTokenizer(BytePairTokenizer):
    """An OPT tokenizer: :class:`refopt.tokenizers.BytePairTokenizer` with OPT's special tokens.

    ``start_token`` = ``end_token`` = ``"</s>"`` and ``pad_token`` = ``"<pad>"`` must be in the
    vocabulary (ids 2 and 1 with OPT's).  By default these tokens, written in input text, map to
    their ids (``special_tokens_in_strings=True``, as KerasHub); pass
    ``special_tokens_in_strings=False`` to tokenize them as plain text.

    Examples::

        tokenizer = refopt.models.OPTTokenizer.from_preset("path/to/opt_125m")
        tokenizer("The quick brown fox jumped.")          # [133, 2119, 6219, 23602, 4262, 4]
        tokenizer(["The quick brown fox.", "The fox."])   # a list of lists
        tokenizer.detokenize([133, 2119, 6219, 23602])    # "The quick brown fox"

        vocab = {"<pad>": 1, "</s>": 2, "Ġ": 3, "q": 4, "u": 5, "Ġq": 6, "Ġqu": 7}
        tokenizer = refopt.models.OPTTokenizer(vocabulary=vocab, merges=["Ġ q", "Ġq u"])
        tokenizer(" qu")                                   # [7]
    """

    backbone_cls = OPTBackbone
    keras_module = "keras_hub.src.models.opt.opt_tokenizer"
    keras_class_name = "OPTTokenizer"
    default_name = "opt_tokenizer"
    special_token_spec = (("end_token", "</s>"), ("start_token", "</s>"), ("pad_token", "<pad>"))

    def transformers_tokenizer_config(self) -> dict:
        """OPT's ``tokenizer_config.json``: ``</s>`` as BOS, EOS and UNK, ``<pad>`` to pad; the BOS
        token is prepended, as the published OPT tokenizers do."""
        config = super().transformers_tokenizer_config()
        config.update({"add_bos_token": True, "bos_token": self.start_token,
                       "eos_token": self.end_token, "unk_token": self.end_token,
                       "pad_token": self.pad_token})
        return config
