"""`refopt conform`: the table, --json, exit status, located divergences, skips with reasons."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, shared_path
from refopt.cli import main


def _run(capsys, *argv):
    code = main(["conform", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_refopt_itself_passes_with_a_table(capsys):
    preset = shared_path("fixtures", "hf", "opt-tiny-realvocab")
    code, out, _ = _run(capsys, "--against", "refopt:numpy", str(preset), "--random-configs", "1")
    assert code == 0, out
    for row in ("opt-tiny-realvocab/logits", "opt-tiny-realvocab/activations", "opt-tiny-realvocab/gradients",
                "opt-tiny-realvocab/incremental.left_padding", "opt-tiny-realvocab/generation",
                "random-0/logits", "stress-scores/logits", "stress-long/incremental", "tokenizer.encode",
                "tokenizer.bytes", "samplers.top_p_tie"):
        assert row in out
    assert "max|Δ|" in out and "NMSE" in out and " 0 failed" in out and "not supported" not in out


def test_mutant_fails_with_the_located_divergence_and_a_reproduce_line(capsys):
    preset = shared_path("fixtures", "hf", "opt-tiny-preln")
    code, out, _ = _run(capsys, "--against", "refopt.testing.mutants:UnscaledAttention", str(preset),
                        "--random-configs", "1", "--no-samplers", "--no-stress", "--seed", "3")
    assert code == 1
    assert "FAIL" in out and "first divergence: layers.0.attention_output" in out
    line = next(x for x in out.splitlines() if "reproduce:" in x).split("reproduce: ")[1]
    assert line == (f"refopt conform --against refopt.testing.mutants:UnscaledAttention {preset} --seed 3 "
                    "--case opt-tiny-preln/logits")
    # the line runs that check alone, and fails the same way
    code, again, _ = _run(capsys, *line.split()[2:])
    assert code == 1 and "first divergence: layers.0.attention_output" in again
    assert [x.split()[0] for x in again.splitlines() if x.endswith(("FAIL", "pass")) or " FAIL " in x] \
        == ["opt-tiny-preln/logits"]


def test_a_failing_random_case_reproduces_from_its_id(capsys):
    # a case id rebuilds the exact model and batch (no preset, no seed of the run needed)
    from refopt.testing.cases import random_case

    case = random_case(5)
    code, out, _ = _run(capsys, "--against", "refopt.testing.mutants:LayerNormEpsilon", "--case", case.spec.id)
    assert code == 1 and f"{case.spec.id}/logits" in out and "first divergence" in out
    assert f"--case {case.spec.id}/logits" in out


def test_json_report(capsys):
    preset = shared_path("fixtures", "hf", "opt-tiny-preln")              # no tokenizer files
    code, out, _ = _run(capsys, "--against", "refopt.testing.mutants:TopPTieStrict", str(preset),
                        "--random-configs", "0", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["passed"] is False
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["samplers.top_p_tie"] == "FAIL" and status["samplers.top_p"] == "pass"
    assert status["tokenizer.encode"] == "skip"
    skip = next(c for c in report["checks"] if c["name"] == "tokenizer.encode")
    assert "no vocab.json/merges.txt in" in skip["detail"] and "opt-tiny-preln" in skip["detail"]


def test_streaming_mode(capsys):
    # every model check runs on a streamed preset, gradients block by block
    preset = shared_path("fixtures", "hf", "opt-tiny-preln")
    code, out, _ = _run(capsys, "--against", "refopt:numpy", "--streaming", str(preset),
                        "--random-configs", "0", "--no-samplers", "--no-stress")
    assert code == 0, out
    for check in ("activations", "gradients", "incremental.left_padding", "generation"):
        assert f"opt-tiny-preln/{check}" in out
    assert not [x for x in out.splitlines() if x.startswith("opt-tiny-preln/") and " skip " in x], out
    code, out, _ = _run(capsys, "--against", "refopt.testing.mutants:PositionsWithoutOffset", "--streaming",
                        str(preset), "--random-configs", "0", "--no-samplers")
    assert code == 1 and "first divergence: embeddings" in out and "loaded with own loader" in out


def test_an_adapter_without_capabilities_lists_them_once(capsys):
    minimal = "tests_support:LogitsOnly"
    code, out, _ = _run(capsys, "--against", minimal, "--random-configs", "1", "--no-stress")
    assert code == 0, out
    assert "random-1/logits.left_padding" not in out and "random-1/gradients" not in out
    assert out.count("not supported by the adapter") == 1
    for cap in ("left_padding (", "activations (", "gradients (", "incremental (", "generation (", "samplers (9 checks)"):
        assert cap in out, out


def test_a_config_the_adapter_does_not_build_is_one_row(capsys):
    code, out, _ = _run(capsys, "--against", "tests_support:PreLayerNormOnly", "--random-configs", "0",
                        "--case", "stress-post", "--no-samplers")
    rows = [x for x in out.splitlines() if x.startswith("stress-post")]
    assert len(rows) == 1 and rows[0].startswith("stress-post/*") and "skip" in rows[0], out
    assert "pre-LayerNorm only" in out and code == 1          # nothing else ran: nothing compared


def test_bad_adapter_spec_is_a_user_error(capsys):
    code, _, err = _run(capsys, "--against", "no_such_module_xyz:Adapter")
    assert code == 2 and "no_such_module_xyz" in err
    code, _, err = _run(capsys, "--against", "refopt.testing.mutants:NoSuchClass")
    assert code == 2 and "NoSuchClass" in err


def test_threads_hold_numpys_blas_while_the_suite_runs(capsys, monkeypatch):
    code, _, err = _run(capsys, "--against", "refopt", "--threads", "0")
    assert code == 2 and "--threads=0" in err
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="needs threadpoolctl (pip install -e '.[peers]')")
    from refopt.commands import conform

    # a first run loads whatever BLAS the check imports (run alone, the suite's first conform loads a
    # second one), so that the counts compared below are of the same libraries
    assert _run(capsys, "--against", "refopt", "--case", "random-0/logits", "--threads", "1")[0] == 0
    seen = []
    real = conform._run
    monkeypatch.setattr(conform, "_run", lambda args: seen.append(
        [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]) or real(args))
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    code, _, _ = _run(capsys, "--against", "refopt", "--case", "random-0/logits", "--threads", "1")
    assert code == 0 and seen and all(n == 1 for n in seen[0])
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"] == before


def test_transformers_passes_on_the_fixtures_and_random_configs(capsys):
    pytest.importorskip("torch", reason="needs torch (pip install -e '.[peers]')")
    pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[peers]')")
    fixtures = [shared_path("fixtures", "hf", n) for n in ("opt-tiny-preln", "opt-tiny-postln-proj",
                                                           "opt-tiny-realvocab")]
    code, out, _ = _run(capsys, "--against", "transformers", *map(str, fixtures), "--random-configs", "2",
                        "--no-stress")
    assert code == 0, out
    assert "transformers" in out.splitlines()[0] and " 0 failed" in out


_NO_TORCH = """
import sys
sys.modules["torch"] = None          # `import torch` raises ImportError, as on a machine without it
from refopt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_torch_nothing_is_compared_and_the_run_fails_saying_why():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, "conform", "--against", "transformers",
                           "--random-configs", "1", "--no-samplers"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0 passed, 0 failed" in proc.stdout and "NOTHING WAS COMPARED" in proc.stdout
    assert "torch" in proc.stderr and "pip install 'refopt[peers]'" in proc.stderr


def test_without_keras_hub_every_check_is_skipped_with_the_reason():
    if importlib.util.find_spec("keras_hub") is not None:
        pytest.skip("keras_hub is installed here: nothing to skip")
    env = {k: v for k, v in os.environ.items() if k != "REFOPT_KERAS_PYTHON"}
    proc = subprocess.run([sys.executable, "-m", "refopt", "conform", "--against", "keras-hub",
                           "--random-configs", "1", "--no-samplers"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "keras_hub is not installed" in proc.stderr and "REFOPT_KERAS_PYTHON" in proc.stderr
