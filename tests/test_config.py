"""Profiles: shipped ones parse; every malformed input gives a ConfigError naming the problem."""
import pytest

from bench.profile.config import ConfigError, load_profile, parse_profile, shipped_profiles
from bench.core.registry import UnknownNameError

BASE = """
[run]
examples = 10
[defenses.plain]
defense = "undefended"
params = { steps = 5 }
[attacks.pgd_linf]
eps = [0.1, 0.2]
params = { steps = 3 }
"""


def test_shipped_smoke_profile_parses():
    assert "smoke" in shipped_profiles()
    profile = load_profile("smoke")
    assert profile.cells and profile.cells[0].attack == "none"
    assert all(c.dataset == "mnist5k" for c in profile.cells)


def test_cells_expand_defense_by_attack_by_eps():
    profile = parse_profile(BASE, "t")
    assert [(c.attack, c.eps) for c in profile.cells] == [("none", None), ("pgd_linf", 0.1), ("pgd_linf", 0.2)]
    # Resolved: the attack's signature defaults are part of the cell (and so of its key).
    assert profile.cells[1].attack_params == {"steps": 3, "step_size": None, "restarts": 1, "random_start": True,
                                              "loss": "ce"}
    assert profile.cells[0].examples == 10


def test_overrides_change_cells():
    profile = parse_profile(BASE, "t", examples=3, seed=7, max_steps=2)
    assert {(c.examples, c.seed, c.max_steps) for c in profile.cells} == {(3, 7, 2)}


@pytest.mark.parametrize("text, message", [
    (BASE + "\n[extra]\n", "unknown key 'extra'"),
    (BASE.replace("examples = 10", "examples = 10\nexampels = 3"), "unknown key 'exampels' in [run]"),
    (BASE.replace('defense = "undefended"', 'defense = "undefended"\nparam = 1'), "unknown key 'param'"),
    (BASE.replace("steps = 5", "stepz = 5"), "bad parameters for defense 'undefended'"),
    (BASE.replace("steps = 3", "stepz = 3"), "unknown parameter 'stepz' for attack 'pgd_linf'"),
    (BASE.replace("eps = [0.1, 0.2]", "eps = [-0.1]"), "non-negative finite numbers"),
    (BASE.replace("eps = [0.1, 0.2]", ""), "needs 'eps'"),
    ("[run]\nexamples = 3\n", "no [defenses.*] table"),
    ("this is = = not toml", "not valid TOML"),
])
def test_malformed_profiles(text, message):
    with pytest.raises(ConfigError) as info:
        parse_profile(text, "t")
    assert message in str(info.value)


@pytest.mark.parametrize("text, message", [
    (BASE.replace('defense = "undefended"', 'defense = "undefendd"'), "unknown defense 'undefendd'; valid names:"),
    (BASE.replace("[attacks.pgd_linf]", "[attacks.pgd_linf]\nattack = \"pgd_lin\""), "unknown attack 'pgd_lin'"),
    (BASE.replace("examples = 10", 'examples = 10\ndatasets = ["mnist6k"]'), "unknown dataset 'mnist6k'"),
])
def test_unknown_names_list_valid_ones(text, message):
    with pytest.raises(UnknownNameError) as info:
        parse_profile(text, "t")
    assert message in str(info.value)


def test_unknown_profile_name():
    with pytest.raises(ConfigError, match="unknown profile 'smok'; shipped profiles: .*smoke"):
        load_profile("smok")


def test_an_attack_entry_can_use_a_nested_subset_of_the_examples():
    from bench.core.data import load_split, select_examples

    text = BASE.replace("[attacks.pgd_linf]", "[attacks.pgd_linf]\nexamples = 4")
    profile = parse_profile(text, "t")
    assert [c.examples for c in profile.cells] == [10, 4, 4]
    test = load_split("mnist5k", "test")
    for small, large in ((4, 10), (100, 200), (37, 200)):
        inner, outer = select_examples(test, small, 0), select_examples(test, large, 0)
        assert set(inner.tolist()) <= set(outer.tolist())  # worst cases over attacks stay per example
    with pytest.raises(ConfigError, match="attacks.pgd_linf.examples must be a whole number"):
        parse_profile(BASE.replace("[attacks.pgd_linf]", "[attacks.pgd_linf]\nexamples = 0"), "t")


def test_overhead_draws_are_a_run_setting():
    profile = parse_profile(BASE.replace("[run]", "[run]\noverhead_draws = [1, 10]"), "t")
    assert profile.overhead_draws == [1, 10] and profile.settings()["overhead_draws"] == [1, 10]


def test_max_steps_zero_keeps_inner_counts_valid():
    """--max-steps 0 trains and attacks nothing, but counts a defense needs >= 1 (Madry's attack_steps) stay 1."""
    profile = load_profile("smoke", max_steps=0)
    madry = next(c for c in profile.cells if c.defense == "madry")
    assert madry.defense_params["steps"] == 0 and madry.defense_params["attack_steps"] == 1
    cw = next(c for c in profile.cells if c.attack == "cw_l2")
    assert cw.attack_params["steps"] == 0 and cw.attack_params["binary_steps"] == 1
