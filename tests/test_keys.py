"""Cell keys follow the code and the resolved parameters; `run --dry-run` says what will run and why."""
import importlib
import sys
import textwrap
from pathlib import Path

import pytest

import bench.execution.fingerprint as fingerprint
from attacks.template import register_attack
from bench.profile.config import ConfigError, load_profile, parse_profile
from bench.execution.fingerprint import code_fingerprint, source_files
from bench.profile.params import resolve_attack_params
from bench.execution.runner import keyed
from bench.core.registry import ATTACKS
from bench.cli.commands import main

REPO = Path(__file__).resolve().parents[1]


def _changed_keys(monkeypatch, cells, edited: str) -> set[int]:
    """Positions of the cells whose key changes when the file `edited` (repo-relative) changes."""
    before = [k for k, _ in keyed(cells)]
    real = fingerprint.file_digest
    target = (REPO / edited).resolve()
    monkeypatch.setattr(fingerprint, "file_digest", lambda path: "edited" if path == target else real(path))
    after = [k for k, _ in keyed(cells)]
    monkeypatch.setattr(fingerprint, "file_digest", real)
    return {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}


def test_editing_pgd_recomputes_exactly_the_cells_that_run_pgd_code(monkeypatch):
    cells = load_profile("smoke").cells
    changed = _changed_keys(monkeypatch, cells, "attacks/pgd.py")
    pgd = (REPO / "attacks/pgd.py").resolve()
    expected = {i for i, c in enumerate(cells)
                if (c.attack != "none" and pgd in source_files(ATTACKS.get(c.attack)))
                or c.defense == "madry"}  # Madry trains on PGD examples: its model changes too
    assert changed == expected
    assert any(cells[i].attack.startswith("pgd") for i in changed)
    assert not any(cells[i].attack.startswith("cw_l2") and cells[i].defense != "madry" for i in changed)
    assert not any(cells[i].attack == "none" and cells[i].defense != "madry" for i in changed)


@pytest.mark.parametrize("edited", ["bench/cli/main/main.py", "bench/cli/main/session.py", "bench/profile/toml_text.py",
                                    "bench/reporting/report.py", "bench/reporting/plots.py",
                                    "bench/reporting/compare.py",
                                    "pixeldp_bench/runs.py"])
def test_editing_reporting_code_recomputes_nothing(monkeypatch, edited):
    assert _changed_keys(monkeypatch, load_profile("smoke").cells, edited) == set()


ALL_KINDS = {"pixeldp", "undefended", "madry", "wong_kolter"}


@pytest.mark.parametrize("edited, kinds", [("defenses/pixeldp/noise.py", {"pixeldp"}),
                                           ("bench/execution/runner.py", ALL_KINDS),
                                           ("bench/execution/training.py", ALL_KINDS)])
def test_defense_and_harness_edits_reach_their_cells(monkeypatch, edited, kinds):
    cells = load_profile("smoke").cells
    changed = _changed_keys(monkeypatch, cells, edited)
    assert {cells[i].defense for i in changed} == kinds
    assert changed == {i for i, c in enumerate(cells) if c.defense in kinds}


def _scratch_module(tmp_path, monkeypatch, body: str):
    package = tmp_path / "scratchpkg"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("def helper(x):\n    return x + 1\n")
    (package / "other.py").write_text("def other(x):\n    return x - 1\n")
    (package / "attack.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("scratchpkg")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    return importlib.import_module("scratchpkg.attack"), package


ATTACK = """
    '''A scratch attack.'''
    from scratchpkg.helper import helper


    def attack(x, *, steps: int = 10):
        '''Docstring.'''
        return helper(x) * steps  # a comment
"""


def test_fingerprint_ignores_comments_and_docstrings_but_not_code(tmp_path, monkeypatch):
    module, package = _scratch_module(tmp_path, monkeypatch, ATTACK)
    first = code_fingerprint(module.attack)
    assert {p.name for p in source_files(module.attack)} == {"attack.py", "helper.py"}
    (package / "attack.py").write_text(textwrap.dedent(ATTACK).replace("a comment", "another comment")
                                       .replace("Docstring.", "Edited docstring."))
    assert code_fingerprint(module.attack) == first
    (package / "other.py").write_text("def other(x):\n    return x - 2\n")  # not used by the attack
    assert code_fingerprint(module.attack) == first
    (package / "helper.py").write_text("def helper(x):\n    return x + 2\n")  # a dependency's code
    assert code_fingerprint(module.attack) != first


def test_a_changed_default_changes_the_resolved_parameters_and_the_key(monkeypatch):
    def attack_v1(model, x, y, *, threat, steps: int = 10, generator=None):
        return x

    def attack_v2(model, x, y, *, threat, steps: int = 12, generator=None):
        return x

    if "scratch_default" not in ATTACKS:
        register_attack("scratch_default", attack_v1, norm="linf")
    text = '[run]\nseed = 0\n[defenses.undefended]\n[attacks.scratch_default]\neps = 0.1\n'
    monkeypatch.setitem(ATTACKS._objects, "scratch_default", attack_v1)
    first = keyed(parse_profile(text, "t").cells)
    monkeypatch.setitem(ATTACKS._objects, "scratch_default", attack_v2)
    second = keyed(parse_profile(text, "t").cells)
    assert first[1][1].attack_params == {"steps": 10} and second[1][1].attack_params == {"steps": 12}
    assert first[0][0] == second[0][0] and first[1][0] != second[1][0]
    assert resolve_attack_params("scratch_default", {"steps": 3}) == {"steps": 3}


def test_bad_batch_sizes_are_rejected_before_anything_runs(tmp_path, capsys):
    profile = tmp_path / "p.toml"
    profile.write_text('[run]\nseed = 0\nbatch_size = -5\n[defenses.undefended]\n')
    with pytest.raises(ConfigError, match="batch_size must be a whole number >= 1"):
        load_profile(str(profile))
    profile.write_text('[run]\nseed = 0\n[defenses.undefended]\n')
    assert main(["run", str(profile), "--batch-size", "0", "--results", str(tmp_path / "r")]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


DRY = """
[run]
seed = 0
examples = 10
batch_size = 10
[defenses.plain]
defense = "undefended"
params = { steps = 20, batch_size = 32 }
[attacks.pgd_linf]
eps = [0.1]
params = { steps = STEPS }
"""


def test_dry_run_says_what_would_run_and_why(tmp_path, capsys, monkeypatch):
    profile, results = tmp_path / "dry.toml", tmp_path / "results"
    profile.write_text(DRY.replace("STEPS", "3"))
    assert main(["run", str(profile), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("] compute ") == 2 and out.count(": new") == 2 and not results.exists()
    assert main(["run", str(profile), "--results", str(results), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(profile), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("] reuse ") == 2 and "0 cell(s) would be computed, 2 reused" in out

    profile.write_text(DRY.replace("STEPS", "4"))
    assert main(["run", str(profile), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters changed (attack_params.steps)" in out and "1 cell(s) would be computed, 1 reused" in out

    profile.write_text(DRY.replace("STEPS", "3"))
    real = fingerprint.file_digest
    pgd = (REPO / "attacks/pgd.py").resolve()
    monkeypatch.setattr(fingerprint, "file_digest", lambda path: "edited" if path == pgd else real(path))
    assert main(["run", str(profile), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "code changed (attack)" in out and "1 cell(s) would be computed, 1 reused" in out
    assert len(list(results.glob("dry-*"))) == 1  # dry runs create no run folder
