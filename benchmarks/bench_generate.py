"""Greedy decoding throughput of a 125m-shaped model, beside transformers (and KerasHub when
installed), in one run.

    python benchmarks/bench_generate.py [--model 125m|bundled] [--layers 12] [--prompt 8] [--new 64]
                                        [--batch 1 8] [--repeats 2] [--threads N]
                                        [--backend numpy [numba ...]] [--under-load]
                                        [--keras-python PATH]

Writes a random float32 OPT-125m-shaped checkpoint (12 layers, 768 wide, 3072 MLP, vocabulary
50,272; transformers layout), or with ``--model bundled`` the bundled model (7 layers, 256 wide,
512 tokens), to a temporary directory and loads it into both libraries.  ``--under-load`` keeps
one core busy with a competing process during the measurements.  For each
batch size it times, best of ``--repeats`` after one warm-up, a whole greedy ``generate`` call:
prefill of a ``--prompt``-token prompt, then ``--new`` tokens decoded one by one with the KV cache
(refopt: ``OPTCausalLM.generate`` with ``sampler="greedy"``, ``stop_token_ids=None``; transformers:
``generate(do_sample=False, min_new_tokens=max_new_tokens=--new)``).  Reports new tokens per second
(batch x new / time), the refopt / transformers ratio, and whether both produced the same ids.
NumPy's BLAS and torch use the same thread count (``--threads``, default ``OMP_NUM_THREADS`` or
all cores); set ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` before starting to pin BLAS.
``--backend`` picks refopt's backends to time (default ``numpy``, the NumPy reference), one row
each.  KerasHub, when its interpreter (``--keras-python``, default this one) has ``keras_hub``, is
timed in a subprocess on the same weights (saved as a KerasHub preset): ``OPTCausalLM.generate``
with ``sampler="greedy"``, no preprocessor, ``stop_token_ids=None``, on its configured backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BusyCore, best_time, load_average  # noqa: E402


KERAS_CHILD = r"""
import json, os, sys, time
import numpy as np
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras, keras_hub
path, prompt_len, total, repeats, threads, vocab = sys.argv[1], *map(int, sys.argv[2:7])
batches = [int(b) for b in sys.argv[7].split(",")]
if keras.config.backend() == "tensorflow":
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
lm = keras_hub.models.OPTCausalLM.from_preset(path, preprocessor=None)
lm.compile(sampler="greedy")
out = {"backend": keras.config.backend(), "version": keras_hub.__version__, "rows": {}}
rng = np.random.default_rng(0)
for batch in batches:
    prompt = rng.integers(3, vocab, (batch, prompt_len))
    ids = np.ones((batch, total), "int32")
    ids[:, :prompt_len] = prompt
    mask = np.zeros((batch, total), bool)
    mask[:, :prompt_len] = True
    x = {"token_ids": ids, "padding_mask": mask}
    res = lm.generate(x, stop_token_ids=None)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = lm.generate(x, stop_token_ids=None)
        best = min(best or 1e9, time.perf_counter() - t0)
    out["rows"][str(batch)] = {"seconds": best, "token_ids": np.asarray(res["token_ids"]).tolist()}
