"""One decode step at a long context: the Numba backend against the NumPy backend, in one process.

    python benchmarks/bench_decode_context.py [--index 20 480 1500] [--batch 1] [--rounds 7]
                                              [--weights f32 int8] [--size 125m] [--layers 12]

A random float32 OPT checkpoint of a released shape (default 125m) is loaded by the NumPy backend
(float32) and by the Numba backend (float32 and, with ``--weights``, int8 / bfloat16 weights).  For
each cache index, every engine gets a KV cache of ``index + 1`` positions filled with random values
(what a prefill would leave there: the step reads all of it), then ``--rounds`` rounds each time
one ``call_with_cache`` of one token per row at that index, the engines back to back in every
round, so a shared machine's load reaches them alike.  Printed: tokens/s (batch / the median of
the rounds after the first) and the ratio of each Numba variant to NumPy, round by round as
median (min-max).  The prefill is not in it: ``bench_cpu.py`` times whole ``generate`` calls of a
short prompt, where the prefill of a long one would swamp the steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import refopt  # noqa: F401  (before NumPy: sets OpenBLAS's thread timeout, see refopt/__init__)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, write_random_checkpoint  # noqa: E402

WEIGHTS = {"f32": None, "bf16": "bfloat16", "int8": "int8"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=int, nargs="+", default=[20, 480, 1500])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--weights", nargs="+", choices=sorted(WEIGHTS), default=["f32", "int8"])
    ap.add_argument("--size", default="125m")
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args(argv)

    from refopt import generation
    from refopt.models import OPTCausalLM

    tmp = tempfile.mkdtemp(prefix="refopt-ctx-")
    try:
        path = os.path.join(tmp, "model")
        cfg = write_random_checkpoint(path, args.layers, size=args.size)
        engines = {"numpy f32": OPTCausalLM.from_preset(path, preprocessor=None, backend="numpy")}
        for w in args.weights:
            engines[f"numba {w}"] = OPTCausalLM.from_preset(path, preprocessor=None, backend="numba",
                                                            weights_dtype=WEIGHTS[w])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for lm in engines.values():
        job = generation.prepare(lm)
        if job is not None:
            job.wait()
    if max(args.index) >= cfg.max_sequence_length:
        ap.error(f"--index must stay below the model's {cfg.max_sequence_length} positions")
    print(f"{args.size}-shaped random model ({args.layers} layers), batch {args.batch}, one step of "
          f"call_with_cache, median of {args.rounds - 1} rounds after the first")
    rng = np.random.default_rng(0)
    B = args.batch
    tok = np.ones((B, 1), np.int64)
    for index in args.index:
        caches = {}
        for name, lm in engines.items():
            cache = lm.new_cache(B, index + 1)
            cache[...] = (rng.standard_normal(cache.shape) * 0.5).astype(cache.dtype)
            caches[name] = cache
        times = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, lm in engines.items():
                t = time.perf_counter()
                lm.call_with_cache(tok, caches[name], index)
                times[name].append(time.perf_counter() - t)
        line = [f"index {index} ({index + 1} keys), load {load_average()}:"]
        base = times["numpy f32"][1:]
        for name, ts in times.items():
            rate = B / statistics.median(ts[1:])
            if name == "numpy f32":
                line.append(f"{name} {rate:.1f} tok/s")
                continue
            ratios = [b / t for b, t in zip(base, ts[1:])]
            line.append(f"{name} {rate:.1f} tok/s = {statistics.median(ratios):.2f}x NumPy "
                        f"({min(ratios):.2f}-{max(ratios):.2f})")
        print(line[0], "; ".join(line[1:]), flush=True)


if __name__ == "__main__":
    main()
