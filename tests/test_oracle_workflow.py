"""The documented workflow, as a user runs it: docs/ORACLE.md's two-method adapter and its hypothesis
test copied verbatim into a fresh project folder, then `refopt conform` and `pytest` (the console
commands, which do not put the current folder on sys.path) run from that folder."""

import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

DOCS = ROOT / "docs" / "ORACLE.md"

# the port the docs' adapter wraps: `my_port.build(config, params)` -> a callable model
MY_PORT = textwrap.dedent('''
    import numpy as np
    from refopt.model import logits_forward
    from refopt.testing.reference import numpy_ops


    def build(config, params):
        def model(token_ids, padding_mask):
            return logits_forward(params, config, np.asarray(token_ids), np.asarray(padding_mask),
                                  ops=numpy_ops())
        return model
''')

LAUNCHERS = {
    "refopt_cli.py": "import sys\nfrom refopt.cli import main\nsys.exit(main(sys.argv[1:]))\n",
    "pytest_cli.py": "import sys\nimport pytest\nsys.exit(pytest.main())\n",
}


def docs_block(after: str) -> str:
    """The first python code block after the line mentioning ``after`` in docs/ORACLE.md."""
    text = DOCS.read_text(encoding="utf-8")
    start = text.index(after)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    return match.group(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-project")
    (root / "my_port").mkdir()
    (root / "my_port" / "__init__.py").write_text(MY_PORT)
    (root / "my_port" / "oracle.py").write_text(docs_block("in\n`my_port/oracle.py`:"))
    (root / "tests").mkdir()
    (root / "tests" / "test_my_port.py").write_text(docs_block("`tests/test_my_port.py`"))
    bin_dir = tmp_path_factory.mktemp("bin")           # outside the project: the console scripts' sys.path
    for name, code in LAUNCHERS.items():
        (bin_dir / name).write_text(code)
    return root, bin_dir


def _run(project, launcher, *args, module=False):
    root, bin_dir = project
    cmd = [sys.executable, "-m", *args] if module else [sys.executable, str(bin_dir / launcher), *args]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(root), "NUMBA_ENABLE_CUDASIM": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=900, env=env)


def test_conform_imports_the_adapter_from_the_current_folder(project):
    proc = _run(project, "refopt_cli.py", "conform", "--against", "my_port.oracle:MyAdapter",
                "--random-configs", "1", "--no-samplers")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "random-1/logits.left_padding" not in proc.stdout
    assert proc.stdout.count("not supported by the adapter, not run:") == 1
    assert "stress-scores/logits" in proc.stdout and " 0 failed" in proc.stdout


def test_the_plugin_under_n_auto(project):
    proc = _run(project, "pytest_cli.py", "--refopt-backend", "my_port.oracle:MyAdapter",
                "--refopt-random-configs", "1", "--refopt-examples", "3", "-n", "auto",
                "-p", "no:cacheprovider", "-p", "no:nbval", "tests/test_my_port.py", "--co", "-q")
    assert proc.returncode == 0 and "INTERNALERROR" not in proc.stdout + proc.stderr, proc.stdout[-3000:]
    proc = _run(project, "pytest_cli.py", "--refopt-backend", "my_port.oracle:MyAdapter",
                "--refopt-random-configs", "1", "--refopt-examples", "3", "-n", "auto",
                "-p", "no:cacheprovider", "-p", "no:nbval", "--ignore=tests")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "INTERNALERROR" not in out, out[-3000:]
    assert "passed" in proc.stdout and "refopt conformance: not supported by my-port" in proc.stdout


def test_the_docs_hypothesis_example_passes_with_the_docs_adapter(project):
    proc = _run(project, None, "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:nbval", "tests/test_my_port.py",
                module=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
