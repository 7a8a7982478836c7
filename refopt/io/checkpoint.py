"""The one loader: a preset's weights, validated when opened, read lazily by refopt name.

    with open_checkpoint("path/to/preset") as ckpt:         # or a built-in name, or None
        ckpt.config                                          # the validated OPTConfig
        ckpt.read("layers.0.fc1.weight")                     # refopt's layout, stored dtype
        ckpt.rows("embed_tokens", ids, np.float64)           # some rows of a table
        params, prefix = ckpt.params(), ckpt.position_prefix()

``from_preset``, ``refopt info``, the streaming reference and the oracle read checkpoints through
this class.  Opening one reads ``config.json`` and the weight files' headers (or HDF5 tree, or the
object pickle of a PyTorch checkpoint, :mod:`refopt.io.torch_pickle`) only,
and checks before anything is allocated that every tensor the config implies is there with the
right shape and a float dtype, and that nothing else is: a missing tensor is never taken for an
absent one (only the config says a model has no bias, LayerNorm affine or projection).  Reading a
tensor refuses non-finite values, naming the tensor (``allow_nonfinite=True`` to accept them).

A **format** (:class:`Format`) knows one layout: how to recognise it, which files hold the weights,
and how its tensors map to refopt's names.  :data:`FORMATS` lists them in detection order; a new
reader is one more subclass appended there.  A format opens a **tensor source**
(:mod:`refopt.io.sources`: ``keys()``, ``dtype(key)``, ``shape(key)``, ``array(key)``,
``stored(key)``, ``rows(key, index)``, ``close()``) over its files.  A transformers directory's weights may be
``model.safetensors`` (single or sharded), ``pytorch_model.bin`` (single or sharded),
``tf_model.h5`` or ``flax_model.msgpack`` (``HuggingFaceFormat.WEIGHTS``, in order of preference).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from refopt.config import OPTConfig
from refopt.errors import CheckpointError
from refopt.io import huggingface, keras_h5, sources, stored
from refopt.io.sources import DictSource, Entry

_CHUNK = 1 << 22


def first_nonfinite(arr: np.ndarray):
    """The index of the first NaN or infinity in ``arr`` (a float array), or None.

    16-bit floats (float16, and bfloat16 as :data:`stored.BFLOAT16`) by their exponent bits, in
    chunks: a value is NaN or infinite exactly when its exponent field is all ones, the largest
    value the masked field can take (ten times faster than NumPy's float16 arithmetic).  Wider
    floats: one fast pass first (a sum is finite only if every term is); only when it is not (a
    real NaN/Inf, or an overflowing sum) a chunked exact search."""
    if stored.is_bfloat16(arr) or arr.dtype == np.float16:
        flat = (stored.bits(arr) if stored.is_bfloat16(arr) else arr.view(np.uint16)).reshape(-1)
        exponent = np.uint16(0x7F80 if stored.is_bfloat16(arr) else 0x7C00)
        for start in range(0, flat.size, _CHUNK):
            field = flat[start:start + _CHUNK] & exponent
            if field.size and field.max() == exponent:
                return np.unravel_index(start + int(np.flatnonzero(field == exponent)[0]), arr.shape)
        return None
    if arr.dtype.kind != "f" or arr.size == 0:
        return None
    with np.errstate(all="ignore"):
        if np.isfinite(np.add.reduce(arr, axis=None)):
            return None
    flat = arr.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        bad = np.flatnonzero(~np.isfinite(flat[start:start + _CHUNK]))
        if bad.size:
            return np.unravel_index(start + int(bad[0]), arr.shape)
    return None


class Checkpoint:
    """A validated preset (see the module docstring).  Close it (or use ``with``) when done;
    arrays already read stay valid."""

    def __init__(self, path: Path, fmt: "Format", config: OPTConfig, source, entries: dict,
                 allow_nonfinite: bool = False):
        self.path, self.format, self.config = path, fmt.name, config
        self.source, self.entries = source, entries
        self.allow_nonfinite = allow_nonfinite
        self.weight_files = list(fmt.weight_files(path))

    # -- what is in it
    @property
    def names(self) -> list[str]:
        """refopt's parameter names, in :func:`refopt.model.param_shapes` order."""
        return list(self.entries)

    def shape(self, name) -> tuple[int, ...]:
        from refopt.model import param_shapes

        return tuple(param_shapes(self.config)[name])

    def stored_dtype(self, name) -> str:
        return self.source.dtype(self.entries[name].key)

    def stored_dtypes(self) -> dict[str, int]:
        """dtype name -> number of tensors stored in it."""
        counts: dict[str, int] = {}
        for entry in self.entries.values():
            dtype = self.source.dtype(entry.key)
            counts[dtype] = counts.get(dtype, 0) + 1
        return counts

    # -- reading
    def _checked(self, name, arr):
        if not self.allow_nonfinite:
            bad = first_nonfinite(arr)
            if bad is not None:
                value = stored.widen(arr[bad]) if stored.is_bfloat16(arr) else arr[bad]
                raise CheckpointError(
                    f"{self.path}: tensor {self.entries[name].key} (refopt parameter {name}) holds "
                    f"{value} at index {list(int(i) for i in bad)}; refopt refuses non-finite "
                    "weights (pass allow_nonfinite=True to load them anyway)")
            # the check touched every page of a mapped tensor: drop them from this process's
            # resident set again (the page cache keeps them), so that checking a checkpoint
            # leaves it as unread as before -- a converting load then holds the result plus one
            # tensor, not the result plus the file
            stored.release(arr)
        return arr

    def read(self, name, dtype=None) -> np.ndarray:
        """Parameter ``name`` in refopt's layout: the stored values (bfloat16 widened to float32;
        a view of the file where no transpose is needed), or cast to ``dtype``."""
        entry = self.entries[name]
        arr = self._checked(name, self.source.array(entry.key))
        if entry.to_refopt is not None:
            arr = entry.to_refopt(arr)
        return arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)

    def rows(self, name, index, dtype=None) -> np.ndarray:
        """Rows ``index`` (any integer array) of the table ``name`` (``embed_tokens`` or
        ``embed_positions``), shaped ``index.shape + (width,)``."""
        entry = self.entries[name]
        flat = np.asarray(index, np.int64).reshape(-1) + entry.row_offset
        uniq, inverse = np.unique(flat, return_inverse=True)
        block = self.source.rows(entry.key, uniq)
        block = self._checked(name, block)
        if dtype is not None:
            block = block.astype(dtype, copy=False)
        return block[inverse].reshape(np.shape(index) + block.shape[1:])

    def read_stored(self, name) -> np.ndarray:
        """Parameter ``name`` in refopt's layout and its stored dtype, without a copy where the
        file allows (bfloat16 as :data:`refopt.io.stored.BFLOAT16`): what
        :func:`refopt.quant.load_params` converts tensor by tensor."""
        entry = self.entries[name]
        arr = self._checked(name, self.source.stored(entry.key))
        return arr if entry.to_refopt is None else entry.to_refopt(arr)

    def params(self, dtype=None, stored=False) -> dict[str, np.ndarray]:
        """Every parameter (:meth:`read`, or with ``stored`` :meth:`read_stored`)."""
        if stored:
            return {name: self.read_stored(name) for name in self.entries}
        return {name: self.read(name, dtype) for name in self.entries}

    def bytes_to_copy(self, dtype, weights_dtype=None) -> int:
        """Bytes a load into ``dtype`` copies into memory (what is not used in place from a
        memory map: every tensor of an HDF5 file, every tensor stored in another dtype).  With
        ``weights_dtype`` (:func:`refopt.quant.load_params`), matrices are held in that dtype
        (``"auto"``: float16 and bfloat16 as stored)."""
        from refopt.quant import quantizable

        widths = {"float16": 2, "bfloat16": 2, "int8": 1}
        total = 0
        for name in self.entries:
            stored_as, target = self.stored_dtype(name), np.dtype(dtype).name
            if quantizable(name) and weights_dtype not in (None, "float32"):
                target = (stored_as if weights_dtype == "auto" and stored_as in widths else
                          target if weights_dtype == "auto" else weights_dtype)
            in_place = self.format == "huggingface" and stored_as == target
            if not in_place:
                width = widths[target] if target in widths else np.dtype(target).itemsize
                total += int(np.prod(self.shape(name), dtype=np.int64)) * width
        return total

    def position_prefix(self):
        """transformers' two position rows before position 0 (None for other formats)."""
        key = self.entries["embed_positions"].key
        if self.entries["embed_positions"].row_offset == 0:
            return None
        return np.array(self.source.array(key)[:huggingface.POSITION_OFFSET])

    def close(self) -> None:
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------- formats
class Format:
    """One preset layout.  Subclasses set ``name`` and implement the methods."""

    name = ""

    def claims(self, path: Path, config: dict) -> bool:
        """Whether ``config.json``'s content ``config`` says the preset is in this layout."""
        raise NotImplementedError

    def weight_files(self, path: Path) -> list[Path]:
        """The files holding the weights (checked to exist when the format is detected)."""
        raise NotImplementedError

    def check_files(self, path: Path) -> None:
        """Raise :class:`CheckpointError` when the weight files are missing."""
        raise NotImplementedError

    def open(self, path: Path, cfg: OPTConfig):
        """``(tensor source, {refopt name: Entry})``, validated against ``cfg``."""
        raise NotImplementedError


