"""``tf_model.h5``: the TensorFlow Keras weights of transformers' ``TFOPTForCausalLM``, read with h5py.

``TFOPTForCausalLM.save_pretrained`` saves Keras 2's HDF5 weights: the root's ``layer_names``
attribute lists one layer (``model``), whose group's ``weight_names`` attribute lists every variable
as ``<scope>/model/decoder/<path>:0`` (the scope, e.g. ``tfopt_for_causal_lm_1``, is the Keras name
of the model object and varies); each is a dataset at ``model/<weight name>``.  Dense kernels are
stored ``[in, out]`` (the transpose of PyTorch's ``[out, in]``), LayerNorms as ``gamma``/``beta``,
embeddings as ``weight`` (tokens) and ``embeddings`` (positions).  This module maps them to
transformers' PyTorch names (so :mod:`refopt.io.huggingface` applies unchanged), kernels as
transposed views.

Datasets stored contiguously and uncompressed (as Keras writes them) are memory-mapped; others are
read.  Only hard links to datasets inside the file are followed; a listed weight that is missing,
is not a float dataset, or is an external or soft link is refused with a named error.
"""

from __future__ import annotations

import os

import numpy as np

from refopt.errors import CheckpointError
from refopt.io import stored

_MAX_WEIGHTS = 100_000
_RENAME = {"kernel": "weight", "gamma": "weight", "beta": "bias", "embeddings": "weight"}


def torch_name(weight_name: str) -> tuple[str, bool]:
    """``<scope>/model/decoder/layers.0/fc1/kernel:0`` -> (``model.decoder.layers.0.fc1.weight``,
    whether the stored array is a Keras kernel to transpose)."""
    at = weight_name.find("model/decoder/")
    if at < 0 or not weight_name.endswith(":0"):
        raise CheckpointError(f"weight {weight_name[:200]!r} is not one of TFOPTForCausalLM's")
    parts = weight_name[at:-2].split("/")
    kernel = parts[-1] == "kernel"
    parts[-1] = _RENAME.get(parts[-1], parts[-1])
    return ".".join(parts), kernel


def _text(values):
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.atleast_1d(values)]


def load(path) -> dict[str, np.ndarray]:
    """``{transformers name: array}`` of a ``tf_model.h5`` (views of the mapped file where the
    dataset is stored contiguously; Keras kernels transposed to ``[out, in]`` views)."""
    import h5py

    path = os.fspath(path)
    os.close(stored.open_regular(path))
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({e})") from None
    out = {}
    buf = None
    with f:
        try:
            layers = _text(f.attrs["layer_names"])
            if len(layers) != 1:
                raise KeyError
            group = f[layers[0]]
            names = _text(group.attrs["weight_names"])
        except (KeyError, TypeError, ValueError, OSError):
            raise CheckpointError(f"{path}: not TensorFlow Keras weights (no layer_names / weight_names "
                                  "attributes naming one model layer)") from None
        if len(names) > _MAX_WEIGHTS:
            raise CheckpointError(f"{path}: lists more than {_MAX_WEIGHTS} weights")
        for weight in names:
            name, kernel = torch_name(weight)
            try:
                link = group.get(weight, getlink=True)
                ds = group.get(weight) if isinstance(link, h5py.HardLink) else None
            except (KeyError, OSError, ValueError):
                link = ds = None
            if link is None:
                raise CheckpointError(f"{path}: weight {weight} is listed but missing")
            if not isinstance(ds, h5py.Dataset):
                raise CheckpointError(f"{path}: weight {weight} is not a dataset stored in the file "
                                      f"({type(link).__name__})")
            if ds.dtype.kind != "f" or ds.external:
                raise CheckpointError(f"{path}: weight {weight} has dtype {ds.dtype}"
                                      f"{' and external storage' if ds.external else ''}; expected floats")
            if name in out:
                raise CheckpointError(f"{path}: two weights map to {name}")
            offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
            if offset is not None and ds.dtype.byteorder in "<=|":
                buf = stored.map_file(path) if buf is None else buf
                nbytes = int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
                if offset + nbytes > buf.shape[0]:
                    raise CheckpointError(f"{path}: weight {weight} lies past the end of the file")
                arr = buf[offset:offset + nbytes].view(ds.dtype.newbyteorder("<")).reshape(ds.shape)
            else:
                try:
                    arr = np.asarray(ds[()])
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{path}: weight {weight} cannot be read ({e})") from None
            if kernel:
                if arr.ndim != 2:
                    raise CheckpointError(f"{path}: kernel {weight} has shape {list(arr.shape)}, expected 2 axes")
                arr = arr.T
            out[name] = arr
    return out
