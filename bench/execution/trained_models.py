"""Train-or-load of defense models through the model cache, trained once per cache key even across processes."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bench.execution.training
from bench.execution.cache import ModelCache
from bench.core.data import data_root as resolve_data_root
from bench.core.data import load_split
from bench.core.defense import Defense
from bench.execution.store import ClaimOwner, Store, claim_rounds
from bench.execution.training import LoaderOptions
from bench.core.types import Cell

__all__ = ["TrainedModels"]


class TrainedModels:
    """Fills a defense's model from the cache, or trains it (claiming the cache key in the store so that
    no other process trains it too) and caches it; training checkpoints let a killed run resume."""

    def __init__(self, cache: ModelCache, store: Store, owner: ClaimOwner, *, device: torch.device,
                 data_root: Path | None, download: bool, progress: bool, checkpoint_seconds: float,
                 poll_seconds: float, log: Callable[[str], None], loader: LoaderOptions | None = None):
        self.cache, self.store, self.owner = cache, store, owner
        self.loader = loader
        self.device, self.data_root, self.download = device, data_root, download
        self.progress, self.checkpoint_seconds, self.poll_seconds = progress, checkpoint_seconds, poll_seconds
        self.log = log

    def _cached(self, model: nn.Module, path: Path) -> dict[str, Any] | None:
        """The stored training info when the cache holds the model (loaded into `model`), else None."""
        if not self.cache.load(model, path):
            return None
        stored = self.cache.metadata(path)
        return {"loaded_from_cache": True} | {k: v for k, v in stored.items() if k.startswith("train_")}

    def obtain(self, cell: Cell, defense: Defense, model: nn.Module, path: Path, steps: int,
               config: dict[str, Any]) -> dict[str, Any]:
        """Load `model` from the cache at `path`, or train it for `steps` steps; returns the training info."""
        found: list[dict[str, Any]] = []  # the model's training info, once it is cached or trained

        def cached(_claim: str) -> bool:
            info = self._cached(model, path)
            if info is not None:
                found.append(info)
            return info is not None

        def train(claimed: Iterator[Cell]) -> None:
            for _ in claimed:
                try:  # cached while we were claiming it, else ours to train
                    info = self._cached(model, path)
                    found.append(info if info is not None else self._train(cell, defense, model, path, steps, config))
                finally:
                    self.store.release("model:" + path.name, self.owner)

        claim_rounds(self.store, self.owner, [("model:" + path.name, cell)], train, poll_seconds=self.poll_seconds,
                     waiting=lambda _, holder: self.log(f"waiting for {holder} to train {cell.defense_label} on "
                                                        f"{cell.dataset}; its model will be reused"), done=cached)
        return found[-1]

    def _train(self, cell: Cell, defense: Defense, model: nn.Module, path: Path, steps: int,
               config: dict[str, Any]) -> dict[str, Any]:
        """Train (resuming from a checkpoint when one exists), save to the cache, return the timings."""
        resume = self.cache.load_checkpoint(path)
        start = 0 if resume is None else int(resume["step"])
        self.log(f"training {cell.defense_label} on {cell.dataset} ({steps} steps, {self.device})"
                 + (f", resuming at step {start}" if start else ""))
        train = load_split(cell.dataset, "train", resolve_data_root(self.data_root), self.download)
        began = time.perf_counter()
        losses = bench.execution.training.fit(defense, model, train, steps=steps, seed=cell.seed, device=self.device,
                                    progress=self.progress, resume=resume,
                                    checkpoint=lambda state: self.cache.save_checkpoint(path, state),
                                    checkpoint_seconds=self.checkpoint_seconds, loader=self.loader)
        seconds = time.perf_counter() - began
        stats = {"train_seconds": seconds, "train_seconds_per_step": seconds / max(steps - start, 1),
                 "train_final_loss": losses[-1] if losses else None, "train_resumed_at": start}
        self.cache.save(model, path, config, stats)
        self.cache.drop_checkpoint(path)
        return {"loaded_from_cache": False} | stats
