"""The Numba CPU backend against the CPU engines that run OPT, in one run.

    python benchmarks/bench_cpu.py [--layers 12] [--new 64] [--repeats 2] [--skip-cold]

A random float32 OPT-125m-shaped checkpoint (12 layers, 768 wide, 3072 MLP, vocabulary 50,272;
transformers layout, with the real OPT tokenizer files from ../shared/data/opt when present so
CTranslate2's converter can read it) is written to a temporary directory.  Then, with the same
thread count everywhere (``--threads``, default all cores):

* greedy decode tokens/s at batch 1 and 8 (prompt 8, ``--new`` new tokens; new tokens / wall time
  of the whole ``generate`` call, best of ``--repeats`` after a warm-up): refopt NumPy float32,
  refopt Numba float32 / bfloat16 / int8 weights, transformers + PyTorch float32, CTranslate2
  float32 and int8 (when installed);
* the memory-bandwidth bound of decode: a streaming read of an array the size of the float32 weights, measured in this run
  (Numba parallel sum), divided by the bytes of weights one token reads; each batch-1 figure is
  also given as a percentage of that bound;
* prefill tokens/s (batch 4 x 128) and one training step (batch 2 x 128, forward + backward +
  Adam) for refopt (Numba, float32) and transformers;
* cold start: seconds from a fresh interpreter to the first generated token, with an empty Numba
  cache directory and again with the cache it left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import refopt  # noqa: F401  (before NumPy: sets OpenBLAS's thread timeout, see refopt/__init__)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, write_random_checkpoint  # noqa: E402


def best(fn, repeats):
    return best_time(fn, repeats)[0]


def stream_bandwidth(nbytes=1 << 30, repeats=5):
    """Bytes per second of a parallel streaming read (Numba), best of ``repeats``."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def total(a):
        s = 0.0
        for i in prange(a.shape[0]):
            s += a[i]
        return s

    a = np.ones(nbytes // 4, np.float32)
    t = best(lambda: total(a), repeats)
    return a.nbytes / t


def weight_bytes(params):
    """Bytes of parameters one decode token reads: every matrix and vector once (the token table
    once, as the LM head; one position row, negligible, counted as the table)."""
    return sum(getattr(v, "nbytes", 0) for k, v in params.items() if k != "embed_positions")


COLD = r"""
import sys, time
t0 = time.perf_counter()
from refopt.models import OPTCausalLM
import numpy as np
lm = OPTCausalLM.from_preset(sys.argv[1], preprocessor=None, backend="numba")
lm.compile(sampler="greedy")
lm.generate({"token_ids": np.array([[2, 100, 200, 300, 1]]),       # room for one new token
             "padding_mask": np.array([[1, 1, 1, 1, 0]], bool)}, stop_token_ids=None)
print(time.perf_counter() - t0)
"""


def cold_start(path):
    cache = tempfile.mkdtemp(prefix="numba-cache-")
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    times = []
    for _ in range(2):       # first: empty cache (compiles and fills it); second: reads it
        out = subprocess.run([sys.executable, "-c", COLD, path], capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        times.append(float(out.stdout.strip().splitlines()[-1]))
    shutil.rmtree(cache, ignore_errors=True)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)

    import numba

    numba.set_num_threads(args.threads)
    from refopt.models import OPTCausalLM

    rows = []      # (section, label, value, unit, note)
    tmp = tempfile.mkdtemp(prefix="refopt-bench-")
    try:
        path = os.path.join(tmp, "opt125m")
        cfg = write_random_checkpoint(path, args.layers, tokenizer_files=True)
        # a read of as many bytes as decode streams per float32 token (the L3 cache, 32 MiB on
        # some machines here, keeps a few percent of them between tokens: a figure can pass 100%)
        bw = stream_bandwidth(4 * cfg.parameter_count())
        rng = np.random.default_rng(0)
        total_len = args.prompt + args.new

        # ---------------------------------------------------------------- refopt decode
        variants = [("refopt numpy f32", "numpy", None), ("refopt numba f32", "numba", None),
                    ("refopt numba bf16", "numba", "bfloat16"), ("refopt numba int8", "numba", "int8")]
        decode = {}
        bound = {}
        for label, backend, wdt in variants:
            lm = OPTCausalLM.from_preset(path, preprocessor=None, backend=backend, weights_dtype=wdt)
            lm.compile(sampler="greedy")
            bound[label] = bw / weight_bytes(lm.backbone.params)
            for B in args.batch:
                ids = rng.integers(3, cfg.vocabulary_size, (B, args.prompt))
                x = {"token_ids": np.concatenate([ids, np.ones((B, args.new), ids.dtype)], 1),
                     "padding_mask": np.concatenate([np.ones((B, args.prompt), bool),
                                                     np.zeros((B, args.new), bool)], 1)}
                t = best(lambda: lm.generate(x, max_length=total_len, stop_token_ids=None), args.repeats)
                decode[(label, B)] = B * args.new / t
            del lm

        # ---------------------------------------------------------------- transformers
        try:
            import torch
            import transformers

            torch.set_num_threads(args.threads)
            hf = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for B in args.batch:
                ids = torch.tensor(rng.integers(3, cfg.vocabulary_size, (B, args.prompt)))

                def gen():
                    with torch.no_grad():
                        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=1)

                decode[("transformers f32", B)] = B * args.new / best(gen, args.repeats)
        except ImportError:
            hf = None

        # ---------------------------------------------------------------- CTranslate2
        try:
            import ctranslate2
            from ctranslate2.converters import TransformersConverter

            vocab = json.loads((Path(path) / "vocab.json").read_text()) if (Path(path) / "vocab.json").exists() else None
            ct2_dir = os.path.join(tmp, "ct2")
            TransformersConverter(path).convert(ct2_dir, quantization="float32", force=True)
            inv = {v: k for k, v in vocab.items()}
            for ctype, label in (("float32", "ctranslate2 f32"), ("int8", "ctranslate2 int8")):
                gen = ctranslate2.Generator(ct2_dir, device="cpu", compute_type=ctype,
                                            intra_threads=args.threads)
                for B in args.batch:
                    prompts = [[inv.get(int(i), "<unk>") for i in row]
                               for row in rng.integers(3, len(vocab), (B, args.prompt))]

                    def run():
                        gen.generate_batch(prompts, max_length=args.new, min_length=args.new,
                                           sampling_topk=1, include_prompt_in_result=False,
                                           end_token=[])

                    decode[(label, B)] = B * args.new / best(run, args.repeats)
        except ImportError:
            pass
        except Exception as e:  # a converter/version mismatch: report, do not hide the rest
            print(f"CTranslate2 skipped: {type(e).__name__}: {e}", file=sys.stderr)

        base = {B: decode.get(("transformers f32", B)) for B in args.batch}
        print(f"125m-shaped random model ({args.layers} layers), prompt {args.prompt}, {args.new} new tokens, "
              f"{args.threads} threads; streaming read {bw / 1e9:.1f} GB/s")
        print(f"{'greedy decode tok/s':24s}" + "".join(f"{'batch ' + str(B):>12s}{'vs HF':>8s}" for B in args.batch)
              + f"{'% of bound (b1)':>17s}")
        for label in [v[0] for v in variants] + ["transformers f32", "ctranslate2 f32", "ctranslate2 int8"]:
            if (label, args.batch[0]) not in decode:
                continue
            line = f"{label:24s}"
            for B in args.batch:
                v = decode[(label, B)]
                ratio = f"{v / base[B]:.2f}x" if base[B] else ""
                line += f"{v:12.1f}{ratio:>8s}"
            if label in bound:
                line += f"{100 * decode[(label, args.batch[0])] / bound[label]:16.0f}%"
            print(line)
        for label, b in bound.items():
            print(f"  bandwidth bound {label:20s} {b:7.1f} tok/s")

        # ---------------------------------------------------------------- prefill and training
        lm = OPTCausalLM.from_preset(path, preprocessor=None, backend="numba")
        ids = rng.integers(3, cfg.vocabulary_size, (4, 128))
        x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        t_ours = best(lambda: lm.predict(x), args.repeats)
        line = f"{'prefill 4x128 tok/s':24s}{512 / t_ours:12.0f}"
        if hf is not None:
            tid = torch.tensor(ids)

            def fwd():
                with torch.no_grad():
                    hf(input_ids=tid, attention_mask=torch.ones_like(tid))

            t_hf = best(fwd, args.repeats)
            line += f"{512 / t_hf:12.0f} (transformers)  ratio {t_hf / t_ours:.2f}x"
        print(line)

        if not args.skip_train:
            from refopt import optimizers

            ids = rng.integers(3, cfg.vocabulary_size, (2, 129))
            xt = {"token_ids": ids[:, :-1], "padding_mask": np.ones((2, 128), bool)}
            y, sw = ids[:, 1:], np.ones((2, 128))
            lm.backbone.params = {k: np.array(v) for k, v in lm.backbone.params.items()}  # writable
            opt = optimizers.Adam(learning_rate=1e-5)

            def step():
                _, grads = lm.loss_and_gradients(xt, y, sw)
                opt.apply(grads, lm.backbone.params)

            t_ours = best(step, args.repeats)
            line = f"{'train step 2x128 (s)':24s}{t_ours:12.3f}"
            if hf is not None:
                hf.train()
                topt = torch.optim.Adam(hf.parameters(), lr=1e-5)
                tid = torch.tensor(ids)

                def tstep():
                    topt.zero_grad()
                    out = hf(input_ids=tid[:, :-1], labels=tid[:, :-1])
                    out.loss.backward()
                    topt.step()

                t_hf = best(tstep, args.repeats)
                line += f"{t_hf:12.3f} (transformers)  ratio {t_hf / t_ours:.2f}x"
            print(line)

        if not args.skip_cold:
            cold, warm = cold_start(path)
            print(f"{'cold start to 1st token':24s}{cold:10.2f} s with an empty Numba cache, "
                  f"{warm:.2f} s with the cache")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
