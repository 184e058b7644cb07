"""The `wong` bound against the original convex_adversarial code (Wong & Kolter 2018) on the same network.

convex_adversarial's `RobustBounds(net, eps, bounded_input=True)` returns minus the dual lower bound
of z_y - z_j over the L-inf ball intersected with the [0, 1] box: the set our `wong` bound uses. Both
are the same LP relaxation's dual, so the bounds agree to rounding and the certificates are identical.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.core.data import gather, load_split, select_examples
from bench.core.registry import DATASETS
from defenses.convex.bounds import margin_lower_bounds
from defenses.convex.defense import WongKolter

from convex_reference import original_margins, plain_sequential

pytest.importorskip("convex_adversarial")


@pytest.fixture(scope="module")
def mnist_net():
    """The Wong-Kolter MNIST net (conv16-conv32-fc100-fc10) with its trained stem scale, and 16 test digits."""
    torch.manual_seed(0)
    model = WongKolter(DATASETS.get("mnist5k"), eps=0.1).build_model().eval()
    test = load_split("mnist5k", "test")
    x, y = gather(test, select_examples(test, 16, seed=0))
    return model, x, y


@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_wong_equals_the_original_in_float64(mnist_net, eps):
    model, x, y = mnist_net
    model, x = model.double(), x.double()
    try:
        ours = margin_lower_bounds(model, x, y, norm="linf", eps=eps, method="wong")
        theirs = original_margins(plain_sequential(model), x, y, eps)
    finally:
        model.float()
    assert ours.shape == theirs.shape == (16, 10)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9 * float(theirs.abs().max()))


@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_wong_on_the_plain_ball_equals_the_original_unbounded_input(mnist_net, eps):
    """input box off: the plain L-inf ball of Wong & Kolter's published errors (their bounded_input=False),
    which the box's bound dominates (a subset can only certify more), strictly on pixels near 0 or 1."""
    model, x, y = mnist_net
    model, x = model.double(), x.double()
    try:
        plain = margin_lower_bounds(model, x, y, norm="linf", eps=eps, method="wong", box=False)
        boxed = margin_lower_bounds(model, x, y, norm="linf", eps=eps, method="wong")
        theirs = original_margins(plain_sequential(model), x, y, eps, bounded_input=False)
    finally:
        model.float()
    torch.testing.assert_close(plain, theirs, rtol=0, atol=1e-9 * float(theirs.abs().max()))
    off_diagonal = torch.ones_like(plain, dtype=torch.bool).scatter(1, y[:, None], False)
    assert bool((boxed >= plain - 1e-12).all()) and bool((boxed > plain + 1e-6)[off_diagonal].all())


def test_wong_certificates_equal_the_original_on_a_scaled_net(mnist_net):
    """float32 as certification runs; a bias towards class 1 sized so that some digits certify and some do not."""
    model, x, y = mnist_net
    small = WongKolter(DATASETS.get("mnist5k"), eps=0.1).build_model().eval()
    small.load_state_dict(model.state_dict())
    with torch.no_grad():
        last = [m for m in small.modules() if isinstance(m, nn.Linear)][-1]
        last.bias.copy_(0.2 * (torch.arange(10) == 1).float())  # class 1 wins on every digit, narrowly
    labels = torch.ones_like(y)
    ours = margin_lower_bounds(small, x, labels, norm="linf", eps=0.02, method="wong").detach()
    theirs = original_margins(plain_sequential(small), x, labels, 0.02)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    certified_ours = (ours.scatter(1, labels[:, None], 1.0) > 0).all(1)
    certified_theirs = (theirs.scatter(1, labels[:, None], 1.0) > 0).all(1)
    assert 0 < int(certified_ours.sum()) < len(x)  # both outcomes occur (14 of 16 certify here)
    assert torch.equal(certified_ours, certified_theirs)
