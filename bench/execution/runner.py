"""Runs cells: prepares (trains or loads) each defense once, attacks, judges, and stores records."""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import bench.core.models
from bench.execution.cache import ModelCache
from bench.core.data import data_root as resolve_data_root
from bench.core.data import gather, load_split, select_examples
from bench.core.defense import CertifiedDefense, Defense, cell_defense, defense_memo
from bench.core.devices import parse_device
from bench.core.errors import UserError
from bench.execution.gradient_probe import probe_gradients
from bench.execution.overhead import DRAWS, measure_prediction
from bench.core.registry import ATTACKS, DEFENSES, AttackInfo
from bench.execution.fingerprint import code_fingerprint
from bench.execution.keys import attack_code, cell_key, model_code, params_digest
from bench.execution.library_versions import cell_libraries
from bench.execution.store import ClaimOwner, Store, claim_rounds
from bench.core.subbatch import SubBatches, attack_row_bytes
from bench.execution.trained_models import TrainedModels
from bench.profile.speed import apply_speed
from bench.execution.training import CHECKPOINT_SECONDS, LoaderOptions
from bench.core.types import Cell, Record, canonical_json, checked_attack_output, derive_seed

__all__ = ["RunOptions", "Runner", "cell_code", "ModelPlan", "model_plan", "finished_cell", "heartbeat",
           "execute", "keyed", "cell_seed", "IncompleteCellError"]


@dataclass(frozen=True)
class RunOptions:
    """How to execute cells: where data and results live, on which device, how verbosely.

    Plain data, and the one list of run settings: the Ray driver hands it to every worker as it is
    (bench.execution.ray_executor), so a setting added here reaches both executors.
    """

    results_dir: Path
    device: str = "cpu"  # a bench.core.devices name; "auto" with Ray, where each worker resolves it on its own node
    data_root: Path | None = None
    download: bool = False
    batch_size: int = 100
    progress: bool = True
    max_draws: int | None = None  # --max-draws: also caps the draw counts of the overhead timings
    overhead_draws: tuple[int, ...] = DRAWS  # draw counts timed for the overhead table (profile: run.overhead_draws)
    checkpoint_seconds: float = CHECKPOINT_SECONDS  # training state is saved this often
    poll_seconds: float = 2.0  # how often a process waiting on another's cell or model looks again
    loader: LoaderOptions = field(default_factory=LoaderOptions)  # training DataLoader workers (decoded datasets)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")


def batch_records(indices: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, adv_pred: torch.Tensor,
                  norms: torch.Tensor, radius: torch.Tensor | None, seconds: float | torch.Tensor,
                  passes: int) -> list[Record]:
    """One Record per example of a batch (all tensors (n,)); `seconds` (scalar or (n,)) and `passes` per example.

    A NaN radius marks a row its clean cell did not certify (`certify_examples`): stored as None.
    Each tensor is read back once (`tolist`), not element by element: one device sync per tensor.
    """
    n = len(y)
    radii: list[float | None] = [None] * n if radius is None else [
        None if math.isnan(r) else r for r in radius.detach().double().tolist()]
    times = seconds.tolist() if isinstance(seconds, torch.Tensor) else [seconds] * n
    rows = zip(indices.tolist(), y.tolist(), pred.tolist(), adv_pred.tolist(), norms.tolist(), radii, times,
               strict=True)
    return [Record(index=int(index), label=int(label), clean_pred=int(clean), adv_pred=int(adv), norm=float(norm),
                   radius=r, seconds=float(t), forward_passes=passes)
            for index, label, clean, adv, norm, r, t in rows]


def cell_seed(cell: Cell) -> int:
    """A 63-bit seed derived from the cell's configuration (bench.execution.keys.params_digest), not from its key.

    Every cell draws its own reproducible randomness, and a change of code alone (a refactor, a
    fingerprinted comment-free edit) keeps every draw: records then differ only where results do.
    """
    return derive_seed(params_digest(cell))


class IncompleteCellError(UserError, RuntimeError):
    """A cell produced fewer records than it has examples; it is not stored."""


