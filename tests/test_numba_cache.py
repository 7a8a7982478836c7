"""The CPU kernels' Numba cache goes stale with no file of the package (refopt/kernels/cpu/_cache.py):
a kernel is stamped with every module of the package, not only the one that defines it, since its
machine code holds what it calls from the others."""

import os
import subprocess
import sys
import textwrap

import pytest

from refopt.kernels.cpu import _cache, decode, int8, matmul

try:
    from numba.core.caching import InTreeCacheLocator
except ImportError:                                   # numba < 0.68
    from numba.core.caching import _InTreeCacheLocator as InTreeCacheLocator


def test_the_package_kernels_use_the_package_stamp():
    # the product compiles int8's tiles in, the decode step nearly everything: both are stamped
    # with int8.py's source (and every other module's), not with their own file's alone
    for kernel in (matmul.product, decode._step_work, int8.int_dots):
        locator = kernel._cache._impl._locator
        assert getattr(locator, "refopt_package_stamp", False), kernel
        names = [name for name, _ in locator.get_source_stamp()[1]]
        assert "int8.py" in names and "matmul.py" in names and "decode.py" in names


def _function_in(path):
    # a function whose code claims to come from ``path`` (the locator reads its first line)
    namespace = {}
    exec(compile("def f():\n    return 1\n", str(path), "exec"), namespace)
    return namespace["f"]


def test_an_edit_to_any_module_changes_every_stamp(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "b.py").write_text("X = 1\n")
    monkeypatch.setattr(_cache, "HERE", str(tmp_path))
    Locator = _cache._package_locator(InTreeCacheLocator)
    locator = Locator.from_function(_function_in(tmp_path / "a.py"), str(tmp_path / "a.py"))
    before = locator.get_source_stamp()
    assert locator.get_source_stamp() == before                  # steady while nothing changes
    (tmp_path / "b.py").write_text("X = 2\n")                   # the other module, same size
    after = locator.get_source_stamp()
    assert after != before and after[0] == before[0]             # a.py itself is unchanged
    (tmp_path / "c.py").write_text("Y = 1\n")                   # a module added
    assert locator.get_source_stamp() != after
    # a function from elsewhere is left to Numba's own locators
    other = tmp_path.parent / "elsewhere.py"
    other.write_text("def f():\n    return 1\n")
    assert Locator.from_function(_function_in(other), str(other)) is None


def test_installing_twice_adds_nothing():
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    count = len(impl._locator_classes)
    _cache.install()
    assert len(impl._locator_classes) == count
    assert sum(getattr(c, "refopt_package_stamp", False) for c in impl._locator_classes) >= 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths in the child's script")
def test_a_cached_kernel_is_not_served_after_another_module_changes(tmp_path):
    # end to end, in a copy of the package: the epilogue's store (epilogue.py) is compiled into
    # matmul's kernels; after the epilogue changes, they must change with it
    import shutil

    import refopt

    root = tmp_path / "tree"
    shutil.copytree(os.path.dirname(refopt.__file__), root / "refopt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    script = textwrap.dedent("""
        import numpy as np
        from refopt.kernels.cpu import matmul
        from refopt.kernels.cpu.epilogue import STORE
        raw = np.full((1, 2), 8, np.float32)
        out = np.zeros((1, 2), np.float32)
        empty = np.zeros(0, np.float32)
        matmul._finish(raw, empty, empty, out, 0, STORE, np.float32(1), 0, 2)
        print(float(out[0, 0]))
    """)
    env = dict(os.environ, PYTHONPATH=str(root), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("NUMBA_DISABLE_JIT", None)

    def run(**extra):
        done = subprocess.run([sys.executable, "-c", script], env=dict(env, **extra), cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.split()[-1])

    stale = bool(os.environ.get("REFOPT_SHOW_STALE"))          # Numba's own locators, to see
    extra = {"NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator"} if stale else {}
    assert run(**extra) == 8.0
    assert any(name.endswith(".nbi") for _, _, names in os.walk(tmp_path / "cache") for name in names)
    epilogue = root / "refopt" / "kernels" / "cpu" / "epilogue.py"
    source = epilogue.read_text()
    assert source.count("out[m, j] = y * alpha") == 1, "the test's edit no longer applies"
    epilogue.write_text(source.replace("out[m, j] = y * alpha", "out[m, j] = y * alpha + 1"))
    assert run(**extra) == 9.0                                   # compiled again, not loaded
