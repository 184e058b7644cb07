"""Plugins (bench.profile.plugins): the example package's entry point, `[run] plugins`, and one-line import errors."""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.profile import plugins
from bench.cli.commands import main
from bench.core.registry import ATTACKS, DATASETS, DEFENSES
from bench.core.types import ThreatModel

PROFILE = """
[run]
examples = 20
seed = 0
batch_size = 20
overhead_draws = [1]
{plugins}
[defenses.linear]
defense = "plugin_linear"
params = {{ steps = 80, batch_size = 64, lr = 0.01 }}
[attacks.{attack}]
eps = [0.05]
"""


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_example_plugin_is_an_installed_entry_point():
    entries = importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)
    assert [e.value for e in entries if e.name == "example"] == ["pixeldp_bench_example_plugin"], (
        "the example plugin is not installed: pip install -e tests/plugin_pkg (tox.ini's test env does)")


def test_plugin_entries_are_listed(capsys):
    assert cli("list") == 0
    out = capsys.readouterr().out
    assert "plugin_fgsm" in out and "plugin_linear" in out
    assert "pixeldp_bench_example_plugin" in out.split("plugins:")[1]  # and named as a loaded plugin


def test_plugin_certificate_is_sound_against_its_own_attack():
    plugins.load_plugins()
    spec = DATASETS.get("mnist5k")
    defense = DEFENSES.get("plugin_linear")(spec, steps=0)
    torch.manual_seed(0)
    defense.attach(defense.build_model())
    x = torch.rand(64, *spec.shape, generator=torch.Generator().manual_seed(0))
    pred, radius = defense.certify(x)
    assert (radius > 0).all()
    # Attacked at 0.99 of its radius no example may change prediction; at 1.5x some must (exact for linear).
    for scale, can_flip in ((0.99, False), (1.5, True)):
        flipped = []
        for i in range(len(x)):
            threat = ThreatModel("linf", float(radius[i]) * scale)
            x_adv = ATTACKS.get("plugin_fgsm")(defense.model, x[i:i + 1], pred[i:i + 1], threat=threat)
            flipped.append(bool(defense.predict(x_adv) != pred[i]))
        assert any(flipped) == can_flip


def test_entry_point_plugin_runs_in_a_profile_and_reaches_every_table(tmp_path, capsys):
    path = tmp_path / "plug.toml"
    path.write_text(PROFILE.format(plugins="", attack="plugin_fgsm"))
    results = tmp_path / "results"
    assert cli("run", path, "--results", results, "--quiet", "--device", "cpu") == 0
    (run_dir,) = [p for p in results.iterdir() if p.is_dir() and p.name.startswith("plug-")]
    tables = sorted(p.name for p in run_dir.glob("*.csv"))
    assert tables == ["accuracy_under_attack.csv", "certified_accuracy.csv", "overhead.csv",
                      "robust_precision_recall.csv"]
    for name in tables:
        frame = pd.read_csv(run_dir / name)
        assert set(frame["defense"]) == {"linear"}, name
    accuracy = pd.read_csv(run_dir / "accuracy_under_attack.csv")
    clean = accuracy[accuracy.attack == "clean"].iloc[0]
    attacked = accuracy[accuracy.attack == "plugin_fgsm"].iloc[0]
    assert clean.accuracy > 0.6 and attacked.accuracy < clean.accuracy
    certified = pd.read_csv(run_dir / "certified_accuracy.csv")
    assert set(certified["norm"]) == {"linf"} and set(certified["certifier"]) == {"plugin_linear"}
    assert certified[certified.threshold == 0].certified.item() == clean.correct
    assert set(pd.read_csv(run_dir / "robust_precision_recall.csv")["attack"]) == {"plugin_fgsm"}
    capsys.readouterr()
    assert cli("report", run_dir) == 0 and "plugin_fgsm" in capsys.readouterr().out


