"""The TF32 tensor-core GEMM (:mod:`refopt.kernels.cuda.gemm_tf32`) against cuBLAS with TF32 on
(``torch.backends.cuda.matmul.allow_tf32 = True``), beside cuBLAS float32 and refopt's float32 SIMT
GEMM (:func:`refopt.kernels.cuda.gemm.gemm`), at 4096^3 and the training shapes, every layout.

    python3 benchmarks/gemm_tf32.py
    SHAPES="nt4096x4096x4096 nt1024x768x3072" SWEEP="large:1 wide:4" python3 benchmarks/gemm_tf32.py

Times: "call" is the median of ``REPEATS`` (20) single calls from Python, each between two CUDA
events, after a warm-up (the host's cost of issuing the launches included); "graph" the median over
``ROUNDS`` (3) of the per-replay time of a CUDA graph of the call replayed ``REPEATS`` times (kernel
time only; refopt's training step replays graphs).  cuBLAS is timed per call only.  TFLOP/s =
``2 M N K / time``.  Errors against the float64 product of the float32 operands (no rounding):
``max`` = max|C - C64| / max|C64|, ``fro`` = ||C - C64|| / ||C64||.  ``SWEEP`` adds graph-timed rows
for other configurations ``config:splits[:pipeline]`` of the TF32 kernel; ``SASS=1`` counts
instructions in the SASS of the kernels compiled (needs ``nvdisasm``).  Figures: ``benchmarks/GPU.md``.
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
from refopt.kernels.cuda import gemm_tf32 as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import event_time, graph_time, torch_event_time  # noqa: E402

SHAPES = [(lay, 4096, 4096, 4096) for lay in G.LAYOUTS] + \
         [(lay, 1024, 3072, 768) for lay in G.LAYOUTS] + [(lay, 1024, 768, 3072) for lay in G.LAYOUTS]


def errors(got, want):
    d = (got.double() - want)
    return float(d.abs().max() / want.abs().max()), float(d.norm() / want.norm())


def main():
    repeats = int(os.environ.get("REPEATS", "20"))
    rounds = int(os.environ.get("ROUNDS", "3"))
    shapes = SHAPES
    if os.environ.get("SHAPES"):
        shapes = [s for s in SHAPES if s[0] + "%dx%dx%d" % s[1:] in os.environ["SHAPES"].split()]
    sweep = [(c.split(":") + [None])[:3] for c in os.environ.get("SWEEP", "").split()]
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}; {repeats} calls, graph rounds {rounds}", flush=True)
    rows = []
    for layout, M, N, K in shapes:
        A = torch.randn(*((K, M) if layout == "tn" else (M, K)), device="cuda", generator=gen)
        B = torch.randn(*((N, K) if layout == "nt" else (K, N)), device="cuda", generator=gen)
        ta, tb = (A.T if layout == "tn" else A), (B.T if layout == "nt" else B)
        want = torch.matmul(ta.double(), tb.double())
        f = 2 * M * N * K / 1e9            # TFLOP/s = f / milliseconds
        torch.backends.cuda.matmul.allow_tf32 = False
        ms_f32 = torch_event_time(lambda: torch.matmul(ta, tb), repeats)
        torch.backends.cuda.matmul.allow_tf32 = True
        ms_c = torch_event_time(lambda: torch.matmul(ta, tb), repeats)
        err_c = errors(torch.matmul(ta, tb), want)
        torch.backends.cuda.matmul.allow_tf32 = False
        dA, dB = cuda.as_cuda_array(A), cuda.as_cuda_array(B)
        out = torch.full((M, N), float("nan"), device="cuda")    # poisoned: unwritten entries stay NaN
        o = cuda.as_cuda_array(out)
        T.gemm_tf32(dA, dB, layout, out=o)
        cuda.synchronize()
        got = torch.as_tensor(o, device="cuda")
        unwritten = int(torch.isnan(got).sum())
        err_t = errors(got, want)
        ms_t = event_time(lambda: T.gemm_tf32(dA, dB, layout, out=o), repeats)
        ms_tg = statistics.median(graph_time(lambda s: T.gemm_tf32(dA, dB, layout, out=o, stream=s), repeats)
                                  for _ in range(rounds))
        o2 = cuda.device_array((M, N), np.float32)
        ms_s = event_time(lambda: G.gemm(dA, dB, layout, out=o2), repeats)
        err_s = errors(torch.as_tensor(o2, device="cuda"), want)
        name = f"{layout} {M}x{N}x{K}"
        print(f"{name}: cuBLAS f32 {f / ms_f32:.1f}  cuBLAS tf32 {f / ms_c:.1f} (err max {err_c[0]:.1e} fro "
              f"{err_c[1]:.1e})  tf32 call {f / ms_t:.1f} graph {f / ms_tg:.1f} (err max {err_t[0]:.1e} fro "
              f"{err_t[1]:.1e}, unwritten {unwritten})  SIMT f32 {f / ms_s:.1f} (err max {err_s[0]:.1e} fro "
              f"{err_s[1]:.1e})", flush=True)
        rows.append((name, f / ms_c, f / ms_t, f / ms_tg, f / ms_f32, f / ms_s, err_c, err_t, err_s))
        for config, splits, pipeline in sweep:
            try:
                ms = statistics.median(graph_time(lambda s: T.gemm_tf32(dA, dB, layout, out=o, stream=s,
                                                                        config=config, splits=int(splits),
                                                                        pipeline=pipeline), repeats)
                                       for _ in range(rounds))
            except Exception as e:   # noqa: BLE001 - report and go on
                print(f"  {config}:{splits}: {type(e).__name__}: {e}", flush=True)
                continue
            e = errors(torch.as_tensor(o, device="cuda"), want)
            print(f"  {config}:{splits}:{pipeline or 'default'} graph {f / ms:.1f} TFLOP/s "
                  f"({ms_c / ms:.2f}x cuBLAS tf32 per call) err max {e[0]:.1e}", flush=True)
    if os.environ.get("SASS"):             # the kernels the 4096^3 rows ran, as compiled
        for layout in G.LAYOUTS:
            for config in ("large", "large2"):
                k = T.make_gemm_tf32(layout, config, False, True, True, False, False, None)
                try:
                    for sass in k.inspect_sass().values():
                        counts = {op: sass.count(op) for op in ("HMMA", "LDGSTS", "LDS.128", "LDS ", "CVT",
                                                                "STS", "LDL", "STL", "BAR.SYNC")}
                        print(f"SASS {layout} {config} {k.pipeline} stages {k.stages}: {counts}", flush=True)
                except Exception as e:   # noqa: BLE001 - report and go on
                    print(f"SASS {layout} {config}: {type(e).__name__}: {e}", flush=True)
    print("\n| product | cuBLAS TF32 | TF32 kernel, call | ratio | graph | ratio | cuBLAS f32 | SIMT f32 "
          "| err max / fro: cuBLAS TF32 | TF32 kernel | SIMT f32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, c, t, tg, f32, s, ec, et, es in rows:
        print(f"| {name} | {c:.1f} | {t:.1f} | {t / c:.2f}x | {tg:.1f} | {tg / c:.2f}x | {f32:.1f} | {s:.1f} "
              f"| {ec[0]:.1e} / {ec[1]:.1e} | {et[0]:.1e} / {et[1]:.1e} | {es[0]:.1e} / {es[1]:.1e} |")


if __name__ == "__main__":
    main()
