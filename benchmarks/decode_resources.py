"""The persistent decode kernel's compiled resources for an H100/H200 (sm_90), without a GPU:
registers, spills, stack frame, shared memory and SASS instruction counts per configuration.

    python3 benchmarks/decode_resources.py                  # 125m, batch 1 and 32, greedy
    python3 benchmarks/decode_resources.py --samplers greedy random top_k top_p min_p
    python3 benchmarks/decode_resources.py --size 350m --sass /tmp/sass   # also write the SASS

A static proxy for the kernel's speed, for sessions without a GPU: numba-cuda compiles the kernel
to PTX for compute capability 9.0 (the device functions' compile asks for the current device's
compute capability, so the script answers 9.0 in its place), ``ptxas -arch=sm_90 -v -c`` reports
registers, stack frame and spills, ``nvlink`` with ``libcudadevrt`` (the grid synchronisation's
runtime) gives the linked kernel whose ``cuobjdump -res-usage`` reports static shared memory, and
``cuobjdump -sass`` the instructions.  Needs the CUDA toolkit's ``ptxas`` and ``nvlink``
(``/usr/local/cuda*/bin``, ``$CUDA_HOME/bin`` or ``PATH``) and ``cuobjdump`` (there, or the
``nvidia-cuda-cuobjdump`` wheel).  Numbers before and after a change of the kernel's code are in
``benchmarks/GPU.md``; a GPU session confirms them with ``profile_decode.py`` and ``bench_gpu.py``.

Batch 1 takes the warp products, batch 32 the tiled ones (``decode_products.TILED_FROM``); the split-K plan
is the one of a 132-multiprocessor GPU (H100 SXM, H200), ``decode_products.SPLIT_PER_SM`` items an SM; ``T`` (cache positions) is 72, as in
``profile_decode.py``.
"""
from __future__ import annotations

import argparse
import collections
import glob
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("NUMBA_ENABLE_CUDASIM"):
    sys.exit("decode_resources.py compiles for the GPU: unset NUMBA_ENABLE_CUDASIM")

from numba import cuda, types  # noqa: E402

TILE = None               # a thread's register tile of the tiled products (--tile; default decode_products.TILE)
SMS = 132                  # multiprocessors of an H100 SXM / H200: the split-K plan's target
CC = (9, 0)


def tool(name):
    """Path of a CUDA toolkit program (``ptxas``, ``nvlink``, ``cuobjdump``)."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", "")] + sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    roots += [str(Path(p).parent) for p in glob.glob(
        str(Path(sys.prefix) / "lib/python*/site-packages/nvidia/cu*/bin"))]
    for root in roots:
        path = Path(root) / "bin" / name
        if root and path.exists():
            return str(path)
    sys.exit(f"decode_resources.py: {name} not found (CUDA toolkit; cuobjdump: the "
             "nvidia-cuda-cuobjdump wheel)")


def cudadevrt_dir():
    for root in [os.environ.get("CUDA_HOME", "")] + sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if root and (Path(root) / sub / "libcudadevrt.a").exists():
                return str(Path(root) / sub)
    sys.exit("decode_resources.py: libcudadevrt.a not found (CUDA toolkit)")


def answer_compute_capability():
    """Device functions compile for ``get_current_device().compute_capability``: answer 9.0 (no
    GPU is asked)."""
    import numba.cuda.dispatcher as dispatcher

    class Device:
        compute_capability = CC

    dispatcher.get_current_device = lambda: Device()


def step_signature(kind="float32"):
    """The step kernel's argument types, as ``DeviceModel.decode_iter`` passes them (``kind``: the
    matrices' storage)."""
    def arr(dtype, ndim):
        return types.Array(dtype, ndim, "C")
    f32, f64, i64, u8 = types.float32, types.float64, types.int64, types.uint8
    return ((arr(f32, 1), arr(f32 if kind == "float32" else types.uint16, 1), arr(f32, 1), arr(i64, 2), arr(u8, 2), arr(i64, 1), arr(i64, 1))
            + (arr(f32, 1),) * 8
            + (arr(f64, 2), arr(i64, 2), arr(f64, 2), arr(u8, 2), arr(f64, 2), arr(i64, 2),
               arr(f32, 1), arr(i64, 1), arr(f64, 1), arr(i64, 1), arr(i64, 2), types.int32,
               types.int32))


