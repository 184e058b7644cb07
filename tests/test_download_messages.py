"""Missing-file and failed-download messages fit whether or not --download was given (datasets and the zoo)."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import urllib.error

import pytest
import torchvision

import bench.core.zoo as zoo
from bench.core.atomic import OutputWriteError
from bench.core.data import DatasetError, load_split
from bench.core.weights import WeightsError

# name -> the torchvision class whose download() the loader calls, and a fragment of the by-hand instructions
DATASETS = {"mnist": (torchvision.datasets.MNIST, "ossci-datasets"),
            "fashion_mnist": (torchvision.datasets.FashionMNIST, "fashion-mnist"),
            "svhn": (torchvision.datasets.SVHN, "ufldl.stanford.edu"),
            "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-python.tar.gz"),
            # bench's CIFAR-100 class derives from its CIFAR-10 one, so from torchvision's CIFAR10
            "cifar100": (torchvision.datasets.CIFAR10, "cifar-100-python.tar.gz")}
OFFLINE = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def message(name, tmp_path, monkeypatch, download: bool, failure: BaseException | None = None) -> str:
    """The DatasetError of loading `name` from an empty root, torchvision's download raising `failure` (or no-op)."""
    cls, _ = DATASETS[name]

    def fake_download(self):
        if failure is not None:
            raise failure

    monkeypatch.setattr(cls, "download", fake_download)
    with pytest.raises(DatasetError) as info:
        load_split(name, "test", tmp_path, download=download)
    return str(info.value)


@pytest.mark.parametrize("name", DATASETS)
def test_without_download_the_message_offers_it(name, tmp_path, monkeypatch):
    text = message(name, tmp_path, monkeypatch, download=False)
    assert "Run with --download" in text and DATASETS[name][1] in text


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("failure", [OFFLINE, None], ids=["offline", "nothing-fetched"])
def test_after_a_failed_download_the_message_does_not_offer_it_again(name, failure, tmp_path, monkeypatch):
    text = message(name, tmp_path, monkeypatch, download=True, failure=failure)
    assert "--download" not in text, text
    assert "Check the network connection and run again, or download" in text and DATASETS[name][1] in text
    if failure is not None:
        assert "download failed (URLError" in text and "name resolution" in text


def test_a_full_disk_during_a_download_says_so(tmp_path, monkeypatch):
    text = message("mnist", tmp_path, monkeypatch, download=True,
                   failure=OSError(errno.ENOSPC, "No space left on device"))
    assert "No space left on device" in text and "Free disk space" in text and "network" not in text


# ----------------------------------------------------------------------------------------------- the zoo
@pytest.fixture
def entry(tmp_path, monkeypatch) -> zoo.ZooEntry:
    """A zoo entry whose released file is `payload` at a URL that `fetch` below serves; an empty cache."""
    monkeypatch.delenv(zoo.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return dataclasses.replace(zoo.ZOO["wong2018-mnist"], name="test-zoo", file="test_zoo.pth",
                               sha256=hashlib.sha256(b"payload").hexdigest(), url="https://example.org/test_zoo.pth")


def test_zoo_without_download_offers_it(entry, tmp_path):
    with pytest.raises(WeightsError) as info:
        zoo.locate(entry, root=tmp_path / "weights")
    assert f"fetch it from {entry.url} with --download" in str(info.value)


def test_zoo_after_a_failed_download_does_not_offer_it_again(entry, tmp_path):
    def offline(url, destination):
        raise OFFLINE

    with pytest.raises(WeightsError) as info:
        zoo.locate(entry, root=tmp_path / "weights", download=True, fetch=offline)
    text = str(info.value)
    assert f"downloading {entry.url} failed (URLError" in text and "check the network connection" in text
    assert "with --download" not in text and "--weights-root DIR" in text and entry.url in text
    assert not list(zoo.cache_folder().iterdir())


def test_zoo_download_altered_is_deleted_and_says_so(entry, tmp_path):
    def altered(url, destination):
        with open(destination, "wb") as handle:
            handle.write(b"something else")

    with pytest.raises(WeightsError) as info:
        zoo.locate(entry, root=tmp_path / "weights", download=True, fetch=altered)
    text = str(info.value)
    assert "the file downloaded from" in text and "the download was deleted" in text and "with --download" not in text
    assert not list(zoo.cache_folder().iterdir())


def test_zoo_download_onto_a_full_disk_names_the_file(entry, tmp_path):
    def half_then_full(url, destination):
        with open(destination, "wb") as handle:
            handle.write(b"pay")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputWriteError) as info:
        zoo.locate(entry, root=tmp_path / "weights", download=True, fetch=half_then_full)
    assert str(info.value) == (f"cannot write {zoo.cache_folder() / entry.file} (No space left on device); free disk "
                               f"space and run again, or put {entry.file} in a folder given with --weights-root DIR")
    assert not list(zoo.cache_folder().iterdir())


def test_zoo_download_success_lands_whole(entry, tmp_path):
    def fetch(url, destination):
        with open(destination, "wb") as handle:
            handle.write(b"payload")

    path = zoo.locate(entry, root=tmp_path / "weights", download=True, fetch=fetch)
    assert path.read_bytes() == b"payload" and [p.name for p in zoo.cache_folder().iterdir()] == [entry.file]