def test_run_plugins_route_imports_a_module_named_in_the_profile(tmp_path, monkeypatch, capsys):
    package = tmp_path / "mine"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "attacks.py").write_text(
        "from attacks.template import register_attack\n"
        "from pixeldp_bench_example_plugin import fast_gradient_sign\n\n"
        "def tiny_fgsm(model, x, y, *, threat, generator=None):\n"
        "    \"\"\"FGSM under another name, registered from a profile's [run] plugins.\"\"\"\n"
        "    return fast_gradient_sign(model, x, y, threat=threat)\n\n"
        "register_attack('profile_fgsm', tiny_fgsm, norm='linf', projected=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "plug.toml"
    path.write_text(PROFILE.format(plugins='plugins = ["mine.attacks"]', attack="profile_fgsm"))
    results = tmp_path / "results"
    try:
        assert cli("run", path, "--results", results, "--quiet", "--device", "cpu") == 0
        assert plugins.loaded_plugins()["mine.attacks"] == "[run] plugins"
        (run_dir,) = [p for p in results.iterdir() if p.is_dir() and p.name.startswith("plug-")]
        frame = pd.read_csv(run_dir / "accuracy_under_attack.csv")
        assert "profile_fgsm" in set(frame["attack"])
    finally:
        _forget("mine.attacks", attack="profile_fgsm")


def _forget(module: str, attack: str) -> None:
    """Undo a test plugin's import so other tests see the registries as they were."""
    sys.modules.pop(module, None)
    sys.modules.pop(module.split(".")[0], None)
    plugins._LOADED.pop(module, None)
    if attack in ATTACKS:
        ATTACKS.unregister(attack)


@pytest.mark.parametrize("listed, message", [
    ('"no_such_plugin_module"', "plugin 'no_such_plugin_module' ([run] plugins) is not installed; install"),
    ('"bad name!"', "not a module name"),
    ("3", "[run] plugins must be a list of module names"),
])
def test_bad_run_plugins_are_one_line_errors(listed, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(PROFILE.format(plugins=f"plugins = [{listed}]" if listed != "3" else "plugins = 3",
                                   attack="plugin_fgsm"))
    assert cli("run", path, "--results", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing written


def test_a_plugin_that_raises_is_named_with_its_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_plugin.py").write_text("import torch\nraise ImportError('needs torch>=9')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "bad.toml"
    path.write_text(PROFILE.format(plugins='plugins = ["broken_plugin"]', attack="plugin_fgsm"))
    assert cli("run", path, "--results", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "plugin 'broken_plugin' ([run] plugins) failed to import: ImportError: needs torch>=9;" in err
    assert err.count("\n") == 1


def test_a_broken_entry_point_fails_every_command_with_one_line(monkeypatch, capsys):
    broken = importlib.metadata.EntryPoint(name="broken", value="no_such_entry_point_module",
                                           group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group: [broken])
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    assert cli("list") == 2
    err = capsys.readouterr().err
    assert "plugin 'no_such_entry_point_module' (entry point 'broken' of an unknown package) is not installed" in err
    assert "uninstall it" in err and err.count("\n") == 1


def test_plugin_code_is_fingerprinted_even_from_site_packages(monkeypatch):
    """Editing an installed plugin must change its cells' keys, as editing a built-in attack does."""
    import pixeldp_bench_example_plugin as plugin

    from bench.execution import fingerprint

    plugins.load_plugins()
    plugin_file = Path(plugin.__file__).resolve()
    # Pretend pip copied the plugin into site-packages (a library root, normally not fingerprinted).
    monkeypatch.setattr(fingerprint, "_LIBRARY_ROOTS", (*fingerprint._LIBRARY_ROOTS, str(plugin_file.parents[1])))
    assert plugin_file in fingerprint._closure(plugin.fast_gradient_sign)
    monkeypatch.setattr(plugins, "_LOADED", {})  # the same package, not loaded as a plugin: library code
    assert plugin_file not in fingerprint._closure(plugin.fast_gradient_sign)
