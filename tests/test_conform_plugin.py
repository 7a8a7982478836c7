"""The pytest plugin: `pytest --refopt-backend module:Adapter` runs the conformance suite, in
parallel under pytest-xdist, with the same items on every worker; errors are one-line usage errors,
never INTERNALERROR; the seed option changes the hypothesis examples."""

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
    # -p no:nbval: nbval's plugin (when installed) costs 2.4 CPU-seconds a process (pyproject.toml)
    cmd = [sys.executable, "-m", "pytest", *_plugin_args(), "-q", "-p", "no:cacheprovider", "-p", "no:nbval",
           "--rootdir", str(tmp_path), str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def test_plugin_is_inert_without_the_option(tmp_path):
    proc = _pytest(tmp_path)
    assert "no tests ran" in proc.stdout, proc.stdout + proc.stderr


def test_conformance_items_pass_in_parallel(tmp_path):
    proc = _pytest(tmp_path, "--refopt-backend", "refopt:numpy", "--refopt-random-configs", "2",
                   "--refopt-no-stress", "--refopt-examples", "3", "-n", "2", "-rs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # 2 configs x 7 checks + 9 sampler checks + 1 hypothesis item pass; 5 tokenizer checks skip
    assert "24 passed, 5 skipped" in proc.stdout, proc.stdout[-2000:]
    assert "no tokenizer files" in proc.stdout


def test_a_mutant_fails_with_its_location_and_a_reproduce_line(tmp_path):
    proc = _pytest(tmp_path, "--refopt-backend", "refopt.testing.mutants:LayerNormEpsilon",
                   "--refopt-random-configs", "1", "--refopt-no-stress", "--refopt-examples", "2", "-n", "2")
    assert proc.returncode == 1
    assert "first divergence: layers.0." in proc.stdout, proc.stdout[-3000:]
    assert "FAILED refopt-conformance::random-0/activations" in proc.stdout
    assert ("reproduce: refopt conform --against refopt.testing.mutants:LayerNormEpsilon --seed 0 "
            "--case random-0/activations") in proc.stdout


def test_items_are_the_same_on_every_run(tmp_path):
    # what xdist relies on: collection is deterministic (fixed seeds)
    runs = [[line for line in _pytest(tmp_path, "--refopt-backend", "refopt:numpy", "--collect-only")
             .stdout.splitlines() if line.startswith("refopt-conformance::")] for _ in range(2)]
    assert runs[0] == runs[1] and "refopt-conformance::samplers.top_p_tie" in runs[0]
    assert "refopt-conformance::stress-scores/logits" in runs[0]


def test_a_bad_backend_is_one_usage_error_under_n_auto(tmp_path):
    proc = _pytest(tmp_path, "--refopt-backend", "no_such_module_xyz:Adapter", "-n", "auto")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4 and "INTERNALERROR" not in out, out[-3000:]
    assert "--refopt-backend no_such_module_xyz:Adapter" in out and "cannot import" in out


def test_nothing_compared_fails_the_session(tmp_path):
    # every check skipped (an adapter that builds no config): exit 1, and the summary says why
    (tmp_path / "refuse.py").write_text(
        "from refopt.testing import Adapter, NotSupported\n"
        "class Refuse(Adapter):\n"
        "    def load(self, config, params):\n"
        "        raise NotSupported('builds nothing')\n"
        "    def logits(self, token_ids, padding_mask):\n"
        "        raise AssertionError\n")
    proc = _pytest(tmp_path, "--refopt-backend", "refuse:Refuse", "--refopt-random-configs", "1",
                   "--refopt-no-stress", "--refopt-examples", "0", "-n", "2", "-rs")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "NOTHING WAS COMPARED" in proc.stdout and "builds nothing" in proc.stdout


def test_the_seed_changes_the_hypothesis_examples(tmp_path):
    # a mutant caught only on some drawn models: the failing example's case id depends on the seed
    ids = []
    for seed in ("1", "2"):
        proc = _pytest(tmp_path, "--refopt-backend", "refopt.testing.mutants:LayerNormEpsilon",
                       "--refopt-random-configs", "0", "--refopt-no-stress", "--refopt-examples", "3",
                       "--refopt-seed", seed, "--refopt-case", "hypothesis", "-p", "no:xdist")
        line = next(x for x in proc.stdout.splitlines() if "ModelCase('" in x)
        ids.append(line.split("ModelCase('")[1].split("'")[0])
    assert ids[0] != ids[1]


def test_refopt_dtype_holds_a_port_to_the_half_precision_reference(tmp_path):
    # refopt's bfloat16 policy model passes; the float16 port declared bfloat16 fails on stress-scores
    proc = _pytest(tmp_path, "--refopt-backend", "refopt:numpy", "--refopt-dtype", "bfloat16",
                   "--refopt-random-configs", "1", "--refopt-no-stress", "--refopt-examples", "0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    proc = _pytest(tmp_path, "--refopt-backend", "refopt.testing.mutants:Float16DeclaredBfloat16",
                   "--refopt-dtype", "bfloat16", "--refopt-random-configs", "0", "--refopt-case", "stress-scores",
                   "--refopt-examples", "0")
    assert proc.returncode == 1
    assert "first divergence: layers.0.attention_output" in proc.stdout, proc.stdout[-3000:]
