"""How closely refopt's dtype policies reproduce KerasHub's, on the same weights and inputs.

    python benchmarks/dtype_policy_agreement.py [--layers 4] [--hidden 256] [--heads 4]
        [--intermediate 1024] [--vocab 2048] [--batch 4] [--length 64] [--seed 0]
        [--policies bfloat16 mixed_bfloat16 float16 mixed_float16] [--backend numpy numba]

A random float32 OPT model is written as a KerasHub preset by KerasHub itself (in a subprocess, on
its JAX backend, or TensorFlow when JAX is absent); for each policy and each attention path
(``dropout`` 0.1, KerasHub's default, takes Keras's explicit softmax in the compute dtype; ``dropout``
0 takes ``jax.nn.dot_product_attention``) both libraries load it with ``dtype=policy`` and run the
same right-padded batch.  KerasHub records every layer's input and output on the way.

Two tables, at the real (unpadded) positions:

* **per op**: each op of refopt's policy (:func:`refopt.dtype_policies.ops_for`) fed KerasHub's own
  input to that op -- the embeddings, the LayerNorms, every dense map, attention, the residual sums
  and the LM head of every layer -- and its output compared with KerasHub's: the share bit for bit
  equal (the worst op, and all ops together).  This is the emulation's fidelity.
* **end to end**: the logits of the whole forward pass: the share bit-equal, the mean and largest
  difference in units of the compute dtype's spacing at 1 (bfloat16 2^-7, float16 2^-10), the share
  of positions whose arg-max agrees; and the same for refopt computing in plain float32 (no
  emulation).  Where an op's float32 sum lands on a rounding boundary in another order (BLAS and
  XLA sum differently), one rounding flips; the flip spreads through the later layers, so the
  end-to-end share is lower than the per-op one.
"""

from __future__ import annotations

import argparse
import json
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
f32 = lambda t: np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32")))

def watch(model, record):
    def wrap(layer, name):
        original = layer.call
        def call(*a, **k):
            res = original(*a, **k)
            record[name + ".in"] = f32(a[0] if a else next(iter(k.values())))
            record[name + ".out"] = f32(res[0] if isinstance(res, (tuple, list)) else res)
            return res
        layer.call = call
    wrap(model.embeddings, "embeddings")
    for i, t in enumerate(model.transformer_layers):
        wrap(t._self_attention_layer_norm, f"{i}.ln1")
        a = t._self_attention_layer
        for n in ("query", "key", "value", "output"):
            wrap(getattr(a, f"_{n}_dense"), f"{i}.{n}")
        wrap(t._feedforward_layer_norm, f"{i}.ln2")
        wrap(t._feedforward_intermediate_dense, f"{i}.fc1")
        wrap(t._feedforward_output_dense, f"{i}.fc2")
        wrap(t, f"{i}.layer")
    wrap(model.layer_norm, "final_ln")

for policy in args["policies"] + ["float32"]:
    for dropout in (0.1, 0.0):
        model = keras_hub.models.OPTBackbone.from_preset(out + "/preset", dtype=policy, dropout=dropout)
        record = {}
        watch(model, record)
        hidden = model(x)
        record["hidden"] = f32(hidden)
        record["logits"] = f32(model.token_embedding(hidden, reverse=True))
        np.savez(out + f"/keras_{policy}_{dropout}.npz", **record)
