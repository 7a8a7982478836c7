"""Float64 reference logits for checkpoints larger than memory: one decoder layer resident at a time.

    from refopt.testing import streaming_logits
    logits = streaming_logits("path/to/opt-13b", token_ids, padding_mask)      # float64 [B, S, V]

The forward pass is refopt's own (:func:`refopt.model.forward`, NumPy ops, float64), run over a
:class:`StreamingParams` mapping instead of a dict: the first access to a tensor of layer ``i``
reads it from the memory-mapped checkpoint and converts it to float64, and the first access to a
tensor of another layer drops layer ``i``'s tensors.  Each tensor is mapped on its own (an
``np.memmap`` of its byte range) and unmapped once converted, so the pages of earlier layers do not
stay in the process's resident set.  The token embedding is never loaded whole: the lookup reads the
rows it needs, and the tied LM head multiplies the hidden states by ``chunk_rows`` rows of the table
at a time.

Resident memory is therefore about one decoder layer in float64 (``12 * hidden_dim**2 * 8`` bytes
plus biases: 2.5 GB for OPT-13b, 8.2 GB for OPT-66b), one chunk of the head, and the activations --
where the whole float64 model would need 8 bytes per parameter (104 GB for OPT-13b).
``benchmarks/bench_oracle.py`` measures it.

Reads transformers checkpoints (``model.safetensors`` or sharded with ``model.safetensors.index.json``;
float32, float16, bfloat16) and KerasHub presets (``model.weights.h5``, read per dataset with h5py),
through refopt's one validated loader (:mod:`refopt.io.checkpoint`): a missing or misnamed tensor is
an error, never an absent bias or LayerNorm.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from refopt.config import OPTConfig
from refopt.io import huggingface


class _Rows:
    """A table only ever indexed by ids (``table[ids]``): reads those rows, as float64."""

    def __init__(self, checkpoint, name, num_rows, width):
        self.checkpoint, self.name = checkpoint, name
        self.shape = (num_rows, width)
        self.dtype = np.dtype(np.float64)

    def __getitem__(self, ids):
        return self.checkpoint.rows(self.name, ids, np.float64)


class StreamingParams(Mapping):
    """refopt's parameter mapping over a checkpoint, holding at most one decoder layer.

    ``peak_bytes``: the most bytes of converted tensors held at once (the embedding rows looked up
    and the head's chunks are not counted: they are transient)."""

    def __init__(self, path, cfg: OPTConfig | None = None):
        from refopt.io.checkpoint import open_checkpoint
        from refopt.model import param_shapes

        self.path = Path(path)
        self.checkpoint = open_checkpoint(self.path)        # validated: every tensor is there
        self.format = self.checkpoint.format
        self.config = cfg or self.checkpoint.config
        self.shapes = param_shapes(self.config)
        self._layer = None
        self._cache: dict[str, np.ndarray] = {}
        self.peak_bytes = 0
        self.layers_loaded = 0

    # Mapping protocol: what refopt.model.forward reads
    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)

    def __contains__(self, name):
        return name in self.shapes

    def __getitem__(self, name):
        if name not in self.shapes:
            raise KeyError(name)
        if name in ("embed_tokens", "embed_positions"):
            return self.table(name)
        if name in self._cache:
            return self._cache[name]
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if layer is not None and layer != self._layer:
            self._cache.clear()                              # drop the previous layer first
            self._layer = layer
            self.layers_loaded += 1
        value = self.checkpoint.read(name, np.float64)    # a per-tensor map, released here
        self._cache[name] = value
        self.peak_bytes = max(self.peak_bytes, sum(v.nbytes for v in self._cache.values()))
        return value

    def dtype_of(self, name) -> np.dtype:
        """Every tensor is handed out in float64 (said without reading it)."""
        return np.dtype(np.float64)

    def release(self):
        """Drop the layer held (the next lookup reads its layer again)."""
        self._cache.clear()
        self._layer = None

    def materialize(self) -> dict[str, np.ndarray]:
        """Every tensor in float64, in memory (for an adapter that has no loader of its own)."""
        out = {}
        for name in self.shapes:
            value = self[name]
            out[name] = value[np.arange(value.shape[0])] if isinstance(value, _Rows) else value
        self._cache.clear()
        return out

    def name_of(self, array) -> str:
        """The name of a tensor this mapping handed out and still holds (by identity)."""
        for name, value in self._cache.items():
            if value is array:
                return name
        raise KeyError("not a tensor of this mapping held now")

    def table(self, name) -> _Rows:
        rows, width = self.shapes[name]
        return _Rows(self.checkpoint, name, rows, width)

    def head_chunks(self, chunk_rows: int):
        """``(start, rows [n, E] float64)`` over the token table, ``chunk_rows`` rows at a time."""
        V = self.shapes["embed_tokens"][0]
        for start in range(0, V, chunk_rows):
            stop = min(start + chunk_rows, V)
            yield start, self.checkpoint.rows("embed_tokens", np.arange(start, stop), np.float64)


