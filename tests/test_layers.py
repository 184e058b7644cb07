"""The import contract: the harness's layers point one way (tox -e lint runs this file).

core <- attacks <- defenses <- builtins <- profile <- execution <- reporting <- app: a module imports
only modules of its own layer or of layers below it, and no harness module imports another inside a
function to dodge a cycle (the few function-level imports left exist for import cost and are listed
with their reason).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "attacks", "defenses", "pixeldp_bench")

# bench/ module (its first dotted component below `bench`) -> layer: one subpackage per layer, plus the
# re-export modules kept at the paths plugins and CONTRIBUTING.md import (bench.registry, ...).
BENCH_LAYERS = {
    "core": {"", "core", "errors", "types", "registry", "precision", "defense"},
    "builtins": {"builtins"},
    "profile": {"profile"},
    "execution": {"execution"},
    "reporting": {"reporting", "table_registry"},
    "app": {"cli", "__main__"},
}
# The re-export modules: old path -> the moved module they stand for.
REEXPORTS = {"bench.defense": "bench.core.defense", "bench.registry": "bench.core.registry",
             "bench.types": "bench.core.types", "bench.errors": "bench.core.errors",
             "bench.precision": "bench.core.precision", "bench.table_registry": "bench.reporting.table_registry"}
ORDER = ["core", "attacks", "defenses", "builtins", "profile", "execution", "reporting", "app"]
# Function-level imports of harness modules that stay, each for import cost (never for a cycle).
ALLOWED_LATE = {
    ("bench/execution/training.py", "bench.core.data.torchvision_sets"): "torchvision only for decoded datasets",
}


def layer_of(module: str) -> str:
    top, _, rest = module.partition(".")
    if top in ("attacks", "defenses"):
        return top
    if top == "pixeldp_bench":
        return "app"
    first = rest.split(".")[0]
    for layer, names in BENCH_LAYERS.items():
        if first in names:
            return layer
    raise AssertionError(f"bench module {module!r} has no layer: add it to BENCH_LAYERS in tests/test_layers.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def harness_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported harness module, inside a function, line) for every import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: nothing is imported at run time
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "bench":  # `from bench import x`: the submodule x (or bench itself)
                    found.extend((f"bench.{a.name}" if a.name != "__version__" else "bench", in_function,
                                  child.lineno) for a in child.names)
                else:
                    found.append((child.module, in_function, child.lineno))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return [(name, late, line) for name, late, line in found if name.split(".")[0] in PACKAGES]


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_module_has_a_layer():
    for path in sources():
        layer_of(module_name(path))


def test_layers_point_one_way():
    violations = []
    for path in sources():
        importer = module_name(path)
        for imported, _, line in harness_imports(path):
            if ORDER.index(layer_of(imported)) > ORDER.index(layer_of(importer)):
                violations.append(f"{path.relative_to(ROOT)}:{line}: {importer} ({layer_of(importer)}) imports "
                                  f"{imported} ({layer_of(imported)})")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_no_function_level_imports_of_the_harness():
    late = [(str(path.relative_to(ROOT)), imported, line) for path in sources()
            for imported, in_function, line in harness_imports(path) if in_function]
    unexpected = [f"{file}:{line}: {imported}" for file, imported, line in late if (file, imported) not in ALLOWED_LATE]
    assert not unexpected, "function-level imports (move them to the top; a cycle means a layer is wrong):\n" + \
        "\n".join(unexpected)


@pytest.mark.parametrize("module", ["bench.core.defense", "bench.core.registry", "bench.core.models"])
def test_the_core_loads_no_profile_key_fingerprint_or_plugin_module(module):
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.splitlines() if "|" in line}
    forbidden = {"tomllib", "bench.profile.config", "bench.execution.keys", "bench.profile.params",
                 "bench.execution.fingerprint", "bench.profile.plugins", "bench.builtins", "attacks", "defenses"}
    assert not loaded & forbidden
    assert all(layer_of(m) == "core" for m in loaded if m.split(".")[0] == "bench"), sorted(loaded)


def test_the_contract_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from bench.profile.config import load_profile\n\n"
                   "def f():\n    from bench.execution.runner import Runner\n")
    assert harness_imports(bad) == [("bench.profile.config", False, 1), ("bench.execution.runner", True, 4)]
    assert ORDER.index(layer_of("bench.profile.config")) > ORDER.index(layer_of("bench.core.defense"))


def test_every_bench_module_lives_in_its_layer_package():
    stray = [str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")
             if module_name(p) not in REEXPORTS and p.stem not in ("__init__", "__main__", "builtins")]
    assert not stray, f"bench modules outside a layer package: {stray}"


@pytest.mark.parametrize("old,moved", sorted(REEXPORTS.items()))
def test_old_paths_are_the_moved_modules(old, moved):
    code = (f"import importlib; old = importlib.import_module({old!r}); "
            f"assert old is importlib.import_module({moved!r}), old")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
