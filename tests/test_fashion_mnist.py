"""Fashion-MNIST read from tiny IDX files in torchvision's FashionMNIST/raw/ layout: pixels, labels, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from dataset_files import write_fashion_mnist, write_idx, write_mnist

from bench.cli.commands import main
from bench.core.data import DatasetError, gather, get_spec, load_split

RAW = Path("FashionMNIST") / "raw"


def _everything(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return gather(dataset, torch.arange(len(dataset)))


@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_files_round_trip_exactly(tmp_path, split):
    expected_x, expected_y = write_fashion_mnist(tmp_path, classes=[0, 3, 9], per_class=3)[split]
    x, y = _everything(load_split("fashion_mnist", split, tmp_path))
    assert x.dtype == torch.float32 and tuple(x.shape) == (9, 1, 28, 28)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert np.array_equal(torch.round(x * 255).to(torch.uint8).numpy(), expected_x)
    assert y.dtype == torch.int64 and y.tolist() == expected_y.tolist()
    assert (torch.round(x[:, 0, 0, 0] * 255) == 10 * y + 3).all()


def test_spec_and_listing():
    spec = get_spec("fashion_mnist")
    assert (spec.shape, spec.classes, spec.splits, spec.default_model) == ((1, 28, 28), 10, ("train", "test"),
                                                                            "mnist_cnn")
    assert spec.augment is None


def test_mnist_files_are_not_fashion_mnist(tmp_path):
    """The two datasets live in separate folders: MNIST's files never stand in for Fashion-MNIST's."""
    write_mnist(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_split("fashion_mnist", "test", tmp_path)
    message = str(info.value)
    assert str(tmp_path / RAW) in message and "FashionMNIST" in message


def test_missing_files_are_listed_with_source(tmp_path):
    write_fashion_mnist(tmp_path)
    (tmp_path / RAW / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError) as info:
        load_split("fashion_mnist", "test", tmp_path)
    message = str(info.value)
    assert "missing: t10k-labels-idx1-ubyte" in message and "'fashion_mnist'" in message
    for fragment in ("--download", "fashion-mnist.s3-website", "PIXELDP_BENCH_DATA", "t10k-images-idx3-ubyte"):
        assert fragment in message
    assert "train-images-idx3-ubyte" not in message  # evaluating needs only the test split's files


@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_truncated_file_is_named(tmp_path, name):
    write_fashion_mnist(tmp_path)
    path = tmp_path / RAW / name
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetError) as info:
        load_split("fashion_mnist", "test", tmp_path)
    assert str(path) in str(info.value) and "corrupt or truncated" in str(info.value)


def test_wrong_magic_is_named(tmp_path):
    """A file that is not IDX at all (e.g. still gzipped under the gunzipped name) is named as corrupt."""
    write_fashion_mnist(tmp_path)
    path = tmp_path / RAW / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        load_split("fashion_mnist", "test", tmp_path)


def test_label_count_mismatch_is_named(tmp_path):
    write_fashion_mnist(tmp_path, per_class=2)
    write_idx(tmp_path / RAW / "t10k-labels-idx1-ubyte", np.arange(7, dtype=np.uint8))
    with pytest.raises(DatasetError, match="7 labels for 20 images"):
        load_split("fashion_mnist", "test", tmp_path)


def test_label_outside_the_ten_classes_is_named(tmp_path):
    write_fashion_mnist(tmp_path, per_class=1)
    write_idx(tmp_path / RAW / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12], dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.*labels outside 0\.\.9"):
        load_split("fashion_mnist", "test", tmp_path)


def test_download_goes_to_torchvision_fashion_mnist(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):
        calls.append((type(self).__name__, self.root))
        write_fashion_mnist(Path(self.root), per_class=1)

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    x, y = _everything(load_split("fashion_mnist", "test", tmp_path, download=True))
    assert calls == [("FashionMNIST", str(tmp_path))] and x.shape == (10, 1, 28, 28) and y.tolist() == list(range(10))


def test_missing_dataset_via_cli_is_one_line(tmp_path, capsys):
    profile = tmp_path / "one.toml"
    profile.write_text('[run]\ndatasets = ["fashion_mnist"]\nexamples = 2\n'
                       '[defenses.undefended]\nparams = { arch = "cnn_small", steps = 1 }\n')
    code = main(["run", str(profile), "--data-root", str(tmp_path / "empty"), "--results", str(tmp_path / "res"),
                 "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "FashionMNIST" in err and str(tmp_path / "empty") in err


def test_a_run_on_fashion_mnist_end_to_end(tmp_path, capsys):
    write_fashion_mnist(tmp_path / "data", per_class=2)
    profile = tmp_path / "fm.toml"
    profile.write_text('[run]\ndatasets = ["fashion_mnist"]\nexamples = 10\nbatch_size = 10\n'
                       '[defenses.undefended]\nparams = { arch = "cnn_small", steps = 3, batch_size = 8 }\n')
    results = tmp_path / "res"
    code = main(["run", str(profile), "--data-root", str(tmp_path / "data"), "--results", str(results),
                 "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    (run_dir,) = [p for p in results.iterdir() if p.is_dir() and p.name.startswith("fm-")]
    clean = pd.read_csv(run_dir / "accuracy_under_attack.csv").query("attack == 'clean'").iloc[0]
    assert clean.dataset == "fashion_mnist" and clean.n == 10 and 0 <= clean.correct <= 10
