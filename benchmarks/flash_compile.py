"""How long the flash attention kernels (and GEMM v2, for scale) take to compile for an H100/H200
(sm_90), without a GPU: the seconds of ``numba.cuda.compile_ptx`` (Numba's typing and lowering plus
NVVM), the PTX's size, and ``ptxas -arch=sm_90 -v``'s seconds, registers and spills (the driver
runs the same PTX-to-SASS step when a process first launches the kernel).

    python3 benchmarks/flash_compile.py                        # every kernel below
    python3 benchmarks/flash_compile.py --kernels fwd2 bwd2    # the second forward / backward only

Kernels: ``fwd1`` / ``fwd2`` the first / second flash forward (float32, head width 64, causal),
``bwd1`` / ``bwd2`` / ``bwd3`` the first / second / third backward (``dkdv`` and ``dq``; the
third's ``dq`` the product from the ``dS`` scratch), ``gemm2`` GEMM v2 ``nt``
(config ``large``).  Environment for a machine without a GPU: ``NUMBA_FORCE_CUDA_CC=9.0``,
``CUDA_HOME`` at a CUDA 13 toolkit (NVVM, ``ptxas``) and ``LD_LIBRARY_PATH`` reaching NVRTC (the
``nvidia-cuda-nvrtc`` wheel's ``lib``).  Figures: ``benchmarks/GPU.md``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("NUMBA_ENABLE_CUDASIM"):
    sys.exit("flash_compile.py compiles for the GPU: unset NUMBA_ENABLE_CUDASIM")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_resources import tool  # noqa: E402

import numpy as np  # noqa: E402
from numba import cuda, types  # noqa: E402

F32 = types.float32
A1 = types.Array(F32, 1, "C")
U8_2 = types.Array(types.uint8, 2, "C")
TAIL = (types.int32,) * 5 + (F32,)          # H, S, T, K, q_offset, scale


def kernels(name, unroll=None):
    """``[(label, kernel, signature)]`` for one of the names of the module docstring (``unroll``:
    the steps a pass of the second kernels' loops, None their default)."""
    from refopt.kernels.cuda import attention as at
    from refopt.kernels.cuda import flash_backward as fb
    from refopt.kernels.cuda import gemm as g

    if name == "fwd1":
        k = at.make_flash_forward(np.dtype(np.float32), 64, True, False)
        return [("fwd1", k, (A1,) * 6 + (U8_2, types.Array(types.uint8, 3, "C")) + (types.int64,) * 12 + TAIL)]
    if name == "fwd2":
        k = at.make_flash_forward_v2(64, True, at.PREFETCH, *([unroll] if unroll else []))
        return [(f"fwd2 u{unroll or 'default'}", k, (A1,) * 6 + (U8_2,) + (types.int64,) * 12 + TAIL)]
    if name == "bwd1":
        dkdv, dq = fb.make_flash_backward(np.dtype(np.float32), 64, True)
        st = types.UniTuple(types.int64, 3)
        return [("bwd1 dkdv", dkdv, (A1,) * 7 + (U8_2, A1, A1) + (st,) * 6 + TAIL),
                ("bwd1 dq", dq, (A1,) * 7 + (U8_2, A1) + (st,) * 5 + TAIL)]
    if name == "bwd2":
        dkdv, dq = fb.make_flash_backward_v2(True, *([unroll] if unroll else []))
        u = f"u{unroll or 'default'}"
        return [(f"bwd2 dkdv {u}", dkdv, (A1,) * 7 + (U8_2, A1, A1) + (types.int64,) * 18 + TAIL),
                (f"bwd2 dq {u}", dq, (A1,) * 7 + (U8_2, A1) + (types.int64,) * 15 + TAIL)]
    if name == "bwd3":
        dkdv, dq = fb.make_flash_backward_v3(True, *([unroll] if unroll else []))
        u = f"u{unroll or 'default'}"
        i32, i64 = types.int32, types.int64
        return [(f"bwd3 dkdv {u}", dkdv, (A1,) * 7 + (U8_2, A1, A1) + (i64,) * 18 + TAIL + (A1, i32, i32, i64)),
                (f"bwd3 dq {u}", dq, (A1,) * 3 + (i64,) * 6 + (i32,) * 6 + (i64, F32))]
    if name == "gemm2":
        k = g.make_gemm_v2(np.dtype(np.float32), "nt", "large")
        a3 = types.Array(F32, 3, "C")
        return [("gemm2 nt large", k, (a3, a3, a3, A1, a3, a3, a3) + (types.int32,) * 4)]
    raise SystemExit(f"flash_compile.py: unknown kernel {name!r}")


def measure(k, sig, sass_loops=False):
    """``(compile_ptx seconds, PTX bytes, ptxas seconds, ptxas's resource line)``; ``sass_loops``:
    also print the loops of the SASS (``gemm_resources.report_loops``, needs ``cuobjdump``)."""
    lb = k.targetoptions.get("launch_bounds")
    t = time.perf_counter()
    ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0), launch_bounds=lb)
    nvvm = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.ptx"
        p.write_text(ptx)
        t = time.perf_counter()
        r = subprocess.run([tool("ptxas"), "-arch=sm_90", "-v", "-o", str(Path(tmp) / "k.cubin"), str(p)],
                           capture_output=True, text=True)
        sass = time.perf_counter() - t
        if sass_loops:
            from gemm_resources import report_loops

            report_loops(subprocess.run([tool("cuobjdump"), "-sass", str(Path(tmp) / "k.cubin")],
                                        capture_output=True, text=True).stdout)
    info = " ".join(re.sub(r"\s+", " ", line.split("info    :")[-1]).strip()
                    for line in r.stderr.splitlines() if "Used" in line or "spill" in line)
    return nvvm, len(ptx), sass, info or r.stderr.strip()[-300:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", nargs="*", default=["fwd1", "fwd2", "bwd1", "bwd2", "gemm2"])
    ap.add_argument("--unroll", type=int, nargs="*", default=[None],
                    help="steps a pass of the second kernels' loops (default: theirs)")
    ap.add_argument("--loops", action="store_true", help="print the SASS loops")
    args = ap.parse_args()
    for name in args.kernels:
        for label, k, sig in [x for u in args.unroll for x in kernels(name, u)]:
            nvvm, size, sass, info = measure(k, sig, args.loops)
            print(f"{label:15s} compile_ptx {nvvm:6.1f} s, PTX {size / 1e3:7.1f} kB, ptxas {sass:5.1f} s: {info}",
                  flush=True)


if __name__ == "__main__":
    main()
