"""`--executor ray`: the grid as Ray tasks (one per trained model, one per cell); only the driver writes the store.

Data flow. The driver keeps today's claims (so a local run and a Ray run into one folder never
compute a cell twice), submits one training task per distinct model-cache file still missing and
one task per pending cell that depends on its model's training task, and loops on `ray.wait`,
writing each finished cell in its own SQLite transaction. Workers never open the store: SQLite's
locking is unreliable on network file systems, and a cell written by one process cannot be lost
by another.

Models reach cell tasks through the model cache when the results folder is shared (a probe file
the driver writes is visible to the worker), otherwise as the cache file's bytes through Ray's
object store; the driver also keeps a copy in its own cache so a re-run does not retrain.

A killed worker's task is retried by Ray (`max_retries`); its cell is written once because only
the driver writes, and only finished cells. A killed driver resumes like a local run: finished
cells are in the store, and claims of a dead process are taken over.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.core.atomic import write_bytes, write_text
from bench.execution.cache import ModelCache
from bench.profile.config import ConfigError
from bench.core.defense import defense_memo
from bench.profile.plugins import load_plugins
from bench.profile.speed import SpeedError, check_device, configure_backends
from bench.execution.runner import ModelPlan, RunOptions, Runner, finished_cell, heartbeat, model_plan
from bench.execution.store import ClaimOwner, Store, claim_rounds
from bench.core.types import Cell, Record
from bench.core.devices import ray_worker_device

__all__ = ["RaySettings", "check_settings", "execute_ray", "import_ray"]

PROBE_PREFIX = ".ray-shared-probe-"


@dataclass
class RaySettings:
    """Where the cluster is and what each task asks of it."""

    address: str | None = None  # None: start a local cluster in this process (`ray.init()`)
    workers: int | None = None  # local cluster only: concurrent tasks (CPUs = workers x cpus_per_task)
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None  # None: 1 when the cluster has GPUs, else 0
    plugins: list[str] = field(default_factory=list)  # [run] plugins, imported by every worker
    max_retries: int = 3  # Ray's retries of a task whose worker died
    ship_models: bool = False  # models through the object store even when workers see the results folder
    cudnn_benchmark: bool = False  # bench.profile.speed: cuDNN autotuning on the workers' GPUs


@dataclass(frozen=True)
class WorkerJob:
    """What every task of a run gets: the driver's RunOptions as they are (the run's settings, device name
    included), its RaySettings (plugins, threads, ship_models, cudnn_benchmark) and the probe file's name."""

    options: RunOptions
    ray: RaySettings
    probe: str


