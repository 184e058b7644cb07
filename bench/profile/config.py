"""Profiles: TOML files (read with tomllib) resolved into a validated list of Cells."""
from __future__ import annotations

import inspect
import math
import re
import secrets
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bench.core.errors import ConfigError
from bench.profile.params import (RUNNER_ARGUMENTS, check_types, defense_defaults, resolve_attack_params,
                                  resolve_defense_params)
from bench.profile.plugins import load_plugins
from bench.core.registry import ATTACKS, DATASETS, DEFENSES
from bench.profile.speed import SpeedError, cell_speed, speed_settings
from bench.core.types import Cell
from bench.core.zoo import expand

RUN_KEYS = {"name", "datasets", "examples", "certify_examples", "seed", "batch_size", "l_attack", "thresholds",
            "description", "overhead_draws", "plugins", "cpus_per_task", "gpus_per_task", "autocast",
            "channels_last", "cudnn_benchmark", "loader_workers", "pin_memory"}
DEFENSE_KEYS = {"defense", "params", "datasets", "dataset_params"}
ATTACK_KEYS = {"attack", "eps", "params", "datasets", "against", "dataset_params", "examples", "batch_size"}
# L1 in [0,1]-pixel units too: 10 is the budget of 10 MNIST pixels (of 784) flipped from 0 to 1.
DEFAULT_L_ATTACK = {"l1": [0.0, 2.0, 4.0, 6.0, 8.0, 10.0], "l2": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5],
                    "linf": [0.0, 0.05, 0.1, 0.2, 0.3]}
