"""The five datasets read from tiny files in their real formats: shapes, ranges, labels, errors, augmentation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from dataset_files import (IMAGENET_WNIDS, imagenet_color, write_cifar10, write_cifar100, write_imagenet, write_mnist,
                           write_svhn)

from bench.cli.commands import main
from bench.core.data import DatasetError, data_root, gather, get_spec, load_split, select_examples
from bench.core.data.augment import horizontal_flip, pad_crop_flip

WRITERS = {"mnist": write_mnist, "svhn": write_svhn, "cifar10": write_cifar10, "cifar100": write_cifar100}
SHAPES = {"mnist": (1, 28, 28), "svhn": (3, 32, 32), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
          "imagenet": (3, 299, 299)}


def _everything(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return gather(dataset, torch.arange(len(dataset)))


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_small_formats_round_trip_exactly(tmp_path, name, split):
    expected_x, expected_y = WRITERS[name](tmp_path)[split]
    x, y = _everything(load_split(name, split, tmp_path))
    assert x.dtype == torch.float32 and tuple(x.shape) == (len(expected_y), *SHAPES[name])
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Every pixel, in the right channel, row and column order, next to its own label.
    assert np.array_equal(torch.round(x * 255).to(torch.uint8).numpy(), expected_x)
    assert y.tolist() == expected_y.tolist()
    assert (torch.round(x[:, 0, 0, 0] * 255) == (10 * y + 5) % 256).all()


def test_svhn_digit_zero_is_label_zero(tmp_path):
    write_svhn(tmp_path, classes=[0, 7], per_class=3)
    _, y = _everything(load_split("svhn", "test", tmp_path))
    assert sorted(set(y.tolist())) == [0, 7]


def test_specs_match_the_paper():
    assert {n: get_spec(n).shape for n in SHAPES} == SHAPES
    classes = [get_spec(n).classes for n in ("mnist", "svhn", "cifar10", "cifar100", "imagenet")]
    assert classes == [10, 10, 10, 100, 1000]
    assert get_spec("cifar10").augment is pad_crop_flip and get_spec("cifar100").augment is pad_crop_flip
    assert get_spec("mnist").augment is None and get_spec("svhn").augment is None
    assert get_spec("svhn").default_model == "wide_resnet"
    assert get_spec("imagenet").default_model == "inception_v3_autoencoder"


def test_imagenet_folders_decode_to_centre_crops_with_global_labels(tmp_path):
    expected = write_imagenet(tmp_path, present=(1, 3), size=(380, 342))
    for split in ("train", "test"):
        dataset = load_split("imagenet", split, tmp_path)
        x, y = _everything(dataset)
        assert tuple(x.shape) == (len(expected[split]), 3, 299, 299)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        # Labels index the devkit's sorted wnids, not the two folders present.
        assert y.tolist() == expected[split].tolist() == sorted(y.tolist())
        assert set(y.tolist()) == {1, 3}
        colors = (x.mean(dim=(2, 3)) * 255).numpy()
        assert np.abs(colors - np.array([imagenet_color(int(label)) for label in y])).max() < 3
    assert sorted(IMAGENET_WNIDS) == IMAGENET_WNIDS


def test_stratified_subset_is_fixed_and_balanced(tmp_path):
    write_cifar10(tmp_path, per_class=3)
    test = load_split("cifar10", "test", tmp_path)
    chosen = select_examples(test, 10, seed=0)
    _, y = gather(test, chosen)
    assert sorted(y.tolist()) == list(range(10))
    assert torch.equal(chosen, select_examples(load_split("cifar10", "test", tmp_path), 10, seed=0))
    subsets = {tuple(select_examples(test, 10, seed=s).tolist()) for s in range(4)}
    assert len(subsets) > 1
    _, y13 = gather(test, select_examples(test, 13, seed=1))
    assert sorted(np.bincount(y13.numpy(), minlength=10).tolist()) == [1] * 7 + [2] * 3


@pytest.mark.parametrize("name, expected", [
    ("mnist", ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "MNIST", "--download", "ossci-datasets"]),
    ("svhn", ["test_32x32.mat", "svhn", "--download", "ufldl.stanford.edu"]),
    ("cifar10", ["test_batch", "batches.meta", "cifar-10-batches-py", "cifar-10-python.tar.gz"]),
    ("cifar100", ["test", "meta", "cifar-100-python", "cifar-100-python.tar.gz"]),
    ("imagenet", ["meta.bin", "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_val.tar", "image-net.org"]),
])
def test_missing_dataset_names_expected_files_and_source(tmp_path, name, expected):
    with pytest.raises(DatasetError) as info:
        load_split(name, "test", tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "PIXELDP_BENCH_DATA" in message
    for fragment in expected:
        assert fragment in message


def test_missing_dataset_via_cli_is_one_message_not_a_traceback(tmp_path, capsys):
    profile = tmp_path / "one.toml"
    profile.write_text('[run]\ndatasets = ["cifar10"]\nexamples = 2\n'
                       '[defenses.undefended]\nparams = { arch = "resnet_small", steps = 1 }\n')
    code = main(["run", str(profile), "--data-root", str(tmp_path / "empty"), "--results", str(tmp_path / "res"),
                 "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.count("\n") == 1
    assert "cifar-10-batches-py" in err and str(tmp_path / "empty") in err


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, relative", [
    ("mnist", "MNIST/raw/t10k-images-idx3-ubyte"),
    ("mnist", "MNIST/raw/t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py/test_batch"),
    ("cifar100", "cifar-100-python/test"),
    ("svhn", "svhn/test_32x32.mat"),
])
def test_truncated_file_is_named(tmp_path, name, relative):
    WRITERS[name](tmp_path)
    _truncate(tmp_path / relative)
    with pytest.raises(DatasetError) as info:
        load_split(name, "test", tmp_path)
    assert str(tmp_path / relative) in str(info.value) and "corrupt or truncated" in str(info.value)


def test_garbage_cifar_meta_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="batches.meta"):
        load_split("cifar10", "test", tmp_path)


def test_truncated_imagenet_image_and_meta_are_named(tmp_path):
    write_imagenet(tmp_path)
    image = sorted((tmp_path / "imagenet" / "val").rglob("*.JPEG"))[0]
    _truncate(image)
    test = load_split("imagenet", "test", tmp_path)
    with pytest.raises(DatasetError, match=image.name):
        gather(test, torch.arange(len(test)))
    (tmp_path / "imagenet" / "meta.bin").write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match="meta.bin"):
        load_split("imagenet", "test", tmp_path)


def test_download_is_passed_to_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):
        calls.append(self.root)
        write_mnist(Path(self.root))

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    x, _ = _everything(load_split("mnist", "test", tmp_path, download=True))
    assert calls == [str(tmp_path)] and x.shape == (20, 1, 28, 28)
    with pytest.raises(DatasetError, match="cannot be downloaded automatically"):
        load_split("imagenet", "test", tmp_path, download=True)


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELDP_BENCH_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert data_root() == (tmp_path / "env").resolve()
    monkeypatch.delenv("PIXELDP_BENCH_DATA")
    assert data_root().name == "datasets" and (data_root() / "README.md").exists()


def test_pad_crop_flip_takes_crops_of_the_padded_image():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pad_crop_flip(x, torch.Generator().manual_seed(1))
    again = pad_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.equal(out, again) and not torch.equal(out, x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        crops = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        straight = any(torch.equal(out[i], crop) for crop in crops)
        flipped = any(torch.equal(out[i], crop.flip(-1)) for crop in crops)
        assert straight or flipped
        flips += flipped and not straight
    assert 16 <= flips <= 48  # about half the images are mirrored


def test_horizontal_flip_mirrors_about_half():
    x = torch.rand(200, 3, 8, 8)
    out = horizontal_flip(x, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((mirrored | kept).all()) and 70 <= int(mirrored.sum()) <= 130
