"""Tensor sources: one per kind of weight file, each with the same small protocol.

``keys()``, ``dtype(key)``, ``shape(key)``, ``array(key)`` (bfloat16 widened), ``stored(key)``
(as stored: bfloat16 as :data:`refopt.io.stored.BFLOAT16`, a view of the file where possible),
``rows(key, index)``, ``close()``.  :mod:`refopt.io.checkpoint`'s formats open them;
:class:`Entry` says where a refopt parameter lives in one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from refopt.errors import CheckpointError
from refopt.io import files, huggingface, keras_h5, safetensors_io, stored


class Entry(NamedTuple):
    """Where refopt parameter lives in a source: its key, a function from the stored array to
    refopt's layout, and the row offset of a table read by rows (transformers' positions)."""

    key: str
    to_refopt: object = None
    row_offset: int = 0



class KerasSource:
    def __init__(self, path):
        self.file = keras_h5.KerasWeightsFile(path)

    def keys(self):
        return list(self.file.datasets)

    def dtype(self, key):
        return self.file.dtype(key)

    def shape(self, key):
        return tuple(self.file.datasets[key].shape)

    def array(self, key):
        return self.file.array(key)

    stored = array

    def rows(self, key, index):
        return self.file.array(key, index)

    def close(self):
        self.file.close()


class KerasShardedSource:
    """The shards of a sharded KerasHub save (``model.weights.json``; see :mod:`.keras_h5`), each
    validated as a ``model.weights.h5`` holding part of the tensors: together every tensor once,
    each in a shard the index lists for its layer."""

    def __init__(self, path: Path, expected: dict):
        index_path = path / keras_h5.SHARD_INDEX
        index = keras_h5.read_shard_index(index_path)
        self.files, self.where = [], {}
        try:
            for shard in sorted({s for shards in index.values() for s in shards}):
                if not os.path.lexists(path / shard):
                    raise CheckpointError(f"{index_path}: shard {shard} is missing")
                f = keras_h5.KerasWeightsFile(path / shard)
                self.files.append(f)
                for where in f.validate(expected, shard=True):
                    if where in self.where:
                        raise CheckpointError(f"{path / shard}: tensor {where} is stored twice (also "
                                              f"in {os.path.basename(self.where[where].path)})")
                    group = "/" + where.rsplit("/", 1)[0]
                    if shard not in index.get(group, ()):
                        raise CheckpointError(f"{path / shard}: holds {where}, but {index_path.name} "
                                              f"does not list this shard for {group}")
                    self.where[where] = f
            missing = [where for where in expected if where not in self.where]
            if missing:
                raise CheckpointError(f"{path}: missing tensor {missing[0]} (in none of the shards "
                                      f"{index_path.name} lists)")
        except BaseException:
            self.close()
            raise

    def keys(self):
        return list(self.where)

    def dtype(self, key):
        return self.where[key].dtype(key)

    def shape(self, key):
        return tuple(self.where[key].datasets[key].shape)

    def array(self, key):
        return self.where[key].array(key)

    stored = array

    def rows(self, key, index):
        return self.where[key].array(key, index)

    def close(self):
        for f in self.files:
            f.close()


def reader_source(weights: Path) -> DictSource:
    """A :class:`DictSource` over a pickled (:mod:`~refopt.io.torch_pickle`), TensorFlow
    (:mod:`~refopt.io.tf_keras_h5`) or Flax (:mod:`~refopt.io.flax_msgpack`) checkpoint, under
    transformers' canonical names."""
    from refopt.io import flax_msgpack, tf_keras_h5, torch_pickle

    readers = {"pytorch_model.bin.index.json": torch_pickle.load_sharded, "pytorch_model.bin": torch_pickle.load,
               "tf_model.h5": tf_keras_h5.load, "flax_model.msgpack": flax_msgpack.load}
    src = DictSource({})
    for name, value in readers[weights.name](weights).items():
        canonical = huggingface.canonical_name(name)
        if canonical in src.tensors:
            raise CheckpointError(f"{weights}: tensor {name!r} is stored twice")
        src.tensors[canonical] = value
    return src


