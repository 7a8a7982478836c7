"""The teaching notebooks in notebooks/ are committed with their outputs and figures, and those
outputs are current: nbval re-executes each notebook in a fresh kernel and compares every cell's
stored output with the new one (after notebooks/nbval-sanitize.cfg replaces what legitimately
varies: timings, rates, the core count, addresses).  Each notebook also holds its own assertions
(refopt's numbers against the notebook's from-scratch ones).

After changing code a notebook shows, refresh the stored outputs (docs/development.md)::

    PYTHONPATH=$PWD jupyter nbconvert --to notebook --execute --inplace \\
        --ExecutePreprocessor.record_timing=False notebooks/NAME.ipynb

Needs the `notebooks` extra (nbval, nbclient, nbformat, ipykernel, matplotlib)."""

import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import python_m_reading_notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SANITIZE = ROOT / "notebooks" / "nbval-sanitize.cfg"
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "tinyshakespeare.txt"
MISSING = [m for m in ("nbval", "nbclient", "nbformat", "ipykernel", "matplotlib")
           if importlib.util.find_spec(m) is None]
needs_extra = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} "
                                 "(pip install -e '.[notebooks]')")
IDS = [p.stem for p in NOTEBOOKS]


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    for topic in ("bpe", "forward", "backprop", "samplers", "kernels", "oracle", "kv_cache", "int8"):
        assert any(topic in n for n in names), f"no notebook about {topic} in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_executed(path):
    """Committed as a learner meets them: every code cell run once, top to bottom, in one kernel,
    with its output stored, and the figures stored as images."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), \
        f"{path.name}: cells not executed once in order (execution counts {counts})"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name}: stored an error output"
    images = sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    plots = sum("plt.show()" in "".join(c["source"]) for c in code)
    assert images >= plots > 0, f"{path.name}: {plots} cells plot but {images} figures are stored"


@needs_extra
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_outputs_are_current(path):
    if "tinyshakespeare" in path.read_text(encoding="utf-8") and not CORPUS.exists():
        pytest.skip(f"needs {CORPUS} (../shared): the stored outputs are those of the corpus")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.pop("NUMBA_ENABLE_CUDASIM", None)        # the notebooks run as a learner runs them
    env.pop("REFOPT_BACKEND", None)
    # -p nbval: pyproject.toml's addopts leave the plugin out of every other pytest process
    cmd = [*python_m_reading_notebooks("pytest"), "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "-p", "nbval", "--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE),
           "--nbval-cell-timeout", "300", str(path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, (
        f"{path.name}: a stored output differs from a fresh run, or a cell failed (refresh the "
        f"outputs as the module docstring says if the change is intended):\n{proc.stdout[-6000:]}")
    print(f"{path.name}: {elapsed:.1f} s")
