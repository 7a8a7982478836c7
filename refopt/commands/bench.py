"""``refopt bench [NAME [ARGS...]]``: run the benchmark scripts that print refopt's tables.

The scripts are ``benchmarks/bench_<name>.py`` in the source tree (beside the ``refopt`` package
directory); they are not part of an installed wheel.  Without a name, the available benchmarks are
listed; ``all`` runs every one in turn; arguments after the name go to the script (``refopt bench
generate --batch 1 --new 32``; ``refopt bench generate -- --help`` shows its own options).
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path


def benchmarks_dir() -> Path | None:
    """``benchmarks/`` of the source tree refopt runs from, or None when absent (a wheel)."""
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    return here if here.is_dir() and any(here.glob("bench_*.py")) else None


def available() -> dict[str, tuple[Path, str]]:
    """name -> (script, first line of its docstring)."""
    root = benchmarks_dir()
    found = {}
    if root is None:
        return found
    for script in sorted(root.glob("bench_*.py")):
        try:
            doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
        except (SyntaxError, UnicodeDecodeError):
            doc = ""
        found[script.stem[len("bench_"):]] = (script, doc.strip().splitlines()[0] if doc.strip() else "")
    return found


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="run the benchmarks (source tree only) and print their tables",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", default=None,
                   help="forward, generate, train, tokenizer, cpu, ... or 'all' (default: list them)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(run=run)
    return p


def _missing():
    from refopt.errors import ConfigError

    return ConfigError("the benchmark scripts (benchmarks/bench_*.py) are not here: they ship with the "
                       "refopt source tree, not with an installed wheel; clone the repository and "
                       "run `refopt bench` from an editable install (pip install -e '.[bench]')")


def run(args) -> int:
    from refopt.errors import ConfigError

    found = available()
    if not found:
        raise _missing()
    if args.name is None:
        width = max(len(n) for n in found)
        print(f"benchmarks in {benchmarks_dir()}:")
        for name, (_, doc) in found.items():
            print(f"  {name.ljust(width)}  {doc}")
        print("run one with `refopt bench NAME [ARGS...]`, or all with `refopt bench all`")
        return 0
    names = list(found) if args.name == "all" else [args.name]
    for name in names:
        if name not in found:
            raise ConfigError(f"no benchmark {name!r}; available: {', '.join(found)} (or 'all')")
    extra = list(args.args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if args.name == "all" and extra:
        raise ConfigError("arguments cannot be passed to `refopt bench all`; run one benchmark")
    root = benchmarks_dir().parent
    status = 0
    for name in names:
        if len(names) > 1:
            print(f"== refopt bench {name}", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.bench_{name}", *extra], cwd=root,
                              env=env)
        status = status or proc.returncode
    return status
