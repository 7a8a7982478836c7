"""The Numba CPU backend against the CPU engines that run OPT, in one process.

    python benchmarks/bench_cpu.py [--runs 5] [--under-load] [--size 125m] [--layers 12]
                                   [--new 64] [--batch 1 8] [--repeats 2] [--threads N]
                                   [--weights numpy f32 bf16 f16 int8] [--skip-cold] [--skip-train]

A random float32 OPT checkpoint of a released shape (default 125m: 12 layers, 768 wide, 3072 MLP,
vocabulary 50,272; ``--size 1.3b --layers 4`` for the products of a 1.3b-shaped layer) is written
to a temporary directory in transformers' layout, with the real OPT tokenizer files from
../shared/data/opt when present so CTranslate2's converter can read it.  Every engine is loaded
once, in this process: refopt NumPy float32, refopt Numba float32 / bfloat16 / int8 weights
(``--weights``; float16 too on request, and ``w8a8``: int8 weights with
``activations="int8"``, integer products, CTranslate2's int8 numerics),
transformers + PyTorch float32, CTranslate2 float32 and int8 (when installed), all on the same
thread count (``--threads``, default all cores), and CTranslate2 int8 on one thread as well (on
the Intel Xeon of session 23 its int8 decoded 1.7-2.2x faster on one thread than on two).  Then, ``--runs`` times:

* the memory-bandwidth bound of decode: a streaming read of an array the size of the float32
  weights (Numba parallel sum), divided by the bytes of weights one token reads; the batch-1
  figures are also given as a percentage of the bound measured at the start of that run, and of
  the same read measured again just before each Numba variant's batch-1 timing ("% of read
  beside": on a shared host the read moves between runs and within one, 24-32 GB/s in session
  22, and the read beside a timing is the nearer yardstick; with ``--under-load`` it is measured
  with the busy process running, as the timing is);
* greedy decode tokens/s at each batch (prompt 8, ``--new`` new tokens; new tokens / wall time of
  a whole ``generate`` call, best of ``--repeats`` after a warm-up), every engine measured back to
  back at one batch before the next batch, so the ratios compare engines under the same load.
  Every engine is called once at every batch before the first run, so every run finds the engines
  in the same state (a CTranslate2 call slows transformers' later calls in the same process, for
  good, on some CPUs: see ``main``).

The table gives each figure's median over the runs and, with several runs, its range, and for the
batch-1 ratio to transformers the largest deviation from the median.  ``uptime``'s load is printed
for every run.  ``--under-load`` runs a competing busy process (one Python loop, one core) during
the decode measurements.  Afterwards: prefill tokens/s (batch 4 x 128) and one training step
(batch 2 x 128, forward + backward + Adam) for refopt (Numba, float32) and transformers, each
best of ``--repeats`` after a warm-up call, as the decode figures are; and the
cold start of ``refopt generate "ROMEO:" --max-length 64`` on the bundled model: seconds from the
command's start to its first generated character, with an empty Numba cache (``NUMBA_CACHE_DIR``
pointed at a new directory) and again with the cache that run left.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import refopt  # noqa: F401  (before NumPy: sets OpenBLAS's thread timeout, see refopt/__init__)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BusyCore, best_time, load_average, write_random_checkpoint  # noqa: E402


def best(fn, repeats):
    return best_time(fn, repeats)[0]


@functools.cache
def _reader():
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def total(a):
        s = 0.0
        for i in prange(a.shape[0]):
            s += a[i]
        return s
    return total


@functools.lru_cache(maxsize=1)
def _streamed_array(nbytes):
    return np.ones(nbytes // 4, np.float32)


def stream_bandwidth(nbytes, repeats=5):
    """Bytes per second of a parallel streaming read (Numba), best of ``repeats``: the kernel
    compiled once and the array allocated once (the read runs before every Numba variant's timing)."""
    total, a = _reader(), _streamed_array(nbytes)
    t = best(lambda: total(a), repeats)
    return a.nbytes / t


def weight_bytes(params):
    """Bytes of parameters one decode token reads: every matrix and vector once (int8: the int8
    data, the float32 scales and, with int8 activations, the int64 row sums; the token table
    once, as the LM head; one position row, negligible, counted as the table).  Not counted, so
    the bound is a few percent generous to refopt: the KV cache a step reads (125m, prompt 8 + 32
    tokens: 0.6-2.9 MB, 1.4% of the int8 weights on average) and the prompt's prefill, which
    reads the layers once more per ``generate`` (86 MB in int8: 2.2% over 32 tokens)."""
    return sum(getattr(v, "nbytes", 0) for k, v in params.items() if k != "embed_positions")


# ----------------------------------------------------------------------------- engines
VARIANTS = {"numpy": ("refopt numpy f32", "numpy", None), "f32": ("refopt numba f32", "numba", None),
            "bf16": ("refopt numba bf16", "numba", "bfloat16"),
            "f16": ("refopt numba f16", "numba", "float16"), "int8": ("refopt numba int8", "numba", "int8"),
            "w8a8": ("refopt numba w8a8", "numba", "int8")}     # int8 weights and activations


def refopt_engines(path, names):
    """(label, model, bytes one token reads) for each refopt variant named."""
    from refopt import generation
    from refopt.models import OPTCausalLM

    out = []
    for label, backend, wdt in (VARIANTS[n] for n in names):
        lm = OPTCausalLM.from_preset(path, preprocessor=None, backend=backend, weights_dtype=wdt,
                                     activations="int8" if "w8a8" in label else None)
        lm.compile(sampler="greedy")
        job = generation.prepare(lm)
        if job is not None:
            job.wait()
        out.append((label, lm, weight_bytes(lm.backbone.params)))
    return out


def refopt_run(lm, ids, new):
    B, P = ids.shape
    x = {"token_ids": np.concatenate([ids, np.ones((B, new), ids.dtype)], 1),
         "padding_mask": np.concatenate([np.ones((B, P), bool), np.zeros((B, new), bool)], 1)}
    return lambda: lm.generate(x, stop_token_ids=None)


def hf_engine(path, threads):
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_run(hf, ids, new):
    import torch

    tid = torch.tensor(ids)

    def gen():
        with torch.no_grad():
            hf.generate(tid, attention_mask=torch.ones_like(tid), do_sample=False,
                        max_new_tokens=new, min_new_tokens=new, pad_token_id=1)
    return gen


def ct2_engines(path, tmp, threads):
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return []
    vocab_file = Path(path) / "vocab.json"
    if not vocab_file.exists():
        print("CTranslate2 skipped: no tokenizer files (../shared/data/opt) to convert with",
              file=sys.stderr)
        return []
    try:
        ct2_dir = os.path.join(tmp, "ct2")
        TransformersConverter(path).convert(ct2_dir, quantization="float32", force=True)
        inv = {v: k for k, v in json.loads(vocab_file.read_text()).items()}
        kinds = [("float32", threads, "ctranslate2 f32"), ("int8", threads, "ctranslate2 int8")]
        if threads > 1:      # CTranslate2 int8 on one thread too: on some hosts its fastest count
            kinds.append(("int8", 1, "ctranslate2 int8 1 thr"))
        return [(label, ctranslate2.Generator(ct2_dir, device="cpu", compute_type=ctype,
                                              intra_threads=n), inv)
                for ctype, n, label in kinds]
    except Exception as e:  # a converter/version mismatch: report, do not hide the rest
        print(f"CTranslate2 skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return []


def ct2_run(gen, inv, ids, new):
    prompts = [[inv.get(int(i), "<unk>") for i in row] for row in ids]
    return lambda: gen.generate_batch(prompts, max_length=new, min_length=new, sampling_topk=1,
                                      include_prompt_in_result=False, end_token=[])


# ----------------------------------------------------------------------------- cold start
COLD_ARGS = ["ROMEO:", "--max-length", "64", "--seed", "1"]


def first_token_seconds(env):
    """Seconds from starting ``refopt generate`` to its first generated character, and to exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-u", "-m", "refopt", "generate", *COLD_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    echo = len(COLD_ARGS[0].encode())
    seen, first = 0, None
    while True:
        c = proc.stdout.read(1)
        if not c:
            break
        seen += 1
        if first is None and seen > echo:
            first = time.perf_counter() - t0
    proc.wait()
    if proc.returncode:
        raise SystemExit(proc.stderr.read().decode()[-2000:])
    return first, time.perf_counter() - t0


def cold_start():
    cache = tempfile.mkdtemp(prefix="numba-cache-")
    env = {**os.environ, "NUMBA_CACHE_DIR": cache,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    try:
        return [first_token_seconds(env) for _ in range(2)]   # empty cache, then the one it left
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ----------------------------------------------------------------------------- the table
def spread(values):
    med = statistics.median(values)
    return med, min(values), max(values)


def report(decode, ratios, bounds, args, beside=None):
    runs = len(next(iter(decode.values())))
    beside = beside or {}
    head = f"{'greedy decode tok/s':24s}" + "".join(
        f"{'batch ' + str(B):>22s}{'vs transformers':>22s}" for B in args.batch) + (
        f"{'% of bound (b1)':>20s}{'% of read beside':>20s}" if args.batch[0] == 1 else "")
    print(head)
    labels = [k[0] for k in decode if k[1] == args.batch[0]]
    for label in labels:
        line = f"{label:24s}"
        for B in args.batch:
            med, lo, hi = spread(decode[(label, B)])
            line += f"{med:10.1f}" + (f" ({lo:.1f}-{hi:.1f})" if runs > 1 else "").rjust(12)
            if (label, B) in ratios:
                rmed, rlo, rhi = spread(ratios[(label, B)])
                line += f"{rmed:9.2f}x" + (f" ({rlo:.2f}-{rhi:.2f})" if runs > 1 else "").rjust(13)
            else:
                line += " " * 22
        for table in (bounds, beside):
            if label in table and args.batch[0] == 1:   # the bound is one token's read: batch 1
                pct = [100 * d / b for d, b in zip(decode[(label, args.batch[0])], table[label])]
                med, lo, hi = spread(pct)
                line += f"{med:8.0f}%" + (f" ({lo:.0f}-{hi:.0f})" if runs > 1 else "").rjust(11)
        print(line)
    for label, b in bounds.items():
        print(f"  bandwidth bound {label:20s} {statistics.median(b):8.1f} tok/s (median of {runs})")
    for label, b in beside.items():
        print(f"  read beside     {label:20s} {statistics.median(b):8.1f} tok/s (median of {runs}; "
              f"{min(b):.1f}-{max(b):.1f})")
    if runs > 1:
        for label in labels:
            key = (label, args.batch[0])
            if key in ratios and "transformers" not in label:
                med = statistics.median(ratios[key])
                dev = max(abs(r / med - 1) for r in ratios[key])
                print(f"  batch-{args.batch[0]} ratio {label:20s} largest deviation from the median "
                      f"{100 * dev:4.0f}% over {runs} runs")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="125m")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--weights", nargs="+", choices=sorted(VARIANTS), default=["numpy", "f32", "bf16", "int8"],
                    help="refopt variants to time (default: numpy f32 bf16 int8)")
    ap.add_argument("--under-load", action="store_true",
                    help="a competing busy process keeps one core busy during the decode runs")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)

    import numba

    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="refopt-bench-")
    try:
        path = os.path.join(tmp, "model")
        cfg = write_random_checkpoint(path, args.layers, size=args.size, tokenizer_files=True)
        print(f"{args.size}-shaped random model ({args.layers} layers, {cfg.hidden_dim} wide), prompt "
              f"{args.prompt}, {args.new} new tokens, {args.threads} threads"
              + ("; a busy process on one core during decoding" if args.under_load else ""))
        mine = refopt_engines(path, args.weights)
        hf = hf_engine(path, args.threads)
        ct2 = ct2_engines(path, tmp, args.threads)
        # every engine called once at every batch before the first run, so that every run finds the
        # engines in the same state: on an Intel Xeon (session 23) the process's first CTranslate2
        # call slowed transformers' later calls 1.3-1.4x for good (42 -> 30 tok/s at batch 1; its
        # small in-cache products lost the speed they get from OpenMP threads that spin between
        # regions), so run 1 had measured another transformers than runs 2-5.  transformers' batch-1
        # speed before that call is printed, to show what the in-process ratios are measured against
        for B in args.batch:
            ids = rng.integers(3, cfg.vocabulary_size, (B, args.prompt))
            for label, lm, nbytes in mine:
                refopt_run(lm, ids, args.new)()
            if hf is not None:
                if B == args.batch[0] and ct2:
                    alone = B * args.new / best(hf_run(hf, ids, args.new), args.repeats)
                    print(f"transformers f32 at batch {B} before the first CTranslate2 call: {alone:.1f} tok/s",
                          flush=True)
                else:
                    hf_run(hf, ids, args.new)()
            for label, gen, inv in ct2:
                ct2_run(gen, inv, ids, args.new)()
        decode, ratios, bounds, beside = {}, {}, {}, {}
        for run in range(args.runs):
            bw = stream_bandwidth(4 * cfg.parameter_count())
            for label, lm, nbytes in mine:
                if "numba" in label:
                    bounds.setdefault(label, []).append(bw / nbytes)
            with BusyCore() if args.under_load else contextlib.nullcontext():
                for B in args.batch:
                    ids = rng.integers(3, cfg.vocabulary_size, (B, args.prompt))
                    rates = {}
                    for label, lm, nbytes in mine:
                        if B == 1 and "numba" in label:     # the read just before, as it is now
                            beside.setdefault(label, []).append(
                                stream_bandwidth(4 * cfg.parameter_count()) / nbytes)
                        rates[label] = B * args.new / best(refopt_run(lm, ids, args.new), args.repeats)
                    if hf is not None:
                        rates["transformers f32"] = B * args.new / best(hf_run(hf, ids, args.new),
                                                                       args.repeats)
                    for label, gen, inv in ct2:
                        rates[label] = B * args.new / best(ct2_run(gen, inv, ids, args.new), args.repeats)
                    for label, rate in rates.items():
                        decode.setdefault((label, B), []).append(rate)
                        if "transformers f32" in rates:
                            ratios.setdefault((label, B), []).append(rate / rates["transformers f32"])
            print(f"run {run + 1}/{args.runs}: streaming read {bw / 1e9:.1f} GB/s, load average "
                  f"{load_average()}, batch {args.batch[0]}: " + ", ".join(
                      f"{label} {decode[(label, args.batch[0])][-1]:.1f}" for label in
                      [m[0] for m in mine] + ["transformers f32"] + [c[0] for c in ct2]
                      if (label, args.batch[0]) in decode), flush=True)
        report(decode, ratios, bounds, args, beside)

        # ---------------------------------------------------------------- prefill and training
        lm = next((m[1] for m in mine if m[0] == "refopt numba f32"), None)
        if lm is not None:   # prefill and training: the float32 Numba model
            ids = rng.integers(3, cfg.vocabulary_size, (4, 128))
            x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
            lm.predict(x)    # warm-up: a kernel compiled (or its cache reloaded) is not timed
            t_ours = best(lambda: lm.predict(x), args.repeats)
            line = f"{'prefill 4x128 tok/s':24s}{512 / t_ours:12.0f}"
            if hf is not None:
                import torch

                tid = torch.tensor(ids)

                def fwd():
                    with torch.no_grad():
                        hf(input_ids=tid, attention_mask=torch.ones_like(tid))

                fwd()
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
                    opt.apply(grads, lm.backbone.params, ops=lm.backbone.ops)

                step()           # warm-up, as the prefill's (Adam's state is made here too)
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

                    tstep()
                    t_hf = best(tstep, args.repeats)
                    line += f"{t_hf:12.3f} (transformers)  ratio {t_hf / t_ours:.2f}x"
                print(line)

        if not args.skip_cold:
            (cold, cold_exit), (warm, warm_exit) = cold_start()
            print(f"{'cold start to 1st token':24s}{cold:10.2f} s with an empty Numba cache (exit after "
                  f"{cold_exit:.1f} s: compiling), {warm:.2f} s with the cache (exit {warm_exit:.1f} s); "
                  f"`refopt generate {' '.join(COLD_ARGS)}`, bundled model")
        print(f"load average at the end: {load_average()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
