"""KerasHub's ``model.weights.h5`` for ``OPTBackbone`` <-> refopt's parameter dict.

Keras 3 saves a functional model's weights as ``layers/<snake_case class name>[_n]/.../vars/<i>``,
numbering layers of the same class in order.  For OPTBackbone that gives::

    layers/token_and_position_embedding/token_embedding/vars/0      [V, D]
    layers/token_and_position_embedding/position_embedding/vars/0   [P, D]
    layers/transformer_decoder[_i]/_self_attention_layer/{query,key,value}_dense/vars/{0,1}
                                                                    kernel [D, H, K], bias [H, K]
    layers/transformer_decoder[_i]/_self_attention_layer/output_dense/vars/{0,1}
                                                                    kernel [H, K, D], bias [D]
    layers/transformer_decoder[_i]/_self_attention_layer_norm/vars/{0,1}   gamma, beta
    layers/transformer_decoder[_i]/_feedforward_layer_norm/vars/{0,1}      gamma, beta
    layers/transformer_decoder[_i]/_feedforward_intermediate_dense/vars/{0,1}  [D, F], [F]
    layers/transformer_decoder[_i]/_feedforward_output_dense/vars/{0,1}        [F, D], [D]
    layers/layer_normalization/vars/{0,1}                           final LayerNorm

Groups without weights (inputs, dropouts, softmax) are written too, as Keras writes them.

**Sharded** (KerasHub's ``save_to_preset(max_shard_size=...)`` when the weights exceed it): an
index ``model.weights.json`` and shards ``model_00000.weights.h5``, ``model_00001...``, each
holding the same paths for some of the variables.  Keras fills the shards in the order it saves the
variables (:func:`keras_order`), starting a new shard when the next variable would take the current
one past ``max_shard_size`` (a variable is never split; one larger than the limit is an error).
The index::

    {"metadata": {"total_size": <bytes, a float>},
     "weight_map": {"/layers/.../vars": "model_00000.weights.h5"        (a layer with one variable)
                    "/layers/.../vars": ["model_00002.weights.h5", ...]  (two or more variables)}}
KerasHub's OPTBackbone has no ``project_in``/``project_out``; refopt stores them for OPT-350m-style
models under ``layers/refopt_project_in`` / ``layers/refopt_project_out`` (KerasHub cannot build
such a model anyway, and its config says so).
"""

from __future__ import annotations

import os
import re

import numpy as np

from refopt.config import OPTConfig
from refopt.errors import CheckpointError
from refopt.io import files

ATTN = "_self_attention_layer"
DENSE = {"q_proj": ("query_dense", "query"), "k_proj": ("key_dense", "key"),
          "v_proj": ("value_dense", "value"), "out_proj": ("output_dense", "attention_output")}
NORMS = {"self_attn_layer_norm": ("_self_attention_layer_norm", "self_attention_layer_norm"),
          "mlp_layer_norm": ("_feedforward_layer_norm", "feedforward_layer_norm")}
MLP = {"fc1": ("_feedforward_intermediate_dense", "feedforward_intermediate_dense"),
        "fc2": ("_feedforward_output_dense", "feedforward_output_dense")}


SHARD_INDEX = "model.weights.json"
SHARD_FILE = re.compile(r"model_\d{5}\.weights\.h5")


def _decoder_group(i: int) -> str:
    return "layers/transformer_decoder" + ("" if i == 0 else f"_{i}")