DEFAULT_THRESHOLDS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Profile:
    """A resolved profile: its cells in execution order plus run-level settings."""

    name: str
    cells: list[Cell]
    batch_size: int = 100
    l_attack: dict[str, list[float]] = field(default_factory=lambda: dict(DEFAULT_L_ATTACK))
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    source: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    seed_source: str = "profile"  # "profile", "argument" or "os" (drawn from the OS entropy)
    overhead_draws: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    # Ray executor resources per task (None: its defaults); they never change results, so no cell key holds them.
    cpus_per_task: float | None = None
    gpus_per_task: float | None = None
    # bench.profile.speed: settings that change results (in the cells' keys) and run options that do not.
    speed: dict[str, Any] = field(default_factory=dict)
    cudnn_benchmark: bool = False
    loader_workers: int = 0
    pin_memory: bool = True

    def settings(self) -> dict[str, Any]:
        """Run-level settings as plain data (stored with the run)."""
        return {"name": self.name, "batch_size": self.batch_size, "l_attack": self.l_attack,
                "thresholds": self.thresholds, "seed": self.seed, "seed_source": self.seed_source,
                "overhead_draws": self.overhead_draws, "speed": self.speed,
                "cudnn_benchmark": self.cudnn_benchmark, "loader_workers": self.loader_workers,
                "pin_memory": self.pin_memory}


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped inside the package (bench/profile/shipped/*.toml)."""
    folder = resources.files("bench.profile") / "shipped"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_profile_text(name_or_path: str) -> tuple[str, str]:
    """(profile name, TOML text) for a shipped profile name or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if path.is_dir():
            raise ConfigError(f"profile {path} is a directory; pass a .toml file or a shipped profile name")
        if not path.is_file():
            raise ConfigError(f"profile file {path} does not exist")
        return path.stem, path.read_text()
    if name_or_path not in shipped_profiles():
        raise ConfigError(f"unknown profile {name_or_path!r}; shipped profiles: {', '.join(shipped_profiles())}"
                          " (or pass a path to a .toml file)")
    return name_or_path, (resources.files("bench.profile") / "shipped" / f"{name_or_path}.toml").read_text()


def _check_keys(table: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; allowed keys: {', '.join(sorted(allowed))}")
    return table


def _as_list(value: Any, where: str) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, (str, int, float)):
        return [value]
    raise ConfigError(f"{where} must be a value or a list, got {type(value).__name__}")


def _check_attack_params(name: str, params: dict[str, Any], where: str) -> None:
    """Reject hyperparameters the attack does not accept (unless it takes **kwargs) or of the wrong type."""
    signature = inspect.signature(ATTACKS.get(name))
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        accepted = {n for n, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY} - RUNNER_ARGUMENTS
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r} for attack {name!r} in {where}; "
                              f"accepted: {', '.join(sorted(accepted))}")
    problems = check_types(params, resolve_attack_params(name, {}), f"attack {name!r} in {where}")
    if problems:
        raise ConfigError(problems[0])


def _resolved_defense_params(name: str, dataset: str, params: dict[str, Any], where: str) -> dict[str, Any]:
    """Construct the defense once (cheap: no training) so that bad parameters fail before running, and
    return its parameters with every default applied (what the cell key hashes)."""
    try:
        params = expand(params, dataset)  # weights = "zoo:NAME" brings its network and pinned SHA-256
    except ConfigError as exc:
        raise type(exc)(f"{where} on {dataset}: {exc}") from None
    problems = check_types(params, defense_defaults(name), f"defense {name!r} in {where}")
    if problems:
        raise ConfigError(problems[0])
    return resolve_defense_params(name, dataset, params, where)


def _numbers(values: list, where: str) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{where} must hold non-negative finite numbers, got {v!r}")
        out.append(float(v))
    return out


def _selected(entry: dict[str, Any], key: str, datasets: list[str]) -> list[str]:
    """The datasets an entry applies to (its own `datasets` list, or all of the run's)."""
    chosen = _as_list(entry.get("datasets", datasets), key + ".datasets")
    return [d for d in datasets if d in chosen]


def _dataset_params(entry: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """An entry's per-dataset parameter overrides: {dataset: {param: value}}, merged over `params`."""
    table = _check_keys(entry.get("dataset_params", {}), set(entry.get("dataset_params", {})), where)
    for dataset, params in table.items():
        DATASETS.get(dataset)
        _check_keys(params, set(params) if isinstance(params, dict) else set(), f"{where}.{dataset}")
    return {d: dict(p) for d, p in table.items()}


def _cap(params: dict[str, Any], word: str, cap: int | None) -> dict[str, Any]:
    """Cap integer params named `word`, `word_*` or `*_word` at `cap` (None: unchanged).

    Only `word` itself goes down to 0 (`--max-steps 0`: train nothing, attack nothing); the others
    (e.g. Madry's `attack_steps`, which must be >= 1 to build the defense) stop at 1.
    """
    if cap is None:
        return params

    def capped(key: str, value: Any) -> Any:
        named = key == word or key.startswith(word + "_") or key.endswith("_" + word)
        if not named or not isinstance(value, int) or isinstance(value, bool):
            return value
        return min(value, cap if key == word else max(cap, 1))

    return {k: capped(k, v) for k, v in params.items()}


def cap_counts(params: dict[str, Any], max_steps: int | None, max_draws: int | None) -> dict[str, Any]:
    """--max-steps caps every iteration count (`steps`, `binary_steps`, `eval_steps`, ...) and --max-draws
    every Monte Carlo draw count (`draws`, `draws_certify`, ...), so any profile can be shrunk to prove it runs."""
    return _cap(_cap(params, "steps", max_steps), "draws", max_draws)


def _targets(against: Any, defense_entries: dict[str, dict], where: str) -> set[str]:
    """Defense labels an attack runs against: 'all', 'randomized', 'deterministic' or a list."""
    if against in (None, "all"):
        return set(defense_entries)
    if against in ("randomized", "deterministic"):
        want = against == "randomized"
        return {label for label, e in defense_entries.items()
                if DEFENSES.info(e["defense"]).randomized == want}
    labels = set(_as_list(against, where))
    unknown = sorted(labels - set(defense_entries))
    if unknown:
        raise ConfigError(f"{where} names unknown defense {unknown[0]!r}; defenses: {', '.join(defense_entries)}")
    return labels


def _positive_int(value: Any, where: str) -> int:
    """An integer >= 1 (TOML integers only: "abc", 2.7 and true are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a whole number >= 1, got {value!r}")
    return value


def _resource(run: dict[str, Any], key: str) -> float | None:
    """A Ray resource amount from [run] (None when absent): CPUs above 0, GPUs at least 0 (fractions share one)."""
    if key not in run:
        return None
    value = run[key]
    cpus = key == "cpus_per_task"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 \
            or (cpus and value == 0):
        what = "above 0 (CPUs per Ray task, e.g. 2)" if cpus else ">= 0 (GPUs per Ray task; 0.25 lets four share one)"
        raise ConfigError(f"run.{key} must be a number {what}; got {value!r}")
    return float(value)


def _batch_sizes(value: Any, where: str) -> tuple[int | None, dict[str, int]]:
    """A `batch_size` setting, a whole number or a table {dataset: number}: (the number or None, the table)."""
    if isinstance(value, dict):
        sizes = {}
        for dataset, size in value.items():
            DATASETS.get(dataset)
            sizes[dataset] = _positive_int(size, f"{where}.{dataset}")
        return None, sizes
    return _positive_int(value, where), {}


def _run_name(value: Any, fallback: str) -> str:
    """A run name is a plain folder name: it can never point outside the results folder."""
    name = str(value if value is not None else fallback)
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"run name {name!r} must be a plain name of letters, digits and '-_.' "
                          "(it names a folder inside --results)")
    return name


def os_seed() -> int:
    """A fresh seed from the operating system's entropy (recorded with the run)."""
    return secrets.randbits(31)


def _defense_entries(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = {}
    for label, entry in _check_keys(raw.get("defenses", {}), set(raw.get("defenses", {})), "[defenses]").items():
        entry = dict(_check_keys(entry, DEFENSE_KEYS, f"[defenses.{label}]"))
        entry.setdefault("defense", label)
        DEFENSES.get(entry["defense"])
        entry["params"] = dict(_check_keys(entry.get("params", {}), set(entry.get("params", {})),
                                           f"defenses.{label}.params"))
        entry["dataset_params"] = _dataset_params(entry, f"defenses.{label}.dataset_params")
        entries[label] = entry
    if not entries:
        raise ConfigError("the profile defines no [defenses.*] table; add at least one defense")
    return entries


def _attack_entries(raw: dict[str, Any], defense_entries: dict[str, dict]) -> dict[str, dict[str, Any]]:
    entries = {}
    for label, entry in _check_keys(raw.get("attacks", {}), set(raw.get("attacks", {})), "[attacks]").items():
        entry = dict(_check_keys(entry, ATTACK_KEYS, f"[attacks.{label}]"))
        entry.setdefault("attack", label)
        info = ATTACKS.info(entry["attack"])
        entry["params"] = dict(_check_keys(entry.get("params", {}), set(entry.get("params", {})),
                                           f"attacks.{label}.params"))
        entry["dataset_params"] = _dataset_params(entry, f"attacks.{label}.dataset_params")
        for params in [entry["params"]] + [entry["params"] | p for p in entry["dataset_params"].values()]:
            _check_attack_params(entry["attack"], params, f"[attacks.{label}]")
        if info.minimum_norm:
            if "eps" in entry:
                raise ConfigError(f"[attacks.{label}]: {entry['attack']} is a minimum-norm attack; drop 'eps' "
                                  "(accuracy is reported at every run.l_attack value)")
            entry["eps"] = [None]
        elif "eps" not in entry:
            raise ConfigError(f"[attacks.{label}] needs 'eps' (a number, a list, or a table dataset -> list)")
        elif isinstance(entry["eps"], dict):
            for d in entry["eps"]:
                DATASETS.get(d)
            entry["eps_by_dataset"] = {d: _numbers(_as_list(v, f"attacks.{label}.eps.{d}"),
                                                   f"attacks.{label}.eps.{d}") for d, v in entry["eps"].items()}
        else:
            entry["eps"] = _numbers(_as_list(entry["eps"], f"attacks.{label}.eps"), f"attacks.{label}.eps")
        entry["targets"] = _targets(entry.get("against"), defense_entries, f"attacks.{label}.against")
        if "examples" in entry:
            _positive_int(entry["examples"], f"attacks.{label}.examples")
        entry["batch_sizes"] = _batch_sizes(entry.get("batch_size", {}), f"attacks.{label}.batch_size")
        entries[label] = entry
    return entries


def expand_cells(datasets: list[str], defense_entries: dict[str, dict], attack_entries: dict[str, dict], *,
                 examples: int, seed: int, max_steps: int | None, max_draws: int | None,
                 certify_examples: int | None = None, batch_sizes: dict[str, int] | None = None,
                 speed: dict[str, Any] | None = None) -> list[Cell]:
    """Every (dataset, defense, attack, eps) cell, the clean cell first per defense, parameters resolved.

    `certify_examples` (< examples) makes a certified defense's clean cell certify only that nested
    stratified subset and predict the rest: clean accuracy on many examples, certificates on fewer.
    `batch_sizes` {dataset: size} (run.batch_size as a table) and an attack entry's own `batch_size`
    (a number or such a table, which wins) set `Cell.batch_size`; None leaves the run's.

    An attack entry that yields no cell at all (no eps, no matching defense or dataset) is an error,
    never a silent drop. `speed` (bench.profile.speed) goes into the cells of the defenses it applies to.
    """
    cells: list[Cell] = []
    produced = {label: 0 for label in attack_entries}
    for dataset in datasets:
        for d_label, d_entry in defense_entries.items():
            if dataset not in _selected(d_entry, f"defenses.{d_label}", datasets):
                continue
            where = f"[defenses.{d_label}]"
            given = d_entry["params"] | d_entry["dataset_params"].get(dataset, {})
            d_params = cap_counts(_resolved_defense_params(d_entry["defense"], dataset, given, where), max_steps,
                                  max_draws)
            common = dict(dataset=dataset, defense=d_entry["defense"], defense_params=d_params,
                          examples=examples, seed=seed, max_steps=max_steps, defense_label=d_label,
                          speed=cell_speed(DEFENSES.info(d_entry["defense"]), speed or {}))
            certify = certify_examples if certify_examples is not None and certify_examples < examples else None
            if not DEFENSES.info(d_entry["defense"]).certified:
                certify = None
            run_batch = (batch_sizes or {}).get(dataset)
            cells.append(Cell(attack="none", certify_examples=certify, batch_size=run_batch, **common))
            for a_label, a_entry in attack_entries.items():
                if (d_label not in a_entry["targets"]
                        or dataset not in _selected(a_entry, f"attacks.{a_label}", datasets)):
                    continue
                given = a_entry["params"] | a_entry["dataset_params"].get(dataset, {})
                a_params = cap_counts(resolve_attack_params(a_entry["attack"], given), max_steps, max_draws)
                by_dataset = a_entry.get("eps_by_dataset")
                # An entry's own `examples` (e.g. an expensive EOT attack) takes the first examples of the
                # run's stratified subset: the selection is nested, so worst cases stay per example.
                subset = min(a_entry.get("examples", examples), examples)
                every, by_name = a_entry.get("batch_sizes", (None, {}))
                batch = by_name.get(dataset, every if every is not None else run_batch)
                for eps in a_entry["eps"] if by_dataset is None else by_dataset.get(dataset, []):
                    cells.append(Cell(attack=a_entry["attack"], norm=ATTACKS.info(a_entry["attack"]).norm, eps=eps,
                                      attack_params=a_params, attack_label=a_label, batch_size=batch,
                                      **(common | {"examples": subset})))
                    produced[a_label] += 1
    empty = [label for label, count in produced.items() if count == 0]
    if empty:
        raise ConfigError(f"[attacks.{empty[0]}] yields no cell: check its 'eps' (empty?), 'against' (no defense "
                          "of that kind?) and 'datasets'; remove the entry if it is not wanted")
    return cells


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _speed(run: dict[str, Any], autocast: str | None, channels_last: bool | None) -> dict[str, Any]:
    """The validated speed settings: the CLI's overrides, else the profile's run.autocast / run.channels_last."""
    try:
        return speed_settings(autocast if autocast is not None else run.get("autocast", "none"),
                              channels_last if channels_last is not None else run.get("channels_last", False))
    except SpeedError as exc:
        raise ConfigError(f"run.{exc}") from None


def parse_profile(text: str, name: str, *, examples: int | None = None, seed: int | None = None,
                  max_steps: int | None = None, max_draws: int | None = None, autocast: str | None = None,
                  channels_last: bool | None = None, only_datasets: list[str] | None = None) -> Profile:
    """Validate a profile's TOML text and expand it into cells (clean cell first per defense).

    `dataset_params` tables override an entry's `params` per dataset, an attack's `eps` may be a
    table {dataset: [eps, ...]}; `max_steps` and `max_draws` cap iteration and draw counts in every
    entry's params (see `cap_counts`; the runner also caps training steps). With no seed in the
    profile or the arguments, the seed comes from the OS and is recorded in `Profile.seed_source`.
    `autocast` and `channels_last` override the profile's run.autocast / run.channels_last.
    `only_datasets` keeps the profile's cells on those of its datasets (--datasets).
    """
    if max_draws is not None and max_draws < 1:
        raise ConfigError("--max-draws must be at least 1")
    if max_steps is not None and max_steps < 0:
        raise ConfigError("--max-steps must be at least 0")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile {name!r} is not valid TOML: {exc}") from exc
    _check_keys(raw, {"run", "defenses", "attacks"}, "the profile's top level")
    run = _check_keys(raw.get("run", {}), RUN_KEYS, "[run]")
    load_plugins(run.get("plugins", ()))  # bench.profile.plugins: modules registering the profile's own names
    datasets = [str(d) for d in _as_list(run.get("datasets", ["mnist5k"]), "run.datasets")]
    for d in datasets:
        DATASETS.get(d)
    if only_datasets is not None:
        outside = [d for d in only_datasets if d not in datasets]
        if outside:
            raise ConfigError(f"--datasets {' '.join(outside)}: not in profile {name!r}, whose datasets are "
                              f"{', '.join(datasets)}; pick among those")
    n_examples = _positive_int(examples if examples is not None else run.get("examples", 100),
                               "examples" if examples is not None else "run.examples")
    certify_examples = None
    if "certify_examples" in run:
        certify_examples = _positive_int(run["certify_examples"], "run.certify_examples")
    seed_source = "argument" if seed is not None else "profile" if "seed" in run else "os"
    run_seed = seed if seed is not None else run["seed"] if "seed" in run else os_seed()
    if isinstance(run_seed, bool) or not isinstance(run_seed, int) or run_seed < 0:
        raise ConfigError(f"run.seed must be a whole number >= 0, got {run_seed!r}")
    run_batch, batch_by_dataset = _batch_sizes(run.get("batch_size", 100), "run.batch_size")
    batch_size = 100 if run_batch is None else run_batch
    l_attack = dict(DEFAULT_L_ATTACK)
    for norm, grid in _check_keys(run.get("l_attack", {}), set(DEFAULT_L_ATTACK), "run.l_attack").items():
        l_attack[norm] = _numbers(_as_list(grid, f"run.l_attack.{norm}"), f"run.l_attack.{norm}")
    thresholds = _numbers(_as_list(run.get("thresholds", DEFAULT_THRESHOLDS), "run.thresholds"), "run.thresholds")
    overhead_draws = [_positive_int(d, "run.overhead_draws")
                      for d in _as_list(run.get("overhead_draws", [1, 10, 100, 1000]), "run.overhead_draws")]
    speed = _speed(run, autocast, channels_last)
    cudnn_benchmark = _flag(run.get("cudnn_benchmark", False), "run.cudnn_benchmark")
    pin_memory = _flag(run.get("pin_memory", True), "run.pin_memory")
    loader_workers = run.get("loader_workers", 0)
    if isinstance(loader_workers, bool) or not isinstance(loader_workers, int) or loader_workers < 0:
        raise ConfigError(f"run.loader_workers must be a whole number >= 0, got {loader_workers!r}")
    defense_entries = _defense_entries(raw)
    attack_entries = _attack_entries(raw, defense_entries)
    cells = expand_cells(datasets, defense_entries, attack_entries, examples=n_examples, seed=run_seed,
                         max_steps=max_steps, max_draws=max_draws, certify_examples=certify_examples,
                         batch_sizes=batch_by_dataset, speed=speed)
    if only_datasets is not None:
        # Expanded whole first, so every entry is checked as the full profile would be; an attack that
        # targets only the datasets left out then simply has no cell here.
        cells = [cell for cell in cells if cell.dataset in only_datasets]
    return Profile(name=_run_name(run.get("name"), name), cells=cells, batch_size=batch_size,
                   l_attack=l_attack, thresholds=thresholds, source=raw, seed=run_seed, seed_source=seed_source,
                   overhead_draws=overhead_draws, cpus_per_task=_resource(run, "cpus_per_task"),
                   gpus_per_task=_resource(run, "gpus_per_task"), speed=speed, cudnn_benchmark=cudnn_benchmark,
                   loader_workers=loader_workers, pin_memory=pin_memory)


def load_profile(name_or_path: str, **overrides: Any) -> Profile:
    """Read and resolve a shipped profile name or a TOML path."""
    name, text = read_profile_text(name_or_path)
    return parse_profile(text, name, **overrides)
