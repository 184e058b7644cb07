"""MNIST, Fashion-MNIST, SVHN, CIFAR-10, CIFAR-100 and ImageNet in torchvision's on-disk layout under the data root."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import transforms

from bench.core.atomic import is_disk_error
from bench.core.data import DatasetError, DatasetSpec, register_dataset, safe_pickle
from bench.core.data.augment import horizontal_flip, pad_crop_flip

__all__ = ["ImageTensorDataset", "load_cifar10", "load_cifar100", "load_fashion_mnist", "load_imagenet", "load_mnist",
           "load_svhn"]

ROOT_HINT = "(data root: --data-root, else $PIXELDP_BENCH_DATA, else <repo>/datasets; layouts in datasets/README.md)"
# Inception-v3's evaluation preprocessing: resize the short side to 299 / 0.875 = 342, centre-crop 299.
IMAGENET_SIZE = 299
IMAGENET_RESIZE = 342
Loaded = TypeVar("Loaded")


class ImageTensorDataset(Dataset):
    """Decoded images kept as uint8 (N, C, H, W) (4x less memory than floats), served as floats in [0, 1]."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError("images must be uint8 (N, C, H, W) with one target per image")
        self.images = images
        self.targets = targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.targets[index])


def _require(name: str, split: str, folder: Path, files: list[str], how: str) -> None:
    """Raise ONE DatasetError listing the expected files when any of them is missing."""
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise DatasetError(
            f"dataset {name!r} ({split} split) not found: expected {', '.join(files)} in {folder} "
            f"(missing: {', '.join(missing)}). {how} {ROOT_HINT}")


def _corrupt(name: str, path: Path, exc: BaseException) -> DatasetError:
    return DatasetError(f"dataset {name!r}: cannot read {path}: the file is corrupt or truncated "
                        f"({type(exc).__name__}: {exc}); delete it and fetch it again")


def _load(name: str, files: list[Path], probe: Callable[[Path], None], build: Callable[[], Loaded]) -> Loaded:
    """Run torchvision's loader; on failure, probe each file to name the one that is corrupt."""
    try:
        return build()
    except DatasetError:
        raise
    except Exception as exc:  # any parser error from deep inside a loader becomes one clear message
        for path in files:
            try:
                probe(path)
            except Exception as file_exc:
                raise _corrupt(name, path, file_exc) from file_exc
        raise DatasetError(f"dataset {name!r}: torchvision could not load {', '.join(map(str, files))} "
                           f"({type(exc).__name__}: {exc}); check the files or fetch them again") from exc


def _how(download: bool, by_hand: str) -> str:
    """How to provide missing files: --download when it was not given; once it was, the network or `by_hand`."""
    if download:
        return f"Check the network connection and run again, or {by_hand}."
    return f"Run with --download to let torchvision fetch it, or {by_hand}."


def _download_failed(name: str, exc: BaseException, how: str) -> DatasetError:
    if is_disk_error(exc):  # the data root refused the files: the network is not the problem
        how = "Free disk space (or make the data root writable) and run again."
    return DatasetError(f"dataset {name!r}: download failed ({type(exc).__name__}: {exc}). {how}")


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX files under <Folder>/raw/)



def _probe_idx(path: Path) -> None:
    """Parse one IDX file and check its dimensionality and dtype."""
    tensor = tvd.mnist.read_sn3_pascalvincent_tensor(str(path), strict=False)
    want = 3 if "images" in path.name else 1
    if tensor.dim() != want or tensor.dtype != torch.uint8:
        raise ValueError(f"expected a {want}-d uint8 IDX tensor, got {tensor.dim()}-d {tensor.dtype}")


