"""Generic training loop: seeded batches, optimizer and lr schedule, the defense's loss and hooks, checkpoints.

Every random draw of step s (data order, augmentation, noise layers, the defense's own draws
such as Madry's random starts, and torch's global generator) comes from generators seeded by
(seed, s), so a run resumed from a checkpoint at step s continues exactly as the uninterrupted
run would have, and two runs with one seed train identical models.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from bench.core.data import dataset_size, gather
from bench.core.defense import Defense
from bench.core.errors import UserError
from bench.core.types import derive_seed

__all__ = ["fit", "make_optimizer", "batches", "LoaderOptions", "CHECKPOINT_SECONDS", "LOSS_CHECK_STEPS"]

CHECKPOINT_SECONDS = 300.0  # training state is saved this often (and resumed from after a kill)
# Losses are read back from the device (one sync) and checked for NaN / inf this often, before
# every checkpoint and at the end: a per-step `.item()` would stall a GPU on every step.
LOSS_CHECK_STEPS = 20


def make_optimizer(model: nn.Module,
                   defense: Defense) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam or SGD(momentum, weight decay) with the config's lr schedule (see TrainConfig)."""
    cfg = defense.train_config
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if cfg.schedule == "cyclic":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, OneCycle(cfg.steps))
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=0.1)
    return optimizer, scheduler


class OneCycle:
    """lr factor of step t: up linearly to 1 at 2/5 of `steps`, down linearly to 0 at `steps` (Wong et al. 2020)."""

    def __init__(self, steps: int):
        self.steps = max(1, int(steps))
        self.peak = max(1, round(0.4 * self.steps))

    def __call__(self, step: int) -> float:
        t = step + 1  # the factor of the step about to run: never 0 at the first step
        if t <= self.peak:
            return t / self.peak
        return max(0.0, (self.steps - t) / max(1, self.steps - self.peak))



class TrainingDivergedError(UserError, FloatingPointError):
    """The training loss became NaN or inf: a setting (learning rate, noise) the user can change."""


@dataclass(frozen=True)
class LoaderOptions:
    """How training batches of decoded (non-tensor) datasets are read, e.g. ImageNet's JPEG folders.

    `workers` > 0 decodes in that many persistent DataLoader worker processes (the main process
    caps ImageNet training at ~200 images/s); `pin_memory` pins their batches for asynchronous
    copies to a CUDA device. Neither changes a batch: the examples of every step are fixed by the
    seed (see `batches`), so these are run options, not part of any key.
    """

    workers: int = 0
    pin_memory: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"loader workers must be a whole number >= 0, got {self.workers!r}")


