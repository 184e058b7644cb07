"""`pixeldp_bench.run`: `pixeldp-bench run PROFILE` as a function that returns the finished `Run`."""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from typing import Any

from bench.cli.session import results_folder, run_profile
from bench.profile.config import ConfigError
from bench.profile.plugins import load_plugins
from pixeldp_bench.memory import name_models, register_models
from pixeldp_bench.runs import Run

__all__ = ["run"]


def _say(text: str) -> None:
    print(text, end="", flush=True)


def _warn(text: str) -> None:
    print(text, end="", file=sys.stderr)


def _log(message: str) -> None:
    print(message, flush=True)


def _silent(text: str) -> None:
    """Output dropped (quiet=True): the run's text is in `Run.text`, its tables in `Run.tables`."""


def run(profile: str | os.PathLike | Mapping[str, Any], *, results: str | os.PathLike | None = None,
        data_root: str | os.PathLike | None = None, download: bool = False, device: str = "auto",
        executor: str = "local", seed: int | None = None, examples: int | None = None, max_steps: int | None = None,
        max_draws: int | None = None, datasets: str | list[str] | None = None, progress: bool = True,
        quiet: bool = False, models: Mapping[str, Any] | None = None) -> Run:
    """Run a profile like `pixeldp-bench run` (same checks, cells, records, store and report) and return it.

    Args:
        profile: a shipped profile's name ("smoke"), a path to a TOML profile, or a dict with the TOML's
            schema ({"run": {...}, "defenses": {...}, "attacks": {...}}), checked with the same messages.
        results: results folder (default: $PIXELDP_BENCH_RESULTS or <repo>/results); the run gets a folder in it.
        data_root, download, device, executor, seed, examples, max_steps, max_draws, datasets: as the
            `run` options --data-root, --download, --device, ... of the CLI.
        progress: progress bars (on a terminal only, like the CLI's).
        quiet: print nothing (the CLI prints the run line, per-cell lines, the tables and warnings).
        models: in-memory networks by label ({"mine": module}): a defense with `model = "mine"` in its params
            (or `factory = "memory:mine"`) evaluates `module`, whose weights are saved (safetensors, named by
            their SHA-256) into the results folder's model cache; its code and weights key its cells.

    Raises:
        UserError: one-line problems a user can fix (bad profile, missing data, unwritable folder, ...).
    """
    load_plugins()  # built-ins and installed entry-point plugins, as the CLI loads them before any name
    if models is not None and executor != "local":
        raise ConfigError("models= needs executor=\"local\": other processes cannot see in-memory networks; "
                          "save them and use factory = ... and weights = ... instead")
    if isinstance(profile, Mapping):
        profile = name_models(profile)  # model = "LABEL" -> factory = "memory:LABEL"
    # Always: a profile naming a model that models= lacks is refused with the fix, not an import error.
    prepare = functools.partial(register_models, models=dict(models or {}),
                                folder=lambda: results_folder(results, write=True) / "models" / "memory")
    finished = run_profile(profile, results=results, data_root=data_root, download=download, device=device,
                           executor=executor, seed=seed, examples=examples, max_steps=max_steps, max_draws=max_draws,
                           datasets=[datasets] if isinstance(datasets, str) else datasets,
                           progress=progress and not quiet and sys.stderr.isatty(),
                           say=_silent if quiet else _say, warn=_silent if quiet else _warn,
                           log=None if quiet else _log, prepare=prepare)
    assert finished is not None  # only a dry run returns None
    return Run(finished.results, finished.run_id)