def _idx_loader(name: str, cls: type[tvd.MNIST], url: str) -> Callable[[str, Path, bool], ImageTensorDataset]:
    """A loader of torchvision's MNIST layout (root/<cls.__name__>/raw/*-ubyte) for `cls` (MNIST or a subclass)."""
    def load(split: str, root: Path, download: bool) -> ImageTensorDataset:
        folder = root / cls.__name__ / "raw"  # torchvision's raw_folder
        how = _how(download, f"download the four *-ubyte.gz files from {url} and gunzip them into {folder}")
        if download:
            try:
                cls(str(root), train=True, download=True)
            except Exception as exc:
                raise _download_failed(name, exc, how) from exc
        prefix = "train" if split == "train" else "t10k"
        files = [folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"]
        # Only this split's two files: evaluating needs no training files (torchvision's class wants all four).
        _require(name, split, folder, [f.name for f in files], how)
        data = _load(name, files, _probe_idx, lambda: SimpleNamespace(
            data=tvd.mnist.read_image_file(str(files[0])), targets=tvd.mnist.read_label_file(str(files[1]))))
        if len(data.data) != len(data.targets):
            raise _corrupt(name, files[1], ValueError(f"{len(data.targets)} labels for {len(data.data)} images"))
        if len(data.targets) and int(data.targets.max()) >= len(cls.classes):
            raise _corrupt(name, files[1], ValueError(f"labels outside 0..{len(cls.classes) - 1}"))
        return ImageTensorDataset(data.data.unsqueeze(1), data.targets)

    load.__doc__ = f"{name}: 60,000 train / 10,000 test 28x28 images from {cls.__name__}/raw/*-ubyte (torchvision)."
    return load


load_mnist = _idx_loader("mnist", tvd.MNIST, "https://ossci-datasets.s3.amazonaws.com/mnist/")
# Zalando's 10 clothing classes (Xiao et al. 2017), a drop-in for MNIST's format and sizes.
load_fashion_mnist = _idx_loader("fashion_mnist", tvd.FashionMNIST, tvd.FashionMNIST.mirrors[0])


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100 (python pickles)

class _CIFAR10(tvd.CIFAR10):
    """torchvision's CIFAR10 with existence checks instead of md5 (corruption is caught while parsing)."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / f).exists() for f, _ in self.train_list + self.test_list + [[self.meta["filename"], ""]])

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as handle:
            self.classes = safe_pickle.load(handle)[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR100(_CIFAR10):
    base_folder = tvd.CIFAR100.base_folder
    url = tvd.CIFAR100.url
    filename = tvd.CIFAR100.filename
    tgz_md5 = tvd.CIFAR100.tgz_md5
    train_list = tvd.CIFAR100.train_list
    test_list = tvd.CIFAR100.test_list
    meta = tvd.CIFAR100.meta


def _probe_cifar(path: Path) -> None:
    """Unpickle one CIFAR file and check that images and labels agree."""
    with open(path, "rb") as handle:
        entry = safe_pickle.load(handle)
    if "data" not in entry:
        if not any(k.endswith("label_names") for k in entry):
            raise ValueError("neither a data batch nor a meta file")
        return
    labels = entry.get("labels", entry.get("fine_labels"))
    data = np.asarray(entry["data"])
    if labels is None or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"data of shape {data.shape} does not match {len(labels or [])} labels of 3x32x32 images")


def _read_cifar(folder: Path, cls: type[tvd.CIFAR10], split: str) -> SimpleNamespace:
    """The split's batches as data (N, 3, 32, 32) uint8 and targets, read with the restricted unpickler."""
    with open(folder / cls.meta["filename"], "rb") as handle:
        names = safe_pickle.load(handle)[cls.meta["key"]]  # the class names: a corrupt meta file fails here
    data, targets = [], []
    for filename, _ in (cls.train_list if split == "train" else cls.test_list):
        with open(folder / filename, "rb") as handle:
            entry = safe_pickle.load(handle)
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    if targets and not 0 <= min(targets) <= max(targets) < len(names):
        raise ValueError(f"labels outside 0..{len(names) - 1}")
    return SimpleNamespace(data=np.concatenate(data), targets=targets)


def _cifar_loader(name: str, cls: type[tvd.CIFAR10], url: str) -> Callable[[str, Path, bool], ImageTensorDataset]:
    def load(split: str, root: Path, download: bool) -> ImageTensorDataset:
        folder = root / cls.base_folder
        how = _how(download, f"download {url} and extract it into {root}")
        if download:
            try:
                cls(str(root), train=True, download=True)
            except Exception as exc:
                raise _download_failed(name, exc, how) from exc
        # Only this split's batches and the meta file: evaluating needs no training files.
        expected = [f for f, _ in (cls.train_list if split == "train" else cls.test_list)] + [cls.meta["filename"]]
        _require(name, split, folder, expected, how)
        files = [folder / f for f in expected]
        # Read with the restricted unpickler rather than torchvision's plain pickle.load.
        data = _load(name, files, _probe_cifar, lambda: _read_cifar(folder, cls, split))
        images = torch.from_numpy(np.ascontiguousarray(data.data))
        return ImageTensorDataset(images, torch.as_tensor(data.targets))

    load.__doc__ = f"{name}: 50,000 train / 10,000 test 32x32 images from {cls.base_folder}/ (torchvision)."
    return load


load_cifar10 = _cifar_loader("cifar10", _CIFAR10, tvd.CIFAR10.url)
load_cifar100 = _cifar_loader("cifar100", _CIFAR100, tvd.CIFAR100.url)


# ---------------------------------------------------------------- SVHN (.mat files under svhn/)

class _SVHN(tvd.SVHN):
    """torchvision's SVHN with an existence check instead of md5 (corruption is caught while parsing)."""

    def _check_integrity(self) -> bool:
        return (Path(self.root) / self.filename).exists()


def _probe_mat(path: Path) -> None:
    """Read one SVHN .mat file and check that X (32, 32, 3, N) and y (N, 1) agree."""
    import scipy.io

    mat = scipy.io.loadmat(str(path))
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
        raise ValueError(f"X of shape {x.shape} does not match y of shape {y.shape}")


def load_svhn(split: str, root: Path, download: bool) -> ImageTensorDataset:
    """SVHN 73,257 train / 26,032 test digits (no 'extra' split) from root/svhn/*_32x32.mat; label 10 -> 0."""
    folder = root / "svhn"
    filename = f"{split}_32x32.mat"
    how = _how(download, f"download http://ufldl.stanford.edu/housenumbers/{filename} into {folder}")
    if download:
        try:
            _SVHN(str(folder), split=split, download=True)
        except Exception as exc:
            raise _download_failed("svhn", exc, how) from exc
    _require("svhn", split, folder, [filename], how)
    data = _load("svhn", [folder / filename], _probe_mat, lambda: _SVHN(str(folder), split=split))
    if data.data.shape[0] != len(data.labels) or data.data.shape[1:] != (3, 32, 32):
        raise _corrupt("svhn", folder / filename, ValueError(f"images {data.data.shape}, labels {len(data.labels)}"))
    images = torch.from_numpy(np.ascontiguousarray(data.data, dtype=np.uint8))
    return ImageTensorDataset(images, torch.from_numpy(data.labels.astype(np.int64)))


# ---------------------------------------------------------------- ImageNet (train/ and val/ folders, devkit)

def _imagenet_transform() -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(IMAGENET_RESIZE, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(IMAGENET_SIZE),
        transforms.ToTensor(),
    ])


