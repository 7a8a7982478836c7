"""``fit``, ``evaluate`` and ``predict`` for an ``OPTCausalLM``, with KerasHub's arguments.

The model object needs ``model.backbone.params`` (the parameter dict, updated in place by
training), ``model.backbone.config`` (an :class:`~refopt.config.OPTConfig`), ``model.preprocessor``
(``None`` or a callable ``strings -> (x, y, sample_weight)``) and ``model.optimizer`` (``None``
until the first ``fit``, which builds it from ``model.optimizer_spec``, what ``compile(optimizer=...)``
was given: ``"auto"`` is KerasHub's default, Adam with learning rate 2e-5).

What is reported (Keras 3 semantics, which KerasHub's ``CausalLM.compile`` defaults select:
``SparseCategoricalCrossentropy(from_logits=True)`` and ``weighted_metrics=[SparseCategoricalAccuracy()]``):

* the loss of a batch is ``sum(w * CE) / (B * S)``: Keras's default reduction
  ``"sum_over_batch_size"`` divides the weighted sum by the number of elements of the loss array,
  not by ``sum(w)`` (``keras/src/losses/loss.py``: ``reduce_weighted_values`` multiplies by the
  sample weights, ``reduce_values`` divides by the element count).  Training descends on exactly
  this loss, so its gradients (and what clipping sees) are KerasHub's;
* the ``loss`` of an epoch is Keras's loss tracker, a ``Mean`` updated once per batch with
  ``sample_weight = batch size`` (``keras/src/backend/jax/trainer.py``: ``_loss_tracker.update_state(
  loss, sample_weight=<batch size>)``): ``sum_i(B_i * loss_i) / sum_i(B_i)``;
* ``sparse_categorical_accuracy`` is a weighted ``Mean`` over the epoch: with ``[B, S]`` weights,
  Keras's ``reduce_to_samplewise_values`` (``keras/src/metrics/reduction_metrics.py``) reduces
  values and weights by a mean over the sequence axis, so the epoch's value is
  ``sum(w * hit) / sum(w)`` over every batch so far;
* ``val_loss`` / ``val_sparse_categorical_accuracy``: the same on ``validation_data`` at the end of
  each epoch (evaluation mode: no dropout).

Both trackers accumulate in float64.  The progress bar (verbose=1, tqdm) shows these running values.
``tests/test_training_keras.py`` checks these numbers, and the parameters after AdamW steps, against
Keras 3.15 itself.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref

import numpy as np

from refopt import backend
from refopt.errors import InputError, InputTypeError, TrainingError
from refopt.model import logits_forward
from refopt.ops.loss import accuracy
from refopt.tokenizers.inputs import is_strings
from refopt.training.gradients import Batch, check_batch, check_trainable, forward_backward
from refopt.training.history import History

DEFAULT_BATCH_SIZE = 32  # Keras's default when batch_size is None
ACCURACY = "sparse_categorical_accuracy"


# ------------------------------------------------------------------------------- data
def _check_batch_size(batch_size):
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: expected an integer >= 1 (or None for "
                         f"{DEFAULT_BATCH_SIZE})")
    return int(batch_size)


def _training_inputs(model, x, y, sample_weight, what="x"):
    """``(x dict, y, sample_weight)`` from strings (through the preprocessor) or from a dict."""
    if is_strings(x):
        preprocessor = getattr(model, "preprocessor", None)
        if preprocessor is None:
            raise InputTypeError(f"{what}: got strings, but this model has no preprocessor; pass "
                                 "{'token_ids', 'padding_mask'} arrays with y (and sample_weight), "
                                 "or attach an OPTCausalLMPreprocessor")
        if y is not None or sample_weight is not None:
            # KerasHub's CausalLMPreprocessor derives labels from the text and ignores these, warning
            warnings.warn(f"{what} is raw text: the preprocessor makes y and sample_weight from it; "
                          "the y / sample_weight given are ignored", stacklevel=3)
        strings = [x] if isinstance(x, str) else [str(s) for s in np.asarray(x, dtype=object).ravel()]
        x, y, sample_weight = preprocessor(strings)
    if not isinstance(x, dict):
        raise InputTypeError(f"{what}: expected strings or a dict with 'token_ids' and "
                             f"'padding_mask', got {type(x).__name__}")
    return x, y, sample_weight


def _rows(x) -> int:
    ids = np.asarray(x["token_ids"]) if isinstance(x, dict) and "token_ids" in x else None
    if ids is None or ids.ndim != 2:
        raise InputError("x['token_ids']: expected a 2-D array [batch, sequence]")
    return ids.shape[0]


def _slice(batch: Batch, idx) -> Batch:
    return Batch(*(a[idx] for a in batch))


def _unpack_validation(validation_data):
    """Keras's ``unpack_x_y_sample_weight``: a tuple ``(x,)``, ``(x, y)`` or ``(x, y, sw)``; strings
    or a dict alone are ``x``."""
    if isinstance(validation_data, tuple):
        if not 1 <= len(validation_data) <= 3:
            raise InputError(f"validation_data: a tuple of {len(validation_data)} items; expected "
                             "(x,), (x, y) or (x, y, sample_weight)")
        return tuple(validation_data) + (None,) * (3 - len(validation_data))
    return validation_data, None, None


def _model_parts(model):
    """``(params, config, ops)``: ops is the namespace of the model's backend (``backbone.ops``)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "params") or not hasattr(backbone, "config"):
        raise InputTypeError(f"expected an OPTCausalLM (with .backbone.params and .backbone.config), "
                             f"got {type(model).__name__}")
    ops = getattr(backbone, "ops", None) or backend.ops()
    return backbone.params, backbone.config, ops


