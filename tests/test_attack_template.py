"""The attack template: an attack written as its algorithm alone gets the shared checks and registration for free."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from attacks.template import AttackOutputError, register_attack, templated
from attacks.variants import with_eot
from bench.core.registry import ATTACKS, Registry, RegistrationError
from bench.core.types import ThreatModel


def scratch_registry() -> Registry:
    """An empty attack registry that validates metadata like ATTACKS does (typed info when it has one)."""
    info_type = getattr(ATTACKS, "info_type", None)
    return Registry("attack", info_type) if info_type is not None else Registry("attack")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


class Calls:
    """Counts how often a toy algorithm really ran."""

    def __init__(self):
        self.count = 0


def make_toy(calls: Calls, push: float = 10.0):
    """A deliberately careless algorithm: pushes every pixel by `push`, far outside any ball and the box."""

    def toy(model, x, y, *, threat: ThreatModel, steps: int = 3, generator: torch.Generator | None = None):
        """Toy attack."""
        calls.count += 1
        return x + push * torch.sign(torch.randn(x.shape, generator=generator))

    return toy


def test_a_toy_attack_gets_every_check_and_registers(tiny_model, batch):
    x, y = batch
    calls, registry = Calls(), scratch_registry()
    toy = register_attack("toy", make_toy(calls), norm="linf", registry=registry)
    assert registry.names() == ["toy"] and registry.get("toy") is toy
    assert {k: registry.meta("toy")[k] for k in ("norm", "minimum_norm", "eot")} == \
        {"norm": "linf", "minimum_norm": False, "eot": False}
    # The signature is the algorithm's: profiles are validated against its hyperparameters.
    assert list(inspect.signature(toy).parameters) == ["model", "x", "y", "threat", "steps", "generator"]

    # eps = 0 and zero steps return x itself (a copy) without running the algorithm.
    for threat, hparams in ((ThreatModel("linf", 0.0), {}), (ThreatModel("linf", 0.1), {"steps": 0})):
        out = toy(tiny_model, x, y, threat=threat, **hparams)
        assert torch.equal(out, x) and out is not x
    assert calls.count == 0

    # The output is projected into the ball and the box: exactly ThreatModel.project of the raw output.
    threat = ThreatModel("linf", 0.1)
    out = toy(tiny_model, x, y, threat=threat, generator=torch.Generator().manual_seed(1))
    raw = make_toy(Calls())(tiny_model, x, y, threat=threat, generator=torch.Generator().manual_seed(1))
    assert calls.count == 1 and not bool(threat.contains(raw, x).any())
    assert torch.equal(out, threat.project(raw, x)) and bool(threat.contains(out, x, tol=1e-6).all())
    assert not out.requires_grad

    # Any other norm is refused with one message naming the attack and both norms.
    with pytest.raises(ValueError, match="toy is an linf attack; got a l2 threat model"):
        toy(tiny_model, x, y, threat=ThreatModel("l2", 1.0))
    with pytest.raises(ValueError, match="one label per image"):
        toy(tiny_model, x, y[:3], threat=threat)
    assert calls.count == 1


def test_the_decorator_form_and_minimum_norm_budget(tiny_model, batch):
    x, y = batch
    registry = scratch_registry()

    @register_attack("nudge", norm="l2", minimum_norm=True, registry=registry)
    def nudge(model, x, y, *, threat: ThreatModel, size: float = 0.5, generator=None):
        """Moves every image by an L2 step of `size` (clipped to the box)."""
        step = torch.ones_like(x) / math.sqrt(x[0].numel())
        return (x + size * step).clamp(0, 1)

    assert registry.meta("nudge")["minimum_norm"] is True
    found = nudge(tiny_model, x, y, threat=ThreatModel("l2", math.inf))
    moved = ThreatModel("l2", math.inf).norm_of(found - x)
    assert bool((moved > 0).all()) and bool((moved <= 0.5 + 1e-6).all())
    # Under a finite budget, a minimum-norm attack returns x wherever its example is larger.
    small = moved.min().item() / 2
    assert torch.equal(nudge(tiny_model, x, y, threat=ThreatModel("l2", small)), x)
    large = moved.max().item() * 1.01
    assert torch.equal(nudge(tiny_model, x, y, threat=ThreatModel("l2", large)), found)


def test_an_algorithm_that_claims_to_project_is_checked(tiny_model, batch):
    x, y = batch
    liar = templated(make_toy(Calls()), norms="linf", projected=True, name="liar")
    with pytest.raises(AttackOutputError, match="attack 'liar' returned 6 example\\(s\\) outside the linf ball"):
        liar(tiny_model, x, y, threat=ThreatModel("linf", 0.1), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("options", [{}, {"projected": True}, {"minimum_norm": True}])
def test_nan_rows_are_an_error_not_a_failed_attack(tiny_model, batch, options):
    """No projection gives a NaN pixel a meaning: the template refuses it whatever it does to the output."""
    x, y = batch

    def diverged(model, x, y, *, threat: ThreatModel, generator=None):
        out = x.clone()
        out[2, 0, 0, 0] = float("nan")
        return out

    attack = templated(diverged, norms="linf", name="diverged", **options)
    with pytest.raises(AttackOutputError, match="attack 'diverged' returned 1 example\\(s\\) with NaN or inf"):
        attack(tiny_model, x, y, threat=ThreatModel("linf", 0.1))


def test_attacks_register_only_through_the_template():
    """ATTACKS refuses what did not come through register_attack, a templated function included: one line naming
    the fix."""
    def bare(model, x, y, *, threat, generator=None):
        return x

    for function in (bare, templated(bare, norms="linf")):
        with pytest.raises(RegistrationError, match="register it with attacks.template.register_attack") as error:
            ATTACKS.register("bare_test", function, norm="linf", minimum_norm=False, eot=False)
        assert "\n" not in str(error.value) and "bare_test" not in ATTACKS


def test_generic_attacks_are_restricted_per_norm_and_keep_their_contract(tiny_model, batch):
    x, y = batch
    registry = scratch_registry()
    generic = templated(make_toy(Calls(), push=0.05), norms=("linf", "l2"))
    linf = register_attack("toy_linf", generic, norm="linf", registry=registry)
    assert linf.contract.norms == ("linf",) and linf.contract.algorithm is generic.contract.algorithm
    with pytest.raises(ValueError, match="supports \\('linf', 'l2'\\), not 'l1'"):
        register_attack("toy_l1", generic, norm="l1", registry=registry)
    with pytest.raises(ValueError, match="minimum_norm comes from"):
        register_attack("toy_l2", generic, norm="l2", minimum_norm=True, registry=registry)
    with pytest.raises(TypeError, match="no hyperparameter 'queries'"):
        templated(make_toy(Calls()), norms="linf", idle=("queries",))
    assert registry.names() == ["toy_linf"]


def test_eot_variant_of_a_templated_attack(batch):
    """with_eot keeps the template (checks run once, outside EOT) and adds the EOT hyperparameters."""
    x, y = batch
    seen = []

    def probe(model, x, y, *, threat: ThreatModel, steps: int = 2, generator=None):
        seen.append(type(model).__name__)
        return x

    eot = with_eot(templated(probe, norms="l2"), "probe_eot", draws=5)
    parameters = inspect.signature(eot).parameters
    assert {"steps", "draws", "chunk", "average", "draws_start", "judge_draws"} <= set(parameters)
    assert parameters["draws"].default == 5
    assert torch.equal(eot(torch.nn.Identity(), x, y, threat=ThreatModel("l2", 1.0)), x) and seen == ["EOT"]
    assert torch.equal(eot(torch.nn.Identity(), x, y, threat=ThreatModel("l2", 0.0)), x) and seen == ["EOT"]
    with pytest.raises(TypeError, match="made with attacks.template"):
        with_eot(probe, "raw_eot")


def test_every_registered_attack_uses_the_template():
    """Every attack, built-in or a plugin's (register_attack is the one way in), is templated: one norm (its
    registered one) and its registered output kind."""
    builtins = [n for n in ATTACKS.names() if ATTACKS.get(n).__module__.startswith("attacks.")]
    assert len(builtins) >= 27
    for name in ATTACKS.names():
        contract = ATTACKS.get(name).contract
        meta = ATTACKS.meta(name)
        assert contract.norms == (meta["norm"],), name
        assert contract.minimum_norm == meta["minimum_norm"], name
