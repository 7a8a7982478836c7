"""Finding, reading and writing presets: KerasHub preset directories, transformers checkpoint
directories, built-in names looked up under ``REFOPT_HOME``, and hub handles.

A *preset* is any of

* a KerasHub preset directory (``config.json`` with ``class_name: OPTBackbone``,
  ``model.weights.h5``, optional tokenizer/preprocessor files);
* a transformers checkpoint directory (``config.json`` with ``model_type: opt`` and the weights as
  the hub ships them: ``model.safetensors`` (single or sharded), ``pytorch_model.bin`` (single or
  sharded, read by :mod:`refopt.io.torch_pickle` without ever unpickling it), ``tf_model.h5`` or
  ``flax_model.msgpack``; safetensors preferred when several are present);
* a built-in name (``opt_125m_en``, ``opt_350m_en``, ``opt_1.3b_en`` ... ``opt_66b_en``), looked up as
  ``$REFOPT_HOME/<name>`` (default ``~/.cache/refopt/<name>``), then in the Kaggle cache (KerasHub's
  ``keras/opt/keras/<name>``), then in the Hugging Face cache (``facebook/opt-<size>``);
* a hub repository ``owner/name`` (``facebook/opt-125m``) found in the local Hugging Face cache, or
  ``hf://owner/name`` / ``kaggle://owner/model/framework/variant[/version]``: the local caches first
  (:mod:`refopt.io.hub_cache`, no client needed), then a download when the hub client is installed
  and the hub is reachable; otherwise a clear error says so.

Reading goes through :mod:`refopt.io.checkpoint` (validated, lazy); writing through
:mod:`refopt.io.saving` (never loses a file).  :func:`resolve` completes a save that was
interrupted after its commit before anything reads the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from refopt.config import KERAS_PRESETS, RELEASED, OPTConfig
from refopt.errors import CheckpointError, ConfigError, InputTypeError, PresetNotFoundError
from refopt.io import files, hub_cache, journal

HF_REPOS = {f"opt_{size}_en": f"facebook/opt-{size}" for size in RELEASED}
BUILTIN_NAMES = tuple(HF_REPOS)


def refopt_home() -> Path:
    return Path(os.environ.get("REFOPT_HOME", Path.home() / ".cache" / "refopt")).expanduser()


def bundled_preset_dir() -> Path:
    """The default model shipped with refopt (``data/`` in the source tree, ``refopt/_data`` in a
    wheel)."""
    for candidate in (Path(__file__).resolve().parents[2] / "data" / "refopt_shakespeare",
                      Path(__file__).resolve().parents[1] / "_data" / "refopt_shakespeare"):
        if (candidate / "config.json").exists():
            return candidate
    raise PresetNotFoundError("the bundled default preset is not installed (data/refopt_shakespeare); "
                              "pass a preset path or name")


def _missing_builtin(name: str, where: Path) -> PresetNotFoundError:
    repo = HF_REPOS[name]
    lines = [f"preset {name!r} is not on this machine: expected a KerasHub preset or a transformers "
             f"checkpoint directory at {where}. To obtain it:"]
    if name in KERAS_PRESETS:
        lines.append(f"  - KerasHub: download the Kaggle model keras/opt/keras/{name} and unpack it "
                     f"into {where}")
    lines.append(f"  - transformers: `hf download {repo}` (on a machine with network access; copy "
                 f"{hub_cache.hf_cache_dir()} here, or add `--local-dir {where}`)")
    lines.append("  Set REFOPT_HOME to use another presets directory, HF_HUB_CACHE or KAGGLEHUB_CACHE "
                 "for the hub caches.")
    return PresetNotFoundError("\n".join(lines))


def _download(handle: str) -> Path:
    scheme, _, rest = handle.partition("://")
    cached = (hub_cache.find_hf(*_repo_revision(rest)) if scheme == "hf"
              else hub_cache.find_kaggle(rest) if scheme == "kaggle" else None)
    if cached is not None:
        return cached
    try:
        if scheme == "hf":
            from huggingface_hub import snapshot_download

            repo, revision = _repo_revision(rest)
            return Path(snapshot_download(repo, revision=revision,
                                          allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        if scheme == "kaggle":
            import kagglehub

            return Path(kagglehub.model_download(rest))
    except ImportError:
        client = "huggingface_hub" if scheme == "hf" else "kagglehub"
        raise PresetNotFoundError(f"preset {handle!r} is not available offline: install {client} and "
                                  "connect to the hub, or download it elsewhere and pass its "
                                  "directory") from None
    except Exception as e:  # network errors come in many types; all mean the same here
        raise PresetNotFoundError(f"preset {handle!r} is not available offline: the hub could not be "
                                  f"reached ({type(e).__name__}); download it elsewhere and pass its "
                                  "directory") from None
    raise PresetNotFoundError(f"preset {handle!r}: unknown handle scheme {scheme!r} (hf:// or kaggle://)")


def _repo_revision(rest: str) -> tuple[str, str]:
    """``owner/name[@revision]`` -> (``owner/name``, revision or ``"main"``)."""
    repo, _, revision = rest.partition("@")
    return repo, revision or "main"


def _cached_builtin(name: str) -> Path | None:
    """A built-in name in the Kaggle cache (KerasHub's handle) or the Hugging Face cache."""
    if name in KERAS_PRESETS:
        found = hub_cache.find_kaggle(f"keras/opt/keras/{name}")
        if found is not None and (found / "config.json").exists():
            return found
    found = hub_cache.find_hf(HF_REPOS[name])
    return found if found is not None and (found / "config.json").exists() else None


def resolve(preset) -> Path:
    """The directory a preset argument names (see the module docstring)."""
    if preset is None:
        return bundled_preset_dir()
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if not isinstance(preset, str):
        raise InputTypeError(f"preset must be a path or a name, got {type(preset).__name__}")
    if "\0" in preset:
        raise PresetNotFoundError(f"preset {preset!r}: a path cannot hold a NUL character")
    if "://" in preset:
        return _download(preset)
    path = Path(preset).expanduser()
    try:
        exists = path.exists()
    except OSError as e:                       # a name too long, a loop of symbolic links
        raise PresetNotFoundError(f"preset {preset!r}: {e.strerror or e}") from None
    if exists:
        if not path.is_dir():
            raise CheckpointError(f"{path}: a preset is a directory (config.json and weights), not a file")
        journal.recover(path)
        return path
    if preset in HF_REPOS:
        where = refopt_home() / preset
        if (where / "config.json").exists():
            journal.recover(where)
            return where
        cached = _cached_builtin(preset)
        if cached is not None:
            return cached
        raise _missing_builtin(preset, where)
    if preset.count("/") == 1 and not preset.startswith((".", "/", "~")):
        repo, revision = _repo_revision(preset)
        cached = hub_cache.find_hf(repo, revision)
        if cached is not None:
            return cached
        raise PresetNotFoundError(
            f"preset {preset!r} is neither an existing directory nor a repository in the Hugging Face "
            f"cache ({hub_cache.hf_cache_dir()}); download it with `hf download {repo}` on a machine "
            "with network access (set HF_HUB_CACHE to point at a copied cache)")
    raise PresetNotFoundError(f"preset {preset!r} is neither an existing directory nor a built-in name "
                              f"({', '.join(BUILTIN_NAMES)})")


def read_config_json(path) -> dict:
    """The content of a ``config.json`` (a regular file of at most 16 MiB, strict JSON)."""
    return files.read_json(path, ConfigError, "config file")


def read_config(path: Path) -> OPTConfig:
    """The validated :class:`OPTConfig` of a preset directory."""
    path = Path(path)
    return OPTConfig.from_json_dict(read_config_json(path / "config.json"), str(path / "config.json"))


def layout_label(cfg: OPTConfig, fmt: str) -> str:
    """What a preset of ``cfg`` in layout ``fmt`` is, for the user: ``"KerasHub preset"``,
    ``"transformers checkpoint"``, or -- when the peer cannot represent the model -- saying so."""
    if fmt == "keras":
        reasons = cfg.keras_incompatibilities()
        if reasons:
            return "refopt preset in KerasHub's layout; KerasHub cannot load it: " + "; ".join(reasons)
        return "KerasHub preset"
    if fmt == "huggingface":
        reasons = cfg.huggingface_incompatibilities()
        if reasons:
            return "transformers checkpoint; transformers would compute another model: " + "; ".join(reasons)
        return "transformers checkpoint"
    return fmt
