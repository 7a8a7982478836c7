"""Opening real-sized OPT checkpoints: load time, peak memory and decode speed, beside transformers.

    flock /tmp/refopt-heavy.lock python benchmarks/bench_load.py [--sizes 125m 1.3b 6.7b]
        [--runs 2] [--repeats 2] [--skip-peers] [--dir /tmp/refopt-load]

For each size a random float16 checkpoint of the released shape (transformers layout,
``model.safetensors``; normal(0, 0.02) weights, LayerNorm 1/0, zero biases) is written tensor by
tensor to a temporary directory (deleted at the end).  Each configuration below is then measured
``--runs`` times, each in a fresh process so its memory figures are its own:

* **open s**: wall time of ``OPTCausalLM.from_preset`` (transformers: ``from_pretrained``);
* **RSS open / peak**: resident memory after opening, before the first forward, and the process's
  peak (``VmRSS``/``VmHWM``: mapped file pages count), in GB; **+load** is the peak minus the
  resident memory before opening, and **/result** that divided by the bytes of the loaded weights;
* **decode tok/s**: batch-1 greedy decode, ``(n - 1) / (t(n new tokens) - t(1 new token))`` with
  an 8-token prompt (prefill excluded), best of ``--repeats``;
* **% bound**: decode tok/s over the memory-bandwidth bound: a streaming read (bench_cpu's, on
  ``--threads`` threads, an array of ``--bw-gib`` GiB, best of five) measured in the same process
  right after the decode timings -- on a shared machine the load changes by the minute, so each
  decode figure is set against the bandwidth of its own moment -- divided by the bytes of weights
  one token reads.  The header gives the same read measured once by the parent.

refopt configurations: ``weights_dtype="auto"`` (the float16 file used in place, memory-mapped),
``"bfloat16"`` and ``"int8"`` (converted tensor by tensor), ``w8a8`` (``"int8"`` with
``activations="int8"``: integer products), and the default float32 (widened) where it fits in
memory; transformers + PyTorch: ``dtype=torch.float16`` and ``torch.float32`` where it
fits.  Figures are the median of the runs, with their range.  With the OPT tokenizer files of
../shared/data/opt present, each size's ``auto`` run also generates text from a prompt (random
weights: the text is gibberish, but it is decoded text), printed under the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = {"125m": 32, "350m": 32, "1.3b": 16, "2.7b": 12, "6.7b": 8, "13b": 6}


# ---------------------------------------------------------------------------- the checkpoint
def write_float16_checkpoint(path: Path, size: str, seed: int = 0):
    """A random float16 safetensors checkpoint of OPT-``size``'s shape, written one tensor at a time
    (memory: one tensor).  Returns (config, bytes written)."""
    import numpy as np

    from refopt.config import released_config
    from refopt.io import huggingface
    from refopt.model import param_shapes

    cfg = released_config(size, dropout=0.0)
    shapes = param_shapes(cfg)
    names = huggingface.name_map(cfg)
    entries = [(theirs, tuple(shapes[ours]), ours) for ours, theirs in names.items()]
    entries.append((huggingface.POSITIONS_NAME, (cfg.max_sequence_length + 2, cfg.hidden_dim), "embed_positions"))
    header, at = {}, 0
    for name, shape, _ in entries:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_huggingface(), indent=2))
    rng = np.random.default_rng(seed)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape, ours in entries:
            if ours.endswith(".gamma"):
                arr = np.ones(shape, np.float16)
            elif ours.endswith((".beta", ".bias")):
                arr = np.zeros(shape, np.float16)
            else:
                arr = np.empty(shape, np.float16)
                flat = arr.reshape(-1)
                step = 1 << 24
                for i in range(0, flat.size, step):
                    block = rng.standard_normal(min(step, flat.size - i), dtype=np.float32)
                    block *= 0.02
                    flat[i:i + step] = block
            f.write(arr.tobytes())
            del arr
    return cfg, (path / "model.safetensors").stat().st_size + len(head)


def copy_tokenizer(path: Path):
    """The real OPT tokenizer files beside the weights, when ../shared has them."""
    shared = ROOT.parent / "shared" / "data" / "opt"
    if (shared / "vocab.json").exists() and (shared / "merges.txt").exists():
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(shared / name, path / name)


# ---------------------------------------------------------------------------- one measurement
def _memory():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out["VmRSS"], out["VmHWM"]


def worker(spec):
    """Run one configuration in this (fresh) process; print its figures as one JSON line."""
    import numpy as np

    path, engine, dtype, new, repeats, threads = (spec[k] for k in
                                                  ("path", "engine", "dtype", "new", "repeats", "threads"))
    prompt = np.random.default_rng(0).integers(3, 60, 8)      # ids any OPT vocabulary has
    if engine == "refopt":
        import numba

        import refopt  # noqa: F401
        from refopt.models import OPTCausalLM

        numba.set_num_threads(threads)
        rss0, _ = _memory()
        t0 = time.perf_counter()
        lm = OPTCausalLM.from_preset(path, backend="numba",                  # w8a8: int8 both
                                     weights_dtype={"float32": None, "w8a8": "int8"}.get(dtype, dtype),
                                     activations="int8" if dtype == "w8a8" else None)
        t_open = time.perf_counter() - t0
        rss_open, hwm_open = _memory()
        lm.compile(sampler="greedy")
        preprocessor, lm.preprocessor = lm.preprocessor, None      # timed calls pass token ids
        params = lm.backbone.params
        weight_bytes = sum(getattr(v, "nbytes", 0) for k, v in params.items() if k != "embed_positions")

        def generate(n):
            x = {"token_ids": np.concatenate([prompt, np.ones(n, prompt.dtype)])[None],
                 "padding_mask": np.concatenate([np.ones(8, bool), np.zeros(n, bool)])[None]}
            lm.generate(x, max_length=8 + n, stop_token_ids=None)
    else:
        import torch
        import transformers

        torch.set_num_threads(threads)
        rss0, _ = _memory()
        t0 = time.perf_counter()
        hf = transformers.OPTForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        t_open = time.perf_counter() - t0
        rss_open, hwm_open = _memory()
        weight_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters()
                           if "embed_positions" not in n)
        ids = torch.tensor(prompt)[None]

        def generate(n):
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            min_new_tokens=n, pad_token_id=1)

    generate(2)                                     # warm-up (compiles kernels)
    times = {}
    for n in (1, new):
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            generate(n)
            best = min(best, time.perf_counter() - t)
        times[n] = best
    _, hwm = _memory()
    import numba

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_cpu import stream_bandwidth as best_read

    numba.set_num_threads(threads)
    bw = best_read(int(spec["bw_gib"] * (1 << 30)))
    text = None
    if engine == "refopt" and dtype == "auto" and preprocessor is not None:
        lm.preprocessor = preprocessor
        text = lm.generate("Checkpoints at real sizes", max_length=16)
    print(json.dumps({"text": text, "bw": bw, "open_s": t_open, "rss_before": rss0, "rss_open": rss_open, "hwm_open": hwm_open,
                      "hwm": hwm, "weight_bytes": weight_bytes,
                      "tok_s": (new - 1) / max(times[new] - times[1], 1e-9)}))


def measure(spec, timeout):
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def stream_bandwidth(gib, threads, calls=3):
    """(best, worst) bytes/s over ``calls`` of bench_cpu's streaming read (Numba, each the best of
    five reads of a ``gib`` GiB array)."""
    import numba

    from bench_cpu import stream_bandwidth as best_read

    numba.set_num_threads(threads)
    rates = [best_read(int(gib * (1 << 30))) for _ in range(calls)]
    return max(rates), min(rates)


def _available():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["125m", "1.3b", "6.7b"])
    ap.add_argument("--runs", type=int, default=2, help="fresh processes per configuration")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls per process (best)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bw-gib", type=float, default=1.0)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="only these, e.g. refopt:auto refopt:int8 transformers:float16")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np

    bw, bw_low = stream_bandwidth(args.bw_gib, args.threads)
    print(f"streaming read {bw / 1e9:.1f} GB/s (worst of 3: {bw_low / 1e9:.1f}), {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f}; MemAvailable {_available() / 1e9:.1f} GB", flush=True)
    cols = (f"{'size':6s} {'engine':14s} {'weights':9s} {'open s':>14s} {'RSS open':>9s} {'peak':>7s} "
            f"{'+load':>7s} {'/result':>8s} {'file':>7s} {'decode tok/s':>17s} {'GB/s':>5s} {'% bound':>8s}")
    print(cols)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="refopt-load-"))
    try:
        for size in args.sizes:
            where = tmp / f"opt-{size}-f16"
            t = time.perf_counter()
            cfg, file_bytes = write_float16_checkpoint(where, size)
            copy_tokenizer(where)
            print(f"# wrote {where} ({file_bytes / 1e9:.2f} GB float16) in {time.perf_counter() - t:.0f} s",
                  flush=True)
            n_params = cfg.parameter_count()
            configs = [("refopt", "auto"), ("refopt", "bfloat16"), ("refopt", "int8"), ("refopt", "w8a8"),
                       ("refopt", "float32")]
            if not args.skip_peers:
                configs += [("transformers", "float16"), ("transformers", "float32")]
            if args.configs:
                configs = [c for c in configs if f"{c[0]}:{c[1]}" in args.configs]
            for engine, dtype in configs:
                result_bytes = n_params * (4 if dtype == "float32" else 2)
                if result_bytes > 0.8 * _available():
                    print(f"{size:6s} {engine:14s} {dtype:9s} skipped: {result_bytes / 1e9:.1f} GB does not fit "
                          f"({_available() / 1e9:.1f} GB available)", flush=True)
                    continue
                spec = {"path": str(where), "engine": engine, "dtype": dtype, "new": NEW_TOKENS.get(size, 8),
                        "repeats": args.repeats, "threads": args.threads, "bw_gib": args.bw_gib}
                runs = [measure(spec, args.timeout) for _ in range(args.runs)]
                errors = [r["error"] for r in runs if "error" in r]
                runs = [r for r in runs if "error" not in r]
                if not runs:
                    print(f"{size:6s} {engine:14s} {dtype:9s} failed: {errors[0]}", flush=True)
                    continue

                def med(key, runs=runs):
                    return float(np.median([r[key] for r in runs]))

                def rng(key, scale=1.0, fmt="{:.2f}", runs=runs):
                    v = [r[key] * scale for r in runs]
                    return (fmt.format(np.median(v)) + ("" if len(v) < 2 else
                            f" ({fmt.format(min(v))}-{fmt.format(max(v))})"))

                load = [r["hwm_open"] - r["rss_before"] for r in runs]
                bound = med("bw") / med("weight_bytes")
                print(f"{size:6s} {engine:14s} {dtype:9s} {rng('open_s'):>14s} {med('rss_open') / 1e9:8.2f}G "
                      f"{med('hwm') / 1e9:6.2f}G {np.median(load) / 1e9:6.2f}G "
                      f"{np.median(load) / med('weight_bytes'):7.2f}x {file_bytes / 1e9:6.2f}G "
                      f"{rng('tok_s', fmt='{:.2f}'):>17s} {med('bw') / 1e9:5.1f} {100 * med('tok_s') / bound:7.0f}%",
                      flush=True)
                texts = [r.get("text") for r in runs if r.get("text")]
                if texts:
                    print(f"#   {size} generated: {texts[0]!r}", flush=True)
            shutil.rmtree(where, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
