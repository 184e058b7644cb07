"""ThreatModel geometry and Cell keys."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.execution.keys import cell_key
from bench.core.types import Cell, ThreatModel


@settings(max_examples=40, deadline=None)
@given(norm=st.sampled_from(["l2", "linf"]), eps=st.floats(0, 3), seed=st.integers(0, 2**31 - 1))
def test_project_lands_in_ball_and_box(norm, eps, seed):
    g = torch.Generator().manual_seed(seed)
    threat = ThreatModel(norm, eps)
    x = torch.rand(5, 1, 6, 6, generator=g)
    x_adv = x + 3 * torch.randn(x.shape, generator=g)
    projected = threat.project(x_adv, x)
    assert threat.contains(projected, x).all()
    assert threat.contains(threat.random_init(x, g), x).all()


def test_project_keeps_points_already_inside():
    threat = ThreatModel("l2", 1.0)
    x = torch.full((2, 1, 4, 4), 0.5)
    inside = x + 0.01
    assert torch.allclose(threat.project(inside, x), inside)


def test_norm_of_values():
    delta = torch.zeros(2, 1, 2, 2)
    delta[0, 0, 0, 0], delta[0, 0, 1, 1] = 3.0, -4.0
    assert ThreatModel("l2", 1).norm_of(delta).tolist() == [5.0, 0.0]
    assert ThreatModel("linf", 1).norm_of(delta).tolist() == [4.0, 0.0]


def test_bad_threat_models():
    with pytest.raises(ValueError, match="unknown norm"):
        ThreatModel("l0", 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        ThreatModel("l2", math.nan)


def test_cell_key_is_stable_and_sensitive():
    a = Cell("mnist5k", "undefended", "pgd_l2", "l2", 0.5, attack_params={"steps": 10})
    b = Cell("mnist5k", "undefended", "pgd_l2", "l2", 0.5, attack_params={"steps": 10})
    code = {"attack": "a1", "defense": "d1", "harness": "h1"}
    assert cell_key(a, code) == cell_key(b, code)
    other = Cell("mnist5k", "undefended", "pgd_l2", "l2", 0.5, attack_params={"steps": 11})
    assert cell_key(a, code) != cell_key(other, code)
    assert cell_key(a, code) != cell_key(a, code | {"attack": "a2"})
    assert a.defense_label == "undefended" and a.attack_label == "pgd_l2"
