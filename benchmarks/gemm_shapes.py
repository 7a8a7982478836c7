"""Where the tiled GEMM's time goes at the training shapes, on the GPU: the Python call against the
same launches replayed from a CUDA graph (kernel time only, as the training step runs them), and a
sweep of tile configurations x split-K slice counts, beside cuBLAS (float32, TF32 off).

    python3 benchmarks/gemm_shapes.py                      # 1024x768x3072 nt/nn/tn, 1024x3072x768, 4096^3
    SPLITS= python3 benchmarks/gemm_shapes.py              # no sweep: dispatcher vs fast launcher vs graph
    CONFIGS="large wide medium" SPLITS="1 2 4 8" python3 benchmarks/gemm_shapes.py
    VARIANTS="v1 v2" CONFIGS="large large16" python3 benchmarks/gemm_shapes.py   # both kernels

Every time is the median of 20 event-timed runs after a warm-up; graph rows replay one captured
graph 20 times between two events (per-run time).  The host row is the wall time of 200 calls of
``gemm()`` without synchronising (the CPU's cost of one call, launches included), through Numba's
dispatcher, through :mod:`refopt.kernels.cuda.launch` (``launch.FAST``) without ``gemm``'s plans and
with them (``gemm.PLANS``: the launches of a call repeated with the same arguments, bound once),
the bound launches through ``cuda.core.launch`` ("plans") or ``cuLaunchKernel`` ("direct",
``launch.DIRECT``, the default).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from numba import cuda

from refopt.kernels.cuda import gemm as G
from refopt.kernels.cuda import launch as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import event_time, graph_time, torch_event_time  # noqa: E402

EXTRA = {   # candidate configurations tried beside gemm.CONFIGS (BM, BN, BK, TM, TN[, min blocks])
    "wide16": (64, 128, 16, 8, 8),
    "tall": (128, 64, 8, 8, 8),
    "medium8": (64, 64, 8, 8, 4),
}
G.CONFIGS.update(EXTRA)


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [("nt", 1024, 768, 3072), ("nn", 1024, 768, 3072), ("tn", 1024, 768, 3072),
              ("nt", 1024, 3072, 768), ("tn", 768, 3072, 1024), ("nt", 4096, 4096, 4096)]
    if os.environ.get("SHAPES"):
        shapes = [s for s in shapes if s[0] + "%dx%dx%d" % s[1:] in os.environ["SHAPES"].split()]
    configs = os.environ.get("CONFIGS", "large large1 wide medium large16 wide16 tall medium8").split()
    splits = [int(s) for s in os.environ.get("SPLITS", "1 2 3 4 6 8 12").split()]   # SPLITS="": no sweep
    variants = os.environ.get("VARIANTS", G.VARIANT).split()      # the kernels swept (gemm.VARIANT)
    summary = []
    for layout, M, N, K in shapes:
        A = torch.randn(*((K, M) if layout == "tn" else (M, K)), device="cuda", generator=gen)
        B = torch.randn(*((N, K) if layout == "nt" else (K, N)), device="cuda", generator=gen)
        ta, tb = (A.T if layout == "tn" else A), (B.T if layout == "nt" else B)
        want = torch.matmul(ta.double(), tb.double())
        ms_t = torch_event_time(lambda: torch.matmul(ta, tb), 20)
        dA, dB = cuda.as_cuda_array(A), cuda.as_cuda_array(B)
        o = cuda.device_array((M, N), np.float32)
        f = 2 * M * N * K
        name = f"{layout} {M}x{N}x{K}"
        host, py = {}, {}
        for fast in (False, True, "plans", "direct"):   # Numba's dispatcher, launch.launcher, + plans
            L.FAST, G.PLANS = bool(fast), fast in ("plans", "direct")   # (through cuda.core.launch
            L.DIRECT = fast == "direct"                                 # or cuLaunchKernel)
            G._PLANS.clear()
            py[fast] = event_time(lambda: G.gemm(dA, dB, layout, out=o), 20)
            cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                G.gemm(dA, dB, layout, out=o)
            host[fast] = (time.perf_counter() - t0) / 200 * 1e6
            cuda.synchronize()
            got = torch.as_tensor(o, device="cuda").double()
            print(f"  fast={fast}: rel err {float((got - want).norm() / want.norm()):.1e}", flush=True)
        ms_py, host_us = py["plans"], host["plans"]
        ms_d, host_d = py["direct"], host["direct"]
        ms_g = graph_time(lambda s: G.gemm(dA, dB, layout, out=o, stream=s), 20)
        print(f"{name}: cuBLAS {ms_t:.3f} ms ({f / ms_t / 1e9:.1f} TFLOP/s); python dispatcher "
              f"{py[False]:.3f} ms ({ms_t / py[False]:.2f}x, host {host[False]:.0f} us/call), fast "
              f"{py[True]:.3f} ms ({ms_t / py[True]:.2f}x, host {host[True]:.0f} us/call), plans "
              f"{ms_py:.3f} ms ({ms_t / ms_py:.2f}x, host {host_us:.0f} us/call), direct {ms_d:.3f} ms "
              f"({ms_t / ms_d:.2f}x, host {host_d:.0f} us/call), graph {ms_g:.3f} ms "
              f"({ms_t / ms_g:.2f}x)", flush=True)
        best = (1e9, "", 0)
        for variant, config in ((v, c) for v in variants for c in configs):
            for s in splits:
                if s > 1 and K // s < 128:
                    continue
                try:
                    ms = graph_time(lambda st: G.gemm(dA, dB, layout, out=o, stream=st, config=config,
                                                      splits=s, variant=variant), 20)
                except Exception as e:   # noqa: BLE001 - report and go on
                    print(f"  {variant} {config} x{s}: {type(e).__name__}: {e}", flush=True)
                    continue
                got = torch.as_tensor(o, device="cuda").double()
                err = float((got - want).norm() / want.norm())
                print(f"  {variant} {config:8s} split {s:2d}: {ms:.3f} ms {f / ms / 1e9:5.1f} TFLOP/s "
                      f"{ms_t / ms:.2f}x  rel err {err:.1e}", flush=True)
                if ms < best[0]:
                    best = (ms, f"{variant} {config}", s)
        line = (f"{name:22s} cuBLAS {ms_t:.3f}  dispatcher {py[False]:.3f} ({ms_t / py[False]:.2f}x, "
                f"host {host[False]:.0f}us)  fast {py[True]:.3f} ({ms_t / py[True]:.2f}x, host {host[True]:.0f}us)  "
                f"plans {ms_py:.3f} ({ms_t / ms_py:.2f}x, host {host_us:.0f}us)  "
                f"direct {ms_d:.3f} ({ms_t / ms_d:.2f}x, host {host_d:.0f}us)  "
                f"graph {ms_g:.3f} ({ms_t / ms_g:.2f}x)")
        if best[1]:
            line += f"  best {best[1]} x{best[2]} {best[0]:.3f} ({ms_t / best[0]:.2f}x)"
        summary.append(line)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
