"""Trained-model cache: safetensors files keyed by (dataset, defense, params, seed, code version)."""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from bench import __version__
from bench.types import canonical_json


def code_fingerprint(*sources: Any) -> str:
    """Hash of the code defining `sources` (classes, functions or modules) plus the version.

    A source inside a sub-package (e.g. defenses/pixeldp/) contributes every file of that folder,
    so edited training, noise or model code never reuses stale weights.
    """
    digest = hashlib.sha256(__version__.encode())
    files: set[Path] = set()
    for source in sources:
        path = Path(inspect.getsourcefile(source))
        files.update(path.parent.glob("*.py") if (path.parent / "__init__.py").exists()
                     and path.parent.name not in ("bench", "defenses", "attacks") else [path])
    for path in sorted(files):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class ModelCache:
    """A folder of `<dataset>-<defense>-<hash>.safetensors` files plus a JSON of what each holds."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, config: dict[str, Any], fingerprint: str) -> Path:
        """Where the model for `config` (a Cell's defense_config) lives."""
        key = hashlib.sha256(canonical_json({"config": config, "code": fingerprint}).encode()).hexdigest()[:20]
        return self.root / f"{config['dataset']}-{config['defense']}-{key}.safetensors"

    def load(self, model: nn.Module, path: Path) -> bool:
        """Fill `model` from `path` if it exists (safetensors: no pickle); True when loaded."""
        if not path.exists():
            return False
        load_model(model, str(path), device=str(next(model.parameters()).device))
        return True

    def save(self, model: nn.Module, path: Path, config: dict[str, Any], stats: dict[str, Any]) -> None:
        """Write the weights atomically (temp file + rename) with the config and training stats."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_model(model, str(tmp), metadata={"config": json.dumps(config, sort_keys=True, default=str),
                                              "stats": json.dumps(stats, sort_keys=True)})
        tmp.replace(path)

    def metadata(self, path: Path) -> dict[str, Any]:
        """The training stats stored beside the weights."""
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("stats", "{}"))