@dataclass(frozen=True)
class ModelPlan:
    """A cell's trained model: its cache file, its training steps (0: used as built) and the config it is keyed by."""

    path: Path
    steps: int
    config: dict[str, Any]


def model_plan(cache: ModelCache, cell: Cell, defense: Defense | None = None) -> ModelPlan:
    """The cell's ModelPlan; cells sharing a `path` share one trained model. `defense`: the cell's defense
    when already built (its training settings are read), else it is built here."""
    if defense is None:
        defense = cell_defense(cell)
    # Parameters a defense declares evaluation-only (e.g. draw counts) do not change the weights.
    eval_only = set(DEFENSES.info(cell.defense).eval_params)
    trained = dict(cell.defense_config(),
                   defense_params={k: v for k, v in cell.defense_params.items() if k not in eval_only})
    steps = defense.train_config.steps
    if cell.max_steps is not None:
        steps = min(steps, cell.max_steps)
    return ModelPlan(cache.path(trained, model_code(cell.defense, cell.defense_params)), steps, trained)


def finished_cell(cell: Cell, records: list[Record], info: dict[str, Any]) -> dict[str, Any]:
    """Check a computed cell is whole (one record per example) and add its provenance to `info`."""
    if len(records) != cell.examples or len({r.index for r in records}) != len(records):
        raise IncompleteCellError(f"cell {cell.label()} produced {len(records)} records for {cell.examples} "
                                  "examples; it was not stored (nothing else was lost: re-run to retry it)")
    return info | {"provenance": {"params": params_digest(cell), "code": cell_code(cell),
                                  "libraries": cell_libraries(cell)}}


@contextmanager
def count_forward_passes(model: nn.Module) -> Iterator[list[int]]:
    """Count examples pushed through the logits-producing part of `model` (batch rows)."""
    counter = [0]
    target = getattr(model, "body", model)

    def hook(_module, _inputs, output):
        counter[0] += int(output.shape[0])

    handle = target.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


