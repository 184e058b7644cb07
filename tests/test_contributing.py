"""CONTRIBUTING.md's three recipes, run as written: each new entry shows up in `list` and in a run's tables."""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.cli.commands import main
from bench.core.registry import ATTACKS, DEFENSES
from bench.execution.store import Store
from bench.reporting.table_registry import TABLES

GUIDE = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"
RECIPES = {"attack": ("Add an attack", "fgsm", ATTACKS), "defense": ("Add a defense", "label_smoothing", DEFENSES),
           "table": ("Add a table", "clean_errors", TABLES)}

PROFILE = """
[run]
datasets = ["mnist5k"]
examples = 40
seed = 1
thresholds = [0.0]

[defenses.undefended]
params = { arch = "cnn_small", steps = 40 }

[defenses.label_smoothing]
params = { arch = "cnn_small", steps = 40, smoothing = 0.2 }

[attacks.fgsm]
eps = [0.1]
"""


def recipe(section: str) -> str:
    """The one Python block under CONTRIBUTING.md's `## <section>` heading."""
    text = GUIDE.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, f"{section}: expected one python block, found {len(blocks)}"
    return blocks[0]


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    """Each recipe written to its own module file and imported, as a contributor's new file would be."""
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = []
    try:
        for kind, (section, name, registry) in RECIPES.items():
            assert name not in registry, f"{name!r} is already registered: the recipe would clash"
            module = f"contributing_recipe_{kind}"
            (tmp_path / f"{module}.py").write_text(recipe(section))
            importlib.import_module(module)
            modules.append(module)
        yield
    finally:
        for module in modules:
            sys.modules.pop(module, None)
        for _, name, registry in RECIPES.values():
            if name in registry:
                registry.unregister(name)


def test_every_recipe_is_one_python_block():
    for section, _, _ in RECIPES.values():
        compile(recipe(section), section, "exec")


def test_recipes_show_up_in_list_and_in_every_table(recipes, tmp_path, capsys):
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for _, name, _ in RECIPES.values():
        assert re.search(rf"^  {name} ", listing, flags=re.M), f"{name} missing from `list`"

    (tmp_path / "contrib.toml").write_text(PROFILE)
    code = main(["run", str(tmp_path / "contrib.toml"), "--results", str(tmp_path / "res"), "--quiet",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    run_dir = next(p for p in (tmp_path / "res").iterdir() if p.is_dir() and p.name.startswith("contrib-"))

    # The attack and the defense are in the accuracy table, against both defenses.
    accuracy = pd.read_csv(run_dir / "accuracy_under_attack.csv")
    attacked = accuracy[accuracy["attack"] == "fgsm"]
    assert set(attacked["defense"]) == {"undefended", "label_smoothing"}
    assert (attacked["n"] == 40).all()
    # FGSM at 0.1 is an attack: it cannot raise accuracy above clean accuracy on the same examples.
    clean = accuracy[accuracy["attack"] == "clean"].set_index("defense")["accuracy"]
    for _, row in attacked.iterrows():
        assert row["accuracy"] <= clean[row["defense"]]
    overhead = pd.read_csv(run_dir / "overhead.csv")
    assert "label_smoothing" in set(overhead["defense"])

    # The new table is written with the others, and its counts match the stored records.
    errors = pd.read_csv(run_dir / "clean_errors.csv").set_index("defense")
    assert (run_dir / "clean_errors.md").exists() and (run_dir / "clean_errors.tex").exists()
    store = Store(tmp_path / "res" / "store.sqlite")
    for key, cell, _ in store.all_cells():
        if cell.attack == "none":
            records = store.records(key)
            assert errors.loc[cell.defense_label, "n"] == len(records) == 40
            assert errors.loc[cell.defense_label, "errors"] == sum(r.clean_pred != r.label for r in records)
