"""Count false alarms: run the oracle's model checks on many drawn models against correct ports.

    flock /tmp/refopt-heavy.lock ... (the script takes the lock itself, chunk by chunk)
    python scripts/oracle_false_alarms.py --models 10000 --ports refopt,sdpa --out fa.jsonl
    python scripts/oracle_false_alarms.py --models 2000 --ports refopt,sdpa --dtype bfloat16 --out fa-bf16.jsonl

Each model is ``random-<seed>`` (:func:`refopt.testing.cases.random_case`: the one config space,
with stress magnitudes in about 30% of the models), checked by every model check the port supports
(logits and logits.left_padding, activations, gradients, incremental and incremental.left_padding,
generation).  Ports: ``refopt`` (refopt's NumPy float32), ``sdpa`` / ``eager`` / ``sdpa-math`` /
``sdpa-flash`` (transformers float32 with that attention kernel); ``--dtype bfloat16`` (or
``float16``) runs each in that dtype instead -- refopt's dtype policy of that name (KerasHub's
rounding), transformers in ``torch_dtype=bfloat16`` -- held to refopt's reference in that dtype.  One JSON line per (port, model):
the status of each check and its largest error-to-tolerance ratio.  Models already in ``--out`` are
skipped, so the run can be resumed.  ``--lock`` (default ``/tmp/refopt-heavy.lock``) is taken for
a chunk of at most ``--chunk`` models and ``--chunk-seconds`` (default 9 minutes) and released
between chunks, so other heavy jobs interleave.
``--workers`` (default 2) processes check models side by side, each building the model once for
every port (the float64 references are shared) with ``--threads`` (default 1) BLAS, Numba and
PyTorch threads: the drawn models are tiny, and two threads per product spend their time waiting
for each other.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager


@contextmanager
def _locked(path):
    if not path:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _port(name, dtype="float32"):
    from refopt.testing.adapter import RefoptAdapter

    if name == "refopt":
        return RefoptAdapter("numpy", dtype)
    from refopt.testing.adapters.transformers import TransformersAdapter

    return TransformersAdapter(dtype, name)


def run_model(adapter, seed: int, case=None) -> dict:
    """Every model check ``adapter`` supports on ``random-<seed>`` (``case``: that case, already
    built -- its float64 references are the same for every port, so ports share them)."""
    from refopt.testing import checks as C
    from refopt.testing.adapter import capabilities_of

    case = case if case is not None else C.random_case(seed)
    caps = capabilities_of(adapter)
    out = {"seed": seed, "case": case.spec.id, "stressed": case.spec.magnitudes.stressed, "checks": {}}
    for check in C.model_checks(adapter, case):
        if not set(check.needs) <= caps:
            continue
        r = check.run()
        entry = {"status": r.status, "ratio": r.data.get("ratio")}
        if r.status == C.FAIL:
            entry["detail"] = r.detail[:2000]
        if "kinks" in r.data:
            entry["kinks"] = r.data["kinks"]
        out["checks"][check.name.split("/", 1)[1]] = entry
    return out


_PORTS: dict = {}


def _start_worker(names, threads, dtype="float32"):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)      # before NumPy, Numba and PyTorch load their pools
    _PORTS.update({name: _port(name, dtype) for name in names})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _run_seed(seed, names, tag=""):
    from refopt.testing import checks as C

    case = C.random_case(seed)
    return [dict(run_model(_PORTS[name], seed, case), port=name + tag) for name in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=10000)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--ports", default="refopt,sdpa")
    p.add_argument("--out", default="oracle_false_alarms.jsonl")
    p.add_argument("--chunk", type=int, default=10000, help="the most models per hold of the lock")
    p.add_argument("--chunk-seconds", type=float, default=540, help="the lock is released after this long")
    p.add_argument("--lock", default="/tmp/refopt-heavy.lock")
    p.add_argument("--threads", type=int, default=1, help="threads per worker")
    p.add_argument("--workers", type=int, default=2, help="processes checking models side by side")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the ports' compute dtype (the port names in --out carry it when not float32)")
    args = p.parse_args(argv)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as fh:
            for line in fh:
                rec = json.loads(line)
                done.add((rec["port"], rec["seed"]))
    names = args.ports.split(",")
    tag = "" if args.dtype == "float32" else f"-{args.dtype}"
    todo = [(seed, [n for n in names if (n + tag, seed) not in done])
            for seed in range(args.start, args.start + args.models)]
    todo = [(seed, missing) for seed, missing in todo if missing]
    ctx = multiprocessing.get_context("spawn")       # each worker loads its own ports
    with ProcessPoolExecutor(args.workers, ctx, initializer=_start_worker,
                             initargs=(names, args.threads, args.dtype)) as pool:
        while todo:
            with _locked(args.lock), open(args.out, "a") as fh:
                t0 = time.perf_counter()
                first, count, running = todo[0][0], 0, set()
                while todo or running:
                    while todo and len(running) < 2 * args.workers and count < args.chunk \
                            and time.perf_counter() - t0 < args.chunk_seconds:
                        running.add(pool.submit(_run_seed, *todo.pop(0), tag))
                        count += 1
                    if not running:
                        break
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        for rec in future.result():
                            fh.write(json.dumps(rec) + "\n")
                            failed = [k for k, v in rec["checks"].items() if v["status"] == "FAIL"]
                            if failed:
                                print(f"FAIL {rec['port']} random-{rec['seed']} {rec['case']}: {failed}",
                                      flush=True)
                    fh.flush()
                print(f"{time.strftime('%H:%M:%S')} from model {first}: {count} models in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    return summarize(args.out)


def summarize(path) -> int:
    """Print the counts per port and check, the largest ratios, and the ReLU inputs resolved."""
    stats: dict = {}
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            s = stats.setdefault(rec["port"], {"models": 0, "failed_models": 0, "stressed": 0, "checks": {},
                                               "seeds": [], "kinks": {"models": 0, "ambiguous": 0, "flipped": 0}})
            s["models"] += 1
            s["seeds"].append(rec["seed"])
            s["stressed"] += bool(rec.get("stressed"))
            s["failed_models"] += any(v["status"] == "FAIL" for v in rec["checks"].values())
            for name, v in rec["checks"].items():
                c = s["checks"].setdefault(name, {"pass": 0, "FAIL": 0, "skip": 0, "max_ratio": 0.0})
                c[v["status"]] += 1
                if v.get("ratio") is not None and v["status"] == "pass":
                    c["max_ratio"] = max(c["max_ratio"], v["ratio"])
                k = v.get("kinks") or {}
                if k.get("ambiguous"):
                    s["kinks"]["models"] += 1
                    s["kinks"]["ambiguous"] += k["ambiguous"]
                    s["kinks"]["flipped"] += k.get("flipped", 0)
    for port, s in stats.items():
        print(f"{port}: {s['models']} models (random-{min(s['seeds'])} .. random-{max(s['seeds'])}, "
              f"{s['stressed']} with stress magnitudes), {s['failed_models']} with a failed check; "
              f"ReLU inputs within the kink margin in {s['kinks']['models']} models: {s['kinks']['ambiguous']}, "
              f"{s['kinks']['flipped']} taken the other way than float64 (resolved)")
        for name, c in s["checks"].items():
            print(f"  {name:<26} pass {c['pass']:>6}  FAIL {c['FAIL']:>4}  skip {c['skip']:>5}  "
                  f"largest error/tolerance of a pass {c['max_ratio']:.3g}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
