"""The model zoo: pinned SHA-256 refusals, lookup (--weights-root, $PIXELDP_BENCH_WEIGHTS, cache, --download), keys.

Mechanism tests use a stand-in entry (random weights of the released network, registered for the test). With
PIXELDP_BENCH_WEIGHTS naming the folder of the released files (CI: ../shared/data/weights) and
PIXELDP_BENCH_REAL_MNIST a data root, the real checkpoints are checked too; with a variable set and its files
missing the tests FAIL, so CI cannot pass silently.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

import bench.core.zoo as zoo
from bench.cli.commands import main
from bench.profile.config import ConfigError, parse_profile
from bench.core.data import gather, load_split, select_examples
from bench.execution.runner import keyed
from bench.core.registry import DATASETS, DEFENSES
from bench.core.weights import WeightsError, file_sha256
from defenses.convex.models import wong2018_net

REAL_WEIGHTS = os.environ.get(zoo.ENV)  # read before the autouse fixture clears it for the mechanism tests
PARAMS = 'steps = 0, eps = 0.1, bound = "wong", input_box = false, radius_max = 0.1, bisection_steps = 0'


def profile_text(weights: str = "zoo:test-zoo", dataset: str = "mnist5k", extra: str = "") -> str:
    return f'''
[run]
datasets = ["{dataset}"]
examples = 20
seed = 0
thresholds = [0.0, 0.1]
[defenses.released]
defense = "wong_kolter"
params = {{ weights = "{weights}", {PARAMS}{extra} }}
'''


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real weights folder or download cache leaks into a test: both point into tmp_path."""
    monkeypatch.delenv(zoo.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def entry(tmp_path, monkeypatch) -> zoo.ZooEntry:
    """A zoo entry 'test-zoo' on mnist5k whose file (random weights of the released network) is in tmp_path/source."""
    source = tmp_path / "source" / "test_zoo.pth"
    source.parent.mkdir()
    torch.manual_seed(0)
    torch.save(wong2018_net().state_dict(), source)
    fake = dataclasses.replace(zoo.ZOO["wong2018-mnist"], name="test-zoo", file=source.name, dataset="mnist5k",
                               sha256=file_sha256(source), url=source.as_uri())
    monkeypatch.setitem(zoo.ZOO, fake.name, fake)
    return fake


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def run(tmp_path, text: str, *flags: str) -> int:
    path = tmp_path / "zoo.toml"
    path.write_text(text)
    return main(["run", str(path), "--results", str(tmp_path / "results"), "--quiet", "--threads", "1", *flags])


def test_a_tampered_copy_is_refused_naming_the_file_both_hashes_and_the_fix(entry, tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(tmp_path / "source" / entry.file, folder / entry.file)
    flip_a_byte(folder / entry.file)
    assert run(tmp_path, profile_text(), "--weights-root", str(folder)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[defenses.released]" in err
    for fragment in (str(folder / entry.file), entry.sha256, file_sha256(folder / entry.file), "--download",
                     entry.url):
        assert fragment in err
    assert not (tmp_path / "results").exists()  # refused before any run folder or store is written


def test_found_through_the_environment_variable_and_weights_root_wins(entry, tmp_path, monkeypatch):
    source = tmp_path / "source"
    monkeypatch.setenv(zoo.ENV, str(source))
    assert zoo.locate(entry) == source / entry.file
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(source / entry.file, other / entry.file)
    assert zoo.locate(entry, root=other) == other / entry.file  # --weights-root before $PIXELDP_BENCH_WEIGHTS
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=str(empty)):  # and it replaces the variable, as --data-root does
        zoo.locate(entry, root=empty)


def test_a_run_certifies_the_file_it_found_and_keys_it_by_its_hash(entry, tmp_path, capsys):
    assert run(tmp_path, profile_text(), "--weights-root", str(tmp_path / "source")) == 0
    frame = next((tmp_path / "results").glob("zoo-*/published_vs_measured.csv")).read_text()
    assert "test-zoo" in frame and "plain ball" in frame
    config = next((tmp_path / "results").glob("zoo-*/config.json")).read_text()
    assert entry.sha256 in config and str(tmp_path / "source" / entry.file) in config


def test_a_missing_file_says_where_it_looked_and_every_way_to_provide_it(entry, tmp_path, capsys):
    assert run(tmp_path, profile_text()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for fragment in (entry.file, str(tmp_path / "cache" / "pixeldp-bench" / "zoo"), "--weights-root",
                     "$PIXELDP_BENCH_WEIGHTS", "--download", entry.url):
        assert fragment in err
    # With --download and no network the same ways are named, after the download's failure.
    broken = dataclasses.replace(entry, url=(tmp_path / "nowhere.pth").as_uri())
    with pytest.raises(WeightsError) as info:
        zoo.locate(broken, download=True)
    message = str(info.value)
    assert "downloading" in message and "--weights-root" in message and "$PIXELDP_BENCH_WEIGHTS" in message
    assert not list((tmp_path / "cache" / "pixeldp-bench" / "zoo").glob("*"))  # nothing half-written is kept


def test_download_verifies_the_hash_then_the_cache_serves_offline(entry, tmp_path):
    # The default downloader (torch.hub) on a file:// URL: the real code path, no network.
    path = zoo.locate(entry, download=True)
    assert path == tmp_path / "cache" / "pixeldp-bench" / "zoo" / entry.file and file_sha256(path) == entry.sha256
    assert zoo.locate(entry) == path  # found offline afterwards, without --download
    path.unlink()

    def altered(url: str, destination: str) -> None:
        shutil.copy(url.removeprefix("file://"), destination)
        flip_a_byte(Path(destination))

    with pytest.raises(WeightsError, match="expected " + entry.sha256) as info:
        zoo.locate(entry, download=True, fetch=altered)
    assert "the download was deleted" in str(info.value)
    assert not list(path.parent.glob("*"))


def test_every_load_verifies_the_file_again(entry, tmp_path):
    """A file altered after the run was checked is refused when a cell loads it (bench.core.defense)."""
    import argparse

    from bench.profile.preflight import check_inputs

    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(tmp_path / "source" / entry.file, folder / entry.file)
    profile = check_inputs(parse_profile(profile_text(), "zoo"), argparse.Namespace(
        profile="zoo", data_root=None, download=False, weights_root=str(folder)))
    cell = profile.cells[0]
    assert cell.defense_params["weights"] == str(folder / entry.file)
    assert cell.defense_params["weights_sha256"] == entry.sha256
    flip_a_byte(folder / entry.file)
    defense = DEFENSES.get(cell.defense)(DATASETS.get(cell.dataset), **cell.defense_params)
    with pytest.raises(WeightsError, match="changed since"):
        defense.starting_model()


def test_the_pinned_hash_is_in_the_cell_key(entry, monkeypatch):
    (key, cell), = keyed(parse_profile(profile_text(), "zoo").cells)
    assert cell.defense_params["weights_sha256"] == entry.sha256
    assert cell.defense_params["factory"] == zoo.WONG_NET
    monkeypatch.setitem(zoo.ZOO, entry.name, dataclasses.replace(entry, sha256="0" * 64))
    (other, _), = keyed(parse_profile(profile_text(), "zoo").cells)
    assert other != key  # another released file: never the old cells


@pytest.mark.parametrize(("text", "fragment"), [
    (profile_text("zoo:nope"), "unknown zoo model 'nope'; the zoo has wong2018-mnist"),
    (profile_text("zoo:wong2018-mnist"), "trained on mnist, not mnist5k"),
    (profile_text(extra=', arch = "wk_small"'), "remove arch"),
])
def test_zoo_parameters_are_checked_when_the_profile_is_read(entry, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_profile(text, "zoo")


def test_list_zoo_prints_every_entry_with_its_numbers_and_whether_it_is_here(entry, tmp_path, capsys):
    assert main(["list", "--zoo", "--weights-root", str(tmp_path / "source")]) == 0
    out = capsys.readouterr().out
    for name, published in (("wong2018-mnist", "clean error 1.80%, robust error bound 5.82%"),
                            ("wong2018-fashion-mnist", "clean error 21.73%, robust error bound 34.53%"),
                            ("wong2018-svhn", "robust error bound 40.7%")):
        assert name in out and published in out
    assert f"found {tmp_path / 'source' / entry.file}" in out and entry.sha256[:12] in out
    assert "github.com/locuslab/convex_adversarial/raw/master/models/mnist.pth" in out and "MIT" in out
    assert "not found" in out and "plain ball" in out


def _real(name: str) -> Path:
    """The released file `name` from $PIXELDP_BENCH_WEIGHTS: skip when unset, fail when set but absent."""
    if not REAL_WEIGHTS:
        pytest.skip(f"{zoo.ENV} is not set (CI points it at ../shared/data/weights)")
    path = Path(REAL_WEIGHTS) / zoo.ZOO[name].file
    assert path.is_file(), f"{zoo.ENV}={REAL_WEIGHTS} but {path} is missing"
    return path


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_the_released_files_match_their_pins_and_a_flipped_byte_does_not(name, tmp_path):
    path = _real(name)
    assert zoo.locate(zoo.ZOO[name], root=path.parent) == path.resolve()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(path, copy / path.name)
    flip_a_byte(copy / path.name)
    with pytest.raises(WeightsError, match=f"expected {zoo.ZOO[name].sha256}"):
        zoo.locate(zoo.ZOO[name], root=copy)


def test_the_released_mnist_model_classifies_real_digits(tmp_path):
    path = _real("wong2018-mnist")
    root = os.environ.get("PIXELDP_BENCH_REAL_MNIST")
    if not root:
        pytest.skip("PIXELDP_BENCH_REAL_MNIST is not set (CI sets it after fetching real MNIST)")
    params = zoo.expand({"weights": "zoo:wong2018-mnist", "steps": 0}, "mnist") | {"weights": str(path)}
    defense = DEFENSES.get("wong_kolter")(DATASETS.get("mnist"), **params)
    defense.attach(defense.starting_model())
    test = load_split("mnist", "test", Path(root))
    x, y = gather(test, select_examples(test, 500, seed=0))
    accuracy = float((defense.predict(x) == y).float().mean())
    assert accuracy >= 0.97  # published: 1.80% error on the full test set
