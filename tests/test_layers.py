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

# bench/ module (its first dotted component below `bench`) -> layer.
BENCH_LAYERS = {
    "core": {"", "errors", "types", "devices", "registry", "atomic", "stats", "draws", "precision", "subbatch", "data",
             "models", "archs", "defense", "weights", "zoo"},
    "builtins": {"builtins"},
    "profile": {"speed", "plugins", "params", "config", "preflight", "toml_text"},
    "execution": {"fingerprint", "keys", "checksums", "store", "cache", "training", "trained_models", "overhead",
                  "gradient_probe", "runner", "dryrun", "ray_executor", "environment", "estimate"},
    "reporting": {"tables", "tables_certified", "tables_overhead", "tables_published", "table_registry", "checks",
                  "checks_worst_case", "plots", "report", "compare", "baseline"},
    "app": {"api", "cli", "__main__", "store_tools"},
}
ORDER = ["core", "attacks", "defenses", "builtins", "profile", "execution", "reporting", "app"]
# Function-level imports of harness modules that stay, each for import cost (never for a cycle).
ALLOWED_LATE = {
    ("bench/training.py", "bench.data.torchvision_sets"): "torchvision is imported only for decoded datasets",
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


@pytest.mark.parametrize("module", ["bench.defense", "bench.registry", "bench.models"])
def test_the_core_loads_no_profile_key_fingerprint_or_plugin_module(module):
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.splitlines() if "|" in line}
    forbidden = {"tomllib", "bench.config", "bench.keys", "bench.params", "bench.fingerprint", "bench.plugins",
                 "bench.builtins", "attacks", "defenses"}
    assert not loaded & forbidden
    assert all(layer_of(m) == "core" for m in loaded if m.split(".")[0] == "bench"), sorted(loaded)


def test_the_contract_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from bench.config import load_profile\n\ndef f():\n    from bench.runner import Runner\n")
    assert harness_imports(bad) == [("bench.config", False, 1), ("bench.runner", True, 4)]
    assert ORDER.index(layer_of("bench.config")) > ORDER.index(layer_of("bench.defense"))
