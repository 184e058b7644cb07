"""Plugins: a user's package adds attacks, defenses, datasets or architectures by registering them when imported.

Two routes, both importing a module that registers at import time (`attacks.template.register_attack`,
`DEFENSES.register`, ...):

- an installed package declares an entry point in the group `pixeldp_bench.plugins` whose value
  names the module (`[project.entry-points."pixeldp_bench.plugins"] mine = "mypkg.bench_plugin"`);
  every installed one is imported whenever the built-ins are;
- a profile lists modules on the import path: `[run] plugins = ["mypkg.attacks"]`.

A plugin that fails to import stops the run with one `PluginError` line naming it and the fix.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable
from typing import Any

from bench.core.errors import UserError
import bench.builtins  # noqa: F401  (the built-ins register before any plugin)

__all__ = ["ENTRY_POINT_GROUP", "PluginError", "load_plugins", "loaded_plugins", "run_plugins"]

ENTRY_POINT_GROUP = "pixeldp_bench.plugins"

# module name -> where it came from ("entry point NAME of DIST" or "[run] plugins"), in import order.
_LOADED: dict[str, str] = {}
_entry_points_loaded = False


class PluginError(UserError, RuntimeError):
    """A plugin that cannot be imported (or is named wrongly); the message names it and the fix."""


def loaded_plugins() -> dict[str, str]:
    """Imported plugin modules -> where each came from (a copy), in import order."""
    return dict(_LOADED)


def load_plugins(modules: Any = ()) -> None:
    """Import every installed entry-point plugin (once), then `modules` ([run] plugins); built-ins are in already."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_entry_point(entry)
        _entry_points_loaded = True
    for module in _module_names(modules):
        if module not in _LOADED:
            _import(module, "[run] plugins", fix=f"install the package that provides {module!r} (or put it on "
                    "PYTHONPATH), or remove it from [run] plugins")


def run_plugins(settings: dict[str, Any]) -> list[str]:
    """The `[run] plugins` modules of a stored run's settings (what `report` must import to read it)."""
    source = settings.get("profile_source") or {}
    run = source.get("run") if isinstance(source, dict) else None
    plugins = run.get("plugins", []) if isinstance(run, dict) else []
    return _module_names(plugins)


def _module_names(modules: Any) -> list[str]:
    """`modules` checked to be a list of dotted module names (a single string counts as one)."""
    names = [modules] if isinstance(modules, str) else modules
    if not isinstance(names, Iterable) or isinstance(names, dict):
        raise PluginError(f"[run] plugins must be a list of module names like [\"mypkg.attacks\"], got {modules!r}")
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise PluginError(f"[run] plugins holds {name!r}, which is not a module name; write dotted names like "
                              "\"mypkg.attacks\" (a module that registers attacks or defenses when imported)")
    return names


def _load_entry_point(entry: importlib.metadata.EntryPoint) -> None:
    dist = getattr(entry.dist, "name", None) or "an unknown package"
    origin = f"entry point {entry.name!r} of {dist}"
    uninstall = f"fix or reinstall {dist}, or uninstall it (pip uninstall {dist})"
    if entry.attr:
        raise PluginError(f"plugin {origin} is {entry.value!r}, but a {ENTRY_POINT_GROUP} entry point must name a "
                          f"module (no ':attribute'); {uninstall}")
    if entry.module not in _LOADED:
        _import(entry.module, origin, fix=uninstall)


def _import(module: str, origin: str, fix: str) -> None:
    """Import `module` (which registers its entries) and remember it; any failure becomes one PluginError line."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a plugin is arbitrary user code: whatever it raises is reported the same way
        missing_itself = isinstance(exc, ModuleNotFoundError) and exc.name is not None and (
            module == exc.name or module.startswith(exc.name + "."))
        what = "is not installed" if missing_itself else f"failed to import: {type(exc).__name__}: {exc}"
        raise PluginError(f"plugin {module!r} ({origin}) {what}; {fix}") from exc
    _LOADED[module] = origin
