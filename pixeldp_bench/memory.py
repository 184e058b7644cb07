"""In-memory networks for `run(models=...)`: saved as safetensors, rebuilt by a factory, keyed by code and weights
hash (never by where the weights were saved: the same network gives the same cells in every results folder)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from bench.core.atomic import write_bytes
from bench.profile.config import ConfigError, Profile
from bench.execution.fingerprint import code_fingerprint
from bench.core.weights import WeightsError

__all__ = ["MEMORY_PREFIX", "build", "model_code", "name_models", "register_models", "save_weights"]

MEMORY_PREFIX = "memory:"  # factory = "memory:LABEL" names a network of `models=`
FACTORY = "pixeldp_bench.memory:build"

# Networks (with their weights) by code digest and weights hash, for this process only: a run in another
# process (Ray) cannot see them.
_MODULES: dict[tuple[str, str], nn.Module] = {}


def build(code: str, weights: str) -> nn.Module:
    """A copy of the registered network whose code digest is `code` and whose saved weights have SHA-256 `weights`."""
    if (code, weights) not in _MODULES:
        raise WeightsError(f"no in-memory model with code {code[:12]} and weights {weights[:12]} in this process; "
                           "pass it with models=")
    return copy.deepcopy(_MODULES[(code, weights)])


def _class_source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):  # defined in a notebook cell or C code: its structure (repr) still counts
        return f"{cls.__module__}.{cls.__qualname__}"


def model_code(module: nn.Module) -> str:
    """SHA-256 of the network's code: every layer's class source, the files it uses (as a factory's are
    fingerprinted, bench.execution.fingerprint), and its structure (repr: layer sizes and options)."""
    classes = sorted({type(m) for m in module.modules()}, key=lambda c: (c.__module__, c.__qualname__))
    digest = hashlib.sha256(repr(module).encode())
    for cls in classes:
        digest.update(_class_source(cls).encode())
    digest.update(code_fingerprint(*classes).encode())  # helpers the forward calls, outside the class body
    return digest.hexdigest()


def save_weights(module: nn.Module, folder: Path) -> Path:
    """The module's state dict as `folder/<SHA-256>.safetensors` (written once: the name is its content's hash)."""
    from safetensors.torch import save

    # Copies: safetensors refuses shared storage (tied weights), and the file must hold plain CPU tensors.
    state = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in module.state_dict().items()}
    data = save(state)
    path = folder / f"{hashlib.sha256(data).hexdigest()}.safetensors"
    if not path.is_file():
        # The harness's one atomic writer makes the folder too: a full disk is one line, never half a file.
        write_bytes(path, data)
    return path


def name_models(profile: Mapping[str, Any]) -> dict[str, Any]:
    """A dict profile with each defense's `model = "LABEL"` written as `factory = "memory:LABEL"`."""
    defenses = {}
    for label, entry in dict(profile.get("defenses", {})).items():
        params = dict(entry.get("params", {})) if isinstance(entry, Mapping) else None
        if params is not None and "model" in params:
            params["factory"] = MEMORY_PREFIX + str(params.pop("model"))
            entry = dict(entry) | {"params": params}
        defenses[label] = entry
    return dict(profile) | ({"defenses": defenses} if "defenses" in profile else {})


def register_models(profile: Profile, models: Mapping[str, nn.Module], folder: Callable[[], Path]) -> Profile:
    """The profile with every `memory:LABEL` factory replaced by a registered copy of `models[LABEL]`, its weights
    saved in `folder()`; its code digest and weights hash are the cells' factory_kwargs, hence in their keys."""
    used = {str(c.defense_params.get("factory"))[len(MEMORY_PREFIX):] for c in profile.cells
            if str(c.defense_params.get("factory")).startswith(MEMORY_PREFIX)}
    if not used and not models:
        return profile  # a profile of files and registered architectures: nothing to save
    for label, module in models.items():
        if not isinstance(module, nn.Module):
            raise ConfigError(f"models[{label!r}] is a {type(module).__name__}, not a torch.nn.Module")
    missing = sorted(used - set(models))
    if missing:
        raise ConfigError(f"the profile uses model {missing[0]!r}, which models= does not hold; "
                          f"pass models={{{missing[0]!r}: your_module}}")
    unused = sorted(set(models) - used)
    if unused:
        raise ConfigError(f"models={{{unused[0]!r}: ...}} is used by no defense; set model = {unused[0]!r} in a "
                          "defense's params (or factory = \"memory:" + unused[0] + "\")")
    replaced: dict[str, dict[str, Any]] = {}
    for label in used:
        module = models[label]
        code = model_code(module)
        weights = save_weights(module, folder()).stem  # the results folder keeps what was evaluated
        _MODULES[(code, weights)] = copy.deepcopy(module).to("cpu").eval()
        # The factory itself fills the network (a `weights` keyword, bench.defense.has_weights): no weights file
        # path, which names the results folder, enters the cells' keys and seeds.
        replaced[label] = {"factory": FACTORY, "arch": FACTORY, "factory_kwargs": {"code": code, "weights": weights}}
    cells = []
    for cell in profile.cells:
        factory = str(cell.defense_params.get("factory"))
        if factory.startswith(MEMORY_PREFIX):
            params = cell.defense_params | replaced[factory[len(MEMORY_PREFIX):]]
            cell = dataclasses.replace(cell, defense_params=params)
        cells.append(cell)
    return dataclasses.replace(profile, cells=cells)
