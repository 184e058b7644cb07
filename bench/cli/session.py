"""`run` as one function of plain keyword arguments: what `pixeldp-bench run` and `pixeldp_bench.run` both call."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.core.atomic import OutputWriteError, advice
from bench.profile.config import ConfigError, Profile, load_profile, parse_profile
from bench.core.data import REPO_ROOT
from bench.core.devices import pick_device, ray_driver_device
from bench.execution.environment import environment
from bench.profile.plugins import load_plugins, run_plugins
from bench.profile.preflight import check_inputs
from bench.execution.ray_executor import RaySettings, check_settings, execute_ray, import_ray
from bench.reporting.report import write_report
from bench.execution.runner import RunOptions, execute, keyed
from bench.profile.speed import SpeedError, check_device, configure_backends
from bench.execution.store import STORE_NAME, Store
from bench.profile.toml_text import to_toml
from bench.execution.training import LoaderOptions
from bench.execution.dryrun import explain, format_plan
from bench.reporting.history_files import report_history

__all__ = ["STORE_NAME", "Finished", "run_profile", "default_results_dir", "results_folder", "load_run_plugins"]

DICT_PROFILE_NAME = "profile"  # a dict profile's run name when its [run] has no `name`

ProfileSpec = str | os.PathLike | Mapping[str, Any]


@dataclass
class Finished:
    """A finished run: its id, its results folder and what `write_report` returned for it."""

    run_id: str
    results: Path
    report: dict[str, Any]


def default_results_dir() -> Path:
    """$PIXELDP_BENCH_RESULTS, else the checkout's results/ folder, else a per-user data folder."""
    env = os.environ.get("PIXELDP_BENCH_RESULTS")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "results"
    return Path.home() / ".local" / "share" / "pixeldp-bench" / "results"


def results_folder(given: str | os.PathLike | None, write: bool) -> Path:
    """--results (or the default), checked: a folder, and writable when `write`."""
    results = Path(given).expanduser().resolve() if given else default_results_dir()
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


def load_run_plugins(store: Store, run_id: str) -> None:
    """Import the `[run] plugins` a stored run was computed with: its tables read their registry entries."""
    load_plugins(run_plugins(store.run_info(run_id)["settings"]))


def check_run_options(*, batch_size: int | None = None, threads: int | None = None,
                      loader_workers: int | None = None, checkpoint_every: float | None = None) -> None:
    """The numbers given to `run`, checked before anything is loaded, registered or written."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if loader_workers is not None and loader_workers < 0:
        raise ConfigError(f"--loader-workers must be at least 0, got {loader_workers}")
    if checkpoint_every is not None and not checkpoint_every > 0:  # NaN is refused too
        raise ConfigError(f"--checkpoint-every must be a positive number of seconds, got {checkpoint_every:g}")


def read_profile(profile: ProfileSpec, **overrides: Any) -> Profile:
    """A shipped profile's name, a TOML path, or a dict with the TOML's schema (written as TOML, parsed the same)."""
    if isinstance(profile, Mapping):
        return parse_profile(to_toml(profile), DICT_PROFILE_NAME, **overrides)
    return load_profile(os.fspath(profile), **overrides)


def check_speed(profile: Profile, device: torch.device) -> None:
    """bench.profile.speed's settings must fit the device (bf16 autocast needs CUDA): a one-line error otherwise."""
    try:
        check_device(profile.speed, device)
    except SpeedError as exc:
        raise ConfigError(str(exc)) from None


def ray_settings(profile: Profile, *, executor: str, address: str | None, workers: int | None,
                 cpus_per_task: float | None, gpus_per_task: float | None, ship_models: bool) -> RaySettings:
    """Ray settings from the arguments, then the profile's [run] keys, then defaults (checked)."""
    if executor != "ray":
        raise ConfigError("--ray-address, --ray-workers, --ray-ship-models, --cpus-per-task and --gpus-per-task need "
                          "--executor ray")
    cpus = cpus_per_task if cpus_per_task is not None else profile.cpus_per_task
    gpus = gpus_per_task if gpus_per_task is not None else profile.gpus_per_task
    settings = RaySettings(address=address, workers=workers, cpus_per_task=1.0 if cpus is None else cpus,
                           gpus_per_task=gpus, plugins=run_plugins({"profile_source": profile.source}),
                           ship_models=ship_models, cudnn_benchmark=profile.cudnn_benchmark)
    check_settings(settings)
    import_ray()  # refuse before anything is written when the extra is missing
    return settings


def dry_run(results: str | os.PathLike | None, cells, say: Callable[[str], None]) -> None:
    """Say, per cell, whether it would be computed or reused and why; writes nothing."""
    folder = results_folder(results, write=False)
    store = Store(folder / STORE_NAME, readonly=True) if (folder / STORE_NAME).is_file() else None
    say(format_plan(explain(cells, store)))


def _print(text: str) -> None:
    print(text, end="", flush=True)


def _print_error(text: str) -> None:
    print(text, end="", file=sys.stderr)


