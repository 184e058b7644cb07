"""Timing helper shared by the benchmarks."""
from __future__ import annotations

import time


def best_seconds(fn, repeats: int = 3) -> float:
    """Fastest of `repeats` timed calls after one warm-up (the least noisy estimate on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best
