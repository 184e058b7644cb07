"""Generic training loop: seeded batches, optimizer and lr schedule, the defense's loss and hooks, checkpoints.

Every random draw of step s (data order, augmentation, noise layers, the defense's own draws
such as Madry's random starts, and torch's global generator) comes from generators seeded by
(seed, s), so a run resumed from a checkpoint at step s continues exactly as the uninterrupted
run would have, and two runs with one seed train identical models.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from bench.data import dataset_size, gather
from bench.defense import Defense
from bench.types import derive_seed

__all__ = ["fit", "make_optimizer", "batches", "CHECKPOINT_SECONDS"]

CHECKPOINT_SECONDS = 300.0  # training state is saved this often (and resumed from after a kill)


def make_optimizer(model: nn.Module,
                   defense: Defense) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam or SGD(momentum, weight decay) with a step-wise /10 schedule at the milestones."""
    cfg = defense.train_config
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=0.1)
    return optimizer, scheduler


def batches(dataset: Dataset, batch_size: int, seed: int, device: torch.device,
            start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of (x, y) batches on `device`, starting at optimizer step `start_step`.

    Epoch e visits the examples in a permutation seeded by (seed, e); the last partial batch is
    dropped (unless the dataset is smaller than one batch), so step s's batch depends on s alone.
    """
    n = dataset_size(dataset)
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    step = start_step
    while True:
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))
        for index in range(position, per_epoch):
            x, y = gather(dataset, order[index * batch_size:(index + 1) * batch_size])
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
            step += 1


@runtime_checkable
class DrawsNoise(Protocol):
    """A module that draws its noise from its `generator` attribute (e.g. PixelDP's noise layer)."""

    generator: torch.Generator | None


def _noise_modules(model: nn.Module) -> list[DrawsNoise]:
    """The modules of `model` that draw noise (the training loop seeds their generator per step)."""
    return [m for m in model.modules() if isinstance(m, DrawsNoise) and not isinstance(m, Defense)]


def _training_state(model, optimizer, scheduler, defense: Defense, step: int, losses: list[float]) -> dict[str, Any]:
    schedule = scheduler.state_dict()
    schedule["milestones"] = dict(schedule.get("milestones", {}))  # a Counter is not a plain type
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule,
            "step": step, "losses": torch.tensor(losses, dtype=torch.float64), "defense": defense.train_state()}


def _restore(state: dict[str, Any], model, optimizer, scheduler, defense: Defense) -> tuple[int, list[float]]:
    from collections import Counter

    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule = dict(state["scheduler"])
    schedule["milestones"] = Counter(schedule.get("milestones", {}))
    scheduler.load_state_dict(schedule)
    defense.load_train_state(state.get("defense") or {})
    return int(state["step"]), [float(v) for v in state["losses"]]


def fit(defense: Defense, model: nn.Module, train_set: Dataset, *, steps: int, seed: int,
        device: torch.device, progress: bool = True, resume: dict[str, Any] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[float]:
    """Train `model` for `steps` optimizer steps with the defense's loss; returns the loss curve.

    Args:
        resume: a state from an earlier `checkpoint` call: training continues at its step.
        checkpoint: called with the full training state every `checkpoint_seconds`.
    """
    cfg = defense.train_config
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, defense)
    start, losses = _restore(resume, model, optimizer, scheduler, defense) if resume else (0, [])
    augment = defense.spec.augment if cfg.augment else None
    data_generator = torch.Generator()
    noise_generator = torch.Generator(device=device)
    noisy = _noise_modules(model)
    saved = [m.generator for m in noisy]
    for module in noisy:
        module.generator = noise_generator
    defense.step_generator = noise_generator
    stream = batches(train_set, cfg.batch_size, seed, device, start_step=start)
    bar = tqdm(range(start, steps), desc=f"train {defense.spec.name}/{type(defense).__name__}", disable=not progress,
               leave=False, mininterval=1.0, initial=start, total=steps)
    last_save = time.monotonic()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for step in bar:
                torch.manual_seed(derive_seed(seed, "global", step))
                data_generator.manual_seed(derive_seed(seed, "augment", step))
                noise_generator.manual_seed(derive_seed(seed, "noise", step))
                x, y = next(stream)
                if augment is not None:
                    x = augment(x, data_generator)
                loss = defense.loss(model, x, y, step)
                value = loss.item()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {value} at step {step}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                defense.after_step(model)
                losses.append(value)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{value:.3f}")
                if checkpoint is not None and step + 1 < steps and time.monotonic() - last_save >= checkpoint_seconds:
                    checkpoint(_training_state(model, optimizer, scheduler, defense, step + 1, losses))
                    last_save = time.monotonic()
    finally:
        for module, generator in zip(noisy, saved, strict=True):
            module.generator = generator
        defense.step_generator = None
    model.eval()
    return losses
