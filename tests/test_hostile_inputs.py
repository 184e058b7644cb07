"""Corrupt files, hostile names, full disks, read-only folders and careless values: one line, exit 2, nothing lost."""
import errno
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import bench.core.atomic
from bench.core.atomic import OutputWriteError
from bench.execution.cache import ModelCache
from bench.cli.commands import main
from bench.execution.store import Store
from defenses.pixeldp.certify import cohen_radius, pixeldp_gaussian_radius, pixeldp_laplace_radius, renyi_radius

TINY = """
[run]
examples = 20
seed = 0
batch_size = 10
[defenses.plain]
defense = "undefended"
params = { steps = 30, batch_size = 32 }
[attacks.pgd_linf]
eps = [0.1, 0.3]
params = { steps = 3 }
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def one_line_error(capsys, *args) -> str:
    """Run the CLI, require exit 2 and exactly one line on stderr; return that line."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- careless values
@pytest.mark.parametrize("old, new, message", [
    ("examples = 20", 'examples = "abc"', "run.examples must be a whole number"),
    ("examples = 20", "examples = 2.7", "run.examples must be a whole number"),
    ("batch_size = 10", "batch_size = 0", "run.batch_size must be a whole number >= 1"),
    ("params = { steps = 3 }", 'params = { steps = "five" }', "parameter 'steps' = 'five' should be a int"),
    ("params = { steps = 30, batch_size = 32 }", 'params = { steps = "many" }', "parameter 'steps' = 'many'"),
    ("eps = [0.1, 0.3]", "eps = []", "[attacks.pgd_linf] yields no cell"),
    ("eps = [0.1, 0.3]", "eps = [0.1]\nagainst = []", "[attacks.pgd_linf] yields no cell"),
    ("eps = [0.1, 0.3]", 'eps = [0.1]\nagainst = "randomized"', "[attacks.pgd_linf] yields no cell"),
    ("seed = 0", 'seed = 0\nname = "/abs/path"', "run name '/abs/path' must be a plain name"),
    ("seed = 0", 'seed = 0\nname = "../../x"', "run name '../../x' must be a plain name"),
    ("examples = 20", "examples = 20000", "the split has only 1000"),
])
def test_bad_values_are_one_line_errors(old, new, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.replace(old, new))
    err = one_line_error(capsys, "run", path, "--results", tmp_path / "r", "--quiet")
    assert message in err
    assert not any((tmp_path / "r").glob("bad-*"))  # nothing computed under a bad name or value
    assert not (tmp_path / "x").exists() and not Path("/abs/path").exists()


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--examples", "0"], "examples must be a whole number >= 1"),
    (["--max-draws", "0"], "--max-draws must be at least 1"),
])
def test_bad_flags_are_one_line_errors(args, message, tiny, tmp_path, capsys):
    assert message in one_line_error(capsys, "run", tiny, "--results", tmp_path / "r", *args)


def test_a_directory_given_as_a_profile(tmp_path, capsys):
    assert "is a directory" in one_line_error(capsys, "run", tmp_path, "--results", tmp_path / "r")


def test_max_steps_zero_warns_that_models_are_untrained(tiny, tmp_path, capsys):
    assert main(["run", str(tiny), "--results", str(tmp_path / "r"), "--quiet", "--max-steps", "0"]) == 0
    assert "trains nothing: every model is evaluated untrained" in capsys.readouterr().err


