"""What a preset consists of, and where a save may write one.

The file names a preset may hold (:data:`PRESET_FILES`, shards by :data:`SHARD_PATTERNS`), the
kinds a save replaces (:data:`MODEL_FILES`, :data:`TOKENIZER_FILES`, ...), and
:func:`check_destination`, which refuses a destination before anything is written (the rules are
in :mod:`refopt.io.saving`'s docstring).  Nothing here writes: the writing is
:mod:`refopt.io.saving` (the save) and :mod:`refopt.io.journal` (its file-system calls, the journal,
recovery).
"""

from __future__ import annotations

import errno as _errno
import os
import re
from pathlib import Path

from refopt.errors import DestinationError, InputTypeError, SaveError

# refopt's own entries in a preset directory while a save runs (never preset files)
JOURNAL = ".refopt-commit.json"
STAGING_PREFIX = ".refopt-save-"
STAGING_PATTERN = re.compile(r"\.refopt-save-[0-9a-f]{16}")

# -------------------------------------------------------------------- what a preset consists of
KERAS_MODEL_FILES = ("config.json", "model.weights.h5", "metadata.json", "task.json",
                     "model.weights.json")
HF_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
                  "generation_config.json")
KERAS_TOKENIZER_FILES = ("tokenizer.json", "assets/tokenizer/vocabulary.json",
                         "assets/tokenizer/merges.txt")
KERAS_PREPROCESSOR_FILES = ("preprocessor.json",)
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                      "special_tokens_map.json", "tokenizer.json", "added_tokens.json")
REFOPT_FILES = ("MODEL_CARD.md", "refopt_training.json")
# shards: transformers' model-00001-of-00003.safetensors, Keras' model_00000.weights.h5
SHARD_PATTERNS = (re.compile(r"model-\d{5}-of-\d{5}\.safetensors"),
                  re.compile(r"model_\d{5}\.weights\.h5"))
PRESET_FILES = frozenset(KERAS_MODEL_FILES + HF_MODEL_FILES + KERAS_TOKENIZER_FILES
                         + KERAS_PREPROCESSOR_FILES + HF_TOKENIZER_FILES + REFOPT_FILES)

# What a save replaces: the old preset files of these kinds that it does not write are removed.
MODEL_FILES = frozenset(KERAS_MODEL_FILES + HF_MODEL_FILES) | {"<shards>"}
TOKENIZER_FILES = frozenset(KERAS_TOKENIZER_FILES)
PREPROCESSOR_FILES = frozenset(KERAS_PREPROCESSOR_FILES + KERAS_TOKENIZER_FILES)
HF_TOKENIZER = frozenset(HF_TOKENIZER_FILES)
WHOLE_PRESET = PRESET_FILES | {"<shards>"}


def is_preset_file(rel: str) -> bool:
    """Whether ``rel`` (a path relative to a preset directory, ``/``-separated) names a file a
    preset consists of."""
    return rel in PRESET_FILES or any(p.fullmatch(rel) for p in SHARD_PATTERNS)


def in_scope(rel: str, scope) -> bool:
    return rel in scope or ("<shards>" in scope and any(p.fullmatch(rel) for p in SHARD_PATTERNS))


# -------------------------------------------------------------------- destination checks
def list_preset_files(directory) -> tuple[list[str], list[str]]:
    """(preset files, other entries) directly in ``directory`` and under its ``assets/``,
    as ``/``-separated relative paths (refopt's own journal and staging entries are in neither)."""
    ours, others = [], []
    for entry in os.scandir(directory):
        rel = entry.name
        if rel == JOURNAL or STAGING_PATTERN.fullmatch(rel) or rel.startswith(".refopt-journal-"):
            continue
        if rel == "assets" and entry.is_dir(follow_symlinks=False):
            sub_ours, sub_others = _listing_assets(Path(entry.path))
            ours += sub_ours
            others += sub_others
        elif is_preset_file(rel) and not entry.is_dir():
            ours.append(rel)
        else:
            others.append(rel + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return ours, others


def _listing_assets(assets: Path):
    ours, others = [], []
    for entry in os.scandir(assets):
        if entry.name == "tokenizer" and entry.is_dir(follow_symlinks=False):
            for inner in os.scandir(entry.path):
                rel = f"assets/tokenizer/{inner.name}"
                (ours if is_preset_file(rel) and not inner.is_dir() else others).append(rel)
        else:
            others.append(f"assets/{entry.name}")
    return ours, others


def _special(path: Path) -> str | None:
    """Why ``path`` is a directory no save should write into unasked, or None."""
    real = os.path.realpath(path)
    if real == os.path.realpath(os.getcwd()):
        return "is the current directory"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "is the home directory"
    if real == os.path.dirname(real) or os.path.ismount(real):
        return "is the root of a file system"
    return None


def check_destination(target, overwrite: bool = False, what: str = "preset") -> Path:
    """The directory a save of ``what`` would write, or :class:`DestinationError` saying why it
    may not (see the module docstring).  Nothing is written."""
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if not isinstance(target, str):
        raise InputTypeError(f"save_to_preset: the path must be a string or a path, got "
                             f"{type(target).__name__}")
    if not isinstance(overwrite, bool):
        raise InputTypeError(f"save_to_preset: overwrite={overwrite!r}; expected True or False")
    if "\0" in target:
        raise DestinationError(f"save_to_preset: the path {target!r} holds a NUL character")
    if target == "":
        if not overwrite:
            raise DestinationError("save_to_preset: the path is empty (''), which names the current "
                                   "directory; pass a directory name (or overwrite=True / --force "
                                   "to write the preset files into the current directory)")
        target = "."
    path = Path(target).expanduser()
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != _errno.ELOOP:
            raise DestinationError(f"{path}: cannot be a preset directory ({e.strerror or e})") \
                from None
    if os.path.islink(path) and not path.exists():
        raise DestinationError(f"{path} is a broken symbolic link; refopt will not replace it")
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{path} exists and is not a directory (a preset is a directory); "
                               "refopt will not replace it")
    if path.is_dir():
        why = _special(path)
        if why and not overwrite:
            raise DestinationError(f"{path} {why}; refusing to write {what} files there (pass "
                                   "overwrite=True / --force to write them anyway; other files are "
                                   "never touched)")
        try:
            _, others = list_preset_files(path)
        except OSError as e:
            raise SaveError(f"{path}: cannot list the directory ({e.strerror or e})", e.errno,
                            path) from None
        if others and not overwrite:
            shown = ", ".join(sorted(others)[:5]) + (" ..." if len(others) > 5 else "")
            raise DestinationError(f"{path} holds files that are not part of a preset ({shown}); "
                                   f"refusing to write {what} files there (pass overwrite=True / "
                                   "--force to write them anyway; those files are kept)")
    return path