def _optimizer(model):
    from refopt import optimizers

    opt = getattr(model, "optimizer", None)
    if opt is None or isinstance(opt, str):
        # compile() records what was asked for (CausalLM keeps it as optimizer_spec); the
        # optimizer object is made on first use and kept, so its state carries over between fits
        spec = opt if isinstance(opt, str) else getattr(model, "optimizer_spec", "auto")
        opt = optimizers.get(spec)
        model.optimizer = opt
    if not isinstance(opt, optimizers.Optimizer):
        raise TrainingError(f"model.optimizer is {type(opt).__name__}; expected a "
                            "refopt.optimizers.Optimizer (compile(optimizer=...))")
    return opt


def _apply(opt, grads, params, trainable, ops):
    # the optimizer's update of the trainable parameters, in place in `params`, on the model's ops
    if trainable is None:
        opt.apply(grads, params, ops=ops)
        return
    subset = {name: params[name] for name in trainable}
    opt.apply(grads, subset, ops=ops)
    params.update(subset)               # the optimizer may have replaced arrays by its own copies
    # (Parameters.update advances params.version)


def _verbosity(verbose):
    if verbose == "auto":
        return 1
    if verbose not in (0, 1, 2):
        raise InputError(f"verbose={verbose!r}: expected 'auto', 0, 1 or 2")
    return verbose


# ------------------------------------------------------------------------------- metrics
class _Mean:
    """Keras's ``Mean`` metric: ``total / count`` (0 when ``count`` is 0)."""

    def __init__(self):
        self.total = 0.0
        self.count = 0.0

    def update(self, total, count):
        self.total += float(total)
        self.count += float(count)

    def result(self) -> float:
        return self.total / self.count if self.count else 0.0


class _Trackers:
    def __init__(self):
        self.loss, self.acc = _Mean(), _Mean()

    def update(self, loss, logits, batch: Batch):
        w = batch.sample_weight.astype(np.float64)
        hits = accuracy(logits, batch.y).astype(np.float64)
        self.update_sums(loss, batch, (w * hits).sum(), w.sum())

    def update_sums(self, loss, batch: Batch, hit_sum, weight_sum):
        B, S = batch.y.shape
        self.loss.update(loss * B, B)                       # loss tracker: weight = batch size
        self.acc.update(hit_sum / S, weight_sum / S)        # reduce_to_samplewise_values, mean over S

    def logs(self, prefix=""):
        return {prefix + "loss": self.loss.result(), prefix + ACCURACY: self.acc.result()}


