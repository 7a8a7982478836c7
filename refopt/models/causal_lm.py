"""``CausalLM``: the base class of next-token prediction tasks (KerasHub's
``keras_hub.models.CausalLM``), with ``compile``, ``generate`` and the training loop.

Subclasses (:class:`~refopt.models.OPTCausalLM`) provide ``__call__`` (logits), ``new_cache`` and
``call_with_cache``; generation and training live in :mod:`refopt.generation` and
:mod:`refopt.training`.

``generate`` runs ``make_generate_function()``: the function kept in ``generate_function`` (made
on the first call and reused; ``compile()`` clears it, as KerasHub does).  refopt does not trace or
jit anything, so the function is the task's ``generate_step``.
"""

from __future__ import annotations

import numpy as np

from refopt.errors import ConfigError, InputTypeError
from refopt.limits import check_allocation
from refopt.models.task import AUTO, Task


class CausalLM(Task):
    """Base class of generative language models (KerasHub's ``CausalLM``).

    ``CausalLM.from_preset(preset)`` builds the preset's own task class.  ``compile=False`` at
    construction leaves the model uncompiled: ``fit``, ``evaluate`` and ``generate`` then raise
    until ``compile()`` is called (KerasHub's ``fit`` raises the same ValueError).
    """

    keras_module = "keras_hub.src.models.causal_lm"
    keras_class_name = "CausalLM"
    default_name = "causal_lm"

    def __init__(self, backbone, preprocessor=None, name=None, compile=True, **kwargs):
        self._sampler = None
        self.optimizer_spec = AUTO          # what compile(optimizer=...) asked for
        self.optimizer = None
        self.compile_kwargs = {}
        self.generate_function = None
        super().__init__(backbone, preprocessor=preprocessor, name=name, compile=compile, **kwargs)

    # ------------------------------------------------------------------ configuration
    def compile(self, optimizer=AUTO, loss=AUTO, *, weighted_metrics=AUTO, sampler="top_k", **kwargs):
        """Choose the optimizer (``"auto"`` = Adam, learning rate 2e-5, as KerasHub) and the sampler
        used by ``generate`` (KerasHub's default ``"top_k"``; a name or a sampler object).  Clears
        ``generate_function``."""
        from refopt import samplers

        if loss not in (AUTO, None, "sparse_categorical_crossentropy"):
            raise ConfigError(f"compile: loss={loss!r}; refopt trains with the sparse categorical "
                              "cross-entropy on logits only ('auto')")
        if weighted_metrics not in (AUTO, None, ["sparse_categorical_accuracy"]):
            raise ConfigError(f"compile: weighted_metrics={weighted_metrics!r}; only 'auto' "
                              "(sparse categorical accuracy) is supported")
        self._sampler = samplers.get(sampler)
        self.optimizer_spec = optimizer
        self.optimizer = None  # built lazily by refopt.training (it needs the parameters)
        self.compile_kwargs = kwargs
        self.generate_function = None
        self.compiled = True

    @property
    def sampler(self):
        """The sampler ``generate`` uses (set by ``compile``)."""
        return self._sampler

    # ------------------------------------------------------------------ backend
    @property
    def backend(self):
        """The backend this model runs on (None: the current one; see :mod:`refopt.backend`)."""
        return self.backbone.backend

    @backend.setter
    def backend(self, name):
        from refopt import backend as _backend

        if name is not None:
            _backend.resolve(name)
        self.backbone.backend = name

    # ------------------------------------------------------------------ inference
    def predict(self, x, batch_size=None, verbose=None):
        """Logits ``(batch, seq, vocab)`` for a dict of ``token_ids`` / ``padding_mask`` (or strings,
        through the preprocessor, as KerasHub)."""
        from refopt.models.opt_backbone import validate_inputs

        if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], str)):
            if self.preprocessor is None:
                raise InputTypeError("predict: got strings but this model has no preprocessor; pass "
                                     "{'token_ids', 'padding_mask'} or attach a preprocessor")
            x = self.preprocessor([x] if isinstance(x, str) else list(x))[0]
        ids, mask = validate_inputs(self.backbone.config, x)
        if batch_size is None:
            batch_size = ids.shape[0] or 1
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"predict: batch_size={batch_size!r}; expected a positive integer")
        check_allocation(ids.size * self.backbone.vocabulary_size
                         * np.dtype(self.backbone.config.compute_dtype).itemsize * 2,
                         f"predict: logits for {ids.shape[0]} x {ids.shape[1]} tokens")
        parts = [self({"token_ids": ids[i:i + batch_size], "padding_mask": mask[i:i + batch_size]})
                 for i in range(0, ids.shape[0], batch_size)]
        if len(parts) == 1:
            return parts[0]                                 # no copy of the (B, S, V) logits
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, ids.shape[1],
                                                                     self.backbone.vocabulary_size))

    # ------------------------------------------------------------------ generation
    def generate_step(self, inputs, stop_token_ids=None, seed=None):
        """KerasHub's ``generate_step``: generation on one batch ``{"token_ids", "padding_mask"}``
        (see :func:`refopt.generation.generate_step`; ``seed``: the random samplers' seed)."""
        from refopt import generation

        return generation.generate_step(self, inputs, stop_token_ids=stop_token_ids, seed=seed)

    def make_generate_function(self):
        """The generation function ``generate`` calls, made once and kept in
        ``generate_function`` until ``compile()`` is called again (KerasHub's)."""
        if self.generate_function is None:
            self.generate_function = self.generate_step
        return self.generate_function

    def generate(self, inputs, max_length=None, stop_token_ids=AUTO, strip_prompt=False, seed=None):
        """KerasHub's ``generate``: a string, a list of strings, or (without a preprocessor) a dict of
        ``token_ids`` / ``padding_mask``; decoded with the sampler chosen in ``compile`` on this
        model's ops (its sampler's selection steps too).  ``seed``: the random samplers' seed for
        this call, one integer or one per prompt (see :func:`refopt.generation.generate`)."""
        from refopt import generation

        self._require_compiled()
        return generation.generate(self, inputs, max_length=max_length, stop_token_ids=stop_token_ids,
                                   strip_prompt=strip_prompt, seed=seed,
                                   generate_function=self.make_generate_function())

    def stream(self, prompt, max_length=None, **kwargs):
        """Yield text pieces as tokens are produced (see :func:`refopt.generation.stream`)."""
        from refopt import generation

        self._require_compiled()
        yield from generation.stream(self, prompt, max_length=max_length, **kwargs)

    # ------------------------------------------------------------------ training
    def loss_and_gradients(self, x, y, sample_weight=None, naming="refopt"):
        """``(loss, grads)`` with loss = sum(sample_weight * CE) / sum(sample_weight); ``naming=
        "huggingface"`` keys and shapes the gradients like transformers' state dict."""
        from refopt import training

        return training.loss_and_gradients_for_model(self, x, y, sample_weight, naming)

    def fit(self, x=None, y=None, sample_weight=None, batch_size=None, epochs=1, shuffle=True,
            validation_data=None, verbose="auto", seed=None, **kwargs):
        """Train with the optimizer chosen in ``compile`` (see :func:`refopt.training.fit`); with
        LoRA enabled on the backbone, only the adapters train.  Under a mixed policy the forward
        pass rounds as KerasHub's does and the backward runs in float32."""
        from refopt import training
        from refopt.dtype_policies import HALF
        from refopt.errors import TrainingError

        self._require_compiled()
        policy = self.backbone.config.policy
        if policy.variable_dtype in HALF:
            raise TrainingError(f"fit: the {policy.name!r} policy keeps the weights in "
                                f"{policy.variable_dtype}; train with 'mixed_{policy.compute_dtype}' "
                                "(float32 weights, the same computation), as Keras advises")
        return training.fit(self, x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                            epochs=epochs, shuffle=shuffle, validation_data=validation_data,
                            verbose=verbose, seed=seed, **kwargs)

    def evaluate(self, x=None, y=None, sample_weight=None, batch_size=None, verbose="auto", **kwargs):
        from refopt import training

        self._require_compiled()
        return training.evaluate(self, x, y=y, sample_weight=sample_weight, batch_size=batch_size,
                                 verbose=verbose, **kwargs)

    # ------------------------------------------------------------------ presets
    @classmethod
    def _load_preset(cls, preset=None, load_weights=True, dtype=None, preprocessor=AUTO, **kwargs):
        """The backbone (``dtype``, ``backend``, ``weights_dtype``, ``allow_nonfinite`` go to it),
        with the preset's preprocessor when it has tokenizer files (``preprocessor=None`` to skip,
        or pass one)."""
        from refopt.io import presets
        from refopt.tokenizers import preset_files

        backbone = cls.backbone_cls.from_preset(preset, load_weights=load_weights, dtype=dtype, **kwargs)
        if isinstance(preprocessor, str) and preprocessor == AUTO:
            path = presets.resolve(preset)
            preprocessor = None
            if preset_files.has_tokenizer(path):
                preprocessor = cls.preprocessor_cls.from_preset(path)
        return cls(backbone, preprocessor=preprocessor)

    def save_to_preset(self, preset_dir, max_shard_size=10, format="keras", overwrite=False) -> None:
        """Write a KerasHub preset (``config.json``, ``model.weights.h5``, ``metadata.json``,
        ``task.json`` and the tokenizer/preprocessor files when attached) or, with
        ``format="huggingface"``, a transformers checkpoint directory.  ``max_shard_size`` (GB,
        KerasHub's argument and default): larger weights are saved in KerasHub's shards (see
        :meth:`refopt.models.OPTBackbone.save_to_preset`).  The directory then holds
        exactly this preset (old preset files it does not rewrite are removed; other files are
        never touched, and a directory holding any needs ``overwrite=True``); a kill at any
        instant leaves the old preset or the new one (:mod:`refopt.io.saving`)."""
        from refopt.io import saving
        from refopt.models.backbone import check_save_format, check_shard_size

        check_save_format(format)
        check_shard_size(max_shard_size)
        with saving.PresetSave(preset_dir, overwrite=overwrite, replaces=saving.WHOLE_PRESET,
                               what="preset") as staging:
            self.write_preset_files(staging, format, max_shard_size=max_shard_size)

    def write_preset_files(self, staging, format: str = "keras", max_shard_size=None) -> None:
        """Write every file of this model's preset into a :class:`refopt.io.saving.PresetSave`."""
        self.backbone.write_preset_files(staging, format, tasks=["CausalLM"],
                                         max_shard_size=max_shard_size)
        if format == "keras":
            task = self.serialize()
            task["config"]["backbone"] = self.backbone.config.to_keras()
            if not self.backbone.config.keras_compatible:
                # KerasHub cannot build this model: the task names refopt's class
                task.update(module=type(self).__module__,
                            registered_name=f"refopt>{self.keras_class_name}")
            if self.preprocessor is not None:
                self.preprocessor.write_preset_files(staging)
            staging.write_json("task.json", task)
        elif self.preprocessor is not None:
            self.preprocessor.write_transformers_files(staging)
