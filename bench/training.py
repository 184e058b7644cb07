"""Generic training loop: seeded batches, optimizer and lr schedule, the defense's loss and hooks."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bench.defense import Defense


def make_optimizer(model: nn.Module, defense: Defense) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam or SGD(momentum, weight decay) with a step-wise /10 schedule at the milestones."""
    cfg = defense.train_config
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=0.1)
    return optimizer, scheduler


def batches(dataset: Dataset, batch_size: int, generator: torch.Generator, device: torch.device):
    """An endless stream of shuffled (x, y) batches on `device`, reshuffled every epoch."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                        generator=generator, num_workers=0)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()


def fit(defense: Defense, model: nn.Module, train_set: Dataset, *, steps: int, seed: int,
        device: torch.device, progress: bool = True) -> list[float]:
    """Train `model` for `steps` optimizer steps with the defense's loss; returns the loss curve."""
    cfg = defense.train_config
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, defense)
    augment = defense.spec.augment if cfg.augment else None
    losses: list[float] = []
    stream = batches(train_set, cfg.batch_size, generator, device)
    bar = tqdm(range(steps), desc=f"train {defense.spec.name}/{type(defense).__name__}", disable=not progress,
               leave=False, mininterval=1.0)
    for step in bar:
        x, y = next(stream)
        if augment is not None:
            x = augment(x, generator)
        loss = defense.loss(model, x, y, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        defense.after_step(model)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses
