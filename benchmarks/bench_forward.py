"""Loading cost and forward throughput of a 125m-shaped model, beside transformers, in one run.

    python benchmarks/bench_forward.py [--layers 12] [--repeats 3]

Writes a random float32 OPT-125m-shaped checkpoint (transformers layout, ~500 MB) to a temporary
directory, then, each in a fresh subprocess so peak memory is clean:
  * refopt: ``OPTCausalLM.from_preset`` time (weights are memory-mapped, so pages are read on first
    use), the time to the end of a first short forward, and peak RSS (above the interpreter's) after
    loading and after that forward (which touches every weight page);
  * transformers: ``OPTForCausalLM.from_pretrained`` likewise;
then forward throughput (batch 4 x 128 tokens, float32) of both in this process with the same
thread count.  Prints a table with refopt / transformers ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_time, write_random_checkpoint  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np
which, path = sys.argv[1], sys.argv[2]
def rss_mib():
    # peak resident set of this process (VmHWM; ru_maxrss would carry the parent's peak over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss_mib()
ids = np.random.default_rng(0).integers(0, 50000, (1, 16))
t0 = time.perf_counter()
if which == "refopt":
    from refopt.models import OPTCausalLM
    t0 = time.perf_counter()
    lm = OPTCausalLM.from_preset(path, preprocessor=None)
    load = time.perf_counter() - t0
    after_load = rss_mib()
    lm.predict({"token_ids": ids})
    first = time.perf_counter() - t0
else:
    import torch, transformers
    base = rss_mib()
    t0 = time.perf_counter()
    lm = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32)
    load = time.perf_counter() - t0
    after_load = rss_mib()
    with torch.no_grad():
        lm(input_ids=torch.tensor(ids))
    first = time.perf_counter() - t0
print(json.dumps({"load_s": load, "first_s": first, "base_mib": base, "after_load_mib": after_load,
                  "after_forward_mib": rss_mib()}))
"""


def write_checkpoint(path, layers):
    write_random_checkpoint(path, layers)
    return os.path.getsize(os.path.join(path, "model.safetensors"))


def child(which, path):
    out = subprocess.run([sys.executable, "-c", CHILD, which, path], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{which} child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(fn, repeats):
    return best_time(fn, repeats)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt125m")
        size = write_checkpoint(path, args.layers)
        size_mib = size / 2**20
        ours = child("refopt", path)
        try:
            import torch
            import transformers

            theirs = child("transformers", path)
        except ImportError:
            torch = transformers = theirs = None

        print(f"checkpoint: 125m-shaped ({args.layers} layers), float32 safetensors, {size_mib:.0f} MiB")
        print(f"{'':28s}{'refopt':>12s}{'transformers':>14s}{'ratio':>8s}")

        def row(label, a, b, fmt="{:.2f}", better="lower"):
            r = "" if b is None or min(a, b) <= 0 else f"{(b / a if better == 'lower' else a / b):.2f}x"
            print(f"{label:28s}{fmt.format(a):>12s}{'' if b is None else fmt.format(b):>14s}{r:>8s}")

        row("load time (s)", ours["load_s"], theirs and theirs["load_s"], "{:.3f}")
        row("load + first forward (s)", ours["first_s"], theirs and theirs["first_s"], "{:.3f}")
        for key, label in (("after_load_mib", "peak RSS after load (MiB)"),
                           ("after_forward_mib", "peak RSS after fwd (MiB)")):
            row(label, ours[key] - ours["base_mib"], theirs and theirs[key] - theirs["base_mib"], "{:.0f}")
        print(f"refopt peak / checkpoint size after forward: "
              f"{(ours['after_forward_mib'] - ours['base_mib']) / size_mib:.2f} (requirement: < 1.5)")

        from refopt.models import OPTCausalLM

        lm = OPTCausalLM.from_preset(path, preprocessor=None)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 50272, (args.batch, args.seq))
        mask = np.ones_like(ids)
        tokens = args.batch * args.seq
        t_ours = best(lambda: lm.predict({"token_ids": ids, "padding_mask": mask}), args.repeats)
        t_theirs = None
        if transformers is not None:
            threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
            torch.set_num_threads(threads)
            model = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tids, tmask = torch.tensor(ids), torch.tensor(mask)

            def run():
                with torch.no_grad():
                    model(input_ids=tids, attention_mask=tmask)

            t_theirs = best(run, args.repeats)
        row(f"forward {args.batch}x{args.seq} tok/s", tokens / t_ours, t_theirs and tokens / t_theirs,
            "{:.0f}", better="higher")


if __name__ == "__main__":
    main()
