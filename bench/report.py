"""Regenerates every table and figure of a run from the results store alone."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import bench.plots
from bench.checks import run_checks
from bench.fingerprint import code_fingerprint
from bench.plots import plot_accuracy_vs_attack, plot_certified, plot_defense_comparison, plot_robust, save_figure
from bench.store import Store
from bench.tables import ACCURACY_CAPTION, accuracy_frame, accuracy_pivot, to_text, write_accuracy_tables, write_table
from bench.tables_certified import (CERTIFIED_CAPTION, DEFAULT_ROBUST_THRESHOLDS, ROBUST_CAPTION, certified_frame,
                                    certified_pivot, clean_cells, is_certified, robust_frame, robust_pivot)
from bench.tables_overhead import overhead_caption, overhead_frame, overhead_pivot

FIGURES = "figures"
INPUTS_MARKER = ".inputs"  # digest of what a run's figures were drawn from (lets reruns copy them)


def run_records(store: Store, run_id: str):
    """[(cell, records)] for every cell of a run, in the run's order (unfinished cells have none)."""
    return [(cell, store.records(key)) for key, cell in store.run_cells(run_id)]


def run_cell_infos(store: Store, run_id: str) -> list[dict[str, Any] | None]:
    """Each cell's stored info (timings, training, overhead), aligned with run_records; None if unfinished."""
    return [store.cell_info(key) for key, _ in store.run_cells(run_id)]


def run_frames(store: Store, run_id: str, robust_thresholds=None) -> dict[str, Any]:
    """Every table of a run as long frames, computed from its records and cell infos."""
    info = store.run_info(run_id)
    settings = info["settings"]
    cells = run_records(store, run_id)
    thresholds = robust_thresholds or settings.get("robust_thresholds") or DEFAULT_ROBUST_THRESHOLDS
    device = info["environment"].get("device_name") or info["environment"].get("device", "")
    certified = {key for key, (_, records) in clean_cells(cells).items() if is_certified(records)}
    return {
        "info": info, "cells": cells, "certified_defenses": certified, "device": device,
        "accuracy": accuracy_frame(cells, settings["l_attack"]),
        "certified": certified_frame(cells, settings.get("thresholds", [])),
        "robust": robust_frame(cells, settings["l_attack"], tuple(thresholds)),
        "overhead": overhead_frame([(c, r, i) for (c, r), i in zip(cells, run_cell_infos(store, run_id))], device),
    }


def _figure_inputs(frames: dict[str, Any], registry: dict) -> str:
    """Digest of everything the figures are drawn from: the plotted frames and the plotting code."""
    digest = hashlib.sha256(code_fingerprint(bench.plots).encode())
    for name in ("certified", "accuracy", "robust"):
        digest.update(frames[name].to_csv(index=False).encode())
    digest.update(repr(sorted(registry.items())).encode() + repr(sorted(frames["certified_defenses"])).encode())
    return digest.hexdigest()


def _reuse_figures(folder: Path, inputs: str) -> dict[str, dict[str, Path]] | None:
    """Copy the figures of a sibling run drawn from identical inputs (a fully reused rerun): drawing
    them again would give the same files and costs most of a warm run's time."""
    for marker in sorted(folder.parent.parent.glob(f"*/{FIGURES}/{INPUTS_MARKER}"), reverse=True):
        if marker.parent == folder or marker.read_text() != inputs:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        paths: dict[str, dict[str, Path]] = {}
        for source in sorted(marker.parent.iterdir()):
            if source.suffix in (".png", ".pdf"):
                shutil.copy2(source, folder / source.name)
                paths.setdefault(source.stem, {})[source.suffix[1:]] = folder / source.name
        (folder / INPUTS_MARKER).write_text(inputs)
        return paths
    return None


def write_figures(frames: dict[str, Any], folder: Path) -> dict[str, dict[str, Path]]:
    """Figs. 2-5 of the paper for whatever the run holds; figures without data are skipped."""
    registry = {(c.dataset, c.defense_label): c.defense for c, _ in frames["cells"]}
    inputs = _figure_inputs(frames, registry)
    reused = _reuse_figures(folder, inputs)
    if reused is not None:
        return reused
    figures = {
        "fig2_certified_accuracy": plot_certified(frames["certified"]),
        "fig3_accuracy_vs_attack": plot_accuracy_vs_attack(frames["accuracy"]),
        "fig4_defense_comparison": plot_defense_comparison(frames["accuracy"], registry),
        "fig5_robust_precision_recall": plot_robust(frames["robust"], frames["accuracy"],
                                                    frames["certified_defenses"]),
    }
    paths = {stem: save_figure(figure, folder, stem) for stem, figure in figures.items() if figure is not None}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INPUTS_MARKER).write_text(inputs)
    return paths


def write_report(store: Store, run_id: str, run_dir: Path, robust_thresholds=None) -> dict[str, Any]:
    """Write the run's tables (CSV, Markdown, LaTeX) and figures (PNG, PDF) under run_dir.

    Returns the terminal text, the paths written, the accuracy frame ("frame") and all frames.
    """
    frames = run_frames(store, run_id, robust_thresholds)
    info, cells = frames["info"], frames["cells"]
    frame = frames["accuracy"]
    run_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = dict(write_accuracy_tables(frame, run_dir))
    text = "Accuracy under attack, % [95% Clopper-Pearson interval]\n" + to_text(accuracy_pivot(frame))
    tables = [("certified_accuracy", frames["certified"], certified_pivot(frames["certified"]), CERTIFIED_CAPTION),
              ("robust_precision_recall", frames["robust"],
               robust_pivot(frames["robust"], frame, frames["certified_defenses"]), ROBUST_CAPTION),
              ("overhead", frames["overhead"], overhead_pivot(frames["overhead"]), overhead_caption(frames["device"]))]
    for stem, long, wide, caption in tables:
        if long.empty:
            continue
        paths[stem] = write_table(long, wide, run_dir, stem, caption)
        text += "\n" + caption + "\n" + to_text(wide)
    paths["figures"] = write_figures(frames, run_dir / FIGURES)
    (run_dir / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    # The full resolved configuration of every cell, in run order, next to the settings and environment.
    (run_dir / "config.json").write_text(json.dumps(
        [{"key": key, **cell.config()} for key, cell in store.run_cells(run_id)], indent=2, sort_keys=True))
    warnings = run_checks(cells, info["settings"]["l_attack"], run_cell_infos(store, run_id))
    paths["checks"] = run_dir / "checks.txt"
    paths["checks"].write_text("".join(f"WARNING: {w}\n" for w in warnings) or "all sanity checks passed\n")
    text += "".join(f"\nWARNING: {w}" for w in warnings) + ("\n" if warnings else "")
    missing = store.missing_cells(run_id)
    if missing:
        # An incomplete run is marked at the top of the text and in checks.txt: its tables lack cells.
        banner = (f"INCOMPLETE RUN: {len(missing)} of {len(cells)} cell(s) have no results (killed or failed run); "
                  "re-run the same profile into the same results folder to finish it\n")
        text = banner + text
        paths["checks"].write_text(banner + paths["checks"].read_text())
    return {"text": text, "paths": paths, "frame": frame, "frames": frames}
