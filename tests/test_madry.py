"""Madry PGD adversarial training: more robust than undefended, fast variant, overfitting check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.pgd import projected_gradient_descent
from bench.core.data import load_split
from bench.core.registry import DATASETS, DEFENSES
from bench.execution.training import fit
from bench.core.types import ThreatModel
from defenses.madry import CatastrophicOverfittingWarning, Madry

EPS = 0.1


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> float:
    x_adv = projected_gradient_descent(model, x, y, threat=ThreatModel("linf", eps), steps=20,
                                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def test_registration_flags_and_params():
    info = DEFENSES.info("madry")
    assert (info.family, info.randomized, info.certified, info.eval_params) == ("Madry", False, False, ())
    spec = DATASETS.get("mnist5k")
    defense = DEFENSES.get("madry")(spec, norm="l2", eps=1.5, attack_steps=7, step_size=0.3, steps=10)
    assert defense.threat == ThreatModel("l2", 1.5) and defense.attack_steps == 7
    assert defense.train_config.steps == 10  # `steps` stays the optimizer-step count of every defense
    with pytest.raises(ValueError):
        DEFENSES.get("madry")(spec, norm="l3")


@pytest.mark.slow
def test_adversarial_training_beats_undefended_under_pgd(trained_cnn, mnist_test):
    x, y = mnist_test
    spec = DATASETS.get("mnist5k")
    defense = Madry(spec, eps=EPS, attack_steps=3, steps=150, batch_size=64, check_every=0)
    torch.manual_seed(0)
    model = defense.build_model()
    fit(defense, model, load_split("mnist5k", "train"), steps=150, seed=0, device=torch.device("cpu"),
        progress=False)
    defense.attach(model)
    clean = (defense.predict(x) == y).float().mean().item()
    robust, baseline = pgd_accuracy(model, x, y), pgd_accuracy(trained_cnn, x, y)
    print(f"mnist5k linf {EPS}: madry clean {clean:.3f} pgd {robust:.3f}; undefended pgd {baseline:.3f}")
    assert clean > 0.8
    assert robust > baseline + 0.15


def test_fast_variant_is_one_fgsm_step_from_a_random_start(tiny_model, synthetic_batch):
    x, y = synthetic_batch
    spec = DATASETS.get("mnist5k")
    defense = Madry(spec, eps=0.2, fast=True, check_every=0)
    x_adv = defense.adversarial(tiny_model, x, y)
    threat = ThreatModel("linf", 0.2)
    start = threat.random_init(x, torch.Generator().manual_seed(defense.attack_seed)).requires_grad_(True)
    grad, = torch.autograd.grad(nn.functional.cross_entropy(tiny_model(start), y, reduction="sum"), start)
    expected = threat.project(start.detach() + 1.25 * 0.2 * grad.sign(), x)
    torch.testing.assert_close(x_adv, expected)
    assert bool(threat.contains(x_adv, x).all())
    again = Madry(spec, eps=0.2, fast=True, check_every=0).adversarial(tiny_model, x, y)
    torch.testing.assert_close(x_adv, again)  # seeded random starts


def test_fast_training_runs_and_monitors_pgd_accuracy():
    spec = DATASETS.get("mnist5k")
    defense = Madry(spec, eps=EPS, fast=True, steps=60, batch_size=32, lr=3e-3, check_every=20, check_examples=32,
                    eval_steps=5, arch_params={"width": 8, "hidden": 32})
    torch.manual_seed(0)
    model = defense.build_model()
    losses = fit(defense, model, load_split("mnist5k", "train"), steps=60, seed=0, device=torch.device("cpu"),
                 progress=False)
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert [step for step, _ in defense.history] == [20, 40, 60]
    assert defense._monitor is not None
    # The last check measured the final model: the same seeded PGD on the monitor batch gives the same value.
    assert defense.history[-1][1] == defense.robust_accuracy(model, *defense._monitor)
    # Untrained networks of this shape score at most 0.22 under that PGD (20 initializations, measured);
    # 60 fast adversarial steps reach 0.5 (measured), so training really raised the monitored accuracy.
    assert defense.history[-1][1] >= 0.4
    assert defense.history[-1][1] > defense.history[0][1]


class ConstantClassifier(nn.Module):
    """Logits that ignore the input and favor one class (PGD cannot change its predictions)."""

    def __init__(self, favored: int, classes: int = 3):
        super().__init__()
        self.logits = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(favored), classes).float())

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_overfitting_check_flags_a_collapse(synthetic_batch):
    x, _ = synthetic_batch
    y = torch.zeros(len(x), dtype=torch.long)
    defense = Madry(DATASETS.get("mnist5k"), eps=EPS, fast=True, check_every=1, eval_steps=2)
    robust = ConstantClassifier(favored=0)
    defense.loss(robust, x, y, step=0)  # the first batch becomes the monitor batch
    defense.after_step(robust)
    assert defense.history == [(1, 1.0)] and defense.overfit_steps == []
    collapsed = ConstantClassifier(favored=1)
    defense.loss(collapsed, x, y, step=1)
    with pytest.warns(CatastrophicOverfittingWarning, match="catastrophic overfitting at step 2"):
        defense.after_step(collapsed)
    assert defense.history[-1] == (2, 0.0) and defense.overfit_steps == [2]


def test_eps_ramp_grows_the_training_budget_linearly():
    from bench.core.registry import DATASETS
    from defenses.madry import Madry

    defense = Madry(DATASETS.get("mnist5k"), eps=0.3, eps_ramp_steps=4, attack_steps=3, step_size=0.1)
    assert [defense.eps_fraction(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    model = defense.build_model().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    early = defense.adversarial(model, x, y, step=0)
    assert (early - x).abs().max() <= 0.075 + 1e-6
    late = defense.adversarial(model, x, y, step=10)
    assert 0.075 < (late - x).abs().max() <= 0.3 + 1e-6
