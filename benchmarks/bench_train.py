"""One training step of a 125m-shaped OPT, refopt (NumPy) beside transformers + PyTorch, in one run.

    python benchmarks/bench_train.py [--batch 2] [--seq 128] [--layers 12] [--repeats 3]
                                     [--threads N] [--dropout 0.1] [--backends numpy,numba]

A training step is, for both: forward in training mode (dropout on), the cross-entropy of the
logits against the next tokens, the backward pass, and one AdamW update of every parameter
(float32).  refopt runs once per backend in ``--backends`` (``numpy``: the reference ops and the
NumPy optimizer update; ``numba``: the compiled CPU kernels where they exist and the fused AdamW
update).  Each one runs in its own fresh subprocess with the same thread count
(``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS``, and ``torch.set_num_threads``
for torch) on a randomly initialised model of OPT-125m's shape (12 layers, hidden 768, MLP 3072,
vocabulary 50,272, 2,048 positions).  Reported per framework:

* step time: the best of ``--repeats`` steps after one warm-up step (which also creates the
  optimizer's moments);
* peak RSS (VmHWM) of the process, and the peak above the resident size once the model and its
  inputs were built (the step's activations, gradients and the two AdamW moments);
* for refopt, where the time goes (forward + loss, backward, optimizer), from the best step.

Prints a table with the refopt / transformers ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
which, B, S, L, repeats, threads, dropout = sys.argv[1], *map(int, sys.argv[2:7]), float(sys.argv[7])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(key)

rng = np.random.default_rng(0)
ids = rng.integers(3, 50272, (B, S + 1))
result = {}
if which != "transformers":
    from refopt import backend
    from refopt.config import released_config
    from refopt.model import init_params
    from refopt.optimizers import AdamW
    from refopt.training.gradients import check_batch, forward_backward
    cfg = released_config("125m", num_layers=L, dropout=dropout)
    params = init_params(cfg, seed=0, dtype="float32")
    opt = AdamW(learning_rate=1e-4, weight_decay=0.01)
    batch = check_batch(cfg, {"token_ids": ids[:, :-1], "padding_mask": np.ones((B, S), int)},
                        ids[:, 1:], None, np.float32)
    drop = np.random.default_rng(1)
    ops = backend.ops(which)
    result["params"] = int(sum(p.size for p in params.values()))
    base = status("VmRSS")

    def step():
        t0 = time.perf_counter()
        res = forward_backward(params, cfg, batch, dropout_rng=drop, reduction="sum_over_batch_size",
                               ops=ops)
        t1 = time.perf_counter()
        opt.apply(res.grads, params)
        t2 = time.perf_counter()
        return res.loss, t1 - t0, t2 - t1

    # forward + loss alone, to split the forward/backward time
    from refopt.model import forward
    def fwd():
        t0 = time.perf_counter()
        h = forward(params, cfg, batch.token_ids, batch.padding_mask, tape={}, dropout_rng=drop, ops=ops)
        ops.cross_entropy_forward(ops.lm_head_forward(h, params["embed_tokens"]), batch.y)
        return time.perf_counter() - t0
else:
    import torch, transformers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = transformers.OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=L, ffn_dim=3072,
                                num_attention_heads=12, max_position_embeddings=2048, dropout=dropout,
                                word_embed_proj_dim=768, do_layer_norm_before=True)
    model = transformers.OPTForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x, y = torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:])
    mask = torch.ones_like(x)
    result["params"] = int(sum(p.numel() for p in model.parameters()))
    base = status("VmRSS")

    def step():
        t0 = time.perf_counter()
        logits = model(input_ids=x, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), t1 - t0, time.perf_counter() - t1
    fwd = None

loss0 = step()[0]  # warm-up; creates the optimizer state
best = None
for _ in range(repeats):
    t0 = time.perf_counter()
    loss, t_fb, t_opt = step()
    total = time.perf_counter() - t0
    if best is None or total < best[0]:
        best = (total, t_fb, t_opt)
result.update(step_s=best[0], fwd_bwd_s=best[1], opt_s=best[2], loss_first=loss0, loss_last=loss,
              base_rss_mib=base, peak_rss_mib=status("VmHWM"))
if fwd is not None:
    result["fwd_s"] = min(fwd() for _ in range(repeats))
print(json.dumps(result))
"""


def child(which, args):
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(args.threads)
    if which != "transformers":
        env["REFOPT_BACKEND"] = which  # the optimizer's fused update follows the backend too
    cmd = [sys.executable, "-c", CHILD, which, str(args.batch), str(args.seq), str(args.layers),
           str(args.repeats), str(args.threads), str(args.dropout)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{which} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--backends", default="numpy,numba",
                    help="refopt backends to run, comma-separated (unavailable ones are skipped)")
    args = ap.parse_args(argv)

    from refopt import backend

    names = [b for b in args.backends.split(",") if b and backend.available(b)]
    ours = {name: child(name, args) for name in names}
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        theirs = child("transformers", args)
    except ImportError:
        theirs = None

    first = ours[names[0]]
    print(f"one training step (forward, cross-entropy, backward, AdamW), batch {args.batch} x "
          f"{args.seq} tokens, float32, dropout {args.dropout}, {args.threads} threads")
    print(f"model: 125m-shaped, {args.layers} layers, {first['params'] / 1e6:.1f}M parameters")
    head = "".join(f"{'refopt ' + n:>14s}{'ratio':>7s}" for n in names)
    print(f"{'':32s}{head}{'transformers':>14s}")

    def row(label, key, fmt, minus=None):
        def value(r):
            return r[key] - (r[minus] if minus else 0)

        cells = ""
        for n in names:
            a = value(ours[n])
            ratio = f"{a / value(theirs):.2f}x" if theirs and value(theirs) > 0 else ""
            cells += f"{fmt.format(a):>14s}{ratio:>7s}"
        print(f"{label:32s}{cells}{'' if theirs is None else fmt.format(value(theirs)):>14s}")

    row("step time (s)", "step_s", "{:.3f}")
    row("  forward+loss+backward (s)", "fwd_bwd_s", "{:.3f}")
    row("  optimizer update (s)", "opt_s", "{:.3f}")
    row("peak RSS (MiB)", "peak_rss_mib", "{:.0f}")
    row("peak RSS above model (MiB)", "peak_rss_mib", "{:.0f}", minus="base_rss_mib")
    for n in names:
        r = ours[n]
        print(f"refopt {n}: forward + loss alone {r['fwd_s']:.3f} s (backward ~{r['fwd_bwd_s'] - r['fwd_s']:.3f} s); "
              f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    if theirs:
        print(f"transformers: loss {theirs['loss_first']:.3f} -> {theirs['loss_last']:.3f}")
    print("ratio: refopt / transformers (time and memory: lower is better for refopt)")


if __name__ == "__main__":
    main()
