"""Every registered defense keeps the Defense contract (in the spirit of AutoAttack's checks.py).

Runs over every name in DEFENSES, so a new defense (or a plugin's) is checked with no edit here:
shapes of predict / judge, deterministic defenses repeat themselves, randomized ones really vary
(AutoAttack's check_randomized), certified radii are finite, >= 0, 0 on abstentions, positive where
the model is provably constant, and 0 where the model cannot tell the classes apart.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.core.data import DatasetSpec
from bench.core.defense import CertifiedDefense, Defense
from bench.core.registry import DEFENSES, RegistrationError

SPEC = DatasetSpec(name="contract", shape=(1, 28, 28), classes=4, load=lambda *a: None, default_model="cnn_small")
N = 6
# Tiny settings per built-in defense (untrained models, few draws); a defense not listed runs with
# its defaults, which must therefore build on a 1x28x28, 4-class dataset.
TINY = {
    "pixeldp": {"draws_certify": 200, "draws_attack": 20, "draws_predict": 10, "L": 0.1, "parseval_iters": 1},
    "randomized_smoothing": {"sigma": 0.25, "draws_select": 10, "draws_certify": 200, "draws_attack": 20,
                             "draws_predict": 20},
    "wong_kolter": {"bound": "ibp", "bisection_steps": 3, "eps": 0.05},
    "user_model": {"factory": "test_defense_contract:tiny_net"},
}


def tiny_net() -> nn.Module:
    """A user's network: (N, 1, 28, 28) -> 4 logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 4))


def build(name: str, seed: int = 0) -> Defense:
    """The defense `name` with an untrained model attached, noise seeded."""
    torch.manual_seed(seed)
    defense = DEFENSES.get(name)(SPEC, **TINY.get(name, {}))
    defense.attach(defense.starting_model(), torch.Generator().manual_seed(seed))
    return defense


def images(seed: int = 1) -> torch.Tensor:
    return torch.rand(N, *SPEC.shape, generator=torch.Generator().manual_seed(seed))


def set_output(defense: Defense, bias: torch.Tensor) -> None:
    """Make the last linear layer output the constant `bias` (K,): every input gets the same logits."""
    last = [m for m in defense.model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(bias)


@pytest.fixture(params=DEFENSES.names())
def name(request) -> str:
    return request.param


def test_predict_and_judge_shapes(name):
    defense, x = build(name), images()
    pred = defense.predict(x)
    assert pred.shape == (N,) and not pred.dtype.is_floating_point
    assert ((pred >= -1) & (pred < SPEC.classes)).all()  # -1: an abstention
    labels, radius = defense.judge(x)
    assert labels.shape == (N,)
    assert (radius is not None) == DEFENSES.info(name).certified
    assert defense.model(x).shape == (N, SPEC.classes)


def test_deterministic_defenses_repeat_and_randomized_ones_vary(name):
    defense, x = build(name), images()
    with torch.no_grad():
        first, second = defense.model(x), defense.model(x)
    if DEFENSES.info(name).randomized:
        assert not torch.equal(first, second), "a defense registered randomized=True gives identical logits twice"
    else:
        assert torch.equal(first, second), "a defense registered randomized=False gives different logits twice"
        assert torch.equal(defense.predict(x), defense.predict(x))


def test_same_seed_same_noise(name):
    """Noise comes from the attached generator: two defenses seeded alike predict alike."""
    x = images()
    assert torch.equal(build(name, seed=3).predict(x), build(name, seed=3).predict(x))


def test_certified_radii_are_sound_on_constant_models(name):
    info = DEFENSES.info(name)
    defense, x = build(name), images()
    if not info.certified:
        assert not isinstance(defense, CertifiedDefense)
        pytest.skip(f"{name} certifies nothing")
    assert isinstance(defense, CertifiedDefense)
    pred, radius = defense.certify(x)
    assert pred.shape == radius.shape == (N,)
    assert torch.isfinite(radius).all() and (radius >= 0).all()
    assert (radius[pred == -1] == 0).all()  # an abstention certifies nothing
    # A model whose logits do not depend on the input is robust at every radius: radii must be positive.
    set_output(defense, torch.tensor([0.0, 12.0, 0.0, 0.0]))
    pred, radius = defense.certify(x)
    assert (pred == 1).all() and (radius > 0).all(), f"{name} certifies nothing on a constant classifier"
    # Tied logits give no margin: nothing can be certified for any label except by the tie-break.
    set_output(defense, torch.zeros(SPEC.classes))
    pred, radius = defense.certify(x)
    assert torch.isfinite(radius).all() and (radius >= 0).all()
    if info.family != "randomized smoothing":  # the base classifier's argmax breaks ties: class 0 always wins
        assert (radius == 0).all(), f"{name} certified radii {radius.tolist()} with tied logits"


def test_a_defense_missing_its_loss_fails_at_registration():
    class Incomplete(Defense):
        """No `loss`: not a trainable defense."""

    with pytest.raises(RegistrationError, match="does not implement loss"):
        DEFENSES.register("contract_incomplete", Incomplete, family="x", randomized=False, certified=False)
    assert "contract_incomplete" not in DEFENSES
