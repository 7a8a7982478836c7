"""``refopt conform``: check another OPT implementation against refopt's float64 reference.

    refopt conform --against transformers [PRESET ...] [--json]
    refopt conform --against keras-hub [PRESET ...]
    refopt conform --against my_package.module:MyAdapter [PRESET ...]
    refopt conform --against my_package.module:MyAdapter --seed 0 --case stress-scores

Prints a table of checks (logits, activations, gradients, incremental decoding, generation,
tokenizer, samplers) with their figures and pass/fail, and under each failure the command that runs
it again; exit status 1 when any check fails, or when nothing at all was compared (no torch, an
adapter that builds none of the models), with the reason.  Checks needing a capability the adapter
does not declare are listed once; checks it could not run (a config it does not build, no tokenizer
files) are listed as skipped, with the reason.  ``my_package`` is imported from the current
directory when it is not installed.
"""

from __future__ import annotations

import sys

from refopt.errors import ConfigError


def add_parser(subparsers):
    p = subparsers.add_parser(
        "conform", help="check another OPT implementation against refopt's float64 reference",
        description="Run refopt's conformance suite against an adapter: logits, named activations "
                    "(the first diverging one is located), gradients, greedy generation, the "
                    "tokenizer and sampler decisions.  Exit status 1 when a check fails.")
    p.add_argument("--against", required=True, metavar="ADAPTER",
                   help="'transformers', 'keras-hub', 'ctranslate2', 'refopt[:numpy|numba|cuda[:float32|float64]]' "
                        "or 'package.module:AdapterClass' (imported from the current directory when it is "
                        "not installed)")
    p.add_argument("presets", nargs="*", metavar="PRESET",
                   help="preset directories (KerasHub or transformers layout) whose models are "
                        "checked; default: the bundled preset when installed")
    p.add_argument("--random-configs", type=int, default=3, metavar="N",
                   help="also check N random configs and weights, random-SEED .. (default 3)")
    p.add_argument("--no-stress", action="store_true",
                   help="leave out the fixed stress cases (outliers, large scores, offsets, long sequences)")
    p.add_argument("--case", metavar="ID",
                   help="run only this case or check, as a failure's reproduce line names it: a preset's "
                        "name, random-N, stress-*, a case id, samplers, tokenizer.bytes, random-3/gradients")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a directory with vocab.json and merges.txt for the tokenizer checks "
                        "(default: the first preset that has them)")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                   help="the port's compute dtype: the built-in transformers and refopt adapters compute in "
                        "it (refopt's bfloat16 / float16 are its dtype policies); any other adapter is held "
                        "to it in place of the dtype it declares. A bfloat16 or float16 port is compared "
                        "with refopt's reference computed in that dtype as KerasHub computes it, with that "
                        "dtype's tolerance (default: the adapter's own dtype, float32 for the built-ins)")
    p.add_argument("--streaming", action="store_true", default=None,
                   help="the float64 reference runs one decoder layer at a time from the memory-mapped "
                        "files, and the adapter must load the preset itself (the default for presets "
                        "of more than 20M parameters, which an adapter without a loader then gets whole)")
    p.add_argument("--no-samplers", action="store_true", help="skip the sampler checks")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random configs, inputs, texts and sampler draws (default 0)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="threads of the float64 reference's NumPy BLAS while the suite runs (default 1: "
                        "the oracle's batches are a few tokens, and on a busy machine more threads wait "
                        "for each other; needs threadpoolctl, in the 'peers' extra). The built-in "
                        "transformers adapter computes on one PyTorch thread either way")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--fail-on-skip", action="store_true",
                   help="exit with status 1 when a check was skipped, too")
    p.set_defaults(run=run)
    return p


def _adapter(spec: str, dtype: str | None):
    from refopt.testing.adapter import load_adapter_as

    return load_adapter_as(spec, dtype)


def run(args) -> int:
    if args.random_configs < 0:
        raise ConfigError(f"--random-configs={args.random_configs}: expected a number >= 0")
    if args.threads < 1:
        raise ConfigError(f"--threads={args.threads}: expected a number >= 1")
    _unmap_freed_blocks()
    with _blas_threads(args.threads):
        return _run(args)


def _unmap_freed_blocks(threshold: int = 1 << 20):
    """glibc's malloc: every block of ``threshold`` bytes or more mapped on its own and unmapped
    when freed.  By default glibc raises that threshold (up to 32 MiB) after the first such block
    is freed, and the float64 layers and gradient blocks the oracle converts and drops one after
    another then stay in the heap (a 125m conform: about 50 MiB of its peak).  Elsewhere: nothing."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, threshold)          # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        pass


def _blas_threads(n: int):
    """NumPy's BLAS held to ``n`` threads (threadpoolctl; without it, as it is)."""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    import numpy  # noqa: F401  (its BLAS loaded, so that threadpoolctl finds it)

    return threadpool_limits(limits=n, user_api="blas")


def _run(args) -> int:
    from refopt.io import presets as _presets
    from refopt.testing import checks
    from refopt.testing.adapter import NotSupported, Unavailable

    preset_dirs = [_presets.resolve(p) for p in args.presets]
    if not preset_dirs and args.case is None:
        try:
            preset_dirs = [_presets.bundled_preset_dir()]
        except Exception:   # no bundled model in this installation: random configs only
            preset_dirs = []
    try:
        adapter = _adapter(args.against, args.dtype)
    except NotSupported as e:
        adapter = Unavailable(args.against, str(e))
    if "numba" in sys.modules:         # a port on Numba (refopt's own): say when it compiles
        from refopt.cli import _announce_compiles

        _announce_compiles()

    def progress(result):
        if not args.json:
            print(f"  {result.status:<4} {result.name}", file=sys.stderr, flush=True)

    p = checks.plan(adapter, preset_dirs, 0 if args.case else args.random_configs, args.tokenizer,
                    not args.no_samplers, args.seed, args.streaming, not args.no_stress, args.case)
    p = p._replace(spec=args.against, extra=() if args.dtype is None else ("--dtype", args.dtype))
    results = []
    for check in p.suite:
        results.append(checks.run_check(check, p))
        progress(results[-1])
    reason = p.adapter.reason if isinstance(p.adapter, Unavailable) else ""
    report = checks.Report(p.adapter.name, p.adapter.dtype, results, p.suite.unsupported, reason, args.seed)
    p.adapter.close()
    print(report.to_json() if args.json else report.table())
    why = report.nothing_compared()
    if why:
        print(f"refopt conform: nothing was compared: {why}", file=sys.stderr)
        return 1
    if report.failed:
        return 1
    if args.fail_on_skip and any(r.status == checks.SKIP for r in report.results):
        return 1
    return 0