# ----------------------------------------------------------------------------- store and results folder
def test_random_bytes_store_is_one_line_and_untouched(tiny, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    junk = os.urandom(8192)
    (results / "store.sqlite").write_bytes(junk)
    for args in (["run", tiny, "--results", results, "--quiet"], ["report", "x", "--results", results],
                 ["compare", "a", "b", "--results", results], ["run", tiny, "--results", results, "--dry-run"]):
        err = one_line_error(capsys, *args)
        assert str(results / "store.sqlite") in err
    assert (results / "store.sqlite").read_bytes() == junk


def test_results_that_is_a_file(tiny, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("not a folder")
    assert "is a file, not a folder" in one_line_error(capsys, "run", tiny, "--results", target)
    assert target.read_text() == "not a folder"


def _make_read_only(folder: Path) -> bool:
    """chmod a-w (or, for root, chattr +i); True when writing into `folder` is really refused."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return bool(shutil.which("chattr")) and subprocess.run(["chattr", "+i", str(folder)],
                                                           capture_output=True).returncode == 0


def _make_writable(folder: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_read_only_results_still_report_and_compare(tiny, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", str(tiny), "--results", str(results), "--quiet"]) == 0
    run_dir = next(d for d in results.iterdir() if d.name.startswith("tiny-"))
    before = (results / "store.sqlite").read_bytes()
    capsys.readouterr()
    if not _make_read_only(results):
        _make_writable(results)
        pytest.skip("this machine cannot make a folder read-only (root without chattr)")
    try:
        assert main(["report", str(run_dir)]) == 0
        assert "Accuracy under attack" in capsys.readouterr().out
        assert main(["compare", str(run_dir), str(run_dir)]) == 0
        assert "not writable" in one_line_error(capsys, "run", tiny, "--results", results)
    finally:
        _make_writable(results)
    assert (results / "store.sqlite").read_bytes() == before


def test_disk_full_in_the_store_keeps_finished_cells_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    assert main(["run", str(tiny), "--results", str(results), "--quiet", "--examples", "10"]) == 0
    capsys.readouterr()
    original = Store._connect

    def tiny_disk(self, memory):
        conn = original(self, memory)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages + 1}")  # the next cells cannot fit
        return conn

    monkeypatch.setattr(Store, "_connect", tiny_disk)
    err = one_line_error(capsys, "run", tiny, "--results", results, "--quiet")
    assert "free disk space" in err and "resumes" in err
    monkeypatch.setattr(Store, "_connect", original)
    conn = sqlite3.connect(results / "store.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # The first run's cells survive, and the second run's that fitted in the pages' free space before it filled.
    stored = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    assert 3 <= stored < 6
    conn.close()
    assert main(["run", str(tiny), "--results", str(results), "--quiet"]) == 0
    assert f"{6 - stored} cell(s) computed, {stored - 3} reused" in capsys.readouterr().out


def test_disk_full_while_saving_a_model(tiny, tmp_path, capsys, monkeypatch):
    sync = bench.core.atomic._sync

    def full(path):
        if ".safetensors." in path.name:  # the model's temporary file: the disk fills as it is flushed
            raise OSError(errno.ENOSPC, "No space left on device")
        sync(path)

    monkeypatch.setattr(bench.core.atomic, "_sync", full)
    err = one_line_error(capsys, "run", tiny, "--results", tmp_path / "r", "--quiet")
    assert ".safetensors (No space left on device); free disk space" in err and "kept in the store" in err
    assert not [p for p in (tmp_path / "r").rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert main(["run", str(tiny), "--results", str(tmp_path / "r"), "--quiet"]) == 0


# ----------------------------------------------------------------------------- model cache integrity
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.bn = nn.BatchNorm1d(4)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cached_model_is_set_aside_and_never_used(damage, tmp_path):
    messages = []
    cache = ModelCache(tmp_path, log=messages.append)
    model = Small()
    path = cache.path({"dataset": "d", "defense": "x"}, "code")
    cache.save(model, path, {"dataset": "d"}, {"train_steps": 1})
    assert cache.load(Small(), path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-20] ^= 0xFF  # a byte inside the last tensor
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    fresh = Small()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert not cache.load(fresh, path)
    assert not path.exists() and len(list(tmp_path.glob(path.name + ".corrupt-*"))) == 1
    assert messages and str(path) in messages[0] and "retraining" in messages[0]
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_corrupt_model_in_a_run_is_retrained_to_the_same_weights(tiny, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", str(tiny), "--results", str(results), "--quiet"]) == 0
    model = next((results / "models").glob("*.safetensors"))
    good = {k: v.clone() for k, v in load_file(str(model)).items()}  # load_file maps the file: copy it
    damaged = bytearray(model.read_bytes())
    damaged[-8] ^= 0x55
    model.write_bytes(bytes(damaged))
    (results / "store.sqlite").unlink()  # force the cells to be computed again
    capsys.readouterr()
    assert main(["run", str(tiny), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "is unusable" in out and "training plain" in out
    again = load_file(str(model))  # retrained (seeded) to exactly the original weights
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)


def test_cache_errors_name_the_file(tmp_path):
    cache = ModelCache(tmp_path / "models")
    (tmp_path / "models" / "x.safetensors").mkdir(parents=True)  # a folder in the model's place: the save fails
    (tmp_path / "models" / "x.safetensors" / "keep").touch()
    with pytest.raises(OutputWriteError, match="x.safetensors"):
        cache.save(Small(), tmp_path / "models" / "x.safetensors", {}, {})
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["x.safetensors"]  # no temporary file left


# ----------------------------------------------------------------------------- incomplete runs
def test_incomplete_runs_are_marked_and_compare_refuses_them(tiny, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", str(tiny), "--results", str(results), "--quiet"]) == 0
    complete = next(d for d in results.iterdir() if d.name.startswith("tiny-"))
    store = Store(results / "store.sqlite")
    cells = store.run_cells(complete.name)
    store.start_run("tiny-killed", "tiny", store.run_info(complete.name)["settings"], {}, cells + [
        ("f" * 20, cells[-1][1].__class__(**{**cells[-1][1].config(), "eps": 0.25}))])
    store.close()
    (results / "tiny-killed").mkdir()
    capsys.readouterr()
    assert main(["report", str(results / "tiny-killed")]) == 0
    assert capsys.readouterr().out.startswith("INCOMPLETE RUN: 1 of 4 cell(s)")
    err = one_line_error(capsys, "compare", complete, results / "tiny-killed")
    assert "new run tiny-killed is incomplete: 1 cell(s) missing (mnist5k/plain/pgd_linf@0.25)" in err
    assert "incomplete" in one_line_error(capsys, "baseline", results / "tiny-killed")
    assert main(["compare", str(complete), str(complete)]) == 0


# ----------------------------------------------------------------------------- certificates at the edges
def test_pixeldp_radius_at_the_most_confident_estimate():
    assert pixeldp_gaussian_radius([1.0], [0.0], L=0.1)[0] == pytest.approx(0.1447, abs=1e-4)
    assert pixeldp_gaussian_radius([1.0], [0.0], L=0.3)[0] == pytest.approx(0.4341, abs=1e-4)
    assert pixeldp_gaussian_radius([0.99], [0.001], L=0.1)[0] == pytest.approx(0.1439, abs=1e-4)


GRID = np.concatenate([[0.0, 1e-12, 1e-6], np.linspace(0.001, 0.999, 41), [1 - 1e-6, 1.0]])
CERTIFIERS = {
    "pixeldp": lambda lb, ub: pixeldp_gaussian_radius(lb, ub, L=0.3),
    "laplace": lambda lb, ub: pixeldp_laplace_radius(lb, ub, L=0.3),
    "cohen": lambda lb, ub: cohen_radius(lb, sigma=0.5),
    "renyi": lambda lb, ub: renyi_radius(lb, ub, sigma=0.5),
}


@pytest.mark.parametrize("name", sorted(CERTIFIERS))
def test_radius_never_falls_as_p_lb_rises_or_p_ub_falls(name):
    lb, ub = np.meshgrid(GRID, GRID, indexing="ij")  # lb[i, j] = GRID[i], ub[i, j] = GRID[j]
    radius = CERTIFIERS[name](lb.ravel(), ub.ravel()).reshape(lb.shape)
    assert not np.isnan(radius).any() and (radius >= 0).all()
    rises_with_lb = np.diff(radius, axis=0)
    falls_with_ub = np.diff(radius, axis=1)
    finite = np.isfinite(radius[1:, :]) & np.isfinite(radius[:-1, :])
    assert (rises_with_lb[finite] >= -1e-12).all()
    finite = np.isfinite(radius[:, 1:]) & np.isfinite(radius[:, :-1])
    assert (falls_with_ub[finite] <= 1e-12).all()
    assert radius[-1, 0] > 0 and radius[0, :].max() == 0  # certain top class certifies; p_lb = 0 never does


def test_a_cell_with_missing_records_is_never_stored(tiny, tmp_path, capsys, monkeypatch):
    from bench.execution.runner import Runner

    real = Runner.run_cell

    def drops_one(self, cell, key):
        records, info = real(self, cell, key)
        return records[:-1], info

    monkeypatch.setattr(Runner, "run_cell", drops_one)
    err = one_line_error(capsys, "run", tiny, "--results", tmp_path / "r", "--quiet")
    assert "produced 19 records for 20 examples; it was not stored" in err
    conn = sqlite3.connect(tmp_path / "r" / "store.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # released for the next run
    conn.close()
    monkeypatch.setattr(Runner, "run_cell", real)
    assert main(["run", str(tiny), "--results", str(tmp_path / "r"), "--quiet"]) == 0
    assert "3 cell(s) computed, 0 reused" in capsys.readouterr().out
