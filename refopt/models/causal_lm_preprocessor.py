"""``CausalLMPreprocessor``: strings -> packed ids, labels and weights (KerasHub's semantics), the
base of :class:`~refopt.models.OPTCausalLMPreprocessor`.

Calling the preprocessor tokenizes, prepends the tokenizer's start token (``</s>`` for OPT),
appends its end token, truncates and pads with its pad token to ``sequence_length + 1``
(StartEndPacker), then shifts by one::

    x = {"token_ids": ids[..., :-1], "padding_mask": mask[..., :-1]}
    y = ids[..., 1:]                    # the next token at every position
    sample_weight = mask[..., 1:]       # False where the label is padding

Truncation keeps the end token: with ``add_end_token`` the sequence is cut to leave room for it.
"""

from __future__ import annotations

import numpy as np

from refopt.errors import ConfigError, InputError, InputTypeError
from refopt.limits import check_allocation
from refopt.models.preprocessor import Preprocessor
from refopt.tokenizers import preset_files as pf
from refopt.tokenizers.byte_pair_tokenizer import MAX_SEQUENCE_LENGTH


def pack_start_end(sequences, sequence_length, start_value=None, end_value=None, pad_value=0,
                   add_start_value=True, add_end_value=True):
    """KerasHub's ``StartEndPacker`` with ``return_padding_mask=True``, on lists of ids.

    Prepends ``start_value``; if ``end_value`` is added, truncates to ``sequence_length - 1``
    first and appends it; then truncates / pads with ``pad_value`` to ``sequence_length``.
    Returns ``(token_ids int32 [batch, sequence_length], padding_mask bool [batch,
    sequence_length])``; the mask is True on every position not filled with padding.
    """
    batch = len(sequences)
    check_allocation(batch * sequence_length * 5, f"packing {batch} sequences of length "
                     f"{sequence_length:,}")
    token_ids = np.full((batch, sequence_length), pad_value, dtype=np.int32)
    padding_mask = np.zeros((batch, sequence_length), dtype=bool)
    for row, seq in enumerate(sequences):
        seq = list(seq)
        if add_start_value and start_value is not None:
            seq = [start_value] + seq
        if add_end_value and end_value is not None:
            seq = seq[:max(sequence_length - 1, 0)] + [end_value]
        seq = seq[:sequence_length]
        token_ids[row, :len(seq)] = seq
        padding_mask[row, :len(seq)] = True
    return token_ids, padding_mask


