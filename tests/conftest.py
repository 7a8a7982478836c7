"""Shared test fixtures: the path to ../shared and a skip when it is absent; hypothesis profiles;
progress by file and the per-test time budget."""

import os
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



# ------------------------------------------------------------------------- the suite's time budget
# The README's test command must finish in a few minutes on a 2-core machine (docs/development.md).
# Two aids, in the process that reports (xdist's controller): a line as each test file finishes, so
# progress shows from the first minutes on, and a list of the tests over the per-test budget at the
# end.  Wall time is reported, never asserted (a shared machine's timings are noise, not failures).
BUDGET_S = float(os.environ.get("REFOPT_TEST_BUDGET_S", "20"))


class _Progress:
    def __init__(self, config):
        self.config = config
        self.left: dict[str, int] = {}
        self.failed: set[str] = set()
        self.slow: list[tuple[float, str, str]] = []
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

    def pytest_sessionstart(self, session):
        self.start = time.monotonic()

    def pytest_runtest_logreport(self, report):
        if report.when in ("setup", "call") and report.duration > BUDGET_S:
            self.slow.append((report.duration, report.when, report.nodeid))
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
            for duration, when, nodeid in sorted(self.slow, reverse=True):
                terminalreporter.write_line(f"{duration:6.1f} s  {when:5s} {nodeid}")


def pytest_configure(config):
    if not hasattr(config, "workerinput"):          # the controller (or a run without xdist)
        config.pluginmanager.register(_Progress(config), "refopt-progress")
