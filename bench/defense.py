"""Base class of every defense: owns a model, its training recipe, and `predict` (and `certify`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.data import DatasetSpec
from bench.models import build_model


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule of a training run; `milestones` divide the lr by 10 (Madry et al.)."""

    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    augment: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'adam' or 'sgd'")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0")


class Defense:
    """A trainable defense; subclasses override `loss`, `after_step`, `attach` and add `certify`.

    Registration flags (`randomized`, `certified`) are class attributes so that the runner and
    the checks can read them from the registry without building anything.
    """

    randomized = False
    certified = False

    def __init__(self, spec: DatasetSpec, *, arch: str | None = None, arch_params: dict[str, Any] | None = None,
                 **train: Any):
        self.spec = spec
        self.arch = arch or spec.default_model
        self.arch_params = dict(arch_params or {})
        if "milestones" in train:
            train["milestones"] = tuple(train["milestones"])
        self.train_config = TrainConfig(**train)
        self.model: nn.Module | None = None
        self.generator: torch.Generator | None = None
        # Set by the training loop to a generator seeded per step: a defense's own training draws
        # (e.g. adversarial random starts) come from it, so training is reproducible and resumable.
        self.step_generator: torch.Generator | None = None

    @classmethod
    def resolve_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Parameters as stored in the cell (and hashed into its key); e.g. add a weights file's hash."""
        return params

    def build_model(self) -> nn.Module:
        """A fresh, untrained model for this defense."""
        return build_model(self.arch, self.spec.shape, self.spec.classes, **self.arch_params)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """Training loss of one batch at optimizer step `step` (plain cross-entropy here)."""
        return F.cross_entropy(model(x), y)

    def after_step(self, model: nn.Module) -> None:
        """Hook run after every optimizer step (e.g. PixelDP's Parseval projection)."""

    def train_state(self) -> dict[str, Any]:
        """Training-time state of the defense itself (tensors and plain values) saved in checkpoints."""
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        """Restore what `train_state` returned, when training resumes from a checkpoint."""

    def reseed(self, seed: int) -> None:
        """Restart the evaluation noise from `seed` (the runner does this per cell, so no cell's draws
        depend on which cells ran before it in the process)."""
        if self.generator is not None:
            self.generator.manual_seed(seed)

    def attach(self, model: nn.Module, generator: torch.Generator | None = None) -> None:
        """Adopt a trained (or loaded) model for prediction; `generator` drives any noise."""
        self.model = model.eval()
        self.generator = generator

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels (N,) for images x (N, C, H, W) in [0,1]."""
        return self.model(x).argmax(dim=1)

    def judge(self, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(labels (N,), certified radii (N,) or None) for adversarial inputs, with fresh noise.

        Certified defenses return the radius of each adversarial prediction (robust precision).
        """
        return self.predict(x_adv), None


def certified_norm(defense: str, params: dict[str, Any]) -> str:
    """The norm a certified defense's radii are in: its `norm` parameter, else its class's
    `certified_norm(params)`; "" when unknown (e.g. a user's defense that states neither)."""
    if params.get("norm"):
        return str(params["norm"])
    from bench.registry import DEFENSES, load_builtins  # late: importing defenses fills the registry

    load_builtins()
    if defense not in DEFENSES:
        return ""
    rule = getattr(DEFENSES.get(defense), "certified_norm", None)
    return str(rule(params) or "") if callable(rule) else ""
