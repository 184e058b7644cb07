"""Command-line interface: `pixeldp-bench run | list | report | compare | baseline | store` (also `python -m bench`)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.atomic import OutputWriteError, advice, write_text
from bench.config import ConfigError, Profile, load_profile, shipped_profiles
from bench.data import REPO_ROOT
from bench.environment import environment
from bench.errors import UserError
from bench.plugins import load_plugins, loaded_plugins, run_plugins
from bench.preflight import check_inputs
from bench.registry import ATTACKS, DATASETS, DEFENSES
from bench.report import write_report
from bench.ray_executor import RaySettings, check_settings, execute_ray, import_ray
from bench.runner import RunOptions, execute, keyed
from bench.speed import AUTOCAST_CHOICES, SpeedError, check_device, configure_backends
from bench.store import Store, StoreError
from bench.training import LoaderOptions
from bench.table_registry import tables
from bench.zoo import describe as describe_zoo

__all__ = ["STORE_NAME", "build_parser", "main"]

STORE_NAME = "store.sqlite"


def default_results_dir() -> Path:
    """$PIXELDP_BENCH_RESULTS, else the checkout's results/ folder, else a per-user data folder."""
    env = os.environ.get("PIXELDP_BENCH_RESULTS")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "results"
    return Path.home() / ".local" / "share" / "pixeldp-bench" / "results"


def pick_device(name: str) -> torch.device:
    """'auto' picks CUDA when available; otherwise cpu, cuda, cuda:N or mps."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def results_folder(args: argparse.Namespace, write: bool) -> Path:
    """--results (or the default), checked: a folder, and writable when `write`."""
    results = Path(args.results).expanduser().resolve() if args.results else default_results_dir()
    if results.exists() and not results.is_dir():
        raise ConfigError(f"--results {results} is a file, not a folder; pass a folder")
    if write:
        probe_target = results if results.exists() else next(p for p in results.parents if p.exists())
        if not os.access(probe_target, os.W_OK):
            raise ConfigError(f"results folder {probe_target} is not writable; pass --results to a writable folder "
                              "(report and compare still read this one)")
    return results


def new_run_folder(results: Path, profile: str) -> tuple[str, Path]:
    """(run id, its folder) for <profile>-<UTC timestamp>, suffixed -2, -3, ... when taken.

    The folder is created atomically, so two runs started in the same second get different ids.
    """
    base = f"{profile}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    for n in range(1, 10_000):
        run_id = base if n == 1 else f"{base}-{n}"
        try:
            results.mkdir(parents=True, exist_ok=True)
            (results / run_id).mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputWriteError(results / run_id, exc) from exc
        return run_id, results / run_id
    raise ConfigError(f"cannot find a free run folder name under {results}")


def _check_speed(profile: Profile, device: torch.device) -> None:
    """bench.speed's settings must fit the device (bf16 autocast needs CUDA): a one-line error otherwise."""
    try:
        check_device(profile.speed, device)
    except SpeedError as exc:
        raise ConfigError(str(exc)) from None


def _device_settings(args: argparse.Namespace, profile: Profile, device: torch.device) -> None:
    """--loader-workers and --cudnn-benchmark over the profile's values; cuDNN switched on the device."""
    if args.loader_workers is not None:
        profile.loader_workers = args.loader_workers
    profile.cudnn_benchmark = profile.cudnn_benchmark or args.cudnn_benchmark
    configure_backends(device, profile.cudnn_benchmark)


