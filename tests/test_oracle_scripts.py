"""The measurement scripts behind docs/ORACLE.md's figures still run: the false-alarm count on a
few drawn models (its records, its resume, its summary)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_false_alarm_script_records_resumes_and_summarizes(tmp_path):
    out = tmp_path / "fa.jsonl"
    cmd = [sys.executable, str(ROOT / "scripts" / "oracle_false_alarms.py"), "--models", "3", "--start", "7",
           "--ports", "refopt", "--workers", "1", "--lock", "", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["seed"] for r in records) == [7, 8, 9]
    for r in records:
        assert r["port"] == "refopt" and r["case"].startswith("v")
        assert set(r["checks"]) == {"logits", "logits.left_padding", "activations", "gradients",
                                    "incremental", "incremental.left_padding", "generation"}
        assert all(v["status"] == "pass" for v in r["checks"].values()), r
    assert "refopt: 3 models (random-7 .. random-9" in first.stdout
    assert "0 with a failed check" in first.stdout
    # a second run finds every model done: nothing is checked again, nothing appended
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(out.read_text().splitlines()) == 3
    assert "models in" not in again.stdout


def test_false_alarm_script_in_bfloat16(tmp_path):
    # --dtype: the ports compute in bfloat16 (refopt's policy model) and are recorded under their
    # dtype, so a bfloat16 run can share a file with a float32 one
    out = tmp_path / "fa.jsonl"
    cmd = [sys.executable, str(ROOT / "scripts" / "oracle_false_alarms.py"), "--models", "2", "--start", "3",
           "--ports", "refopt", "--workers", "1", "--lock", "", "--dtype", "bfloat16", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["port"] for r in records] == ["refopt-bfloat16"] * 2
    assert all(v["status"] == "pass" for r in records for v in r["checks"].values()), records
    assert "refopt-bfloat16: 2 models (random-3 .. random-4" in run.stdout