Batches = Generator[tuple[torch.Tensor, torch.Tensor], None, None]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation (n,) in which epoch `epoch` visits the examples (seeded by (seed, epoch), on the CPU)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped), 1 when the dataset is smaller than a batch."""
    return max(1, n // batch_size) if n >= batch_size else 1


def batches(dataset: Dataset, batch_size: int, seed: int, device: torch.device, start_step: int = 0,
            loader: LoaderOptions | None = None) -> Batches:
    """An endless stream of (x, y) batches on `device`, starting at optimizer step `start_step`.

    Epoch e visits the examples in a permutation seeded by (seed, e); the last partial batch is
    dropped (unless the dataset is smaller than one batch), so step s's batch depends on s alone.
    Tensor datasets (TensorDataset, uint8 ImageTensorDataset) are moved to `device` once and
    batched there (uint8 images become floats per batch); other datasets are read by `loader`'s
    DataLoader workers, or in this process. All three give the same batches, bit for bit.
    """
    n = dataset_size(dataset)
    per_epoch = steps_per_epoch(n, batch_size)
    resident = device_resident(dataset, device)
    if resident is not None:
        return _resident_batches(resident, n, batch_size, per_epoch, seed, start_step)
    if loader is not None and loader.workers > 0:
        return _loader_batches(dataset, n, batch_size, per_epoch, seed, device, start_step, loader)
    return _gathered_batches(dataset, n, batch_size, per_epoch, seed, device, start_step)


def device_resident(dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """(images, labels, uint8?) of a tensor dataset, moved to `device` once; None for other datasets.

    uint8 images stay uint8 on the device (4x less memory than floats) and are converted per batch.
    A dataset that would take more than half of a CUDA device's free memory stays on the host.
    """
    from bench.core.data.torchvision_sets import ImageTensorDataset  # late: torchvision is a heavy import

    if isinstance(dataset, ImageTensorDataset):
        images, labels, uint8 = dataset.images, dataset.targets, True
    else:
        tensors = getattr(dataset, "tensors", None)
        if not (isinstance(tensors, tuple) and len(tensors) == 2):
            return None
        images, labels, uint8 = tensors[0], tensors[1].long(), False
    if device.type == "cuda" and images.nbytes + labels.nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        return None
    return images.to(device), labels.to(device), uint8


def _resident_batches(resident: tuple[torch.Tensor, torch.Tensor, bool], n: int, batch_size: int, per_epoch: int,
                      seed: int, start_step: int) -> Batches:
    images, labels, uint8 = resident
    epoch, position = divmod(start_step, per_epoch)
    while True:
        order = epoch_order(n, seed, epoch).to(images.device, non_blocking=True)
        for index in range(position, per_epoch):
            chosen = order[index * batch_size:(index + 1) * batch_size]
            x = images[chosen]
            # The same arithmetic as ImageTensorDataset.__getitem__, so the floats are identical.
            yield (x.float().div_(255.0) if uint8 else x), labels[chosen]
        epoch, position = epoch + 1, 0


def _gathered_batches(dataset: Dataset, n: int, batch_size: int, per_epoch: int, seed: int, device: torch.device,
                      start_step: int) -> Batches:
    epoch, position = divmod(start_step, per_epoch)
    while True:
        order = epoch_order(n, seed, epoch)
        for index in range(position, per_epoch):
            x, y = gather(dataset, order[index * batch_size:(index + 1) * batch_size])
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
        epoch, position = epoch + 1, 0


class _EpochBatches(Sampler[list[int]]):
    """Index batches of one epoch from a given position (the DataLoader's batch sampler, re-aimed per epoch)."""

    def __init__(self, n: int, batch_size: int, per_epoch: int, seed: int):
        self.n, self.batch_size, self.per_epoch, self.seed = n, batch_size, per_epoch, seed
        self.epoch, self.position = 0, 0

    def aim(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position

    def __len__(self) -> int:
        return self.per_epoch - self.position

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch)
        for index in range(self.position, self.per_epoch):
            yield order[index * self.batch_size:(index + 1) * self.batch_size].tolist()


def _collate(items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (x, y) items exactly as bench.core.data.gather does."""
    return torch.stack([torch.as_tensor(item[0]) for item in items]), torch.tensor([int(item[1]) for item in items])


def _loader_batches(dataset: Dataset, n: int, batch_size: int, per_epoch: int, seed: int, device: torch.device,
                    start_step: int, loader: LoaderOptions) -> Batches:
    sampler = _EpochBatches(n, batch_size, per_epoch, seed)
    # Persistent workers survive from one epoch to the next (no re-fork, no re-opened files); the
    # sampler runs in this process, so re-aiming it between epochs reaches them.
    data = DataLoader(dataset, batch_sampler=sampler, num_workers=loader.workers, collate_fn=_collate,
                      pin_memory=loader.pin_memory and device.type == "cuda", persistent_workers=True)
    epoch, position = divmod(start_step, per_epoch)
    while True:
        sampler.aim(epoch, position)
        for x, y in data:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
        epoch, position = epoch + 1, 0


@runtime_checkable
class DrawsNoise(Protocol):
    """A module that draws its noise from its `generator` attribute (e.g. PixelDP's noise layer)."""

    generator: torch.Generator | None


def _noise_modules(model: nn.Module) -> list[DrawsNoise]:
    """The modules of `model` that draw noise (the training loop seeds their generator per step)."""
    return [m for m in model.modules() if isinstance(m, DrawsNoise) and not isinstance(m, Defense)]


def _training_state(model, optimizer, scheduler, defense: Defense, step: int, losses: list[float]) -> dict[str, Any]:
    schedule = scheduler.state_dict()
    if "milestones" in schedule:
        schedule["milestones"] = dict(schedule["milestones"])  # a Counter is not a plain type
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule,
            "step": step, "losses": torch.tensor(losses, dtype=torch.float64), "defense": defense.train_state()}


def _restore(state: dict[str, Any], model, optimizer, scheduler, defense: Defense) -> tuple[int, list[float]]:
    from collections import Counter

    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule = dict(state["scheduler"])
    if "milestones" in schedule:
        schedule["milestones"] = Counter(schedule["milestones"])
    scheduler.load_state_dict(schedule)
    defense.load_train_state(state.get("defense") or {})
    return int(state["step"]), [float(v) for v in state["losses"]]


def fit(defense: Defense, model: nn.Module, train_set: Dataset, *, steps: int, seed: int,
        device: torch.device, progress: bool = True, resume: dict[str, Any] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_seconds: float = CHECKPOINT_SECONDS, loader: LoaderOptions | None = None) -> list[float]:
    """Train `model` for `steps` optimizer steps with the defense's loss; returns the loss curve.

    Losses stay on the device and are checked every LOSS_CHECK_STEPS steps, before every
    checkpoint and at the end: a NaN or inf loss raises TrainingDivergedError naming its step, and
    no checkpoint is ever written after it (the last good one is kept: nothing is lost).

    Args:
        resume: a state from an earlier `checkpoint` call: training continues at its step.
        checkpoint: called with the full training state every `checkpoint_seconds`.
        loader: how decoded (non-tensor) datasets are read (see LoaderOptions).
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
    stream = batches(train_set, cfg.batch_size, seed, device, start_step=start, loader=loader)
    bar = tqdm(range(start, steps), desc=f"train {defense.spec.name}/{type(defense).__name__}", disable=not progress,
               leave=False, mininterval=1.0, initial=start, total=steps)
    pending: list[tuple[int, torch.Tensor]] = []  # (step, detached loss) since the last check, on the device
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
                pending.append((step, loss.detach().reshape(())))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                defense.after_step(model)
                if step % LOSS_CHECK_STEPS == 0:
                    _check_losses(pending, losses)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if checkpoint is not None and step + 1 < steps and time.monotonic() - last_save >= checkpoint_seconds:
                    _check_losses(pending, losses)
                    checkpoint(_training_state(model, optimizer, scheduler, defense, step + 1, losses))
                    last_save = time.monotonic()
            _check_losses(pending, losses)
    except Exception:
        # A failure caused by an unchecked NaN (e.g. in a defense's hook) reports the NaN and its step.
        _check_losses(pending, losses)
        raise
    finally:
        for module, generator in zip(noisy, saved, strict=True):
            module.generator = generator
        defense.step_generator = None
        stream.close()  # ends a DataLoader's worker processes with the stream
    model.eval()
    return losses


def _check_losses(pending: list[tuple[int, torch.Tensor]], losses: list[float]) -> None:
    """Move the pending (step, loss) pairs to `losses` as floats, with one device sync for all of them.

    Raises TrainingDivergedError at the first NaN or inf, naming its step (as a per-step check would).
    """
    if not pending:
        return
    values = torch.stack([loss for _, loss in pending]).tolist()
    steps = [step for step, _ in pending]
    pending.clear()
    for step, value in zip(steps, values, strict=True):
        if not math.isfinite(value):
            raise TrainingDivergedError(f"training loss became {value} at step {step}; lower the learning rate")
    losses.extend(values)
