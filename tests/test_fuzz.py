"""refopt's own fuzz suite: hypothesis drives the cases of ``scripts/fuzz.py`` -- mutated
checkpoints (safetensors, KerasHub .h5), configs, tokenizer files, special files, API inputs,
saves into random destinations and saves killed after a random call -- and every outcome must be
an accepted input the oracle agrees with or a named refusal: never an escaped exception, a silent
wrong result, a hang or a lost file.

About 1,100 cases in all by default (the cheap kinds get more); ``REFOPT_FUZZ_SCALE=10`` runs ten
times as many.  The seeded long run is ``python scripts/fuzz.py --cases 10000``.
"""

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("safetensors", reason="the oracle reads files with the safetensors package")
_spec = importlib.util.spec_from_file_location("refopt_fuzz", ROOT / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

SCALE = float(os.environ.get("REFOPT_FUZZ_SCALE", "1"))
EXAMPLES = {"safetensors": 150, "h5": 40, "config": 150, "tokenizer": 150, "special-file": 100,
            "api": 400, "save": 60, "kill": 30}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return fuzz.Fixtures(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("kind", list(fuzz.KINDS))
def test_fuzz(kind, fixtures, monkeypatch):
    monkeypatch.setenv("REFOPT_BACKEND", "numpy")   # as `scripts/fuzz.py` runs its cases (no compiling)
    examples = max(1, int(EXAMPLES[kind] * SCALE))
    outcomes = []

    @settings(max_examples=examples, suppress_health_check=list(HealthCheck))
    @given(rng=st.randoms(use_true_random=False))
    def run(rng):
        outcome, detail = fuzz.run_case(kind, rng, fixtures)
        outcomes.append(outcome)
        assert outcome in ("accepted", "refused"), f"{outcome}: {detail}"

    run()
    assert len(outcomes) >= min(examples, 50)       # fewer only when hypothesis ran out of cases
    if kind != "kill":                              # a kill's outcome is always a verified load
        assert "accepted" in outcomes and "refused" in outcomes   # both sides of the oracle ran
