"""Code fingerprints: a hash of the source that an attack, a defense or the harness actually runs.

Cell keys and the model cache both hash what `code_fingerprint` returns, so an edited attack,
defense, architecture or training loop never reuses stale results, while an edit elsewhere
(another attack, the CLI, a comment anywhere) recomputes nothing.

What counts: the file defining each object, and, transitively, the files of every function,
class and module that object's code refers to by name (globals, closures, defaults, methods
and base classes), stopping at installed libraries and the standard library (a loaded plugin,
bench.profile.plugins, counts as ours wherever it is installed). Files are
hashed as their syntax tree without docstrings, so comments, docstrings and formatting do not
count.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import sysconfig
import types
from functools import cache
from functools import partial as functools_partial
from pathlib import Path
from typing import Any

from bench.profile.plugins import loaded_plugins

__all__ = ["code_fingerprint", "source_files", "file_digest"]

# Code below these folders (the standard library, site-packages) is not ours: its version is
# part of the environment, not of a cell's code.
_LIBRARY_ROOTS = tuple({str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("stdlib", "purelib", "platlib")})


# Bookkeeping about cells (keys, fingerprints, dry-run explanations) does not compute any record.
NOT_CELL_CODE = frozenset({"bench.execution.fingerprint", "bench.execution.keys", "bench.execution.dryrun"})


def _plugin_sources() -> tuple[str, ...]:
    """Folders of the loaded plugin packages (and files of single-module plugins), resolved."""
    return _sources_of(tuple(loaded_plugins()))


@cache
def _sources_of(modules: tuple[str, ...]) -> tuple[str, ...]:
    sources = []
    for name in modules:
        top = sys.modules.get(name.split(".")[0])
        if top is None:
            continue
        folders = list(getattr(top, "__path__", []))
        sources += [str(Path(f).resolve()) + "/" for f in folders]
        if not folders and getattr(top, "__file__", None):
            sources.append(str(Path(str(top.__file__)).resolve()))
    return tuple(sources)


def _is_tracked(path: Path) -> bool:
    resolved = str(path.resolve())
    # A user's plugin is the cell's own code even when pip installed it into site-packages.
    if any(resolved == source or resolved.startswith(source) for source in _plugin_sources()):
        return True
    return not any(resolved.startswith(root + "/") for root in _LIBRARY_ROOTS)


def _file_of(obj: Any) -> Path | None:
    try:
        source = inspect.getsourcefile(obj)
    except TypeError:  # builtins and C extensions have no source file
        return None
    if source is None:
        return None
    path = Path(source)
    return path if path.exists() and _is_tracked(path) else None


def _code_names(code: types.CodeType) -> set[str]:
    """Global names a code object (and the code nested in it) may load."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _references(obj: Any) -> list[Any]:
    """The objects `obj`'s code can reach by name: one level of the dependency graph."""
    if isinstance(obj, (staticmethod, classmethod)):
        return [obj.__func__]
    if isinstance(obj, property):
        return [f for f in (obj.fget, obj.fset, obj.fdel) if f is not None]
    if isinstance(obj, functools_partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if inspect.isfunction(obj):
        scope = obj.__globals__
        names = _code_names(obj.__code__)
        found = [scope[n] for n in names if n in scope]
        # Attribute chains such as `bench.execution.training.fit` name a submodule after its package.
        found += [getattr(m, n) for m in found if inspect.ismodule(m) for n in names if hasattr(m, n)]
        found += [cell.cell_contents for cell in obj.__closure__ or () if _cell_filled(cell)]
        found += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        signature = getattr(obj, "__signature__", None)
        if signature is not None:  # e.g. EOT variants publish the wrapped attack's defaults here
            found += [p.default for p in signature.parameters.values()]
        return found
    if inspect.isclass(obj):
        return list(obj.__bases__) + list(vars(obj).values())
    if inspect.ismodule(obj):
        # A module referenced by name contributes what it defines, not everything it imports.
        return [v for v in vars(obj).values() if getattr(v, "__module__", None) == obj.__name__]
    return []


def _cell_filled(cell: types.CellType) -> bool:
    try:
        _ = cell.cell_contents  # an empty cell (a closure variable not assigned yet) raises ValueError
    except ValueError:
        return False
    return True


_CLOSURES: dict[int, tuple[Any, frozenset[Path]]] = {}


def source_files(*objects: Any) -> set[Path]:
    """Every tracked source file the objects' code depends on (see the module docstring).

    Each object's closure is computed once per process (code does not change under a running
    process; the files' contents are hashed afresh by `file_digest`).
    """
    files: set[Path] = set()
    for obj in objects:
        cached = _CLOSURES.get(id(obj))
        if cached is None or cached[0] is not obj:
            cached = (obj, frozenset(_closure(obj)))
            _CLOSURES[id(obj)] = cached
        files |= cached[1]
    return files


def _closure(*objects: Any) -> set[Path]:
    files: set[Path] = set()
    seen: set[int] = set()
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not _is_code(obj) or _module_name(obj) in NOT_CELL_CODE:
            continue
        seen.add(id(obj))
        if hasattr(obj, "__wrapped__"):  # a decorated function (e.g. torch.no_grad): follow the original
            stack.append(obj.__wrapped__)
        target = obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj
        path = _file_of(target) if not isinstance(obj, (property, functools_partial)) else None
        if path is None and not isinstance(obj, (property, staticmethod, classmethod, functools_partial)):
            continue  # library or builtin code: stop here
        if path is not None:
            files.add(path.resolve())
        stack.extend(_references(obj))
    return files


def _module_name(obj: Any) -> str | None:
    if inspect.ismodule(obj):
        return obj.__name__
    target = getattr(obj, "__func__", obj)
    return getattr(target, "__module__", None)


def _is_code(obj: Any) -> bool:
    return (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)
            or isinstance(obj, (staticmethod, classmethod, property, functools_partial)))


class _StripDocstrings(ast.NodeTransformer):
    """Drops docstrings so that documentation edits do not change a fingerprint."""

    def _strip(self, node: Any) -> Any:
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _strip


@cache
def _digest_cached(path: str, mtime_ns: int, size: int) -> str:
    text = Path(path).read_text(encoding="utf-8")
    try:
        tree = _StripDocstrings().visit(ast.parse(text))
        canonical = ast.dump(tree, include_attributes=False)
    except SyntaxError:
        canonical = text
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a Python file's syntax tree without docstrings (comments and layout ignored)."""
    stat = path.stat()
    return _digest_cached(str(path), stat.st_mtime_ns, stat.st_size)


def _package_relative(path: Path) -> str:
    """'attacks/pgd.py' for a file inside packages, so that moving a checkout keeps fingerprints."""
    top = path.parent
    while (top / "__init__.py").exists() and top.parent != top:
        top = top.parent
    return path.relative_to(top).as_posix()


def code_fingerprint(*objects: Any) -> str:
    """16 hex digits naming the code behind `objects` (functions, classes or modules)."""
    digest = hashlib.sha256()
    for path in sorted(source_files(*objects)):
        digest.update(_package_relative(path).encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()[:16]
