"""The pytest plugin: `pytest --refopt-backend module:Adapter` runs the conformance suite, in
parallel under pytest-xdist, with the same items and examples on every worker."""

import importlib.metadata
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("xdist", reason="needs pytest-xdist (pip install -e '.[test]')")


def _plugin_args():
    # with refopt's pytest11 entry point installed the plugin loads by itself; -p would register it twice
    installed = any(ep.value.startswith("refopt.testing.pytest_plugin")
                    for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "refopt.testing.pytest_plugin"]


def _pytest(tmp_path, *args):
    # an empty test directory: the session holds only the conformance items
    (tmp_path / "conftest.py").write_text("")
    cmd = [sys.executable, "-m", "pytest", *_plugin_args(), "-q", "-p", "no:cacheprovider",
           "--rootdir", str(tmp_path), str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def test_plugin_is_inert_without_the_option(tmp_path):
    proc = _pytest(tmp_path)
    assert "no tests ran" in proc.stdout, proc.stdout + proc.stderr


def test_conformance_items_pass_in_parallel(tmp_path):
    proc = _pytest(tmp_path, "--refopt-backend", "refopt:numpy", "--refopt-random-configs", "2",
                   "--refopt-examples", "4", "-n", "2", "-rs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # 2 configs x 5 checks + 9 sampler checks + 1 hypothesis item pass; 4 tokenizer checks skip
    assert "20 passed, 4 skipped" in proc.stdout, proc.stdout[-2000:]
    assert "no tokenizer files" in proc.stdout


def test_a_mutant_fails_with_its_location(tmp_path):
    proc = _pytest(tmp_path, "--refopt-backend", "refopt.testing.mutants:LayerNormEpsilon",
                   "--refopt-random-configs", "1", "--refopt-examples", "2", "-n", "2")
    assert proc.returncode == 1
    assert "first divergence: layers.0." in proc.stdout, proc.stdout[-3000:]
    assert "FAILED refopt-conformance::random-0/activations" in proc.stdout


def test_items_are_the_same_on_every_run(tmp_path):
    # what xdist relies on: collection is deterministic (fixed seeds, derandomized hypothesis)
    runs = [[line for line in _pytest(tmp_path, "--refopt-backend", "refopt:numpy", "--collect-only")
             .stdout.splitlines() if line.startswith("refopt-conformance::")] for _ in range(2)]
    assert runs[0] == runs[1] and "refopt-conformance::samplers.top_p_tie" in runs[0]
