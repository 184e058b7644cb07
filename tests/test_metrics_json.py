"""metrics.json: its exact shape for a tiny hand-made run, written by every report; `metrics diff` lines two up."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bench.cli.commands import main
from bench.core.types import Cell, Record
from bench.execution.store import Store
from bench.reporting.metrics import (SCHEMA_VERSION, build_metrics, diff_metrics, flatten_metrics, metrics_text,
                                     read_metrics)
from bench.reporting.report import run_frames, write_report
from synthetic_runs import store_run

SETTINGS = {"name": "tiny", "batch_size": 4, "l_attack": {"l2": [0.5], "linf": [0.1]}, "thresholds": [0.0, 0.1],
            "robust_thresholds": [0.1]}
ENVIRONMENT = {"package_version": "0.1.0", "git_commit": "abc123", "device_name": "Test CPU"}


def _records(clean: list[int], adv: list[int] | None = None, radius: list[float] | None = None,
             passes: int = 1) -> list[Record]:
    """Four examples (labels 0-3): clean / adversarial predictions given, radii optional."""
    adv = adv or clean
    return [Record(index=i, label=i, clean_pred=clean[i], adv_pred=adv[i], norm=0.0 if adv is clean else 0.05,
                   radius=None if radius is None else radius[i], seconds=0.004, forward_passes=passes)
            for i in range(4)]


def tiny_run() -> list[tuple[Cell, list[Record], dict]]:
    """An undefended model (clean 3/4, PGD L-inf 1/4) and PixelDP (clean 3/4 with radii, PGD L2 2/4)."""
    plain = dict(dataset="mnist5k", defense="undefended", defense_params={}, examples=4, seed=0,
                 defense_label="undefended")
    dp = dict(dataset="mnist5k", defense="pixeldp", defense_params={"L": 0.1}, examples=4, seed=0,
              defense_label="pixeldp_L0.1")
    trained = {"defense": {"train_steps": 10, "train_seconds_per_step": 0.5}}
    dp_trained = {"defense": {"train_steps": 10, "train_seconds_per_step": 0.75}}
    return [
        (Cell(attack="none", **plain), _records([0, 1, 2, 0]),
         trained | {"overhead": {"predict_seconds_per_image": {"1": 0.001}}}),
        (Cell(attack="pgd", norm="linf", eps=0.1, attack_label="pgd_linf", **plain),
         _records([0, 1, 2, 0], [0, 9, 9, 9], passes=11), trained),
        (Cell(attack="none", **dp), _records([0, 1, 2, 0], radius=[0.2, 0.05, 0.0, 0.3]),
         dp_trained | {"overhead": {"predict_seconds_per_image": {"1": 0.002, "10": 0.01}}}),
        (Cell(attack="pgd", norm="l2", eps=0.5, attack_label="pgd_l2", **dp),
         _records([0, 1, 2, 0], [0, 1, 9, 9], radius=[0.2, 0.0, 0.15, 0.0], passes=20), dp_trained),
    ]


def leaf(accuracy, low, high, n):
    return {"accuracy": accuracy, "low": low, "high": high, "n": n}


THREE, ONE, TWO = leaf(0.75, 0.19412, 0.993691, 4), leaf(0.25, 0.00630946, 0.80588, 4), leaf(0.5, 0.067586, 0.932414, 4)
EXPECTED = {
    "mnist5k": {
        "undefended": {
            "clean": THREE,
            "attacks": {"pgd_linf@0.1": ONE},
            "worst_case": {"linf@0.1": ONE},
            "overhead": {"train_steps": 10, "train_s_per_step": 0.5, "train_vs_undefended": 1.0,
                         "predict_s_per_image": {"1": 0.001}, "forward_passes_per_example": {"pgd_linf": 11.0}},
        },
        "pixeldp_L0.1": {
            "clean": THREE,
            "attacks": {"pgd_l2@0.5": TWO},
            "worst_case": {"l2@0.5": TWO},
            "certified": {"l2@0.0": THREE, "l2@0.1": ONE},
            # radius >= 0.1 on examples 0 and 2; only 0 is correct under attack
            "robust": {"pgd_l2@0.5": {"T=0.1": {"precision": leaf(0.5, 0.0125791, 0.987421, 2), "recall": ONE}}},
            "overhead": {"train_steps": 10, "train_s_per_step": 0.75, "train_vs_undefended": 1.5,
                         "predict_s_per_image": {"1": 0.002, "10": 0.01},
                         "certify_s_per_image": 0.004, "forward_passes_per_example": {"pgd_l2": 20.0}},
        },
    },
}


@pytest.fixture
def tiny(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    run_id = store_run(store, "tiny-1", tiny_run(), profile="tiny", settings=SETTINGS, environment=ENVIRONMENT)
    yield store, run_id
    store.close()


def test_metrics_json_has_the_documented_shape(tiny, tmp_path):
    store, run_id = tiny
    report = write_report(store, run_id, tmp_path / run_id)
    text = (tmp_path / run_id / "metrics.json").read_text()
    document = json.loads(text)
    assert report["paths"]["metrics"] == tmp_path / run_id / "metrics.json" and report["metrics"] == document
    assert set(document) == {"schema_version", "run", "metrics"} and document["schema_version"] == SCHEMA_VERSION == 1
    run = document["run"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", run.pop("created"))
    assert run == {"id": "tiny-1", "profile": "tiny", "git_commit": "abc123", "package_version": "0.1.0",
                   "device": "Test CPU", "complete": True}
    assert document["metrics"] == EXPECTED
    # Sorted keys, two-space indent, one trailing newline: two runs' files diff line by line.
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_numbers_keep_six_significant_digits_and_nan_is_null(tiny):
    store, run_id = tiny
    frames = run_frames(store, run_id)
    frames["accuracy"].loc[0, ["accuracy", "ci_low"]] = [1 / 3, np.nan]
    document = build_metrics(frames)
    assert document["metrics"]["mnist5k"]["undefended"]["clean"] == leaf(0.333333, None, 0.993691, 4)
    assert "NaN" not in metrics_text(document)


def test_an_incomplete_run_says_so(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    run = tiny_run()
    store_run(store, "part", run[:1], profile="tiny", settings=SETTINGS, environment=ENVIRONMENT)
    frames = run_frames(store, "part")
    frames["cells"] = frames["cells"] + [(run[1][0], [])]  # a listed cell without records
    assert build_metrics(frames)["run"]["complete"] is False


def test_diff_metrics_lists_changed_added_and_removed_numbers(tiny):
    store, run_id = tiny
    old = build_metrics(run_frames(store, run_id))
    new = json.loads(json.dumps(old))
    new["metrics"]["mnist5k"]["undefended"]["clean"]["accuracy"] = 0.5
    del new["metrics"]["mnist5k"]["undefended"]["attacks"]
    new["metrics"]["mnist5k"]["undefended"]["overhead"]["certify_s_per_image"] = 0.01
    frame = diff_metrics(old, new)
    rows = {r.path: (r.old, r.new, r.change) for r in frame.itertuples()}
    assert list(frame["path"]) == sorted(rows) and len(rows) == 1 + 4 + 1
    assert rows["mnist5k/undefended/clean/accuracy"] == (0.75, 0.5, -0.25)
    old_only = rows["mnist5k/undefended/attacks/pgd_linf@0.1/n"]
    assert old_only[:2] == (4, None) and np.isnan(old_only[2])
    assert rows["mnist5k/undefended/overhead/certify_s_per_image"][0] is None
    assert len(diff_metrics(old, new, everything=True)) == len(flatten_metrics(old) | flatten_metrics(new))
    assert diff_metrics(old, old).empty


def test_metrics_diff_command(tiny, tmp_path, capsys):
    store, run_id = tiny
    write_report(store, run_id, tmp_path / "a")
    changed = json.loads((tmp_path / "a" / "metrics.json").read_text())
    changed["metrics"]["mnist5k"]["pixeldp_L0.1"]["clean"]["accuracy"] = 0.5
    (tmp_path / "b.json").write_text(json.dumps(changed))
    assert main(["metrics", "diff", str(tmp_path / "a"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "mnist5k/pixeldp_L0.1/clean/accuracy" in out and "-0.25" in out and "1 metric(s) differ" in out
    assert main(["metrics", "diff", str(tmp_path / "a"), str(tmp_path / "a" / "metrics.json")]) == 0
    assert "no metric changed" in capsys.readouterr().out

    assert main(["metrics", "diff", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no metrics file at" in err
    (tmp_path / "old.json").write_text(json.dumps({"schema_version": 99, "metrics": {}}))
    with pytest.raises(ValueError, match="metrics schema 99"):
        read_metrics(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text("{")
    assert main(["metrics", "diff", str(tmp_path / "bad.json"), str(tmp_path / "a")]) == 2
    assert "is not a readable metrics.json" in capsys.readouterr().err
