"""`--executor ray` on a real local Ray cluster: same records as the local loop at 1 and 2 workers, a killed
worker's cell retried and stored once, a killed driver resumed; plus the settings' error lines."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.cli.commands import main
from bench.profile.config import ConfigError, parse_profile
from bench.execution.ray_executor import RaySettings, check_settings
from bench.execution.store import Store

REPO = Path(__file__).resolve().parents[1]
SUPPORT = REPO / "tests" / "ray_support"

PROFILE = """
[run]
name = "raytiny"
datasets = ["mnist5k"]
examples = 20
seed = 3
batch_size = 10
overhead_draws = [1, 10]
plugins = ["ray_fault_plugin"]

[defenses.undefended]
params = { arch = "cnn_small", steps = 30, batch_size = 32 }

[defenses.pixeldp.params]
arch = "cnn_small"
L = 0.1
parseval_iters = 5
steps = 30
batch_size = 32
draws_certify = 50
draws_attack = 20
draws_predict = 5

[attacks.pgd_linf]
against = "deterministic"
eps = [0.1]
params = { steps = 5 }

[attacks.faulty_pgd]
against = "deterministic"
eps = [0.2]
params = { steps = 5 }

[attacks.pgd_linf_eot]
against = "randomized"
eps = [0.1]
params = { steps = 3, draws = 3 }
"""
CELLS = 5  # 2 clean cells, pgd_linf and faulty_pgd on the undefended model, PGD-EOT on PixelDP

ray = pytest.importorskip("ray")  # in the test extra (tox); a plain install without [ray] skips


@pytest.fixture(autouse=True)
def private_tmpdir(monkeypatch):
    """Each test's runs get their own short TMPDIR: workers that cannot see the results folder keep models under
    $TMPDIR/pixeldp-bench-ray, and a model left there by another run (another test, or a run on other CPU kernels
    with the same cache key) would otherwise be loaded instead of trained. Short, because Ray puts its sockets
    there too (a Unix socket path has at most 107 characters)."""
    path = tempfile.mkdtemp(prefix="raytest-")
    monkeypatch.setenv("TMPDIR", path)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELDP_TEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(REPO), env.get("PYTHONPATH", "")])
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster needs no token file in $HOME
    return env | extra


def _run(profile: Path, results: Path, *args: str, quiet: bool = True, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bench", "run", str(profile), "--results", str(results), "--device", "cpu",
               *(["--quiet"] if quiet else []), *args]
    done = subprocess.run(command, cwd=REPO, env=_environment(**env), capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _records(results: Path) -> dict[str, list[tuple]]:
    """Cell key -> its records without the timing field, which no two runs share."""
    store = Store(results / "store.sqlite", readonly=True)
    try:
        keys = [key for key, _, _ in store.all_cells()]
        return {key: [dataclasses.replace(r, seconds=0.0) for r in store.records(key)] for key in keys}
    finally:
        store.close()


def _stored_cells(results: Path) -> int:
    """Cells in the store so far (0 while the driver has not created it yet)."""
    try:
        with sqlite3.connect(results / "store.sqlite") as conn:
            return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _rows_per_cell(results: Path) -> list[int]:
    with sqlite3.connect(results / "store.sqlite") as conn:
        return [n for (n,) in conn.execute("SELECT COUNT(*) FROM records GROUP BY cell_key")]


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "raytiny.toml"
    path.write_text(PROFILE)
    return path


@pytest.fixture(scope="module")
def local_records(profile, tmp_path_factory) -> dict[str, list[tuple]]:
    """The reference: the in-process loop on one thread (Ray gives each 1-CPU task one thread)."""
    results = tmp_path_factory.mktemp("local")
    _run(profile, results, "--threads", "1")
    records = _records(results)
    assert len(records) == CELLS and all(len(r) == 20 for r in records.values())
    return records


@pytest.mark.slow
def test_one_worker_gives_the_local_records(profile, local_records, tmp_path):
    _run(profile, tmp_path, "--executor", "ray", "--ray-workers", "1")
    assert _records(tmp_path) == local_records
    assert not list((tmp_path / "models").glob(".ray-shared-probe-*"))  # the probe is cleaned up


@pytest.mark.slow
def test_models_through_the_object_store(profile, local_records, tmp_path, private_tmpdir):
    """--ray-ship-models: workers train into their own cache and models travel as bytes; the driver keeps a copy."""
    first = tmp_path / "first"
    done = _run(profile, first, "--executor", "ray", "--ray-workers", "1", "--ray-ship-models", quiet=False)
    assert done.stdout.count("training task:") == 2
    assert _records(first) == local_records
    models = sorted(p.name for p in (first / "models").glob("*.safetensors"))
    assert len(models) == 2  # both trained models came back to the driver's cache
    worker_cache = private_tmpdir / "pixeldp-bench-ray" / "models"
    assert sorted(p.name for p in worker_cache.glob("*.safetensors")) == models  # trained in this test's TMPDIR
    # A second folder seeded with those files trains nothing: the driver ships them from its cache.
    second = tmp_path / "second"
    (second / "models").mkdir(parents=True)
    for name in models:
        (second / "models" / name).write_bytes((first / "models" / name).read_bytes())
    done = _run(profile, second, "--executor", "ray", "--ray-workers", "1", "--ray-ship-models", quiet=False)
    assert "training task" not in done.stdout and _records(second) == local_records


@pytest.mark.slow
def test_two_workers_with_one_killed_mid_cell(profile, local_records, tmp_path):
    """faulty_pgd SIGKILLs its worker once; Ray retries the task and the driver stores the cell once."""
    marker = tmp_path / "killed-once"
    results = tmp_path / "results"
    _run(profile, results, "--executor", "ray", "--ray-workers", "2", PIXELDP_TEST_KILL_MARKER=str(marker))
    assert marker.exists()  # the worker really died
    assert _records(results) == local_records
    assert _rows_per_cell(results) == [20] * CELLS


@pytest.mark.slow
def test_killed_driver_resumes(profile, local_records, tmp_path):
    """Kill the driver once a cell is stored while faulty_pgd dawdles; the re-run computes only the rest."""
    command = [sys.executable, "-m", "bench", "run", str(profile), "--results", str(tmp_path), "--device", "cpu",
               "--quiet", "--executor", "ray", "--ray-workers", "2"]
    driver = subprocess.Popen(command, cwd=REPO, env=_environment(PIXELDP_TEST_SLOW_SECONDS="60"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            if _stored_cells(tmp_path) >= 1:
                break
            time.sleep(0.5)
        stored_before = len(_records(tmp_path))
        assert driver.poll() is None and 1 <= stored_before < CELLS
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # whatever the dead driver's local Ray cluster left behind
    done = _run(profile, tmp_path, "--executor", "ray", "--ray-workers", "2")
    assert "reused from the store" in done.stdout
    computed = int(done.stdout.split(" cell(s) computed")[0].split()[-1])
    assert computed == CELLS - stored_before
    assert _records(tmp_path) == local_records
    assert _rows_per_cell(tmp_path) == [20] * CELLS


# ------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("settings, message", [
    (RaySettings(cpus_per_task=0), "cpus_per_task must be positive"),
    (RaySettings(gpus_per_task=1.5), "gpus_per_task must be 0, a fraction below 1"),
    (RaySettings(gpus_per_task=-1), "gpus_per_task must be 0"),
    (RaySettings(workers=0), "--ray-workers must be at least 1"),
    (RaySettings(workers=2, address="auto"), "--ray-workers sizes a local cluster"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(settings)


@pytest.mark.parametrize("run_line, message", [
    ("cpus_per_task = 0", "run.cpus_per_task must be a number above 0"),
    ("cpus_per_task = true", "run.cpus_per_task must be a number above 0"),
    ("gpus_per_task = -0.5", "run.gpus_per_task must be a number >= 0"),
    ("gpus_per_task = \"half\"", "run.gpus_per_task must be a number >= 0"),
])
def test_bad_profile_resources(run_line, message):
    with pytest.raises(ConfigError, match=message):
        parse_profile(f"[run]\n{run_line}\n[defenses.undefended]\n", "bad")


def test_profile_resources_are_read():
    profile = parse_profile("[run]\ncpus_per_task = 2\ngpus_per_task = 0.25\n[defenses.undefended]\n", "ok")
    assert (profile.cpus_per_task, profile.gpus_per_task) == (2.0, 0.25)


@pytest.mark.parametrize("flags, message", [
    (["--ray-workers", "2"], "need --executor ray"),
    (["--executor", "ray", "--gpus-per-task", "2.5"], "gpus_per_task must be 0, a fraction"),
    (["--executor", "ray", "--device", "tpu"], "unknown device 'tpu'"),
])
def test_cli_errors_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    assert main(["run", "smoke", "--results", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "store.sqlite").exists()  # refused before anything was written


@pytest.mark.slow
def test_cuda_without_gpus_is_refused(tmp_path, capsys):
    """On this CPU-only cluster --device cuda cannot be honoured by any task: one line, exit 2, no cell lost."""
    code = main(["run", "smoke", "--results", str(tmp_path), "--executor", "ray", "--ray-workers", "1",
                 "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs GPUs" in err and len(err.splitlines()) == 1


def test_missing_ray_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["run", "smoke", "--results", str(tmp_path), "--executor", "ray"]) == 2
    assert "pip install 'pixeldp-bench[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "store.sqlite").exists()
