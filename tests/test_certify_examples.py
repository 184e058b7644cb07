"""`run.certify_examples`: clean accuracy on every example, certificates on a nested stratified subset."""
from __future__ import annotations

import pandas as pd
from dataset_files import write_mnist

import bench.execution.runner
from bench.cli.commands import main
from bench.profile.config import parse_profile
from bench.core.data import load_split, select_examples
from bench.execution.store import Store

PROFILE = """
[run]
datasets = ["mnist"]
examples = 12
certify_examples = 6
seed = 3
thresholds = [0.0, 0.01]

[defenses.undefended]
params = { arch = "cnn_small", steps = 2 }

[defenses.pixeldp]
params = { arch = "cnn_small", steps = 2, L = 0.1, draws_certify = 40, draws_predict = 5, draws_attack = 5 }

[attacks.pgd_linf_eot]
against = ["pixeldp"]
eps = [0.1]
examples = 6
params = { steps = 2, draws = 2 }
"""


def test_only_certified_defenses_get_a_certify_subset():
    cells = parse_profile(PROFILE, "ce").cells
    clean = {c.defense_label: c for c in cells if c.attack == "none"}
    assert clean["pixeldp"].certify_examples == 6 and clean["pixeldp"].examples == 12
    # A deterministic defense certifies nothing: its cell (and key) carry no certify subset.
    assert clean["undefended"].certify_examples is None and "certify_examples" not in clean["undefended"].config()
    # Asking for at least as many as the examples is the same as not asking.
    again = parse_profile(PROFILE.replace("certify_examples = 6", "certify_examples = 12"), "ce").cells
    assert all(c.certify_examples is None for c in again)


def test_clean_cell_predicts_all_and_certifies_the_nested_subset(tmp_path, capsys):
    data = tmp_path / "data"
    write_mnist(data, classes=range(4), per_class=4)  # 16 test digits
    (tmp_path / "ce.toml").write_text(PROFILE)
    code = main(["run", str(tmp_path / "ce.toml"), "--data-root", str(data), "--results", str(tmp_path / "res"),
                 "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    store = Store(tmp_path / "res" / "store.sqlite")
    cells = {(c.defense_label, c.attack_label): (key, c) for key, c, _ in store.all_cells()}
    key, cell = cells[("pixeldp", "none")]
    records = store.records(key)
    assert len(records) == 12
    certified = {r.index for r in records if r.radius is not None}
    test = load_split("mnist", "test", data, False)
    # The certified rows are exactly the stratified subset the 6-example attack entry sees.
    assert certified == set(select_examples(test, 6, 3).tolist())
    attack_key, _ = cells[("pixeldp", "pgd_linf_eot")]
    assert {r.index for r in store.records(attack_key)} == certified
    assert all(r.radius >= 0 for r in records if r.radius is not None)
    # Tables: certified accuracy counts 6 examples, the clean accuracy 12 (the row shows the range).
    run_dir = next(p for p in (tmp_path / "res").iterdir() if p.is_dir() and p.name.startswith("ce-"))
    certified_table = pd.read_csv(run_dir / "certified_accuracy.csv")
    assert set(certified_table["n"]) == {6}
    accuracy = pd.read_csv(run_dir / "accuracy_under_attack.csv")
    row = accuracy[accuracy["defense"] == "pixeldp"]
    assert set(row["n"]) == {12, 6}
    assert "6-12" in (run_dir / "accuracy_under_attack.md").read_text()


def test_the_certify_subset_is_read_once_for_all_clean_cells(tmp_path, capsys, monkeypatch):
    """Two certified defenses share one certify subset: the test split is read for the 12-example clean cells, the
    6-example attack cell and, once, for the certify subset, not again for every clean cell that certifies."""
    reads: list[str] = []

    def counting_load_split(dataset, split, *args, **kwargs):
        reads.append(split)
        return load_split(dataset, split, *args, **kwargs)

    monkeypatch.setattr(bench.execution.runner, "load_split", counting_load_split)
    data = tmp_path / "data"
    write_mnist(data, classes=range(4), per_class=4)
    second = '\n[defenses."pixeldp_L0.3"]\ndefense = "pixeldp"\nparams = { arch = "cnn_small", steps = 2, L = 0.3, ' \
             'draws_certify = 40, draws_predict = 5, draws_attack = 5 }\n'
    (tmp_path / "ce.toml").write_text(PROFILE + second)
    code = main(["run", str(tmp_path / "ce.toml"), "--data-root", str(data), "--results", str(tmp_path / "res"),
                 "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    cells = Store(tmp_path / "res" / "store.sqlite").all_cells()
    assert sum(c.attack == "none" and c.certify_examples == 6 for _, c, _ in cells) == 2
    assert reads.count("test") == 3
