"""``BytePairTokenizer``: GPT-2's byte-level BPE with KerasHub's API.

Encoding is byte-exact with OpenAI's ``encoder.py``, tiktoken and ``tokenizers``: GPT-2's split
pattern, the byte-to-character table, merges applied lowest rank first (see
:mod:`refopt.tokenizers.byte_level` and :mod:`refopt.tokenizers.bpe`).  The work runs in a
compiled kernel (:mod:`refopt.tokenizers._kernels`) when Numba is available and in plain Python
otherwise; both give the same ids.

Decoding joins the tokens' bytes and decodes them as UTF-8 with ``errors="replace"``: ids whose
bytes are not valid UTF-8 on their own (half of a multi-byte character, say) give U+FFFD
replacement characters, as transformers' and ``tokenizers``' decoders do.  For streaming, use
:class:`refopt.tokenizers.IncrementalDetokenizer`, which holds incomplete characters back.
"""

from __future__ import annotations

import os

import numpy as np

from refopt.errors import ConfigError, InputTypeError, TokenizerError
from refopt.limits import check_allocation
from refopt.tokenizers import preset_files as pf
from refopt.tokenizers.bpe import build_tables, encode_words
from refopt.tokenizers.byte_level import byte_symbols, char_class_table, pretokenize
from refopt.tokenizers.inputs import ids_of, split_segments, texts_of
from refopt.tokenizers.tokenizer import Tokenizer

_DTYPES = ("int32", "int64", "string")
_CONFIG_KEYS = {"name", "trainable", "dtype", "config_file", "sequence_length", "add_prefix_space",
                "unsplittable_tokens", "special_tokens_in_strings"}
MAX_SEQUENCE_LENGTH = 1 << 24


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