print(json.dumps(out))
"""


def keras_hub_rates(python, path, args, vocab):
    """KerasHub's greedy generate timed in a subprocess; None when keras_hub is not installed there."""
    try:
        probe = subprocess.run([python, "-c", "import keras_hub"], capture_output=True)
    except OSError as e:                     # no such interpreter: KerasHub is not timed
        print(f"KerasHub not timed: {python}: {e.strerror}")
        return None
    if probe.returncode != 0:
        return None
    res = subprocess.run([python, "-c", KERAS_CHILD, path, str(args.prompt), str(args.prompt + args.new),
                          str(args.repeats), str(args.threads), str(vocab), ",".join(map(str, args.batch))],
                         capture_output=True, text=True)
    if res.returncode != 0:
        print(f"KerasHub run failed:\n{res.stderr[-1500:]}")
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("125m", "bundled"), default="125m")
    ap.add_argument("--under-load", action="store_true",
                    help="a competing busy process keeps one core busy during the measurements")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--backend", nargs="+", default=["numpy"])
    ap.add_argument("--keras-python", default=sys.executable,
                    help="interpreter with keras_hub installed (default: this one)")
    args = ap.parse_args(argv)

    from refopt.config import released_config
    from refopt.models import OPTBackbone, OPTCausalLM

    try:
        import torch
        import transformers
    except ImportError:
        torch = transformers = None
    total = args.prompt + args.new
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt125m")
        if args.model == "bundled":
            backbone = OPTBackbone.from_preset()
            cfg = backbone.config
        else:
            cfg = released_config("125m", num_layers=args.layers, dropout=0.0)
            backbone = OPTBackbone.from_opt_config(cfg)
        backbone.save_to_preset(path, format="huggingface")
        keras_path = os.path.join(tmp, "opt125m_keras")
        OPTCausalLM(backbone).save_to_preset(keras_path, format="keras")
        with BusyCore() if args.under_load else contextlib.nullcontext():   # the same load for KerasHub
            keras = keras_hub_rates(args.keras_python, keras_path, args, cfg.vocabulary_size)
        lm = OPTCausalLM.from_preset(path, preprocessor=None)
        lm.compile(sampler="greedy")
        hf = None
        if transformers is not None:
            torch.set_num_threads(args.threads)
            hf = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        what = ("the bundled model" if args.model == "bundled" else "125m-shaped random model")
        print(f"greedy decode, {what} ({cfg.num_layers} layers, {cfg.hidden_dim}/{cfg.intermediate_dim}, "
              f"vocab {cfg.vocabulary_size}), float32, prompt {args.prompt} + {args.new} new tokens, "
              f"{args.threads} threads" + ("; a busy process on one core" if args.under_load else "")
              + f"; load average {load_average()}")
        print(f"python {sys.version.split()[0]}, numpy {np.__version__}"
              + (f", torch {torch.__version__}, transformers {transformers.__version__}" if hf else "")
              + (f", keras-hub {keras['version']} ({keras['backend']} backend)" if keras
                 else "; KerasHub not installed (not measured)"))
        print(f"{'batch':>6s}{'backend':>9s}{'refopt tok/s':>15s}{'transformers tok/s':>21s}"
              f"{'ratio':>8s}{'same ids':>10s}")
        rng = np.random.default_rng(0)
        with BusyCore() if args.under_load else contextlib.nullcontext():
            for batch in args.batch:
                prompt = rng.integers(3, cfg.vocabulary_size, (batch, args.prompt))
                ids = np.ones((batch, total), np.int64)
                ids[:, :args.prompt] = prompt
                mask = np.zeros((batch, total), bool)
                mask[:, :args.prompt] = True
                theirs_rate, theirs = None, None
                if hf is not None:
                    tids = torch.tensor(prompt)

                    def run():
                        with torch.no_grad():
                            return hf.generate(input_ids=tids, attention_mask=torch.ones_like(tids),
                                               do_sample=False, max_new_tokens=args.new,
                                               min_new_tokens=args.new, pad_token_id=1)
                    t_theirs, theirs = best_time(run, args.repeats)
                    theirs_rate = batch * args.new / t_theirs
                for backend in args.backend:
                    if hasattr(lm, "backend"):
                        lm.backend = backend
                    elif backend != "numpy":
                        print(f"{batch:>6d}{backend:>9s}  (this refopt has no backends)")
                        continue
                    t_ours, ours = best_time(lambda: lm.generate({"token_ids": ids, "padding_mask": mask},
                                                                 stop_token_ids=None), args.repeats)
                    ours_rate = batch * args.new / t_ours
                    same = "" if theirs is None else (
                        "yes" if np.array_equal(theirs.numpy(), ours["token_ids"]) else "no")
                    ratio = "" if theirs_rate is None else f"{ours_rate / theirs_rate:.2f}x"
                    print(f"{batch:>6d}{backend:>9s}{ours_rate:>15.1f}"
                          f"{'' if theirs_rate is None else f'{theirs_rate:.1f}':>21s}{ratio:>8s}{same:>10s}")
                    if keras:
                        k = keras["rows"][str(batch)]
                        k_rate = batch * args.new / k["seconds"]
                        k_same = "yes" if np.array_equal(np.asarray(k["token_ids"]), ours["token_ids"]) else "no"
                        print(f"{'':>6s}{'':>9s}{'':>15s}{'KerasHub ' + f'{k_rate:.1f}':>21s}"
                              f"{f'{ours_rate / k_rate:.2f}x':>8s}{k_same:>10s}")


if __name__ == "__main__":
    main()
