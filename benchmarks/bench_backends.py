"""The default backend (Numba) against the NumPy reference backend, over model sizes and batches.

    python benchmarks/bench_backends.py [--sizes bundled 125m:12 350m:6 1.3b:2] [--batch 1 4 16 32]
                                        [--rounds 2] [--new 16] [--prompt 8] [--under-load]

Each size is the bundled model (``bundled``) or a random float32 checkpoint of a released shape
with that many layers (``350m:6``: OPT-350m's post-LayerNorm layers with its 512-wide projection,
which decodes step by step rather than in the compiled greedy loop; ``1.3b:2``: 2048 wide).  Both
backends load the same weights in this process; for each batch, ``--rounds`` times, each backend's
greedy ``generate`` (prompt ``--prompt``, ``--new`` new tokens, ``stop_token_ids=None``) is timed,
best of 2 after a warm-up, the two alternated so they see the same load.  Prints tokens/s and the
Numba / NumPy ratio of every round: the issue's goal is a ratio of at least 1 in every round, quiet
and with ``--under-load`` (a busy Python process on one core while timing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile

import refopt  # noqa: F401  (before NumPy: sets OpenBLAS's thread timeout, see refopt/__init__)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BusyCore, best_time, load_average, write_random_checkpoint  # noqa: E402

BACKENDS = ("numpy", "numba")


def models(size, tmp):
    """{backend: OPTCausalLM} of one size, compiled for greedy decoding."""
    from refopt.models import OPTCausalLM

    if size == "bundled":
        path = None
    else:
        name, layers = size.split(":")
        path = os.path.join(tmp, size.replace(":", "-"))
        write_random_checkpoint(path, int(layers), size=name)
    out = {}
    for backend in BACKENDS:
        lm = (OPTCausalLM.from_preset(preprocessor=None, backend=backend) if path is None
              else OPTCausalLM.from_preset(path, preprocessor=None, backend=backend))
        lm.compile(sampler="greedy")
        out[backend] = lm
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["bundled", "125m:12", "350m:6", "1.3b:2"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--under-load", action="store_true",
                    help="a competing busy process keeps one core busy while timing")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="refopt-backends-")
    lowest = float("inf")
    try:
        for size in args.sizes:
            lms = models(size, tmp)
            V = lms["numpy"].backbone.config.vocabulary_size
            for B in args.batch:
                ids = np.random.default_rng(B).integers(3, V, (B, args.prompt))
                x = {"token_ids": np.concatenate([ids, np.ones((B, args.new), ids.dtype)], 1),
                     "padding_mask": np.concatenate([np.ones((B, args.prompt), bool),
                                                     np.zeros((B, args.new), bool)], 1)}
                rates = {b: [] for b in BACKENDS}
                with BusyCore() if args.under_load else contextlib.nullcontext():
                    for _ in range(args.rounds):
                        for backend, lm in lms.items():
                            seconds, _ = best_time(lambda: lm.generate(x, stop_token_ids=None), 2)
                            rates[backend].append(B * args.new / seconds)
                ratios = [a / b for a, b in zip(rates["numba"], rates["numpy"])]
                lowest = min(lowest, *ratios)
                print(f"{size:10s} batch {B:3d}: NumPy {statistics.median(rates['numpy']):8.1f}, Numba "
                      f"{statistics.median(rates['numba']):8.1f} tok/s (medians); Numba / NumPy each round "
                      + ", ".join(f"{r:.2f}" for r in ratios) + f"; load {load_average()}", flush=True)
        print(f"lowest Numba / NumPy ratio: {lowest:.2f}" + (" (a core busy)" if args.under_load else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