def _format(logs):
    return " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())


# ------------------------------------------------------------------------------- loops
#: backbone -> its DeviceTrainer: the device copy of a model's weights (and optimizer state) lives
#: as long as the backbone and is reused by the next fit / evaluate / predict while the host
#: parameters are the ones it holds (DeviceTrainer.holds); otherwise a new one is uploaded
_TRAINERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _device_trainer(model, optimizer=None, seed=None):
    """The model's :class:`refopt.training.device.DeviceTrainer` when it runs on the cuda backend
    and its architecture and optimizer run device-resident; else None (the step runs on the ops
    namespace, each op's operands copied to the device and back)."""
    params, cfg, ops = _model_parts(model)
    if getattr(ops, "NAME", None) != "cuda":
        return None
    from refopt.training.device import DeviceTrainer, blocker

    if blocker(cfg, optimizer) or getattr(model.backbone, "lora_enabled", False):
        return None                       # (LoRA: the device step trains every weight, not adapters)
    backbone = model.backbone
    trainer = _TRAINERS.get(backbone)
    if trainer is None or trainer.cfg is not cfg or not trainer.holds(params):
        trainer = _TRAINERS[backbone] = DeviceTrainer(params, cfg, optimizer, seed=seed)
    else:
        trainer.attach(optimizer, params)
        trainer.reseed(seed)
    return trainer


def _evaluate_batches(params, cfg, ops, batch: Batch, batch_size, progress=None,
                      trainer=None) -> _Trackers:
    trackers = _Trackers()
    n = batch.y.shape[0]
    for start in range(0, n, batch_size):
        b = _slice(batch, slice(start, start + batch_size))
        if trainer is not None:
            sums = trainer.evaluate(b)
            trackers.update_sums(sums.loss_sum / b.y.size, b, sums.hit_sum, sums.weight_sum)
        else:
            logits = logits_forward(params, cfg, b.token_ids, b.padding_mask, ops=ops)
            ce, _ = ops.cross_entropy_forward(logits, b.y)
            loss = float((b.sample_weight.astype(np.float64) * ce).sum() / ce.size)  # sum_over_batch_size
            trackers.update(loss, logits, b)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(trackers.logs(), refresh=False)
    return trackers


