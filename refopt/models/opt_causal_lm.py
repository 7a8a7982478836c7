"""``OPTCausalLM``: KerasHub's task class (backbone + tied LM head + optional preprocessor)."""

from __future__ import annotations


import numpy as np

from refopt import model as _model
from refopt.errors import ConfigError, InputTypeError
from refopt.io import presets, saving
from refopt.limits import check_allocation
from refopt.models.opt_backbone import OPTBackbone, validate_inputs
from refopt.tokenizers import preset_files

_AUTO = "auto"


class OPTCausalLM:
    """An OPT model for next-token prediction, with KerasHub's API.

    ``predict`` returns logits ``(batch, seq, vocab)`` as a NumPy array; ``generate`` decodes with the
    KV cache and the sampler chosen in ``compile``; ``fit`` / ``evaluate`` train with refopt's
    hand-written backward pass.
    """

    def __init__(self, backbone: OPTBackbone, preprocessor=None, name="opt_causal_lm"):
        if not isinstance(backbone, OPTBackbone):
            raise InputTypeError(f"backbone: expected an OPTBackbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.name = name
        # KerasHub's defaults, as if compile() had been called with no arguments.
        self._sampler = "top_k"
        self._optimizer_spec = _AUTO
        self.optimizer = None
        self.compile_kwargs = {}

    # ------------------------------------------------------------------ configuration
    def compile(self, optimizer=_AUTO, loss=_AUTO, *, weighted_metrics=_AUTO, sampler="top_k", **kwargs):
        """Choose the optimizer (``"auto"`` = Adam, learning rate 2e-5, as KerasHub) and the sampler
        used by ``generate`` (KerasHub's default ``"top_k"``; a name or a sampler object)."""
        from refopt import samplers

        if loss not in (_AUTO, None, "sparse_categorical_crossentropy"):
            raise ConfigError(f"compile: loss={loss!r}; refopt trains with the sparse categorical "
                              "cross-entropy on logits only ('auto')")
        if weighted_metrics not in (_AUTO, None, ["sparse_categorical_accuracy"]):
            raise ConfigError(f"compile: weighted_metrics={weighted_metrics!r}; only 'auto' "
                              "(sparse categorical accuracy) is supported")
        self._sampler = samplers.get(sampler)
        self._optimizer_spec = optimizer
        self.optimizer = None  # built lazily by refopt.training (it needs the parameters)
        self.compile_kwargs = kwargs
        return None

    @property
    def sampler(self):
        """The sampler ``generate`` uses (resolved from its name on first use)."""
        if isinstance(self._sampler, str):
            from refopt import samplers

            self._sampler = samplers.get(self._sampler)
        return self._sampler

    def get_config(self) -> dict:
        return {"backbone": self.backbone.get_config(),
                "preprocessor": None if self.preprocessor is None else self.preprocessor.get_config(),
                "name": self.name}

    # ------------------------------------------------------------------ forward
    @property
    def backend(self):
        """The backend this model runs on (None means the current one, see :mod:`refopt.backend`)."""
        return self.backbone.backend

    @backend.setter
    def backend(self, name):
        from refopt import backend as _backend

        if name is not None:
            _backend.resolve(name)
        self.backbone.backend = name

    def __call__(self, inputs, *, tape=None):
        hidden = self.backbone(inputs, tape=tape)
        return self.backbone.ops.lm_head_forward(hidden, self.backbone.params["embed_tokens"])

    def predict(self, x, batch_size=None, verbose=None):
        """Logits ``(batch, seq, vocab)`` for a dict of ``token_ids`` / ``padding_mask`` (or strings,
        through the preprocessor, as KerasHub)."""
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], str)):
            if self.preprocessor is None:
                raise InputTypeError("predict: got strings but this model has no preprocessor; pass "
                                     "{'token_ids', 'padding_mask'} or attach an OPTCausalLMPreprocessor")
            x = self.preprocessor([x] if isinstance(x, str) else list(x))[0]
        ids, mask = validate_inputs(self.backbone.config, x)
        if batch_size is None:
            batch_size = ids.shape[0] or 1
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"predict: batch_size={batch_size!r}; expected a positive integer")
        check_allocation(ids.size * self.backbone.vocabulary_size
                         * np.dtype(self.backbone.compute_dtype).itemsize * 2,
                         f"predict: logits for {ids.shape[0]} x {ids.shape[1]} tokens")
        parts = [self({"token_ids": ids[i:i + batch_size], "padding_mask": mask[i:i + batch_size]})
                 for i in range(0, ids.shape[0], batch_size)]
        if len(parts) == 1:
            return parts[0]                                 # no copy of the (B, S, V) logits
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, ids.shape[1],
                                                                     self.backbone.vocabulary_size))

    def new_cache(self, batch: int, length: int) -> np.ndarray:
        """A zero KV cache ``[batch, num_layers, 2, length, num_heads, head_dim]``."""
        cfg = self.backbone.config
        check_allocation(int(batch) * int(length) * 2 * cfg.num_layers * cfg.hidden_dim
                         * np.dtype(self.backbone.compute_dtype).itemsize,
                         f"a KV cache for {batch} rows of {length} positions")
        return _model.new_cache(cfg, batch, length, self.backbone.compute_dtype)

    def call_with_cache(self, token_ids, cache, cache_update_index, padding_mask=None):
        """Run ``token_ids [B, S]`` at indices ``cache_update_index ..`` against ``cache``.

        Returns ``(logits [B, S, V], hidden_states [B, S, E], cache)``; the cache is updated in place.
        ``padding_mask`` covers indices ``0 .. cache_update_index + S`` (None: every token is real,
        the causal mask alone applies, as in KerasHub's generation)."""
        token_ids = np.asarray(token_ids)
        end = cache_update_index + token_ids.shape[1]
        if padding_mask is None:
            padding_mask = np.ones((token_ids.shape[0], end), bool)
        ops = self.backbone.ops
        step = getattr(ops, "decode_step", None)      # a backend's compiled one-token step
        if step is not None and cache is not None and token_ids.shape[1] == 1:
            out = step(self.backbone.params, self.backbone.config, token_ids, padding_mask, cache,
                       cache_update_index)
            if out is not None:
                return out[0], out[1], cache
        hidden = _model.forward(self.backbone.params, self.backbone.config, token_ids, padding_mask,
                                cache=cache, cache_index=cache_update_index, ops=ops)
        return ops.lm_head_forward(hidden, self.backbone.params["embed_tokens"]), hidden, cache

    # ------------------------------------------------------------------ generation
    def generate(self, inputs, max_length=None, stop_token_ids=_AUTO, strip_prompt=False, seed=None):
        """KerasHub's ``generate``: a string, a list of strings, or (without a preprocessor) a dict of
        ``token_ids`` / ``padding_mask``; decoded with the sampler chosen in ``compile`` on this
        model's ops (its sampler's selection steps too).  ``seed``: the random samplers' seed for
        this call, one integer or one per prompt (see :func:`refopt.generation.generate`)."""
        from refopt import generation

        return generation.generate(self, inputs, max_length=max_length, stop_token_ids=stop_token_ids,
                                   strip_prompt=strip_prompt, seed=seed)

    def stream(self, prompt, max_length=None, **kwargs):
        """Yield text pieces as tokens are produced (see :func:`refopt.generation.stream`)."""
        from refopt import generation

        yield from generation.stream(self, prompt, max_length=max_length, **kwargs)

    # ------------------------------------------------------------------ training
    def loss_and_gradients(self, x, y, sample_weight=None, naming="refopt"):
        """``(loss, grads)`` with loss = sum(sample_weight * CE) / sum(sample_weight); ``naming=
        "huggingface"`` keys and shapes the gradients like transformers' state dict."""
        from refopt import training

        return training.loss_and_gradients_for_model(self, x, y, sample_weight, naming)

    def fit(self, x=None, y=None, sample_weight=None, batch_size=None, epochs=1, shuffle=True,
            validation_data=None, verbose="auto", seed=None, **kwargs):
        from refopt import training

        return training.fit(self, x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                            epochs=epochs, shuffle=shuffle, validation_data=validation_data,
                            verbose=verbose, seed=seed, **kwargs)

    def evaluate(self, x=None, y=None, sample_weight=None, batch_size=None, verbose="auto", **kwargs):
        from refopt import training

        return training.evaluate(self, x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                                 verbose=verbose, **kwargs)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, preset=None, load_weights=True, dtype=None, preprocessor=_AUTO, **kwargs):
        """Load a KerasHub preset, a transformers checkpoint directory, a built-in name or (no
        argument) the bundled model, with its tokenizer and preprocessor when the preset has them
        (``preprocessor=None`` to skip, or pass one).  ``allow_nonfinite=True`` accepts NaN or
        infinite weights (refused by default)."""
        backbone = OPTBackbone.from_preset(preset, load_weights=load_weights, dtype=dtype, **kwargs)
        if isinstance(preprocessor, str) and preprocessor == _AUTO:
            path = presets.resolve(preset)
            preprocessor = None
            if preset_files.has_tokenizer(path):
                from refopt.models.opt_causal_lm_preprocessor import OPTCausalLMPreprocessor

                preprocessor = OPTCausalLMPreprocessor.from_preset(path)
        return cls(backbone, preprocessor=preprocessor)

    def save_to_preset(self, preset_dir, format="keras", overwrite=False) -> None:
        """Write a KerasHub preset (``config.json``, ``model.weights.h5``, ``metadata.json``,
        ``task.json`` and the tokenizer/preprocessor files when attached) or, with
        ``format="huggingface"``, a transformers checkpoint directory.  The directory then holds
        exactly this preset (old preset files it does not rewrite are removed; other files are
        never touched, and a directory holding any needs ``overwrite=True``); a kill at any
        instant leaves the old preset or the new one (:mod:`refopt.io.saving`)."""
        with saving.PresetSave(preset_dir, overwrite=overwrite, replaces=saving.WHOLE_PRESET,
                               what="preset") as staging:
            self.write_preset_files(staging, format)

    def write_preset_files(self, staging, format: str = "keras") -> None:
        """Write every file of this model's preset into a :class:`refopt.io.saving.PresetSave`."""
        self.backbone.write_preset_files(staging, format, tasks=["CausalLM"])
        if format == "keras":
            backbone_config = self.backbone.config.to_keras()
            task = {"module": "keras_hub.src.models.opt.opt_causal_lm", "class_name": "OPTCausalLM",
                    "config": {"backbone": backbone_config, "preprocessor": None, "name": self.name},
                    "registered_name": "keras_hub>OPTCausalLM"}
            if not self.backbone.config.keras_compatible:
                task.update(module="refopt.models.opt_causal_lm",
                            registered_name="refopt>OPTCausalLM")
            if self.preprocessor is not None:
                self.preprocessor.write_preset_files(staging)
                task["config"]["preprocessor"] = self.preprocessor.serialize()
            staging.write_json("task.json", task)
        elif self.preprocessor is not None:
            self.preprocessor.write_transformers_files(staging)
