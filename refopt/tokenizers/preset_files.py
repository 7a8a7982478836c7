"""Reading and writing tokenizer files in KerasHub's and transformers' preset layouts.

KerasHub preset directory (what ``save_to_preset`` writes)::

    tokenizer.json                  {"module", "class_name", "config", "registered_name"}
    preprocessor.json               the preprocessor, its tokenizer nested in its config
    assets/tokenizer/vocabulary.json
    assets/tokenizer/merges.txt

transformers checkpoint directory::

    vocab.json, merges.txt          the vocabulary and merges (GPT-2's file formats)
    tokenizer_config.json           tokenizer_class, add_prefix_space, special tokens; refopt adds
                                    a "refopt" entry with the settings transformers has no key for
                                    (sequence_length, unsplittable tokens, the preprocessor's)
    tokenizer.json                  (optional) the ``tokenizers`` serialization, read when
                                    vocab.json / merges.txt are absent

Every file is read as :mod:`refopt.io.files` reads (regular files only, size caps, strict JSON:
``"false"`` is not a boolean), and every malformed value is a :class:`TokenizerError` naming the
file and key.  This module is the one place that knows these file names: :func:`has_tokenizer`
says whether a directory holds a tokenizer, :func:`find_tokenizer_files` where it is.
"""

from __future__ import annotations

import json
import os

from refopt.errors import PresetNotFoundError, TokenizerError
from refopt.io import files

TOKENIZER_CONFIG_FILE = "tokenizer.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor.json"
TOKENIZER_ASSET_DIR = os.path.join("assets", "tokenizer")
KERAS_VOCABULARY_FILE = "vocabulary.json"
KERAS_MERGES_FILE = "merges.txt"
HF_VOCABULARY_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
HF_TOKENIZERS_FILE = "tokenizer.json"
REFOPT_KEY = "refopt"          # refopt's settings inside transformers' tokenizer_config.json
# The same files as paths inside a preset (what refopt.io.saving writes).
KERAS_VOCABULARY_PATH = f"assets/tokenizer/{KERAS_VOCABULARY_FILE}"
KERAS_MERGES_PATH = f"assets/tokenizer/{KERAS_MERGES_FILE}"


def keras_dtype_policy(name: str) -> dict:
    """KerasHub's serialized ``DTypePolicy``."""
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": name},
            "registered_name": None}


def dtype_name(dtype) -> str:
    """``"int32"`` from ``"int32"`` or from a serialized ``DTypePolicy``."""
    if isinstance(dtype, dict):
        inner = dtype.get("config")
        dtype = inner.get("name") if isinstance(inner, dict) else None
    return dtype


def read_json(path):
    """A tokenizer or preprocessor JSON file (up to 256 MiB), strictly."""
    return files.read_json(path, TokenizerError, "tokenizer file", max_bytes=files.MAX_TOKENIZER_BYTES)


def preset_directory(preset) -> str:
    """The local directory of ``preset`` (a path); PresetNotFoundError otherwise."""
    from refopt.io import presets

    return os.fspath(presets.resolve(preset))


def has_tokenizer(directory) -> bool:
    """Whether ``directory`` holds tokenizer files of either layout (without reading them)."""
    d = os.fspath(directory)
    return any(os.path.lexists(os.path.join(d, name)) for name in
               (TOKENIZER_CONFIG_FILE, PREPROCESSOR_CONFIG_FILE)) or all(
        os.path.lexists(os.path.join(d, name)) for name in (HF_VOCABULARY_FILE, HF_MERGES_FILE))


def _object(value, source, what):
    if not isinstance(value, dict):
        raise TokenizerError(f"{source}: {what} is {type(value).__name__}, expected a JSON object")
    return value


def _bool(value, source, key):
    if not isinstance(value, bool):
        raise TokenizerError(f"{source}: {key!r} is {value!r}, expected true or false")
    return value


