"""Greedy decoding throughput of a 125m-shaped model, beside transformers (and KerasHub when
installed), in one run.

    python benchmarks/bench_generate.py [--layers 12] [--prompt 8] [--new 64] [--batch 1 8]
                                        [--repeats 2] [--threads N]

Writes a random float32 OPT-125m-shaped checkpoint (12 layers, 768 wide, 3072 MLP, vocabulary
50,272; transformers layout) to a temporary directory and loads it into both libraries.  For each
batch size it times, best of ``--repeats`` after one warm-up, a whole greedy ``generate`` call:
prefill of a ``--prompt``-token prompt, then ``--new`` tokens decoded one by one with the KV cache
(refopt: ``OPTCausalLM.generate`` with ``sampler="greedy"``, ``stop_token_ids=None``; transformers:
``generate(do_sample=False, min_new_tokens=max_new_tokens=--new)``).  Reports new tokens per second
(batch x new / time), the refopt / transformers ratio, and whether both produced the same ids.
NumPy's BLAS and torch use the same thread count (``--threads``, default ``OMP_NUM_THREADS`` or
all cores); set ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` before starting to pin BLAS.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def best_time(fn, repeats):
    out = fn()                                                                 # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    args = ap.parse_args(argv)

    from refopt.config import released_config
    from refopt.models import OPTBackbone, OPTCausalLM

    try:
        import torch
        import transformers
    except ImportError:
        torch = transformers = None
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        keras_hub = None

    total = args.prompt + args.new
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt125m")
        cfg = released_config("125m", num_layers=args.layers, dropout=0.0)
        OPTBackbone.from_opt_config(cfg).save_to_preset(path, format="huggingface")
        lm = OPTCausalLM.from_preset(path, preprocessor=None)
        lm.compile(sampler="greedy")
        hf = None
        if transformers is not None:
            torch.set_num_threads(args.threads)
            hf = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        print(f"greedy decode, 125m-shaped random model ({args.layers} layers, 768/3072, vocab "
              f"50272), float32, prompt {args.prompt} + {args.new} new tokens, {args.threads} threads")
        print(f"python {sys.version.split()[0]}, numpy {np.__version__}"
              + (f", torch {torch.__version__}, transformers {transformers.__version__}" if hf else "")
              + ("" if keras_hub else "; KerasHub not installed (not measured)"))
        print(f"{'batch':>6s}{'refopt tok/s':>15s}{'transformers tok/s':>21s}{'ratio':>8s}{'same ids':>10s}")
        rng = np.random.default_rng(0)
        for batch in args.batch:
            prompt = rng.integers(3, cfg.vocabulary_size, (batch, args.prompt))
            ids = np.ones((batch, total), np.int64)
            ids[:, :args.prompt] = prompt
            mask = np.zeros((batch, total), bool)
            mask[:, :args.prompt] = True
            t_ours, ours = best_time(lambda: lm.generate({"token_ids": ids, "padding_mask": mask},
                                                         stop_token_ids=None), args.repeats)
            ours_rate = batch * args.new / t_ours
            theirs_rate, same = None, ""
            if hf is not None:
                tids = torch.tensor(prompt)

                def run():
                    with torch.no_grad():
                        return hf.generate(input_ids=tids, attention_mask=torch.ones_like(tids),
                                           do_sample=False, max_new_tokens=args.new,
                                           min_new_tokens=args.new, pad_token_id=1)
                t_theirs, theirs = best_time(run, args.repeats)
                theirs_rate = batch * args.new / t_theirs
                same = "yes" if np.array_equal(theirs.numpy(), ours["token_ids"]) else "no"
            ratio = "" if theirs_rate is None else f"{ours_rate / theirs_rate:.2f}x"
            print(f"{batch:>6d}{ours_rate:>15.1f}"
                  f"{'' if theirs_rate is None else f'{theirs_rate:.1f}':>21s}{ratio:>8s}{same:>10s}")


if __name__ == "__main__":
    main()
