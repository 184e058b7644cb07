"""A user's own model, imported from `module:function` and optionally loaded from a weights file."""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from bench.data import DatasetSpec
from bench.defense import Defense
from bench.registry import DEFENSES


def import_factory(target: str):
    """The callable named by 'package.module:function' (ValueError naming the fix otherwise)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"factory {target!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for factory {target!r} ({exc}); put it on PYTHONPATH") from exc
    if not callable(getattr(module, attribute, None)):
        raise ValueError(f"{module_name!r} has no callable {attribute!r} (factory {target!r})")
    return getattr(module, attribute)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file with weights_only=True (never a raw pickle)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


@DEFENSES.register("user_model")
class UserModel(Defense):
    """Your own classifier: `factory` builds it ([0,1] images -> logits), `weights` fills it.

    With the default `steps = 0` the model is evaluated as given; with steps > 0 it is trained
    (or fine-tuned) with cross-entropy like the undefended baseline.
    """

    def __init__(self, spec: DatasetSpec, *, factory: str, weights: str | None = None,
                 factory_kwargs: dict[str, Any] | None = None, weights_sha256: str | None = None,
                 steps: int = 0, **train: Any):
        super().__init__(spec, steps=steps, **train)
        self.factory = import_factory(factory)
        self.arch = factory
        self.factory_kwargs = dict(factory_kwargs or {})
        self.weights = None if weights is None else Path(weights).expanduser()
        if self.weights is not None and not self.weights.is_file():
            raise ValueError(f"weights file {self.weights} does not exist")
        if weights_sha256 is not None and weights_sha256 != file_sha256(self.weights):
            raise ValueError(f"weights file {self.weights} changed since the profile was resolved")

    @classmethod
    def resolve_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Add the weights file's SHA-256, so new weights under the same path never reuse old results."""
        if params.get("weights") and "weights_sha256" not in params:
            return params | {"weights_sha256": file_sha256(Path(params["weights"]).expanduser())}
        return params

    def build_model(self) -> nn.Module:
        model = self.factory(**self.factory_kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"factory {self.arch!r} returned {type(model).__name__}, not a torch.nn.Module")
        if self.weights is not None:
            missing, unexpected = model.load_state_dict(read_weights(self.weights), strict=False)
            if missing or unexpected:
                raise ValueError(f"weights {self.weights} do not fit the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        return model


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
