"""Profile the persistent decode kernel on the GPU: step time per batch, register budget and
register tile, and where a step's time goes (SM clocks of block 0 per stage).

    python3 benchmarks/profile_decode.py                      # batches 1 and 32
    BATCHES="1 8 32" MINB="1 2 4" PROF=1 python3 benchmarks/profile_decode.py
    WEIGHTS="float32 bfloat16" TILES="4x4 4x8" ATTN="00 11" PHASES=1 python3 benchmarks/profile_decode.py

BATCHES: batch sizes; MINB: ``decode.MIN_BLOCKS`` values (blocks per SM the kernel's registers must
allow); SPLITS: ``decode_products.SPLIT_PER_SM`` values (split products' work items per SM);
PREFETCH: ``decode_products.PREFETCH`` values (chunks of weights asked of the L2 ahead); WATT:
``decode.WARP_ATTENTION_FROM`` values (batch passes of that many rows take a warp an attention
item; 64: never); TILES:
``decode_products.TILE``
values (a thread's register tile for every batch pass, tiled products only; default: the plan's own); ATTN: ``decode.ATTENTION_VARIANT`` values
(two digits: the attention's scores a thread a position, its weighted values four positions a
pass); WEIGHTS: how the matrices are stored; PROF=1 adds the per-stage profile (and the SM clock rate it ran at: the cycles of one launch over
its time); PHASES=1 the time of a whole decode split into the prompt's prefill and the launches.
Random 125m-shaped model, 8 prompt tokens, 64 greedy steps, 16 steps a launch, best of 3.
"""
import itertools
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_random_checkpoint  # noqa: E402
from numba import cuda  # noqa: E402

from refopt.kernels.cuda import decode, decode_products  # noqa: E402
from refopt.models import OPTCausalLM  # noqa: E402


def first(per_signature):
    return list(per_signature.values())[0]


def main():
    tmp = tempfile.mkdtemp()
    write_random_checkpoint(tmp + "/m", layers=12)
    lm = OPTCausalLM.from_preset(tmp + "/m", preprocessor=None)
    P, N = 8, 64
    batches = [int(b) for b in os.environ.get("BATCHES", "1 32").split()]
    mins = [int(r) for r in os.environ.get("MINB", "1").split()]
    tiles = [tuple(int(v) for v in t.split("x")) for t in os.environ.get("TILES", "").split()] or [None]
    splits = [int(v) for v in os.environ.get("SPLITS", str(decode_products.SPLIT_PER_SM)).split()]
    fetches = [int(v) for v in os.environ.get("PREFETCH", str(decode_products.PREFETCH)).split()]
    watts = [int(v) for v in os.environ.get("WATT", str(decode.WARP_ATTENTION_FROM)).split()]
    attns = [tuple(c == "1" for c in a) for a in os.environ.get(
        "ATTN", "".join(str(int(v)) for v in decode.ATTENTION_VARIANT)).split()]
    for kind, B in itertools.product(os.environ.get("WEIGHTS", "float32").split(), batches):
        dm = decode.DeviceModel(lm.backbone.params, lm.backbone.config, weights=kind)
        ids = np.ones((B, P + N), np.int64)
        ids[:, :P] = np.random.default_rng(B).integers(3, 50000, (B, P))
        mask = np.zeros(ids.shape, bool)
        mask[:, :P] = True
        print(f"B={B} weights={kind} plan={dm.plan(B)}", flush=True)
        ref = None
        tiled = dm.plan(B).tiled
        for mb, tile, attn, split, fetch, watt in itertools.product(
                mins, tiles if tiled else tiles[:1], attns, splits if tiled else splits[:1],
                fetches if tiled else fetches[:1], watts):
            decode.MIN_BLOCKS, decode.BLOCKS_PER_SM = mb, max(2, mb)
            decode.WARP_ATTENTION_FROM = watt
            decode_products.SPLIT_PER_SM, decode_products.PREFETCH = split, fetch
            if tile is not None:                 # this tile for every batch pass
                decode_products.TILE, decode_products.TILE_BY_ROWS = tile, {}
            decode.ATTENTION_VARIANT = attn
            decode.PROFILE = False
            t = time.perf_counter()
            out = dm.decode(ids, mask, P, "greedy", steps_per_launch=16)
            compile_s = time.perf_counter() - t
            step = dm.step_kernel(P + N, B, "greedy")
            times = []
            for _ in range(3):
                cuda.synchronize()
                t = time.perf_counter()
                out = dm.decode(ids, mask, P, "greedy", steps_per_launch=16)
                cuda.synchronize()
                times.append(time.perf_counter() - t)
            ref = out if ref is None else ref
            print(f"B={B:2d} {kind} min_blocks={mb} tile={dm.plan(B).tile} attention={attn} splits/SM={split} prefetch={fetch} warp attention from {watt} rows: registers {first(step.get_regs_per_thread())}, "
                  f"local bytes {first(step.get_local_mem_per_thread())}, shared bytes "
                  f"{first(step.get_shared_mem_per_block())}, first call {compile_s:.1f} s | "
                  f"{min(times) / N * 1e3:.3f} ms/step, {B * N / min(times):.0f} tok/s, "
                  f"same tokens as the first variant: {np.array_equal(out, ref)}", flush=True)
            if os.environ.get("PHASES"):
                tokens = cuda.to_device(ids)
                pre = []
                for _ in range(3):
                    cuda.synchronize()
                    t = time.perf_counter()
                    dm.prefill(tokens, B, P, P + N)
                    cuda.synchronize()
                    pre.append(time.perf_counter() - t)
                one = []
                for _ in range(3):
                    cuda.synchronize()
                    t = time.perf_counter()
                    dm.decode(ids, mask, P, "greedy", steps_per_launch=N)
                    cuda.synchronize()
                    one.append(time.perf_counter() - t)
                # a prompt of up to decode.prompt_steps(B) positions runs through the step kernel
                # (P - 1 steps more), a longer one through the prefill
                short = P <= decode.prompt_steps(B)
                kernel_s = min(one) - (0 if short else min(pre))
                print(f"   phases: prefill by the general kernels {min(pre) * 1e3:.2f} ms "
                      f"({'not used: the prompt runs through the step kernel' if short else 'used'}); "
                      f"whole decode, 16 steps a launch {min(times) * 1e3:.2f} ms, in one launch "
                      f"{min(one) * 1e3:.2f} ms -> {kernel_s / (N + (P - 1 if short else 0)) * 1e3:.3f} "
                      "ms a step in the kernel", flush=True)
            if os.environ.get("PROF"):
                decode.PROFILE = True
                dm.decode(ids, mask, P, "greedy", steps_per_launch=N)
                cuda.synchronize()
                t = time.perf_counter()
                dm.decode(ids, mask, P, "greedy", steps_per_launch=N)
                cuda.synchronize()
                wall = time.perf_counter() - t
                decode.PROFILE = False
                stages = decode.stage_times(dm.profile)
                total = sum(stages.values())
                steps = N + (P - 1 if P <= decode.prompt_steps(B) else 0)     # (the last launch's N)
                print(f"   stages, % of {total // N} cycles a step ({total * steps / N / wall / 1e9:.2f} GHz "
                      "counting the prompt's time as the kernel's): " + ", ".join(
                          f"{k} {100 * v / total:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])),
                      flush=True)


if __name__ == "__main__":
    main()
