"""The one noise-replicating forward pass (bench.core.draws) and its users: EOT, PixelDP sampling, overhead timing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks.eot import EOT
from bench.core.draws import noise_split, noisy_logits
from bench.execution.overhead import monte_carlo_predict
from bench.core.registry import DATASETS
from defenses.pixeldp.defense import PixelDP


class RowIndexNoise(nn.Module):
    """'Noise' that adds each row's index to it, so the row a draw landed in can be read back."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.arange(h.shape[0], dtype=h.dtype).view(-1, *([1] * (h.dim() - 1)))


class Split(nn.Module):
    """pre_noise = x, post_noise = (x, x) as two logits: (n, 1) -> (n, 2)."""

    def __init__(self, noise: nn.Module):
        super().__init__()
        self.noise = noise

    def pre_noise(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def post_noise(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, h], dim=1)


def test_layouts_put_draw_j_of_image_i_where_documented():
    h = torch.tensor([[100.0], [200.0], [300.0]])  # n = 3 images, one feature each
    model = Split(RowIndexNoise())
    draws = 4
    image_major = noisy_logits(model, h, draws, image_major=True)
    draw_major = noisy_logits(model, h, draws)
    assert image_major.shape == (3, draws, 2) and draw_major.shape == (draws, 3, 2)
    for i in range(3):
        for j in range(draws):
            assert image_major[i, j, 0] == h[i, 0] + i * draws + j  # row i * draws + j
            assert draw_major[j, i, 0] == h[i, 0] + j * 3 + i  # row j * n + i


def test_a_model_without_the_split_is_all_post_noise():
    model = nn.Linear(2, 3)
    pre_noise, noise, post_noise = noise_split(model)
    x = torch.rand(5, 2)
    assert pre_noise(x) is x and noise(x) is x and post_noise is model
    logits = noisy_logits(model, x, 3, image_major=True)
    assert torch.equal(logits, model(x.repeat_interleave(3, dim=0)).view(5, 3, 3))


def test_gradients_flow_through_the_pass():
    model = Split(RowIndexNoise())
    h = torch.rand(4, 1, requires_grad=True)
    noisy_logits(model, h, 5).sum().backward()
    assert torch.equal(h.grad, torch.full((4, 1), 10.0))  # 5 draws x 2 logits per row


def _pixeldp(seed: int) -> PixelDP:
    torch.manual_seed(0)
    defense = PixelDP(DATASETS.get("mnist5k"), L=1.0, arch="cnn_small", draws_predict=7)
    defense.attach(defense.build_model().eval(), torch.Generator().manual_seed(seed))
    return defense


@pytest.mark.parametrize("draws", [1, 7])
def test_the_overhead_timing_runs_pixeldps_prediction_path(draws):
    """Same seed: monte_carlo_predict makes PixelDP.predict's draws in the same order, to the last random number."""
    x = torch.rand(9, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    defense = _pixeldp(seed=3)
    defense.draws_predict = draws
    expected = defense.predict(x)
    after_predict = defense.generator.get_state()
    defense.generator.manual_seed(3)
    timed = monte_carlo_predict(defense.model, x, draws)
    assert torch.equal(timed, expected)
    assert torch.equal(defense.generator.get_state(), after_predict)


def test_eot_and_sampling_draw_the_same_noise_distribution():
    """EOT (image-major) and PixelDP sampling (draw-major) average the same noisy model: their mean softmax agrees."""
    defense = _pixeldp(seed=4)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    draws = 4000
    with torch.no_grad():
        eot = EOT(defense.model, draws=draws).draw_logits(x).softmax(dim=2).mean(dim=1).double().numpy()
    sampled = defense.samples(x, draws).mean
    # Two independent Monte Carlo means of scores in [0, 1]: each within ~4 / sqrt(draws) of the truth.
    np.testing.assert_allclose(eot, sampled, atol=8 / np.sqrt(draws))
