"""Sphinx configuration of refopt's documentation site.

Build it with the `docs` extra installed::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Sphinx (not MkDocs) because refopt's docstrings are reStructuredText with Sphinx roles
(:class:`...`, :func:`...`, ``code``) and Google-style ``Args:`` sections: autodoc and napoleon render
them as written.  The guides are Markdown (MyST), the notebooks are rendered with their stored
outputs by myst-nb (never executed here: tests/test_notebooks.py checks that those outputs are
current), and the CLI reference is generated from the argparse parsers by sphinx-argparse, so it
cannot go stale.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "refopt"
author = "the refopt authors"
copyright = "the refopt authors, MIT licence"
release = version = "0.1.0"

extensions = [
    "myst_nb",                      # Markdown guides and the notebooks (stored outputs)
    "sphinx.ext.autodoc",           # the API reference, from the docstrings
    "sphinx.ext.napoleon",          # Google-style "Args:" / "Returns:" sections
    "sphinx.ext.viewcode",          # [source] links
    "sphinxarg.ext",                # the CLI reference, from refopt.cli.build_parser()
]

# The notebooks live in notebooks/ at the top of the repository (where a learner opens them);
# Sphinx reads sources only under docs/, so they are copied to docs/notebooks/ (git-ignored) first.
_NOTEBOOKS = DOCS / "notebooks"
shutil.rmtree(_NOTEBOOKS, ignore_errors=True)
_NOTEBOOKS.mkdir()
for _nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(_nb, _NOTEBOOKS / _nb.name)

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nb_execution_mode = "off"          # render what is stored; the tests re-execute and compare
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3           # links to "#a-section" inside and across pages are checked

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports = ["torch", "transformers", "keras", "keras_hub", "tensorflow"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "refopt"
html_static_path: list[str] = []
html_show_sourcelink = False

# Warnings are errors in CI (-W); these two kinds come from third-party material we render as is.
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]