def layout(cfg: OPTConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """refopt name -> (h5 dataset path, shape stored in the h5 file).  Keras stores dense kernels
    ``[in, out]`` (reshaped per head); refopt's weights are their transpose (:func:`to_keras`)."""
    D, H, K = cfg.hidden_dim, cfg.num_heads, cfg.head_dim
    out = {"embed_tokens": ("layers/token_and_position_embedding/token_embedding/vars/0",
                            (cfg.vocabulary_size, cfg.word_embed_proj_dim)),
           "embed_positions": ("layers/token_and_position_embedding/position_embedding/vars/0",
                               (cfg.max_sequence_length, D))}
    if cfg.has_projection:
        out["project_in.weight"] = ("layers/refopt_project_in/vars/0", (cfg.word_embed_proj_dim, D))
        out["project_out.weight"] = ("layers/refopt_project_out/vars/0", (D, cfg.word_embed_proj_dim))
    for i in range(cfg.num_layers):
        g, p = _decoder_group(i), f"layers.{i}."
        for ours, (theirs, _) in DENSE.items():
            kshape = (H, K, D) if ours == "out_proj" else (D, H, K)
            out[p + ours + ".weight"] = (f"{g}/{ATTN}/{theirs}/vars/0", kshape)
            if cfg.enable_bias:
                out[p + ours + ".bias"] = (f"{g}/{ATTN}/{theirs}/vars/1", (D,) if ours == "out_proj" else (H, K))
        if cfg.layer_norm_elementwise_affine:
            for ours, (theirs, _) in NORMS.items():
                out[p + ours + ".gamma"] = (f"{g}/{theirs}/vars/0", (D,))
                out[p + ours + ".beta"] = (f"{g}/{theirs}/vars/1", (D,))
        for ours, (theirs, _) in MLP.items():
            shape = (D, cfg.intermediate_dim) if ours == "fc1" else (cfg.intermediate_dim, D)
            out[p + ours + ".weight"] = (f"{g}/{theirs}/vars/0", shape)
            if cfg.enable_bias:
                out[p + ours + ".bias"] = (f"{g}/{theirs}/vars/1", (shape[1],))
    if cfg.has_final_layer_norm and cfg.layer_norm_elementwise_affine:
        out["final_layer_norm.gamma"] = ("layers/layer_normalization/vars/0", (D,))
        out["final_layer_norm.beta"] = ("layers/layer_normalization/vars/1", (D,))
    return out


def from_keras(name, stored, shape):
    """A Keras array (kernels ``[in, out]``, per-head reshaped) -> refopt's ``shape``."""
    if name.endswith(".weight"):
        return np.ascontiguousarray(stored.reshape(shape[::-1]).T)
    return stored.reshape(shape)


def to_keras(name, value, stored):
    """refopt's array -> the shape Keras stores."""
    if name.endswith(".weight"):
        value = value.T
    return np.ascontiguousarray(value).reshape(stored)


class KerasWeightsFile:
    """A KerasHub ``model.weights.h5`` opened for reading: a regular file (never blocking), every
    dataset read through h5py with its errors turned into :class:`CheckpointError`.

    :meth:`validate` checks the whole tree against :func:`layout` before any weight is read."""

    def __init__(self, path):
        self.path = os.fspath(path)
        fd = files.open_regular(self.path, "KerasHub weights file")
        self._raw = os.fdopen(fd, "rb")
        try:
            self.file = open_h5(fd, self.path)
        except Exception as e:          # h5py raises OSError, ValueError, RuntimeError ... here
            self._raw.close()
            raise CheckpointError(f"{self.path}: not a readable HDF5 weights file "
                                  f"({h5_reason(e)}); the file is truncated or corrupted") from None

    def _entries(self):
        """(path, kind, dataset or None) of every link in the file, in visit order."""
        import h5py

        found = []

        def visit(name, link):
            if isinstance(link, h5py.SoftLink):
                found.append((name, f"a soft link to {link.path}", None))
            elif isinstance(link, h5py.ExternalLink):
                found.append((name, f"an external link to {link.filename}:{link.path}", None))
            elif isinstance(link, h5py.HardLink):
                obj = self.file.get(name)
                found.append((name, "dataset" if isinstance(obj, h5py.Dataset) else "group", obj))
            else:
                found.append((name, f"a link of type {type(link).__name__}", None))

        try:
            self.file.visititems_links(visit)
            self.file.visititems(lambda name, obj: None)     # every object's header readable
        except Exception as e:
            raise CheckpointError(f"{self.path}: the HDF5 tree cannot be read ({h5_reason(e)}); "
                                  "the file is truncated or corrupted") from None
        return found

    def entries(self) -> list:
        """``(path, kind, object or None)`` of every link in the file: kind ``"dataset"``,
        ``"group"`` or a description of a soft, external or other link (to refuse)."""
        return self._entries()

    def stored_datasets(self) -> dict:
        """``{path: dataset}`` of every dataset stored in the file itself; a soft, external or
        other link anywhere raises :class:`CheckpointError`."""
        datasets = {}
        for name, kind, obj in self._entries():
            if kind not in ("dataset", "group"):
                raise CheckpointError(f"{self.path}: {name} is {kind}; refopt reads only the "
                                      "datasets stored in the file itself")
            if kind == "dataset":
                datasets[name] = obj
        return datasets

    def validate(self, expected: dict, shard: bool = False) -> list:
        """Every dataset of ``expected`` (h5 path -> stored shape) present, of a float dtype and
        that shape, stored in this file; no other dataset; no soft or external link.  A ``shard``
        of a sharded save holds some of ``expected`` (those it has are checked).  Returns the
        paths checked."""
        datasets = self.stored_datasets()
        if shard:
            expected = {where: shape for where, shape in expected.items() if where in datasets}
        for where, shape in expected.items():
            ds = datasets.get(where)
            if ds is None:
                raise CheckpointError(f"{self.path}: missing tensor {where}")
            try:
                dtype, stored, external, virtual = ds.dtype, tuple(ds.shape or ()), ds.external, \
                    ds.is_virtual
            except Exception as e:
                raise CheckpointError(f"{self.path}: tensor {where} cannot be read "
                                      f"({h5_reason(e)})") from None
            if external or virtual:
                raise CheckpointError(f"{self.path}: tensor {where} keeps its data outside the "
                                      "file (external or virtual storage); refopt refuses it")
            if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
                raise CheckpointError(f"{self.path}: tensor {where} has dtype {dtype}, expected "
                                      "float16, float32 or float64")
            if stored != tuple(shape):
                raise CheckpointError(f"{self.path}: tensor {where} has shape {list(stored)}, "
                                      f"expected {list(shape)} for this config")
        extra = [name for name in datasets if name not in expected]
        if extra:
            raise CheckpointError(f"{self.path}: unexpected tensors {extra[:5]}"
                                  f"{' ...' if len(extra) > 5 else ''} for this config")
        self.datasets = {where: datasets[where] for where in expected}
        return list(expected)

    def dtype(self, where) -> str:
        return self.datasets[where].dtype.newbyteorder("=").name

    def array(self, where, index=None) -> np.ndarray:
        """Dataset ``where`` (or its rows ``index``, increasing), in native byte order."""
        try:
            ds = self.datasets[where]
            out = ds[()] if index is None else ds[index]
        except Exception as e:
            raise CheckpointError(f"{self.path}: tensor {where} cannot be read ({h5_reason(e)}): "
                                  "the file is truncated or corrupted") from None
        out = np.asarray(out)
        return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self._raw.close()


def open_h5(fd: int, path: str):
    """h5py's read-only ``File`` of the very file behind the checked descriptor ``fd`` (through
    ``/proc/self/fd`` where there is one; else ``path``), opened with HDF5's own driver as h5py and
    Keras open a path.  h5py's errors are the caller's to name."""
    import h5py

    by_fd = f"/proc/self/fd/{fd}"
    return h5py.File(by_fd if os.path.exists(by_fd) else path, "r")


def h5_reason(e: Exception) -> str:
    """An h5py error in one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _skeleton(cfg: OPTConfig) -> dict[str, str]:
    """Every layer group Keras writes for OPTBackbone (weights or not) -> the ``name`` attribute of
    its ``vars`` group, in Keras's order."""
    out = {"layers/input_layer": "token_ids", "layers/input_layer_1": "padding_mask",
           "layers/token_and_position_embedding": "embeddings",
           "layers/token_and_position_embedding/token_embedding": "token_embedding",
           "layers/token_and_position_embedding/position_embedding": "position_embedding"}
    if cfg.has_projection:
        out["layers/refopt_project_in"] = "project_in"
        out["layers/refopt_project_out"] = "project_out"
    for i in range(cfg.num_layers):
        g = _decoder_group(i)
        out[g] = f"transformer_layer_{i}"
        out[f"{g}/{ATTN}"] = "self_attention"
        suffix = "" if i == 0 else f"_{i}"
        out[f"{g}/{ATTN}/_dropout_layer"] = "dropout" + suffix
        out[f"{g}/{ATTN}/_softmax"] = "softmax" + suffix
        for theirs, var_name in DENSE.values():
            out[f"{g}/{ATTN}/{theirs}"] = var_name
        for theirs, var_name in list(NORMS.values()) + list(MLP.values()):
            out[f"{g}/{theirs}"] = var_name
        out[f"{g}/_self_attention_dropout"] = "self_attention_dropout"
        out[f"{g}/_feedforward_dropout"] = "feedforward_dropout"
    out["layers/layer_normalization"] = "layer_norm"
    return out


def _create(f, where, group_names, data) -> None:
    # the dataset ``where`` (``<layer>/vars/<i>``), its ``vars`` group named as Keras names it
    g = f.require_group(where.rsplit("/", 1)[0])
    if "name" not in g.attrs:
        g.attrs["name"] = group_names[where.rsplit("/", 2)[0]]
    g.create_dataset(where.rsplit("/", 1)[1], data=data)


def write(out, params: dict[str, np.ndarray], cfg: OPTConfig) -> None:
    """Write ``params`` in the layout KerasHub writes (empty groups included) to the binary file
    object ``out`` (opened for reading and writing)."""
    import h5py

    names = _skeleton(cfg)
    with h5py.File(out, "w") as f:
        for group, var_name in names.items():
            f.require_group(group).require_group("vars").attrs["name"] = var_name
        f.require_group("vars").attrs["name"] = "opt_backbone"
        for ours, (where, stored) in layout(cfg).items():
            _create(f, where, names, to_keras(ours, np.asarray(params[ours]), stored))


def keras_order(cfg: OPTConfig) -> list[str]:
    """refopt's parameter names in the order Keras saves OPTBackbone's variables (its layers in
    order; inside a layer its own variables, then its sublayers by attribute name): the order in
    which a sharded save fills its shards."""
    names = ["embed_positions", "embed_tokens"]
    if cfg.has_projection:
        names += ["project_in.weight", "project_out.weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for module, params in (("fc1", ("weight", "bias")), ("mlp_layer_norm", ("gamma", "beta")),
                               ("fc2", ("weight", "bias")), ("k_proj", ("weight", "bias")),
                               ("out_proj", ("weight", "bias")), ("q_proj", ("weight", "bias")),
                               ("v_proj", ("weight", "bias")),
                               ("self_attn_layer_norm", ("gamma", "beta"))):
            names += [f"{p}{module}.{param}" for param in params]
    names += ["final_layer_norm.gamma", "final_layer_norm.beta"]
    present = layout(cfg)
    return [name for name in names if name in present]


def weights_nbytes(params: dict[str, np.ndarray], cfg: OPTConfig) -> int:
    """The bytes of the variables a save writes (what KerasHub compares with ``max_shard_size``)."""
    return int(sum(np.asarray(params[name]).nbytes for name in layout(cfg)))


def write_sharded(open_file, params: dict[str, np.ndarray], cfg: OPTConfig, max_shard_bytes) -> dict:
    """Write ``params`` as Keras's sharded weights: each shard through ``open_file(name)`` (a
    context manager giving a binary file object open for reading and writing); returns the index
    (``model.weights.json``'s content) for the caller to write.  Shards are filled as Keras fills
    them (see the module docstring).  Raises :class:`ConfigError` when one variable alone is larger
    than ``max_shard_bytes``, as Keras does."""
    import h5py

    from refopt.errors import ConfigError

    places = layout(cfg)
    shards: list[list[str]] = [[]]
    size = 0.0
    for name in keras_order(cfg):
        nbytes = float(np.asarray(params[name]).nbytes)
        if nbytes > max_shard_bytes:
            raise ConfigError(f"save_to_preset: the size of {places[name][0]} is {nbytes:,.0f} bytes, "
                              f"which exceeds the maximum shard size ({max_shard_bytes:,.0f} bytes); "
                              "increase max_shard_size")
        size += nbytes
        if size > max_shard_bytes:
            shards.append([])
            size = nbytes
        shards[-1].append(name)
    names = _skeleton(cfg)
    weight_map: dict = {}
    total = 0.0
    for n, members in enumerate(shards):
        filename = f"model_{n:05}.weights.h5"
        with open_file(filename) as out, h5py.File(out, "w") as f:
            if n == 0:                    # the layers without weights, and the model's own group
                for group, var_name in names.items():
                    f.require_group(group).require_group("vars").attrs["name"] = var_name
                f.require_group("vars").attrs["name"] = "opt_backbone"
            for name in members:
                where, stored = places[name]
                data = to_keras(name, np.asarray(params[name]), stored)
                _create(f, where, names, data)
                total += float(data.nbytes)
                group = "/" + where.rsplit("/", 1)[0]
                if group not in weight_map:
                    weight_map[group] = filename
                elif not isinstance(weight_map[group], list):
                    weight_map[group] = [weight_map[group]] + ([] if weight_map[group] == filename
                                                               else [filename])
                elif filename not in weight_map[group]:
                    weight_map[group].append(filename)
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def read_shard_index(path) -> dict[str, list[str]]:
    """``model.weights.json``'s weight map, checked: layer group -> the shard files holding its
    variables (file names in the preset directory, named as Keras names them)."""
    data = files.read_json(path, CheckpointError, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: malformed shard index (no 'weight_map' object)")
    out = {}
    for group, shards in weight_map.items():
        shards = [shards] if isinstance(shards, str) else shards
        if not isinstance(shards, list) or not shards or not all(
                isinstance(s, str) and SHARD_FILE.fullmatch(s) for s in shards):
            raise CheckpointError(f"{path}: {group!r} is in shard {shards!r}; shards must be file "
                                  "names model_NNNNN.weights.h5 in the preset directory")
        out[group] = list(shards)
    return out
