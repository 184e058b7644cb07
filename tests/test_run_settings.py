"""One source of run settings: a Ray worker runs with the driver's RunOptions as they are, devices are parsed
by one function, and the claim-wait-poll loop (bench.execution.store.claim_rounds) is shared by cells and models."""
from __future__ import annotations

import dataclasses
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch

from bench.execution import ray_executor
from bench.core.devices import parse_device, pick_device, ray_driver_device
from bench.core.errors import ConfigError
from bench.execution.runner import RunOptions
from bench.execution.store import ClaimOwner, Store, claim_rounds
from bench.execution.training import LoaderOptions


def _changed(value, field: dataclasses.Field):
    """A value of the field's type that differs from `value` (a type without a rule here fails, naming the field)."""
    name = field.name
    if value is None:
        value = 5 if "int" in str(field.type) else Path("/elsewhere")
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 3 + 1
    if isinstance(value, tuple):
        return (*value, 7)
    if isinstance(value, Path):
        return value / name
    if isinstance(value, LoaderOptions):
        return LoaderOptions(workers=value.workers + 2, pin_memory=not value.pin_memory)
    raise AssertionError(f"give RunOptions.{name} ({type(value).__name__}) a changed value in _changed")


@pytest.fixture
def driver_options(tmp_path) -> RunOptions:
    """RunOptions with every field away from its default (cpu and no progress: what a CPU worker keeps)."""
    base = RunOptions(results_dir=tmp_path)
    kept = {"results_dir", "device", "progress"}
    changes = {f.name: _changed(getattr(base, f.name), f) for f in dataclasses.fields(RunOptions)
               if f.name not in kept}
    return dataclasses.replace(base, progress=False, **changes)


def test_a_worker_runs_with_every_driver_setting(driver_options, monkeypatch):
    """The job a task receives (pickled, as Ray ships it) rebuilds a Runner whose options equal the driver's in
    every field: a setting added to RunOptions reaches the workers with no other edit."""
    monkeypatch.setattr(ray_executor, "_RUNNER", [])
    probe = driver_options.results_dir / "models" / "probe"
    probe.parent.mkdir(parents=True)
    probe.touch()  # the worker sees the driver's results folder
    ray = ray_executor.RaySettings(cpus_per_task=float(torch.get_num_threads()))
    job = pickle.loads(pickle.dumps(ray_executor.WorkerJob(driver_options, ray, probe.name)))
    runner = ray_executor._worker_runner(job)
    for f in dataclasses.fields(RunOptions):
        assert getattr(runner.options, f.name) == getattr(driver_options, f.name), f.name
    assert ray_executor._worker_runner(job) is runner  # the next task of the run reuses it


def test_an_unshared_worker_changes_only_its_results_folder(driver_options, monkeypatch):
    monkeypatch.setattr(ray_executor, "_RUNNER", [])
    ray = ray_executor.RaySettings(cpus_per_task=float(torch.get_num_threads()), ship_models=True)
    runner = ray_executor._worker_runner(ray_executor.WorkerJob(driver_options, ray, "probe"))
    assert runner.options.results_dir != driver_options.results_dir
    assert dataclasses.replace(runner.options, results_dir=driver_options.results_dir) == driver_options


@pytest.mark.parametrize("parse", [pick_device, ray_driver_device, ray_executor.ray_worker_device])
def test_every_entry_point_refuses_a_bad_device_in_one_line(parse):
    with pytest.raises(ConfigError, match="unknown device 'tpu'; use auto, cpu"):
        parse("tpu")


def test_devices_parse_alike():
    assert parse_device("cpu") == pick_device("cpu") == ray_driver_device("cpu") == torch.device("cpu")
    assert parse_device("auto", gpu=False) == ray_driver_device("auto") == torch.device("cpu")
    assert parse_device("auto", gpu=True) == torch.device("cuda")
    with pytest.raises(ConfigError, match="not supported with --executor ray"):
        ray_driver_device("mps")


def test_claim_rounds_waits_for_a_busy_item_and_reuses_it(tmp_path):
    """Items another live process holds are announced once, polled, and counted done once it stores them."""
    store = Store(tmp_path / "store.sqlite")
    me, other = ClaimOwner.this_process(), ClaimOwner("other", socket.gethostname(), os.getpid())
    assert store.claim("model:b", other) == "mine"
    finished: set[str] = set()
    rounds: list[list[str]] = []
    waits: list[tuple[str, str]] = []

    def work(claimed):
        rounds.append(list(claimed))
        finished.add("model:b")  # the other process finishes b while we work on a and c

    reused = claim_rounds(store, me, [(f"model:{n}", n) for n in "abc"], work, poll_seconds=0.01,
                          waiting=lambda item, holder: waits.append((item, holder)), done=finished.__contains__)
    assert rounds == [["a", "c"], []] and reused == 1
    assert waits == [("b", f"pid {os.getpid()} on {socket.gethostname()}")]
    store.close()
