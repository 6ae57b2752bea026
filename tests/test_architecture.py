"""The one-way layers of docs/architecture.md hold: the import-linter contracts are kept, no
project import hides inside a function, no private name crosses a module, every registry
module sits in a layer, and every domain event has its receiver."""

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("registry", "scoring", "followup", "integrations", "db", "config")
ENGINE = Path("scoring", "engine")


def _modules(*, engine: bool) -> list[Path]:
    """The project's source files: no migrations, management commands or tests (their imports
    are their own business: a command is an entry point, a migration is frozen history)."""
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            parts = rel.parts
            if "migrations" in parts or "tests" in parts or (
                    "management" in parts and "commands" in parts):
                continue
            if (rel.parts[:2] == ENGINE.parts) != engine:
                continue
            out.append(rel)
    return out


def _is_project(module: str | None, level: int) -> bool:
    return level > 0 or (module or "").split(".")[0] in PACKAGES


def _function_local_imports(rel: Path) -> list[str]:
    """``path:line module`` of each project import inside a function, except in an
    ``AppConfig.ready`` (where Django wants the receivers connected: the app registry is
    ready there, not when apps.py is imported)."""
    tree = ast.parse((ROOT / rel).read_text())
    allowed: set[int] = set()
    if rel.name == "apps.py":
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "ready":
                    allowed |= {id(n) for n in ast.walk(fn)}
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if id(node) in allowed:
                continue
            if isinstance(node, ast.ImportFrom) and _is_project(node.module, node.level):
                found.append(f"{rel}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import):
                found += [f"{rel}:{node.lineno} import {a.name}" for a in node.names
                          if _is_project(a.name, 0)]
    return sorted(set(found))


def test_no_project_import_hides_inside_a_function():
    """A function-local import is how a cycle between layers hides; the layers are one-way
    now, so every project import is at the top of its module, where import-linter sees it
    and a reader finds it."""
    found = [hit for rel in _modules(engine=False) for hit in _function_local_imports(rel)]
    assert found == []


def test_the_engine_has_no_function_local_import_either():
    found = [hit for rel in _modules(engine=True) for hit in _function_local_imports(rel)]
    assert found == []


def test_no_private_name_is_imported_from_another_module():
    """``from x import _name`` couples a module to another's internals: promote the name (make
    it public, documented) or move the caller."""
    found = []
    for rel in _modules(engine=False) + _modules(engine=True):
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.ImportFrom) and _is_project(node.module, node.level):
                found += [f"{rel}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def _contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


def test_every_registry_module_is_in_one_layer():
    """The registry package holds the core (bottom) and the registry's entry points (top): the
    layers contract names its modules one by one, so a new module must be placed there."""
    [layers] = [c for c in _contracts() if c["type"] == "layers"]
    placed = [name.strip() for layer in layers["layers"] for name in layer.split(":")]
    children = sorted(
        f"registry.{p.stem if p.suffix == '.py' else p.name}" for p in (ROOT / "registry").iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py")
        or (p.is_dir() and (p / "__init__.py").exists() and p.name != "migrations"))
    assert [c for c in children if c not in placed] == []
    assert len(placed) == len(set(placed))


def test_the_import_linter_contracts_are_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is in requirements-dev.txt"
    run = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_every_domain_event_has_its_receiver():
    """An event nobody listens to silently skips the work of the layer above (fractured
    levels, study links, follow-up re-evaluation, PACS export): the receivers are connected in
    the apps' ``ready``."""
    from registry import events
    from scoring import signals

    sent = {name: getattr(events, name) for name in (
        "procedures_recorded", "fractured_levels_changed", "patient_merged",
        "followup_changed_committed")}
    sent |= {"vbq_result_ready": signals.vbq_result_ready,
             "patient_result_stored": signals.patient_result_stored}
    assert [name for name, signal in sent.items() if not signal.has_listeners()] == []
