"""The record ``fit`` returns, shaped like Keras's ``History`` callback."""

from __future__ import annotations


class History:
    """``history.history``: metric name -> one value per epoch (``loss``,
    ``sparse_categorical_accuracy`` and, with validation data, their ``val_`` forms);
    ``history.epoch``: the epoch indices (0-based); ``history.params``: ``verbose``, ``epochs``,
    ``steps`` (per epoch); ``history.model``: the trained model."""

    def __init__(self, model=None, params=None):
        self.model = model
        self.params = dict(params or {})
        self.epoch: list[int] = []
        self.history: dict[str, list[float]] = {}

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))

    def __repr__(self):
        last = {k: round(v[-1], 4) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"
