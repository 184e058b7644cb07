"""A user's model and weights: import a `module:function` factory, read a checkpoint safely, map its keys, load it."""
from __future__ import annotations

import hashlib
import importlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.core.errors import ConfigError

__all__ = ["WeightsError", "call_factory", "file_sha256", "import_factory", "load_state", "map_keys",
           "read_checkpoint", "resolve_path"]


class WeightsError(ConfigError):
    """A weights file or model factory that cannot give a usable model; the message names the file and the fix."""


def resolve_path(path: str | Path, base: Path | None) -> Path:
    """An absolute weights path: `~` expanded, a relative path taken from `base` (the profile's folder)."""
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return path.resolve()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_factory(target: str) -> Callable[..., Any]:
    """The callable named by 'package.module:function' (WeightsError naming the fix otherwise)."""
    module_name, _, attribute = str(target).partition(":")
    if not module_name or not attribute:
        raise WeightsError(f"factory {target!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(f"cannot import {module_name!r} for factory {target!r} ({exc}); "
                           "put it on PYTHONPATH") from exc
    except Exception as exc:  # the user's module itself fails while importing
        raise WeightsError(f"importing {module_name!r} for factory {target!r} raised "
                           f"{type(exc).__name__}: {exc}") from exc
    if not callable(getattr(module, attribute, None)):
        raise WeightsError(f"{module_name!r} has no callable {attribute!r} (factory {target!r})")
    return getattr(module, attribute)


def call_factory(target: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The module returned by the user's factory called with `kwargs`; any failure is one WeightsError."""
    factory = import_factory(target)
    try:
        model = factory(**dict(kwargs))
    except Exception as exc:
        raise WeightsError(f"factory {target!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise WeightsError(f"factory {target!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_checkpoint(path: Path, entry: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a torch file read with weights_only=True on the CPU.

    Pickled code is never run: torch.load's weights-only unpickler refuses anything but tensors
    and plain containers. `entry` picks a sub-dict (e.g. "state_dict" of a training checkpoint).
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {_why_unreadable(exc)}") from exc
    if entry is not None:
        if not isinstance(state, dict) or entry not in state:
            keys = sorted(map(str, state)) if isinstance(state, dict) else []
            raise WeightsError(f"weights file {path} has no entry {entry!r} (top-level keys: {_few(keys)})")
        state = state[entry]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict (name -> tensor); "
                           "save model.state_dict() instead of the model")
    others = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        nested = [k for k in others if isinstance(state[k], dict)]
        hint = f"; if the weights are under one entry, set weights_entry = {nested[0]!r}" if nested else ""
        raise WeightsError(f"weights file {path} is not a state dict: entries {_few(others)} are not tensors{hint}")
    if not state:
        raise WeightsError(f"weights file {path} holds an empty state dict")
    return state


def _why_unreadable(exc: Exception) -> str:
    """A short reason a checkpoint could not be read; pickled objects are refused, never loaded."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        # torch's own message advises weights_only=False, i.e. running the file's code: never pass that on.
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"it contains pickled Python objects{what}, which are never loaded because they can run code; "
                "save model.state_dict() with torch.save, or use safetensors")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"the file is corrupt, truncated or not a checkpoint ({type(exc).__name__}: {first[:160]})"


def map_keys(state: Mapping[str, torch.Tensor], *, keys: Mapping[str, str] | None = None,
             prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the module's: strip `prefix` (e.g. "module."), then rename by `keys`.

    `keys` maps checkpoint names to module names ({"0.weight": "conv1.weight"}); a name it does not
    mention is kept as is.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if prefix and name.startswith(prefix):
            name = name[len(prefix):]
        name = (keys or {}).get(name, name)
        if name in out:
            raise WeightsError(f"two checkpoint entries map to the module's {name!r}; check weights_keys / "
                               "weights_prefix")
        out[name] = tensor
    return out


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy `state` into `model` exactly: every key present, none extra, every shape equal (else one line)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(f"weights {path} do not fit the model: missing keys {_few(missing)}, unexpected keys "
                           f"{_few(unexpected)} (rename with weights_keys = {{ checkpoint_name = module_name }} or "
                           "strip a prefix with weights_prefix)")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise WeightsError(f"weights {path} do not fit the model: shape mismatch (file vs model) for {_few(wrong)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"weights {path} hold NaN or infinite values in {_few(bad)}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(state[name].to(dtype=target.dtype))


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(map(str, names[:limit]))
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
