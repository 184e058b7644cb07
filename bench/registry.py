"""Name -> object registries for datasets, defenses and attacks (in the style of timm's _registry)."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable


class Registry:
    """A named table of objects with per-entry metadata; duplicate or unknown names raise."""

    def __init__(self, kind: str):
        self.kind = kind
        self._objects: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: Any = None, **meta: Any) -> Callable[[Any], Any] | Any:
        """Register `obj` under `name` (or use as a decorator); `meta` holds flags like randomized=True."""

        def add(target: Any) -> Any:
            if name in self._objects:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
            self._objects[name] = target
            self._meta[name] = dict(meta)
            return target

        return add if obj is None else add(obj)

    def get(self, name: str) -> Any:
        """The object registered as `name`; a KeyError lists the valid names otherwise."""
        if name not in self._objects:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names()) or '(none)'}")
        return self._objects[name]

    def meta(self, name: str) -> dict[str, Any]:
        """Registration flags of `name` (a copy)."""
        self.get(name)
        return dict(self._meta[name])

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard pattern."""
        return sorted(n for n in self._objects if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._objects


class UnknownNameError(KeyError):
    """An unknown registry name; str() is the plain message, not KeyError's quoted repr."""

    def __str__(self) -> str:
        return str(self.args[0])


DATASETS = Registry("dataset")
DEFENSES = Registry("defense")
ATTACKS = Registry("attack")
MODELS = Registry("model")


def load_builtins() -> None:
    """Import the built-in attack and defense packages so that they register themselves."""
    import attacks  # noqa: F401
    import bench.data  # noqa: F401
    import bench.models  # noqa: F401
    import defenses  # noqa: F401
