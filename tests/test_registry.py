"""Registry: typed metadata validated at registration, duplicates raise, unknown names list the valid ones."""
import dataclasses

import pytest
import torch

from bench.core.defense import Defense
from bench.core.registry import (ATTACKS, DATASETS, DEFENSES, MODELS, AttackInfo, DefenseInfo, ModelInfo, Registry,
                                 RegistrationError, UnknownNameError)


def test_register_get_and_info():
    reg = Registry("widget", AttackInfo)
    reg.register("a", 1, norm="l2", minimum_norm=True, eot=False)

    @reg.register("b", info=AttackInfo(norm="linf", minimum_norm=False, eot=True, randomized_only=True))
    def b():
        return 2

    assert reg.get("a") == 1 and reg.get("b")() == 2
    assert reg.info("a") == AttackInfo(norm="l2", minimum_norm=True, eot=False)
    assert reg.info("b").randomized_only and not reg.info("a").randomized_only
    assert reg.meta("a")["norm"] == "l2"  # a plain-dict view of the same info
    assert "a" in reg and "c" not in reg
    with pytest.raises(dataclasses.FrozenInstanceError):
        reg.info("a").norm = "l1"  # frozen


@pytest.mark.parametrize("meta, message", [
    ({"minimum_norm": False, "eot": False}, "attack 'x': missing metadata key 'norm'"),
    ({"norm": "l2", "minimum_norm": False, "eot": False, "colour": "red"},
     "attack 'x': unknown metadata key 'colour'; valid keys: norm, minimum_norm, eot, randomized_only"),
    ({"norm": "l3", "minimum_norm": False, "eot": False}, "attack 'x': norm 'l3' is not one of l1, l2, linf"),
    ({"norm": "l2", "minimum_norm": "yes", "eot": False}, "attack 'x': metadata key 'minimum_norm' = 'yes' should be"),
    ({"norm": "l2", "minimum_norm": False, "eot": False, "preset_of": 3}, "metadata key 'preset_of' = 3"),
])
def test_bad_attack_metadata_fails_at_registration(meta, message):
    reg = Registry("attack", AttackInfo)
    with pytest.raises(RegistrationError) as info:
        reg.register("x", lambda: None, **meta)
    assert message in str(info.value)
    assert "x" not in reg


def test_info_and_keywords_are_exclusive_and_typed():
    reg = Registry("attack", AttackInfo)
    with pytest.raises(RegistrationError, match="either info= or keyword metadata"):
        reg.register("x", 1, info=AttackInfo("l2", False, False), eot=True)
    with pytest.raises(RegistrationError, match="info must be a AttackInfo"):
        reg.register("x", 1, info=DefenseInfo(randomized=False, certified=False))
    with pytest.raises(RegistrationError, match="widget 'x': widget entries take no metadata"):
        Registry("widget").register("x", 1, flag=True)


def _plain_loss(self, model, x, y, step):
    return torch.nn.functional.cross_entropy(model(x), y)


def test_defense_contract_is_checked_at_registration():
    def scratch(name, bases=(Defense,), **members):
        return type(name, bases, members)

    with pytest.raises(RegistrationError, match="defense 'd': NoLoss does not implement loss"):
        DEFENSES.register("d", scratch("NoLoss"), family="x", randomized=False, certified=False)
    with pytest.raises(RegistrationError, match="lacks certify"):
        DEFENSES.register("d", scratch("Claims", loss=_plain_loss), family="x", randomized=False, certified=True)
    certify = lambda self, x: (x, x)  # noqa: E731
    norm = staticmethod(lambda params: "l2")
    with pytest.raises(RegistrationError, match="register it with certified=True"):
        DEFENSES.register("d", scratch("Hides", loss=_plain_loss, certify=certify, certified_norm=norm),
                          family="x", randomized=False, certified=False)
    with pytest.raises(RegistrationError, match="certified_norm='linf' but"):
        DEFENSES.register("d", scratch("Norm", loss=_plain_loss, certify=certify, certified_norm=norm),
                          family="x", randomized=False, certified=True, certified_norm="linf")
    with pytest.raises(RegistrationError, match="eval_params names 'draws'"):
        DEFENSES.register("d", scratch("Draws", loss=_plain_loss), family="x", randomized=False, certified=False,
                          eval_params=("draws",))
    with pytest.raises(RegistrationError, match="missing metadata key 'certified'"):
        DEFENSES.register("d", scratch("Plain", loss=_plain_loss), randomized=False)
    with pytest.raises(RegistrationError, match="metadata key 'family' = 3 should be"):
        DEFENSES.register("d", scratch("Plain", loss=_plain_loss), randomized=False, certified=False, family=3)
    with pytest.raises(RegistrationError, match="subclass of bench.core.defense.Defense"):
        DEFENSES.register("d", object, family="x", randomized=False, certified=False)
    assert "d" not in DEFENSES


def test_builtin_metadata_is_typed():
    for name in ATTACKS.names():
        assert isinstance(ATTACKS.info(name), AttackInfo)
    for name in DEFENSES.names():
        assert isinstance(DEFENSES.info(name), DefenseInfo)
    for name in MODELS.names():
        assert isinstance(MODELS.info(name), ModelInfo)
    assert MODELS.info("wide_resnet").shape == (3, 32, 32) and MODELS.info("cnn_small") == ModelInfo()
    assert ATTACKS.info("cw_l2_paper").preset_of == "cw_l2"
    assert ATTACKS.info("square_linf@torchattacks").gradient_free
    builtin = {n for n in DEFENSES.names() if DEFENSES.info(n).certified} - {"plugin_linear"}  # the test plugin's
    assert builtin == {"pixeldp", "randomized_smoothing", "wong_kolter"}
    assert DEFENSES.info("user_model").family == "user model"


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
