"""Training: the loss and its gradients, optimizers' helpers, and the fit / evaluate / predict loops.

    loss, grads = refopt.training.loss_and_gradients(params, cfg, x, y, sample_weight)
    history = refopt.training.fit(lm, x=["The quick brown fox."], batch_size=2, epochs=3)

Optimizers live in :mod:`refopt.optimizers` (Adam, AdamW, with Keras's arguments); schedules in
:mod:`refopt.training.schedules` (also ``refopt.optimizers.schedules``); clipping in
:mod:`refopt.training.clipping`.
"""

from refopt.training.clipping import clip_by_global_norm, clip_by_norm, global_norm  # noqa: F401
from refopt.training.gradients import (  # noqa: F401
    check_batch,
    forward_backward,
    loss_and_gradients,
)
from refopt.training.history import History  # noqa: F401
from refopt.training.loop import (  # noqa: F401
    evaluate,
    fit,
    loss_and_gradients_for_model,
    predict,
)
from refopt.training.schedules import CosineDecay, LearningRateSchedule  # noqa: F401
