"""The ``refopt`` command.

    refopt generate "prompt" [--preset P] [--sampler greedy|top_k|...] [--max-length N] ...
    refopt info PRESET
    refopt convert SRC DST --format keras|huggingface
    refopt train TEXT_FILE [--out DIR] ...
    refopt bench [forward|generate|train|tokenizer|cpu|gpu]
    refopt conform --against transformers|keras-hub|module:Adapter [PRESET] [--json]

Each subcommand lives in ``refopt/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``.  Errors a user can cause (``refopt.errors``) print as one line on stderr and
exit with status 2; ``--help`` works everywhere.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from refopt.errors import RefoptError

COMMANDS = ("generate", "info", "convert", "train", "bench", "conform")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refopt", description="OPT as plain arrays: generate, "
                                     "inspect, convert, train, benchmark and check conformance.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"refopt.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"refopt.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def _report(command: str, message: str) -> None:
    lines = message.splitlines() or [""]
    print(f"refopt {command}: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)


def main(argv=None) -> int:
    """Run the command line ``argv``; the exit status: 0, 2 for an error the user can fix (one
    line on stderr, never a traceback), 1 for a bug in refopt (one line too, unless
    ``REFOPT_DEBUG=1``), 130 when interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("generate", "train"):   # the commands that compile kernels (conform: when its port does)
        _announce_compiles()
    try:
        return int(args.run(args) or 0)
    except RefoptError as e:
        _report(args.command, str(e))
        return 2
    except KeyboardInterrupt:
        return 130
    except MemoryError:
        _report(args.command, "out of memory")
        return 2
    except OSError as e:                  # the file system refused something (not refopt's words)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _report(args.command, f"{where}{e.strerror or e}")
        return 2
    except Exception as e:
        if os.environ.get("REFOPT_DEBUG"):
            raise
        _report(args.command, f"internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "this is a bug in refopt, please report it (REFOPT_DEBUG=1 shows the traceback)")
        return 1


def _announce_compiles():
    # a Numba compilation that keeps the command waiting more than a second says so on stderr
    from refopt.commands import announce_slow_compiles

    announce_slow_compiles(lambda message: print(message, file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
