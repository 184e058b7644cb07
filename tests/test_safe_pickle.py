"""CIFAR batches are unpickled with a restricted unpickler: a file that names any other global is refused."""
import io
import os
import pickle

import numpy as np
import pytest
import torch
from dataset_files import write_cifar10

from bench.core.data import DatasetError, load_split, safe_pickle


class Exploit:
    """Unpickling this would call os.system."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_arrays_and_containers_round_trip():
    batch = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [1, 2], "batch_label": "b"}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        loaded = safe_pickle.load(io.BytesIO(pickle.dumps(batch, protocol=protocol)))
        assert np.array_equal(loaded["data"], batch["data"]) and loaded["labels"] == [1, 2]


def test_code_execution_is_refused():
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system|refusing to load os.system"):
        safe_pickle.load(io.BytesIO(pickle.dumps({"data": Exploit()}, protocol=2)))


def test_malicious_cifar_batch_is_a_dataset_error(tmp_path):
    write_cifar10(tmp_path)
    assert len(load_split("cifar10", "test", tmp_path)) > 0
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": Exploit(), "labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match="test_batch"):
        load_split("cifar10", "test", tmp_path)


def test_cifar_images_keep_their_pixels(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")  # the test's own file, read to build the expectation
    dataset = load_split("cifar10", "test", tmp_path)
    first, label = dataset[0]
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    expected = torch.from_numpy(np.asarray(raw["data"][0], dtype=np.float32).reshape(3, 32, 32) / 255.0)
    assert torch.allclose(first, expected) and int(label) == raw["labels"][0]