class Runner:
    """Executes cells, reusing trained defenses and test data across cells.

    Models are trained once per model-cache key, even across processes: the trainer claims the
    key in the store, others wait for its file. Training checkpoints every
    `options.checkpoint_seconds`, so a killed run resumes its training where it stopped.
    """

    def __init__(self, store: Store, options: RunOptions, owner: ClaimOwner | None = None,
                 log: Callable[[str], None] = print):
        self.store = store
        self.options = options
        self.owner = owner or ClaimOwner.this_process()
        self.device = parse_device(options.device)
        self.log = log
        self.cache = ModelCache(options.results_dir / "models", log=log)
        self.models = TrainedModels(self.cache, store, self.owner, device=self.device, data_root=options.data_root,
                                    download=options.download, progress=options.progress,
                                    checkpoint_seconds=options.checkpoint_seconds,
                                    poll_seconds=options.poll_seconds, log=log, loader=options.loader)
        self._defenses: dict[str, tuple[Defense, dict[str, Any]]] = {}
        self._plans: dict[str, ModelPlan] = {}  # per defense configuration, like _defenses
        self._test_sets: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._certified_subsets: dict[tuple[str, int, int], torch.Tensor] = {}

    def test_examples(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (n,), x (n, C, H, W), y (n,)) of the cell's fixed stratified test subset."""
        key = (cell.dataset, cell.examples, cell.seed)
        if key not in self._test_sets:
            test = load_split(cell.dataset, "test", resolve_data_root(self.options.data_root), self.options.download)
            indices = select_examples(test, cell.examples, cell.seed)
            x, y = gather(test, indices)
            self._test_sets[key] = (indices, x, y)
        return self._test_sets[key]

    def certified_rows(self, cell: Cell, indices: torch.Tensor) -> torch.Tensor | None:
        """(n,) bool: which of the cell's examples its clean cell certifies (None: all of them).

        The subset is drawn exactly like an attack entry's own `examples`, so certificates and attacks
        on the same number of examples cover the same test images.
        """
        if cell.attack != "none" or cell.certify_examples is None or cell.certify_examples >= len(indices):
            return None
        key = (cell.dataset, cell.certify_examples, cell.seed)
        if key not in self._certified_subsets:  # every clean cell of a dataset shares it: read the split once
            test = load_split(cell.dataset, "test", resolve_data_root(self.options.data_root), self.options.download)
            self._certified_subsets[key] = select_examples(test, cell.certify_examples, cell.seed)
        return torch.isin(indices, self._certified_subsets[key])

    def defense(self, cell: Cell) -> tuple[Defense, dict[str, Any]]:
        """The trained defense of a cell (trained once, cached as safetensors) and its training info."""
        memo = defense_memo(cell)
        if memo not in self._defenses:
            self._defenses[memo] = self._prepare(cell)
        return self._defenses[memo]

    def model_plan(self, cell: Cell, defense: Defense | None = None) -> ModelPlan:
        """Where the cell's trained model is cached and how many steps train it (nothing is trained), once per
        defense configuration; `defense`: the cell's defense when already built."""
        memo = defense_memo(cell)
        if memo not in self._plans:
            self._plans[memo] = model_plan(self.cache, cell, defense)
        return self._plans[memo]

    def _prepare(self, cell: Cell) -> tuple[Defense, dict[str, Any]]:
        """Build the cell's defense, fill its model (cache or training) and attach it with seeded noise."""
        # Built once here and its plan read from it. Preflight's object is not taken over: the user's factory
        # and check_model ran on it (training it could depend on what they left there), and cells may run in
        # other processes (Ray workers) than the one that checked them.
        defense = cell_defense(cell)
        device = self.device
        with torch.random.fork_rng(devices=[]):
            # Seeded initialisation: the same cell gives the same weights whatever ran before in this process.
            torch.manual_seed(cell.seed)
            model = defense.starting_model().to(device)  # built, with the user's weights when given
        if not apply_speed(model, cell.speed):
            self.log(f"{cell.defense_label}: the speed settings {cell.speed} need a registered architecture "
                     "(an ImageClassifier); this user model runs in exact float32")
        plan = self.model_plan(cell, defense)
        info: dict[str, Any] = {"model_file": plan.path.name, "train_steps": plan.steps,
                                "parameters": bench.core.models.count_parameters(model)}
        if plan.steps == 0:
            info["loaded_from_cache"] = False  # nothing to train: the model is used as built (e.g. pretrained)
        else:
            info.update(self.models.obtain(cell, defense, model, plan.path, plan.steps, plan.config))
        # The model's noise is seeded by what trained it (its configuration), like the cells' draws.
        defense.attach(model, torch.Generator(device=device).manual_seed(derive_seed(canonical_json(plan.config))))
        return defense, info

    def forget_defenses(self, keep: Cell | None = None) -> None:
        """Drop the prepared defenses (and their device memory) except `keep`'s: a long-lived worker holds one."""
        memo = None if keep is None else defense_memo(keep)
        self._defenses = {k: v for k, v in self._defenses.items() if k == memo}

    def run_cell(self, cell: Cell, key: str) -> tuple[list[Record], dict[str, Any]]:
        """Attack (or certify) the cell's test examples batch by batch; returns records and info."""
        defense, defense_info = self.defense(cell)
        indices, x_all, y_all = self.test_examples(cell)
        certify_rows = self.certified_rows(cell, indices)
        device = self.device
        # Every random draw of the cell (attack starts, the defense's noise) is seeded by its configuration,
        # so its records never depend on which cells ran before it, where it runs, or on code edits alone.
        generator = torch.Generator(device=device).manual_seed(cell_seed(cell))
        defense.reseed(derive_seed(params_digest(cell), "defense"))
        certified = DEFENSES.info(cell.defense).certified
        attack_info = None if cell.attack == "none" else ATTACKS.info(cell.attack)
        # Sub-batches of at most the cell's batch size, fewer rows when the device's memory asks
        # (bench.core.subbatch); both generators are replayed when a sub-batch is retried smaller.
        batches = SubBatches(cell.batch_size or self.options.batch_size, device, (generator, defense.generator),
                             what=cell.label(), log=self.log)
        if attack_info is not None and device.type == "cuda":
            draws = int(cell.attack_params.get("draws", 1)) if attack_info.eot else 1
            batches.fit(attack_row_bytes(defense.attached_model(), x_all[:1].to(device), draws))
        bar = tqdm(total=len(indices), desc=cell.label(), disable=not self.options.progress, leave=False)

        def sub_batch(start: int, stop: int) -> list[Record]:
            xb = x_all[start:stop].to(device)
            yb = y_all[start:stop].to(device)
            began = time.perf_counter()
            row_seconds = None
            with count_forward_passes(defense.attached_model()) as passes:
                if attack_info is None:
                    rows = None if certify_rows is None else certify_rows[start:stop]
                    pred, radius, row_seconds = self._clean(defense, xb, certified, rows)
                    adv_pred, norms = pred, torch.zeros(len(yb))
                else:
                    pred, adv_pred, radius, norms = self._attacked(cell, defense, xb, yb, generator,
                                                                   attack_info.minimum_norm)
            seconds: float | torch.Tensor = (time.perf_counter() - began) / len(yb)
            if row_seconds is not None:
                seconds = row_seconds  # certified and predicted rows timed apart (certify_examples)
            return batch_records(indices[start:stop], yb, pred, adv_pred, norms, radius, seconds, passes[0] // len(yb))

        try:
            records = [record for part in batches.run(sub_batch, len(indices), bar.update) for record in part]
        finally:
            bar.close()
        info = self._cell_info(cell, defense, defense_info, attack_info, x_all, y_all, batches.size)
        info["sub_batches"] = {"limit": batches.limit, "sizes": batches.sizes}
        return records, info

    def _attacked(self, cell: Cell, defense: Defense, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
                  minimum_norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(clean pred (N,), adversarial pred (N,), radii (N,) or None, perturbation norms (N,)) of one batch."""
        threat = cell.threat()
        assert threat is not None  # an attack cell always has a norm
        pred = defense.predict(x)
        x_adv = ATTACKS.get(cell.attack)(defense.model, x, y, threat=threat, generator=generator,
                                         **dict(cell.attack_params))
        # The harness, not only the attack's template, checks what it judges (bench.types).
        x_adv = checked_attack_output(cell.attack_label, x_adv, x, threat)
        adv_pred, radius = defense.judge(x_adv)
        norms = threat.norm_of((x_adv - x).detach()).cpu()
        if minimum_norm:
            # Clean errors need no perturbation; attack failures count as infinitely large.
            norms = torch.where(pred.cpu() != y.cpu(), torch.zeros_like(norms), norms)
            norms = torch.where((pred.cpu() == y.cpu()) & (adv_pred.cpu() == y.cpu()),
                                torch.full_like(norms, math.inf), norms)
        return pred, adv_pred, radius, norms

    def _cell_info(self, cell: Cell, defense: Defense, defense_info: dict[str, Any], attack_info: AttackInfo | None,
                   x_all: torch.Tensor, y_all: torch.Tensor, batch: int) -> dict[str, Any]:
        """What the cell stores besides its records: training info, flags, gradient health or overhead timings."""
        device = self.device
        info = {"defense": defense_info, "device": str(device), "attack_kwargs": dict(cell.attack_params),
                "randomized": DEFENSES.info(cell.defense).randomized, "eot": bool(attack_info and attack_info.eot),
                "minimum_norm": bool(attack_info and attack_info.minimum_norm)}
        if attack_info is not None:
            # Input-gradient health for bench.reporting.checks' masking warning (one pass, noise state restored).
            info["zero_gradients"] = probe_gradients(defense, x_all[:batch].to(device), y_all[:batch].to(device))
        else:
            # Prediction time per image at 1..1000 draws for the overhead table (random state restored).
            cap = self.options.max_draws
            draws = [k for k in self.options.overhead_draws if cap is None or k <= cap] or [1]
            info["overhead"] = measure_prediction(defense, x_all, device, draws=draws)
        return info

    @staticmethod
    def _clean(defense: Defense, x: torch.Tensor, certified: bool, certify_rows: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Clean predictions (n,), radii (n,) when the defense is registered certified, per-row seconds or None.

        With `certify_rows` (n,) bool only those rows are certified (their prediction is the
        certified one); the others are predicted, with radius NaN ("not certified" in the records).
        Certification and prediction are then timed apart, so each row carries its own cost.
        """
        if not certified:
            return defense.predict(x), None, None
        assert isinstance(defense, CertifiedDefense)  # checked at registration
        if certify_rows is None:
            pred, radius = defense.certify(x)
            return pred, radius, None
        rows = certify_rows.to(x.device)
        pred = torch.empty(len(x), dtype=torch.long, device=x.device)
        radius = torch.full((len(x),), math.nan)
        seconds = torch.zeros(len(x), dtype=torch.float64)
        for chosen, certify in ((rows, True), (~rows, False)):
            if not bool(chosen.any()):
                continue
            began = time.perf_counter()
            if certify:
                certified_pred, certified_radius = defense.certify(x[chosen])
                radius[chosen.cpu()] = certified_radius.detach().cpu().to(radius.dtype)
            else:
                certified_pred = defense.predict(x[chosen])
            pred[chosen] = certified_pred.to(pred.device)
            seconds[chosen.cpu()] = (time.perf_counter() - began) / int(chosen.sum())
        return pred, radius, seconds


def execute(cells: list[tuple[str, Cell]], store: Store, options: RunOptions,
            log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every cell not yet in the store (one transaction each); returns counts of computed / reused cells.

    Cells are claimed before they are computed: a cell another live process is computing is
    skipped for now and reused once it is stored, so concurrent runs into one folder compute
    every cell once. A dead process's claims are taken over.
    """
    runner = Runner(store, options, log=log)
    computed = [0]

    def compute(claimed: Iterator[tuple[int, str, Cell]]) -> None:
        for position, key, cell in claimed:
            _compute(runner, store, position, len(cells), key, cell)
            computed[0] += 1

    def waiting(item: tuple[int, str, Cell], holder: str) -> None:
        log(f"[{item[0]}/{len(cells)}] {item[2].label()}: being computed by {holder}; will reuse its result")

    with heartbeat(store.path, runner.owner):
        reused = claim_rounds(store, runner.owner, [("cell:" + key, (position, key, cell))
                                                    for position, (key, cell) in enumerate(cells, 1)],
                              compute, poll_seconds=options.poll_seconds, waiting=waiting)
    return {"run": computed[0], "skipped": reused}


def cell_code(cell: Cell) -> dict[str, str]:
    """{"attack", "defense", "harness"}: fingerprints of the three pieces of code a cell's records depend on."""
    code = {"defense": model_code(cell.defense, cell.defense_params), "harness": code_fingerprint(Runner)}
    if cell.attack != "none":
        code["attack"] = attack_code(cell)
    return code


def keyed(cells: list[Cell]) -> list[tuple[str, Cell]]:
    """Pair each cell with its key."""
    return [(cell_key(cell, cell_code(cell)), cell) for cell in cells]


def _compute(runner: Runner, store: Store, position: int, total: int, key: str, cell: Cell) -> None:
    """Compute one claimed cell and store it; the claim is released whatever happens."""
    runner.log(f"[{position}/{total}] {cell.label()}")
    try:
        records, info = runner.run_cell(cell, key)
        store.write_cell(key, cell, records, finished_cell(cell, records, info), runner.owner)
    except BaseException:
        store.release("cell:" + key, runner.owner)
        raise


@contextmanager
def heartbeat(path: Path, owner: ClaimOwner, every: float = 60.0) -> Iterator[None]:
    """Refresh this process's claims in the background (owners on other hosts are judged by it)."""
    if str(path) == ":memory:":
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        store = Store(path)
        try:
            while not stop.wait(every):
                store.heartbeat(owner)
        finally:
            store.close()

    thread = threading.Thread(target=beat, name="claim-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
