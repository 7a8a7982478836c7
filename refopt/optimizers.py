"""Adam and AdamW over refopt's flat parameter dicts, with Keras 3's arguments, defaults and update
rules (``keras/src/optimizers/{base_optimizer,adam,adamw}.py``).

    opt = refopt.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.01, global_clipnorm=1.0)
    opt.apply(grads, params, ops=lm.backbone.ops)   # updates `params` (new arrays under the same keys)
    lm.compile(optimizer=opt)           # or "auto" (Adam, learning rate 2e-5, as KerasHub)

One ``apply`` call, as Keras's ``BaseOptimizer.apply``:

1. with ``gradient_accumulation_steps = n``: the gradients are added to accumulators, and only
   every n-th call updates the parameters, with the *mean* of the n gradients;
2. clipping: ``clipnorm`` (each tensor), ``global_clipnorm`` (all together) or ``clipvalue``;
3. decoupled weight decay (``weight_decay``; AdamW's default 0.004):
   ``var <- var - var * weight_decay * lr``, skipping the names matched by
   :meth:`Optimizer.exclude_from_weight_decay`;
4. the Adam step, with ``t = iterations + 1``::

       m <- m + (g - m) * (1 - beta_1)
       v <- v + (g*g - v) * (1 - beta_2)          (amsgrad: v_hat <- max(v_hat, v), used for v)
       var <- var - m * alpha / (sqrt(v) + epsilon),   alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)

Keras's ``epsilon`` is the paper's "epsilon hat": it is added to ``sqrt(v)`` *before* the bias
correction is folded in, whereas ``torch.optim.Adam(W)`` adds its ``eps`` to
``sqrt(v) / sqrt(1 - beta_2**t)``.  Both are implemented faithfully to Keras here; the two agree
exactly when ``epsilon_keras = eps_torch * sqrt(1 - beta_2**t)`` (so for a single step at t=1 with
``epsilon = eps * sqrt(1 - beta_2)``), or with epsilon 0, and otherwise differ by O(epsilon) in
the denominator.  ``tests/test_optimizers.py`` checks both coincidences against torch in float64.

Numbers: hyperparameters are Python floats, used at full precision (Keras keeps a float32 learning
rate variable; here the learning rate is not rounded); the update is computed in each parameter's
dtype; moments have the parameter's dtype.

Memory: parameters are updated in place, but only in arrays this optimizer allocated: on its first
update a parameter is copied into an array of its own (so memory-mapped checkpoint weights, views
and arrays shared with another model are never written to), and the dict entry is replaced by
that copy.  A :class:`refopt.model.Parameters` dict (a model's ``backbone.params``) has its
``version`` advanced by each update.

Ops: the update runs on the ops namespace passed to ``apply`` (``fit`` passes the model's
``backbone.ops``; default the current backend's): ``ops.adam_update`` is the NumPy reference
(:mod:`refopt.ops.adam`) or a backend's fused pass (:mod:`refopt.kernels.cpu.optim`: weight
decay and the Adam step in one compiled parallel pass), the same arithmetic in the same order, bit
for bit.

Learning rate: a positive float (constant), a :class:`LearningRateSchedule`
(:class:`schedules.CosineDecay`, called with the raw call count, as Keras), or a callable taking no
arguments.  ``iterations`` counts parameter updates (calls divided by the accumulation steps).
"""

from __future__ import annotations

import math
import re

import numpy as np

import inspect

from refopt import backend
from refopt.errors import TrainingError
from refopt.training import schedules  # noqa: F401  (refopt.optimizers.schedules.CosineDecay)
from refopt.training.clipping import clip_by_global_norm, clip_by_norm, clip_by_value
from refopt.training.schedules import LearningRateSchedule


