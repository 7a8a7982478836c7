"""Print the cycles of refopt's import graph, read from the source with `ast` (nothing is imported).

    python scripts/import_cycles.py [--root DIR] [--package refopt]

Two graphs are printed: one of the imports a module runs when it is loaded (module level, including
class bodies; imports under ``if TYPE_CHECKING:`` are left out, as they never run), and one that
adds the imports inside functions (run when the function is first called). For each graph the
strongly connected components of two or more modules are listed, each with one shortest cycle
through its first member, and the function-level edges that close a cycle are named.

An edge goes from a module to the module an import names: ``import refopt.a.b`` and
``from refopt.a import b`` (when ``b`` is a module) point at ``refopt.a.b``; ``from refopt.a import
f`` points at ``refopt.a``. The implicit import of parent packages (loading ``refopt.a.b`` runs
``refopt/a/__init__.py``) is not an edge: with it every package's ``__init__`` re-exporting its
rooms would close a cycle with each of them.
"""

from __future__ import annotations

import argparse
import ast
import collections
import pathlib
import sys


def module_names(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Every module of the package below `root`, dotted name -> file."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: pathlib.Path, module: str, is_package: bool, known: set[str]):
    """Yield (target module, 'module' | 'function') for each import of a refopt module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def targets(node):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in known:  # import a.b.c where c is not a module
                    name = name.rpartition(".")[0]
                if name:
                    yield name
        else:
            base = resolve(node)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}"
                elif base in known:
                    yield base

    def walk(node, level):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for orelse in child.orelse:
                    yield from walk_one(orelse, level)
                continue
            yield from walk_one(child, level)

    def walk_one(child, level):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            for target in targets(child):
                yield target, level
        inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else level
        yield from walk(child, inner)

    yield from walk(tree, "module")


def graph(root: pathlib.Path, package: str):
    """(module-level edges, function-level edges): module -> set of modules it imports."""
    names = module_names(root, package)
    known = set(names)
    module_level = collections.defaultdict(set)
    function_level = collections.defaultdict(set)
    for module, path in names.items():
        for target, level in imports(path, module, path.name == "__init__.py", known):
            if target != module:
                (module_level if level == "module" else function_level)[module].add(target)
    return names, module_level, function_level


def components(nodes, edges) -> list[list[str]]:
    """Strongly connected components of two or more nodes (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    members = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        members.append(member)
                        if member == node:
                            break
                    if len(members) > 1:
                        found.append(sorted(members))
    return sorted(found, key=lambda c: (-len(c), c))


def shortest_cycle(start: str, members: set[str], edges) -> list[str]:
    """One shortest cycle from `start` back to itself inside `members` (breadth first)."""
    previous = {start: None}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(edges.get(node, ())):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return []


def report(title, nodes, edges, function_edges=None) -> int:
    found = components(nodes, edges)
    print(f"{title}: {len(found)} cycle(s) (strongly connected components of 2+ modules)")
    for members in found:
        print(f"  {len(members)} modules: {', '.join(members)}")
        print(f"    e.g. {' -> '.join(shortest_cycle(members[0], set(members), edges))}")
        if function_edges is not None:
            closing = sorted(
                (a, b) for a in members for b in function_edges.get(a, ()) if b in members
            )
            for a, b in closing:
                print(f"    function-level: {a} -> {b}")
    return len(found)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parent.parent))
    parser.add_argument("--package", default="refopt")
    args = parser.parse_args(argv)
    names, module_level, function_level = graph(pathlib.Path(args.root), args.package)
    both = collections.defaultdict(set)
    for edges in (module_level, function_level):
        for a, targets in edges.items():
            both[a] |= targets
    print(f"{len(names)} modules, {sum(map(len, module_level.values()))} module-level and "
          f"{sum(len(t - module_level.get(a, set())) for a, t in function_level.items())} "
          "function-level-only import edges")
    report("module level", names, module_level)
    report("module + function level", names, both, function_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
