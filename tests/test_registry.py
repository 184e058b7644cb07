"""Registry: duplicates raise, unknown names list the valid ones, wildcard names()."""
import pytest

from bench.registry import ATTACKS, DATASETS, DEFENSES, Registry, UnknownNameError


def test_register_get_and_meta():
    reg = Registry("widget")
    reg.register("a", 1, flag=True)

    @reg.register("b")
    def b():
        return 2

    assert reg.get("a") == 1 and reg.get("b")() == 2
    assert reg.meta("a") == {"flag": True}
    assert "a" in reg and "c" not in reg


def test_duplicate_raises():
    reg = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_unknown_lists_valid_names():
    reg = Registry("widget")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    with pytest.raises(UnknownNameError) as info:
        reg.get("gamma")
    assert str(info.value) == "unknown widget 'gamma'; valid names: alpha, beta"


def test_wildcard_names():
    reg = Registry("widget")
    for name in ("pgd_l2", "pgd_linf", "cw_l2"):
        reg.register(name, name)
    assert reg.names() == ["cw_l2", "pgd_l2", "pgd_linf"]
    assert reg.names("pgd_*") == ["pgd_l2", "pgd_linf"]
    assert reg.names("*_l2") == ["cw_l2", "pgd_l2"]


def test_builtins_registered():
    assert "mnist5k" in DATASETS.names()
    assert "undefended" in DEFENSES.names()
    assert {"pgd_l2", "pgd_linf"} <= set(ATTACKS.names())
