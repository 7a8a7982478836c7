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
read, once the bytes their declared shapes imply are known to fit in the memory available.  Only
hard links to datasets inside the file are followed; a listed weight that is missing, is not a
float16/32/64 dataset, or is an external, virtual or soft link is refused with a named error, and
so is anything h5py raises on a damaged file.
"""

from __future__ import annotations

import math
import os

import numpy as np

from refopt.errors import CheckpointError
from refopt.io import stored
from refopt.io.keras_h5 import h5_reason, open_h5
from refopt.limits import check_allocation

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
    dataset is stored contiguously; Keras kernels transposed to ``[out, in]`` views).  Every error
    h5py raises on a damaged file (``OSError``, ``ValueError``, ``RuntimeError``, ``KeyError`` ...,
    from any call: opening, a link, an attribute, a dtype, a read) is a :class:`CheckpointError`."""
    path = os.fspath(path)
    fd = stored.open_regular(path)
    try:
        f = open_h5(fd, path)
    except Exception as e:               # h5py raises OSError, ValueError, RuntimeError ... here
        raise CheckpointError(f"{path}: not a readable HDF5 file ({h5_reason(e)})") from None
    finally:
        os.close(fd)
    with f:
        try:
            return _read(f, path)
        except CheckpointError:
            raise
        except Exception as e:           # a damaged header, heap, link or datatype, anywhere
            raise CheckpointError(f"{path}: the HDF5 file cannot be read ({h5_reason(e)}); it is "
                                  "truncated or corrupted") from None


def _read(f, path) -> dict[str, np.ndarray]:
    # load()'s work on the open file ``f``
    import h5py

    out = {}
    buf = None
    held = 0                             # bytes of the datasets read into memory so far
    try:
        layers = _text(f.attrs["layer_names"])
        if len(layers) != 1:
            raise KeyError
        group = f[layers[0]]
        names = _text(group.attrs["weight_names"])
    except (KeyError, TypeError, ValueError, OSError, UnicodeDecodeError):
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
        if ds.external or ds.is_virtual:
            raise CheckpointError(f"{path}: weight {weight} keeps its data outside the file (external "
                                  "or virtual storage); refopt refuses it")
        if ds.dtype.kind != "f" or ds.dtype.itemsize not in (2, 4, 8):
            raise CheckpointError(f"{path}: weight {weight} has dtype {ds.dtype}; expected float16, "
                                  "float32 or float64")
        if name in out:
            raise CheckpointError(f"{path}: two weights map to {name}")
        nbytes = math.prod(int(d) for d in ds.shape) * ds.dtype.itemsize   # exact: no wrap-around
        offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
        if offset is not None and ds.dtype.byteorder in "<=|":
            buf = stored.map_file(path) if buf is None else buf
            if offset + nbytes > buf.shape[0]:
                raise CheckpointError(f"{path}: weight {weight} lies past the end of the file")
            arr = buf[offset:offset + nbytes].view(ds.dtype.newbyteorder("<")).reshape(ds.shape)
        else:                            # chunked, compressed or big-endian: read (a shape the
            held += nbytes               # file declares is checked against the memory first)
            check_allocation(held, f"{path}: reading weight {weight} (and those before it)",
                             CheckpointError)
            arr = np.asarray(ds[()])
        if kernel:
            if arr.ndim != 2:
                raise CheckpointError(f"{path}: kernel {weight} has shape {list(arr.shape)}, expected 2 axes")
            arr = arr.T
        out[name] = arr
    return out
