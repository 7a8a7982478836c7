"""Learning-rate schedules, with Keras 3's names, arguments and formulas
(``keras/src/optimizers/schedules/learning_rate_schedule.py``).

A constant learning rate is a plain float passed as ``learning_rate``.  :class:`CosineDecay` with
``warmup_target`` and ``warmup_steps`` is the linear warm-up followed by cosine decay; with
``alpha=1.0`` it is a linear warm-up followed by a constant rate.

A schedule is called with the optimizer's raw step counter (the number of ``apply`` calls so far,
which with gradient accumulation counts every micro-batch, as Keras does).
"""

from __future__ import annotations

import math

from refopt.errors import TrainingError


class LearningRateSchedule:
    """Base class: ``schedule(step) -> learning rate`` (a Python float)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError


def _check_number(name, value, *, positive=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrainingError(f"{name}={value!r}: expected a finite number")
    if positive and value <= 0:
        raise TrainingError(f"{name}={value!r}: expected a positive number")
    if value < 0:
        raise TrainingError(f"{name}={value!r}: expected a number >= 0")


class CosineDecay(LearningRateSchedule):
    """Keras's ``CosineDecay``: optional linear warm-up, then cosine decay.

    Without ``warmup_target``: ``lr(step) = initial_learning_rate * ((1 - alpha) * c + alpha)`` with
    ``c = 0.5 * (1 + cos(pi * min(step, decay_steps) / decay_steps))``.

    With ``warmup_target``: for ``step < warmup_steps`` the rate rises linearly,
    ``initial_learning_rate + (warmup_target - initial_learning_rate) * step / warmup_steps``; then it
    decays from ``warmup_target`` as above over ``step - warmup_steps`` (clipped at ``decay_steps``).
    """

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name="CosineDecay",
                 warmup_target=None, warmup_steps=0):
        _check_number("initial_learning_rate", initial_learning_rate)
        _check_number("warmup_target", warmup_target, allow_none=True)
        _check_number("alpha", alpha)
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps <= 0:
            raise TrainingError(f"decay_steps={decay_steps!r}: expected an integer > 0")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise TrainingError(f"warmup_steps={warmup_steps!r}: expected an integer >= 0")
        if warmup_target is not None and warmup_steps == 0:
            raise TrainingError("warmup_steps=0 with a warmup_target: give the number of warm-up steps")
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.alpha = alpha
        self.name = name
        self.warmup_target = warmup_target
        self.warmup_steps = warmup_steps

    def _decay(self, step, decay_from):
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / self.decay_steps))
        return decay_from * ((1.0 - self.alpha) * cosine + self.alpha)

    def __call__(self, step: int) -> float:
        step = float(step)
        if self.warmup_target is None:
            return self._decay(min(step, self.decay_steps), self.initial_learning_rate)
        step = min(step, self.decay_steps + self.warmup_steps)
        if step < self.warmup_steps:
            delta = self.warmup_target - self.initial_learning_rate
            return delta * (step / self.warmup_steps) + self.initial_learning_rate
        return self._decay(step - self.warmup_steps, self.warmup_target)

    def get_config(self) -> dict:
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "alpha": self.alpha, "name": self.name, "warmup_target": self.warmup_target,
                "warmup_steps": self.warmup_steps}
