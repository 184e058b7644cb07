"""The paper's architectures; importing this package registers them in bench.core.registry.MODELS."""
import torch

from bench.core.archs import inception, mnist, resnet  # noqa: F401
from bench.core.models import build_model
from bench.core.registry import DATASETS, MODELS

__all__ = ["describe_models"]


def describe_models():
    """(name, input shape, classes, parameter count, datasets using it by default) for every registered model.

    Each architecture is sized for its registered input shape (else the first dataset that uses
    it by default) and built on the meta device, so even WRN-28-10 and Inception-v3 cost no memory.
    """
    rows = []
    for name in MODELS.names():
        info = MODELS.info(name)
        users = [d for d in DATASETS.names() if DATASETS.get(d).default_model == name]
        spec = DATASETS.get(users[0]) if users else None
        shape = tuple(info.shape or (spec.shape if spec else (1, 28, 28)))
        classes = int(info.classes or (spec.classes if spec else 10))
        with torch.device("meta"):
            model = build_model(name, shape, classes)
        # All parameters, frozen ones included (a frozen pretrained classifier is still part of the model).
        rows.append((name, shape, classes, sum(p.numel() for p in model.parameters()), users))
    return rows