def read_index(index: Path) -> dict[str, str]:
    """``weight_map`` of a shard index: tensor name -> shard file name (inside the directory)."""
    data = files.read_json(index, CheckpointError, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: malformed shard index (no 'weight_map' object)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard \
                or shard in (".", "..") or "\0" in shard:
            raise CheckpointError(f"{index}: tensor {name!r} is in shard {shard!r}; shards must be "
                                  "file names in the checkpoint directory")
    return weight_map


class DictSource:
    """A tensor source over a dict of arrays (a state dict in memory, or the mapped tensors one of
    the readers of pickled, TensorFlow or Flax checkpoints returns)."""

    def __init__(self, tensors: dict):
        self.tensors = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in tensors.items()}

    def keys(self):
        return list(self.tensors)

    def dtype(self, key):
        return stored.stored_dtype_name(self.tensors[key])

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def array(self, key):
        arr = self.tensors[key]
        return stored.widen(arr) if stored.is_bfloat16(arr) else arr

    def stored(self, key):
        return self.tensors[key]

    def rows(self, key, index):
        arr = self.tensors[key][index]
        return stored.widen(arr) if stored.is_bfloat16(arr) else np.array(arr)

    def close(self):
        pass


class SafetensorsSource:
    """The tensors of one safetensors file or of a sharded set (``model.safetensors.index.json``),
    under transformers' canonical names (``decoder.*`` read as ``model.decoder.*``)."""

    def __init__(self, path: Path, index: Path | None):
        self.files: list[safetensors_io.SafetensorsFile] = []
        self.where: dict[str, tuple] = {}
        try:
            if index is None:
                self._add(path / "model.safetensors", None)
            else:
                weight_map = read_index(index)
                for shard in sorted(set(weight_map.values())):
                    if not os.path.lexists(path / shard):
                        raise CheckpointError(f"{index}: shard {shard} is missing")
                    listed = {k for k, v in weight_map.items() if v == shard}
                    f = self._add(path / shard, index)
                    missing = listed - set(f.keys())
                    if missing:
                        raise CheckpointError(f"{path / shard}: tensors {sorted(missing)[:5]} listed "
                                              "in the index are missing")
                    unlisted = set(f.keys()) - listed
                    if unlisted:
                        raise CheckpointError(f"{path / shard}: tensors {sorted(unlisted)[:5]} are not "
                                              f"listed in {index.name} for this shard")
        except BaseException:
            self.close()
            raise

    def _add(self, file: Path, index):
        f = safetensors_io.SafetensorsFile(file)
        self.files.append(f)
        for name in f.keys():
            canonical = huggingface.canonical_name(name)
            if canonical in self.where:
                raise CheckpointError(f"{file}: tensor {name!r} is stored twice "
                                      f"(also in {self.where[canonical][0].path})")
            self.where[canonical] = (f, name)
        return f

    def keys(self):
        return list(self.where)

    def dtype(self, key):
        f, name = self.where[key]
        code = f.dtype(name)
        if code in safetensors_io.FLOATS:
            return safetensors_io.FLOATS[code]
        return np.dtype(safetensors_io.NUMPY[code]).name if code in safetensors_io.NUMPY else code

    def shape(self, key):
        f, name = self.where[key]
        return f.shape(name)

    def array(self, key):
        f, name = self.where[key]
        return f.tensor(name)

    def stored(self, key):
        f, name = self.where[key]
        arr = f.array(name)
        return arr.view(stored.BFLOAT16) if f.dtype(name) == "BF16" else arr

    def rows(self, key, index):
        f, name = self.where[key]
        raw = f.array(name)[index]
        return safetensors_io.bfloat16_to_float32(raw) if f.dtype(name) == "BF16" else np.array(raw)

    def close(self):
        for f in self.files:
            f.close()
