"""LoRA on a backbone, with KerasHub's API and file layout.

``backbone.enable_lora(rank)`` adds a low-rank adapter (:mod:`refopt.ops.lora`) beside each layer
KerasHub chooses by default (``default_lora_layer_names()``: OPT's query and value projections)
and freezes every other weight: ``fit`` then trains the adapters alone, and the base weights stay
bitwise as they were.  ``save_lora_weights("x.lora.h5")`` writes the adapters as KerasHub writes
them, and ``load_lora_weights`` reads KerasHub's files (each side loads the other's).
``merge_lora_weights()`` folds the adapters into the base weights, for inference at full speed.

The adapters live in ``backbone.params`` beside the weight they adapt, as
``layers.{i}.q_proj.lora_a`` ``[D, H, r]`` and ``.lora_b`` ``[r, K]`` (Keras's shapes:
``lora_kernel_a`` has the Keras kernel's shape with its last axis replaced by the rank), so every
forward (``predict``, ``generate``, ``fit``) applies them through :func:`refopt.model.dense`.

KerasHub's file, ``<name>.lora.h5``::

    lora/vars/rank                          int64 scalar
    lora/<index>/vars/lora_kernel_a         float32, Keras's shape
    lora/<index>/vars/lora_kernel_b         float32 [rank, last axis]

where ``<index>`` is the layer's position among the backbone's layers that have weights, in
Keras's traversal order (``_flatten_layers``): for OPT, layer ``i``'s value projection is
``10 + 10 i`` and its query projection ``12 + 10 i`` (:meth:`OPTBackbone.lora_layer_table`).

Differences from KerasHub, on purpose: KerasHub makes a LoRA-enabled layer trainable as a whole,
so the query and value *biases* train too, yet ``save_lora_weights`` does not save them (a
KerasHub LoRA file loses those updates).  refopt freezes every base weight, biases included, so
the ``.lora.h5`` file is the whole fine-tune.  The scale ``lora_alpha / rank`` is KerasHub's
default, 1 (the file records no alpha).
"""

from __future__ import annotations

import os

import numpy as np

from refopt.errors import CheckpointError, ConfigError

A, B = ".lora_a", ".lora_b"


def he_uniform(rng, shape, dtype=np.float32):
    """Keras's ``he_uniform`` initialiser: U(-l, l), l = sqrt(6 / fan_in), fan_in as Keras computes
    it (``shape[-2]`` times the product of the leading axes)."""
    fan_in = shape[0] if len(shape) == 2 else shape[-2] * int(np.prod(shape[:-2]))
    limit = np.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, shape).astype(dtype)


