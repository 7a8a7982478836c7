"""The oracle's streaming reference on a checkpoint of a released OPT shape: peak memory and time.

    python benchmarks/bench_oracle.py [--size 1.3b] [--layers N] [--dtype float32|float16]
                                      [--tokens 16] [--in-memory auto|yes|no] [--keep DIR]

Writes a random checkpoint of that shape (normal(0, 0.02) weights, transformers' sharded layout: one
safetensors shard per decoder layer plus ``model.safetensors.index.json``; written shard by shard, so
the writer never holds the model) to a temporary directory, then in fresh subprocesses (peak RSS
read from ``/proc/self/status`` VmHWM, minus the interpreter's after imports):

* ``streaming``: :func:`refopt.testing.streaming_logits` -- float64 logits with one decoder layer
  resident at a time;
* ``in-memory``: the same float64 logits from ``OPTCausalLM.from_preset(dtype="float64")`` (every
  parameter converted to float64 at once), when the machine has the memory for it (``auto``: when
  MemAvailable exceeds 1.3 x the float64 model plus the checkpoint).

Prints a table with the ratio of the two, the largest difference between their logits (they run
the same NumPy code, so 0 up to the head's chunking), and the streaming peak extrapolated to OPT-13b
(the peak minus one 1.3b-shaped layer and head chunk, plus one 13b-shaped layer and head chunk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np
def rss_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
which, path, out, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from refopt.config import OPTConfig
from refopt.testing import streaming
from refopt.models import OPTCausalLM
cfg = OPTConfig.from_file(path + "/config.json")
rng = np.random.default_rng(0)
ids = rng.integers(3, cfg.vocabulary_size, (1, tokens))
mask = np.ones(ids.shape, bool)
base = rss_mib("VmRSS:")
t0 = time.perf_counter()
extra = {}
if which == "streaming":
    params = streaming.StreamingParams(path)
    logits = streaming.streaming_logits(path, ids, mask, params=params)
    extra = {"held_bytes": params.peak_bytes, "layers_loaded": params.layers_loaded}
else:
    lm = OPTCausalLM.from_preset(path, dtype="float64", backend="numpy", preprocessor=None)
    logits = lm.predict({"token_ids": ids, "padding_mask": mask})
seconds = time.perf_counter() - t0
np.save(out + ".npy", logits[0, -4:])
json.dump({"seconds": seconds, "peak_mib": rss_mib("VmHWM:"), "base_mib": base, **extra}, open(out, "w"))
"""


def run_child(which, path, tokens, workdir) -> dict:
    out = str(Path(workdir) / f"{which}.json")
    proc = subprocess.run([sys.executable, "-c", CHILD, which, str(path), out, str(tokens)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(Path(out).read_text())
    result["tail"] = np.load(out + ".npy")
    return result


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    from refopt.config import released_config
    from refopt.testing.streaming import layer_bytes_float64, write_random_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.3b", help="released OPT shape (default 1.3b)")
    parser.add_argument("--layers", type=int, help="override the number of layers")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--in-memory", default="auto", choices=("auto", "yes", "no"))
    parser.add_argument("--keep", help="write the checkpoint here and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)

    overrides = {"dropout": 0.0}
    if args.layers:
        overrides["num_layers"] = args.layers
    cfg = released_config(args.size, **overrides)
    work = Path(tempfile.mkdtemp(prefix="bench_oracle_"))
    ckpt = Path(args.keep) if args.keep else work / "ckpt"
    try:
        t0 = time.perf_counter()
        size = write_random_checkpoint(ckpt, cfg, args.dtype)
        write_s = time.perf_counter() - t0
        n_params = cfg.parameter_count(cfg.max_sequence_length + 2)
        f64_model = 8 * n_params
        print(f"OPT-{args.size} shape, {cfg.num_layers} layers, {n_params / 1e9:.2f} B parameters: "
              f"checkpoint {size / 2**30:.2f} GiB ({args.dtype}) written in {write_s:.0f} s; "
              f"{args.tokens} tokens")
        rows = [("streaming", run_child("streaming", ckpt, args.tokens, work))]
        run_in_memory = args.in_memory == "yes" or (
            args.in_memory == "auto" and mem_available() > 1.3 * (f64_model + size))
        if run_in_memory:
            rows.append(("in-memory float64", run_child("in-memory", ckpt, args.tokens, work)))
        else:
            print(f"in-memory float64 reference not run: it needs about {(f64_model + size) / 2**30:.1f} GiB, "
                  f"{mem_available() / 2**30:.1f} GiB available (--in-memory yes to force)")
        print()
        print(f"{'reference':<20} {'time s':>8} {'peak RSS MiB':>13} {'above base MiB':>15}")
        for name, r in rows:
            if "error" in r:
                print(f"{name:<20} failed: {r['error']}")
                continue
            print(f"{name:<20} {r['seconds']:8.1f} {r['peak_mib']:13.0f} {r['peak_mib'] - r['base_mib']:15.0f}")
        s = rows[0][1]
        if len(rows) == 2 and "error" not in rows[1][1] and "error" not in s:
            m = rows[1][1]
            print(f"\nstreaming / in-memory: time x{s['seconds'] / m['seconds']:.2f}, "
                  f"peak RSS x{s['peak_mib'] / m['peak_mib']:.3f}; "
                  f"largest logit difference {np.abs(s['tail'] - m['tail']).max():.3g}")
        if "error" not in s:
            layer = layer_bytes_float64(cfg)
            chunk = 8192 * cfg.word_embed_proj_dim * 8
            big = released_config("13b")
            predicted = (s["peak_mib"] * 2**20 - layer - chunk + layer_bytes_float64(big)
                         + 8192 * big.word_embed_proj_dim * 8)
            print(f"\nstreaming held at most {s['held_bytes'] / 2**20:.0f} MiB of float64 tensors "
                  f"(one layer: {layer / 2**20:.0f} MiB); the whole model in float64 is "
                  f"{f64_model / 2**30:.1f} GiB")
            print(f"extrapolated streaming peak for OPT-13b ({big.parameter_count() / 1e9:.1f} B "
                  f"parameters, {8 * big.parameter_count() / 2**30:.0f} GiB in float64): "
                  f"{predicted / 2**30:.1f} GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
