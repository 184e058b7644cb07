"""Regenerates every table and figure of a run from the results store alone."""
from __future__ import annotations

import hashlib
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import bench.reporting.plots
from bench.core.atomic import write_bytes, write_text
from bench.reporting.check_ids import CHECKS_DOC, INCOMPLETE_RUN, CheckWarning
from bench.reporting.checks import run_checks
from bench.reporting.metrics import METRICS_NAME, build_metrics, metrics_text
from bench.execution.fingerprint import code_fingerprint
from bench.reporting.html import report_html
from bench.reporting.plots import figures, save_figure
from bench.execution.store import Store
from bench.reporting.table_registry import RunData, build_frames, tables
from bench.reporting.tables import TEXT_WIDTH, to_text, write_table
from bench.reporting.tables_certified import DEFAULT_ROBUST_THRESHOLDS

FIGURES = "figures"
INPUTS_MARKER = ".inputs"  # digest of what a run's figures were drawn from (lets reruns copy them)
HTML_REPORT = "report.html"
REPO_ROOT = Path(__file__).resolve().parents[2]  # where docs/checks.md is in a source checkout


def run_records(store: Store, run_id: str):
    """[(cell, records)] for every cell of a run, in the run's order (unfinished cells have none)."""
    return [(cell, store.records(key)) for key, cell in store.run_cells(run_id)]


def run_cell_infos(store: Store, run_id: str) -> list[dict[str, Any] | None]:
    """Each cell's stored info (timings, training, overhead), aligned with run_records; None if unfinished."""
    return [store.cell_info(key) for key, _ in store.run_cells(run_id)]


def run_data(store: Store, run_id: str, robust_thresholds=None, *, infos: bool = True) -> RunData:
    """What a run's tables are built from: its records, cell infos (unless `infos` is False) and settings."""
    info = store.run_info(run_id)
    settings = info["settings"]
    thresholds = robust_thresholds or settings.get("robust_thresholds") or DEFAULT_ROBUST_THRESHOLDS
    environment = info.get("environment") or {}
    device = environment.get("device_name") or environment.get("device", "")
    return RunData(cells=run_records(store, run_id), settings=settings,
                   infos=run_cell_infos(store, run_id) if infos else [], device=device,
                   robust_thresholds=tuple(thresholds))


def run_frames(store: Store, run_id: str, robust_thresholds=None) -> dict[str, Any]:
    """Every registered table of a run as a long frame (by table name), plus the run's info, cells and
    certified defenses, computed from its records and cell infos."""
    run = run_data(store, run_id, robust_thresholds)
    return {"info": store.run_info(run_id), "cells": run.cells, "certified_defenses": run.certified_defenses,
            "device": run.device, "run": run, **build_frames(run)}


def _figure_inputs(frames: dict[str, Any], registry: dict) -> str:
    """Digest of everything the figures are drawn from: the plotted frames and the plotting code."""
    digest = hashlib.sha256(code_fingerprint(bench.reporting.plots).encode())
    for name in dict.fromkeys(t for _, figure in figures() for t in figure.tables):
        digest.update(frames[name].to_csv(index=False).encode())
    digest.update(repr(sorted(registry.items())).encode() + repr(sorted(frames["certified_defenses"])).encode())
    return digest.hexdigest()


def _reuse_figures(folder: Path, inputs: str) -> dict[str, dict[str, Path]] | None:
    """Copy the figures of a sibling run drawn from identical inputs (a fully reused rerun): drawing
    them again would give the same files and costs most of a warm run's time."""
    for marker in sorted(folder.parent.parent.glob(f"*/{FIGURES}/{INPUTS_MARKER}"), reverse=True):
        if marker.parent == folder or marker.read_text() != inputs:
            continue
        paths: dict[str, dict[str, Path]] = {}
        for source in sorted(marker.parent.iterdir()):
            if source.suffix in (".png", ".pdf"):
                paths.setdefault(source.stem, {})[source.suffix[1:]] = write_bytes(folder / source.name,
                                                                                   source.read_bytes())
        write_text(folder / INPUTS_MARKER, inputs)
        return paths
    return None


