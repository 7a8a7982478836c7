"""The GEMM kernels' compiled resources for an H100/H200 (sm_90), without a GPU: registers,
spills and the inner loop's SASS instruction mix per layout and configuration.

    python3 benchmarks/gemm_resources.py                       # large, every layout
    python3 benchmarks/gemm_resources.py --config large --layout nt --sass /tmp/sass

numba-cuda compiles the kernel to PTX for compute capability 9.0 (``cuda.compile_ptx`` with the
kernel's launch bounds), ``ptxas -arch=sm_90 -v`` reports registers and spills, ``cuobjdump
-sass`` the instructions (counted by opcode).  A static proxy for speed; a GPU session measures.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("NUMBA_ENABLE_CUDASIM"):
    sys.exit("gemm_resources.py compiles for the GPU: unset NUMBA_ENABLE_CUDASIM")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_resources import tool  # noqa: E402

import numpy as np  # noqa: E402
from numba import cuda, types  # noqa: E402


def compile_one(layout, config, variant, sass_dir=None, **flags):
    from refopt.kernels.cuda import gemm as g

    make = g.make_gemm_v2 if variant == "v2" else g.make_gemm
    k = make(np.dtype(np.float32), layout, config, **flags)
    a3 = types.Array(types.float32, 3, "C")
    a1 = types.Array(types.float32, 1, "C")
    sig = (a3, a3, a3, a1, a3, a3, a3, types.int32, types.int32, types.int32, types.int32)
    lb = k.targetoptions.get("launch_bounds")
    ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0), launch_bounds=lb)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.ptx"
        p.write_text(ptx)
        o = Path(tmp) / "k.cubin"
        r = subprocess.run([tool("ptxas"), "-arch=sm_90", "-v", "-o", str(o), str(p)],
                           capture_output=True, text=True)
        info = " ".join(line.strip() for line in r.stderr.splitlines() if "Used" in line or "spill" in line)
        sass = subprocess.run([tool("cuobjdump"), "-sass", str(o)], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    if sass_dir:
        Path(sass_dir).mkdir(parents=True, exist_ok=True)
        (Path(sass_dir) / f"gemm_{layout}_{config}_{variant or 'v1'}.sass").write_text(sass)
        (Path(sass_dir) / f"gemm_{layout}_{config}_{variant or 'v1'}.ptx").write_text(ptx)
    return info, ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", nargs="*", default=["nt", "nn", "tn"])
    ap.add_argument("--config", nargs="*", default=["large"])
    ap.add_argument("--variant", nargs="*", default=[None])
    ap.add_argument("--sass")
    args = ap.parse_args()
    for variant in args.variant:
        for config in args.config:
            for layout in args.layout:
                info, ops = compile_one(layout, config, variant, args.sass)
                top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
                print(f"{variant or 'v1'} {config} {layout}: {info}\n    {top}")


if __name__ == "__main__":
    main()