def run_profile(profile: ProfileSpec, *, results: str | os.PathLike | None = None,
                data_root: str | os.PathLike | None = None, download: bool = False, weights_root: str | None = None,
                device: str = "auto", executor: str = "local", seed: int | None = None, examples: int | None = None,
                max_steps: int | None = None, max_draws: int | None = None, datasets: list[str] | None = None,
                batch_size: int | None = None, threads: int | None = None, checkpoint_every: float | None = None,
                loader_workers: int | None = None, cudnn_benchmark: bool = False, autocast: str | None = None,
                channels_last: bool = False, ray_address: str | None = None, ray_workers: int | None = None,
                cpus_per_task: float | None = None, gpus_per_task: float | None = None,
                ray_ship_models: bool = False, dry_run_only: bool = False, progress: bool = False,
                prepare: Callable[[Profile], Profile] | None = None,
                say: Callable[[str], None] = _print, warn: Callable[[str], None] = _print_error,
                log: Callable[[str], None] | None = None) -> Finished | None:
    """Check, register, compute (local or Ray) and report a profile's run; None after a dry run.

    Every keyword is the `pixeldp-bench run` option of that name. `say` gets the lines the CLI
    prints to stdout and `warn` those it prints to stderr (each ending in a newline), `log` the
    per-cell lines (None: none); `progress` shows progress bars. `prepare` rewrites the read profile
    before its inputs are checked (the Python API's in-memory models).
    """
    check_run_options(batch_size=batch_size, threads=threads, loader_workers=loader_workers,
                      checkpoint_every=checkpoint_every)
    resolved = read_profile(profile, examples=examples, seed=seed, max_steps=max_steps, max_draws=max_draws,
                            autocast=autocast, channels_last=True if channels_last else None,
                            only_datasets=datasets)
    if prepare is not None:
        resolved = prepare(resolved)
    run_device = pick_device(device) if executor == "local" else ray_driver_device(device)
    if executor == "local" or device == "cpu":
        check_speed(resolved, run_device)  # Ray workers check their own device (the driver may have no GPU)
    # Weights, factories and data splits (and the examples they hold), before anything is written.
    # A dict has no folder: its relative weight paths resolve from the working directory, as a shipped name's do.
    inputs = argparse.Namespace(profile="" if isinstance(profile, Mapping) else os.fspath(profile),
                             weights_root=weights_root, download=download, data_root=data_root)
    resolved = check_inputs(resolved, inputs)
    if batch_size is not None:
        resolved.batch_size = batch_size
    if loader_workers is not None:
        resolved.loader_workers = loader_workers
    resolved.cudnn_benchmark = resolved.cudnn_benchmark or cudnn_benchmark
    configure_backends(run_device, resolved.cudnn_benchmark)
    if threads is not None:
        torch.set_num_threads(threads)
    ray_flags = (ray_address, ray_workers, cpus_per_task, gpus_per_task, ray_ship_models or None)
    ray = None
    if executor == "ray" or any(v is not None for v in ray_flags):
        ray = ray_settings(resolved, executor=executor, address=ray_address, workers=ray_workers,
                           cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task, ship_models=ray_ship_models)
    cells = keyed(resolved.cells)
    if dry_run_only:
        dry_run(results, cells, say)
        return None
    folder = results_folder(results, write=True)
    if max_steps == 0:
        warn("pixeldp-bench: warning: --max-steps 0 trains nothing: every model is evaluated untrained\n")
    if resolved.seed_source == "os":
        say(f"seed {resolved.seed} (drawn from the OS; pass --seed {resolved.seed} to repeat this run)\n")
    # A Ray run hands the device name to its workers, each resolving it on its own node.
    run_options = RunOptions(results_dir=folder, device=device if ray is not None else str(run_device),
                             data_root=Path(data_root) if data_root else None, download=download,
                             batch_size=resolved.batch_size, progress=progress, max_draws=max_draws,
                             overhead_draws=tuple(resolved.overhead_draws),
                             loader=LoaderOptions(workers=resolved.loader_workers, pin_memory=resolved.pin_memory))
    if checkpoint_every is not None:
        run_options = replace(run_options, checkpoint_seconds=checkpoint_every)
    store = Store(folder / STORE_NAME)
    try:
        return _register_and_execute(resolved, cells, store, run_device, run_options, ray, say=say,
                                     log=log or (lambda message: None),
                                     overrides={"examples": examples, "max_steps": max_steps,
                                                "max_draws": max_draws, "only_datasets": datasets})
    finally:
        store.close()


def _register_and_execute(profile: Profile, cells, store: Store, device: torch.device, run_options: RunOptions,
                          ray: RaySettings | None, *, say: Callable[[str], None], log: Callable[[str], None],
                          overrides: dict[str, Any]) -> Finished:
    """Register the run in the store, compute its cells and write its report into its folder."""
    results = run_options.results_dir
    run_id, run_dir = new_run_folder(results, profile.name)
    settings = profile.settings() | overrides | {
        "profile_source": profile.source,
        # Resolved values (the overrides above may be None): seeds and subset sizes.
        "seeds": sorted({c.seed for c in profile.cells}),
        "examples_per_cell": sorted({c.examples for c in profile.cells})}
    store.start_run(run_id, profile.name, settings, environment(device), cells)
    say(f"run {run_id}: {len(cells)} cells on {device}; results in {run_dir}\n")
    with advice("re-run the same command: finished cells are kept in the store"):
        counts = (execute(cells, store, run_options, log) if ray is None
                  else execute_ray(cells, store, run_options, ray, log))
        say(f"{counts['run']} cell(s) computed, {counts['skipped']} reused from the store\n")
        report = write_report(store, run_id, run_dir)
        note = report_history(store, run_id, run_dir, prepare=load_run_plugins)
    say(report["text"])
    if note is not None:
        say(note + "\n")
    say(f"tables written to {run_dir}\n")
    return Finished(run_id=run_id, results=results, report=report)

