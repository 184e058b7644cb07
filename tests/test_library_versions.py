"""Library versions in the keys: torch for every cell, a library for the cells running it; the dry run names both."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.execution.library_versions as library_versions
from bench.cli.commands import main
from bench.core.registry import ATTACKS, DEFENSES, RegistrationError
from bench.core.types import Cell
from bench.execution.environment import environment
from bench.execution.runner import keyed
from bench.profile import plugins
from bench.profile.config import parse_profile

REPO = Path(__file__).resolve().parents[1]

GRID = """
[run]
seed = 0
examples = 10
[defenses.plain]
defense = "undefended"
params = { steps = 20 }
[defenses.smoothed]
defense = "randomized_smoothing"
params = { steps = 20, draws_certify = 20, draws_select = 5 }
[attacks.pgd_linf]
eps = [0.1]
[attacks.ta_pgd]
attack = "pgd_linf@torchattacks"
eps = [0.1]
[attacks.art_pgd]
attack = "pgd_linf@art"
eps = [0.1]
[attacks.ta_autoattack]
attack = "autoattack@torchattacks"
eps = [0.1]
"""


def faked(monkeypatch, distribution: str, version: str) -> None:
    """Pretend `distribution` is installed at `version` (every other lookup stays real)."""
    real = library_versions.library_version
    monkeypatch.setattr(library_versions, "library_version",
                        lambda name: version if name == distribution else real(name))


def changed_cells(monkeypatch, cells: list[Cell], distribution: str) -> set[str]:
    """Labels (defense / attack) of the cells whose key changes when `distribution`'s version changes."""
    before = [key for key, _ in keyed(cells)]
    faked(monkeypatch, distribution, "99.0.0")
    after = [key for key, _ in keyed(cells)]
    monkeypatch.undo()
    return {f"{c.defense_label} / {c.attack_label}" for c, a, b in zip(cells, before, after, strict=True) if a != b}


@pytest.fixture(scope="module")
def grid() -> list[Cell]:
    return parse_profile(GRID, "grid").cells


def test_a_torch_version_change_recomputes_every_cell(monkeypatch, grid):
    assert changed_cells(monkeypatch, grid, "torch") == {f"{c.defense_label} / {c.attack_label}" for c in grid}


@pytest.mark.parametrize("distribution, attacks", [("torchattacks", {"ta_pgd", "ta_autoattack"}),
                                                   ("adversarial-robustness-toolbox", {"art_pgd"})])
def test_a_library_version_change_recomputes_only_the_cells_that_run_it(monkeypatch, grid, distribution, attacks):
    expected = {f"{d} / {a}" for d in ("plain", "smoothed") for a in attacks}
    assert changed_cells(monkeypatch, grid, distribution) == expected


def test_a_defense_declares_the_libraries_its_certificates_run(monkeypatch, grid):
    # Randomized smoothing certifies with scipy.stats: its cells (clean ones too) follow scipy's version.
    assert changed_cells(monkeypatch, grid, "scipy") == {f"smoothed / {c.attack_label}" for c in grid
                                                         if c.defense_label == "smoothed"}
    assert DEFENSES.info("undefended").libraries == ()


def test_every_library_adapter_declares_its_library():
    for name in ATTACKS.names("*@torchattacks"):
        assert ATTACKS.info(name).libraries == ("torchattacks",), name
    for name in ATTACKS.names("*@art"):
        assert ATTACKS.info(name).libraries == ("adversarial-robustness-toolbox",), name
    assert ATTACKS.info("apgd_linf").libraries == ()


def test_library_names_are_checked_at_registration():
    with pytest.raises(RegistrationError, match="libraries holds ''"):
        ATTACKS.register("scratch_library", lambda *a, **k: None, norm="linf", minimum_norm=False, eot=False,
                         libraries=("",))
    assert "scratch_library" not in ATTACKS


def test_a_plugin_package_version_is_in_its_cells_keys():
    plugins.load_plugins()  # the example plugin (tests/plugin_pkg) is installed with an entry point
    cell = Cell("mnist5k", "undefended", "plugin_fgsm", "linf", 0.1)
    assert library_versions.cell_libraries(cell) == {"pixeldp-bench-example-plugin": "0.1.0",
                                                     "torch": library_versions.library_version("torch")}
    assert library_versions.cell_libraries(Cell("mnist5k", "plugin_linear", "none")).keys() == {
        "pixeldp-bench-example-plugin", "torch"}


def test_the_environment_records_library_versions_without_importing_them():
    libraries = environment(torch.device("cpu"))["libraries"]
    assert list(libraries) == list(library_versions.RECORDED)
    assert libraries["torch"] == library_versions.library_version("torch") != library_versions.NOT_INSTALLED
    assert library_versions.installed_versions(("no-such-distribution-h5",)) == {
        "no-such-distribution-h5": library_versions.NOT_INSTALLED}
    code = ("import sys; from bench.execution.library_versions import installed_versions; installed_versions(); "
            "print(sorted(m for m in ('torchattacks', 'art', 'torchvision', 'safetensors') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


DRY = """
[run]
seed = 0
examples = 4
batch_size = 4
[defenses.plain]
defense = "undefended"
params = { steps = 5, batch_size = 16 }
[attacks.pgd_linf]
eps = [0.1]
params = { steps = 2 }
[attacks.ta_pgd]
attack = "pgd_linf@torchattacks"
eps = [0.1]
params = { steps = 2 }
"""


def test_the_dry_run_names_the_library_and_both_versions(tmp_path, capsys, monkeypatch):
    profile, results = tmp_path / "dry.toml", tmp_path / "results"
    profile.write_text(DRY)
    assert main(["run", str(profile), "--results", str(results), "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    installed = library_versions.library_version("torchattacks")

    faked(monkeypatch, "torchattacks", "99.0.0")
    assert main(["run", str(profile), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "] compute " in line]
    assert "ta_pgd" in line and f"library changed (torchattacks {installed} -> 99.0.0)" in line
    assert "1 cell(s) would be computed, 2 reused" in out

    monkeypatch.undo()
    torch_version = library_versions.library_version("torch")
    faked(monkeypatch, "torch", "0.0.1")
    assert main(["run", str(profile), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"library changed (torch {torch_version} -> 0.0.1)") == 3
    assert "3 cell(s) would be computed, 0 reused" in out
