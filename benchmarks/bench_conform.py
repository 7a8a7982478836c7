"""``refopt conform`` at real sizes: time and peak memory against transformers float32.

    flock /tmp/refopt-heavy.lock python benchmarks/bench_conform.py --size 125m --runs 3
    flock /tmp/refopt-heavy.lock python benchmarks/bench_conform.py --size 1.3b --runs 1

Writes a random OPT-shaped transformers checkpoint (float32, one safetensors shard per decoder
layer; :func:`refopt.testing.streaming.write_random_checkpoint`) and runs, each in a fresh process:

* ``conform``: ``refopt conform --against transformers CKPT`` as a user would (the checkpoint,
  streamed one decoder layer at a time, plus the default random configs, stress cases and sampler
  checks), its wall time and peak RSS (``VmHWM``), and its exit status;
* ``port alone``: what the transformers port itself needs for the same checks -- load the
  checkpoint, one forward and one backward on the same batch -- peak RSS and time, the floor any
  oracle run in one process sits on; the first run also prints what is resident after each step
  (anonymous memory, and the checkpoint's pages, which transformers maps from disk).

The ratio columns divide by the checkpoint's size on disk: the peak, and the peak above what the
interpreter and the libraries take on their own (``imports alone``: torch, transformers with its OPT
model's code, NumPy and refopt's oracle imported, nothing loaded -- what a conform against
transformers imports; about 380 MiB, 0.79x a 125m checkpoint).  The checkpoint is deleted afterwards.
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

SIZES = {   # hidden, layers, heads (OPT's shapes; vocabulary 50272, 2048 positions, MLP 4x)
    "125m": (768, 12, 12), "350m-shape": (1024, 24, 16), "1.3b": (2048, 24, 32), "2.7b": (2560, 32, 32),
}

_IMPORTS = """
import numpy, torch, transformers
transformers.OPTForCausalLM          # transformers imports its modelling code (and what that imports) lazily
import refopt.testing, refopt.testing.checks
from refopt.testing.adapters.transformers import TransformersAdapter
"""

_PORT_ALONE = """
import resource, sys, time
t = time.perf_counter()
def rss(stage):   # resident MiB now: anonymous memory, pages of mapped files (the checkpoint's)
    f = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("Rss")}
    print(f"{stage} {f['RssAnon']} {f['RssFile']}")
import numpy as np, torch, transformers
from refopt.testing.cases import make_inputs
from refopt.testing.reference import loss_targets
from refopt.io import presets
rss("import")
cfg = presets.read_config(__import__("pathlib").Path(sys.argv[1]))
ids, mask, _, _ = make_inputs(cfg, np.random.default_rng(0), 3, 11)
model = transformers.OPTForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
rss("load")
logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits
rss("forward")
y, sw = loss_targets(ids, mask)
ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(y).reshape(-1),
                                       reduction="none")
(torch.tensor(sw).reshape(-1).float() * ce).sum().backward()
rss("backward")
print(time.perf_counter() - t)
"""


def _peak_rss_mib(pid_status: str) -> float:
    for line in pid_status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(cmd, env) -> tuple[float, float, int, str]:
    """``(seconds, peak RSS MiB, exit status, stdout)`` of one command in a fresh process (peak RSS
    read from /proc while it runs, the largest of the process and its children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    peak = 0.0
    out_chunks = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))
    reader.start()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                peak = max(peak, _peak_rss_mib(fh.read()))
        except OSError:
            pass
        time.sleep(0.05)
    reader.join()
    return time.perf_counter() - t0, peak, proc.returncode, "".join(out_chunks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="125m", choices=sorted(SIZES))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the checkpoint is written (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    p.add_argument("--conform-args", default="", help="more arguments for refopt conform")
    args = p.parse_args(argv)

    from refopt.config import OPTConfig
    from refopt.testing.streaming import write_random_checkpoint

    D, L, H = SIZES[args.size]
    cfg = OPTConfig(vocabulary_size=50272, num_layers=L, num_heads=H, hidden_dim=D, intermediate_dim=4 * D,
                    max_sequence_length=2048, dropout=0.0)
    root = Path(args.dir or tempfile.mkdtemp(prefix="refopt-bench-conform-"))
    ckpt = root / f"opt-{args.size}-random"
    try:
        t = time.perf_counter()
        size = write_random_checkpoint(ckpt, cfg, "float32", seed=0)
        print(f"checkpoint: {args.size}-shaped, {cfg.parameter_count(cfg.max_sequence_length + 2) / 1e6:.0f}M "
              f"parameters, float32, {size / 2**20:.0f} MiB, written in {time.perf_counter() - t:.0f} s", flush=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        rows = []
        # the floor no checkpoint moves: the interpreter and the libraries a conform against
        # transformers imports (torch, transformers, NumPy, refopt's oracle)
        _, imports, _, _ = measure([sys.executable, "-c", _IMPORTS], env)
        print(f"imports alone: {imports:.0f} MiB", flush=True)
        for run in range(args.runs):
            conform = [sys.executable, "-m", "refopt", "conform", "--against", "transformers", str(ckpt), "--json",
                       *args.conform_args.split()]
            secs, peak, code, out = measure(conform, env)
            report = json.loads(out) if out.strip().startswith("{") else {}
            statuses = [c["status"] for c in report.get("checks", [])]
            failed = [c["name"] for c in report.get("checks", []) if c["status"] == "FAIL"]
            rows.append(("conform", secs, peak, code, f"{statuses.count('pass')} passed, {len(failed)} failed "
                                                    f"{failed[:3]}, {statuses.count('skip')} skipped"))
            grad = next((c for c in report.get("checks", []) if c["name"] == f"{ckpt.name}/gradients"), None)
            if grad is not None and run == 0:
                print(f"{grad['name']}: {grad['status']}; ReLU kinks {grad['data'].get('kinks')}; {grad['figures']}",
                      flush=True)
            secs, peak, code, out = measure([sys.executable, "-c", _PORT_ALONE, str(ckpt)], env)
            rows.append(("port alone", secs, peak, code, "load + forward + backward, 3x11 tokens"))
            if run == 0:
                stages = [line.split() for line in out.splitlines() if len(line.split()) == 3]
                print("port alone, resident after each step (anonymous + checkpoint pages mapped from disk): "
                      + ", ".join(f"{st} {a} + {f} MiB" for st, a, f in stages), flush=True)
            print(f"run {run + 1}: " + "; ".join(f"{n} {s:.1f} s {m:.0f} MiB" for n, s, m, *_ in rows[-2:]),
                  flush=True)
        print(f"\n{'':<11} {'time':>8} {'peak RSS':>10} {'x checkpoint':>12} {'above imports':>14}  exit  notes")
        for name, secs, peak, code, note in rows:
            print(f"{name:<11} {secs:7.1f}s {peak:9.0f}M {peak * 2**20 / size:11.2f}x "
                  f"{(peak - imports) * 2**20 / size:13.2f}x  {code:>4}  {note}")
    finally:
        if not args.keep:
            shutil.rmtree(root if args.dir is None else ckpt, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
