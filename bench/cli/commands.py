"""Command-line interface: `pixeldp-bench run | list | report | compare | baseline | store | history | metrics`
(also `python -m bench`)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.cli.session import STORE_NAME, default_results_dir, load_run_plugins, run_profile
from bench.core.archs import describe_models
from bench.reporting.baseline import export_run
from bench.reporting.compare import (check_complete, compare_runs, format_comparison, missing_from_new, only_common,
                                     open_run)
from bench.execution.estimate import add_parser as add_estimate
from bench.cli.store_tools import add_parser as add_store
from bench.cli.history_tools import add_parser as add_history
from bench.reporting.tables import write_table
from bench.core.atomic import advice, write_text
from bench.profile.config import shipped_profiles
from bench.core.errors import UserError
from bench.profile.plugins import load_plugins, loaded_plugins
from bench.core.registry import ATTACKS, DATASETS, DEFENSES
from bench.reporting.report import write_report
from bench.reporting.history_files import report_history
from bench.profile.speed import AUTOCAST_CHOICES
from bench.execution.store import Store, StoreError
from bench.reporting.table_registry import tables
from bench.core.zoo import describe as describe_zoo

__all__ = ["STORE_NAME", "build_parser", "default_results_dir", "main"]


def _say(text: str) -> None:
    print(text, end="", flush=True)


def _log(message: str) -> None:
    print(message, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    run_profile(args.profile, results=args.results, data_root=args.data_root, download=args.download,
                weights_root=args.weights_root, device=args.device, executor=args.executor, seed=args.seed,
                examples=args.examples, max_steps=args.max_steps, max_draws=args.max_draws, datasets=args.datasets,
                batch_size=args.batch_size, threads=args.threads, checkpoint_every=args.checkpoint_every,
                loader_workers=args.loader_workers, cudnn_benchmark=args.cudnn_benchmark, autocast=args.autocast,
                channels_last=args.channels_last, ray_address=args.ray_address, ray_workers=args.ray_workers,
                cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task,
                ray_ship_models=args.ray_ship_models, dry_run_only=args.dry_run,
                # Bars only on a terminal: redirected to a log file they are thousands of \r lines.
                progress=not args.quiet and sys.stderr.isatty(), say=_say, log=None if args.quiet else _log)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if getattr(args, "zoo", False):
        print(describe_zoo(getattr(args, "weights_root", None)), end="")
        return 0
    if getattr(args, "models", False):

        print("models (parameters at the input size each is used with):")
        for name, shape, classes, parameters, users in describe_models():
            print(f"  {name:26s} {'x'.join(map(str, shape)):10s} {classes:5d} classes {parameters:>12,d} parameters"
                  f"  {'default for ' + ', '.join(users) if users else ''}".rstrip())
        return 0
    print("datasets:")
    for name in DATASETS.names():
        spec = DATASETS.get(name)
        print(f"  {name:12s} {'x'.join(map(str, spec.shape)):10s} {spec.classes:5d} classes  {spec.description}")
    print("defenses:")
    for name in DEFENSES.names():
        cls, info = DEFENSES.get(name), DEFENSES.info(name)
        flags = ", ".join(f for f in ("randomized", "certified") if getattr(info, f)) or "-"
        print(f"  {name:24s} {flags:22s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    print("attacks:")
    for name in ATTACKS.names():
        attack = ATTACKS.info(name)
        kind = "minimum-norm" if attack.minimum_norm else "fixed-eps"
        print(f"  {name:24s} {attack.norm:5s} {kind:13s}{' EOT' if attack.eot else ''}")
    print("tables:")
    for name, table in tables():
        print(f"  {name:24s} {table.stem}.csv / .md / .tex")
    print("profiles:")
    print("  " + ", ".join(shipped_profiles()))
    if loaded_plugins():
        print("plugins:")
        for module, origin in loaded_plugins().items():
            print(f"  {module:24s} {origin}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    candidate = Path(args.run)
    if candidate.is_dir() and (candidate.parent / STORE_NAME).exists():
        results, run_id = candidate.resolve().parent, candidate.resolve().name
    else:
        results, run_id = (Path(args.results).resolve() if args.results else default_results_dir()), args.run
    if not (results / STORE_NAME).exists():
        raise StoreError(f"no results store at {results / STORE_NAME}; pass --results DIR or a run folder")
    store = Store(results / STORE_NAME, readonly=True)
    load_run_plugins(store, run_id)
    out = results / run_id
    if not os.access(out if out.exists() else results, os.W_OK):
        out = Path(tempfile.mkdtemp(prefix=f"{run_id}-"))
        print(f"{results / run_id} is not writable; tables go to {out}")
    with advice(f"re-run `pixeldp-bench report {args.run}`"):
        report = write_report(store, run_id, out, robust_thresholds=args.robust_thresholds)
        note = report_history(store, run_id, out, prepare=load_run_plugins)
    print(report["text"], end="")
    if note is not None:
        print(note)
    print(f"tables written to {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:

    results = Path(args.results).resolve() if args.results else default_results_dir()
    base, new = open_run(args.base, results), open_run(args.new, results)
    for store, run_id in (base, new):
        load_run_plugins(store, run_id)
    for role, (store, run_id) in (("base", base), ("new", new)):
        check_complete(role, store, run_id)
    frame, notes = compare_runs(base, new, tolerance=args.tolerance, alpha=args.alpha, correction=args.correction,
                                robust_thresholds=args.robust_thresholds)
    print(f"base {base[1]} ({base[0].path}) vs new {new[1]} ({new[0].path}); tolerance {args.tolerance:g}, "
          f"alpha {args.alpha:g} ({args.correction})")
    gap = None if args.only_common else missing_from_new(frame)
    left_out = None
    if args.only_common:
        frame, *counts = only_common(frame)
        left_out = (counts[0], counts[1])
    print(format_comparison(frame, notes, everything=args.all, left_out=left_out), end="")
    if args.out:
        write_table(frame, frame, Path(args.out), "comparison", f"Comparison of {new[1]} against {base[1]}.")
    if gap is not None:
        print(f"pixeldp-bench: compare failed: {gap}", file=sys.stderr)
        return 1
    return 1 if (frame["status"] == "REGRESSION").any() else 0


def cmd_baseline(args: argparse.Namespace) -> int:

    results = Path(args.results).resolve() if args.results else default_results_dir()
    store, run_id = open_run(args.run, results)
    load_run_plugins(store, run_id)
    if store.missing_cells(run_id):
        raise StoreError(f"run {run_id} is incomplete ({len(store.missing_cells(run_id))} cell(s) missing); finish it "
                         "by re-running its profile before exporting it as a baseline")
    out = Path(args.out) if args.out else results / "baselines" / store.run_info(run_id)["profile"]
    path = export_run(store, run_id, out / "baseline.json")
    text = write_report(store, run_id, None)["text"]  # only the tables' text goes next to the export
    write_text(out / "tables.md", f"Tables of baseline run {run_id}.\n\n```\n{text}```\n")
    print(f"run {run_id} exported to {path}; compare a new run with: pixeldp-bench compare {out} NEW_RUN")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixeldp-bench", description="Adversarial-robustness benchmark harness "
                                     "reproducing PixelDP (Lecuyer et al., IEEE S&P 2019).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a profile (a shipped name like 'smoke' or a path to a TOML file)")
    run.add_argument("profile", help="shipped profile name or path to a .toml profile")
    run.add_argument("--examples", type=int, help="number of test examples (fixed stratified subset)")
    run.add_argument("--datasets", nargs="+", metavar="NAME", help="run only these of the profile's datasets "
                     "(e.g. --datasets mnist: a big profile with the data you have)")
    run.add_argument("--max-steps", type=int, help="cap on training steps and attack iterations")
    run.add_argument("--max-draws", type=int, help="cap on Monte Carlo draw counts (draws, draws_*, *_draws params)")
    run.add_argument("--seed", type=int, help="seed for training, example selection and noise")
    run.add_argument("--results", help="results folder (default: $PIXELDP_BENCH_RESULTS or <repo>/results)")
    run.add_argument("--data-root", help="dataset folder (default: $PIXELDP_BENCH_DATA or <repo>/datasets)")
    run.add_argument("--download", action="store_true", help="download missing datasets (torchvision) and zoo "
                     "weights (the authors' URLs, into ~/.cache/pixeldp-bench/zoo; SHA-256 verified)")
    run.add_argument("--weights-root", metavar="DIR", help="folder holding zoo weight files (weights = \"zoo:NAME\"; "
                     "default: $PIXELDP_BENCH_WEIGHTS, then the download cache)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--batch-size", type=int, help="examples per attack batch (replaces a number in run.batch_size; "
                     "per-dataset and per-attack batch sizes still win; on CUDA fewer when memory asks)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-cell lines")
    run.add_argument("--dry-run", action="store_true", help="print which cells would be computed or reused, and "
                     "why, without training or attacking anything")
    run.add_argument("--checkpoint-every", type=float, metavar="SECONDS", help="save training state this often "
                     "(default 300 s); a killed run resumes training from the last checkpoint")
    run.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 on a "
                     "machine shared with other jobs)")
    run.add_argument("--executor", choices=("local", "ray"), default="local", help="local: cells one after another "
                     "in this process (default); ray: Ray tasks on a local or remote cluster (pip install "
                     "'pixeldp-bench[ray]')")
    run.add_argument("--ray-address", metavar="ADDRESS", help="with --executor ray: a running cluster (e.g. auto or "
                     "HOST:6379, see `ray start`); default: start a local one")
    run.add_argument("--ray-workers", type=int, metavar="N", help="with --executor ray and no --ray-address: tasks "
                     "run at once on the local cluster (default: one per CPU)")
    run.add_argument("--cpus-per-task", type=float, metavar="N", help="with --executor ray: CPUs per task "
                     "(default: profile's run.cpus_per_task, else 1)")
    run.add_argument("--gpus-per-task", type=float, metavar="N", help="with --executor ray: GPUs per task, "
                     "fractions share a GPU (default: profile's run.gpus_per_task, else 1 on a GPU cluster)")
    run.add_argument("--ray-ship-models", action="store_true", help="with --executor ray: send trained models "
                     "through Ray's object store even when workers see --results (default: only when they do not)")
    run.add_argument("--autocast", choices=AUTOCAST_CHOICES, help="bf16: post-noise bodies (whole undefended "
                     "models) in bf16 autocast on CUDA; changes results, so cells get other keys (run.autocast)")
    run.add_argument("--channels-last", action="store_true", help="NHWC layout for post-noise bodies; changes "
                     "rounding, so cells get other keys (run.channels_last)")
    run.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its convolution algorithms "
                     "(CUDA; rounding-level differences only, not in keys) (run.cudnn_benchmark)")
    run.add_argument("--loader-workers", type=int, help="DataLoader worker processes decoding training images "
                     "(ImageNet); tensor datasets are batched on the device (run.loader_workers, default 0)")
    run.set_defaults(func=cmd_run)
    lst = sub.add_parser("list", help="list registered datasets, defenses, attacks and profiles")
    lst.add_argument("--models", action="store_true", help="list architectures with their parameter counts")
    lst.add_argument("--zoo", action="store_true", help="list the zoo's published checkpoints, their published "
                     "numbers and whether their files are found")
    lst.add_argument("--weights-root", metavar="DIR", help="with --zoo: the folder to look in (as for run)")
    lst.set_defaults(func=cmd_list)
    rep = sub.add_parser("report", help="re-render a run's tables from the results store")
    rep.add_argument("run", help="run id (folder name under the results folder) or a run folder path")
    rep.add_argument("--results", help="results folder holding store.sqlite")
    rep.add_argument("--robust-thresholds", type=float, nargs="+", help="thresholds T of the robust precision/"
                     "recall table (default 0.05 0.1)")
    rep.set_defaults(func=cmd_report)
    cmp = sub.add_parser("compare", help="compare two runs example by example; exit 1 on a significant drop")
    cmp.add_argument("base", help="baseline: run id, run folder, results folder (latest run) or baseline export")
    cmp.add_argument("new", help="new run: same forms as BASE")
    cmp.add_argument("--results", help="results folder holding store.sqlite, for run ids")
    cmp.add_argument("--tolerance", type=float, default=0.02, help="drop (fraction, e.g. 0.02 = 2 points) tolerated "
                     "even when significant (default 0.02)")
    cmp.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    cmp.add_argument("--correction", choices=("holm", "none"), default="holm",
                     help="multiple-testing correction over all table cells (default holm)")
    cmp.add_argument("--robust-thresholds", type=float, nargs="+", help="thresholds T for robust recall")
    cmp.add_argument("--all", action="store_true", help="print every table cell, not only the changed ones")
    cmp.add_argument("--out", help="folder to write comparison.csv/.md/.tex to")
    cmp.add_argument("--only-common", action="store_true", help="compare only the table cells both runs have "
                     "(default: fail when the new run lacks cells the base has)")
    cmp.set_defaults(func=cmd_compare)
    base = sub.add_parser("baseline", help="export a run to a self-contained JSON baseline for `compare`")
    base.add_argument("run", help="run id, run folder, or results folder (latest run)")
    base.add_argument("--results", help="results folder holding store.sqlite, for run ids")
    base.add_argument("--out", help="output folder (default: <results>/baselines/<profile>)")
    base.set_defaults(func=cmd_baseline)

    add_estimate(sub)
    add_store(sub)
    add_history(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        load_plugins()  # built-ins and installed entry-point plugins, before any name is looked up
        return args.func(args)
    except UserError as exc:  # exactly the errors a user can fix; anything else is a bug and keeps its traceback
        print(f"pixeldp-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pixeldp-bench: interrupted; finished cells are saved, re-run the same command to resume",
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `pixeldp-bench list | head`: the reader left; stop quietly (and keep Python's exit flush from failing).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
