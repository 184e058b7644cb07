"""Name -> object registries with typed, validated metadata per entry (in the style of timm's _registry)."""
from __future__ import annotations

import dataclasses
import fnmatch
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.core.errors import UserError
from bench.core.types import NORMS

__all__ = ["AttackInfo", "DefenseInfo", "ModelInfo", "Registry", "RegistrationError", "UnknownNameError",
           "DATASETS", "DEFENSES", "ATTACKS", "MODELS", "NORMS"]



class RegistrationError(UserError, ValueError):
    """A registration with missing, unknown or ill-typed metadata, or an object that breaks its kind's contract."""


def _check_libraries(libraries: tuple[str, ...]) -> None:
    """Library names must be distribution names (what `pip install` takes), not empty or padded."""
    for name in libraries:
        if not name or name != name.strip() or " " in name:
            raise RegistrationError(f"libraries holds {name!r}; give distribution names as pip spells them, "
                                    "e.g. libraries=(\"torchattacks\",)")


@dataclass(frozen=True)
class AttackInfo:
    """Facts about an attack: its threat norm and how the runner and the checks must treat it.

    Attributes:
        norm: the norm of its threat model ("l1", "l2" or "linf").
        minimum_norm: it returns the smallest adversarial found (CW) instead of one within a fixed eps.
        eot: it averages gradients over noise draws (Athalye et al. 2018), for randomized defenses.
        randomized_only: it only makes sense against randomized defenses.
        gradient_free: it uses no gradients (e.g. Square): a masking check compares it with white-box attacks.
        preset_of: the attack this one is a preset of (same code, other defaults), if any.
        strong: a reliable fixed-budget attack a worst case must contain (APGD, AutoAttack or an
            equivalent; Croce & Hein 2020): the weak-worst-case check looks for it in every column.
        ensemble: it runs several losses itself (AutoAttack: APGD-CE, APGD-T, FAB-T, Square), so it
            also stands for the targeted / DLR variant a worst case needs beside CE.
        libraries: distributions (pip names) whose code it runs, e.g. ("torchattacks",): their
            installed versions are part of its cells' keys (bench.execution.library_versions).
    """

    norm: str
    minimum_norm: bool
    eot: bool
    randomized_only: bool = False
    gradient_free: bool = False
    preset_of: str | None = None
    strong: bool = False
    ensemble: bool = False
    libraries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise RegistrationError(f"norm {self.norm!r} is not one of {', '.join(NORMS)}")
        _check_libraries(self.libraries)


@dataclass(frozen=True)
class DefenseInfo:
    """Facts about a defense that tables, figures, checks and the runner read (never names or class attributes).

    Attributes:
        family: the defense family shown in figures (e.g. "PixelDP", "Madry", "convex"); None: the
            defense is a family of its own, shown under its registry name.
        randomized: predictions draw noise: attack with EOT, check that outputs vary.
        certified: it certifies radii (`certify`, `certified_norm`: bench.core.defense.CertifiedDefense).
        certified_norm: the norm of its radii when fixed; None when a parameter chooses it
            (then the class's `certified_norm(params)` says) or when it certifies nothing.
        certifier: the name of the certificate it computes by default (shown in the certified tables).
        eval_params: constructor parameters that only change evaluation (e.g. draw counts):
            models trained under other values are reused.
        libraries: distributions (pip names) whose code it runs at run time, e.g. ("scipy",) for a
            certificate computed with scipy.stats: their versions are part of its cells' keys.
    """

    randomized: bool
    certified: bool
    family: str | None = None
    certified_norm: str | None = None
    certifier: str | None = None
    eval_params: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_libraries(self.libraries)
        if self.family == "":
            raise RegistrationError("family must be a non-empty name (or None: the registry name)")
        if self.certified_norm is not None and self.certified_norm not in NORMS:
            raise RegistrationError(f"certified_norm {self.certified_norm!r} is not one of {', '.join(NORMS)}")
        if not self.certified and (self.certified_norm is not None or self.certifier is not None):
            raise RegistrationError("certified_norm and certifier need certified=True")


