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
KerasHub's OPTBackbone has no ``project_in``/``project_out``; refopt stores them for OPT-350m-style
models under ``layers/refopt_project_in`` / ``layers/refopt_project_out`` (KerasHub cannot build
such a model anyway, and its config says so).
"""

from __future__ import annotations

import os

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
        import h5py

        self.path = os.fspath(path)
        fd = files.open_regular(self.path, "KerasHub weights file")
        self._raw = os.fdopen(fd, "rb")
        # HDF5 opens the very file checked above (through /proc/self/fd where there is one), with
        # its own driver, as h5py and Keras open a path
        by_fd = f"/proc/self/fd/{fd}"
        try:
            self.file = h5py.File(by_fd if os.path.exists(by_fd) else self.path, "r")
        except Exception as e:          # h5py raises OSError, ValueError, RuntimeError ... here
            self._raw.close()
            raise CheckpointError(f"{self.path}: not a readable HDF5 weights file "
                                  f"({_h5_reason(e)}); the file is truncated or corrupted") from None

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
            raise CheckpointError(f"{self.path}: the HDF5 tree cannot be read ({_h5_reason(e)}); "
                                  "the file is truncated or corrupted") from None
        return found

    def validate(self, expected: dict) -> None:
        """Every dataset of ``expected`` (h5 path -> stored shape) present, of a float dtype and
        that shape, stored in this file; no other dataset; no soft or external link."""
        datasets = {}
        for name, kind, obj in self._entries():
            if kind not in ("dataset", "group"):
                raise CheckpointError(f"{self.path}: {name} is {kind}; refopt reads only the "
                                      "datasets stored in the file itself")
            if kind == "dataset":
                datasets[name] = obj
        for where, shape in expected.items():
            ds = datasets.get(where)
            if ds is None:
                raise CheckpointError(f"{self.path}: missing tensor {where}")
            try:
                dtype, stored, external, virtual = ds.dtype, tuple(ds.shape or ()), ds.external, \
                    ds.is_virtual
            except Exception as e:
                raise CheckpointError(f"{self.path}: tensor {where} cannot be read "
                                      f"({_h5_reason(e)})") from None
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

    def dtype(self, where) -> str:
        return self.datasets[where].dtype.newbyteorder("=").name

    def array(self, where, index=None) -> np.ndarray:
        """Dataset ``where`` (or its rows ``index``, increasing), in native byte order."""
        try:
            ds = self.datasets[where]
            out = ds[()] if index is None else ds[index]
        except Exception as e:
            raise CheckpointError(f"{self.path}: tensor {where} cannot be read ({_h5_reason(e)}): "
                                  "the file is truncated or corrupted") from None
        out = np.asarray(out)
        return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self._raw.close()


def _h5_reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def write(out, params: dict[str, np.ndarray], cfg: OPTConfig) -> None:
    """Write ``params`` in the layout KerasHub writes (empty groups included) to the binary file
    object ``out`` (opened for reading and writing)."""
    import h5py

    with h5py.File(out, "w") as f:
        def group(name, var_name):
            g = f.require_group(name)
            v = g.require_group("vars")
            v.attrs["name"] = var_name
            return v

        group("layers/input_layer", "token_ids")
        group("layers/input_layer_1", "padding_mask")
        group("layers/token_and_position_embedding", "embeddings")
        group("layers/token_and_position_embedding/token_embedding", "token_embedding")
        group("layers/token_and_position_embedding/position_embedding", "position_embedding")
        if cfg.has_projection:
            group("layers/refopt_project_in", "project_in")
            group("layers/refopt_project_out", "project_out")
        for i in range(cfg.num_layers):
            g = _decoder_group(i)
            group(g, f"transformer_layer_{i}")
            group(f"{g}/{ATTN}", "self_attention")
            suffix = "" if i == 0 else f"_{i}"
            group(f"{g}/{ATTN}/_dropout_layer", "dropout" + suffix)
            group(f"{g}/{ATTN}/_softmax", "softmax" + suffix)
            for theirs, var_name in DENSE.values():
                group(f"{g}/{ATTN}/{theirs}", var_name)
            for theirs, var_name in list(NORMS.values()) + list(MLP.values()):
                group(f"{g}/{theirs}", var_name)
            group(f"{g}/_self_attention_dropout", "self_attention_dropout")
            group(f"{g}/_feedforward_dropout", "feedforward_dropout")
        group("layers/layer_normalization", "layer_norm")
        f.require_group("vars").attrs["name"] = "opt_backbone"
        for ours, (where, stored) in layout(cfg).items():
            f.create_dataset(where, data=to_keras(ours, np.asarray(params[ours]), stored))
