"""`pixeldp-bench history` (metrics across a profile's runs, regressions marked) and `pixeldp-bench metrics diff`."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.cli.session import default_results_dir
from bench.reporting.history import format_history
from bench.reporting.history_files import write_history
from bench.reporting.metrics import diff_metrics, format_diff, read_metrics
from pixeldp_bench.tracking import history

__all__ = ["add_parser"]


def _writable(folder: Path, what: str) -> Path:
    """`folder`, or a fresh temporary folder (said so) when it cannot be written, like `report` does."""
    if os.access(folder if folder.exists() else folder.parent, os.W_OK):
        return folder
    fallback = Path(tempfile.mkdtemp(prefix="pixeldp-bench-history-"))
    print(f"{folder} is not writable; {what} go to {fallback}")
    return fallback


def cmd_history(args: argparse.Namespace) -> int:
    given = args.folder or args.results
    results = Path(given).expanduser().resolve() if given else default_results_dir()
    frame = history(results, metrics=args.metric, profile=args.profile, last=args.last, tolerance=args.tolerance,
                    alpha=args.alpha)
    print(format_history(frame), end="")
    folder = Path(args.out) if args.out else (results.parent if results.is_file() else results)
    paths = write_history(frame, _writable(folder, "the history's files"), f"history_{frame['profile'].iloc[0]}")
    print(f"history written to {paths.get('png', paths['txt'])} (and .txt, .csv)")
    return 0


def cmd_metrics_diff(args: argparse.Namespace) -> int:
    old, new = read_metrics(args.old), read_metrics(args.new)
    print(format_diff(diff_metrics(old, new, everything=args.all), old, new), end="")
    return 0


def add_parser(sub: Any) -> None:
    """Register `history` and `metrics diff` on the CLI's subparsers."""
    hist = sub.add_parser("history", help="metrics of a profile's runs over time (commit, version), drops that "
                          "`compare` flags marked REGRESSION; text, CSV and a plot")
    hist.add_argument("folder", nargs="?", metavar="RESULTS", help="results folder holding store.sqlite "
                      "(default: $PIXELDP_BENCH_RESULTS or <repo>/results)")
    hist.add_argument("--results", help="the same as RESULTS")
    hist.add_argument("--metric", nargs="+", action="extend", metavar="PATH", help="metrics.json paths, e.g. "
                      "mnist5k/undefended/attacks/pgd_linf@0.1 (default: every worst-case accuracy)")
    hist.add_argument("--profile", help="whose runs (default: the latest run's profile)")
    hist.add_argument("--last", type=int, metavar="N", help="only the latest N runs of the profile")
    hist.add_argument("--tolerance", type=float, default=0.02, help="as for compare (default 0.02)")
    hist.add_argument("--alpha", type=float, default=0.05, help="as for compare (default 0.05)")
    hist.add_argument("--out", help="folder for history_<profile>.txt/.csv/.png/.pdf (default: the results folder)")
    hist.set_defaults(func=cmd_history)
    metrics = sub.add_parser("metrics", help="work with the metrics.json files that every report writes")
    tools = metrics.add_subparsers(dest="metrics_command", required=True)
    diff = tools.add_parser("diff", help="numbers that differ between two metrics.json files: path, old, new, "
                            "change (like `dvc metrics diff`)")
    diff.add_argument("old", help="metrics.json, or the run folder holding it")
    diff.add_argument("new", help="metrics.json, or the run folder holding it")
    diff.add_argument("--all", action="store_true", help="list every number, not only those that differ")
    diff.set_defaults(func=cmd_metrics_diff)
