"""The flash attention kernels' variants side by side on one GPU (issue 21): the forward
(``REFOPT_FLASH`` ``v1`` / ``v2``, ``v2`` with and without the next key tile prefetched; ``v2-u8``:
8 head / key steps a pass of its loops, :data:`~refopt.kernels.cuda.attention.UNROLL`) and the
forward + backward (``v1`` / ``v2`` / ``v3`` backward, ``v2-u8`` likewise, ``v3-m512``: the third
with 512 MiB of ``dS`` scratch, :data:`~refopt.kernels.cuda.flash_backward.SCRATCH_BYTES`;
``v3-noprefetch``: its ``dq`` without the next tiles' loads in flight), against
``torch.nn.functional.scaled_dot_product_attention`` (float32, TF32 off), causal, batch 8 x 12
heads x 2048 x 64 by default.

    python3 benchmarks/flash_variants.py [--seq 2048] [--repeats 20] [--resources] [--split]

Each figure: the median (min-max) of ``--repeats`` event-timed calls after a warm-up, in TFLOP/s
(the forward's causal half of ``4 B H T^2 K``; the backward 2.5 times that); the error is the largest
absolute difference over the largest reference value; "first call": the seconds of a variant's first
call (its compilation included).  ``--resources`` also prints ptxas's
registers / spills and the SASS loops of the ``v2`` forward (needs ``cuobjdump``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cuda_event_times, torch_event_times  # noqa: E402


def fmt(flops, ms):
    med = statistics.median(ms)
    return f"{flops / med / 1e9:6.1f} ({flops / max(ms) / 1e9:.1f}-{flops / min(ms) / 1e9:.1f}) [{med:.3f} ms]"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--resources", action="store_true")
    ap.add_argument("--split", action="store_true",
                    help="also time the third backward's dkdv launches and dq launches alone")
    ap.add_argument("--forward", nargs="*", default=["v1", "v2", "v2-noprefetch"])
    ap.add_argument("--backward", nargs="*", default=["v1", "v2"])
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from numba import cuda

    from refopt.kernels.cuda import attention as A
    from refopt.kernels.cuda import flash_backward as FB

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    B, H, T, K = 8, 12, args.seq, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, d_out = (torch.randn(B, H, T, K, device="cuda", generator=g) for _ in range(4))
    flops = 2 * B * H * T * T * K
    R = args.repeats
    t_f = torch_event_times(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), R)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).cpu().numpy()
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def theirs_fb():
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        torch.autograd.grad(o, (qg, kg, vg), d_out)
    t_fb = torch_event_times(theirs_fb, R)
    want_g = [w.cpu().numpy() for w in torch.autograd.grad(
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg), d_out)]
    print(f"SDPA forward         {fmt(flops, t_f)}", flush=True)
    print(f"SDPA forward+backward {fmt(3.5 * flops, t_fb)}", flush=True)

    dq, dk, dv, ddo = (cuda.as_cuda_array(t.reshape(-1)) for t in (q, k, v, d_out))
    out = cuda.device_array(B * H * T * K, np.float32)
    m, l, dlt = (cuda.device_array(B * H * T, np.float32) for _ in range(3))
    km = cuda.to_device(np.ones((B, T), np.uint8))
    strides = (H * T * K, T * K, K)
    st = dict.fromkeys(("q", "k", "v", "o", "d_o", "d_q", "d_k", "d_v"), strides)
    grads = [cuda.device_array(B * H * T * K, np.float32) for _ in range(3)]

    def fwd():
        A.flash_attention(dq, dk, dv, out, strides, strides, strides, strides, B, H, T, T, K,
                          key_mask=km, causal=True, scale=K ** -0.5, stats=(m, l))

    def bwd():
        FB.flash_backward(dq, dk, dv, out, ddo, m, l, km, *grads, dlt, st, B, H, T, T, K, causal=True,
                          scale=K ** -0.5)

    def unroll(name, default):
        # "v2-u8": the second kernels with 8 steps a pass of their loops
        return next((int(p[1:]) for p in name.split("-")[1:] if p[:1] == "u"), default)

    def first(fn):
        # seconds of a first call: compiling (Numba, NVVM, the driver's PTX to SASS), loading, running
        t = time.perf_counter()
        fn()
        cuda.synchronize()
        return time.perf_counter() - t

    def cap(name, default):
        # "v3-m512": the third backward with 512 MiB of dS scratch (its chunks of slices)
        return next((int(p[1:]) << 20 for p in name.split("-")[1:] if p[:1] == "m"), default)

    fwd_unroll, bwd_unroll, bwd_cap, bwd_prefetch = A.UNROLL, FB.UNROLL, FB.SCRATCH_BYTES, FB.DQ_PREFETCH
    for name in args.forward:
        A.VARIANT = name.split("-")[0]
        A.PREFETCH = "noprefetch" not in name
        A.UNROLL = unroll(name, fwd_unroll)
        out[:1].copy_to_device(np.full(1, np.nan, np.float32))
        print(f"forward {name:14s} first call {first(fwd):.1f} s", flush=True)
        ms = cuda_event_times(fwd, R)
        err = rel_err(out.copy_to_host().reshape(B, H, T, K), want)
        ratio = statistics.median(t_f) / statistics.median(ms)
        print(f"forward {name:14s} {fmt(flops, ms)}  {ratio:.2f}x  err {err:.1e}", flush=True)
    A.VARIANT, A.PREFETCH, A.UNROLL = "v2", True, fwd_unroll
    for name in args.backward:
        FB.VARIANT = name.split("-")[0]
        FB.UNROLL = unroll(name, bwd_unroll)
        FB.SCRATCH_BYTES = cap(name, bwd_cap)
        FB.DQ_PREFETCH = "noprefetch" not in name
        fwd()
        print(f"backward {name:13s} first call {first(bwd):.1f} s", flush=True)
        ms_b = cuda_event_times(bwd, R)
        ms_fb = cuda_event_times(lambda: (fwd(), bwd()), R)
        err = max(rel_err(gr.copy_to_host().reshape(B, H, T, K), w) for gr, w in zip(grads, want_g))
        print(f"backward {name:13s} alone {fmt(2.5 * flops, ms_b)}  fwd+bwd {fmt(3.5 * flops, ms_fb)}  "
              f"{statistics.median(t_fb) / statistics.median(ms_fb):.2f}x  err {err:.1e}", flush=True)
        if args.split and FB.VARIANT == "v3":
            # each of the two kernels' launches alone (the other's skipped: the gradients are not
            # checked here), their chunks as in the whole backward
            dkdv3, dq3 = FB.make_flash_backward_v3(True, FB.UNROLL, FB.DQ_PREFETCH)
            real = FB.launcher
            for keep, label in ((dkdv3, "dkdv"), (dq3, "dq")):
                FB.launcher = lambda k, keep=keep: real(k) if k is keep else (lambda *a: None)
                try:
                    ms_k = cuda_event_times(bwd, R)
                finally:
                    FB.launcher = real
                print(f"backward {name:13s} {label} launches alone {statistics.median(ms_k):.3f} ms "
                      f"({min(ms_k):.3f}-{max(ms_k):.3f})", flush=True)
    FB.SCRATCH_BYTES, FB.DQ_PREFETCH = bwd_cap, bwd_prefetch

    # what the compiled kernels use (registers, local memory: spills)
    FB.UNROLL = bwd_unroll
    kernels = [("forward v2", A.make_flash_forward_v2(64, True, A.PREFETCH, A.UNROLL))]
    if "v2" in args.backward:
        kernels += list(zip(("dkdv v2", "dq v2"), FB.make_flash_backward_v2(True, FB.UNROLL)))
    if any(n.split("-")[0] == "v3" for n in args.backward):
        kernels += list(zip(("dkdv v3", "dq v3"), FB.make_flash_backward_v3(True, FB.UNROLL)))
    for name, kern in kernels:
        try:
            print(f"{name}: registers {kern.get_regs_per_thread()}, local bytes "
                  f"{kern.get_local_mem_per_thread()}, shared bytes {kern.get_shared_mem_per_block()}")
        except Exception as e:          # noqa: BLE001 (a report line, not a failure)
            print(f"{name}: resources not read ({e})")

    if args.resources:
        from numba import types

        import gemm_resources as GR

        f32 = types.float32
        a1 = types.Array(f32, 1, "C")
        sig = ((a1,) * 6 + (types.Array(types.uint8, 2, "C"),) + (types.int64,) * 12 + (types.int32,) * 5
               + (f32,))
        for pf in (True, False):
            info, sass = GR.assemble(A.make_flash_forward_v2(64, True, pf, A.UNROLL), sig, f"flash_v2_{pf}")
            print(f"flash forward v2 prefetch={pf}: {info}")
            GR.report_loops(sass)


if __name__ == "__main__":
    main()
