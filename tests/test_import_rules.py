"""The house's one-way doors (docs/architecture.md, "What may import what"), read from the source
with ``ast`` by ``scripts/import_cycles.py``: every import counts, at module level or inside a
function.

* Kernels are leaves: nothing under ``refopt.kernels`` imports generation, samplers, models,
  training, testing (or the device decode driver, which sits on the generation side).
* ``refopt.ops`` (the NumPy reference) imports no kernel.
* No cycle among modules imported at load time.
"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("refopt_import_cycles", ROOT / "scripts" / "import_cycles.py")
cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cycles)

NAMES, MODULE_LEVEL, FUNCTION_LEVEL = cycles.graph(ROOT, "refopt")

ABOVE_KERNELS = ("refopt.generation", "refopt.device_decoding", "refopt.samplers", "refopt.models",
                 "refopt.training", "refopt.testing", "refopt.recipe", "refopt.commands")


def _imports(module: str) -> set:
    return MODULE_LEVEL.get(module, set()) | FUNCTION_LEVEL.get(module, set())


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read():
    # the reader sees the imports it must judge (a reader that found nothing would pass vacuously)
    assert "refopt.kernels.cuda.decode" in NAMES and "refopt.ops.attention" in NAMES
    assert "refopt.kernels.cuda.decode_stages" in _imports("refopt.kernels.cuda.decode")
    assert "refopt.kernels.cuda.decode" in _imports("refopt.device_decoding")


def test_kernels_are_leaves():
    reaching_up = sorted((m, t) for m in NAMES if _within(m, ("refopt.kernels",))
                         for t in _imports(m) if _within(t, ABOVE_KERNELS))
    assert reaching_up == []


def test_the_reference_ops_import_no_kernel():
    assert sorted((m, t) for m in NAMES if _within(m, ("refopt.ops",))
                  for t in _imports(m) if _within(t, ("refopt.kernels",))) == []


def test_no_cycle_at_load_time():
    assert cycles.components(NAMES, MODULE_LEVEL) == []


def test_the_cycle_finder_finds_cycles():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles.components(["a", "b", "c", "d"], edges) == [["a", "b", "c"]]
    assert cycles.shortest_cycle("a", {"a", "b", "c"}, edges) == ["a", "b", "c", "a"]