def keras_tokenizer_config(directory):
    """The serialized tokenizer of a KerasHub preset directory, or None if it is not one."""
    path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    assets = os.path.join(directory, TOKENIZER_ASSET_DIR)
    if not (os.path.lexists(path) and os.path.lexists(os.path.join(assets, KERAS_VOCABULARY_FILE))):
        return None
    data = read_json(path)
    if not (isinstance(data, dict) and "class_name" in data and "config" in data):
        return None
    _object(data["config"], path, "'config'")
    return data


def _token_content(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


def _refopt_settings(hf: dict, source) -> dict:
    """refopt's own entry of a transformers ``tokenizer_config.json`` ({} when absent)."""
    settings = hf.get(REFOPT_KEY)
    if settings is None:
        return {}
    settings = _object(settings, source, f"{REFOPT_KEY!r}")
    for key in ("tokenizer", "preprocessor"):
        if key in settings:
            _object(settings[key], source, f"{REFOPT_KEY}.{key}")
    return settings


def transformers_settings(directory) -> dict:
    """refopt's settings saved in a transformers ``tokenizer_config.json`` ({} when none)."""
    path = os.path.join(os.fspath(directory), HF_TOKENIZER_CONFIG_FILE)
    if not os.path.lexists(path):
        return {}
    return _refopt_settings(_object(read_json(path), path, "the file"), path)


def find_tokenizer_files(directory) -> dict:
    """Locate the vocabulary, merges and settings of the tokenizer in a preset directory.

    Returns ``{"layout": "keras" | "transformers", "vocabulary", "merges", "config",
    "special_tokens"}`` where ``vocabulary`` / ``merges`` are paths or already-read objects,
    ``config`` holds constructor arguments found there and ``special_tokens`` (transformers
    only) the special-token strings its config names.
    """
    directory = preset_directory(directory)
    keras = keras_tokenizer_config(directory)
    if keras is not None:
        assets = os.path.join(directory, TOKENIZER_ASSET_DIR)
        return {"layout": "keras", "class_name": keras["class_name"],
                "vocabulary": os.path.join(assets, KERAS_VOCABULARY_FILE),
                "merges": os.path.join(assets, KERAS_MERGES_FILE),
                "config": dict(keras["config"]), "special_tokens": []}
    config, special = {}, []
    cfg_path = os.path.join(directory, HF_TOKENIZER_CONFIG_FILE)
    if os.path.lexists(cfg_path):
        hf = _object(read_json(cfg_path), cfg_path, "the file")
        config.update(_refopt_settings(hf, cfg_path).get("tokenizer", {}))
        if "add_prefix_space" in hf:               # transformers' own key wins over refopt's copy
            config["add_prefix_space"] = _bool(hf["add_prefix_space"], cfg_path, "add_prefix_space")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = _token_content(hf.get(key))
            if isinstance(token, str) and token not in special:
                special.append(token)
        added = hf.get("added_tokens_decoder") or {}
        for entry in _object(added, cfg_path, "'added_tokens_decoder'").values():
            token = _token_content(entry)
            if isinstance(entry, dict) and entry.get("special") is True and isinstance(token, str) \
                    and token not in special:
                special.append(token)
    vocab_path = os.path.join(directory, HF_VOCABULARY_FILE)
    merges_path = os.path.join(directory, HF_MERGES_FILE)
    if os.path.lexists(vocab_path) and os.path.lexists(merges_path):
        return {"layout": "transformers", "class_name": None, "vocabulary": vocab_path,
                "merges": merges_path, "config": config, "special_tokens": special}
    fast_path = os.path.join(directory, HF_TOKENIZERS_FILE)
    if os.path.lexists(fast_path):
        return _from_tokenizers_file(fast_path, config, special)
    raise PresetNotFoundError(
        f"{directory!r} holds no tokenizer: expected tokenizer.json with "
        f"{TOKENIZER_ASSET_DIR}/{KERAS_VOCABULARY_FILE} (KerasHub) or vocab.json and merges.txt "
        "(transformers)")


def _from_tokenizers_file(path, config, special):
    data = _object(read_json(path), path, "the file")
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerError(f"{path}: not a byte-pair tokenizer (model type "
                             f"{model.get('type') if isinstance(model, dict) else None!r})")
    pre = data.get("pre_tokenizer") or {}
    if not isinstance(pre, dict) or pre.get("type") != "ByteLevel":
        raise TokenizerError(f"{path}: pre-tokenizer {pre.get('type') if isinstance(pre, dict) else pre!r} "
                             "is not supported; refopt implements GPT-2's ByteLevel pre-tokenizer")
    if "add_prefix_space" in pre:
        config.setdefault("add_prefix_space", _bool(pre["add_prefix_space"], path,
                                                    "pre_tokenizer.add_prefix_space"))
    vocabulary = dict(_object(model.get("vocab", {}), path, "model.vocab"))
    merges = model.get("merges", [])
    if not isinstance(merges, list):
        raise TokenizerError(f"{path}: model.merges is {type(merges).__name__}, expected a list")
    added_tokens = data.get("added_tokens", [])
    if not isinstance(added_tokens, list):
        raise TokenizerError(f"{path}: added_tokens is {type(added_tokens).__name__}, expected a list")
    for i, added in enumerate(added_tokens):
        if not (isinstance(added, dict) and isinstance(added.get("content"), str)
                and type(added.get("id")) is int):
            raise TokenizerError(f"{path}: added_tokens[{i}] is not an object with a string "
                                 "'content' and an integer 'id'")
        vocabulary.setdefault(added["content"], added["id"])
        if added.get("special") is True and added["content"] not in special:
            special.append(added["content"])
    return {"layout": "transformers", "class_name": None, "vocabulary": vocabulary,
            "merges": merges, "config": config, "special_tokens": special}


def read_preprocessor_settings(directory) -> dict:
    """The preprocessor settings a preset saved: KerasHub's ``preprocessor.json``, or refopt's
    entry of a transformers ``tokenizer_config.json`` ({} when neither)."""
    path = os.path.join(os.fspath(directory), PREPROCESSOR_CONFIG_FILE)
    if os.path.lexists(path):
        saved = _object(read_json(path), path, "the file")
        saved = _object(saved.get("config", saved), path, "'config'")
        return {k: saved[k] for k in ("name", "config_file", "sequence_length",
                                      "add_start_token", "add_end_token") if k in saved}
    return dict(transformers_settings(directory).get("preprocessor", {}))


# ----------------------------------------------------------------------------------- writing
def write_keras_tokenizer(staging, config_file: str, serialized: dict, vocabulary: dict,
                          merges: list) -> None:
    """``tokenizer.json`` (or ``config_file``) and ``assets/tokenizer/`` into a preset save:
    the vocabulary ASCII-escaped, as KerasHub writes it."""
    from refopt.tokenizers.bpe import merges_text

    staging.write_json(config_file, serialized, newline=False)
    staging.write_text(KERAS_VOCABULARY_PATH, json.dumps(vocabulary))
    staging.write_text(KERAS_MERGES_PATH, merges_text(merges))


def write_transformers_tokenizer(staging, vocabulary: dict, merges: list, config: dict) -> None:
    """``vocab.json`` (UTF-8), ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` into a preset save."""
    from refopt.tokenizers.bpe import merges_text

    staging.write_text(HF_VOCABULARY_FILE, json.dumps(vocabulary, ensure_ascii=False))
    staging.write_text(HF_MERGES_FILE, merges_text(merges))
    staging.write_json(HF_TOKENIZER_CONFIG_FILE, config, indent=2, ensure_ascii=False)
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if k in config}
    staging.write_json(HF_SPECIAL_TOKENS_MAP_FILE, special, indent=2, ensure_ascii=False)
