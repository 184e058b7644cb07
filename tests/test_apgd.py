"""APGD (Croce & Hein 2020): checkpoints, DLR losses, agreement with torchattacks' APGD, EOT with fresh-draw judging."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from attacks.apgd import auto_pgd, checkpoints, dlr_loss, targeted_dlr_loss
from attacks.eot import EOT
from bench.core.registry import ATTACKS
from bench.core.types import ThreatModel


def test_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, Sec. 3.2).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1]


def test_dlr_is_invariant_to_shift_and_scale_of_the_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 10, generator=g)
    y = torch.randint(0, 10, (5,), generator=g)
    target = (y + 1) % 10
    for loss in (lambda z: dlr_loss(z, y), lambda z: targeted_dlr_loss(z, y, target)):
        assert torch.allclose(loss(logits), loss(3.0 * logits + 7.0), atol=1e-5)
    # Positive exactly when the true class is no longer the top logit.
    assert torch.equal(dlr_loss(logits, y) > 0, logits.argmax(1) != y)


def robust_accuracy(model, x, y, x_adv) -> float:
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


@pytest.mark.skipif(importlib.util.find_spec("torchattacks") is None, reason="torchattacks is not installed")
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_agrees_with_torchattacks_apgd(trained_cnn, mnist_test, norm, eps):
    import torchattacks

    from attacks.adapters import KeepMode

    x, y = mnist_test[0][:64], mnist_test[1][:64]
    threat = ThreatModel(norm, eps)
    ours = auto_pgd(trained_cnn, x, y, threat=threat, steps=50, loss="ce", generator=torch.Generator().manual_seed(0))
    theirs = torchattacks.APGD(KeepMode(trained_cnn), norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=50,
                               loss="ce", seed=0)(x, y)
    assert bool(threat.contains(ours, x).all())
    # Within 3 examples of 64 (the acceptance run on 100 examples is within 1 point).
    assert abs(robust_accuracy(trained_cnn, x, y, ours) - robust_accuracy(trained_cnn, x, y, theirs)) <= 3 / 64


def test_targeted_dlr_breaks_what_ce_breaks(trained_cnn, mnist_test):
    x, y = mnist_test[0][:32], mnist_test[1][:32]
    threat = ThreatModel("linf", 0.15)
    ce = auto_pgd(trained_cnn, x, y, threat=threat, steps=30, loss="ce", generator=torch.Generator().manual_seed(0))
    targeted = auto_pgd(trained_cnn, x, y, threat=threat, steps=30, loss="dlr_targeted", target_classes=3,
                        generator=torch.Generator().manual_seed(0))
    clean = robust_accuracy(trained_cnn, x, y, x)
    assert robust_accuracy(trained_cnn, x, y, targeted) <= robust_accuracy(trained_cnn, x, y, ce) + 2 / 32 < clean


def test_unknown_loss_and_too_few_classes_raise(tiny_model, synthetic_batch):
    x, y = synthetic_batch
    with pytest.raises(ValueError, match="unknown APGD loss"):
        auto_pgd(tiny_model, x, y, threat=ThreatModel("linf", 0.1), loss="hinge")
    with pytest.raises(ValueError, match="at least 4 classes"):
        auto_pgd(tiny_model, x, y, threat=ThreatModel("linf", 0.1), loss="dlr_targeted")


class CoinFlip(nn.Module):
    """A noisy 'defense' that ignores its input: the mean always predicts class 0, single draws often do not."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        noise = torch.randn(x.shape[0], 10, generator=self.generator)
        return (noise + 1.0 * nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.long), 10)
                + 0 * x.flatten(1)[:, :1])


@pytest.mark.parametrize("judge_draws,expect_lucky", [(1, True), (400, False)])
def test_eot_success_is_confirmed_with_fresh_draws(judge_draws, expect_lucky):
    """A 1-draw success is luck here; judged with 400 fresh draws it must never count (APGD and CW)."""
    from attacks.apgd import _apgd_run
    from attacks.cw import carlini_wagner_l2

    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(16, dtype=torch.long)
    threat = ThreatModel("linf", 0.1)
    wrapped = EOT(CoinFlip(), draws=1, judge_draws=judge_draws)
    _, found = _apgd_run(wrapped, x, y, x.clone(), threat, 5,
                         lambda logits, labels, rows: nn.functional.cross_entropy(logits, labels, reduction="none"),
                         (0.0, 1.0))
    _, norms = carlini_wagner_l2(wrapped, x, y, steps=5, binary_steps=1)
    lucky = int(found.sum()) + int(torch.isfinite(norms).sum())
    assert (lucky > 8) if expect_lucky else (lucky == 0)


def test_draw_schedule_ramps_over_the_attack(trained_cnn):
    seen = []

    class Counting(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return trained_cnn(x)

    wrapped = EOT(Counting(), draws=8, draws_start=2, judge_draws=1)
    x = torch.rand(1, 1, 28, 28)
    for fraction in (0.0, 0.5, 1.0):
        wrapped.set_progress(fraction)
        wrapped(x)
    assert seen == [2, 5, 8]
    with pytest.raises(ValueError, match="draws_start"):
        EOT(Counting(), draws=4, draws_start=5)


def test_eot_variants_take_schedule_and_judge_draws():
    for name in ("apgd_linf_eot", "apgd_l2_eot", "cw_l2_eot", "pgd_l2_eot"):
        import inspect

        parameters = inspect.signature(ATTACKS.get(name)).parameters
        assert {"draws", "draws_start", "judge_draws"} <= set(parameters)
