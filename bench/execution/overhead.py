"""Measures prediction time per image at several noise-draw counts (Lecuyer et al. 2019, Sec. IV-E)."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from defenses.pixeldp.sampling import sample

from bench.core.defense import Defense

DRAWS = (1, 10, 100, 1000)
ROW_BUDGET = 2000  # rows pushed through the post-noise network per timing; bounds time and memory


def monte_carlo_predict(model: nn.Module, x: torch.Tensor, draws: int, chunk_rows: int = 2048) -> torch.Tensor:
    """Labels (N,) from the mean softmax over `draws` noise draws: PixelDP's own prediction code path.

    Runs defenses.pixeldp.sampling.sample (pre-noise once per image, blocked draws through
    bench.core.draws.noisy_logits, float64 statistics), exactly what `PixelDP.predict` times.

    Args:
        model: an `ImageClassifier` (the pre-noise part runs once per image and only the noise and
            post-noise part are replicated) or any module mapping (N, C, H, W) to logits (N, K).
        x: images (N, C, H, W) in [0, 1].
        draws: noise draws per image (PixelDP's n; 1, 10, 100, 1000 in the paper's Sec. IV-E).
        chunk_rows: most rows per forward pass, bounding memory (PixelDP's default).
    """
    samples = sample(model, x, draws, chunk_rows=chunk_rows)
    return torch.as_tensor(samples.mean.argmax(axis=1), device=x.device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_image(model: nn.Module, x: torch.Tensor, draws: int, repeats: int = 2) -> float:
    """Best of `repeats` timings of a `draws`-draw prediction of x (N, C, H, W), divided by N."""
    device = x.device
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        began = time.perf_counter()
        monte_carlo_predict(model, x, draws)
        _synchronize(device)
        best = min(best, time.perf_counter() - began)
    return best / x.shape[0]


def measure_prediction(defense: Defense, x: torch.Tensor, device: torch.device, draws=DRAWS,
                       row_budget: int = ROW_BUDGET) -> dict[str, Any]:
    """Prediction seconds per image at each draw count (1 only for deterministic defenses).

    Uses at most `row_budget / draws` of the images x (N, C, H, W) per draw count. The random
    state (global and the defense's generator) is restored afterwards, so measuring never changes
    the noise that later cells see.
    """
    model = defense.attached_model()
    grid = tuple(draws) if defense.info.randomized else (1,)
    generator = defense.generator
    saved = generator.get_state() if generator is not None else None
    devices = [device] if device.type == "cuda" else []
    timings: dict[str, float] = {}
    images: dict[str, int] = {}
    with torch.random.fork_rng(devices=devices):
        x = x.to(device)
        monte_carlo_predict(model, x[:1], 1)  # warm-up: lazy initialisation and allocator
        for k in grid:
            n = max(1, min(len(x), row_budget // k))
            timings[str(k)] = seconds_per_image(model, x[:n], k)
            images[str(k)] = n
    if generator is not None and saved is not None:  # saved exactly when there is a generator
        generator.set_state(saved)
    return {"predict_seconds_per_image": timings, "images": images}
