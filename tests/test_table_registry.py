"""Tables and figures come from registries and metadata: a new table, a new defense or a user's model
shows up everywhere with no other edit."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from bench.reporting.compare import compare_outcomes, run_outcomes
from bench.reporting.plots import plot_defense_comparison
from bench.core.registry import DEFENSES
from bench.reporting.report import write_report
from bench.execution.store import Store
from bench.reporting.table_registry import TABLES, RunData, Table, build_frames
from defenses.undefended import Undefended
from synthetic_runs import SETTINGS, fill_store, synthetic_run


class ToyCertified(Undefended):
    """A certified defense nobody told the tables about."""

    def certify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict(x), torch.zeros(x.shape[0])

    @staticmethod
    def certified_norm(params: dict) -> str:
        return "l2"


class Bare(Undefended):
    """A defense registered with randomized / certified only: its own family."""


@pytest.fixture
def toy_defense():
    DEFENSES.register("toy_certified", ToyCertified, family="toy", randomized=False, certified=True,
                      certified_norm="l2", certifier="toycert")
    DEFENSES.register("toy_bare", Bare, randomized=False, certified=False)  # the least metadata a defense needs
    yield "toy_certified"
    DEFENSES.unregister("toy_certified")
    DEFENSES.unregister("toy_bare")


def renamed_run(toy: str) -> list[tuple]:
    """The synthetic run with PixelDP L=0.1 replaced by `toy` (label "mine"), Madry by a user_model
    ("theirs") and PixelDP L=0.3 by a defense registered without a family ("bare")."""
    out = []
    for cell, records, info in synthetic_run():
        if cell.defense_label == "pixeldp_L0.1":
            cell = dataclasses.replace(cell, defense=toy, defense_label="mine", defense_params={})
        elif cell.defense_label == "madry":
            cell = dataclasses.replace(cell, defense="user_model", defense_label="theirs")
        elif cell.defense_label == "pixeldp_L0.3":
            cell = dataclasses.replace(cell, defense="toy_bare", defense_label="bare", defense_params={})
        out.append((cell, records, info))
    return out


def test_a_new_certified_defense_and_a_user_model_appear_in_tables_and_fig4(toy_defense):
    run = renamed_run(toy_defense)
    data = RunData(cells=[(c, r) for c, r, _ in run], settings=SETTINGS, infos=[i for _, _, i in run])
    frames = build_frames(data)
    mine = frames["certified"][frames["certified"]["defense"] == "mine"]
    assert len(mine) == len(SETTINGS["thresholds"])
    assert set(mine["certifier"]) == {"toycert"} and set(mine["norm"]) == {"l2"}  # from its DefenseInfo
    assert ("mnist5k", "mine") in data.certified_defenses
    assert "mine" in set(frames["robust"]["defense"]) and "theirs" in set(frames["overhead"]["defense"])
    names = {(c.dataset, c.defense_label): c.defense for c, _, _ in run}
    figure = plot_defense_comparison(frames["accuracy"], names)
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    # Before metadata, Fig. 4 knew PixelDP / Madry / convex / undefended by name prefix and dropped the rest.
    assert legend == ["undefended", "user model: theirs", "toy: mine", "toy_bare: bare", "convex: wong_kolter"]


def toy_table() -> Table:
    """Clean errors per defense, with per-example outcomes for compare."""

    def build(run: RunData) -> pd.DataFrame:
        rows = [{"dataset": c.dataset, "defense": c.defense_label, "errors": sum(r.clean_pred != r.label for r in recs)}
                for c, recs in run.cells if c.attack == "none"]
        return pd.DataFrame(rows)

    def outcomes(run: RunData):
        for c, recs in run.cells:
            if c.attack == "none":
                yield (c.dataset, c.defense_label, "right"), {r.index: r.clean_pred == r.label for r in recs}

    return Table(stem="toy_errors", build=build, pivot=lambda long, frames, run: long,
                 caption=lambda run: "Toy: clean errors per defense.", outcomes=outcomes, compare_label="toy",
                 order=25)


@pytest.fixture
def toy_registered():
    TABLES.register("toy", toy_table())
    yield "toy"
    TABLES.unregister("toy")


def test_a_registered_table_appears_in_the_report_and_compare(toy_registered, tmp_path):
    store = Store(tmp_path / "store.sqlite")
    run_id = fill_store(store)
    report = write_report(store, run_id, tmp_path / "out")
    written = pd.read_csv(tmp_path / "out" / "toy_errors.csv")
    expected = {label: sum(r.clean_pred != r.label for r in recs)
                for c, recs, _ in synthetic_run() if c.attack == "none" for label in [c.defense_label]}
    assert dict(zip(written["defense"], written["errors"], strict=True)) == expected
    assert (tmp_path / "out" / "toy_errors.md").read_text().startswith("Toy: clean errors per defense.")
    text = report["text"]
    # Ordered by `order`: after the certified table (20), before robust precision (30).
    assert text.index("Certified accuracy") < text.index("Toy: clean errors") < text.index("Robust precision")
    outcomes = run_outcomes(store, run_id)
    frame = compare_outcomes(outcomes, outcomes)
    toy = frame[frame["table"] == "toy"]
    assert len(toy) == len(expected) and (toy["status"] == "ok").all()
    assert toy.set_index("defense")["base"].to_dict() == pytest.approx(
        {label: 1 - errors / 20 for label, errors in expected.items()})


def test_built_in_tables_in_report_order():
    assert [TABLES.get(n).stem for n in sorted(TABLES.names(), key=lambda n: TABLES.get(n).order)] == [
        "accuracy_under_attack", "certified_accuracy", "published_vs_measured", "robust_precision_recall", "overhead"]
