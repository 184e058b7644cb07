"""What `--executor ray` costs (issue 11): milliseconds per cell over the local loop, and the smoke profile's
cold wall time with ray at 2 workers over local on 2 threads. Reported in extra_info, never asserted."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli.commands import main

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[2]
CHEAP_CELLS = 24  # clean + 23 one-step PGD cells of a one-step-trained small CNN: almost no compute each
CHEAP = f"""
[run]
name = "raycheap"
datasets = ["mnist5k"]
examples = 10
seed = 0
batch_size = 10
overhead_draws = [1]

[defenses.undefended]
params = {{ arch = "cnn_small", steps = 1, batch_size = 8 }}

[attacks.pgd_linf]
against = "deterministic"
eps = [{", ".join(f"{0.01 * (i + 1):.2f}" for i in range(CHEAP_CELLS - 1))}]
params = {{ steps = 1 }}
"""


def _timed_run(profile: Path, results: Path, *flags: str) -> float:
    began = time.perf_counter()
    assert main(["run", str(profile), "--results", str(results), "--device", "cpu", "--quiet", *flags]) == 0
    return time.perf_counter() - began


def test_ray_overhead_per_cell(benchmark, tmp_path):
    """Local loop vs tasks on a started 1-CPU cluster whose workers a first run warmed: the difference per cell."""
    profile = tmp_path / "raycheap.toml"
    profile.write_text(CHEAP)
    # Both sides warm: the first local run pays this process's one-off costs (imports, data decoding, kernels).
    local = min(_timed_run(profile, tmp_path / f"local-{i}", "--threads", "1") for i in range(3))
    began = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started = time.perf_counter() - began
    try:
        cold = _timed_run(profile, tmp_path / "ray-cold", "--executor", "ray")
        warm = benchmark.pedantic(lambda: _timed_run(profile, tmp_path / f"ray-{time.monotonic_ns()}",
                                                     "--executor", "ray"), rounds=3, iterations=1)
    finally:
        ray.shutdown()
    per_cell_ms = 1000 * (warm - local) / CHEAP_CELLS
    benchmark.extra_info.update({"cells": CHEAP_CELLS, "local_seconds": local, "ray_init_seconds": started,
                                 "ray_cold_seconds": cold, "ray_warm_seconds": warm,
                                 "overhead_ms_per_cell": per_cell_ms})
    print(f"\n{CHEAP_CELLS} cheap cells: local {local:.2f} s, ray warm {warm:.2f} s (cold {cold:.2f} s, "
          f"ray.init {started:.2f} s): overhead {per_cell_ms:.0f} ms per cell")


def test_smoke_ray_over_local(benchmark, tmp_path):
    """The smoke profile cold, local on 2 threads vs ray with 2 one-thread workers (a process each, as users run it)."""
    def run(results: Path, *flags: str) -> float:
        command = [sys.executable, "-m", "bench", "run", "smoke", "--results", str(results), "--device", "cpu",
                   "--quiet", *flags]
        began = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True,
                       env=os.environ | {"RAY_AUTH_MODE": "disabled"})
        return time.perf_counter() - began

    local = run(tmp_path / "local", "--threads", "2")
    with_ray = benchmark.pedantic(lambda: run(tmp_path / "ray", "--executor", "ray", "--ray-workers", "2"),
                                  rounds=1, iterations=1)
    benchmark.extra_info.update({"local_seconds": local, "ray_seconds": with_ray,
                                 "ratio_ray_over_local": with_ray / local})
    print(f"\nsmoke cold: local {local:.0f} s, ray (2 workers) {with_ray:.0f} s, ratio {with_ray / local:.2f}")
