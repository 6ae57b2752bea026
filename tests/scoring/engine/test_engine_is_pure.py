"""``scoring/engine`` is pure: it imports nothing of the project outside itself (no Django), no
third-party package beyond its runtime ones, no project module from inside a function, and its
modules import each other without a circle (read from the source with ``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[3] / "scoring" / "engine"
RUNTIME = {"numpy", "scipy", "pydicom", "PIL", "onnxruntime"}
OPTIONAL_LOCAL = {"matplotlib", "nibabel", "highdicom"}  # imported where used, optional


def imports() -> dict[str, list[tuple[str, bool]]]:
    """Module name → (imported module, at module level) for every engine module."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(ENGINE.glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = ([f"{node.module}.{a.name}" for a in node.names]
                         if node.module == "scoring.engine" else [node.module])
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [(n, id(node) in top) for n in names]
        out[path.stem] = found
    return out


def test_the_engine_imports_only_itself_the_standard_library_and_its_runtime_packages():
    import sys

    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    allowed = stdlib | RUNTIME | OPTIONAL_LOCAL
    outside = [(m, n) for m, found in imports().items() for n, _ in found
               if not n.startswith("scoring.engine") and n.split(".")[0] not in allowed]
    assert outside == []


def test_no_function_local_project_import_and_optional_packages_only_where_used():
    local = [(m, n) for m, found in imports().items() for n, top in found
             if not top and n.split(".")[0] not in OPTIONAL_LOCAL | {"onnxruntime"}]
    assert local == []


def test_the_engine_modules_import_each_other_without_a_circle():
    graph = {m: {n.split(".")[2] for n, _ in found
                 if n.startswith("scoring.engine.") and n.split(".")[2] != m}
             for m, found in imports().items()}
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                circles.append([*path[path.index(n):], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert circles == []
