"""Finding, reading and writing presets: KerasHub preset directories, transformers checkpoint
directories, built-in names looked up under ``REFOPT_HOME``, and hub handles.

A *preset* is any of

* a KerasHub preset directory (``config.json`` with ``class_name: OPTBackbone``,
  ``model.weights.h5``, optional tokenizer/preprocessor files);
* a transformers checkpoint directory (``config.json`` with ``model_type: opt`` and
  ``model.safetensors`` or a sharded ``model.safetensors.index.json``);
* a built-in name (``opt_125m_en``, ``opt_350m_en``, ``opt_1.3b_en`` ... ``opt_66b_en``), looked up as
  ``$REFOPT_HOME/<name>`` (default ``~/.cache/refopt/<name>``), then in the Kaggle cache (KerasHub's
  ``keras/opt/keras/<name>``), then in the Hugging Face cache (``facebook/opt-<size>``);
* a hub repository ``owner/name`` (``facebook/opt-125m``) found in the local Hugging Face cache, or
  ``hf://owner/name`` / ``kaggle://owner/model/framework/variant[/version]``: the local caches first
  (:mod:`refopt.io.hub_cache`, no client needed), then a download when the hub client is installed
  and the hub is reachable; otherwise a clear error says so.

A transformers directory may hold its weights as ``model.safetensors`` (single or sharded), as the
PyTorch checkpoint ``pytorch_model.bin`` (single or sharded), read by
:mod:`refopt.io.torch_pickle` without ever unpickling it, or as ``tf_model.h5`` (TensorFlow Keras
weights, :mod:`refopt.io.tf_keras_h5`); safetensors are preferred when several are present.
Writing happens in a temporary sibling directory renamed into place, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from refopt.config import KERAS_PRESETS, RELEASED, OPTConfig
from refopt.errors import CheckpointError, ConfigError, PresetNotFoundError
from refopt.io import flax_msgpack, hub_cache, huggingface, keras_h5, safetensors_io, tf_keras_h5, torch_pickle

HF_REPOS = {f"opt_{size}_en": f"facebook/opt-{size}" for size in RELEASED}
BUILTIN_NAMES = tuple(HF_REPOS)
# weight files of a transformers directory, in order of preference
HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
              "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")


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
        raise ConfigError(f"preset must be a path or a name, got {type(preset).__name__}")
    if "://" in preset:
        return _download(preset)
    path = Path(preset).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: a preset is a directory (config.json and weights), not a file")
        return path
    if preset in HF_REPOS:
        where = refopt_home() / preset
        if (where / "config.json").exists():
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


def detect_format(path: Path) -> str:
    """``"keras"`` or ``"huggingface"``; anything else is refused with a clear error."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: neither a KerasHub preset nor a transformers checkpoint (no "
                              "config.json)")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if isinstance(data, dict) and ("class_name" in data or "vocabulary_size" in data):
        if not (path / "model.weights.h5").exists():
            raise CheckpointError(f"{path}: KerasHub preset without model.weights.h5")
        return "keras"
    if isinstance(data, dict) and "model_type" in data:
        hf_weights_file(path)
        return "huggingface"
    raise CheckpointError(f"{path}: neither a KerasHub preset nor a transformers checkpoint "
                          "(config.json has neither 'class_name' nor 'model_type')")


def hf_weights_file(path: Path) -> Path:
    """The weights file of a transformers checkpoint directory (:data:`HF_WEIGHTS`, first found)."""
    for name in HF_WEIGHTS:
        if (path / name).exists():
            return path / name
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".ckpt", ".pth", ".bin"))
    raise CheckpointError(f"{path}: transformers config.json but no weights file (expected one of "
                          f"{', '.join(HF_WEIGHTS)}{'; found ' + ', '.join(others) if others else ''})")


def read_config(path: Path) -> OPTConfig:
    return OPTConfig.from_file(path / "config.json")


def _hf_state(path: Path) -> dict[str, np.ndarray]:
    weights = hf_weights_file(path)
    if weights.name == "pytorch_model.bin.index.json":
        return torch_pickle.load_sharded(weights)
    if weights.name == "pytorch_model.bin":
        return torch_pickle.load(weights)
    if weights.name == "tf_model.h5":
        return tf_keras_h5.load(weights)
    if weights.name == "flax_model.msgpack":
        return flax_msgpack.load(weights)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from None
        state = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.exists():
                raise CheckpointError(f"{index}: shard {shard} is missing")
            names = {k for k, v in weight_map.items() if v == shard}
            tensors = safetensors_io.load(shard_path, names, raw_bfloat16=True)
            missing = names - set(tensors)
            if missing:
                raise CheckpointError(f"{shard_path}: tensors {sorted(missing)[:5]} listed in the index "
                                      "are missing")
            state.update(tensors)
        return state
    return safetensors_io.load(path / "model.safetensors", raw_bfloat16=True)


def load_weights(path: Path, cfg: OPTConfig, fmt: str):
    """(params in their stored dtype -- views of the mapped files where possible, bfloat16 as
    :data:`refopt.io.stored.BFLOAT16` --, position prefix rows or None)."""
    if fmt == "keras":
        return keras_h5.load(path / "model.weights.h5", cfg), None
    return huggingface.from_state_dict(_hf_state(path), cfg, source=str(path))


@contextlib.contextmanager
def atomic_directory(target):
    """Yield a temporary sibling directory; on success it replaces ``target``, on failure it is
    removed and ``target`` is untouched."""
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, backup)
    os.replace(tmp, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
