"""Writers of tiny dataset files in exactly the real formats (IDX, CIFAR pickles, SVHN .mat, ImageNet folders)."""
from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]


def _images(n: int, shape: Sequence[int], labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random uint8 images (n, C, H, W) whose pixel (0, 0, 0) encodes the label and (0, 0, 1) is 200."""
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    x[:, 0, 0, 0] = (10 * labels + 5) % 256
    x[:, 0, 0, 1] = 200
    return x


def _labels(classes: Sequence[int], per_class: int) -> np.ndarray:
    return np.repeat(np.asarray(classes, dtype=np.int64), per_class)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, *, classes: Sequence[int] = range(10), per_class: int = 2, seed: int = 0) -> dict:
    """MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; returns {split: (x uint8 (N,1,28,28), y)}."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        y = _labels(classes, per_class)
        x = _images(len(y), (1, 28, 28), y, rng)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.astype(np.uint8))
        out[split] = (x, y)
    return out


def write_fashion_mnist(root: Path, *, classes: Sequence[int] = range(10), per_class: int = 2,
                        seed: int = 0) -> dict:
    """FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte; returns {split: (x uint8 (N,1,28,28), y)}."""
    rng = np.random.default_rng(seed)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        y = np.repeat(np.asarray(classes, dtype=np.int64), per_class)
        x = rng.integers(0, 256, (len(y), 1, 28, 28), dtype=np.uint8)
        x[:, 0, 0, 0] = 10 * y + 3  # the label, readable from the image
        x[:, 0, 27, 27] = 255
        x[:, 0, 27, 26] = 0
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.astype(np.uint8))
        out[split] = (x, y)
    return out


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> CIFAR's (N, 3072) rows: the red plane, then green, then blue, row-major."""
    return x.reshape(len(x), 3 * 32 * 32)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)  # the real files are Python 2 pickles


def write_cifar10(root: Path, *, classes: Sequence[int] = range(10), per_class: int = 2, seed: int = 0) -> dict:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; returns {split: (x, y)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    y = _labels(classes, per_class)
    x = _images(len(y), (3, 32, 32), y, rng)
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5), 1):
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": y[part].tolist(),
                                             "data": _cifar_rows(x[part]),
                                             "filenames": [f"img_{j}.png" for j in part]})
    y_test = _labels(classes, per_class)
    x_test = _images(len(y_test), (3, 32, 32), y_test, rng)
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y_test.tolist(),
                                    "data": _cifar_rows(x_test),
                                    "filenames": [f"t_{j}.png" for j in range(len(y_test))]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names,
                                      "num_cases_per_batch": 10000, "num_vis": 3072})
    return {"train": (x, y), "test": (x_test, y_test)}


def write_cifar100(root: Path, *, classes: Sequence[int] = range(0, 100, 10), per_class: int = 2,
                   seed: int = 0) -> dict:
    """cifar-100-python/{train, test, meta} with fine and coarse labels; returns {split: (x, fine y)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        y = _labels(classes, per_class)
        x = _images(len(y), (3, 32, 32), y, rng)
        _pickle(folder / split, {"filenames": [f"{split}_{j}.png" for j in range(len(y))], "batch_label": split,
                                 "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(), "data": _cifar_rows(x)})
        out[split] = (x, y)
    _pickle(folder / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)],
                              "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return out


def write_svhn(root: Path, *, classes: Sequence[int] = range(10), per_class: int = 2, seed: int = 0) -> dict:
    """svhn/{train,test}_32x32.mat: X uint8 (32, 32, 3, N), y (N, 1) with digit 0 stored as 10."""
    import scipy.io

    rng = np.random.default_rng(seed)
    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        y = _labels(classes, per_class)
        x = _images(len(y), (3, 32, 32), y, rng)
        stored = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": stored})
        out[split] = (x, y)
    return out


def imagenet_color(wnid_index: int) -> tuple[int, int, int]:
    """The solid RGB colour of every image of the class with this index in the sorted wnid list."""
    return (40 * wnid_index + 20, 230 - 40 * wnid_index, 128)


def write_imagenet(root: Path, *, present: Sequence[int] = (1, 3), train_per_class: int = 2,
                   val_per_class: int = 2, size: tuple[int, int] = (380, 342)) -> dict:
    """imagenet/{meta.bin, train/<wnid>/*.JPEG, val/<wnid>/*.JPEG} for the classes at `present`.

    meta.bin is what torchvision writes from the devkit: (wnid -> class names, val wnids in file order).
    Returns {split: labels (N,)} in torchvision's sample order (sorted folders, sorted files).
    """
    from PIL import Image

    folder = root / "imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    wnid_to_classes = {w: (f"class {i}", f"alias {i}") for i, w in enumerate(IMAGENET_WNIDS)}
    val_wnids = [IMAGENET_WNIDS[i] for i in present for _ in range(val_per_class)]
    torch.save((wnid_to_classes, val_wnids), folder / "meta.bin")
    out = {}
    counter = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        labels = []
        for i in present:
            wnid = IMAGENET_WNIDS[i]
            (folder / split / wnid).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                counter += 1
                name = f"{wnid}_{j}.JPEG" if split == "train" else f"ILSVRC2012_val_{counter:08d}.JPEG"
                Image.new("RGB", size, imagenet_color(i)).save(folder / split / wnid / name, format="JPEG", quality=95)
                labels.append(i)
        out["train" if split == "train" else "test"] = np.asarray(labels)
    return out


def write_all_tiny(root: Path) -> None:
    """One image per class of four classes (ImageNet: two classes) for every dataset: for end-to-end runs."""
    write_mnist(root, classes=range(4), per_class=1)
    write_svhn(root, classes=range(4), per_class=1)
    write_cifar10(root, classes=range(4), per_class=1)
    write_cifar100(root, classes=(0, 25, 50, 99), per_class=1)
    write_imagenet(root, present=(1, 3), train_per_class=1, val_per_class=2)


def write_inception_weights(folder: Path, size: int = 160) -> Path:
    """A stand-in for torchvision's pretrained Inception-v3 file: random weights with calibrated batch norm.

    Randomly initialised Inception-v3 explodes in eval mode (batch-norm statistics of 0 / 1), so
    the statistics are measured on two random images first, as pretraining would have.
    """
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=True)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    net.train()
    with torch.no_grad():
        net(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inception_v3.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path
