"""refopt's dtype policies against KerasHub's own (JAX backend, in a subprocess): the same random
tiny model under each policy and attention path gives the same logits, bit for bit at nearly
every real position (a float32 summation-order tie can flip one rounding), where refopt computing
in plain float32 differs in most (needs the `keras` extra and jax)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refopt.models import OPTBackbone, OPTCausalLM

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras_hub") is None
                                or importlib.util.find_spec("jax") is None,
                                reason="needs keras-hub and jax (pip install -e '.[keras]')")

KERAS_SCRIPT = r"""
import os, sys, json
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.modules["tensorflow"] = None    # unused under JAX; keras_hub imports it when found (5 CPU-s)
import numpy as np, keras, keras_hub
preset, out = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
bb = keras_hub.models.OPTBackbone(vocabulary_size=53, num_layers=2, num_heads=2, hidden_dim=16,
                                  intermediate_dim=32, max_sequence_length=16)
rng = np.random.default_rng(0)
for w in bb.weights:
    w.assign(rng.standard_normal(w.shape).astype("float32") * (0.2 if w.path.endswith("gamma") else 0.5)
             + (1.0 if w.path.endswith("gamma") else 0.0))
bb.save_to_preset(preset)
x = dict(np.load(out + ".in.npz"))
res = {}
for case in json.loads(sys.argv[3]):
    policy, dropout = case
    m = keras_hub.models.OPTBackbone.from_preset(preset, dtype=policy, dropout=dropout)
    res[f"{policy}/{dropout}"] = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(
        m.token_embedding(m(x), reverse=True), "float32")))
np.savez(out, **res)
"""

IDS = np.array([[2, 5, 9, 11, 3, 7, 8, 1], [2, 4, 6, 1, 1, 1, 1, 1]], np.int32)
MASK = np.array([[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
SPACING = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
# both dtypes, both variable dtypes and both attention paths (dropout > 0: Keras's explicit softmax in
# the compute dtype; dropout 0: jax.nn.dot_product_attention); every combination, at a larger size,
# in benchmarks/dtype_policy_agreement.py
CASES = [("bfloat16", 0.1), ("mixed_bfloat16", 0.0), ("float16", 0.0), ("mixed_float16", 0.1)]


@pytest.fixture(scope="module")
def keras_logits(tmp_path_factory):
    # KerasHub runs once per test run: under xdist the workers share this run's temporary root,
    # and the first to take the lock computes for all (pytest-xdist's "execute only once" recipe)
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    tmp = root / "dtype_policies_keras"
    out = str(tmp / "out")
    with open(root / "dtype_policies_keras.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(out + ".npz"):
            tmp.mkdir(exist_ok=True)
            np.savez(out + ".in.npz", token_ids=IDS, padding_mask=MASK)
            proc = subprocess.run([sys.executable, "-c", KERAS_SCRIPT, str(tmp / "preset"), out,
                                   json.dumps(CASES)], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
            assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "preset", dict(np.load(out + ".npz"))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("policy,dropout", CASES)
def test_policy_matches_keras_hub(keras_logits, policy, dropout, backend):
    preset, theirs = keras_logits
    real = MASK.astype(bool)
    ref = theirs[f"{policy}/{dropout}"][real]
    bb = OPTBackbone.from_preset(preset, dtype=policy, backend=backend)
    bb.config.dropout = dropout
    ours = np.asarray(OPTCausalLM(bb)({"token_ids": IDS, "padding_mask": MASK}), np.float32)[real]
    spacing = SPACING[bb.compute_dtype]
    assert np.mean(ours == ref) >= 0.9, json.dumps({"bit_equal": float(np.mean(ours == ref))})
    assert np.abs(ours - ref).max() <= 4 * spacing
    plain = np.asarray(OPTCausalLM(OPTBackbone.from_preset(preset, backend=backend))(
        {"token_ids": IDS, "padding_mask": MASK}))[real]
    assert np.mean(plain == ref) < 0.5           # without the emulation most logits differ
