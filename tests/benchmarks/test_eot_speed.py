"""Batched EOT (one N x draws pass) vs torchattacks' EOTPGD (a loop over draws) at 20 draws, same model and work."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from bench.core.models import build_model
from bench.core.registry import ATTACKS
from bench.core.types import ThreatModel

DRAWS = 20
STEPS = 5
EXAMPLES = 32
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class GaussianNoise(nn.Module):
    """PixelDP-style noise after the stem, active in eval mode."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma
        self.generator = torch.Generator(device=DEVICE).manual_seed(0)

    def forward(self, h):
        return h + self.sigma * torch.randn(h.shape, generator=self.generator, device=h.device, dtype=h.dtype)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("cnn_small", (1, 28, 28), 10).eval().to(DEVICE)
    model.noise = GaussianNoise(0.25)
    x = torch.rand(EXAMPLES, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (EXAMPLES,), device=DEVICE)
    return model, x, y


def ours(model, x, y):
    return ATTACKS.get("pgd_linf_eot")(model, x, y, threat=ThreatModel("linf", 0.1), steps=STEPS, draws=DRAWS,
                                       step_size=0.01, generator=torch.Generator(device=DEVICE).manual_seed(0))


def theirs(model, x, y):
    return ATTACKS.get("pgd_linf_eot@torchattacks")(model, x, y, threat=ThreatModel("linf", 0.1), steps=STEPS,
                                                    draws=DRAWS, step_size=0.01,
                                                    generator=torch.Generator(device=DEVICE).manual_seed(0))


def best_of(fn, *args, repeats: int = 3) -> float:
    """Minimum wall time over repeats (the least noisy estimate on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def speedup(model, x, y) -> float:
    """Time of torchattacks' EOTPGD divided by ours for the same steps and draws."""
    ours(model, x, y)  # warm-up
    return best_of(theirs, model, x, y) / best_of(ours, model, x, y)


def test_batched_eot_pgd(benchmark, setup):
    benchmark.pedantic(ours, args=setup, rounds=3, iterations=1)


def test_torchattacks_eotpgd(benchmark, setup):
    benchmark.pedantic(theirs, args=setup, rounds=3, iterations=1)


def test_batched_eot_is_faster_than_a_loop_over_draws(setup):
    ratio = speedup(*setup)
    print(f"\nEOT PGD speed-up over torchattacks EOTPGD at {DRAWS} draws ({DEVICE}): {ratio:.2f}x")
    # On a GPU the loop is launch-bound and one N x draws batch wins by far (target 2x); on a CPU
    # the work is the same FLOPs either way and batching only saves the shared pre-noise pass
    # (measured ~1.0-1.2x on a 2-core CPU), so there the check is only "not materially slower".
    assert ratio >= (2.0 if DEVICE.type == "cuda" else 0.75)
