"""Where a batch-1 decode token's time goes on the CPU (the Numba backend's fused step), beside a
streaming read measured in the same process.

    python benchmarks/profile_cpu_step.py [--size 125m] [--layers 12] [--weights int8 w8a8 f32]
                                          [--new 32] [--runs 5]

A random checkpoint (as bench_cpu's) is loaded once per variant.  Then, ``--runs`` times, each
figure the best of a few calls (a shared machine's load only ever slows a call down):

* ``read1``/``read2``: a streaming read of the weights' size on one and on two threads, GB/s;
* ``step1``/``step2``: one decode step (``refopt.kernels.cpu.decode.decode_step``) on one and on
  two threads, ms, and as GB/s of the bytes it reads; ``layers``/``head``: the same step without
  logits (the final norm only), and with no layers (two threads);
* one greedy ``generate`` of ``--new`` tokens after a prompt of 8, split into its prefill, its
  steps (single steps as the thread governor ran them, and the compiled greedy loops of
  ``decode_greedy``, several steps a call) and everything else (sampling, Python), ms per token.

The bandwidth bound of bench_cpu is ``read2 / bytes``; a step reaches it when ``step2``'s GB/s
equals ``read2``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import refopt  # noqa: F401  (before NumPy: see refopt/__init__)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, write_random_checkpoint  # noqa: E402

VARIANTS = {"f32": (None, None), "bf16": ("bfloat16", None), "int8": ("int8", None),
            "w8a8": ("int8", "int8")}


def best(fn, n):
    t_best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="125m")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--weights", nargs="+", choices=sorted(VARIANTS), default=["int8", "w8a8"])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare-loop", action="store_true",
                    help="also time each generate step by step (no compiled greedy loop)")
    args = ap.parse_args(argv)

    import numba

    most = numba.get_num_threads()
    tmp = tempfile.mkdtemp(prefix="refopt-prof-")
    path = os.path.join(tmp, "model")
    try:
        cfg = write_random_checkpoint(path, args.layers, size=args.size)
        for name in args.weights:
            profile(name, path, cfg, args, most)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)        # the checkpoint: 0.5 GB at 125m


def profile(name, path, cfg, args, most):
    """One variant's figures, printed run by run."""
    import numba

    from bench_cpu import stream_bandwidth
    from refopt import generation
    from refopt.kernels.cpu import _threads, decode
    from refopt.models import OPTCausalLM

    wdt, act = VARIANTS[name]
    lm = OPTCausalLM.from_preset(path, preprocessor=None, backend="numba", weights_dtype=wdt,
                                 activations=act)
    lm.compile(sampler="greedy")
    job = generation.prepare(lm)
    if job is not None:
        job.wait()
    params, bcfg = lm.backbone.params, lm.backbone.config
    plan = decode._plan_for(params, bcfg)
    nbytes = plan.nbytes
    head_bytes = plan.V * plan.E * plan.w_like.itemsize
    P, N = 8, args.new
    tok = np.ones((1, 1), np.int64)
    mask = np.ones((1, P + 12), bool)
    cache = lm.new_cache(1, P + N)

    def step(threads):
        return lambda: decode.decode_step(params, bcfg, tok, mask, cache, P + 10, threads=threads)

    ids = np.random.default_rng(0).integers(3, cfg.vocabulary_size, (1, P))
    x = {"token_ids": np.concatenate([ids, np.ones((1, N), ids.dtype)], 1),
         "padding_mask": np.concatenate([np.ones((1, P), bool), np.zeros((1, N), bool)], 1)}
    steps, prefills = [], []
    timed, prefill = _threads.governor.timed, generation.prefill

    inside = []                       # non-empty while a greedy loop runs (it is timed as one)

    def counting_timed(key, most_, start, fn, units=None):
        def f(n):
            t = time.perf_counter()
            out = fn(n)
            if not inside:
                steps.append((n, time.perf_counter() - t))
            return out
        return timed(key, most_, start, f, units)

    import refopt.kernels.cpu as ops_module
    greedy = ops_module.decode_greedy

    def counting_greedy(*a_, **k):
        t = time.perf_counter()
        inside.append(1)
        try:
            out = greedy(*a_, **k)
        finally:
            inside.pop()
        steps.append((-1, time.perf_counter() - t))
        return out

    def counting_prefill(*a_, **k):
        t = time.perf_counter()
        out = prefill(*a_, **k)
        prefills.append(time.perf_counter() - t)
        return out

    for threads in (1, most):
        step(threads)()
    numba.set_num_threads(most)
    print(f"{name}: {nbytes / 1e6:.1f} MB a step ({head_bytes / 1e6:.1f} MB the head's table), "
          f"{most} threads")
    for run in range(args.runs):
        fig = {}
        for threads in (1, most):
            numba.set_num_threads(threads)
            fig[f"read{threads}"] = stream_bandwidth(nbytes) / 1e9
            fig[f"step{threads}"] = best(step(threads), 10)
        numba.set_num_threads(most)
        fig["layers"] = best(lambda: decode.decode_step(params, bcfg, tok, mask, cache, P + 10, threads=most,
                                                        logits=False), 10)
        addr = plan.addr
        plan.addr = addr[:0]
        fig["head"] = best(step(most), 10)
        plan.addr = addr
        print(f"  run {run + 1}, load {load_average()}: read {fig['read1']:.1f} / {fig['read2']:.1f} "
              f"GB/s (1 / {most} threads); step {1e3 * fig['step1']:.2f} ms = "
              f"{nbytes / fig['step1'] / 1e9:.1f} GB/s / {1e3 * fig['step2']:.2f} ms = "
              f"{nbytes / fig['step2'] / 1e9:.1f} GB/s; layers {1e3 * fig['layers']:.2f} ms = "
              f"{(nbytes - head_bytes) / fig['layers'] / 1e9:.1f} GB/s, head {1e3 * fig['head']:.2f} ms = "
              f"{head_bytes / fig['head'] / 1e9:.1f} GB/s", flush=True)
        for loop in ((True, False) if args.compare_loop else (True,)):
            generate_split(lm, x, N, loop, steps, prefills, counting_timed, counting_prefill,
                           counting_greedy, fig, nbytes, most)


