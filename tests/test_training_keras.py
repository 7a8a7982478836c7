"""What refopt's training reports and how it updates, against Keras 3 itself (needs `keras` with a
backend; skipped otherwise).  Keras runs in a subprocess (its torch backend when torch is there).

The model is a bigram table (logits = an embedding of the current token), small enough that refopt
can mirror Keras's training exactly with the same pieces ``refopt.training.fit`` composes: the
cross-entropy and its backward (``refopt.ops.loss``), Keras's ``"sum_over_batch_size"`` reduction,
the epoch trackers of ``refopt.training.loop``, and ``refopt.optimizers.AdamW`` with a warm-up +
cosine schedule, global-norm clipping and gradient accumulation.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refopt.ops.loss import cross_entropy_backward, cross_entropy_forward
from refopt.optimizers import AdamW
from refopt.training.gradients import Batch
from refopt.training.loop import _Trackers
from refopt.training.schedules import CosineDecay

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None,
                                reason="needs keras 3 (pip install keras) to compare with")

V, S, N, BATCH, EPOCHS = 7, 4, 5, 2, 3
OPT = dict(weight_decay=0.01, global_clipnorm=0.5, gradient_accumulation_steps=2)
SCHEDULE = dict(initial_learning_rate=0.0, decay_steps=6, alpha=0.1, warmup_target=0.2, warmup_steps=3)

KERAS_SCRIPT = r"""
import json, os, sys
import numpy as np
import keras
d = np.load(sys.argv[1])
opt_kw, sched_kw = json.loads(sys.argv[2]), json.loads(sys.argv[3])
ids, y, sw, table = d["ids"], d["y"], d["sw"], d["table"]
inp = keras.Input((ids.shape[1],), dtype="int32")
emb = keras.layers.Embedding(table.shape[0], table.shape[1],
                             embeddings_initializer=keras.initializers.Constant(table))
model = keras.Model(inp, emb(inp))
schedule = keras.optimizers.schedules.CosineDecay(**sched_kw)
model.compile(optimizer=keras.optimizers.AdamW(learning_rate=schedule, **opt_kw),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()])
before = model.evaluate(ids, y, sample_weight=sw, batch_size=int(sys.argv[5]), verbose=0, return_dict=True)
hist = model.fit(ids, y, sample_weight=sw, batch_size=int(sys.argv[5]), epochs=int(sys.argv[6]),
                 shuffle=False, verbose=0)
np.savez(sys.argv[4], table=keras.ops.convert_to_numpy(emb.embeddings),
         eval_loss=before["loss"], eval_acc=before["sparse_categorical_accuracy"],
         loss=np.array(hist.history["loss"]), acc=np.array(hist.history["sparse_categorical_accuracy"]))
"""


def _data():
    rng = np.random.default_rng(0)
    ids, y = rng.integers(0, V, (N, S)), rng.integers(0, V, (N, S))
    sw = (rng.random((N, S)) * (rng.random((N, S)) > 0.3)).astype(np.float32)
    table = (rng.standard_normal((V, V))).astype(np.float32)
    return ids, y, sw, table


def _run_keras(tmp_path, ids, y, sw, table):
    path = tmp_path / "in.npz"
    np.savez(path, ids=ids, y=y, sw=sw, table=table)
    env = dict(os.environ)
    if "KERAS_BACKEND" not in env and importlib.util.find_spec("torch") is not None:
        env["KERAS_BACKEND"] = "torch"
    out = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, "-c", KERAS_SCRIPT, str(path), json.dumps(OPT),
                           json.dumps(SCHEDULE), str(out), str(BATCH), str(EPOCHS)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


def _batches(ids, y, sw):
    for s in range(0, N, BATCH):
        yield slice(s, s + BATCH), Batch(ids[s:s + BATCH], np.ones_like(ids[s:s + BATCH], bool),
                                         y[s:s + BATCH], sw[s:s + BATCH])


def test_reported_loss_accuracy_and_updates_equal_keras(tmp_path):
    ids, y, sw, table = _data()
    keras_out = _run_keras(tmp_path, ids, y, sw, table)

    params = {"table": table.copy()}
    # evaluate before training
    ev = _Trackers()
    for b, batch in _batches(ids, y, sw):
        logits = params["table"][ids[b]]
        ce, _ = cross_entropy_forward(logits, y[b])
        ev.update(float((sw[b] * ce).sum() / ce.size), logits, batch)
    assert ev.loss.result() == pytest.approx(float(keras_out["eval_loss"]), rel=1e-6)
    assert ev.acc.result() == pytest.approx(float(keras_out["eval_acc"]), rel=1e-6)
    # the fixtures' mean over weights would be a different number: Keras divides by B * S
    assert abs(ev.loss.result() - float((sw * cross_entropy_forward(table[ids], y)[0]).sum() / sw.sum())) > 0.1

    opt = AdamW(learning_rate=CosineDecay(**SCHEDULE), **OPT)
    losses, accs = [], []
    for _ in range(EPOCHS):
        tr = _Trackers()
        for b, batch in _batches(ids, y, sw):
            logits = params["table"][ids[b]]                                   # [B, S, V]
            ce, probs = cross_entropy_forward(logits, y[b])
            loss = float((sw[b] * ce).sum() / ce.size)                         # sum_over_batch_size
            d_logits = cross_entropy_backward(sw[b] / np.float32(ce.size), probs, y[b])
            grad = np.zeros_like(params["table"])
            np.add.at(grad, ids[b].ravel(), d_logits.reshape(-1, V))
            opt.apply({"table": grad}, params)
            tr.update(loss, logits, batch)
        losses.append(tr.loss.result())
        accs.append(tr.acc.result())
    np.testing.assert_allclose(losses, keras_out["loss"], rtol=1e-5)
    np.testing.assert_allclose(accs, keras_out["acc"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(params["table"], keras_out["table"], rtol=0, atol=2e-5)
    assert np.abs(params["table"] - table).max() > 0.1  # it did train