class LoRAMixin:
    """KerasHub's ``Backbone`` LoRA methods.  The class provides ``params`` and
    ``lora_layer_table()`` -> ``[(keras_index, keras_layer_name, refopt_prefix, keras_kernel_shape)]``."""

    lora_rank = None

    def default_lora_layer_names(self) -> list:
        """The layer names LoRA is enabled on by default (KerasHub's list, for every model)."""
        return ["query_dense", "value_dense", "query", "value"]

    @property
    def lora_enabled(self) -> bool:
        return any(name.endswith(A) for name in self.params)

    @property
    def lora_layers(self) -> list:
        """The refopt prefixes (``layers.0.q_proj``, ...) that carry an adapter."""
        return [name[:-len(A)] for name in self.params if name.endswith(A)]

    def enable_lora(self, rank, target_layer_names=None, *, seed=None):
        """Add rank-``rank`` adapters to the layers named ``target_layer_names`` (Keras layer
        names; default :meth:`default_lora_layer_names`) and freeze every other weight.  ``a`` is
        drawn with Keras's ``he_uniform`` (``seed``: a NumPy seed), ``b`` is zero, so the model's
        outputs do not change until training."""
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ConfigError(f"enable_lora: rank={rank!r}; expected a positive integer")
        if self.lora_enabled:
            raise ConfigError("lora is already enabled. This can only be done once per layer.")
        if target_layer_names is None:
            target_layer_names = self.default_lora_layer_names()
        rng = np.random.default_rng(seed)
        dtype = self._lora_dtype()
        adapters = {}
        for _, keras_name, prefix, kernel_shape in self.lora_layer_table():
            if keras_name in target_layer_names:
                adapters[prefix + A] = he_uniform(rng, tuple(kernel_shape[:-1]) + (int(rank),), dtype)
                adapters[prefix + B] = np.zeros((int(rank), kernel_shape[-1]), dtype)
        if not adapters:
            raise ConfigError(f"enable_lora: no layer of this backbone is named in "
                              f"{list(target_layer_names)}; LoRA can adapt "
                              f"{sorted({name for _, name, _, _ in self.lora_layer_table()})}")
        self.params.update(adapters)
        self.lora_rank = int(rank)

    def _lora_dtype(self):
        # Keras keeps LoRA weights in float32 whatever the policy; refopt's float64 models (the
        # oracle's) keep them in float64
        return np.float64 if self.config.compute_dtype == "float64" else np.float32

    def trainable_names(self):
        """The parameters training updates: the adapters when LoRA is enabled, else all (None)."""
        if not self.lora_enabled:
            return None
        return {name for name in self.params if name.endswith((A, B))}

    def base_params(self) -> dict:
        """The parameters without adapters, each adapter merged into its weight (what a saved
        preset holds, as Keras saves a LoRA layer's merged kernel)."""
        ops = self.ops
        out = {k: v for k, v in self.params.items() if not k.endswith((A, B))}
        for prefix in self.lora_layers:
            out[prefix + ".weight"] = ops.lora_merge(out[prefix + ".weight"], self.params[prefix + A],
                                                     self.params[prefix + B])
        return out

    def merge_lora_weights(self) -> None:
        """Fold every adapter into its weight (``w + a @ b``) and drop the adapters: the model
        computes the same function at the speed of one without LoRA, and every weight is
        trainable again."""
        if not self.lora_enabled:
            raise ConfigError("merge_lora_weights: LoRA is not enabled on this backbone")
        self.params = self.base_params()
        self.lora_rank = None

    # ------------------------------------------------------------------ KerasHub's file
    def _lora_indices(self, prefixes=None) -> list:
        """(keras_index, refopt_prefix, keras_kernel_shape) of the adapted layers (or of the layers
        ``prefixes``), in index order."""
        enabled = set(self.lora_layers if prefixes is None else prefixes)
        return [(index, prefix, shape) for index, _, prefix, shape in sorted(self.lora_layer_table())
                if prefix in enabled]

    def save_lora_weights(self, filepath) -> None:
        """Write the adapters to ``filepath`` (must end in ``.lora.h5``) in KerasHub's layout,
        through a temporary file renamed into place (:func:`refopt.io.saving.write_file_atomically`:
        a reader never sees half a file, a directory is never replaced)."""
        from refopt.io.saving import write_file_atomically

        if not self.lora_enabled:
            raise ConfigError("There are no lora-enabled layers in this model. Make sure to call "
                              "`.enable_lora(rank)` first.")
        filepath = os.fspath(filepath)
        if not str(filepath).endswith(".lora.h5"):
            raise ConfigError(f"The filename must end in `.lora.h5`. Received: filepath={filepath}")

        def write(out):
            import h5py

            with h5py.File(out, "w") as f:
                f.create_dataset("lora/vars/rank", data=np.int64(self.lora_rank))
                for index, prefix, _ in self._lora_indices():
                    group = f"lora/{index}/vars/"
                    f.create_dataset(group + "lora_kernel_a", data=np.asarray(self.params[prefix + A], np.float32))
                    f.create_dataset(group + "lora_kernel_b", data=np.asarray(self.params[prefix + B], np.float32))
        write_file_atomically(filepath, write)

    def load_lora_weights(self, filepath) -> None:
        """Read adapters from a ``.lora.h5`` file (refopt's or KerasHub's).  Without LoRA enabled,
        it is enabled at the file's rank on the default layers (as KerasHub does); with it enabled,
        the ranks must match.  The file is checked whole before the model changes: a regular HDF5
        file, no links, every adapter present with its shape and a float dtype (checked before it
        is read), finite, and no adapter for a layer that is not LoRA-enabled here (KerasHub
        ignores those; refopt refuses to drop part of a fine-tune)."""
        from refopt.io.keras_h5 import KerasWeightsFile

        filepath = os.fspath(filepath)
        f = KerasWeightsFile(filepath)        # a regular file, read through h5py's own checks
        try:
            datasets = f.stored_datasets()
            rank_ds = datasets.pop("lora/vars/rank", None)
            if rank_ds is None:
                raise CheckpointError(f"{filepath}: no lora/vars/rank; not a .lora.h5 file")
            if rank_ds.shape != () or rank_ds.dtype.kind not in "iu":
                raise CheckpointError(f"{filepath}: lora/vars/rank is not an integer scalar")
            rank = int(rank_ds[()])
            if rank < 1:
                raise CheckpointError(f"{filepath}: lora/vars/rank is {rank}; expected a positive rank")
            if self.lora_enabled and self.lora_rank != rank:
                raise ConfigError(f"The Lora rank expected by file '{filepath}' is rank={rank}, but "
                                  f"the model was called with `.enable_lora(rank={self.lora_rank})`. "
                                  "Both ranks must match.")
            prefixes = None if self.lora_enabled else [
                prefix for _, name, prefix, _ in self.lora_layer_table()
                if name in self.default_lora_layer_names()]
            loaded = {}
            for index, prefix, kernel in self._lora_indices(prefixes):
                for suffix, key, shape in ((A, "lora_kernel_a", tuple(kernel[:-1]) + (rank,)),
                                           (B, "lora_kernel_b", (rank, kernel[-1]))):
                    where = f"lora/{index}/vars/{key}"
                    ds = datasets.pop(where, None)
                    if ds is None:
                        raise CheckpointError(f"{filepath}: missing {where} (the adapter of {prefix})")
                    if tuple(ds.shape) != shape or ds.dtype.kind != "f" or ds.dtype.itemsize not in (2, 4, 8):
                        raise CheckpointError(f"{filepath}: {where} is {ds.dtype} {list(ds.shape)}, "
                                              f"expected floats of shape {list(shape)}")
                    try:
                        value = np.asarray(ds[()])
                    except Exception as e:     # h5py raises OSError, ValueError, ... on bad data
                        raise CheckpointError(f"{filepath}: {where} cannot be read "
                                              f"({type(e).__name__}); the file is damaged") from None
                    if not np.isfinite(value).all():
                        raise CheckpointError(f"{filepath}: {where} holds non-finite values")
                    loaded[prefix + suffix] = value.astype(self._lora_dtype())
            if datasets:
                others = sorted(datasets)
                raise CheckpointError(f"{filepath}: holds {others[:3]}{' ...' if len(others) > 3 else ''}"
                                      ", adapters of layers that are not LoRA-enabled here (or not "
                                      "adapters at all); call enable_lora(rank, target_layer_names) "
                                      "with the file's layers first")
        finally:
            f.close()
        if not self.lora_enabled:
            self.enable_lora(rank)
        self.params.update(loaded)
