"""The smoke profile cold (fresh results folder) and warm (everything reused): total and per-family seconds (issue 15).

Targets on a 2-core CPU: <= 300 s cold, <= 30 s warm. Reported, not asserted (benchmarks never fail on time).
"""
from __future__ import annotations

import time

from bench.cli.commands import main

from smoke_timing import seconds_per_family


def test_smoke_profile_cold_and_warm(benchmark, tmp_path):
    results = tmp_path / "results"
    args = ["run", "smoke", "--results", str(results), "--quiet"]
    began = time.perf_counter()
    assert main(args) == 0
    cold = time.perf_counter() - began
    warm = benchmark.pedantic(lambda: main(args), rounds=1, iterations=1)
    assert warm == 0
    families = seconds_per_family(results)
    benchmark.extra_info.update({"cold_seconds": cold, "seconds_per_family": families})
    print(f"\nsmoke cold {cold:.0f} s; warm: see the benchmark row")
    for name, seconds in families.items():
        print(f"  {name:40s} {seconds:7.1f} s")
