"""Trained-model cache: safetensors files keyed by (dataset, defense, params, seed, code), verified by checksum.

Each file carries the SHA-256 of its tensors in its metadata; a file that fails to load or to
verify is moved aside and retrained, never used. Training checkpoints (model, optimizer, step)
live beside the models as `<model>.ckpt` files written with torch.save and read back with
`weights_only=True` (no code runs on load). Both are written atomically (bench.core.atomic): a full
disk is one OutputWriteError naming the file, and never leaves half a file in the cache.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from bench.core.atomic import write_bytes
from bench.core.types import canonical_json

__all__ = ["ModelCache", "tensors_sha256"]


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor as its own contiguous CPU copy (tied weights are written under each name)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


class ModelCache:
    """A folder of `<dataset>-<defense>-<hash>.safetensors` files plus a JSON of what each holds."""

    def __init__(self, root: Path, log=print):
        self.root = Path(root)
        self.log = log

    def path(self, config: dict[str, Any], fingerprint: str) -> Path:
        """Where the model for `config` (a Cell's defense_config) lives."""
        key = hashlib.sha256(canonical_json({"config": config, "code": fingerprint}).encode()).hexdigest()[:20]
        return self.root / f"{config['dataset']}-{config['defense']}-{key}.safetensors"

    def load(self, model: nn.Module, path: Path) -> bool:
        """Fill `model` from `path` if it exists and verifies; True when loaded.

        A truncated, corrupt or tampered file is moved aside (`*.corrupt-<time>`) with a message,
        and False is returned so that the model is retrained.
        """
        if not path.exists():
            return False
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                expected = (handle.metadata() or {}).get("sha256")
            if expected is None or tensors_sha256(tensors) != expected:
                raise ValueError("its checksum does not match its tensors" if expected else "it has no checksum")
            device = next(iter(model.parameters()), torch.empty(0)).device
            model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
            missing = set(_state_tensors(model)) - set(tensors)
            if missing:
                raise ValueError(f"it lacks {sorted(missing)[:3]}")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self._set_aside(path, exc)
            return False
        return True

    def _set_aside(self, path: Path, reason: BaseException) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        path.replace(aside)
        self.log(f"cached model {path} is unusable ({reason}); moved to {aside.name} and retraining")

    def save(self, model: nn.Module, path: Path, config: dict[str, Any], stats: dict[str, Any]) -> None:
        """Write the weights atomically with the config, training stats and checksum."""
        tensors = _state_tensors(model)
        # Serialized in memory, so that only the atomic writer touches the disk (safetensors' own file
        # errors are not OSErrors).
        write_bytes(path, safetensors_bytes(tensors, metadata={
            "config": json.dumps(config, sort_keys=True, default=str), "stats": json.dumps(stats, sort_keys=True),
            "sha256": tensors_sha256(tensors)}))

    def metadata(self, path: Path) -> dict[str, Any]:
        """The training stats stored beside the weights."""
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("stats", "{}"))

    # ----------------------------------------------------------------- training checkpoints
    @staticmethod
    def checkpoint_path(path: Path) -> Path:
        return path.with_suffix(".ckpt")

    def save_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Atomically write a training checkpoint for the model at `path`."""
        # In memory first: torch.save reports a failed file write as a RuntimeError, not an OSError.
        serialized = io.BytesIO()
        torch.save(state, serialized)
        write_bytes(self.checkpoint_path(path), serialized.getbuffer())

    def load_checkpoint(self, path: Path) -> dict[str, Any] | None:
        """The last checkpoint of the model at `path`, or None (a bad checkpoint is set aside)."""
        target = self.checkpoint_path(path)
        if not target.exists():
            return None
        try:
            return torch.load(target, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            self._set_aside(target, exc)
            return None

    def drop_checkpoint(self, path: Path) -> None:
        self.checkpoint_path(path).unlink(missing_ok=True)

