"""PixelDP's Monte Carlo sampler: exact statistics of the draws it made, at any blocking; the noise layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.core.registry import DATASETS
from defenses.pixeldp.defense import PixelDP
from defenses.pixeldp.noise import NoiseLayer
from defenses.pixeldp.sampling import CPU_BLOCK_BYTES, block_rows, sample


def _defense(seed: int = 0) -> PixelDP:
    torch.manual_seed(0)
    defense = PixelDP(DATASETS.get("mnist5k"), L=1.0, arch="cnn_small")
    defense.attach(defense.build_model().eval(), torch.Generator().manual_seed(seed))
    return defense


def _recording(model) -> list[tuple[int, torch.Tensor]]:
    """Wrap the noise layer's replicate to keep (images, noisy rows) of every block."""
    blocks: list[tuple[int, torch.Tensor]] = []
    replicate = model.noise.replicate

    def recorded(h, draws):
        rows = replicate(h, draws)
        blocks.append((h.shape[0], rows.clone()))
        return rows

    model.noise.replicate = recorded
    return blocks


@pytest.mark.parametrize("images, draws, chunk_rows", [(5, 13, 3), (4, 50, 2048), (7, 9, 16)])
def test_statistics_are_those_of_the_draws_made(images, draws, chunk_rows):
    """Mean, unbiased variance and votes equal a direct computation over every recorded noisy row."""
    defense = _defense()
    x = torch.rand(images, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    blocks = _recording(defense.model)
    got = sample(defense.model, x, draws, chunk_rows=chunk_rows)
    assert all(rows.shape[0] <= chunk_rows for _, rows in blocks)
    # Reassemble the probabilities (images, draws, K): blocks are draw-major within a group of images.
    per_image: list[list[torch.Tensor]] = [[] for _ in range(images)]
    first = 0
    with torch.no_grad():
        for n, rows in blocks:
            probs = defense.model.post_noise(rows).double().softmax(dim=1).view(-1, n, 10)
            for i in range(n):
                per_image[first + i].extend(probs[:, i])
            if sum(len(p) for p in per_image[first:first + n]) == n * draws:
                first += n
    assert first == images and all(len(p) == draws for p in per_image)
    probs = torch.stack([torch.stack(p) for p in per_image])  # (images, draws, K)
    np.testing.assert_allclose(got.mean, probs.mean(dim=1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.variance, probs.var(dim=1).numpy(), rtol=1e-3, atol=1e-7)
    votes = torch.nn.functional.one_hot(probs.argmax(dim=2), 10).sum(dim=1).double()
    assert np.array_equal(got.counts, votes.numpy()) and (got.counts.sum(axis=1) == draws).all()
    assert got.draws == draws


def test_seeded_draws_repeat_and_differ_between_seeds():
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    first, again, other = (sample(_defense(seed).model, x, 40) for seed in (0, 0, 1))
    assert np.array_equal(first.mean, again.mean) and np.array_equal(first.counts, again.counts)
    assert not np.array_equal(first.mean, other.mean)


def test_blocks_fit_the_cache_budget_on_cpu_only():
    stem_rows = torch.zeros(8, 32, 14, 14)  # the paper's MNIST CNN: 6,272 noised floats per image
    assert block_rows(stem_rows, 2048) == CPU_BLOCK_BYTES // (32 * 14 * 14 * 4) == 334
    assert block_rows(stem_rows, 100) == 100  # chunk_rows stays the upper bound
    assert block_rows(torch.zeros(2, 3, 2000, 2000), 2048) == 1  # one huge row still runs
    assert block_rows(torch.zeros(8, 32, 14, 14, device="meta"), 2048) == 2048  # accelerators: chunk_rows


def test_replicate_adds_independent_noise_to_every_copy_in_channels_last():
    layer = NoiseLayer("gaussian", 0.5)
    layer.generator = torch.Generator().manual_seed(0)
    h = torch.rand(3, 4, 5, 6)
    rows = layer.replicate(h, 400)
    assert rows.shape == (1200, 4, 5, 6) and rows.is_contiguous(memory_format=torch.channels_last)
    noise = (rows.view(400, 3, 4, 5, 6) - h).flatten()  # row j*N + i is a copy of h[i]
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 0.5) < 0.01
    per_channel = (rows.view(400, 3, 4, 5, 6) - h).std(dim=(0, 1, 3, 4))
    assert torch.allclose(per_channel, torch.full((4,), 0.5), atol=0.02)
    pairs = noise.view(400, -1)
    correlation = torch.corrcoef(torch.stack([pairs[:, 0], pairs[:, 1], pairs[:, 7]]))
    assert float((correlation - torch.eye(3)).abs().max()) < 0.15
    flat = layer.replicate(torch.rand(3, 10), 5)  # non-image activations keep the row-major path
    assert flat.shape == (15, 10) and flat.is_contiguous()
