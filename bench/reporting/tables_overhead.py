"""Overhead table: training, prediction and certification cost per defense, forward passes per attack."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.execution.overhead import DRAWS
from bench.reporting.tables_certified import is_certified
from bench.core.types import Cell, Record

BASELINE_DEFENSE = "undefended"


def _seconds(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.3g}"


def overhead_frame(cells: list[tuple[Cell, list[Record], dict[str, Any] | None]], device: str = "") -> pd.DataFrame:
    """One row per (dataset, defense): what the run measured about its cost.

    Columns: training seconds per step and its ratio to the undefended model on the same
    dataset (cell info["defense"]["train_seconds_per_step"]); prediction seconds per image at
    1/10/100/1000 draws (info["overhead"], measured by the runner after the clean cell);
    certification seconds per image (the clean cell's records, certified defenses only); mean
    forward passes per example for each attack (records, over all of that attack's cells); and
    the machine the run used.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    passes: dict[tuple[str, str], dict[str, list[int]]] = {}
    for cell, records, info in cells:
        row = rows.setdefault((cell.dataset, cell.defense_label),
                              {"dataset": cell.dataset, "defense": cell.defense_label, "registry_name": cell.defense})
        info = info or {}
        training = info.get("defense") or {}
        if training.get("train_seconds_per_step") is not None:
            row["train_steps"] = training.get("train_steps")
            row["train_s_per_step"] = float(training["train_seconds_per_step"])
        if cell.attack == "none":
            for k, seconds in (info.get("overhead") or {}).get("predict_seconds_per_image", {}).items():
                row[f"predict_s_{k}"] = float(seconds)
            if records and is_certified(records):
                # Only certified rows: with certify_examples the others were merely predicted.
                row["certify_s"] = float(np.mean([r.seconds for r in records if r.radius is not None]))
        elif records:
            passes.setdefault((cell.dataset, cell.defense_label), {}).setdefault(cell.attack_label, []).extend(
                r.forward_passes for r in records)
    for key, per_attack in passes.items():
        for attack, values in per_attack.items():
            rows[key][f"passes {attack}"] = float(np.mean(values))
    frame = pd.DataFrame(list(rows.values()))
    if frame.empty:
        return pd.DataFrame(columns=["dataset", "defense", "device"])
    for column in ["train_steps", "train_s_per_step", *(f"predict_s_{k}" for k in DRAWS), "certify_s"]:
        if column not in frame:
            frame[column] = np.nan
    baseline = (frame[frame["registry_name"] == BASELINE_DEFENSE].groupby("dataset", sort=False)["train_s_per_step"]
                .first())
    frame["train_relative"] = frame["train_s_per_step"] / frame["dataset"].map(baseline)
    frame["device"] = device
    fixed = ["dataset", "defense", "registry_name", "train_steps", "train_s_per_step", "train_relative",
             *(f"predict_s_{k}" for k in DRAWS), "certify_s"]
    extra = [c for c in frame.columns if c not in fixed and c != "device"]
    return frame[fixed + extra + ["device"]].drop(columns="registry_name")


def overhead_pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """Display form: seconds to 3 significant digits, the training ratio as 'x1.02', '-' where not measured."""
    if frame.empty:
        return frame
    out = pd.DataFrame({"dataset": frame["dataset"], "defense": frame["defense"]})
    out["train s/step"] = [_seconds(v) for v in frame["train_s_per_step"]]
    out["vs undefended"] = ["-" if not np.isfinite(v) else f"x{v:.2f}" for v in frame["train_relative"]]
    for k in DRAWS:
        if k == 1 or frame[f"predict_s_{k}"].notna().any():  # many draws only when a defense is randomized
            out[f"predict s/img @{k}"] = [_seconds(v) for v in frame[f"predict_s_{k}"]]
    if frame["certify_s"].notna().any():
        out["certify s/img"] = [_seconds(v) for v in frame["certify_s"]]
    for column in (c for c in frame.columns if c.startswith("passes ")):
        out[f"fwd/ex {column[len('passes '):]}"] = ["-" if not np.isfinite(v) else f"{v:.0f}" for v in frame[column]]
    return out.reset_index(drop=True)


def overhead_caption(device: str) -> str:
    """The overhead table's caption, naming the machine the times were measured on."""
    return ("Overhead: training seconds per step (and ratio to the undefended model), prediction seconds per "
            "image at 1/10/100/1000 noise draws, certification seconds per image, forward passes per example "
            f"for each attack. Measured on {device or 'an unrecorded device'}.")