def generate_split(lm, x, N, loop, steps, prefills, counting_timed, counting_prefill, counting_greedy,
                   fig, nbytes, most):
    """One greedy generate, timed and split (with the compiled greedy loop, or step by step)."""
    from refopt import generation
    from refopt.kernels.cpu import _threads
    import refopt.kernels.cpu as ops_module

    timed, prefill, greedy = _threads.governor.timed, generation.prefill, ops_module.decode_greedy
    steps.clear()
    prefills.clear()
    _threads.governor.timed, generation.prefill = counting_timed, counting_prefill
    ops_module.decode_greedy = counting_greedy
    if not loop:
        lm.greedy_steps = lambda *a, **k: None
    try:
        t = time.perf_counter()
        lm.generate(x, stop_token_ids=None)
        total_s = time.perf_counter() - t
    finally:
        _threads.governor.timed, generation.prefill = timed, prefill
        ops_module.decode_greedy = greedy
        lm.__dict__.pop("greedy_steps", None)
    in_steps = sum(s for _, s in steps)
    print(f"    generate{'' if loop else ' (step by step)'}: {N / total_s:.1f} tok/s = "
          f"{1e3 * total_s / N:.2f} ms a token: prefill "
          f"{1e3 * prefills[0] / N:.2f}, steps {1e3 * in_steps / N:.2f} ({sum(n > 1 for n, _ in steps)}"
          f" of {sum(n > 0 for n, _ in steps)} single steps on {most} threads, "
          f"{sum(n < 0 for n, _ in steps)} greedy loops), other {1e3 * (total_s - in_steps - prefills[0]) / N:.2f};"
          f" the bound {fig['read2'] * 1e9 / nbytes:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