class KerasFormat(Format):
    name = "keras"

    def claims(self, path, config):
        return "class_name" in config or "vocabulary_size" in config

    def weight_files(self, path):
        if os.path.lexists(path / "model.weights.h5") or not os.path.lexists(path / keras_h5.SHARD_INDEX):
            return [path / "model.weights.h5"]
        index = keras_h5.read_shard_index(path / keras_h5.SHARD_INDEX)      # sharded
        return [path / shard for shard in sorted({s for shards in index.values() for s in shards})]

    def check_files(self, path):
        if not (os.path.lexists(path / "model.weights.h5")
                or os.path.lexists(path / keras_h5.SHARD_INDEX)):
            raise CheckpointError(f"{path}: KerasHub preset without model.weights.h5 (or the "
                                  f"sharded {keras_h5.SHARD_INDEX})")

    def open(self, path, cfg):
        from refopt.model import param_shapes

        layout = keras_h5.layout(cfg)
        shapes = param_shapes(cfg)
        expected = {where: stored for where, stored in layout.values()}
        if os.path.lexists(path / "model.weights.h5"):
            source = sources.KerasSource(path / "model.weights.h5")
            try:
                source.file.validate(expected)
            except BaseException:
                source.close()
                raise
        else:
            source = sources.KerasShardedSource(path, expected)
        entries = {}
        for name, (where, _) in layout.items():
            def convert(arr, name=name):
                return keras_h5.from_keras(name, arr, shapes[name])
            entries[name] = Entry(where, convert)
        return source, {name: entries[name] for name in shapes}