def streaming_logits(path, token_ids, padding_mask=None, *, chunk_rows: int = 8192, tape: dict | None = None,
                     params: StreamingParams | None = None) -> np.ndarray:
    """refopt's float64 logits ``[B, S, V]`` for a checkpoint directory, one layer in memory at a time.

    ``tape``: a dict that receives the named intermediates, as :func:`refopt.model.forward` fills it
    (the divergence locator's names).  ``params``: a :class:`StreamingParams` to reuse (its
    ``peak_bytes`` says how much it held)."""
    from refopt import model as _model
    from refopt.testing.reference import numpy_ops

    params = StreamingParams(path) if params is None else params
    cfg = params.config
    ids = np.asarray(token_ids, np.int64)
    mask = np.ones(ids.shape, bool) if padding_mask is None else np.asarray(padding_mask).astype(bool)
    ops = numpy_ops()
    hidden = _model.forward(params, cfg, ids, mask, tape=tape, ops=ops)        # [B, S, E] float64
    params.release()
    B, S, E = hidden.shape
    logits = np.empty((B, S, params.shapes["embed_tokens"][0]), np.float64)
    for start, rows in params.head_chunks(chunk_rows):                         # rows [n, E]
        logits[:, :, start:start + rows.shape[0]] = hidden @ rows.T
    if tape is not None:
        tape["logits"] = logits
    return logits


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def layer_bytes_float64(cfg: OPTConfig) -> int:
    """Bytes of one decoder layer's parameters in float64: what streaming holds at a time."""
    from refopt.model import param_shapes

    return 8 * sum(int(np.prod(s)) for n, s in param_shapes(cfg).items() if n.startswith("layers.0."))


def write_random_checkpoint(path, cfg: OPTConfig, dtype: str = "float32", seed: int = 0) -> int:
    """A sharded transformers checkpoint of ``cfg`` (one safetensors shard per decoder layer and
    ``model.safetensors.index.json``) with normal(0, 0.02) weights, zero biases and unit LayerNorm
    gains, written one shard at a time so a model larger than memory can be made; returns its size
    in bytes."""
    from safetensors.numpy import save_file

    from refopt.model import param_shapes

    path = Path(path)

    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(dtype)
    names = huggingface.name_map(cfg)
    shapes = param_shapes(cfg)

    def make(name, shape):
        if name.endswith(".gamma"):
            return np.ones(shape, np_dtype)
        if name.endswith((".beta", ".bias")):
            return np.zeros(shape, np_dtype)
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np_dtype, copy=False)

    groups = {"model-embeddings.safetensors": [n for n in shapes if not n.startswith("layers.")]}
    for i in range(cfg.num_layers):
        groups[f"model-layer-{i:03d}.safetensors"] = [n for n in shapes if n.startswith(f"layers.{i}.")]
    weight_map, total = {}, 0
    path.mkdir(parents=True, exist_ok=True)
    for shard, group in groups.items():
        tensors = {}
        for name in group:
            if name == "embed_positions":
                rows, width = shapes[name]
                tensors[huggingface.POSITIONS_NAME] = make(name, (rows + huggingface.POSITION_OFFSET, width))
            else:
                tensors[names[name]] = make(name, shapes[name])
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: shard for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf = cfg.to_huggingface()
    hf["dtype"] = dtype
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    return total