def import_ray() -> Any:
    """The ray module, or a ConfigError naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--executor ray needs Ray: pip install 'pixeldp-bench[ray]' (or use --executor local)"
                          ) from exc
    return ray


def check_settings(settings: RaySettings) -> None:
    """Resource numbers a user typed: positive, GPUs fractional below 1 or whole above it (Ray's rule)."""
    if not settings.cpus_per_task > 0:
        raise ConfigError(f"cpus_per_task must be positive, got {settings.cpus_per_task}")
    gpus = settings.gpus_per_task
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
        raise ConfigError(f"gpus_per_task must be 0, a fraction below 1 (e.g. 0.25: four cells share a GPU) or "
                          f"a whole number, got {gpus}")
    if settings.workers is not None and settings.workers < 1:
        raise ConfigError(f"--ray-workers must be at least 1, got {settings.workers}")
    if settings.workers is not None and (settings.address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError("--ray-workers sizes a local cluster; with --ray-address (or $RAY_ADDRESS) the cluster's "
                          "own CPUs decide: drop --ray-workers")


# ----------------------------------------------------------------------------------- worker side
_RUNNER: list[tuple[WorkerJob, Runner]] = []  # this worker's job and its Runner: one run at a time


def _worker_runner(job: WorkerJob) -> Runner:
    """This worker process's Runner (test data and the current model reused across its cells)."""
    if not _RUNNER or _RUNNER[0][0] != job:
        # One run at a time per worker: a long-lived cluster must not keep every earlier run's data and models.
        _RUNNER.clear()
        load_plugins(list(job.ray.plugins))
        torch.set_num_threads(max(1, int(job.ray.cpus_per_task)))
        results = job.options.results_dir
        if job.ray.ship_models or not (results / "models" / job.probe).exists():
            results = Path(tempfile.gettempdir()) / "pixeldp-bench-ray"  # this node's own model cache
        device = ray_worker_device(job.options.device)
        configure_backends(device, job.ray.cudnn_benchmark)
        options = replace(job.options, results_dir=results, device=str(device), progress=False)
        # Claims for training live in a private in-memory store: the driver gave this model to one task.
        _RUNNER.append((job, Runner(Store(Path(":memory:")), options, log=lambda message: None)))
    return _RUNNER[0][1]


def _check_speed(cell: Cell, device: torch.device) -> None:
    """The cell's speed settings (bench.profile.speed) must fit this worker's device (bf16 needs CUDA)."""
    try:
        check_device(cell.speed, device)
    except SpeedError as exc:
        raise ConfigError(f"{exc} (a Ray worker without a GPU got this cell: pass --gpus-per-task)") from None


def _store_model(root: Path, name: str, payload: bytes | None) -> None:
    """Write a model file that came through the object store into the cache at `root` (atomically), unless it is
    there already; used by workers (models shipped to them) and the driver (models trained on unshared workers)."""
    path = root / name
    if payload is None or path.exists():
        return
    write_bytes(path, payload)


def train_model(job: WorkerJob, cell: Cell) -> bytes | None:
    """Ray task: train (or load) `cell`'s model into the cache; its bytes when the driver cannot see that cache."""
    runner = _worker_runner(job)
    _check_speed(cell, runner.device)
    runner.defense(cell)  # trains, checkpointing into the worker's cache, and saves the model file
    runner.forget_defenses()
    if runner.options.results_dir == job.options.results_dir:
        return None  # shared results folder: the file is where the driver and every worker look
    return (runner.cache.root / runner.model_plan(cell).path.name).read_bytes()


def run_cell(job: WorkerJob, key: str, cell: Cell, model_name: str,
             model: bytes | None) -> tuple[str, list[Record], dict[str, Any]]:
    """Ray task: compute one cell (its model placed first); returns its key, records and info for the driver."""
    runner = _worker_runner(job)
    _check_speed(cell, runner.device)
    _store_model(runner.cache.root, model_name, model)
    runner.forget_defenses(keep=cell)
    records, info = runner.run_cell(cell, key)
    return key, records, finished_cell(cell, records, info)


# ----------------------------------------------------------------------------------- driver side
@dataclass
class _Progress:
    """Cells done / running / queued with an ETA, drawn by tqdm in the driver."""

    total: int
    slots: int
    enabled: bool
    bar: Any = None
    shown: tuple[int, int] = (-1, -1)

    def __post_init__(self) -> None:
        self.bar = tqdm(total=self.total, desc="cells", unit="cell", disable=not self.enabled)

    def update(self, done: int, ready: int, unfinished: int) -> None:
        """`ready`: unfinished cells whose model is trained, of which at most `slots` run at a time (Ray does
        not say which have started; the others wait in its queue)."""
        running = min(ready, self.slots)
        if (done, running) == self.shown:
            return  # redraw only on change: a log file gets one line per event, not one per second
        self.shown = (done, running)
        self.bar.n = done
        self.bar.set_postfix_str(f"running {running}, queued {unfinished - running}")

    def close(self) -> None:
        self.bar.close()


def execute_ray(cells: list[tuple[str, Cell]], store: Store, options: RunOptions, settings: RaySettings,
                log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every cell not yet in the store as Ray tasks; returns counts of computed / reused cells like `execute`."""
    check_settings(settings)
    ray = import_ray()
    owner = ClaimOwner.this_process()
    started_here = not ray.is_initialized()
    if started_here:
        init: dict[str, Any] = {"address": settings.address, "include_dashboard": False,
                                "log_to_driver": False, "logging_level": "ERROR"}
        if settings.address is None and settings.workers is not None:
            init["num_cpus"] = settings.workers * settings.cpus_per_task
        ray.init(**init)
    try:
        with heartbeat(store.path, owner):
            return _drive(ray, cells, store, options, settings, owner, log)
    finally:
        if started_here:
            ray.shutdown()


def _drive(ray: Any, cells: list[tuple[str, Cell]], store: Store, options: RunOptions, settings: RaySettings,
           owner: ClaimOwner, log: Callable[[str], None]) -> dict[str, int]:
    """Rounds of claim, submit and collect; cells a live process holds are waited for and reused, like `execute`."""
    cache = ModelCache(options.results_dir / "models", log=log)
    resources, slots = _task_setup(ray, options, settings)
    probe = _write_probe(cache.root)
    job = WorkerJob(options, settings, probe.name)
    computed = [0]

    def submit(claimed: Iterator[tuple[str, Cell]]) -> None:
        mine = list(claimed)
        try:
            computed[0] += _submit_and_collect(ray, mine, store, options, cache, job, resources, owner, slots, log)
        finally:
            for key, _ in mine:
                store.release("cell:" + key, owner)  # a no-op for written cells; frees failed ones

    def waiting(item: tuple[str, Cell], holder: str) -> None:
        log(f"{item[1].label()}: being computed by {holder}; will reuse its result")

    try:
        reused = claim_rounds(store, owner, [("cell:" + key, (key, cell)) for key, cell in cells], submit,
                              poll_seconds=options.poll_seconds, waiting=waiting)
    finally:
        probe.unlink(missing_ok=True)
    return {"run": computed[0], "skipped": reused}


def _task_setup(ray: Any, options: RunOptions, settings: RaySettings) -> tuple[dict[str, Any], int]:
    """(Ray resources per task, how many tasks run at once on this cluster)."""
    gpus = settings.gpus_per_task
    cluster = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    if options.device.startswith("cuda") and (gpus == 0 or cluster.get("GPU", 0) == 0):
        raise ConfigError(f"--device {options.device} needs GPUs, but the tasks ask for {gpus:g} and the cluster has "
                          f"{cluster.get('GPU', 0):g}; pass --gpus-per-task 1 on a GPU cluster, or --device auto")
    resources = {"num_cpus": settings.cpus_per_task, "num_gpus": gpus, "max_retries": settings.max_retries}
    slots = max(1, int(cluster.get("CPU", 1) // settings.cpus_per_task))
    if gpus > 0:
        slots = min(slots, max(1, int(cluster.get("GPU", 0) // gpus)))
    return resources, slots


def _write_probe(root: Path) -> Path:
    """A uniquely named file in the driver's model cache: a worker that sees it shares the results folder."""
    return write_text(root / f"{PROBE_PREFIX}{secrets.token_hex(8)}",
                      "the Ray driver checks whether workers share this folder\n")


def _submit_and_collect(ray: Any, pending: list[tuple[str, Cell]], store: Store, options: RunOptions,
                        cache: ModelCache, job: WorkerJob, resources: dict[str, Any], owner: ClaimOwner,
                        slots: int, log: Callable[[str], None]) -> int:
    """Submit one training task per missing model and one task per cell; write cells as they finish."""
    if not pending:
        return 0
    train_task = ray.remote(train_model).options(**resources)
    cell_task = ray.remote(run_cell).options(**resources)
    models: dict[str, Any] = {}  # model file name -> ObjectRef of its bytes (None inside: shared folder)
    training: dict[Any, str] = {}  # training task ref -> model file name
    cells_of: dict[Any, tuple[str, Cell, Any]] = {}  # cell task ref -> (key, cell, its training ref or None)
    plans: dict[str, ModelPlan] = {}  # one defense built per configuration, not per cell
    for key, cell in pending:
        memo = defense_memo(cell)
        if memo not in plans:
            plans[memo] = model_plan(cache, cell)
        plan = plans[memo]
        name = plan.path.name
        if name not in models:
            if plan.steps == 0:
                models[name] = None
            elif plan.path.exists():
                models[name] = ray.put(plan.path.read_bytes())
            else:
                models[name] = train_task.remote(job, cell)
                training[models[name]] = name
                log(f"training task: {cell.defense_label} on {cell.dataset}")
        trained_by = models[name] if models[name] in training else None
        cells_of[cell_task.remote(job, key, cell, name, models[name])] = (key, cell, trained_by)
    return _collect(ray, cells_of, training, store, options, cache, owner, slots, log)


def _collect(ray: Any, cells_of: dict[Any, tuple[str, Cell, Any]], training: dict[Any, str], store: Store,
             options: RunOptions, cache: ModelCache, owner: ClaimOwner, slots: int, log: Callable[[str], None]) -> int:
    """The driver's loop: `ray.wait`, then one transaction per finished cell; the first error is raised at the end."""
    progress = _Progress(total=len(cells_of), slots=slots, enabled=options.progress)
    waiting = list(cells_of) + list(training)
    done, first_error = 0, None
    try:
        while waiting:
            finished, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in finished:
                try:
                    if ref in training:
                        _store_model(cache.root, training[ref], ray.get(ref))  # later runs reuse it
                        continue
                    key, cell, _ = cells_of[ref]
                    _, records, info = ray.get(ref)
                    store.write_cell(key, cell, records, info, owner)
                    done += 1
                    log(f"[{done}/{len(cells_of)}] {cell.label()}")
                except Exception as exc:  # a failed task: keep writing the others, report it at the end
                    first_error = first_error or _unwrap(exc)
            unfinished = set(waiting)
            queued = [cells_of[ref][2] for ref in waiting if ref in cells_of]
            progress.update(done, ready=sum(1 for model in queued if model not in unfinished), unfinished=len(queued))
    finally:
        progress.close()
    if first_error is not None:
        raise first_error
    return done


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a RayTaskError (e.g. a ConfigError raised on a worker), else `exc`."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
