"""The loaders on the real MNIST and Fashion-MNIST files, and one short real-MNIST cell through the CLI.

CI (.ci/run) fetches the md5-verified files and points PIXELDP_BENCH_REAL_MNIST and
PIXELDP_BENCH_REAL_FASHION_MNIST at their data root. Without a variable the tests skip (a
developer without the files); with it and the files missing they FAIL, so CI cannot pass silently.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli.commands import main
from bench.core.data import dataset_labels, gather, load_split, select_examples

# Published per-class counts (LeCun et al. 1998; Xiao et al. 2017), digits / classes 0..9.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
# The normalisation constants everyone uses: mean and std of the 60,000 training images' pixels in [0, 1].
MNIST_TRAIN_MEAN_STD = (0.1307, 0.3081)
FASHION_TRAIN_MEAN_STD = (0.2860, 0.3530)


def _root(variable: str, dataset: str) -> Path:
    """The data root named by `variable`; skip when unset, fail when set but the files are not there."""
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set (CI sets it after fetching real {dataset})")
    root = Path(value)
    folder = root / ("MNIST" if dataset == "mnist" else "FashionMNIST") / "raw"
    files = sorted(p.name for p in folder.glob("*-ubyte")) if folder.is_dir() else []
    assert len(files) == 4, f"{variable}={value} but {folder} holds {files}, not the four IDX files"
    return root


def _check_split(dataset, n: int, counts: list[int]) -> torch.Tensor:
    """Size, per-class counts, uint8 storage, shape and value range of one split; returns its labels."""
    labels = dataset_labels(dataset)
    assert len(dataset) == n and torch.bincount(labels, minlength=10).tolist() == counts
    assert dataset.images.dtype == torch.uint8 and tuple(dataset.images.shape) == (n, 1, 28, 28)
    x, y = dataset[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 28, 28) and isinstance(y, int)
    assert int(dataset.images.min()) == 0 and int(dataset.images.max()) == 255  # served as exactly 0.0 .. 1.0
    return labels


def _mean_std(dataset) -> tuple[float, float]:
    pixels = dataset.images.double().div_(255.0)
    return float(pixels.mean()), float(pixels.std())


def test_real_mnist_loads_whole():
    root = _root("PIXELDP_BENCH_REAL_MNIST", "mnist")
    train, test = load_split("mnist", "train", root), load_split("mnist", "test", root)
    _check_split(train, 60_000, MNIST_TRAIN_COUNTS)
    _check_split(test, 10_000, MNIST_TEST_COUNTS)
    assert len(train) + len(test) == 70_000
    mean, std = _mean_std(train)
    assert abs(mean - MNIST_TRAIN_MEAN_STD[0]) < 5e-4 and abs(std - MNIST_TRAIN_MEAN_STD[1]) < 5e-4
    # The first test digit is a 7, the first training digit a 5 (the files' order is kept).
    assert test[0][1] == 7 and train[0][1] == 5
    # The stratified subset the attack cells use: 1,000 = 100 per digit, sorted indices.
    chosen = select_examples(test, 1000, seed=0)
    _, y = gather(test, chosen)
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10 and bool((chosen[1:] > chosen[:-1]).all())


def test_real_fashion_mnist_loads_whole():
    root = _root("PIXELDP_BENCH_REAL_FASHION_MNIST", "fashion_mnist")
    train, test = load_split("fashion_mnist", "train", root), load_split("fashion_mnist", "test", root)
    _check_split(train, 60_000, [6000] * 10)
    _check_split(test, 10_000, [1000] * 10)
    mean, std = _mean_std(train)
    assert abs(mean - FASHION_TRAIN_MEAN_STD[0]) < 5e-4 and abs(std - FASHION_TRAIN_MEAN_STD[1]) < 5e-4
    # Zalando's first test image is an ankle boot (9), the first training image too.
    assert test[0][1] == 9 and train[0][1] == 9


# One real-MNIST cell: a small CNN trained for 500 steps on all 60,000 digits (~10 s on one core),
# then clean and PGD L-inf (20 steps) on 200 stratified test digits.
REAL_CELL = """
[run]
datasets = ["mnist"]
examples = 200
batch_size = 100
seed = 0
[defenses.undefended]
params = { arch = "cnn_small", steps = 500, batch_size = 64, lr = 1e-3 }
[attacks.pgd_linf]
against = "deterministic"
eps = [0.1, 0.3]
params = { steps = 20, restarts = 1 }
"""


def test_real_mnist_cell_through_the_cli(tmp_path, capsys):
    root = _root("PIXELDP_BENCH_REAL_MNIST", "mnist")
    profile = tmp_path / "real.toml"
    profile.write_text(REAL_CELL)
    results = tmp_path / "results"
    code = main(["run", str(profile), "--data-root", str(root), "--results", str(results), "--quiet",
                 "--device", "cpu", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    (run_dir,) = [p for p in results.iterdir() if p.is_dir() and p.name.startswith("real-")]
    frame = pd.read_csv(run_dir / "accuracy_under_attack.csv")
    (clean,), (weak,), (strong,) = (list(frame.query(q).itertuples()) for q in
                                    ("attack == 'clean'", "attack == 'pgd_linf' and eps == 0.1",
                                     "attack == 'pgd_linf' and eps == 0.3"))
    assert clean.dataset == "mnist" and clean.n == weak.n == strong.n == 200
    # Measured: 98.5% clean (197/200) (a CNN this short already beats the 5,000-digit smoke set); an
    # undefended network falls under PGD, completely at the L-inf 0.3 of Madry et al.
    assert clean.accuracy >= 0.95 and clean.ci_low <= clean.accuracy <= clean.ci_high
    assert weak.accuracy < clean.accuracy - 0.2
    assert strong.accuracy <= 0.02
