"""Timing helper shared by the benchmarks."""
from __future__ import annotations

import time


def best_seconds(fn, repeats: int = 3, clock=time.perf_counter) -> float:
    """Fastest of `repeats` timed calls after one warm-up (the least noisy estimate on a shared machine).

    `clock`: wall time by default; `time.process_time` measures this process's CPU seconds instead.
    """
    fn()
    best = float("inf")
    for _ in range(repeats):
        began = clock()
        fn()
        best = min(best, clock() - began)
    return best
