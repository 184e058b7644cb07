"""Dataset registry: specs (shape, classes, splits, loader), the data root and the fixed test subset."""
from __future__ import annotations

import os
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from bench.core.errors import UserError
from bench.core.registry import DATASETS

__all__ = ["REPO_ROOT", "DatasetError", "DatasetSpec", "data_root", "dataset_labels", "dataset_size", "gather",
           "get_spec", "load_split", "register_dataset", "select_examples"]

REPO_ROOT = Path(__file__).resolve().parents[3]


class DatasetError(UserError, RuntimeError):
    """A dataset that is missing, corrupt or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the harness needs to know about a dataset.

    `load(split, root, download)` returns a torch Dataset of (x, y) with x a float tensor in
    [0, 1] of shape `shape` (C, H, W) and y an int; `augment` maps a training batch (N, C, H, W)
    to an augmented batch (None for no augmentation).
    """

    name: str
    shape: tuple[int, int, int]
    classes: int
    load: Callable[[str, Path, bool], Dataset]
    splits: tuple[str, ...] = ("train", "test")
    default_model: str = "cnn_small"
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = field(default=None, compare=False)
    description: str = ""


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a spec to the DATASETS registry under its name."""
    DATASETS.register(spec.name, spec)
    return spec


def get_spec(name: str) -> DatasetSpec:
    """The registered spec called `name`."""
    return DATASETS.get(name)


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """--data-root, else $PIXELDP_BENCH_DATA, else the repository's datasets/ folder."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("PIXELDP_BENCH_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return REPO_ROOT / "datasets"


def load_split(name: str, split: str, root: Path | None = None, download: bool = False) -> Dataset:
    """Load one split of a registered dataset."""
    spec = get_spec(name)
    if split not in spec.splits:
        raise DatasetError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    return spec.load(split, root or data_root(), download)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """All labels of a dataset as a (N,) long tensor, without decoding images when possible."""
    for attr in ("tensors",):
        if hasattr(dataset, attr):
            return dataset.tensors[1].long()
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr)).long()
    return torch.tensor([int(dataset[i][1]) for i in range(dataset_size(dataset))])


def dataset_size(dataset: Dataset) -> int:
    """len(dataset): every registered loader must return a map-style dataset that has a length."""
    if not isinstance(dataset, Sized):
        raise DatasetError(f"a dataset loader returned a {type(dataset).__name__}, which has no len(); loaders must "
                           "return a map-style dataset (e.g. a TensorDataset)")
    return len(dataset)


def select_examples(dataset: Dataset, n: int, seed: int = 0) -> torch.Tensor:
    """Indices (n,) of a fixed, seeded, class-stratified subset, sorted; the same for every cell.

    Classes get n // K examples each and the remainder goes to the first classes in a seeded
    order, so every defense and attack sees exactly the same examples.
    """
    labels = dataset_labels(dataset)
    if n > len(labels):
        raise DatasetError(f"{n} examples were asked for but the split has only {len(labels)}; set examples "
                           f"(or --examples) to at most {len(labels)}")
    if n == len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=generator)] for idx in per_class]
    order = torch.randperm(len(classes), generator=generator)
    quota = [n // len(classes)] * len(classes)
    for i in range(n % len(classes)):
        quota[int(order[i])] += 1
    chosen: list[torch.Tensor] = []
    shortfall = 0
    for idx, q in zip(per_class, quota, strict=True):
        chosen.append(idx[:q])
        shortfall += max(0, q - len(idx))
    if shortfall:
        taken = torch.cat(chosen)
        rest = torch.tensor(sorted(set(range(len(labels))) - set(taken.tolist())))
        chosen.append(rest[torch.randperm(len(rest), generator=generator)[:shortfall]])
    return torch.cat(chosen).sort().values


def gather(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the examples at `indices` into (x (n, C, H, W), y (n,))."""
    if hasattr(dataset, "tensors"):
        x, y = dataset.tensors
        return x[indices], y[indices].long()
    items = [dataset[int(i)] for i in indices]
    return torch.stack([torch.as_tensor(item[0]) for item in items]), torch.tensor([int(item[1]) for item in items])


from bench.core.data import mnist5k  # noqa: E402,F401  (registers the embedded dataset)
from bench.core.data import torchvision_sets  # noqa: E402,F401  (registers MNIST, SVHN, CIFAR-10/100, ImageNet)
