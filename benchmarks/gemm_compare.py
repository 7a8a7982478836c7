"""The GEMM kernels side by side on the GPU: each variant with its default configuration (what
``gemm()`` picks) against cuBLAS, float32 with TF32 off, at 4096³ and the training shapes; every
figure the median / min / max of ``ROUNDS`` rounds, each round a CUDA graph of the product
replayed 20 times (kernel time, as the training step runs them); cuBLAS rounds of 20 event-timed
calls.  The error is ``|C - C64| / |C64|`` (Frobenius) against a float64 product.

    python3 benchmarks/gemm_compare.py                         # v1 and v2
    VARIANTS="v2" ROUNDS=3 python3 benchmarks/gemm_compare.py
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from numba import cuda

from refopt.kernels.cuda import gemm as G

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import graph_time, torch_event_time  # noqa: E402

SHAPES = [("nt", 4096, 4096, 4096), ("nn", 4096, 4096, 4096), ("tn", 4096, 4096, 4096),
          ("nt", 1024, 768, 3072), ("nn", 1024, 768, 3072), ("tn", 1024, 768, 3072),
          ("nt", 1024, 3072, 768), ("nn", 1024, 768, 768), ("tn", 768, 3072, 1024)]


def spread(xs):
    return statistics.median(xs), min(xs), max(xs)


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    variants = os.environ.get("VARIANTS", "v1 v2").split()
    rounds = int(os.environ.get("ROUNDS", "5"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}; rounds {rounds}; TFLOP/s median (min-max)")
    for layout, M, N, K in SHAPES:
        A = torch.randn(*((K, M) if layout == "tn" else (M, K)), device="cuda", generator=gen)
        B = torch.randn(*((N, K) if layout == "nt" else (K, N)), device="cuda", generator=gen)
        ta, tb = (A.T if layout == "tn" else A), (B.T if layout == "nt" else B)
        want = torch.matmul(ta.double(), tb.double())
        f = 2 * M * N * K / 1e9
        cub = spread([f / torch_event_time(lambda: torch.matmul(ta, tb), 20) for _ in range(rounds)])
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = spread([f / torch_event_time(lambda: torch.matmul(ta, tb), 20) for _ in range(rounds)])
        err_tf32 = float((torch.matmul(ta, tb).double() - want).norm() / want.norm())
        torch.backends.cuda.matmul.allow_tf32 = False
        dA, dB = cuda.as_cuda_array(A), cuda.as_cuda_array(B)
        o = cuda.device_array((M, N), np.float32)
        line = (f"{layout} {M}x{N}x{K}: cuBLAS {cub[0]:.1f} ({cub[1]:.1f}-{cub[2]:.1f}); "
                f"TF32 cuBLAS {tf32[0]:.1f} (err {err_tf32:.1e})")
        for v in variants:
            ts = [f / graph_time(lambda st: G.gemm(dA, dB, layout, out=o, stream=st, variant=v), 20)
                  for _ in range(rounds)]
            got = torch.as_tensor(o, device="cuda").double()
            err = float((got - want).norm() / want.norm())
            med, lo, hi = spread(ts)
            line += f"; {v} {med:.1f} ({lo:.1f}-{hi:.1f}) {med / cub[0]:.2f}x err {err:.1e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
