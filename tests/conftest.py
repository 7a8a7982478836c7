"""Shared test fixtures: the path to ../shared and a skip when it is absent; hypothesis profiles;
progress by file, the per-test time budget and where the CPU time went; the CUDA simulator's
scheduler."""

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# CI: deterministic examples (a failure reproduces), no per-example deadline (shared, noisy machine).
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def shared_path(*parts) -> Path:
    """A path under ../shared, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared data and fixtures), which is absent")
    return path


@pytest.fixture
def shared():
    return shared_path


def python_m_reading_notebooks(module: str) -> list[str]:
    """``[python, "-m", module]`` for a subprocess that reads notebooks (nbval, Sphinx with myst-nb),
    without ``rfc3987_syntax``: jsonschema, under nbformat, imports it when it is installed, and it
    builds a grammar at import (2.3 CPU-seconds a process).  It checks only the "iri" formats, which
    nbformat's schemas never use, so the notebooks are validated exactly as with it."""
    return [sys.executable, "-c", "import runpy, sys; sys.modules.setdefault('rfc3987_syntax', None); "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"]


@pytest.fixture(scope="session", autouse=True)
def _keras_process_ends_with_the_session():
    # tests/keras_runner.py's KerasHub process, ended (and its CPU time counted in the summary
    # below) when the session's tests are done, not at interpreter exit
    yield
    runner = sys.modules.get("keras_runner")
    if runner is not None:
        runner.close()



# ------------------------------------------------------------------------- the suite's time budget
# The README's test command must finish in a few minutes on a 2-core machine (docs/development.md).
# Two aids, in the process that reports (xdist's controller): a line as each test file finishes, so
# progress shows from the first minutes on, and a list of the tests over the per-test budget at the
# end.  Wall time is reported, never asserted (a shared machine's timings are noise, not failures).
BUDGET_S = float(os.environ.get("REFOPT_TEST_BUDGET_S", "20"))
PROFILE = os.environ.get("REFOPT_TEST_PROFILE")         # a path: every phase's times as JSON


class _Accounting:
    """In every process that runs tests: each phase's CPU seconds (this process and the
    subprocesses it waited for: notebooks, the docs build, CLI runs) and the CPU seconds Numba spent
    compiling in it (``numba:compile`` events, cache misses only; nested compilations counted
    once), attached to the phase's report as user properties for the controller's summary."""

    def __init__(self):
        self.compile_s = 0.0
        self.compiles = 0
        self.compiled: list[tuple[str, str, float]] = []   # (function, signature, CPU-s) under PROFILE
        self._depth: dict[int, int] = {}
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()
        self._mark = self._now()
        try:
            from numba.core import event
        except ImportError:
            return
        accounting = self

        class Listener(event.Listener):
            def on_start(self, ev):
                ident = threading.get_ident()
                with accounting._lock:
                    depth = accounting._depth.get(ident, 0)
                    accounting._depth[ident] = depth + 1
                    if depth == 0:
                        accounting._started[ident] = time.thread_time()

            def on_end(self, ev):
                ident = threading.get_ident()
                with accounting._lock:
                    depth = accounting._depth[ident] - 1
                    accounting._depth[ident] = depth
                    if depth == 0:
                        spent = time.thread_time() - accounting._started.pop(ident)
                        accounting.compile_s += spent
                        accounting.compiles += 1
                        if PROFILE:
                            fn = ev.data["dispatcher"].py_func
                            accounting.compiled.append((f"{fn.__module__}.{fn.__qualname__}",
                                                        str(ev.data["args"]), round(spent, 3)))

        event.register("numba:compile", Listener())

    def _now(self):
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
        return cpu, self.compile_s, self.compiles

    def pytest_collection_finish(self, session):
        self._mark = self._now()                # collecting (imports) is counted per process below

    def pytest_sessionfinish(self, session):
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:            # an xdist worker: its whole process, for the summary
            workeroutput["refopt_process"] = self.totals()

    def totals(self):
        return {"cpu": self._now()[0], "compile": self.compile_s, "compiles": self.compiles,
                "compiled": self.compiled}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        now = self._now()
        cpu, compile_s, compiles = (a - b for a, b in zip(now, self._mark))
        self._mark = now
        outcome.get_result().user_properties.append(
            ("refopt_time", {"cpu": round(cpu, 3), "compile": round(compile_s, 3), "compiles": compiles}))


class _Progress:
    def __init__(self, config):
        self.config = config
        self.left: dict[str, int] = {}
        self.failed: set[str] = set()
        self.slow: list[tuple[float, str, str, dict]] = []
        self.records: list[dict] = []
        self.workers: list[dict] = []
        self.start = None

    def _expect(self, nodeids):
        if not self.left:
            for nodeid in nodeids:
                path = nodeid.split("::")[0]
                self.left[path] = self.left.get(path, 0) + 1

    def pytest_collection_finish(self, session):
        self._expect(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        self._expect(ids)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        if "refopt_process" in getattr(node, "workeroutput", {}):
            self.workers.append(node.workeroutput["refopt_process"])

    def pytest_sessionstart(self, session):
        self.start = time.monotonic()
        self.epoch = time.time()

    def pytest_runtest_logreport(self, report):
        spent = dict(report.user_properties).get("refopt_time", {})
        self.records.append({"test": report.nodeid, "when": report.when, "wall": round(report.duration, 3),
                             "start": round(getattr(report, "start", 0) - self.epoch, 2),
                             "worker": getattr(report, "node", None) and report.node.gateway.id, **spent})
        if report.when in ("setup", "call") and report.duration > BUDGET_S:
            self.slow.append((report.duration, report.when, report.nodeid, spent))
        if report.failed:
            self.failed.add(report.fspath)
        path = report.nodeid.split("::")[0]
        if report.when == "teardown" and path in self.left:
            self.left[path] -= 1
            if self.left[path] == 0 and len(self.left) > 1:
                tr = self.config.pluginmanager.get_plugin("terminalreporter")
                if tr is not None and tr.verbosity <= 0:
                    done = sum(1 for n in self.left.values() if n == 0)
                    tr.ensure_newline()
                    tr.write_line(f"[{time.monotonic() - self.start:5.0f} s] {done}/{len(self.left)} files: "
                                  f"{path} done{' (FAILED)' if report.fspath in self.failed else ''}")

    def pytest_terminal_summary(self, terminalreporter):
        if self.slow:
            terminalreporter.section(f"tests over the {BUDGET_S:.0f} s budget (docs/development.md)")
            for duration, when, nodeid, spent in sorted(self.slow, key=lambda s: s[0], reverse=True):
                cpu = f"  ({spent['cpu']:.0f} CPU-s, {spent['compile']:.0f} s compiling)" if spent else ""
                terminalreporter.write_line(f"{duration:6.1f} s  {when:5s} {nodeid}{cpu}")
        workers = self.workers
        here = self.config.pluginmanager.get_plugin("refopt-accounting")
        if not workers and here is not None:            # a run without xdist
            workers = [here.totals()]
        if workers:
            cpu, compile_s, compiles = (sum(w[k] for w in workers) for k in ("cpu", "compile", "compiles"))
            who = f"{len(workers)} workers" if self.workers else "the tests"
            terminalreporter.write_line(
                f"refopt: {who} used {cpu:.0f} CPU-seconds (with their subprocesses), "
                f"{compile_s:.0f} of them in {compiles} Numba compilations")
        if PROFILE:
            Path(PROFILE).write_text(json.dumps({"tests": self.records, "workers": self.workers}, indent=0))


# The order of a two-worker run.  xdist's worksteal gives each worker one half of the collection, in
# order, and an idle worker steals from the end of the other's queue, so a long test left near the
# end keeps one core busy after the other has finished (14 s in one measured run).  The longest
# tests (wall seconds in a fresh-clone run, their Numba compiling included) start first; the order
# also decides how much is compiled twice, since a kernel one process compiles into the checkout's
# Numba cache is loaded, not compiled, by every process that needs it later:
# * the first half starts with the fresh-install test (on a fresh clone its `refopt generate`
#   subprocess compiles what a generation needs into the checkout's cache), then the decode-step
#   tests, which need the same float32 step and compile the other storage kinds;
# * the second half starts with what compiles little: KerasHub's process, the docs build, the
#   bundled model's figures (NumPy);
# * the notebooks come last, split over the two halves' ends: their kernels (separate processes)
#   then load what the workers compiled (in one measured run they compiled ~30 CPU-s of it again
#   when they ran early).
# A key is a test or a file (all its tests, kept together: test_dtype_policies_keras.py runs KerasHub
# once), or a tuple of them run together: the users of tests/keras_runner.py's KerasHub process, so
# that one worker starts it (importing TensorFlow and KerasHub: ~6 CPU-seconds), not both.  A value
# is (seconds, half): 0 or 1 pins the key to that half, None places it where the load is lighter.
# A stale entry costs only time.
LONG = {
    "tests/test_cli.py::test_generate_on_a_fresh_install_starts_at_once_and_compiles_in_the_background": (34, 0),
    "tests/test_kernels_int8.py::test_decode_step": (33, 0),
    "tests/test_kernels_cpu.py::test_decode_step": (29, 0),
    "tests/test_backends.py::test_weights_dtype_logits_error_and_greedy_text": (20, 0),
    "tests/test_backends.py::test_decode_with_cache_agrees": (17, 0),
    "tests/test_backends.py::test_seeded_generation_identical_across_backends": (14, 0),
    "tests/test_dtype_policies_keras.py": (28, 1),
    ("tests/test_lora_keras.py", "tests/test_peers_keras.py",
     "tests/test_bundled.py::test_keras_hub_loads_the_bundled_preset_with_the_same_logits"): (24, 1),
    "tests/test_bundled.py::test_numbers_recomputed": (19, 1),
    "tests/test_docs.py::test_docs_site_builds_and_links_resolve": (18, 1),
    "tests/keras_hub_port/test_kh_opt_causal_lm.py::test_generate": (17, 1),
    "tests/test_lora.py::test_fit_trains_the_adapters_alone": (16, None),
}
LAST = "tests/test_notebooks.py::test_notebook_outputs_are_current"


def _dist_given(config):
    given = list(config.invocation_params.args) + os.environ.get("PYTEST_ADDOPTS", "").split()
    return any(a.startswith("--dist") for a in given)


def pytest_collection_modifyitems(config, items):
    # in a worker of two, under worksteal (pytest_configure's default: no --dist given)
    if getattr(config, "workerinput", {}).get("workercount") != 2 or _dist_given(config):
        return
    groups: dict[str, list] = {}
    rest, last = [], []
    for item in items:
        key = next((k for k in LONG for p in ((k,) if isinstance(k, str) else k)
                    if item.nodeid == p or item.nodeid.startswith((p + "::", p + "["))), None)
        if key:
            groups.setdefault(key, []).append(item)
        else:
            (last if item.nodeid.startswith(LAST) else rest).append(item)
    halves, load = ([], []), [0.0, 0.0]
    for key in sorted(groups, key=lambda k: (LONG[k][1] is None, -LONG[k][0])):
        seconds, side = LONG[key]
        side = load.index(min(load)) if side is None else side
        halves[side].extend(groups[key])
        load[side] += seconds
    tails = (last[0::2], last[1::2])
    first = len(items) // 2 - len(halves[0]) - len(tails[0])   # worksteal sends len // 2 to the first worker
    if first < 0 or first > len(rest):
        return
    items[:] = halves[0] + rest[:first] + tails[0] + halves[1] + rest[first:] + tails[1]


def pytest_configure(config):
    # xdist: --dist worksteal unless a --dist was given.  "load" (xdist's default with -n) hands
    # each worker a queue of tests in advance; in one measured fresh-clone run one worker finished
    # 110 s before the other, which still held the KerasHub and oracle tests.  worksteal starts
    # each worker on its half of the collection (a file's tests mostly stay on one worker) and lets
    # an idle worker take half of the other's queue.
    if getattr(config.option, "dist", "no") == "load" and not _dist_given(config):
        config.option.dist = "worksteal"
    if not hasattr(config, "workerinput"):          # the controller (or a run without xdist)
        config.pluginmanager.register(_Progress(config), "refopt-progress")
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        config.pluginmanager.register(_Accounting(), "refopt-accounting")   # where tests run


# Numba's CUDA simulator with an event-driven block scheduler (tests/_cudasim.py: its polling one
# took most of the CUDA tests' time)
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import _cudasim

    _cudasim.install()
