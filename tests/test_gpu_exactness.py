"""On a CUDA device with TF32 switched on: PixelDP's stem and sensitivity bound stay exact, and
certification, EOT and the bf16 body agree with the CPU (noise drawn from CPU generators, so both
devices add the same noise)."""
from __future__ import annotations

import copy

import pytest
import torch

from attacks.eot import EOT
from attacks.pgd import projected_gradient_descent
from bench.core.models import build_model
from bench.core.registry import DATASETS
from bench.profile.speed import apply_speed
from bench.core.types import ThreatModel
from defenses.pixeldp.defense import PixelDP
from defenses.pixeldp.sampling import block_rows
from defenses.pixeldp.sensitivity import DividedConv2d, conv_l1_bound, conv_l1_l2_bound, conv_l2_bound, \
    kernel_divisor
from pixeldp_helpers import trained_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture
def tf32_on():
    """The caller runs with TF32 on for matmuls and convolutions (PyTorch's fast setting); restored after."""
    backends = torch.backends
    saved = (backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision,
             torch.get_float32_matmul_precision())
    backends.cuda.matmul.fp32_precision = "tf32"
    backends.cudnn.conv.fp32_precision = "tf32"
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[2])
        backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision = saved[0], saved[1]


def _pixeldp_model(dataset: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return PixelDP(DATASETS.get(dataset), L=0.3, arch="cnn_small", steps=1).build_model().eval()


@pytest.mark.parametrize("dataset", ["mnist5k", "cifar10"])
def test_pre_noise_under_tf32_equals_cpu_float64(dataset, tf32_on):
    model = _pixeldp_model(dataset)
    shape = DATASETS.get(dataset).shape
    x = torch.rand(64, *shape, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model).double().pre_noise(x.double())
    on_gpu = copy.deepcopy(model).to(CUDA).pre_noise(x.to(CUDA))
    assert on_gpu.dtype == torch.float32
    assert (on_gpu.double().cpu() - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind, bound", [("l2", conv_l2_bound), ("l1", conv_l1_bound),
                                         ("l1->l2", conv_l1_l2_bound)])
def test_sensitivity_bound_on_gpu_equals_cpu_float64(kind, bound, tf32_on):
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 48, 5, stride=2, padding=2, bias=False)
    stem = DividedConv2d.from_conv(conv, kernel_divisor(conv, kind))
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    reference = bound(copy.deepcopy(stem).double(), std.double())
    on_gpu = bound(copy.deepcopy(stem).to(CUDA), std.to(CUDA))
    assert abs(on_gpu - reference) <= 1e-5 * max(1.0, abs(reference))


def _attached(device: torch.device, seed: int, **params) -> PixelDP:
    """The session's trained PixelDP CNN on `device`, its noise from a CPU generator (the same draws on any device)."""
    defense = PixelDP(DATASETS.get("mnist5k"), L=0.3, arch="cnn_small", **params)
    defense.attach(copy.deepcopy(trained_weights(0.3)).to(device), torch.Generator().manual_seed(seed))
    return defense


def test_certification_agrees_between_cpu_and_gpu(mnist_test, tf32_on):
    x, _ = mnist_test
    x = x[:60]
    chunk = 256  # below the CPU's byte-sized block for this CNN, so both devices draw in the same blocks
    cpu = _attached(torch.device("cpu"), 7, draws_certify=300, chunk_rows=chunk)
    gpu = _attached(CUDA, 7, draws_certify=300, chunk_rows=chunk)
    assert gpu.sensitivity == pytest.approx(cpu.sensitivity, rel=1e-6)
    pred_cpu, radius_cpu = cpu.certify(x)
    pred_gpu, radius_gpu = gpu.certify(x.to(CUDA))
    pred_gpu, radius_gpu = pred_gpu.cpu(), radius_gpu.cpu().to(radius_cpu.dtype)
    h = cpu.attached_model().pre_noise(x[:1])
    same_noise = block_rows(h, chunk) == block_rows(h.to(CUDA), chunk)
    agree = pred_cpu == pred_gpu
    if same_noise:
        # The same noise through the same function: only float rounding separates the devices.
        assert agree.float().mean().item() >= 0.98
        assert (radius_cpu[agree] - radius_gpu[agree]).abs().max().item() <= 1e-3
    else:
        # Blocks of different sizes assign the draws differently: agreement up to Monte Carlo error.
        assert agree.float().mean().item() >= 0.9
        assert (radius_cpu[agree] - radius_gpu[agree]).abs().mean().item() <= 0.02


def test_eot_agrees_between_cpu_and_gpu(mnist_test, tf32_on):
    x, y = mnist_test
    x, y = x[:40], y[:40]
    results = []
    for device in (torch.device("cpu"), CUDA):
        defense = _attached(device, 11)
        model = EOT(defense.attached_model(), draws=8, chunk=64)  # same chunks: the same draws per row
        xd = x.to(device).requires_grad_(True)
        logits = model(xd)
        grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y.to(device)), xd)
        # No random start: a CPU generator cannot draw on the GPU (the EOT draws come from the noise layer's).
        attacked = projected_gradient_descent(model, x.to(device), y.to(device), threat=ThreatModel("linf", 0.1),
                                              steps=5, random_start=False)
        with torch.no_grad():
            fooled = (defense.predict(attacked) != y.to(device)).float().mean().item()
        results.append((logits.detach().cpu(), grad.cpu(), fooled))
    (logits_cpu, grad_cpu, fooled_cpu), (logits_gpu, grad_gpu, fooled_gpu) = results
    assert (logits_cpu - logits_gpu).abs().max().item() <= 1e-4
    assert torch.allclose(grad_cpu, grad_gpu, rtol=1e-3, atol=1e-6 * grad_cpu.abs().max().item())
    # Sign steps may flip on near-zero gradient entries: the attack's outcome agrees up to a few examples.
    assert abs(fooled_cpu - fooled_gpu) <= 0.1


def test_bf16_body_on_gpu_keeps_stem_and_noise_exact(mnist_test, tf32_on):
    x, y = mnist_test
    x = x[:50].to(CUDA)
    exact = _attached(CUDA, 5, draws_predict=200)
    fast = _attached(CUDA, 5, draws_predict=200)
    assert apply_speed(fast.attached_model(), {"autocast": "bf16", "channels_last": True})
    seen = {}
    fast.attached_model().noise.register_forward_hook(lambda _m, _a, out: seen.update(noise=out.dtype))
    assert torch.equal(fast.attached_model().pre_noise(x), exact.attached_model().pre_noise(x))
    logits = fast.attached_model()(x)
    assert logits.dtype == torch.float32 and seen["noise"] == torch.float32
    agree = (fast.predict(x) == exact.predict(x)).float().mean().item()
    assert agree >= 0.9  # bf16 rounding after the noise changes a few near-ties at most
    undefended = build_model("cnn_small", (1, 28, 28), 10).to(CUDA).eval()
    reference = undefended(x)
    assert apply_speed(undefended, {"autocast": "bf16"})
    assert torch.allclose(undefended(x), reference, rtol=0.05, atol=0.05)
