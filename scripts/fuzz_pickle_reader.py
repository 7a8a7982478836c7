"""A long seeded fuzz run of refopt's pickle-free PyTorch reader and its MessagePack (Flax) reader
(the CI tests run a few hundred cases each).

    python scripts/fuzz_pickle_reader.py --cases 10000 --seed 0

Mutates the committed ``torch.save`` files of tests/data/torch_tiny (the whole file, or only the
object pickle inside an intact zip archive) and the ``flax_model.msgpack`` of tests/data/hub_opt_tiny: overwritten, deleted and inserted bytes, and bogus
8-byte lengths.  Each case must end in a correct load (every array readable) or a named
``CheckpointError``; anything else -- another exception, or a case slower than ``--slow`` seconds --
is counted and printed.  Prints counts by outcome and by what was mutated.
"""

import argparse
import collections
import io
import random
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from refopt.errors import CheckpointError  # noqa: E402
from refopt.io import flax_msgpack, stored, torch_pickle  # noqa: E402

DATA = ROOT / "tests" / "data" / "torch_tiny"


def mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        at = rnd.randrange(max(len(b), 1))
        kind = rnd.randrange(4)
        if kind == 0:
            b[at:at + 1] = bytes([rnd.randrange(256)])
        elif kind == 1:
            del b[at:at + rnd.randint(1, 16)]
        elif kind == 2:
            b[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        else:
            b[at:at + 8] = struct.pack("<q", rnd.randrange(-2**40, 2**40))
    return bytes(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow", type=float, default=2.0)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    seeds = {"zip file": (DATA / "zip.pt").read_bytes(), "legacy file": (DATA / "legacy.pt").read_bytes(),
             "flax msgpack": (ROOT / "tests" / "data" / "hub_opt_tiny" / "flax_model.msgpack").read_bytes()}
    with zipfile.ZipFile(DATA / "zip.pt") as zf:
        records = {i.filename: zf.read(i) for i in zf.infolist()}
    counts = collections.Counter()
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.pt"
        for case in range(args.cases):
            kind = rnd.choice(["zip file", "legacy file", "pickle in zip", "flax msgpack"])
            if kind == "pickle in zip":
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w") as zf:
                    for name, data in records.items():
                        zf.writestr(name, mutate(data, rnd) if name.endswith("data.pkl") else data)
                path.write_bytes(buf.getvalue())
            else:
                path.write_bytes(mutate(seeds[kind], rnd))
            t = time.perf_counter()
            try:
                got = (flax_msgpack.load if kind == "flax msgpack" else torch_pickle.load)(path)
                for v in got.values():
                    (stored.bits(v) if stored.is_bfloat16(v) else np.asarray(v)).sum()
                outcome = "load"
            except CheckpointError as e:
                outcome = type(e).__name__
            except Exception as e:  # noqa: BLE001  (what this script hunts for)
                outcome = f"RAW {type(e).__name__}"
                bad.append((case, kind, repr(e)[:200]))
            if time.perf_counter() - t > args.slow:
                outcome += " (slow)"
                bad.append((case, kind, "slow"))
            counts[(kind, outcome)] += 1
    print(f"{args.cases} cases, seed {args.seed}")
    for (kind, outcome), n in sorted(counts.items()):
        print(f"  {kind:14s} {outcome:22s} {n:6d}")
    for case in bad[:20]:
        print("  !", case)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