@dataclass(frozen=True)
class ModelInfo:
    """Facts about an architecture: the input shape (C, H, W) and class count it is built for, if fixed."""

    shape: tuple[int, ...] | None = None
    classes: int | None = None


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether `value` fits a dataclass field's annotation (bool, int, str, None, unions and tuples of them)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(annotation)
        element = args[0] if args else Any
        return isinstance(value, (tuple, list)) and all(_type_ok(v, element) for v in value)
    if annotation is Any:
        return True
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def make_info(info_type: type, kind: str, name: str, meta: dict[str, Any]) -> Any:
    """`info_type(**meta)` with every problem reported as one RegistrationError naming the entry and the key."""
    fields = {f.name: f for f in dataclasses.fields(info_type)}
    hints = typing.get_type_hints(info_type)
    where = f"{kind} {name!r}"
    valid = ", ".join(fields)
    unknown = sorted(set(meta) - set(fields))
    if unknown:
        raise RegistrationError(f"{where}: unknown metadata key {unknown[0]!r}; valid keys: {valid}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in meta]
    if missing:
        raise RegistrationError(f"{where}: missing metadata key {missing[0]!r} (required: {', '.join(required)}; "
                                f"valid keys: {valid})")
    for key, value in meta.items():
        if not _type_ok(value, hints[key]):
            raise RegistrationError(f"{where}: metadata key {key!r} = {value!r} should be of type "
                                    f"{typing.get_type_hints(info_type)[key]}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
    try:
        return info_type(**values)
    except RegistrationError as exc:
        raise RegistrationError(f"{where}: {exc}") from exc


class Registry:
    """A named table of objects, each with a typed info (`info_type`); duplicate or unknown names raise.

    `check(name, obj, info)` (optional) enforces a kind's contract at registration, e.g. that a
    certified defense implements `certify`.
    """

    def __init__(self, kind: str, info_type: type | None = None,
                 check: Callable[[str, Any, Any], None] | None = None):
        self.kind = kind
        self.info_type = info_type
        self.check = check
        self._objects: dict[str, Any] = {}
        self._infos: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None, *, info: Any = None, **meta: Any) -> Any:
        """Register `obj` under `name` (or use as a decorator) with its info: `info=` or keyword metadata.

        Missing, unknown or ill-typed metadata raises RegistrationError here, naming the entry and key.
        """
        record = self._info(name, info, meta)

        def add(target: Any) -> Any:
            if name in self._objects:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
            if self.check is not None:
                self.check(name, target, record)
            self._objects[name] = target
            self._infos[name] = record
            return target

        return add if obj is None else add(obj)

    def _info(self, name: str, info: Any, meta: dict[str, Any]) -> Any:
        if self.info_type is None:
            if info is not None or meta:
                raise RegistrationError(f"{self.kind} {name!r}: {self.kind} entries take no metadata, "
                                        f"got {', '.join(sorted(meta)) or 'info='}")
            return None
        if info is not None:
            if meta:
                raise RegistrationError(f"{self.kind} {name!r}: pass either info= or keyword metadata, not both")
            if not isinstance(info, self.info_type):
                raise RegistrationError(f"{self.kind} {name!r}: info must be a {self.info_type.__name__}, "
                                        f"got {type(info).__name__}")
            return info
        return make_info(self.info_type, self.kind, name, meta)

    def get(self, name: str) -> Any:
        """The object registered as `name`; a KeyError lists the valid names otherwise."""
        if name not in self._objects:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names()) or '(none)'}")
        return self._objects[name]

    def info(self, name: str) -> Any:
        """The typed info of `name` (AttackInfo, DefenseInfo, ModelInfo; None for kinds without one)."""
        self.get(name)
        return self._infos[name]

    def meta(self, name: str) -> dict[str, Any]:
        """The info of `name` as a plain dict (for printing and old callers; read `info` in new code)."""
        record = self.info(name)
        return {} if record is None else dataclasses.asdict(record)

    def name_of(self, obj: Any) -> str | None:
        """The first name (sorted) under which `obj` itself is registered, else None."""
        return next((n for n in self.names() if self._objects[n] is obj), None)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a shell-style wildcard pattern."""
        return sorted(n for n in self._objects if fnmatch.fnmatchcase(n, pattern))

    def unregister(self, name: str) -> None:
        """Remove `name` (tests and scratch registrations clean up after themselves)."""
        self.get(name)
        del self._objects[name], self._infos[name]

    def __contains__(self, name: str) -> bool:
        return name in self._objects


class UnknownNameError(UserError, KeyError):
    """An unknown registry name; str() is the plain message, not KeyError's quoted repr."""

    def __str__(self) -> str:
        return str(self.args[0])


DATASETS = Registry("dataset")
DEFENSES = Registry("defense", DefenseInfo)  # bench.core.defense installs its contract check
ATTACKS = Registry("attack", AttackInfo)  # attacks.template installs its contract check (register_attack only)
MODELS = Registry("model", ModelInfo)