def fit(model, x=None, y=None, sample_weight=None, batch_size=None, epochs=1, shuffle=True,
        validation_data=None, verbose="auto", seed=None, initial_epoch=0) -> History:
    """Train ``model`` on ``x`` and return a :class:`History`, as KerasHub's ``CausalLM.fit``.

    x                strings (a list, or one string; the model's preprocessor turns them into
                     ``(x, y, sample_weight)``, as KerasHub does) or ``{"token_ids", "padding_mask"}``
                     arrays ``[N, S]`` with ``y`` ``[N, S]`` (next-token ids) and optional
                     ``sample_weight`` ``[N, S]``
    batch_size       rows per step (None: 32, Keras's default); the last batch may be smaller
    epochs           passes over the data; ``initial_epoch`` the epoch to start at (Keras)
    shuffle          reshuffle the rows before each epoch
    validation_data  ``(x, y)``, ``(x, y, sample_weight)``, a dict, or strings; evaluated after
                     each epoch into ``val_loss`` / ``val_sparse_categorical_accuracy``
    verbose          "auto" or 1: a tqdm progress bar per epoch with the running loss and accuracy;
                     2: one line per epoch; 0: silent
    seed             seeds the shuffling and the dropout masks (None: fresh entropy each call)

    Dropout (``config.dropout``) is active in these steps only.  A non-finite loss stops training
    with a :class:`refopt.errors.TrainingError` naming the epoch and step; the parameters are then
    those before that step.  The optimizer is ``model.optimizer``; the parameters in
    ``model.backbone.params`` are updated in place after every step (on its first update each
    entry is replaced by the optimizer's own copy, see :mod:`refopt.optimizers`).
    """
    params, cfg, ops = _model_parts(model)
    check_trainable(params, "model.backbone.params")
    batch_size = _check_batch_size(batch_size)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise InputError(f"epochs={epochs!r}: expected an integer >= 1")
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer)) or \
            not 0 <= initial_epoch < epochs:
        raise InputError(f"initial_epoch={initial_epoch!r}: expected an integer in [0, epochs)")
    verbose = _verbosity(verbose)
    opt = _optimizer(model)
    dtype = params["embed_tokens"].dtype

    x, y, sample_weight = _training_inputs(model, x, y, sample_weight)
    data = check_batch(cfg, x, y, sample_weight, dtype)
    val = None
    if validation_data is not None:
        vx, vy, vsw = _training_inputs(model, *_unpack_validation(validation_data), what="validation_data")
        val = check_batch(cfg, vx, vy, vsw, dtype)

    rng = np.random.default_rng(seed)
    dropout_seed = int(rng.integers(2 ** 63)) if cfg.dropout > 0 else None
    dropout_rng = np.random.default_rng(dropout_seed) if cfg.dropout > 0 else None
    # on the cuda backend the whole step runs device-resident (refopt.training.device) when it can
    trainer = _device_trainer(model, opt, seed=dropout_seed)
    n = data.y.shape[0]
    steps = math.ceil(n / batch_size)
    history = History(model=model, params={"verbose": verbose, "epochs": epochs, "steps": steps})
    try:
        _fit_epochs(model, opt, cfg, ops, data, val, rng, dropout_rng, trainer, batch_size, epochs,
                    initial_epoch, shuffle, steps, verbose, history)
    finally:
        if trainer is not None:                     # the device's parameters and state, back home
            trainer.download(model.backbone.params)     # new arrays: the version advances
            trainer.mark_synced(model.backbone.params)
    return history


def _fit_epochs(model, opt, cfg, ops, data, val, rng, dropout_rng, trainer, batch_size, epochs,
                initial_epoch, shuffle, steps, verbose, history):
    n = data.y.shape[0]
    # LoRA (backbone.enable_lora): only the adapters train; every other weight stays as it is
    trainable = getattr(model.backbone, "trainable_names", lambda: None)()
    for epoch in range(initial_epoch, epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        trackers = _Trackers()
        progress = None
        if verbose == 1:
            from tqdm.auto import tqdm

            progress = tqdm(total=steps, desc=f"Epoch {epoch + 1}/{epochs}", unit="step",
                            file=sys.stdout, leave=True, dynamic_ncols=True)
        try:
            for step in range(steps):
                b = _slice(data, order[step * batch_size:(step + 1) * batch_size])
                if trainer is not None:
                    sums = trainer.step(b, b.y.size)        # the update is skipped on a bad loss
                    loss = sums.loss_sum / b.y.size
                else:
                    res = forward_backward(model.backbone.params, cfg, b, dropout_rng=dropout_rng,
                                           reduction="sum_over_batch_size", ops=ops, trainable=trainable)
                    loss = res.loss
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss ({loss}) at epoch {epoch + 1}, step {step + 1} of "
                        f"{steps} (optimizer update {opt.iterations + 1}); training stopped before "
                        "applying this step's update")
                if trainer is not None:
                    trackers.update_sums(loss, b, sums.hit_sum, sums.weight_sum)
                else:
                    _apply(opt, res.grads, model.backbone.params, trainable, ops)
                    trackers.update(res.loss, res.logits, b)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(trackers.logs(), refresh=False)
            logs = trackers.logs()
            if val is not None:
                logs.update(_evaluate_batches(model.backbone.params, cfg, ops, val, batch_size,
                                              trainer=trainer).logs("val_"))
            if progress is not None:
                progress.set_postfix(logs, refresh=True)
        finally:
            if progress is not None:
                progress.close()
        if verbose == 2:
            print(f"Epoch {epoch + 1}/{epochs} - {steps} steps - {_format(logs)}", flush=True)
        history.append(epoch, logs)


