"""The documentation site builds without a warning and its internal links resolve: Sphinx with
``-W`` (every warning an error: a docstring that is not valid reST, a guide's link to a missing page
or anchor, a README section a guide renders that no longer exists), then linkchecker over the built
HTML (every link and anchor between pages, the notebooks' included).  Needs the `docs` extra."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import python_m_reading_notebooks

ROOT = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("sphinx", "myst_nb", "sphinxarg", "furo", "linkcheck")
           if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (pip install -e '.[docs]')")
def test_docs_site_builds_and_links_resolve():
    # linkchecker, run as root, drops its privileges to `nobody`: build where anyone can read
    out = Path(tempfile.mkdtemp(prefix="refopt-docs-"))
    try:
        out.chmod(0o755)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        build = subprocess.run([*python_m_reading_notebooks("sphinx"), "-W", "--keep-going", "-E", "-q", "-b",
                                "html", "-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, f"sphinx-build -W failed:\n{build.stderr[-6000:]}"
        for page in ("index", "guides/loading", "reference/api", "reference/cli", "architecture",
                     "notebooks/07_kv_cache_and_bandwidth", "ORACLE"):
            assert (out / "html" / f"{page}.html").is_file(), f"no {page}.html"
        cli = (out / "html" / "reference" / "cli.html").read_text(encoding="utf-8")
        assert "--max-length" in cli and "conform" in cli, "the CLI reference lacks the parsers' options"
        check = subprocess.run([sys.executable, "-m", "linkcheck", "--no-status", "--no-warnings",
                                str(out / "html" / "index.html")],
                               cwd=out, env=env, capture_output=True, text=True, timeout=600)
        assert check.returncode == 0, f"broken links in the built site:\n{check.stdout[-6000:]}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