class HuggingFaceFormat(Format):
    """transformers' layout.  :attr:`WEIGHTS` lists the weight files it reads, in order of
    preference, each with the tensor source that reads it (a reader of another file kind --
    ``pytorch_model.bin``, ``tf_model.h5`` -- is one more entry)."""

    name = "huggingface"
    WEIGHTS = [("model.safetensors.index.json", lambda path, file: sources.SafetensorsSource(path, file)),
               ("model.safetensors", lambda path, file: sources.SafetensorsSource(path, None)),
               ("pytorch_model.bin.index.json", lambda path, file: sources.reader_source(file)),
               ("pytorch_model.bin", lambda path, file: sources.reader_source(file)),
               ("tf_model.h5", lambda path, file: sources.reader_source(file)),
               ("flax_model.msgpack", lambda path, file: sources.reader_source(file))]

    def claims(self, path, config):
        return "model_type" in config

    def _weights(self, path):
        for name, source in self.WEIGHTS:
            if os.path.lexists(path / name):
                return path / name, source
        return None, None

    def weight_files(self, path):
        file, _ = self._weights(path)
        if file is not None and file.name.endswith(".index.json"):
            return [path / shard for shard in sorted(set(sources.read_index(file).values()))]
        return [] if file is None else [file]

    def check_files(self, path):
        if self._weights(path)[0] is not None:
            return
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".ckpt", ".pth", ".bin"))
        raise CheckpointError(f"{path}: transformers config.json but no weights file (expected one of "
                              f"{', '.join(n for n, _ in self.WEIGHTS)}"
                              f"{'; found ' + ', '.join(others) if others else ''})")

    def open(self, path, cfg):
        from refopt.model import param_shapes

        file, make_source = self._weights(path)
        source = make_source(path, file)
        try:
            entries = self.entries(path, cfg, source, param_shapes(cfg))
        except BaseException:
            source.close()
            raise
        return source, entries

    @staticmethod
    def entries(path, cfg, source, shapes) -> dict:
        """``{refopt name: Entry}`` for a transformers state in ``source`` (checked: every
        tensor of ``cfg`` there, with its shape and a float dtype, nothing else but a tied
        ``lm_head.weight``)."""
        mapping = huggingface.name_map(cfg)
        expected = {theirs: tuple(shapes[ours]) for ours, theirs in mapping.items()}
        expected[huggingface.POSITIONS_NAME] = (cfg.max_sequence_length + huggingface.POSITION_OFFSET,
                                                cfg.hidden_dim)
        present = set(source.keys())
        missing = sorted(set(expected) - present)
        if missing:
            raise CheckpointError(f"{path}: missing tensors {missing[:5]}"
                                  f"{' ...' if len(missing) > 5 else ''}")
        extra = sorted(present - set(expected) - {"lm_head.weight"})
        if extra:
            raise CheckpointError(f"{path}: unexpected tensors {extra[:5]}"
                                  f"{' ...' if len(extra) > 5 else ''} for this config")
        if "lm_head.weight" in present:
            expected["lm_head.weight"] = expected[mapping["embed_tokens"]]
            tied = source.shape("lm_head.weight") == expected["lm_head.weight"]
            if tied and not huggingface.same_tensor(source.stored("lm_head.weight"),
                                                     source.stored(mapping["embed_tokens"])):
                raise CheckpointError(f"{path}: lm_head.weight differs from the token embedding; refopt's "
                                      "OPT ties the LM head to it (as every released OPT does)")
        for key, want in expected.items():
            got = source.shape(key)
            if got != want:
                hint = (" (max_position_embeddings + 2 rows)" if key == huggingface.POSITIONS_NAME
                        else " (tied to the token embedding)" if key == "lm_head.weight"
                        else " for this config")
                raise CheckpointError(f"{path}: tensor {key} has shape {list(got)}, expected "
                                      f"{list(want)}{hint}")
            dtype = source.dtype(key)
            if dtype not in ("float16", "bfloat16", "float32", "float64"):
                raise CheckpointError(f"{path}: tensor {key} has dtype {dtype}, expected floats "
                                      "(float16, bfloat16, float32 or float64)")
        entries = {}
        for ours in shapes:
            if ours == "embed_positions":
                entries[ours] = Entry(huggingface.POSITIONS_NAME,
                                      lambda a: a[huggingface.POSITION_OFFSET:],
                                      huggingface.POSITION_OFFSET)
            else:
                entries[ours] = Entry(mapping[ours])
        return entries


