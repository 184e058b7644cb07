"""EOT wrapper: averaged gradients equal the mean of per-draw gradients; works with noisy ImageClassifiers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.adapters import KeepMode
from attacks.eot import EOT
from bench.core.models import build_model
from bench.core.registry import ATTACKS
from bench.core.types import ThreatModel


class RecordingNoise(nn.Module):
    """Gaussian noise from its own generator, active in eval mode too; keeps every draw for replay."""

    def __init__(self, sigma: float, seed: int = 0):
        super().__init__()
        self.sigma = sigma
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn: list[torch.Tensor] = []

    def forward(self, h):
        noise = torch.randn(h.shape, generator=self.generator) * self.sigma
        self.drawn.append(noise)
        return h + noise


class FixedNoise(nn.Module):
    def __init__(self, noise: torch.Tensor):
        super().__init__()
        self.noise = noise

    def forward(self, h):
        return h + self.noise


@pytest.fixture
def noisy_model():
    torch.manual_seed(0)
    model = build_model("cnn_small", (1, 28, 28), 10, width=4, hidden=16).eval()
    model.noise = RecordingNoise(sigma=0.5)
    return model


def per_draw_gradients(model, x, weights, draws, softmax):
    """Gradient of sum(weights * output) for each recorded draw, replayed through FixedNoise: (draws, N, ...)."""
    noise = torch.cat(model.noise.drawn).view(x.shape[0], draws, *model.noise.drawn[0].shape[1:])
    recording = model.noise
    grads = []
    for d in range(draws):
        model.noise = FixedNoise(noise[:, d])
        xd = x.clone().requires_grad_(True)
        out = model(xd)
        out = out.softmax(1) if softmax else out
        grads.append(torch.autograd.grad((out * weights).sum(), xd)[0])
    model.noise = recording
    return torch.stack(grads)


@pytest.mark.parametrize("average", ["logits", "softmax"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_gradient_is_mean_of_per_draw_gradients(noisy_model, average, chunk):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 28, 28, generator=g)
    weights = torch.randn(3, 10, generator=g)
    draws = 5
    eot = EOT(noisy_model, draws=draws, chunk=chunk, average=average)
    xe = x.clone().requires_grad_(True)
    out = eot(xe)
    # softmax mode returns log(mean softmax): exponentiate to get the averaged probabilities.
    averaged = out.exp() if average == "softmax" else out
    grad, = torch.autograd.grad((averaged * weights).sum(), xe)
    expected = per_draw_gradients(noisy_model, x, weights, draws, softmax=average == "softmax").mean(0)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_output_is_log_mean_softmax(noisy_model):
    x = torch.rand(2, 1, 28, 28)
    out = EOT(noisy_model, draws=4)(x)
    noise = torch.cat(noisy_model.noise.drawn).view(2, 4, *noisy_model.noise.drawn[0].shape[1:])
    probs = torch.stack([noisy_model.post_noise(noisy_model.pre_noise(x) + noise[:, d]).softmax(1)
                         for d in range(4)]).mean(0)
    assert torch.allclose(out.exp(), probs, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(2), atol=1e-5)


def test_pre_noise_runs_once_per_image(noisy_model):
    calls = []
    noisy_model.stem.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    EOT(noisy_model, draws=20, chunk=16)(torch.rand(3, 1, 28, 28))
    assert calls == [3]
    # Chunks hold whole images: 20 draws per image, chunk rounded up to one image's draws.
    assert [n.shape[0] for n in noisy_model.noise.drawn] == [20, 20, 20]


def test_plain_module_without_split_is_replicated():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2)
    assert torch.allclose(EOT(model, draws=3, average="logits")(x), model(x), atol=1e-6)


def test_arguments_are_validated(noisy_model):
    with pytest.raises(ValueError):
        EOT(noisy_model, draws=0)
    with pytest.raises(ValueError):
        EOT(noisy_model, average="median")


def test_noise_stays_active_when_libraries_call_eval(noisy_model):
    wrapped = KeepMode(EOT(noisy_model, draws=2))
    wrapped.eval()
    x = torch.rand(1, 1, 28, 28)
    assert not torch.equal(wrapped(x), wrapped(x))


@pytest.mark.parametrize("name", ["pgd_linf_eot", "cw_l2_eot", "pgd_linf_eot@torchattacks"])
def test_eot_attacks_run_on_a_noisy_image_classifier(noisy_model, name):
    x = torch.rand(4, 1, 28, 28)
    y = torch.arange(4)
    norm = ATTACKS.meta(name)["norm"]
    threat = ThreatModel(norm, 0.1 if norm == "linf" else float("inf"))
    x_adv = ATTACKS.get(name)(noisy_model, x, y, threat=threat, steps=3, draws=4, generator=torch.Generator())
    assert ATTACKS.meta(name)["eot"]
    assert bool(threat.contains(x_adv, x).all())
    # The noise layer was used by every forward pass, with `draws` rows per image.
    assert len(noisy_model.noise.drawn) > 0
