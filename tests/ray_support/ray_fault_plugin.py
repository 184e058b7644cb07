"""Test plugin for tests/test_ray_executor.py: PGD that can kill its own Ray worker once, or dawdle.

`PIXELDP_TEST_KILL_MARKER=PATH`: the first call that finds no file at PATH creates it and SIGKILLs
its own process (a worker dying mid-cell); later calls attack normally.
`PIXELDP_TEST_SLOW_SECONDS=S`: every call sleeps S seconds first (time to kill a driver mid-run).
Unset, it is plain PGD, so its records equal a local run's.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from attacks.pgd import pgd_linf
from attacks.template import register_attack
from bench.core.types import ThreatModel


@register_attack("faulty_pgd", norm="linf", projected=True)  # pgd_linf projects every iterate
def faulty_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel,
               generator: torch.Generator | None = None, steps: int = 5) -> torch.Tensor:
    """pgd_linf (x (N, C, H, W) -> x_adv) after the fault the environment asks for."""
    marker = os.environ.get("PIXELDP_TEST_KILL_MARKER")
    if marker:
        try:
            Path(marker).touch(exist_ok=False)
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("PIXELDP_TEST_SLOW_SECONDS", "0")))
    return pgd_linf(model, x, y, threat=threat, generator=generator, steps=steps)

