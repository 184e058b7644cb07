"""PixelDP against L1 attacks with Gaussian noise: the L1->L2 sensitivity control and bound."""
import pytest
import torch
from torch import nn

from bench.core.registry import DATASETS
from defenses.pixeldp.defense import PixelDP
from defenses.pixeldp.sensitivity import DividedConv2d, conv_l1_l2_bound, kernel_divisor, normalize_columns

SPEC = DATASETS.get("mnist5k")


def exact_l1_to_l2(conv: nn.Module, shape: tuple[int, int, int]) -> float:
    """Largest column L2 norm of the conv's matrix, materialized on a (C, H, W) input."""
    eye = torch.eye(torch.Size(shape).numel(), dtype=torch.float64).reshape(-1, *shape)
    with torch.no_grad():
        columns = conv(eye).flatten(1)  # row i = the image of basis vector i = column i of the matrix
    return columns.norm(dim=1).max().item()


@pytest.mark.parametrize("kernel, stride, padding", [(5, 2, 2), (3, 1, 1), (4, 2, 1), (3, 3, 0)])
def test_l1_l2_bound_is_exact_on_interior_pixels(kernel, stride, padding):
    torch.manual_seed(kernel * 10 + stride)
    conv = nn.Conv2d(2, 4, kernel, stride=stride, padding=padding, bias=False).double()
    exact = exact_l1_to_l2(conv, (2, 12, 12))
    bound = conv_l1_l2_bound(conv)
    assert bound >= exact - 1e-9
    assert bound == pytest.approx(exact, rel=1e-9)  # a 12x12 input has pixels read by every tap class


def test_unit_l2_columns_bound_the_divided_conv_by_one():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 32, 5, stride=2, padding=2, bias=False)
    divided = DividedConv2d.from_conv(conv, kernel_divisor(conv, "l1->l2"))
    normalize_columns(divided.weight, p=2)
    assert conv_l1_l2_bound(divided) <= 1 + 1e-6
    assert exact_l1_to_l2(divided.double(), (1, 14, 14)) <= 1 + 1e-6


def test_gaussian_defense_with_l1_radii():
    torch.manual_seed(0)
    defense = PixelDP(SPEC, L=0.3, attack_norm="l1", draws_certify=200)
    model = defense.build_model()
    defense.attach(model, torch.Generator().manual_seed(0))
    assert defense.kind == "l1->l2" and defense.sensitivity <= 1 + 1e-6
    assert PixelDP.certified_norm({"attack_norm": "l1"}) == "l1"
    assert PixelDP.certified_norm({}) == "l2" and PixelDP.certified_norm({"mechanism": "laplace"}) == "l1"
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    pred, radius = defense.certify(x)
    assert pred.shape == (4,) and (radius >= 0).all()


def test_laplace_noise_cannot_certify_l2():
    with pytest.raises(ValueError, match="does not fit laplace noise"):
        PixelDP(SPEC, mechanism="laplace", attack_norm="l2")