def write_figures(frames: dict[str, Any], folder: Path) -> dict[str, dict[str, Path]]:
    """Figs. 2-5 of the paper for whatever the run holds; figures without data are skipped."""
    registry = {(c.dataset, c.defense_label): c.defense for c, _ in frames["cells"]}
    inputs = _figure_inputs(frames, registry)
    reused = _reuse_figures(folder, inputs)
    if reused is not None:
        return reused
    drawn = {stem: figure.draw(frames, registry) for stem, figure in figures()}
    paths = {stem: save_figure(figure, folder, stem) for stem, figure in drawn.items() if figure is not None}
    write_text(folder / INPUTS_MARKER, inputs)
    return paths


def write_report(store: Store, run_id: str, run_dir: Path | None, robust_thresholds=None) -> dict[str, Any]:
    """Write the run's tables (CSV, Markdown, LaTeX), figures (PNG, PDF) and `report.html` (all of them on one
    self-contained page) under run_dir (None: no files).

    Returns the terminal text, the paths written, the accuracy frame ("frame"), all frames and the
    metrics.json document ("metrics", bench.reporting.metrics).
    """
    frames = run_frames(store, run_id, robust_thresholds)
    info, cells, run = frames["info"], frames["cells"], frames["run"]
    views: list[tuple[str, Any, Any, str]] = []
    text = ""
    for name, table in tables():
        long = frames[name]
        if long.empty and not table.write_empty:
            continue
        wide = table.pivot(long, frames, run)
        caption = table.caption(run)
        views.append((table.stem, long, wide, caption))
        heading = textwrap.fill(table.heading or caption, TEXT_WIDTH)  # the console's width, like the tables
        text += ("\n" if text else "") + heading + "\n" + to_text(wide)
    warnings = run_checks(cells, info["settings"]["l_attack"], run.infos)
    checks = "".join(f"WARNING: {w}\n" for w in warnings) or "all sanity checks passed\n"
    text += "".join(f"\nWARNING: {w}" for w in warnings) + ("\n" if warnings else "")
    missing = store.missing_cells(run_id)
    if missing:
        # An incomplete run is marked at the top of the text and in checks.txt: its tables lack cells.
        banner = (f"INCOMPLETE RUN: {len(missing)} of {len(cells)} cell(s) have no results (killed or failed run); "
                  "re-run the same profile into the same results folder to finish it\n")
        text, checks = banner + text, banner + checks
        warnings = [CheckWarning(banner, INCOMPLETE_RUN), *warnings]
    metrics = build_metrics(frames)
    paths = {} if run_dir is None else _write_files(store, run_id, run_dir, frames, views, (checks, warnings), metrics)
    return {"text": text, "paths": paths, "frame": frames["accuracy"], "frames": frames, "metrics": metrics}


def _write_files(store: Store, run_id: str, run_dir: Path, frames: dict[str, Any],
                 views: list[tuple[str, Any, Any, str]], checks: tuple[str, list[CheckWarning]],
                 metrics: dict[str, Any]) -> dict[str, Any]:
    """The report's files: tables (views of (stem, long, wide, caption)), figures, run.json, config.json,
    checks.txt (checks: its text, and the warnings), metrics.json and report.html."""
    paths: dict[str, Any] = {stem: write_table(long, wide, run_dir, stem, caption)
                             for stem, long, wide, caption in views}
    paths["figures"] = write_figures(frames, run_dir / FIGURES)
    write_text(run_dir / "run.json", json.dumps(frames["info"], indent=2, sort_keys=True))
    # The full resolved configuration of every cell, in run order, next to the settings and environment.
    write_text(run_dir / "config.json", json.dumps(
        [{"key": key, **cell.config()} for key, cell in store.run_cells(run_id)], indent=2, sort_keys=True))
    paths["checks"] = write_text(run_dir / "checks.txt", checks[0])
    paths["metrics"] = write_text(run_dir / METRICS_NAME, metrics_text(metrics))
    pngs = {stem: files["png"] for stem, files in paths["figures"].items()}
    paths["html"] = write_text(run_dir / HTML_REPORT, report_html(frames["info"], views, checks[1], pngs,
                                                                  _checks_doc_link(run_dir)))
    return paths


def _checks_doc_link(run_dir: Path) -> str:
    """docs/checks.md relative to the report's folder when this is a source checkout (it then opens offline
    and on a code host), else the bare repository path."""
    doc = REPO_ROOT / CHECKS_DOC
    if not doc.exists():
        return CHECKS_DOC
    return Path(os.path.relpath(doc, run_dir.resolve())).as_posix()