FORMATS: list[Format] = [KerasFormat(), HuggingFaceFormat()]


# ----------------------------------------------------------------------------------- opening
def detect(path: Path) -> tuple[Format, dict]:
    """The format of the preset directory ``path`` and its ``config.json`` content."""
    from refopt.io import presets

    cfg_file = path / "config.json"
    if not os.path.lexists(cfg_file):
        raise CheckpointError(f"{path}: neither a KerasHub preset nor a transformers checkpoint (no "
                              "config.json)")
    data = presets.read_config_json(cfg_file)
    for fmt in FORMATS:
        if isinstance(data, dict) and fmt.claims(path, data):
            fmt.check_files(path)
            return fmt, data
    raise CheckpointError(f"{path}: neither a KerasHub preset nor a transformers checkpoint "
                          "(config.json has neither 'class_name' nor 'model_type')")


def detect_format(path: Path) -> str:
    """``"keras"`` or ``"huggingface"`` (see :data:`FORMATS`); refuses pickles and anything else
    with a clear error."""
    return detect(Path(path))[0].name


def open_checkpoint(preset=None, *, allow_nonfinite: bool = False) -> Checkpoint:
    """Open and validate a preset (anything :func:`refopt.io.presets.resolve` accepts)."""
    from refopt.io import presets

    path = presets.resolve(preset)
    fmt, data = detect(path)
    config = OPTConfig.from_json_dict(data, str(path / "config.json"))
    source, entries = fmt.open(path, config)
    return Checkpoint(path, fmt, config, source, entries, allow_nonfinite)


def from_state_dict(state: dict[str, np.ndarray], cfg: OPTConfig, source: str = "checkpoint"):
    """refopt parameters (views where no transpose is needed) and the two position prefix rows of
    a transformers state dict, checked as a checkpoint file is (by :meth:`HuggingFaceFormat.entries`)."""
    from refopt.model import param_shapes

    src = DictSource({})
    for name, value in state.items():
        canonical = huggingface.canonical_name(name)
        if canonical in src.tensors:
            raise CheckpointError(f"{source}: tensor {name!r} is given twice")
        src.tensors[canonical] = np.asarray(value)
    found = HuggingFaceFormat.entries(source, cfg, src, param_shapes(cfg))
    params = {name: (e.to_refopt(src.array(e.key)) if e.to_refopt else src.array(e.key))
              for name, e in found.items()}
    return params, src.array(huggingface.POSITIONS_NAME)[:huggingface.POSITION_OFFSET]
