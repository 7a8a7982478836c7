"""How closely refopt's dtype policies reproduce KerasHub's, on the same weights and inputs.

    python benchmarks/dtype_policy_agreement.py [--layers 4] [--hidden 256] [--heads 4]
        [--intermediate 1024] [--vocab 2048] [--batch 4] [--length 64] [--seed 0]
        [--policies bfloat16 mixed_bfloat16 float16 mixed_float16] [--backend numpy numba]

A random float32 OPT model is written as a KerasHub preset (by KerasHub itself, in a subprocess on
its JAX backend, or TensorFlow when JAX is absent); for each policy and each attention path
(``dropout`` 0.1, KerasHub's default, takes Keras's explicit softmax in the compute dtype; ``dropout``
0 takes ``jax.nn.dot_product_attention``) both libraries load it with ``dtype=policy`` and compute
the logits of the same right-padded batch.  Reported at the real (unpadded) positions: the share
of logits bit-for-bit equal, the largest difference in units of the compute dtype's spacing at 1
(bfloat16 2^-7, float16 2^-10) and as a share of the largest logit, and the share of positions
whose arg-max agrees; and, for scale, the largest difference of refopt computing in plain float32
(no emulation) from KerasHub under the policy.  Float32 is the baseline (ordinary summation-order
differences).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

KERAS_CHILD = r"""
import os, sys, json
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, keras, keras_hub
args = json.loads(sys.argv[1]); out = sys.argv[2]
rng = np.random.default_rng(args["seed"])
bb = keras_hub.models.OPTBackbone(vocabulary_size=args["vocab"], num_layers=args["layers"],
                                  num_heads=args["heads"], hidden_dim=args["hidden"],
                                  intermediate_dim=args["intermediate"], max_sequence_length=args["length"])
for w in bb.weights:
    if w.path.endswith("gamma"):
        w.assign(1 + 0.1 * rng.standard_normal(w.shape).astype("float32"))
    else:
        w.assign(rng.standard_normal(w.shape).astype("float32") * (0.1 if "bias" in w.path or "beta" in w.path else 0.05))
bb.save_to_preset(out + "/preset")
data = np.load(out + "/inputs.npz")
x = {"token_ids": data["token_ids"], "padding_mask": data["padding_mask"]}
results = {}
for policy in args["policies"] + ["float32"]:
    for dropout in (0.1, 0.0):
        model = keras_hub.models.OPTBackbone.from_preset(out + "/preset", dtype=policy, dropout=dropout)
        logits = model.token_embedding(model(x), reverse=True)
        results[f"{policy}/{dropout}"] = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32")))
np.savez(out + "/keras.npz", **results)
print(keras.config.backend())
"""

SPACING = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -23}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", nargs="+",
                        default=["bfloat16", "mixed_bfloat16", "float16", "mixed_float16"])
    parser.add_argument("--backend", nargs="+", default=["numpy", "numba"])
    args = parser.parse_args(argv)

    from refopt import dtype_policies
    from refopt.models import OPTBackbone, OPTCausalLM

    rng = np.random.default_rng(args.seed + 1)
    lengths = rng.integers(args.length // 4, args.length + 1, args.batch)
    lengths[0] = args.length
    mask = np.arange(args.length)[None, :] < lengths[:, None]
    ids = np.where(mask, rng.integers(3, args.vocab, (args.batch, args.length)), 1)
    with tempfile.TemporaryDirectory(prefix="refopt-dtype-") as tmp:
        np.savez(os.path.join(tmp, "inputs.npz"), token_ids=ids.astype(np.int32),
                 padding_mask=mask.astype(np.int32))
        config = dict(vars(args), policies=args.policies)
        proc = subprocess.run([sys.executable, "-c", KERAS_CHILD, __import__("json").dumps(config), tmp],
                              capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if proc.returncode:
            sys.exit(f"KerasHub failed:\n{proc.stderr[-3000:]}")
        keras_backend = proc.stdout.strip().splitlines()[-1]
        theirs = dict(np.load(os.path.join(tmp, "keras.npz")))
        print(f"OPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, MLP {args.intermediate}, "
              f"vocabulary {args.vocab}; batch {args.batch} x {args.length} (right-padded, "
              f"{int(mask.sum())} real positions); KerasHub {keras_backend} backend")
        print(f"{'policy':15s} {'dropout':>7s} {'backend':>7s} {'bit-equal':>10s} {'max |d| (ulp@1)':>16s} "
              f"{'max |d| / max':>14s} {'argmax agree':>13s} {'float32 max |d| (ulp@1)':>24s}")
        for policy in args.policies + ["float32"]:
            compute = dtype_policies.get(policy).compute_dtype
            for dropout in (0.1, 0.0):
                ref = theirs[f"{policy}/{dropout}"][mask]
                for backend in args.backend:
                    bb = OPTBackbone.from_preset(os.path.join(tmp, "preset"), dtype=policy, backend=backend)
                    bb.config.dropout = dropout
                    ours = np.asarray(OPTCausalLM(bb)({"token_ids": ids, "padding_mask": mask}),
                                      np.float32)[mask]
                    diff = np.abs(ours.astype(np.float64) - ref)
                    plain = OPTBackbone.from_preset(os.path.join(tmp, "preset"), backend=backend)
                    plain = np.asarray(OPTCausalLM(plain)({"token_ids": ids, "padding_mask": mask}))[mask]
                    print(f"{policy:15s} {dropout:7.1f} {backend:>7s} {np.mean(ours == ref) * 100:9.2f}% "
                          f"{diff.max() / SPACING[compute]:16.1f} {diff.max() / np.abs(ref).max():14.2e} "
                          f"{np.mean(ours.argmax(-1) == ref.argmax(-1)) * 100:12.2f}% "
                          f"{np.abs(plain - ref).max() / SPACING[compute]:24.1f}")


if __name__ == "__main__":
    main()
