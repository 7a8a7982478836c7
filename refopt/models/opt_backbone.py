"""``OPTBackbone``: KerasHub's class, over refopt's NumPy decoder (:mod:`refopt.model`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from refopt import backend as _backend
from refopt import dtype_policies
from refopt import model as _model
from refopt.config import OPTConfig
from refopt.errors import CheckpointError, ConfigError, InputError, InputTypeError
from refopt.io import checkpoint, huggingface, keras_h5, safetensors_io, saving
from refopt.models.backbone import Backbone, check_save_format, check_shard_size
from refopt.models.opt_presets import backbone_presets


def validate_inputs(cfg: OPTConfig, inputs, *, total_length: int | None = None):
    """``{"token_ids", "padding_mask"}`` (or a bare id array) -> (ids int64 [B, S], mask bool [B, S]).

    Raises InputTypeError / InputError naming the offending argument."""
    if isinstance(inputs, dict):
        unknown = set(inputs) - {"token_ids", "padding_mask"}
        if unknown:
            raise InputError(f"inputs: unknown keys {sorted(unknown)}; expected 'token_ids' and 'padding_mask'")
        if "token_ids" not in inputs:
            raise InputError("inputs: missing 'token_ids'")
        ids, mask = inputs["token_ids"], inputs.get("padding_mask")
    else:
        ids, mask = inputs, None
    if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], str)):
        raise InputTypeError("token_ids: got strings; tokenize them first or attach a preprocessor")
    try:
        ids = np.asarray(ids)
    except ValueError:
        raise InputError("token_ids: rows of different lengths; pad them and pass a padding_mask") from None
    if ids.dtype == object or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise InputTypeError(f"token_ids: expected integers, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None, :]
        mask = None if mask is None else np.asarray(mask)[None, :]
    if ids.ndim != 2:
        raise InputError(f"token_ids: expected shape (batch, sequence), got {ids.shape}")
    if ids.shape[0] and not ids.shape[1]:
        raise InputError(f"token_ids: shape {ids.shape} holds no token; expected at least one "
                         "per row")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocabulary_size):
        bad = ids[(ids < 0) | (ids >= cfg.vocabulary_size)][0]
        raise InputError(f"token_ids: id {bad} is out of range [0, {cfg.vocabulary_size})")
    if mask is None:
        mask = np.ones(ids.shape, bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise InputError(f"padding_mask: shape {mask.shape} differs from token_ids' {ids.shape}")
        if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)) or (
                mask.dtype != bool and mask.size and not np.isin(mask, (0, 1)).all()):
            raise InputError("padding_mask: expected booleans or 0/1 integers")
        mask = mask.astype(bool)
    length = ids.shape[1] if total_length is None else total_length
    if length > cfg.max_sequence_length:
        raise InputError(f"token_ids: sequence length {length} exceeds max_sequence_length "
                         f"{cfg.max_sequence_length}")
    return ids, mask


def _check_params_fit(cfg: OPTConfig) -> None:
    """Refuse a config whose random weights would not fit in memory (before making them)."""
    from refopt.limits import check_allocation

    itemsize = np.dtype(cfg.compute_dtype).itemsize
    check_allocation(cfg.parameter_count() * itemsize * 2,
                     f"the weights of this config ({cfg.parameter_count():,} parameters)", ConfigError)


class OPTBackbone(Backbone):
    """The OPT decoder network with KerasHub's arguments and defaults.

    Called on ``{"token_ids", "padding_mask"}`` it returns hidden states ``(batch, seq, hidden)``:
    the output of the final LayerNorm (pre-LN models) or of the last layer (post-LN models), mapped
    by ``project_out`` when the embedding is narrower than the decoder (then the last axis is
    ``word_embed_proj_dim``, the width the tied LM head reads, as transformers' ``OPTModel``).

    Arguments beyond KerasHub cover released checkpoints KerasHub cannot represent:
    ``do_layer_norm_before`` (False for OPT-350m), ``word_embed_proj_dim``, ``enable_bias``,
    ``layer_norm_elementwise_affine``, ``remove_final_layer_norm``, ``layer_norm_epsilon``.
    ``dtype`` is a dtype policy (:mod:`refopt.dtype_policies`): ``"float32"`` (default),
    ``"bfloat16"``, ``"float16"``, ``"mixed_bfloat16"``, ``"mixed_float16"`` (KerasHub's, the half
    precisions emulated as KerasHub's layers round), or ``"float64"`` (the oracle's).
    Weights are random (normal, std 0.02; ``seed``) until loaded.
    """

    backbone_presets = backbone_presets
    keras_module = "keras_hub.src.models.opt.opt_backbone"

    def __init__(self, vocabulary_size, num_layers, num_heads, hidden_dim, intermediate_dim,
                 dropout=0.1, max_sequence_length=2048, dtype=None, *, do_layer_norm_before=True,
                 word_embed_proj_dim=None, enable_bias=True, layer_norm_elementwise_affine=True,
                 remove_final_layer_norm=False, layer_norm_epsilon=1e-5, pad_token_id=1,
                 bos_token_id=2, eos_token_id=2, seed=0, name="opt_backbone", **kwargs):
        kwargs.pop("trainable", None)
        dtype = None if dtype is None else dtype_policies.get(dtype).name   # a name, dict or policy
        if kwargs:
            raise ConfigError(f"OPTBackbone: unknown arguments {sorted(kwargs)}")
        self.name = name
        self.config = OPTConfig(
            vocabulary_size=vocabulary_size, num_layers=num_layers, num_heads=num_heads,
            hidden_dim=hidden_dim, intermediate_dim=intermediate_dim, dropout=dropout,
            max_sequence_length=max_sequence_length, dtype=dtype,
            do_layer_norm_before=do_layer_norm_before, word_embed_proj_dim=word_embed_proj_dim,
            enable_bias=enable_bias, layer_norm_elementwise_affine=layer_norm_elementwise_affine,
            remove_final_layer_norm=remove_final_layer_norm, layer_norm_epsilon=layer_norm_epsilon,
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        _check_params_fit(self.config)
        self.params = self._round_variables(_model.init_params(self.config, seed=seed))
        # transformers keeps two position rows before position 0; kept here for exact round trips.
        self.position_prefix = None
        self.backend = None          # None: the current backend (refopt.backend); or a name
        self.weights_dtype = "float32"
        self.activations = None      # "int8": int8 weights' products quantise the activations

    # ------------------------------------------------------------------ KerasHub-style accessors
    def __getattr__(self, name):
        # vocabulary_size, num_layers, hidden_dim, ... read through to the config
        config = self.__dict__.get("config")
        if config is not None and name in {f.name for f in dataclasses.fields(config)}:
            return getattr(config, name)
        raise AttributeError(f"'OPTBackbone' object has no attribute {name!r}")

    @property
    def dtype_policy(self) -> dtype_policies.DTypePolicy:
        """The dtype policy (Keras's ``DTypePolicy``: ``name``, ``compute_dtype``,
        ``variable_dtype``)."""
        return self.config.policy

    @property
    def params(self) -> "_model.Parameters":
        """The weights, name -> array (a :class:`refopt.model.Parameters`, which counts changes in
        ``params.version``); assigning a plain dict wraps it."""
        try:
            return self.__dict__["_params"]
        except KeyError:
            raise AttributeError("params") from None

    @params.setter
    def params(self, value) -> None:
        self.__dict__["_params"] = value if isinstance(value, _model.Parameters) else _model.Parameters(value)

    @property
    def compute_dtype(self) -> str:
        """The dtype activations are computed in (outputs come in it), Keras's meaning."""
        return self.config.policy.compute_dtype

    @property
    def variable_dtype(self) -> str:
        """The dtype the weights are kept in, Keras's meaning."""
        return self.config.policy.variable_dtype

    @property
    def dtype(self) -> str:
        """Keras's ``Layer.dtype``: the variable dtype."""
        return self.variable_dtype

    @property
    def weights(self) -> list:
        """The weights as arrays of the variable dtype (refopt stores half-precision variables as
        float32 holding their values; ``params`` is the dict the model computes with)."""
        dtype = self.variable_dtype
        return [dtype_policies.to_public(np.asarray(v), dtype) if dtype in dtype_policies.HALF
                else v for v in self.params.values()]

    def _round_variables(self, params: dict) -> dict:
        # a half-precision variable dtype ("bfloat16", "float16"): the values it can hold
        policy = self.config.policy
        if policy.variable_dtype not in dtype_policies.HALF:
            return params
        return {k: policy.round_variable(v) for k, v in params.items()}

    def get_config(self) -> dict:
        """KerasHub's config: ``name``, ``trainable``, the serialized dtype policy and the
        constructor's arguments (refopt's own only where they differ from their defaults);
        ``OPTBackbone.from_config`` takes it back."""
        kwargs = self.config.backbone_kwargs()
        kwargs.pop("dtype")
        return {"name": self.name, "trainable": True,
                "dtype": {"module": "keras", "class_name": "DTypePolicy",
                          "config": {"name": self.config.dtype or "float32"}, "registered_name": None},
                **kwargs}

    def lora_layer_table(self) -> list:
        """``(keras_index, keras_layer_name, refopt_prefix, keras_kernel_shape)`` of every layer
        LoRA can adapt.  ``keras_index`` is the layer's position among KerasHub's OPTBackbone
        layers that have weights (Keras's traversal: the embeddings 0-2, then ten per decoder
        layer, the attention projections last and in reverse), which KerasHub's ``.lora.h5`` files
        use as the key."""
        cfg = self.config
        D, H, K, F = cfg.hidden_dim, cfg.num_heads, cfg.head_dim, cfg.intermediate_dim
        table = []
        for i in range(cfg.num_layers):
            base, p = 3 + 10 * i, f"layers.{i}."
            table += [(base + 2, "feedforward_output_dense", p + "fc2", (F, D)),
                      (base + 3, "feedforward_intermediate_dense", p + "fc1", (D, F)),
                      (base + 6, "attention_output", p + "out_proj", (H, K, D)),
                      (base + 7, "value", p + "v_proj", (D, H, K)),
                      (base + 8, "key", p + "k_proj", (D, H, K)),
                      (base + 9, "query", p + "q_proj", (D, H, K))]
        return table

    @classmethod
    def from_opt_config(cls, cfg: OPTConfig, params=None, position_prefix=None,
                        weights_dtype=None) -> "OPTBackbone":
        """A backbone for ``cfg``; ``params`` (optional) are checked and converted as
        :meth:`set_params` does."""
        self = cls.__new__(cls)
        self.name = "opt_backbone"
        self.config = cfg
        self.position_prefix = position_prefix
        self.backend = None
        self.weights_dtype = "float32"
        self.activations = None
        if params is None:
            _check_params_fit(cfg)
            self.params = self._round_variables(_model.init_params(cfg))
        else:
            self.set_params(params, weights_dtype=weights_dtype)
        return self

    def set_params(self, params: dict, source: str = "params", weights_dtype=None) -> None:
        """Replace the weights, checking names and shapes.  Matrices are stored as ``weights_dtype``
        (:func:`refopt.quant.resolve_weights_dtype`: default float32, ``"auto"`` the dtype they
        arrive in), everything else in the compute dtype.  Conversion goes tensor by tensor, and a
        tensor already in its target dtype is used without a copy, so memory-mapped weights stay
        mapped (:func:`refopt.quant.load_params`).  Under a half-precision variable dtype the
        values are rounded to it; LoRA adapters, when enabled, are kept."""
        from refopt import quant

        shapes = _model.param_shapes(self.config)
        missing = sorted(set(shapes) - set(params))
        extra = sorted(set(params) - set(shapes))
        if missing:
            raise CheckpointError(f"{source}: missing tensors {missing[:5]}")
        if extra:
            raise CheckpointError(f"{source}: unexpected tensors {extra[:5]}")
        arrays = {}
        for name, shape in shapes.items():
            arr = params[name] if isinstance(params[name], np.ndarray) else np.asarray(params[name])
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"{source}: tensor {name} has shape {list(arr.shape)}, expected {list(shape)}")
            arrays[name] = arr
        compute = self.config.compute_dtype
        kind = quant.resolve_weights_dtype(weights_dtype, arrays, compute)
        if kind != "float32" and self.config.dtype not in (None, "float32"):
            if weights_dtype != "auto":       # a dtype policy rounds float32 weights itself
                raise ConfigError(f"weights_dtype={kind!r} needs the float32 dtype policy (got "
                                  f"{self.config.dtype!r})")
            kind = "float32"
        adapters = {k: v for k, v in getattr(self, "params", {}).items() if k not in shapes}
        self.params = {**self._round_variables(quant.load_params(arrays, compute, kind, source)),
                       **adapters}
        self.weights_dtype = kind
        self.activations = None

    # ------------------------------------------------------------------ forward
    @property
    def ops(self):
        """The ops namespace this backbone runs on (see :mod:`refopt.backend`), rounding as its
        dtype policy does (:func:`refopt.dtype_policies.ops_for`; KerasHub's attention path
        depends on whether the model has dropout)."""
        return dtype_policies.ops_for(self.config.policy, _backend.ops(self.backend),
                                      fused_attention=self.config.dropout == 0)

    def quantize(self, weights_dtype: str, activations=None) -> None:
        """Store every matrix as ``"bfloat16"``, ``"float16"`` or ``"int8"`` (per-output-channel
        scales), or back to ``"float32"``: decoding then reads 2 or 1 bytes per weight instead of 4
        (:mod:`refopt.quant`).  LayerNorm parameters, biases and positions stay float32.
        ``activations="int8"`` (int8 weights only) also quantises each product's activations per
        row and multiplies in integers (:func:`refopt.quant.int8_matmul`: faster, not exact)."""
        from refopt.quant import QuantizedMatrix, quantize_params, set_activations

        if self.config.dtype not in (None, "float32"):
            raise ConfigError("quantize: weights_dtype needs the float32 dtype policy")
        if self.lora_enabled:
            raise ConfigError("quantize: LoRA is enabled; merge_lora_weights() first")
        params = {k: np.asarray(v, np.float32) if isinstance(v, QuantizedMatrix) else v
                  for k, v in self.params.items()}
        if activations is not None and weights_dtype != "int8":
            raise ConfigError(f"quantize: activations={activations!r} needs weights_dtype='int8'")
        self.params = set_activations(quantize_params(params, weights_dtype), activations)
        self.weights_dtype = weights_dtype or "float32"
        self.activations = activations

    def set_activations(self, activations) -> None:
        """Products of the int8 weights quantise their activations per row (``"int8"``: integer
        products, :func:`refopt.quant.int8_matmul`) or not (``None``, the default: int8 widened to
        the compute dtype inside a float product, exact).  Needs ``weights_dtype="int8"``."""
        from refopt.quant import set_activations

        if activations is not None and self.weights_dtype != "int8":
            raise ConfigError(f"activations={activations!r} needs weights_dtype='int8' "
                              f"(this model's weights are {self.weights_dtype})")
        self.params = set_activations(self.params, activations)
        self.activations = activations

    def __call__(self, inputs, *, tape=None):
        ids, mask = validate_inputs(self.config, inputs)
        hidden = _model.forward(self.params, self.config, ids, mask, tape=tape, ops=self.ops)
        return dtype_policies.to_public(hidden, self.compute_dtype)

    # ------------------------------------------------------------------ presets
    @classmethod
    def _load_preset(cls, preset=None, load_weights=True, dtype=None, backend=None, weights_dtype=None,
                     allow_nonfinite=False, activations=None, **kwargs) -> "OPTBackbone":
        """Load a KerasHub preset directory, a transformers checkpoint directory, a built-in name
        under ``REFOPT_HOME``, or (no argument) the bundled default model.  ``dtype`` is the dtype
        policy (:mod:`refopt.dtype_policies`; ``"float64"`` for the oracle); without it a preset
        saved with a float policy loads as ``"float32"``, KerasHub's rule (a saved ``"float64"``
        stays).

        ``weights_dtype`` chooses how the matrices are held: ``None`` (default) widens every weight
        to the compute dtype; ``"auto"`` keeps them in the dtype the checkpoint stores them in
        (like transformers' ``torch_dtype="auto"``): a float16 or bfloat16 safetensors or PyTorch
        checkpoint is then memory-mapped and used without a copy, so opening it costs no memory
        beyond the file; ``"float16"``, ``"bfloat16"`` or ``"int8"`` convert them tensor by tensor
        (the peak is the result plus one block of rows).  Two- and one-byte weights make decoding up
        to two and four times faster (:mod:`refopt.quant`).  ``backend`` pins this model to
        ``"numpy"``, ``"numba"`` or ``"cuda"`` (default: the current backend).  The checkpoint is
        validated before anything is allocated (:mod:`refopt.io.checkpoint`); weights that are NaN
        or infinite are refused unless ``allow_nonfinite=True``.  ``activations="int8"`` (with
        ``weights_dtype="int8"``) also quantises the activations of every product per row and
        multiplies in integers, as CTranslate2's int8 compute type does (faster at batch 8; not
        exact: see :mod:`refopt.quant`)."""
        if kwargs:
            raise ConfigError(f"from_preset: unknown arguments {sorted(kwargs)}")
        if activations is not None and weights_dtype != "int8":
            raise ConfigError(f"from_preset: activations={activations!r} needs weights_dtype='int8'")
        if dtype is not None:
            dtype = dtype_policies.get(dtype).name   # an unknown policy fails before reading
        if not isinstance(allow_nonfinite, bool):
            raise ConfigError(f"from_preset: allow_nonfinite={allow_nonfinite!r}; expected True or False")
        if backend is not None:
            _backend.resolve(backend)          # an unknown or unavailable backend fails here
        from refopt.quant import resolve_weights_dtype

        resolve_weights_dtype(weights_dtype, {}, "float64" if dtype == "float64" else "float32")
        with checkpoint.open_checkpoint(preset, allow_nonfinite=allow_nonfinite) as ckpt:
            cfg = ckpt.config
            if dtype is not None:
                cfg = dataclasses.replace(cfg, dtype=dtype)
            elif cfg.dtype not in (None, "float64"):
                cfg = dataclasses.replace(cfg, dtype=None)
            if not load_weights:
                self = cls.from_opt_config(cfg)
                if weights_dtype not in (None, "float32", "auto"):
                    self.quantize(weights_dtype)
            else:
                from refopt.limits import check_allocation

                check_allocation(ckpt.bytes_to_copy(cfg.compute_dtype, weights_dtype),
                                 f"{ckpt.path}: loading the weights", CheckpointError)
                self = cls.from_opt_config(cfg, ckpt.params(stored=True), ckpt.position_prefix(),
                                           weights_dtype=weights_dtype)
        if activations is not None:
            self.set_activations(activations)
        self.backend = backend
        return self

    def save_to_preset(self, preset_dir, max_shard_size=10, format="keras", overwrite=False) -> None:
        """Write the backbone alone (``config.json`` + weights) in KerasHub's or transformers'
        layout.  ``max_shard_size`` (GB, KerasHub's argument and default): weights larger than
        that are saved as KerasHub saves them, in shards of at most that size
        (``model.weights.json`` + ``model_00000.weights.h5`` ...; :mod:`refopt.io.keras_h5`);
        None never shards.  The transformers layout is one ``model.safetensors``.  Only preset
        files are written; see :mod:`refopt.io.saving` for where a save may write
        (``overwrite=True`` to write into a directory holding other files) and why a kill at any
        instant never loses the old preset.  LoRA adapters are saved merged into their
        weights, as Keras saves a LoRA layer's kernel (``save_lora_weights`` writes the adapters
        alone)."""
        check_save_format(format)
        check_shard_size(max_shard_size)
        with saving.PresetSave(preset_dir, overwrite=overwrite, replaces=saving.MODEL_FILES,
                               what="backbone") as staging:
            self.write_preset_files(staging, format, max_shard_size=max_shard_size)

    def write_preset_files(self, staging, format: str = "keras", tasks=(), max_shard_size=None) -> None:
        """Write ``config.json`` and the weights into a :class:`refopt.io.saving.PresetSave`
        (``tasks``: the KerasHub task classes the preset also holds, for ``metadata.json``;
        ``max_shard_size``: see :meth:`save_to_preset`)."""
        check_save_format(format)
        limit = check_shard_size(max_shard_size)
        params = self.base_params() if self.lora_enabled else self.params
        if format == "keras":
            staging.write_json("config.json", self.config.to_keras())
            if limit is not None and keras_h5.weights_nbytes(params, self.config) > limit:
                index = keras_h5.write_sharded(staging.open, params, self.config, limit)
                staging.write_json(keras_h5.SHARD_INDEX, index, newline=False)
            else:
                with staging.open("model.weights.h5") as f:
                    keras_h5.write(f, params, self.config)
            meta = {"keras_version": None, "keras_hub_version": None, "refopt_version": _version(),
                    "parameter_count": int(sum(p.size for p in params.values())),
                    "tasks": list(tasks)}
            if not self.config.keras_compatible:
                meta["refopt_only"] = ("KerasHub's OPTBackbone cannot build this model: "
                                       + "; ".join(self.config.keras_incompatibilities()))
            staging.write_json("metadata.json", meta)
        else:
            staging.write_json("config.json", self.config.to_huggingface())
            state = huggingface.to_state_dict(params, self.config, self.position_prefix)
            with staging.open("model.safetensors") as f:
                safetensors_io.write(f, state, metadata={"format": "pt"})
            staging.write_json("generation_config.json", {
                "bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id,
                "pad_token_id": self.config.pad_token_id})


def _version() -> str:
    from refopt import __version__

    return __version__