def _open_rgb(path: str):
    """PIL loader that names the file when an image cannot be decoded."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise _corrupt("imagenet", Path(path), exc) from exc


def _probe_meta(path: Path) -> None:
    wnid_to_classes, val_wnids = torch.load(path, weights_only=True)
    if not isinstance(wnid_to_classes, dict) or not isinstance(val_wnids, list):
        raise ValueError("expected (dict wnid -> class names, list of validation wnids)")


def load_imagenet(split: str, root: Path, download: bool) -> Dataset:
    """ILSVRC-2012 via torchvision.datasets.ImageNet; 'test' is the 50,000-image validation set.

    Images are decoded lazily, resized to 342 and centre-cropped to 299x299 (87.5%), for
    Inception-v3 (Szegedy et al. 2016). Labels index the sorted WordNet ids of the devkit's 1000
    classes, i.e. the order of torchvision's pretrained weights, even when only some class folders
    are present.
    """
    folder = root / "imagenet"
    tv_split = "train" if split == "train" else "val"
    archive = tvd.imagenet.ARCHIVE_META[tv_split][0]
    devkit = tvd.imagenet.ARCHIVE_META["devkit"][0]
    how = (f"ImageNet cannot be downloaded automatically{' (--download does not apply)' if download else ''}: "
           f"get {devkit} and {archive} from https://image-net.org/download.php (login required) and put them "
           f"in {folder}; torchvision unpacks them into meta.bin and {tv_split}/ on first use.")
    meta = folder / tvd.imagenet.META_FILE
    checks = ((f"meta.bin (or {devkit})", meta.exists() or (folder / devkit).exists()),
              (f"{tv_split}/ (or {archive})", (folder / tv_split).is_dir() or (folder / archive).exists()))
    missing = [name for name, present in checks if not present]
    if missing:
        raise DatasetError(f"dataset 'imagenet' ({split} split) not found: expected meta.bin (or {devkit}) and "
                           f"{tv_split}/<wnid>/*.JPEG (or {archive}) in {folder} (missing: {', '.join(missing)}). "
                           f"{how} {ROOT_HINT}")
    files = [meta] if meta.exists() else [folder / devkit]
    data = _load("imagenet", files, _probe_meta if meta.exists() else (lambda p: None),
                 lambda: tvd.ImageNet(str(folder), split=tv_split, transform=_imagenet_transform(), loader=_open_rgb))
    all_wnids = sorted(tvd.imagenet.load_meta_file(str(folder))[0])
    index = {wnid: i for i, wnid in enumerate(all_wnids)}
    unknown = sorted(set(data.wnids) - set(index))
    if unknown:
        raise DatasetError(f"dataset 'imagenet': class folders {', '.join(unknown[:5])} in {folder / tv_split} are not "
                           f"in the devkit's class list ({meta}); remove them or fetch the devkit again")
    remap = [index[wnid] for wnid in data.wnids]
    data.samples = [(path, remap[target]) for path, target in data.samples]
    data.imgs = data.samples
    data.targets = [target for _, target in data.samples]
    return data


register_dataset(DatasetSpec(
    name="mnist", shape=(1, 28, 28), classes=10, load=load_mnist, default_model="mnist_cnn",
    description="MNIST handwritten digits, 60,000 train / 10,000 test (IDX files)"))
register_dataset(DatasetSpec(
    name="fashion_mnist", shape=(1, 28, 28), classes=10, load=load_fashion_mnist, default_model="mnist_cnn",
    description="Fashion-MNIST clothing images, 60,000 train / 10,000 test (IDX files)"))
register_dataset(DatasetSpec(
    name="svhn", shape=(3, 32, 32), classes=10, load=load_svhn, default_model="wide_resnet",
    description="SVHN house numbers, 73,257 train / 26,032 test (.mat files)"))
register_dataset(DatasetSpec(
    name="cifar10", shape=(3, 32, 32), classes=10, load=load_cifar10, default_model="wide_resnet",
    augment=pad_crop_flip, description="CIFAR-10, 50,000 train / 10,000 test (python pickles)"))
register_dataset(DatasetSpec(
    name="cifar100", shape=(3, 32, 32), classes=100, load=load_cifar100, default_model="wide_resnet",
    augment=pad_crop_flip, description="CIFAR-100, 50,000 train / 10,000 test (python pickles)"))
register_dataset(DatasetSpec(
    name="imagenet", shape=(3, IMAGENET_SIZE, IMAGENET_SIZE), classes=1000, load=load_imagenet,
    default_model="inception_v3_autoencoder", augment=horizontal_flip,
    description="ILSVRC-2012, 1.28M train / 50,000 val, 299x299 centre crops (folders + devkit)"))