class CausalLMPreprocessor(Preprocessor):
    """Causal-LM preprocessing: KerasHub's ``CausalLMPreprocessor``.  ``from_preset`` on this
    class builds the preset's own subclass (an ``OPTCausalLMPreprocessor`` for an OPT preset).

    Args:
        tokenizer: a tokenizer with start, end and pad tokens (an :class:`refopt.models.OPTTokenizer`).
        sequence_length: length of the packed inputs (and of the labels).
        add_start_token: prepend ``tokenizer.start_token_id`` (``</s>``).
        add_end_token: append ``tokenizer.end_token_id`` (``</s>``).

    Calling it on a string or a list of strings returns ``(x, y, sample_weight)``: ``x`` a dict
    with ``"token_ids"`` (int32) and ``"padding_mask"`` (bool), ``y`` the int32 next-token labels,
    ``sample_weight`` a bool array; 1-D for a string, ``[batch, sequence_length]`` for a list.

    Examples::

        preprocessor = refopt.models.CausalLMPreprocessor.from_preset("path/to/opt_125m")
        x, y, sample_weight = preprocessor(["The quick brown fox jumped.", "Call me Ishmael."])
    """

    keras_module = "keras_hub.src.models.causal_lm_preprocessor"
    keras_class_name = "CausalLMPreprocessor"
    default_name = "causal_lm_preprocessor"

    def __init__(self, tokenizer, sequence_length=1024, add_start_token=True, add_end_token=True,
                 name=None, config_file=pf.PREPROCESSOR_CONFIG_FILE, **kwargs):
        kwargs.pop("trainable", None)
        kwargs.pop("dtype", None)
        if kwargs:
            raise ConfigError(f"{type(self).__name__} got unknown argument(s) {sorted(kwargs)}")
        if not hasattr(tokenizer, "tokenize") or not hasattr(tokenizer, "start_token_id"):
            raise InputTypeError("`tokenizer` must be a tokenizer with start, end and pad tokens "
                                 f"(an OPTTokenizer); got {type(tokenizer).__name__}")
        for key, value in (("add_start_token", add_start_token), ("add_end_token", add_end_token)):
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"`{key}` must be True or False; got {value!r}")
        for key, value in (("name", name), ("config_file", config_file)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"`{key}` must be a string; got {value!r}")
        self.tokenizer = tokenizer
        self.sequence_length = _check_length(sequence_length, "sequence_length")
        self.add_start_token = bool(add_start_token)
        self.add_end_token = bool(add_end_token)
        self.name = name or self.default_name
        self.config_file = config_file

    # -- calls -----------------------------------------------------------------------------------

    def _pack(self, x, sequence_length, add_start, add_end):
        batched = not isinstance(x, str) and not (isinstance(x, np.ndarray) and x.ndim == 0)
        ids = self.tokenizer.tokenize(x if batched else [str(x)])
        if not isinstance(ids, list):  # the tokenizer pads to its own sequence_length
            ids = [list(row) for row in np.asarray(ids)]
        t = self.tokenizer
        token_ids, padding_mask = pack_start_end(
            ids, sequence_length, start_value=t.start_token_id, end_value=t.end_token_id,
            pad_value=t.pad_token_id, add_start_value=add_start, add_end_value=add_end)
        return token_ids, padding_mask, batched

    def __call__(self, x, y=None, sample_weight=None, sequence_length=None):
        """``(x, y, sample_weight)`` for training on the strings ``x``.

        ``y`` and ``sample_weight`` are made from ``x`` (the next tokens and their padding
        mask); passing them raises :class:`InputError`, as labels come from the text itself.
        """
        if y is not None or sample_weight is not None:
            raise InputError(f"{type(self).__name__} makes its own labels and sample weights "
                             "from `x`; pass y=None and sample_weight=None")
        length = _check_length(sequence_length or self.sequence_length, "sequence_length")
        token_ids, padding_mask, batched = self._pack(x, length + 1, self.add_start_token,
                                                      self.add_end_token)
        inputs = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
        labels, weights = token_ids[:, 1:], padding_mask[:, 1:]
        if not batched:
            inputs = {k: v[0] for k, v in inputs.items()}
            labels, weights = labels[0], weights[0]
        return inputs, labels, weights

    def generate_preprocess(self, x, sequence_length=None):
        """Strings -> ``{"token_ids", "padding_mask"}`` for generation: the start token, no end
        token (generation continues the prompt), padded to ``sequence_length``."""
        length = _check_length(sequence_length or self.sequence_length, "sequence_length")
        token_ids, padding_mask, batched = self._pack(x, length, True, False)
        if not batched:
            token_ids, padding_mask = token_ids[0], padding_mask[0]
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def generate_postprocess(self, x):
        """``{"token_ids", "padding_mask"}`` -> strings: drop the positions the mask excludes and
        every special token (start, end, padding), then detokenize."""
        if not isinstance(x, dict) or "token_ids" not in x or "padding_mask" not in x:
            raise InputTypeError("generate_postprocess() takes a dict with 'token_ids' and "
                                 f"'padding_mask'; got {type(x).__name__}")
        token_ids = np.asarray(x["token_ids"])
        padding_mask = np.asarray(x["padding_mask"]).astype(bool)
        if token_ids.shape != padding_mask.shape or token_ids.ndim not in (1, 2):
            raise InputError(f"token_ids {token_ids.shape} and padding_mask {padding_mask.shape} "
                             "must have the same 1-D or 2-D shape")
        keep = padding_mask & ~np.isin(token_ids, self.tokenizer.special_token_ids)
        if token_ids.ndim == 1:
            return self.tokenizer.detokenize(token_ids[keep])
        return [self.tokenizer.detokenize(row[k]) for row, k in zip(token_ids, keep)]

    # -- configs and presets ---------------------------------------------------------------------

    def get_config(self) -> dict:
        """KerasHub's config, the tokenizer serialized inside."""
        return {"name": self.name, "trainable": True, "dtype": pf.keras_dtype_policy("float32"),
                "tokenizer": self.tokenizer.serialize(), "config_file": self.config_file,
                "sequence_length": self.sequence_length, "add_start_token": self.add_start_token,
                "add_end_token": self.add_end_token}

    @classmethod
    def from_config(cls, config, tokenizer=None):
        """A preprocessor from :meth:`get_config`'s dict.  The tokenizer config inside carries no
        vocabulary: pass ``tokenizer`` (or set its vocabulary afterwards)."""
        config = dict(config)
        serialized = config.pop("tokenizer", None)
        if tokenizer is None:
            if serialized is None:
                raise ConfigError("from_config() needs a 'tokenizer' entry or a `tokenizer`")
            inner = serialized.get("config", serialized) if isinstance(serialized, dict) else {}
            if cls.tokenizer_cls is None:
                raise ConfigError(f"{cls.__name__}.from_config: pass `tokenizer` (this class is "
                                  "not tied to one tokenizer class)")
            tokenizer = cls.tokenizer_cls.from_config(inner)
        return cls(tokenizer=tokenizer, **config)

    @classmethod
    def _load_preset(cls, directory, **kwargs):
        """Read a KerasHub preset directory (``preprocessor.json`` + tokenizer) or a transformers
        checkpoint directory (tokenizer files; the settings refopt saved there, else
        ``sequence_length`` 1024).  ``kwargs`` override saved settings (``sequence_length=...``)."""
        settings = pf.read_preprocessor_settings(directory)
        tokenizer_kwargs = {k: kwargs.pop(k) for k in list(kwargs)
                            if k in ("add_prefix_space", "unsplittable_tokens",
                                     "special_tokens_in_strings", "compiled")}
        tokenizer = kwargs.pop("tokenizer", None) or cls.tokenizer_cls.from_preset(
            directory, **tokenizer_kwargs)
        settings.update(kwargs)
        try:
            return cls(tokenizer=tokenizer, **settings)
        except ConfigError as e:
            raise ConfigError(f"{directory}: the saved preprocessor settings are invalid: {e}") \
                from None

    def write_transformers_files(self, staging) -> None:
        """The tokenizer in transformers' layout, this preprocessor's settings kept beside it."""
        settings = {k: v for k, v in self.get_config().items()
                    if k in ("name", "sequence_length", "add_start_token", "add_end_token")}
        self.tokenizer.write_transformers_files(staging, preprocessor=settings)

    def export_to_transformers(self, path, overwrite=False) -> None:
        """Write the tokenizer in transformers' layout, with this preprocessor's settings."""
        from refopt.io import saving

        with saving.PresetSave(path, overwrite=overwrite, replaces=saving.HF_TOKENIZER,
                               what="tokenizer") as staging:
            self.write_transformers_files(staging)

    def __repr__(self):
        return (f"{type(self).__name__}(sequence_length={self.sequence_length}, "
                f"add_start_token={self.add_start_token}, add_end_token={self.add_end_token})")


def _check_length(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not \
            1 <= value <= MAX_SEQUENCE_LENGTH:
        raise ConfigError(f"`{name}` must be an integer from 1 to {MAX_SEQUENCE_LENGTH:,}; got "
                          f"{value!r}")
    return int(value)