class BytePairTokenizer(Tokenizer):
    """Byte-level BPE tokenizer, GPT-2's algorithm (KerasHub's ``BytePairTokenizer``).

    Args:
        vocabulary: path to a JSON file, or a dict, mapping token strings to integer ids.
        merges: path to a ``merges.txt`` file, or a list of merge rules (``"a b"`` strings or
            ``(a, b)`` pairs), lowest rank first.
        sequence_length: if set, outputs are truncated or padded (with ``pad_token_id``, else 0)
            to this length and returned as NumPy arrays.
        add_prefix_space: add a space before each text that does not start with one (and before
            each piece of text between unsplittable tokens), so that the first word is tokenized
            like the others.  This is the rule of ``tokenizers``' ByteLevel pre-tokenizer, which
            KerasHub uses.
        unsplittable_tokens: strings that, where they appear in the input text, are never split
            and map to their own id.  They must be in the vocabulary.  ``None``: the tokenizer's
            special tokens when ``special_tokens_in_strings`` is true, else none.
        special_tokens_in_strings: whether special tokens written in the input text (``"</s>"``)
            map to their ids (True, KerasHub's behaviour) or are tokenized as ordinary text
            (False, what transformers does with ``split_special_tokens=True``).  Only consulted
            when ``unsplittable_tokens`` is None.
        dtype: ``"int32"`` (default) or ``"int64"`` ids, or ``"string"`` for token strings.
        name: the layer name recorded in the config.
        compiled: use the compiled (Numba) encoder; ``None`` uses it when Numba is installed.
            Both give the same ids; the pure-Python path is the readable one.

    Calling the tokenizer on a string returns a list of ids (a 1-D array if ``sequence_length``
    is set); on a list of strings, a list of such lists (a ``[batch, sequence_length]`` array).
    """

    keras_module = "keras_hub.src.tokenizers.byte_pair_tokenizer"
    keras_class_name = "BytePairTokenizer"
    default_name = "byte_pair_tokenizer"
    # (attribute, token) pairs of the special tokens a subclass requires.
    special_token_spec: tuple = ()

    def __init__(self, vocabulary=None, merges=None, sequence_length=None, add_prefix_space=False,
                 unsplittable_tokens=None, special_tokens_in_strings=True, dtype="int32",
                 name=None, config_file=pf.TOKENIZER_CONFIG_FILE, compiled=None, **kwargs):
        kwargs.pop("trainable", None)
        if kwargs:
            raise ConfigError(f"{type(self).__name__} got unknown argument(s) "
                              f"{sorted(kwargs)}")
        dtype = pf.dtype_name(dtype)
        if dtype not in _DTYPES:
            raise ConfigError(f"`dtype` must be one of {_DTYPES}; got {dtype!r}")
        if sequence_length is not None and (isinstance(sequence_length, bool)
                                            or not isinstance(sequence_length, (int, np.integer))
                                            or sequence_length < 0):
            raise ConfigError(f"`sequence_length` must be None or an integer >= 0; got "
                              f"{sequence_length!r}")
        if sequence_length is not None and sequence_length > MAX_SEQUENCE_LENGTH:
            raise ConfigError(f"`sequence_length` must be at most {MAX_SEQUENCE_LENGTH:,}; got "
                              f"{sequence_length!r}")
        for key, value in (("add_prefix_space", add_prefix_space),
                           ("special_tokens_in_strings", special_tokens_in_strings)):
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"`{key}` must be True or False; got {value!r}")
        for key, value in (("name", name), ("config_file", config_file)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"`{key}` must be a string; got {value!r}")
        self.name = name or self.default_name
        self.dtype = dtype
        self.config_file = config_file
        self.sequence_length = None if sequence_length is None else int(sequence_length)
        self.add_prefix_space = bool(add_prefix_space)
        self.special_tokens_in_strings = bool(special_tokens_in_strings)
        for attr, token in self.special_token_spec:
            setattr(self, attr, token)
            setattr(self, attr + "_id", None)
        if unsplittable_tokens is None:
            unsplittable_tokens = self.special_tokens if special_tokens_in_strings else []
        if not isinstance(unsplittable_tokens, (list, tuple)) or not all(
                isinstance(t, str) and t for t in unsplittable_tokens):
            raise ConfigError("`unsplittable_tokens` must be a list of non-empty strings; got "
                              f"{unsplittable_tokens!r}")
        self.unsplittable_tokens = list(unsplittable_tokens)
        if compiled is None:
            compiled = _numba_available()
        elif compiled and not _numba_available():
            raise ConfigError("`compiled=True` needs Numba, which is not installed")
        self.compiled = bool(compiled)
        self.set_vocabulary_and_merges(vocabulary, merges)

    # -- vocabulary ------------------------------------------------------------------------------

    def set_vocabulary_and_merges(self, vocabulary, merges):
        """Set (or, with both None, clear) the vocabulary and merge rules, from data or files."""
        self._reset_encoders()
        if vocabulary is None and merges is None:
            self._tables = None
            return
        if vocabulary is None or merges is None:
            raise ConfigError("`vocabulary` and `merges` must be given together; got "
                              f"vocabulary={'None' if vocabulary is None else '...'}, "
                              f"merges={'None' if merges is None else '...'}")
        self._tables = build_tables(vocabulary, merges)
        vocab = self._tables.vocabulary
        for attr, token in self.special_token_spec:
            if token not in vocab:
                raise TokenizerError(f"special token {token!r} ({attr}) of "
                                     f"{type(self).__name__} is not in the vocabulary")
            setattr(self, attr + "_id", vocab[token])
        for token in self.unsplittable_tokens:
            if token not in vocab:
                raise TokenizerError(f"unsplittable token {token!r} is not in the vocabulary")
        self._missing_bytes = bool((self._tables.byte_ids >= self._tables.num_ids).any())

    def _reset_encoders(self):
        self._packed = None  # compiled tables
        self._state = None  # compiled word cache
        self._encode_one = None  # the compiled kernel, once tables are packed
        self._word_cache = {}  # pure-Python word cache
        self._py_byte_ids = None
        self._missing_bytes = False  # some byte has no token (checked after encoding)

    def _require_vocabulary(self):
        if self._tables is None:
            raise TokenizerError(f"no vocabulary has been set for {type(self).__name__}; pass "
                                 "`vocabulary` and `merges` or call set_vocabulary_and_merges()")
        return self._tables

    @property
    def vocabulary(self) -> dict:
        """The token -> id dict (None before a vocabulary is set)."""
        return None if self._tables is None else self._tables.vocabulary

    @property
    def merges(self) -> list:
        """The merge rules, ``"a b"`` strings, lowest rank first."""
        return None if self._tables is None else self._tables.merges

    def vocabulary_size(self) -> int:
        """The number of tokens in the vocabulary."""
        return len(self._require_vocabulary().vocabulary)

    def get_vocabulary(self) -> list:
        """The tokens, in id order."""
        return [t for t in self._require_vocabulary().id_to_token if t is not None]

    def id_to_token(self, id) -> str:
        """The token string of ``id``."""
        tables = self._require_vocabulary()
        return tables.id_to_token[_checked_id(tables, id, "`id`", "is not in the vocabulary (ids "
                                                                  "run from 0 to {last})")]

    def token_to_id(self, token) -> int:
        """The id of ``token``."""
        tables = self._require_vocabulary()
        if not isinstance(token, str):
            raise InputTypeError(f"`token` must be a string; got {type(token).__name__}")
        try:
            return tables.vocabulary[token]
        except KeyError:
            raise TokenizerError(f"token {token!r} is not in the vocabulary") from None

    @property
    def special_tokens(self) -> list:
        """The special token strings (each once), in the order the class declares them."""
        out = []
        for attr, _ in self.special_token_spec:
            token = getattr(self, attr)
            if token not in out:
                out.append(token)
        return out

    @property
    def special_token_ids(self) -> list:
        """The ids of :attr:`special_tokens`."""
        self._require_vocabulary()
        return [self._tables.vocabulary[t] for t in self.special_tokens]

    # -- encoding --------------------------------------------------------------------------------

    def tokenize(self, inputs):
        """Token ids of a string (a list) or of a list of strings (a list of lists).

        With ``sequence_length`` set the result is a NumPy array, truncated or padded with
        ``pad_token_id`` (0 when the tokenizer has none).  Raises :class:`InputTypeError` for
        anything but strings and :class:`TokenizerError` for text that cannot be UTF-8 encoded
        (lone surrogates).
        """
        if type(inputs) is str and self._encode_one is not None and self.sequence_length is None \
                and not self.add_prefix_space and self._plain_ids:
            # The common case in few steps: a short text costs about 1 us.
            for token in self.unsplittable_tokens:
                if token in inputs:
                    break
            else:
                try:
                    data = inputs.encode("utf-8")
                except UnicodeEncodeError:
                    data = None  # the general path reports it
                if data is not None:
                    out = np.empty(len(data) + 1, dtype=np.int32)  # per call: thread-safe
                    n = self._encode_one(data, self._packed, self._state, out)
                    return out[:n].tolist()
        self._require_vocabulary()
        texts, batched = texts_of(inputs)
        ids = self._encode_texts(texts)
        if self.dtype == "string":
            id_to_token = self._tables.id_to_token
            ids = [[id_to_token[i] for i in seq] for seq in ids]
        if self.sequence_length is not None:
            length = self.sequence_length
            if self.dtype == "string":
                pad, dtype = "", object
            else:
                pad, dtype = getattr(self, "pad_token_id", None), self.dtype
                pad = 0 if pad is None else pad
            check_allocation(len(ids) * length * 8, f"tokenize: {len(ids)} texts x "
                             f"sequence_length {length:,}")
            array = np.full((len(ids), length), pad, dtype=dtype)
            for row, seq in zip(array, ids):
                seq = seq[:length]
                row[:len(seq)] = seq
            return array if batched else array[0]
        return ids if batched else ids[0]

    __call__ = tokenize

    @property
    def _plain_ids(self):
        return self.dtype != "string" and not self._missing_bytes

    def _encode_texts(self, texts) -> list:
        segments, plans = split_segments(texts, self.unsplittable_tokens, self.add_prefix_space,
                                         self._tables.vocabulary)
        try:
            encoded = [text.encode("utf-8") for text in segments]
        except UnicodeEncodeError:
            for i, text in enumerate(texts):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise TokenizerError(
                        f"input {i} cannot be encoded as UTF-8: character {text[e.start]!r} at "
                        f"index {e.start} is a lone surrogate, which has no UTF-8 form") from None
            raise
        if self.compiled:
            seg_ids = self._encode_compiled(encoded)
        else:
            seg_ids = [self._encode_python(text) for text in segments]
        if self._missing_bytes:
            self._check_bytes(seg_ids, encoded)
        if plans is None:
            return seg_ids
        out = []
        for plan in plans:
            ids = []
            for item in plan:
                if isinstance(item, tuple):
                    ids.append(item[1])
                else:
                    ids.extend(seg_ids[item])
            out.append(ids)
        return out

    def _compiled_tables(self):
        if self._packed is None:
            from refopt.tokenizers import _kernels
            t = self._tables
            index, blocks = char_class_table()
            self._packed = _kernels.pack_tables(t.byte_ids, index, blocks, t.pair_keys,
                                                t.pair_ranks, t.pair_new)
            self._state = _kernels.new_state()
            self._encode_one = _kernels.encode_one
        return self._packed

    def _encode_compiled(self, encoded: list) -> list:
        from refopt.tokenizers import _kernels
        return _kernels.encode_batch(encoded, self._compiled_tables(), self._state)

    def _encode_python(self, text: str) -> list:
        """The readable path: split with the regex, merge each word (cached)."""
        if self._py_byte_ids is None:
            self._py_byte_ids = self._tables.byte_ids.tolist()
        return encode_words(pretokenize(text), self._py_byte_ids, self._tables.pair_dict,
                            self._word_cache)

    def _check_bytes(self, seg_ids, encoded):
        """Raise if a byte the vocabulary lacks is left unmerged in the output."""
        num_ids = self._tables.num_ids
        for ids, data in zip(seg_ids, encoded):
            bad = [i for i in ids if i >= num_ids]
            if bad:
                byte = bad[0] - num_ids
                raise TokenizerError(
                    f"byte 0x{byte:02x} of the input (byte-level symbol "
                    f"{byte_symbols()[byte]!r}) has no token in the vocabulary and no merge "
                    "absorbs it")

    # -- decoding --------------------------------------------------------------------------------

    def detokenize(self, inputs):
        """Text of ids: an int or a 1-D sequence gives a string, a 2-D one a list of strings.

        Bytes that do not form valid UTF-8 become U+FFFD.  Ids outside the vocabulary raise
        :class:`TokenizerError`; non-integer input raises :class:`InputTypeError`.
        """
        tables = self._require_vocabulary()
        seqs, batched = ids_of(inputs)
        id_to_bytes = tables.id_to_bytes
        texts = []
        for seq in seqs:
            if len(seq):
                low, high = int(seq.min()), int(seq.max())
                if low < 0 or high >= tables.num_ids:
                    bad = low if low < 0 else high
                    raise TokenizerError(f"id {bad} is out of range for detokenize; the "
                                         f"vocabulary's ids run from 0 to {tables.num_ids - 1}")
            try:
                data = b"".join([id_to_bytes[i] for i in seq.tolist()])
            except TypeError:
                bad = next(i for i in seq.tolist() if id_to_bytes[i] is None)
                raise TokenizerError(f"id {bad} is not in the vocabulary") from None
            texts.append(data.decode("utf-8", errors="replace"))
        return texts if batched else texts[0]

    def id_bytes(self, id) -> bytes:
        """The raw bytes token ``id`` stands for (used by streaming detokenization)."""
        tables = self._require_vocabulary()
        return tables.id_to_bytes[_checked_id(tables, id, "token id", "is out of range for "
                                              "detokenize; the vocabulary's ids run from 0 to {last}")]

    # -- configs and presets ---------------------------------------------------------------------

    def get_config(self) -> dict:
        """KerasHub's config (no vocabulary: that is saved as assets)."""
        return {"name": self.name, "trainable": True, "dtype": pf.keras_dtype_policy(self.dtype),
                "config_file": self.config_file, "sequence_length": self.sequence_length,
                "add_prefix_space": self.add_prefix_space,
                "unsplittable_tokens": list(self.unsplittable_tokens)}

    @classmethod
    def from_config(cls, config, vocabulary=None, merges=None):
        """A tokenizer from :meth:`get_config`'s dict (vocabulary and merges given apart)."""
        config = dict(config)
        config.setdefault("vocabulary", vocabulary)
        config.setdefault("merges", merges)
        return cls(**config)

    def serialize(self) -> dict:
        """The object KerasHub writes to ``tokenizer.json``."""
        return {"module": self.keras_module, "class_name": self.keras_class_name,
                "config": self.get_config(),
                "registered_name": f"keras_hub>{self.keras_class_name}"}

    def save_assets(self, dir_path) -> None:
        """Write ``vocabulary.json`` (ASCII-escaped, as KerasHub does) and ``merges.txt`` into
        ``dir_path``, each through a temporary file and a rename."""
        from refopt.tokenizers.bpe import write_merges, write_vocabulary

        tables = self._require_vocabulary()
        os.makedirs(dir_path, exist_ok=True)
        write_vocabulary(os.path.join(dir_path, pf.KERAS_VOCABULARY_FILE), tables.vocabulary,
                         ensure_ascii=True)
        write_merges(os.path.join(dir_path, pf.KERAS_MERGES_FILE), tables.merges)

    def load_assets(self, dir_path) -> None:
        self.set_vocabulary_and_merges(os.path.join(dir_path, pf.KERAS_VOCABULARY_FILE),
                                       os.path.join(dir_path, pf.KERAS_MERGES_FILE))

    def save_to_preset(self, preset_dir, overwrite=False) -> None:
        """Write ``tokenizer.json`` and ``assets/tokenizer/`` in KerasHub's layout.  Other preset
        files there (a model's) are kept; see :mod:`refopt.io.saving` for where a save may write
        and why no file is ever lost."""
        from refopt.io import saving

        self._require_vocabulary()
        with saving.PresetSave(preset_dir, overwrite=overwrite, replaces=saving.TOKENIZER_FILES,
                               what="tokenizer") as staging:
            self.write_preset_files(staging)

    def write_preset_files(self, staging) -> None:
        """Write this tokenizer's KerasHub files into a :class:`refopt.io.saving.PresetSave`."""
        tables = self._require_vocabulary()
        pf.write_keras_tokenizer(staging, self.config_file, self.serialize(), tables.vocabulary,
                                 tables.merges)

    @classmethod
    def _load_preset(cls, directory, config_file=pf.TOKENIZER_CONFIG_FILE, **kwargs):
        """Read a KerasHub preset directory or a transformers checkpoint directory (see
        :meth:`Tokenizer.from_preset`).

        ``kwargs`` override the saved settings (``sequence_length=...``).  From a transformers
        directory, a plain ``BytePairTokenizer`` treats the special tokens its
        ``tokenizer_config.json`` names as unsplittable (unless ``special_tokens_in_strings`` is
        False); an ``OPTTokenizer`` has its own special tokens.
        """
        if config_file != pf.TOKENIZER_CONFIG_FILE:
            raise ConfigError(f"from_preset: config_file={config_file!r}; refopt reads the "
                              f"tokenizer from {pf.TOKENIZER_CONFIG_FILE!r}")
        found = pf.find_tokenizer_files(directory)
        config = {k: v for k, v in found["config"].items() if k in _CONFIG_KEYS}
        if "dtype" in config:
            config["dtype"] = pf.dtype_name(config["dtype"])
        config.update(kwargs)
        config.setdefault("vocabulary", found["vocabulary"])
        config.setdefault("merges", found["merges"])
        try:
            tokenizer = cls(**config)
        except ConfigError as e:
            raise ConfigError(f"{os.fspath(directory)}: the saved tokenizer settings are "
                              f"invalid: {e}") from None
        if found["layout"] == "transformers" and not cls.special_token_spec \
                and "unsplittable_tokens" not in kwargs \
                and kwargs.get("special_tokens_in_strings", True):
            tokenizer.unsplittable_tokens = [t for t in found["special_tokens"]
                                             if t in tokenizer.vocabulary]
        return tokenizer

    def transformers_tokenizer_config(self) -> dict:
        """The ``tokenizer_config.json`` transformers reads for this tokenizer."""
        return {"add_prefix_space": self.add_prefix_space, "errors": "replace",
                "model_max_length": 1000000000000000019884624838656,
                "tokenizer_class": "GPT2Tokenizer"}

    def export_to_transformers(self, path, overwrite=False, preprocessor=None) -> None:
        """Write a transformers tokenizer directory: ``vocab.json``, ``merges.txt``,
        ``tokenizer_config.json`` (``GPT2Tokenizer``, with refopt's own settings under
        ``"refopt"``) and ``special_tokens_map.json``.  Other preset files there are kept."""
        from refopt.io import saving

        self._require_vocabulary()
        with saving.PresetSave(path, overwrite=overwrite, replaces=saving.HF_TOKENIZER,
                               what="tokenizer") as staging:
            self.write_transformers_files(staging, preprocessor)

    save_to_huggingface = export_to_transformers

    def write_transformers_files(self, staging, preprocessor=None) -> None:
        """Write this tokenizer's transformers files into a :class:`refopt.io.saving.PresetSave`
        (``preprocessor``: a preprocessor's settings to keep beside it)."""
        tables = self._require_vocabulary()
        config = self.transformers_tokenizer_config()
        config[pf.REFOPT_KEY] = {"tokenizer": {k: v for k, v in self.get_config().items()
                                               if k not in config}}
        if preprocessor is not None:
            config[pf.REFOPT_KEY]["preprocessor"] = preprocessor
        pf.write_transformers_tokenizer(staging, tables.vocabulary, tables.merges, config)

    def incremental_detokenizer(self, skip_special_tokens: bool = False):
        """A :class:`refopt.tokenizers.IncrementalDetokenizer` over this tokenizer."""
        from refopt.tokenizers.incremental import IncrementalDetokenizer
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self):
        size = None if self._tables is None else self.vocabulary_size()
        return (f"{type(self).__name__}(vocabulary_size={size}, sequence_length="
                f"{self.sequence_length}, add_prefix_space={self.add_prefix_space})")


def save_transformers_tokenizer(tokenizer, path, overwrite=False) -> None:
    """Write ``tokenizer`` in transformers' layout (``GPT2Tokenizer`` files) to ``path``:
    :meth:`BytePairTokenizer.export_to_transformers`."""
    tokenizer.export_to_transformers(path, overwrite=overwrite)


def _checked_id(tables, id, what: str, missing: str) -> int:
    """``id`` if it is an integer naming a token of ``tables``; else :class:`InputTypeError`
    (``what`` must be an integer) or :class:`TokenizerError` (``id <missing>``, ``{last}`` the
    largest id)."""
    if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
        raise InputTypeError(f"{what} must be an integer; got {type(id).__name__}")
    if not 0 <= id < tables.num_ids or tables.id_to_token[id] is None:
        raise TokenizerError(f"id {id} " + missing.format(last=tables.num_ids - 1))
    return id