def check_run_options(args: argparse.Namespace) -> None:
    """The numbers given to `run`, checked before anything is loaded, registered or written."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.loader_workers is not None and args.loader_workers < 0:
        raise ConfigError(f"--loader-workers must be at least 0, got {args.loader_workers}")
    if args.checkpoint_every is not None and not args.checkpoint_every > 0:  # NaN is refused too
        raise ConfigError(f"--checkpoint-every must be a positive number of seconds, got {args.checkpoint_every:g}")


def cmd_run(args: argparse.Namespace) -> int:
    check_run_options(args)
    profile = load_profile(args.profile, examples=args.examples, seed=args.seed, max_steps=args.max_steps,
                           max_draws=args.max_draws, autocast=args.autocast,
                           channels_last=True if args.channels_last else None, only_datasets=args.datasets)
    device = pick_device(args.device) if args.executor == "local" else worker_device_name(args.device)
    if args.executor == "local" or args.device == "cpu":
        _check_speed(profile, device)  # Ray workers check their own device (the driver may have no GPU)
    # Weights, factories and data splits (and the examples they hold), before anything is written.
    profile = check_inputs(profile, args)
    if args.batch_size is not None:
        profile.batch_size = args.batch_size
    _device_settings(args, profile, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ray_flags = (args.ray_address, args.ray_workers, args.cpus_per_task, args.gpus_per_task,
                 args.ray_ship_models or None)
    ray = ray_settings(args, profile) if args.executor == "ray" or any(v is not None for v in ray_flags) else None
    cells = keyed(profile.cells)
    if args.dry_run:
        return dry_run(args, cells)
    results = results_folder(args, write=True)
    if args.max_steps == 0:
        print("pixeldp-bench: warning: --max-steps 0 trains nothing: every model is evaluated untrained",
              file=sys.stderr)
    if profile.seed_source == "os":
        print(f"seed {profile.seed} (drawn from the OS; pass --seed {profile.seed} to repeat this run)")
    store = Store(results / STORE_NAME)
    run_id, run_dir = new_run_folder(results, profile.name)
    settings = profile.settings() | {"examples": args.examples, "max_steps": args.max_steps,
                                     "max_draws": args.max_draws, "only_datasets": args.datasets,
                                     "profile_source": profile.source,
                                     # Resolved values (the overrides above may be None): seeds and subset sizes.
                                     "seeds": sorted({c.seed for c in profile.cells}),
                                     "examples_per_cell": sorted({c.examples for c in profile.cells})}
    store.start_run(run_id, profile.name, settings, environment(device), cells)
    print(f"run {run_id}: {len(cells)} cells on {device}; results in {run_dir}", flush=True)
    options = RunOptions(results_dir=results, device=device, data_root=args.data_root, download=args.download,
                         batch_size=profile.batch_size,
                         # Bars only on a terminal: redirected to a log file they are thousands of \r lines.
                         progress=not args.quiet and sys.stderr.isatty(), max_draws=args.max_draws,
                         overhead_draws=tuple(profile.overhead_draws),
                         loader=LoaderOptions(workers=profile.loader_workers, pin_memory=profile.pin_memory),
                         log=(lambda message: None) if args.quiet else (lambda message: print(message, flush=True)))
    if args.checkpoint_every is not None:
        options.checkpoint_seconds = args.checkpoint_every
    with advice("re-run the same command: finished cells are kept in the store"):
        if args.executor == "ray":
            assert ray is not None
            counts = execute_ray(cells, store, options, ray)
        else:
            counts = execute(cells, store, options)
        print(f"{counts['run']} cell(s) computed, {counts['skipped']} reused from the store", flush=True)
        report = write_report(store, run_id, run_dir)
    print(report["text"], end="")
    print(f"tables written to {run_dir}")
    store.close()
    return 0


def worker_device_name(name: str) -> torch.device:
    """With Ray the device is chosen on each worker: only the name is checked here (the driver may have no GPU)."""
    if name == "auto":
        return torch.device("cpu")  # what the driver records; each worker picks its own
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported with --executor ray; use auto, cpu or cuda")
    # The driver records its own hardware; a GPU-less head node still sends cells to GPU workers.
    return device if device.type == "cpu" or torch.cuda.is_available() else torch.device("cpu")


def ray_settings(args: argparse.Namespace, profile: Profile) -> RaySettings:
    """Ray settings from the command line, then the profile's [run] keys, then defaults (checked)."""
    if args.executor != "ray":
        raise ConfigError("--ray-address, --ray-workers, --ray-ship-models, --cpus-per-task and --gpus-per-task need "
                          "--executor ray")
    cpus = args.cpus_per_task if args.cpus_per_task is not None else profile.cpus_per_task
    gpus = args.gpus_per_task if args.gpus_per_task is not None else profile.gpus_per_task
    settings = RaySettings(address=args.ray_address, workers=args.ray_workers,
                           cpus_per_task=1.0 if cpus is None else cpus, gpus_per_task=gpus,
                           plugins=run_plugins({"profile_source": profile.source}), device=args.device,
                           ship_models=args.ray_ship_models, cudnn_benchmark=profile.cudnn_benchmark)
    check_settings(settings)
    if args.executor == "ray":
        import_ray()  # refuse before anything is written when the extra is missing
    return settings


def dry_run(args: argparse.Namespace, cells) -> int:
    """Print, per cell, whether it would be computed or reused and why; writes nothing."""
    from bench.dryrun import explain, format_plan

    results = results_folder(args, write=False)
    store = Store(results / STORE_NAME, readonly=True) if (results / STORE_NAME).is_file() else None
    print(format_plan(explain(cells, store)), end="")
    return 0


def load_run_plugins(store: Store, run_id: str) -> None:
    """Import the `[run] plugins` a stored run was computed with: its tables read their registry entries."""
    load_plugins(run_plugins(store.run_info(run_id)["settings"]))


def cmd_list(args: argparse.Namespace) -> int:
    if getattr(args, "zoo", False):
        print(describe_zoo(getattr(args, "weights_root", None)), end="")
        return 0
    if getattr(args, "models", False):
        from bench.archs import describe_models

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
    print(report["text"], end="")
    print(f"tables written to {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.compare import compare_runs, format_comparison, missing_from_new, only_common, open_run
    from bench.tables import write_table

    results = Path(args.results).resolve() if args.results else default_results_dir()
    base, new = open_run(args.base, results), open_run(args.new, results)
    for store, run_id in (base, new):
        load_run_plugins(store, run_id)
    for role, (store, run_id) in (("base", base), ("new", new)):
        missing = store.missing_cells(run_id)
        if missing:
            names = "; ".join(f"{c.defense_label} x {c.attack_label}" + ("" if c.eps is None else f"@{c.eps:g}")
                              for _, c in missing[:5])
            raise StoreError(f"{role} run {run_id} is incomplete: {len(missing)} cell(s) missing ({names}"
                             f"{'; ...' if len(missing) > 5 else ''}); finish it by re-running its profile, "
                             "then compare")
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
    from bench.baseline import export_run
    from bench.compare import open_run

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
    from bench.estimate import add_parser as add_estimate
    from bench.store_tools import add_parser as add_store

    add_estimate(sub)
    add_store(sub)
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
