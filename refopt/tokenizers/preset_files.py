"""Reading and writing tokenizer files in KerasHub's and transformers' preset layouts.

KerasHub preset directory (what ``save_to_preset`` writes)::

    tokenizer.json                  {"module", "class_name", "config", "registered_name"}
    preprocessor.json               the preprocessor, its tokenizer nested in its config
    assets/tokenizer/vocabulary.json
    assets/tokenizer/merges.txt

transformers checkpoint directory::

    vocab.json, merges.txt          the vocabulary and merges (GPT-2's file formats)
    tokenizer_config.json           tokenizer_class, add_prefix_space, special tokens
    tokenizer.json                  (optional) the ``tokenizers`` serialization, read when
                                    vocab.json / merges.txt are absent
"""

from __future__ import annotations

import json
import os
import tempfile

from refopt.errors import PresetNotFoundError, TokenizerError

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


def keras_dtype_policy(name: str) -> dict:
    """KerasHub's serialized ``DTypePolicy``."""
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": name},
            "registered_name": None}


def dtype_name(dtype) -> str:
    """``"int32"`` from ``"int32"`` or from a serialized ``DTypePolicy``."""
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name")
    return dtype


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path!s} line {e.lineno} column {e.colno}: malformed JSON "
                             f"({e.msg})") from None


def preset_directory(preset) -> str:
    """The local directory of ``preset`` (a path); PresetNotFoundError otherwise."""
    path = os.fspath(preset)
    if not os.path.isdir(path):
        raise PresetNotFoundError(f"preset {path!r} is not a directory; expected a KerasHub preset "
                                  "directory or a transformers checkpoint directory")
    return path


def keras_tokenizer_config(directory):
    """The serialized tokenizer of a KerasHub preset directory, or None if it is not one."""
    path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    assets = os.path.join(directory, TOKENIZER_ASSET_DIR)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(assets, KERAS_VOCABULARY_FILE))):
        return None
    data = read_json(path)
    if not (isinstance(data, dict) and "class_name" in data and "config" in data):
        return None
    return data


def _token_content(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


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
    if os.path.isfile(cfg_path):
        hf = read_json(cfg_path)
        if "add_prefix_space" in hf:
            config["add_prefix_space"] = bool(hf["add_prefix_space"])
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = _token_content(hf.get(key))
            if isinstance(token, str) and token not in special:
                special.append(token)
        for entry in (hf.get("added_tokens_decoder") or {}).values():
            token = _token_content(entry)
            if isinstance(entry, dict) and entry.get("special") and token not in special:
                special.append(token)
    vocab_path = os.path.join(directory, HF_VOCABULARY_FILE)
    merges_path = os.path.join(directory, HF_MERGES_FILE)
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        return {"layout": "transformers", "class_name": None, "vocabulary": vocab_path,
                "merges": merges_path, "config": config, "special_tokens": special}
    fast_path = os.path.join(directory, HF_TOKENIZERS_FILE)
    if os.path.isfile(fast_path):
        data = read_json(fast_path)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise TokenizerError(f"{fast_path}: not a byte-pair tokenizer (model type "
                                 f"{model.get('type') if isinstance(model, dict) else None!r})")
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel":
            raise TokenizerError(f"{fast_path}: pre-tokenizer {pre.get('type')!r} is not "
                                 "supported; refopt implements GPT-2's ByteLevel pre-tokenizer")
        if "add_prefix_space" in pre:
            config.setdefault("add_prefix_space", bool(pre["add_prefix_space"]))
        vocabulary = dict(model.get("vocab") or {})
        for added in data.get("added_tokens") or []:
            vocabulary.setdefault(added["content"], added["id"])
            if added.get("special") and added["content"] not in special:
                special.append(added["content"])
        return {"layout": "transformers", "class_name": None, "vocabulary": vocabulary,
                "merges": list(model.get("merges") or []), "config": config,
                "special_tokens": special}
    raise PresetNotFoundError(
        f"{directory!r} holds no tokenizer: expected tokenizer.json with "
        f"{TOKENIZER_ASSET_DIR}/{KERAS_VOCABULARY_FILE} (KerasHub) or vocab.json and merges.txt "
        "(transformers)")
