"""What validating a checkpoint costs: refopt's validated load, the same load without the
non-finite check, and the official ``safetensors`` reader, at released OPT shapes.  (The general
loading benchmark measures sizes, dtypes, memory and decode speed.)

    python benchmarks/bench_load_check.py [--sizes 125m,1.3b] [--repeat 5] [--dtype float32|float16]
                                    [--keep DIR]

For each size a random checkpoint (normal(0, 0.02) weights) is written in transformers' sharded
layout (one safetensors shard per decoder layer, :func:`refopt.testing.streaming.
write_random_checkpoint`) to a temporary directory and read once untimed (the page cache is warm
for every row).  Then, ``--repeat`` times each, in this process:

* ``load``: ``OPTBackbone.from_preset(path)`` -- headers and shapes validated, every weight checked
  for NaN / infinity (this reads every byte once; float32 weights stay memory-mapped);
* ``load, no finite check``: the same with ``allow_nonfinite=True`` (float32 weights are then only
  mapped, not read: their pages are read at first use);
* ``finite check alone``: :func:`refopt.io.checkpoint.first_nonfinite` over every stored tensor;
* ``safetensors load_file``: the peer, ``safetensors.numpy.load_file`` on each shard in turn (it
  reads and copies every byte; one shard is held at a time).

Prints the median and the range (min..max) of each row, the check's throughput, and the ratio of
each row to ``load, no finite check``.  Rows are ``(name, function)`` pairs in :func:`rows`; more
sizes, dtypes or rows slot in there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rows(path: Path):
    """The timed rows for the checkpoint at ``path``: ``[(name, function), ...]``."""
    from refopt.io.checkpoint import first_nonfinite, open_checkpoint
    from refopt.models import OPTBackbone

    def load():
        return OPTBackbone.from_preset(path)

    def load_unchecked():
        return OPTBackbone.from_preset(path, allow_nonfinite=True)

    def check_alone():
        with open_checkpoint(path, allow_nonfinite=True) as ckpt:
            for name in ckpt.names:
                assert first_nonfinite(ckpt.source.array(ckpt.entries[name].key)) is None

    def peer():
        from safetensors.numpy import load_file

        for shard in sorted(path.glob("*.safetensors")):
            load_file(shard)

    return [("load", load), ("load, no finite check", load_unchecked),
            ("finite check alone", check_alone), ("safetensors load_file", peer)]


def measure(fn, repeat: int) -> list[float]:
    fn()                                                     # warm: page cache, imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="125m,1.3b")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--keep", default=None, help="write the checkpoints here and keep them")
    args = parser.parse_args(argv)

    from refopt.config import released_config
    from refopt.testing.streaming import write_random_checkpoint

    print(f"load: {os.getloadavg()[0]:.2f} (1-min load average), {os.cpu_count()} CPUs, "
          f"{args.repeat} runs per row after one warm-up, stored {args.dtype}")
    header = f"{'size':<6} {'row':<24} {'median s':>9} {'min..max s':>16} {'x no-check':>11}"
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        cfg = released_config(size, dropout=0.0)
        base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="refopt-bench-load-"))
        path = base / f"opt-{size}-{args.dtype}"
        try:
            if not (path / "config.json").exists():
                write_random_checkpoint(path, cfg, dtype=args.dtype)
            nbytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
            results = {name: measure(fn, args.repeat) for name, fn in rows(path)}
            reference = statistics.median(results["load, no finite check"])
            for name, times in results.items():
                med = statistics.median(times)
                print(f"{size:<6} {name:<24} {med:>9.3f} {min(times):>7.3f}..{max(times):<7.3f} "
                      f"{med / reference:>10.1f}x")
            check = statistics.median(results["finite check alone"])
            print(f"{size:<6} {'(checked bytes)':<24} {nbytes / 1e9:>8.2f}G "
                  f"{nbytes / check / 1e9:>12.1f} GB/s")
        finally:
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