print(keras.config.backend())
"""

SPACING = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -23}


def per_op(bb, rec, mask):
    """{op name: (bit-equal count, count)} of refopt's policy ops fed KerasHub's recorded inputs."""
    from refopt.ops import attention_mask, merge_heads, split_heads

    ops, p, cfg = bb.ops, bb.params, bb.config
    B, S = mask.shape
    H, K = cfg.num_heads, cfg.head_dim
    real = mask.astype(bool)
    out = {}

    def check(name, ours, theirs):
        ours = np.asarray(ours, np.float32).reshape(theirs.shape)[real]
        theirs = theirs[real]
        eq, n = int((ours == theirs).sum()), theirs.size
        previous = out.get(name, (0, 0))
        out[name] = (previous[0] + eq, previous[1] + n)

    def flat(a):
        return a.reshape(B, S, -1)

    positions = np.arange(S)[None, :].repeat(B, 0)
    check("embeddings", ops.add(ops.embedding_forward(p["embed_tokens"], rec["ids"]),
                                ops.embedding_forward(p["embed_positions"], positions)), rec["embeddings.out"])
    attn_mask = attention_mask(real, np.arange(S))
    for i in range(cfg.num_layers):
        q_ = f"layers.{i}."
        ln = lambda x, n: ops.layernorm_forward(x, p[q_ + n + ".gamma"], p[q_ + n + ".beta"],  # noqa: E731
                                                cfg.layer_norm_epsilon)
        dense = lambda x, n: ops.linear_forward(flat(x), p[q_ + n + ".weight"], p[q_ + n + ".bias"])  # noqa: E731
        check("layernorm", ln(rec[f"{i}.ln1.in"], "self_attn_layer_norm"), rec[f"{i}.ln1.out"])
        for keras_name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            check("dense q/k/v", dense(rec[f"{i}.{keras_name}.in"], ours), rec[f"{i}.{keras_name}.out"])
        q, k, v = (split_heads(flat(rec[f"{i}.{n}.out"]), H) for n in ("query", "key", "value"))
        ctx, _ = ops.attention_forward(q * np.float32(K ** -0.5), k, v, attn_mask)
        check("attention", merge_heads(ctx), rec[f"{i}.output.in"])
        check("dense out", dense(rec[f"{i}.output.in"], "out_proj"), rec[f"{i}.output.out"])
        check("residual sum", ops.add(rec[f"{i}.ln1.in"], flat(rec[f"{i}.output.out"])), rec[f"{i}.ln2.in"])
        check("layernorm", ln(rec[f"{i}.ln2.in"], "mlp_layer_norm"), rec[f"{i}.ln2.out"])
        check("dense fc1+relu", ops.linear_relu_forward(rec[f"{i}.fc1.in"], p[q_ + "fc1.weight"],
                                                        p[q_ + "fc1.bias"]), rec[f"{i}.fc1.out"])
        check("dense fc2", dense(rec[f"{i}.fc2.in"], "fc2"), rec[f"{i}.fc2.out"])
        check("residual sum", ops.add(rec[f"{i}.ln2.in"], rec[f"{i}.fc2.out"]), rec[f"{i}.layer.out"])
    check("layernorm", ops.layernorm_forward(rec["final_ln.in"], p["final_layer_norm.gamma"],
                                             p["final_layer_norm.beta"], cfg.layer_norm_epsilon),
          rec["final_ln.out"])
    check("lm head", ops.lm_head_forward(rec["hidden"], p["embed_tokens"]), rec["logits"])
    return out


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
    real = mask
    rows_op, rows_e2e = [], []
    with tempfile.TemporaryDirectory(prefix="refopt-dtype-") as tmp:
        np.savez(os.path.join(tmp, "inputs.npz"), token_ids=ids.astype(np.int32),
                 padding_mask=mask.astype(np.int32))
        proc = subprocess.run([sys.executable, "-c", KERAS_CHILD, json.dumps(vars(args)), tmp],
                              capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if proc.returncode:
            sys.exit(f"KerasHub failed:\n{proc.stderr[-3000:]}")
        keras_backend = proc.stdout.strip().splitlines()[-1]
        preset = os.path.join(tmp, "preset")
        x = {"token_ids": ids, "padding_mask": mask}
        for policy in args.policies + ["float32"]:
            compute = dtype_policies.get(policy).compute_dtype
            for dropout in (0.1, 0.0):
                rec = dict(np.load(os.path.join(tmp, f"keras_{policy}_{dropout}.npz")))
                rec["ids"] = ids
                ref = rec["logits"][real]
                for backend in args.backend:
                    bb = OPTBackbone.from_preset(preset, dtype=policy, backend=backend)
                    bb.config.dropout = dropout
                    counts = per_op(bb, rec, mask)
                    worst = min(counts, key=lambda n: counts[n][0] / counts[n][1])
                    total = sum(c[0] for c in counts.values()) / sum(c[1] for c in counts.values())
                    rows_op.append(f"{policy:15s} {dropout:7.1f} {backend:>7s} {100 * total:10.3f}% "
                                   f"{100 * counts[worst][0] / counts[worst][1]:10.3f}% ({worst})")
                    ours = np.asarray(OPTCausalLM(bb)(x), np.float32)[real]
                    plain = OPTBackbone.from_preset(preset, backend=backend)
                    plain = np.asarray(OPTCausalLM(plain)(x))[real]
                    d, dp = np.abs(ours.astype(np.float64) - ref), np.abs(plain.astype(np.float64) - ref)
                    unit = SPACING[compute]
                    rows_e2e.append(
                        f"{policy:15s} {dropout:7.1f} {backend:>7s} {np.mean(ours == ref) * 100:9.2f}% "
                        f"{d.mean() / unit:9.3f} {d.max() / unit:8.1f} "
                        f"{np.mean(ours.argmax(-1) == ref.argmax(-1)) * 100:9.2f}% | "
                        f"{np.mean(plain == ref) * 100:9.2f}% {dp.mean() / unit:9.3f} {dp.max() / unit:8.1f}")
    print(f"OPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, MLP {args.intermediate}, "
          f"vocabulary {args.vocab}; batch {args.batch} x {args.length} (right-padded, {int(real.sum())} "
          f"real positions); KerasHub {keras_backend} backend")
    print("\nper op, fed KerasHub's own inputs (bit-equal outputs)")
    print(f"{'policy':15s} {'dropout':>7s} {'backend':>7s} {'all ops':>11s} {'worst op':>11s}")
    print("\n".join(rows_op))
    print("\nend to end: logits (differences in units of the compute dtype's spacing at 1)")
    print(f"{'policy':15s} {'dropout':>7s} {'backend':>7s} {'bit-equal':>10s} {'mean |d|':>9s} "
          f"{'max |d|':>8s} {'arg-max':>10s} | {'plain float32: bit-equal, mean |d|, max |d|':>30s}")
    print("\n".join(rows_e2e))


if __name__ == "__main__":
    main()
