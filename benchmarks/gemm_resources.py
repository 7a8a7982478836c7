"""The GEMM kernels' compiled resources for an H100/H200 (sm_90), without a GPU: registers,
spills and the inner loop's SASS instruction mix per layout and configuration.

    python3 benchmarks/gemm_resources.py                       # large, every layout
    python3 benchmarks/gemm_resources.py --config large --layout nt --sass /tmp/sass
    python3 benchmarks/gemm_resources.py --variant v1 v2 --config large large16 wide
    python3 benchmarks/gemm_resources.py --flash              # the flash attention forward too

numba-cuda compiles the kernel to PTX for compute capability 9.0 (``cuda.compile_ptx`` with the
kernel's launch bounds), ``ptxas -arch=sm_90 -v`` reports registers and spills, ``cuobjdump
-sass`` the instructions (counted by opcode), and every loop of the SASS (a backward branch) its
length and its FFMA / shared / global instructions.  A static proxy for speed; a GPU session
measures (``benchmarks/GPU.md``).
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


def loops(sass):
    """``(start, end, instructions, counts)`` per loop of a SASS listing (a backward branch)."""
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ops.append((int(m.group(1), 16), m.group(2).strip()))
    out = []
    for addr, op in ops:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\))?\s*0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [o for a, o in ops if lo <= a <= addr]
            counts = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", o).group(1) for o in body)
            out.append((lo, addr, len(body), counts))
    return sorted(out)


def report_loops(sass):
    for lo, hi, n, c in loops(sass):
        ffma = sum(v for k, v in c.items() if k.startswith("FFMA"))
        mem = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k.startswith(("LDS", "LDG", "STS", "MUFU", "SHFL", "BAR")))
        print(f"    loop {lo:#06x}-{hi:#06x}: {n} instructions, FFMA {ffma} ({100 * ffma / n:.0f}%); {mem}")


def flash_forward(sass_dir=None):
    """The flash attention forward (float32, head width 64, causal, no dense mask)."""
    from refopt.kernels.cuda import attention as at

    f32 = types.float32
    a1 = types.Array(f32, 1, "C")
    sig = (a1, a1, a1, a1, a1, a1, types.Array(types.uint8, 2, "C"), types.Array(types.uint8, 3, "C")) \
        + (types.int64,) * 12 + (types.int32,) * 5 + (f32,)
    k = at.make_flash_forward(np.dtype(np.float32), 64, True, False)
    return assemble(k, sig, "flash_forward", sass_dir)


def assemble(k, sig, name, sass_dir=None):
    """ptxas's resource line and the SASS of a compiled kernel."""
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
    if sass_dir:
        Path(sass_dir).mkdir(parents=True, exist_ok=True)
        (Path(sass_dir) / f"{name}.sass").write_text(sass)
        (Path(sass_dir) / f"{name}.ptx").write_text(ptx)
    return info, sass


def compile_one(layout, config, variant, sass_dir=None, **flags):
    from refopt.kernels.cuda import gemm as g

    make = g.make_gemm_v2 if variant == "v2" else g.make_gemm
    k = make(np.dtype(np.float32), layout, config, **flags)
    a3 = types.Array(types.float32, 3, "C")
    a1 = types.Array(types.float32, 1, "C")
    sig = (a3, a3, a3, a1, a3, a3, a3, types.int32, types.int32, types.int32, types.int32)
    info, sass = assemble(k, sig, f"gemm_{layout}_{config}_{variant or 'v1'}", sass_dir)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return info, ops, sass



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", nargs="*", default=["nt", "nn", "tn"])
    ap.add_argument("--config", nargs="*", default=["large"])
    ap.add_argument("--variant", nargs="*", default=[None])
    ap.add_argument("--sass")
    ap.add_argument("--flash", action="store_true", help="also the flash attention forward")
    args = ap.parse_args()
    for variant in args.variant:
        for config in args.config:
            for layout in args.layout:
                info, ops, sass = compile_one(layout, config, variant, args.sass)
                top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
                print(f"{variant or 'v1'} {config} {layout}: {info}\n    {top}")
                report_loops(sass)
    if args.flash:
        info, sass = flash_forward(args.sass)
        print(f"flash forward (float32, K 64, causal): {info}")
        report_loops(sass)


if __name__ == "__main__":
    main()