def step_kernel(decode, cfg, B, sampler, T, kind="float32"):
    lay = decode.Layout(cfg, kind)
    RB = min(32, decode.pow2(B))
    from refopt.kernels.cuda import decode_products

    plan = decode.product_plan(lay.D, lay.F, RB, decode_products.SPLIT_PER_SM * SMS, TILE)
    o, g = lay.layer, lay.glob
    kern = decode.make_step_kernel(
        lay.D, lay.E, lay.F, lay.V, lay.L, lay.H, lay.P, T, RB, bool(cfg.do_layer_norm_before),
        bool(cfg.has_final_layer_norm), bool(cfg.has_projection), sampler, float(cfg.layer_norm_epsilon),
        lay.layer_stride,
        tuple(o[n] for n in ("ln1_g", "ln1_b", "wqkv", "bqkv", "wo", "bo", "ln2_g", "ln2_b", "w1", "b1",
                             "w2", "b2")),
        tuple(g[n] for n in ("embed", "pos", "lnf_g", "lnf_b", "proj_in", "proj_out")),
        plan, decode.MIN_BLOCKS, False, kind, lay.matrix_stride, tuple(decode.ATTENTION_VARIANT),
        RB >= decode.WARP_ATTENTION_FROM, RB * lay.D <= decode.FOLD_NORMS_FLOATS)
    return kern, plan


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def measure(kern, work, name, kind="float32"):
    """Resources of the compiled step kernel (``work``: a scratch folder)."""
    ptx, _ = cuda.compile_ptx(kern.py_func, step_signature(kind), cc=CC,
                              launch_bounds=kern.targetoptions.get("launch_bounds"))
    base = Path(work) / name
    base.with_suffix(".ptx").write_text(ptx)
    info = run([tool("ptxas"), f"-arch=sm_{CC[0]}{CC[1]}", "-v", "-c", str(base.with_suffix(".ptx")),
                "-o", str(base.with_suffix(".o"))])
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
    out["stack"], out["spill st"], out["spill ld"] = (int(v) for v in m.groups())
    out["registers"] = int(re.search(r"Used (\d+) registers", info).group(1))
    cubin = str(base.with_suffix(".cubin"))
    run([tool("nvlink"), f"-arch=sm_{CC[0]}{CC[1]}", str(base.with_suffix(".o")), "-L" + cudadevrt_dir(),
         "-lcudadevrt", "-o", cubin])
    usage = run([tool("cuobjdump"), "-res-usage", cubin])
    entry = re.search(r"Function \S*make_step_kernel\S*:\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    out["shared B"] = int(entry.group(3))
    sass = run([tool("cuobjdump"), "-sass", cubin])
    base.with_suffix(".sass").write_text(sass)
    ops = collections.Counter()
    in_step = False
    for line in sass.splitlines():
        if "Function :" in line:
            in_step = "make_step_kernel" in line
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[.\s;]", line)
        if in_step and m:
            ops[m.group(2)] += 1
    out["SASS"] = sum(ops.values())
    for op in ("FFMA", "FMUL", "FADD", "DADD", "SHFL", "BAR", "LDG", "STG", "LDS", "STS", "LDL", "STL"):
        out[op] = ops.get(op, 0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="125m", help="released OPT shape (default 125m)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--samplers", nargs="+", default=["greedy"])
    ap.add_argument("--positions", type=int, default=72, help="cache positions T (default 72)")
    ap.add_argument("--sass", help="a folder to keep the PTX, SASS and cubins in")
    ap.add_argument("--weights", nargs="+", default=["float32"], choices=("float32", "bfloat16", "float16"),
                    help="how the matrices are stored (default float32)")
    ap.add_argument("--tile", help="a thread's register tile of the tiled products, ROWSxOUTPUTS (e.g. 4x4)")
    args = ap.parse_args(argv)
    global TILE
    TILE = tuple(int(v) for v in args.tile.split("x")) if args.tile else None

    answer_compute_capability()
    from refopt.config import released_config
    from refopt.kernels.cuda import decode

    cfg = released_config(args.size, num_layers=args.layers, dropout=0.0)
    work = args.sass or tempfile.mkdtemp(prefix="decode-resources-")
    os.makedirs(work, exist_ok=True)
    cols = None
    for B, sampler, kind in itertools.product(args.batches, args.samplers, args.weights):
        kern, plan = step_kernel(decode, cfg, B, sampler, args.positions, kind)
        res = measure(kern, work, f"step_{args.size}_b{B}_{sampler}_{kind}", kind)
        if cols is None:
            cols = list(res)
            print(f"OPT-{args.size} shape, {args.layers} layers, T={args.positions}, sm_{CC[0]}{CC[1]}, "
                  f"{decode.THREADS} threads a block")
            print("| batch | products | sampler | weights | " + " | ".join(cols) + " |")
            print("| ---: | --- | --- | --- |" + " ---: |" * len(cols))
        products = "tiled" if plan.tiled else "warp"
        print(f"| {B} | {products} | {sampler} | {kind} | " + " | ".join(str(res[c]) for c in cols)
              + " |", flush=True)
    if not args.sass:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