def _check_float(name, value, low=None, high=None, low_open=False, high_open=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrainingError(f"{name}={value!r}: expected a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise TrainingError(f"{name}={value!r}: expected a number {'>' if low_open else '>='} {low}")
    if high is not None and (value > high or (high_open and value == high)):
        raise TrainingError(f"{name}={value!r}: expected a number {'<' if high_open else '<='} {high}")


def check_learning_rate(learning_rate):
    """Raise :class:`TrainingError` unless ``learning_rate`` is a positive finite number, a
    schedule or a callable."""
    if isinstance(learning_rate, LearningRateSchedule) or callable(learning_rate):
        return
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
        raise TrainingError(f"learning_rate={learning_rate!r}: expected a positive float, a "
                            "refopt.optimizers.schedules schedule, or a callable")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise TrainingError(f"learning_rate={learning_rate!r}: the learning rate must be a positive "
                            "finite number")


class Optimizer:
    """Base class: learning rate, clipping, weight decay and gradient accumulation (Keras's
    ``BaseOptimizer``); subclasses implement :meth:`build_slots` and :meth:`update_step`."""

    def __init__(self, learning_rate, weight_decay=None, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, gradient_accumulation_steps=None, name=None):
        check_learning_rate(learning_rate)
        if weight_decay is not None:
            _check_float("weight_decay", weight_decay, low=0)
        for arg, value in (("clipnorm", clipnorm), ("clipvalue", clipvalue),
                           ("global_clipnorm", global_clipnorm)):
            if value is not None:
                _check_float(arg, value, low=0, low_open=True)
        if sum(v is not None for v in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise TrainingError(f"only one of clipnorm, clipvalue and global_clipnorm can be set; got "
                                f"clipnorm={clipnorm}, clipvalue={clipvalue}, "
                                f"global_clipnorm={global_clipnorm}")
        if gradient_accumulation_steps is not None and (
                isinstance(gradient_accumulation_steps, bool)
                or not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 2):
            raise TrainingError(f"gradient_accumulation_steps={gradient_accumulation_steps!r}: "
                                "expected an integer >= 2 (or None)")
        self._learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.name = name or type(self).__name__.lower()
        self._iterations = 0          # apply() calls so far
        self._exclude_pattern = None
        self._names: tuple[str, ...] | None = None
        self._accumulators: dict[str, np.ndarray] = {}
        self._slots: dict[str, dict[str, np.ndarray]] = {}
        self._owned: dict[str, np.ndarray] = {}   # the parameter arrays this optimizer allocated
        self._ops = None                          # the ops namespace of the update in progress

    # ---------------------------------------------------------------- state
    @property
    def iterations(self) -> int:
        """Parameter updates made so far (``apply`` calls // accumulation steps, as Keras)."""
        if self.gradient_accumulation_steps:
            return self._iterations // self.gradient_accumulation_steps
        return self._iterations

    @property
    def apply_count(self) -> int:
        """``apply`` calls so far (each accumulation step counts)."""
        return self._iterations

    def count_apply(self) -> None:
        """Count one ``apply`` made elsewhere (the device trainer's update on the GPU)."""
        self._iterations += 1

    @property
    def built(self) -> bool:
        """Whether :meth:`build` (or :meth:`restore`) gave it state for a set of parameters."""
        return self._names is not None

    def slots(self, name: str) -> dict[str, np.ndarray]:
        """The state arrays of parameter ``name`` (Adam: ``m``, ``v``, ``v_hat`` with AMSGrad)."""
        return self._slots[name]

    def accumulator(self, name: str) -> np.ndarray:
        """The gradient accumulated for ``name`` (with ``gradient_accumulation_steps``)."""
        return self._accumulators[name]

    def restore(self, names, owned: dict, slots: dict, accumulators: dict | None = None) -> None:
        """Take state computed elsewhere (the device trainer's download): ``names`` the parameters
        it updates, ``owned`` the parameter arrays it now owns, ``slots`` / ``accumulators`` by
        parameter name."""
        self._names = tuple(names)
        self._owned = dict(owned)
        self._slots = dict(slots)
        if accumulators is not None:
            self._accumulators = dict(accumulators)

    @property
    def learning_rate(self) -> float:
        """The learning rate the next update uses."""
        lr = self._learning_rate
        if isinstance(lr, LearningRateSchedule):
            return float(lr(self._iterations))
        if callable(lr):
            return float(lr())
        return float(lr)

    @learning_rate.setter
    def learning_rate(self, value):
        if isinstance(self._learning_rate, LearningRateSchedule) and not isinstance(
                value, LearningRateSchedule):
            raise TrainingError("this optimizer was created with a learning-rate schedule; its "
                                "learning rate cannot be set to a number")
        check_learning_rate(value)
        self._learning_rate = value

    def exclude_from_weight_decay(self, var_names=None):
        """Skip weight decay for parameters whose name contains a match of any regular expression
        in ``var_names`` (Keras: ``re.search`` on the variable name), e.g. ``["bias", "gamma",
        "beta"]``.  Must be called before the first update."""
        if self._names is not None:
            raise TrainingError("exclude_from_weight_decay() must be called before the optimizer's "
                                "first update")
        self._exclude_pattern = re.compile("|".join(sorted(set(var_names)))) if var_names else None

    def uses_weight_decay(self, name: str) -> bool:
        """Whether parameter ``name`` is decayed (see :meth:`exclude_from_weight_decay`)."""
        return self._exclude_pattern is None or self._exclude_pattern.search(name) is None

    def build(self, params: dict):
        """Create the optimizer's state (zeros) for these parameters."""
        self._names = tuple(params)
        if self.gradient_accumulation_steps:
            self._accumulators = {k: np.zeros_like(v) for k, v in params.items()}
        self._slots = {k: self.build_slots(v) for k, v in params.items()}

    def build_slots(self, var: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def update_step(self, grad, var, lr: float, slots: dict) -> np.ndarray:
        """The new value of ``var``: ``var`` (an array this optimizer owns) and ``slots`` are updated
        in place and ``var`` is returned.  An override may take a ``decay`` keyword (the weight
        decay factor ``weight_decay * lr`` of this parameter, 0 for none) to apply the decay in its
        own pass; otherwise ``apply`` applies it first.  The ops to run on are :attr:`ops`."""
        raise NotImplementedError

    @property
    def ops(self):
        """The ops namespace of the update in progress (``apply``'s ``ops``); outside an update,
        the current backend's."""
        return self._ops if self._ops is not None else backend.ops()

    def _own(self, params: dict, name: str) -> np.ndarray:
        """``params[name]`` as an array this optimizer allocated (copied on first use)."""
        var = params[name]
        if self._owned.get(name) is not var:
            var = np.array(var, copy=True, order="C")
            self._owned[name] = params[name] = var
        return var

    # ---------------------------------------------------------------- the update
    def _clip(self, grads: dict) -> dict:
        if self.clipnorm:
            return {k: clip_by_norm(g, self.clipnorm) for k, g in grads.items()}
        if self.global_clipnorm:
            return clip_by_global_norm(grads, self.global_clipnorm)
        if self.clipvalue:
            return {k: clip_by_value(g, self.clipvalue) for k, g in grads.items()}
        return grads

    def apply(self, grads: dict, params: dict, ops=None) -> dict:
        """Update ``params`` (a dict name -> array) with ``grads`` (same keys and shapes), in place
        (see the module docstring: arrays the optimizer did not allocate are copied first, and the
        dict then holds the copies); the dict is also returned.  ``ops``: the ops namespace the
        update runs on (a model's ``backbone.ops``; default the current backend's)."""
        if self._names is None:
            self.build(params)
        if set(grads) != set(self._names) or set(params) != set(self._names):
            missing = sorted(set(self._names) ^ set(grads)) or sorted(set(self._names) ^ set(params))
            raise TrainingError(f"{self.name}: the gradients/parameters do not match the variables "
                                f"this optimizer was built with (differing names: {missing[:5]}); "
                                "use a new optimizer for a different model")
        for k, g in grads.items():
            if g.shape != params[k].shape:
                raise TrainingError(f"{self.name}: gradient {k} has shape {list(g.shape)}, the "
                                    f"parameter has {list(params[k].shape)}")
        steps = self.gradient_accumulation_steps
        if steps:
            is_update = (self._iterations + 1) % steps == 0
            if not is_update:
                for k, g in grads.items():
                    self._accumulators[k] += g
                self._iterations += 1
                return params
            grads = {k: (g + self._accumulators[k]) / g.dtype.type(steps) for k, g in grads.items()}
        grads = self._clip(grads)
        lr = self.learning_rate
        self._ops = backend.ops() if ops is None else ops
        folds_decay = "decay" in inspect.signature(self.update_step).parameters
        try:
            for k in self._names:
                var = self._own(params, k)
                decay = self.weight_decay * lr if self.weight_decay and self.uses_weight_decay(k) else 0.0
                grad = grads[k].astype(var.dtype, copy=False)
                if folds_decay:
                    params[k] = self.update_step(grad, var, lr, self._slots[k], decay=decay)
                    continue
                if decay:
                    var -= var * var.dtype.type(decay)                  # var - var * weight_decay * lr
                params[k] = self.update_step(grad, var, lr, self._slots[k])
        finally:
            self._ops = None
        if steps:
            for acc in self._accumulators.values():
                acc[...] = 0
        self._iterations += 1
        if hasattr(params, "touch"):
            params.touch()               # a model's Parameters: copies elsewhere are now stale
        return params

    def get_config(self) -> dict:
        lr = self._learning_rate
        return {"name": self.name,
                "learning_rate": lr.get_config() if isinstance(lr, LearningRateSchedule) else lr,
                "weight_decay": self.weight_decay, "clipnorm": self.clipnorm,
                "global_clipnorm": self.global_clipnorm, "clipvalue": self.clipvalue,
                "gradient_accumulation_steps": self.gradient_accumulation_steps}


class Adam(Optimizer):
    """Adam with Keras's defaults: ``learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
    amsgrad=False`` (no weight decay unless ``weight_decay`` is given)."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 gradient_accumulation_steps=None, name="adam"):
        super().__init__(learning_rate, weight_decay=weight_decay, clipnorm=clipnorm,
                         clipvalue=clipvalue, global_clipnorm=global_clipnorm,
                         gradient_accumulation_steps=gradient_accumulation_steps, name=name)
        _check_float("beta_1", beta_1, low=0, high=1)
        _check_float("beta_2", beta_2, low=0, high=1)
        _check_float("epsilon", epsilon, low=0)
        self.beta_1, self.beta_2, self.epsilon, self.amsgrad = beta_1, beta_2, epsilon, bool(amsgrad)

    def build_slots(self, var):
        slots = {"m": np.zeros_like(var), "v": np.zeros_like(var)}
        if self.amsgrad:
            slots["v_hat"] = np.zeros_like(var)
        return slots

    def alpha(self, lr):
        """The step size of the next update, Adam's bias corrections folded in."""
        t = self.iterations + 1
        return lr * math.sqrt(1.0 - self.beta_2 ** t) / (1.0 - self.beta_1 ** t)

    def update_step(self, grad, var, lr, slots, decay=0.0):
        # weight decay and the Adam step in one call of the ops' adam_update (refopt.ops.adam)
        self.ops.adam_update(var, grad, slots["m"], slots["v"], slots.get("v_hat"), decay,
                             self.beta_1, self.beta_2, self.alpha(lr), self.epsilon)
        return var

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon, "amsgrad": self.amsgrad}


class AdamW(Adam):
    """AdamW with Keras's defaults: Adam's, plus ``weight_decay=0.004`` (decoupled)."""

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 gradient_accumulation_steps=None, name="adamw"):
        if weight_decay is None:
            raise TrainingError("AdamW: weight_decay must be a float, got None")
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=amsgrad, weight_decay=weight_decay, clipnorm=clipnorm,
                         clipvalue=clipvalue, global_clipnorm=global_clipnorm,
                         gradient_accumulation_steps=gradient_accumulation_steps, name=name)


def get(identifier) -> Optimizer:
    """An optimizer from what ``compile(optimizer=...)`` accepts: ``"auto"`` (Adam with learning
    rate 2e-5, KerasHub's ``CausalLM.compile`` default), ``"adam"`` / ``"adamw"`` (Keras defaults), or
    an :class:`Optimizer` instance (returned as is)."""
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key == "auto":
            return Adam(learning_rate=2e-5)
        if key == "adam":
            return Adam()
        if key == "adamw":
            return AdamW()
        raise TrainingError(f"optimizer={identifier!r}: expected 'auto', 'adam', 'adamw' or a "
                            "refopt.optimizers.Optimizer instance")
    raise TrainingError(f"optimizer={identifier!r}: expected 'auto', 'adam', 'adamw' or a "
                        "refopt.optimizers.Optimizer instance")