def evaluate(model, x=None, y=None, sample_weight=None, batch_size=None, verbose="auto",
             return_dict=False):
    """Loss and accuracy of ``model`` on ``x`` (evaluation mode), reduced as :func:`fit` reports
    them: ``[loss, sparse_categorical_accuracy]``, or a dict with ``return_dict=True`` (Keras)."""
    params, cfg, ops = _model_parts(model)
    batch_size = _check_batch_size(batch_size)
    verbose = _verbosity(verbose)
    x, y, sample_weight = _training_inputs(model, x, y, sample_weight)
    data = check_batch(cfg, x, y, sample_weight, params["embed_tokens"].dtype)
    steps = math.ceil(data.y.shape[0] / batch_size)
    progress = None
    if verbose == 1:
        from tqdm.auto import tqdm

        progress = tqdm(total=steps, desc="Evaluate", unit="step", file=sys.stdout, leave=True)
    try:
        logs = _evaluate_batches(params, cfg, ops, data, batch_size, progress,
                                 trainer=_device_trainer(model)).logs()
    finally:
        if progress is not None:
            progress.close()
    if verbose == 2:
        print(f"{steps} steps - {_format(logs)}", flush=True)
    return logs if return_dict else [logs["loss"], logs[ACCURACY]]


def predict(model, x, batch_size=None, verbose="auto"):
    """Logits ``[N, S, V]`` (the model's dtype) for ``x``: strings (through the preprocessor, whose
    ``y`` and ``sample_weight`` are dropped) or ``{"token_ids", "padding_mask"}``; evaluation mode."""
    params, cfg, ops = _model_parts(model)
    batch_size = _check_batch_size(batch_size)
    verbose = _verbosity(verbose)
    x, _, _ = _training_inputs(model, x, None, None)
    n = _rows(x)
    dummy_y = np.zeros_like(np.asarray(x["token_ids"]), dtype=np.int64)
    data = check_batch(cfg, x, dummy_y, None, params["embed_tokens"].dtype)
    steps = math.ceil(n / batch_size)
    progress = None
    if verbose == 1:
        from tqdm.auto import tqdm

        progress = tqdm(total=steps, desc="Predict", unit="step", file=sys.stdout, leave=True)
    out = []
    trainer = _device_trainer(model)
    try:
        for start in range(0, n, batch_size):
            b = _slice(data, slice(start, start + batch_size))
            if trainer is not None:
                out.append(trainer.logits(b))
            else:
                out.append(logits_forward(params, cfg, b.token_ids, b.padding_mask, ops=ops))
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
    return np.concatenate(out, axis=0)


def loss_and_gradients_for_model(model, x, y=None, sample_weight=None, naming="refopt"):
    """``(loss, grads)`` of ``model`` on one batch, in evaluation mode (no dropout), with the loss
    ``sum(sample_weight * CE) / sum(sample_weight)`` (see :mod:`refopt.training.gradients`).

    ``naming="huggingface"`` keys and shapes ``grads`` like transformers' ``OPTForCausalLM`` state
    dict (``[out, in]`` weights; ``embed_positions`` with its two offset rows, whose gradient is
    zero); ``"refopt"`` (default) uses refopt's own names.  Strings go through the preprocessor.
    """
    from refopt.io.huggingface import grads_to_huggingface
    from refopt.training.gradients import loss_and_gradients

    if naming not in ("refopt", "huggingface"):
        raise InputError(f"naming={naming!r}: expected 'refopt' or 'huggingface'")
    params, cfg, ops = _model_parts(model)
    x, y, sample_weight = _training_inputs(model, x, y, sample_weight)
    loss, grads = loss_and_gradients(params, cfg, x, y, sample_weight, ops=ops)
    if naming == "huggingface":
        grads = grads_to_huggingface(grads, cfg)
    return loss, grads
