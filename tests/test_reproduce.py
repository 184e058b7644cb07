"""The `reproduce` profile and its "Published vs measured" table (Wong & Kolter 2018's released models).

The table is checked on hand-made records; with PIXELDP_BENCH_WEIGHTS (the released files) and
PIXELDP_BENCH_REAL_MNIST / _FASHION_MNIST (one data root) set, the shipped profile runs on 500 real test digits and its
certificates are compared example by example with the original convex_adversarial code on the plain ball.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli.commands import main
from bench.profile.config import load_profile
from bench.core.data import gather, load_split, select_examples
from bench.reporting.tables_published import published_frame, published_pivot
from bench.core.types import Cell, Record
from bench.core.zoo import ENV, ZOO
from defenses.convex.models import wong2018_net

from convex_reference import convex_adversarial, original_margins

MNIST = ZOO["wong2018-mnist"]


def _records(correct: list[bool], radius: list[float | None]) -> list[Record]:
    return [Record(index=i, label=1, clean_pred=1 if ok else 2, adv_pred=1 if ok else 2, norm=0.0, radius=r,
                   seconds=0.0, forward_passes=1) for i, (ok, r) in enumerate(zip(correct, radius, strict=True))]


def test_the_table_counts_correct_and_certified_at_the_published_eps():
    """10 examples, 1 wrong; 8 certified (radius float32(0.1) counts as 0.1); 1 below; the 10th not certified
    (certify_examples): clean error 10%, robust error bound 2 of the 9 certified rows."""
    f32 = float(np.float32(0.1))
    correct = [True] * 9 + [False]
    radius: list[float | None] = [f32] * 7 + [0.0999, None, f32]
    params = {"weights_sha256": MNIST.sha256, "input_box": False, "norm": "linf", "eps": 0.1}
    cells = [(Cell("mnist", "wong_kolter", "none", defense_params=params, examples=10, defense_label="w"),
              _records(correct, radius)),
             (Cell("mnist", "wong_kolter", "none", defense_params={"weights_sha256": "f" * 64}, examples=10,
                   defense_label="other"), _records(correct, radius))]
    frame = published_frame(cells)
    assert frame["model"].tolist() == ["wong2018-mnist"]  # the other file is no zoo checkpoint
    row = frame.iloc[0]
    assert (row["n"], row["n_certified"]) == (10, 9)
    assert row["clean_error"] == pytest.approx(10.0) and row["robust_error"] == pytest.approx(100 * 2 / 9)
    shown = published_pivot(frame).iloc[0]
    assert (shown["error published"], shown["error measured"], shown["error diff"]) == ("1.80", "10.00", "+8.20")
    assert (shown["robust published"], shown["robust measured"]) == ("5.82", "22.22")
    assert shown["ball"] == "linf 0.1 plain ball" and shown["n"] == "10 (9 certified)"
    boxed = published_frame([(dataclasses.replace(cells[0][0], defense_params=params | {"input_box": True}),
                               cells[0][1])])
    assert published_pivot(boxed).iloc[0]["ball"] == "linf 0.1 ball in [0,1] (published: plain ball)"


def test_the_shipped_profile_certifies_both_released_models_on_the_full_plain_ball_sets():
    profile = load_profile("reproduce")
    assert [(c.dataset, c.attack, c.examples) for c in profile.cells] == [("mnist", "none", 10_000),
                                                                       ("fashion_mnist", "none", 10_000)]
    for cell, entry in zip(profile.cells, (ZOO["wong2018-mnist"], ZOO["wong2018-fashion-mnist"]), strict=True):
        params = cell.defense_params
        assert params["weights"] == f"zoo:{entry.name}" and params["weights_sha256"] == entry.sha256
        assert (params["certify_bound"], params["input_box"], params["eps"], params["steps"]) == ("wong", False, 0.1, 0)
        assert params["radius_max"] == entry.published.eps and params["bisection_steps"] == 0


@pytest.mark.slow
def test_reproduce_on_500_real_digits_equals_the_original_code(tmp_path):
    weights, root = os.environ.get(ENV), os.environ.get("PIXELDP_BENCH_REAL_MNIST")
    # The profile certifies both datasets from one data root (CI fetches both into the same folder).
    if not weights or not root or root != os.environ.get("PIXELDP_BENCH_REAL_FASHION_MNIST") \
            or convex_adversarial is None:
        pytest.skip(f"needs {ENV} (released weights), PIXELDP_BENCH_REAL_MNIST and PIXELDP_BENCH_REAL_FASHION_MNIST "
                    "(one data root) and convex_adversarial")
    n = 500
    assert main(["run", "reproduce", "--examples", str(n), "--data-root", root, "--weights-root", weights,
                 "--results", str(tmp_path), "--quiet", "--threads", "1"]) == 0
    table = pd.read_csv(next(tmp_path.glob("reproduce-*/published_vs_measured.csv")))
    ours = table.set_index("dataset").loc["mnist"]
    # The original code on the same digits, with the same weights, over the plain ball.
    net = wong2018_net()
    net.load_state_dict(torch.load(Path(weights) / MNIST.file, map_location="cpu", weights_only=True))
    test = load_split("mnist", "test", Path(root))
    x, y = gather(test, select_examples(test, n, seed=0))
    with torch.no_grad():
        pred = net(x).argmax(1)
    # In chunks: the original's dual network holds (N, 784, ...) tensors per layer (1,000 at once took > 20 GB).
    margins = torch.cat([original_margins(net, x[i:i + 50], pred[i:i + 50], 0.1, bounded_input=False)
                         for i in range(0, n, 50)]).scatter(1, pred[:, None], 1.0)
    robust = (pred == y) & (margins > 0).all(1)
    assert ours["clean_error"] == 100 * int((pred != y).sum()) / n
    assert ours["robust_error"] == 100 * int((~robust).sum()) / n
    assert abs(ours["robust_error"] - 5.82) < 2.5 and abs(ours["clean_error"] - 1.80) < 1.5  # a 500-digit sample
