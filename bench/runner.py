"""Runs cells: prepares (trains or loads) each defense once, attacks, judges, and stores records."""
from __future__ import annotations

import hashlib
import inspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

import bench.archs
import bench.defense
import bench.models
import bench.training
from bench import __version__
from bench.cache import ModelCache, code_fingerprint
from bench.checks import probe_gradients
from bench.data import data_root as resolve_data_root
from bench.data import gather, load_split, select_examples
from bench.defense import Defense
from bench.overhead import DRAWS, measure_prediction
from bench.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from bench.store import Store
from bench.types import Cell, Record


class AttackContractError(RuntimeError):
    """An attack returned something the harness cannot accept (outside the ball or box, NaN, shape)."""


@dataclass
class RunOptions:
    """How to execute cells: where data and results live, on which device, how verbosely."""

    results_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_root: Path | None = None
    download: bool = False
    batch_size: int = 100
    progress: bool = True
    log: Callable[[str], None] = print
    max_draws: int | None = None  # --max-draws: also caps the draw counts of the overhead timings


def cell_seed(key: str) -> int:
    """A 63-bit seed derived from a cell key: every cell draws its own reproducible randomness."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


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
    """Executes cells in order, reusing trained defenses and test data across cells."""

    def __init__(self, store: Store, options: RunOptions):
        self.store = store
        self.options = options
        self.cache = ModelCache(options.results_dir / "models")
        self._defenses: dict[str, tuple[Defense, dict[str, Any]]] = {}
        self._test_sets: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def test_examples(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (n,), x (n, C, H, W), y (n,)) of the cell's fixed stratified test subset."""
        key = (cell.dataset, cell.examples, cell.seed)
        if key not in self._test_sets:
            test = load_split(cell.dataset, "test", resolve_data_root(self.options.data_root), self.options.download)
            indices = select_examples(test, cell.examples, cell.seed)
            x, y = gather(test, indices)
            self._test_sets[key] = (indices, x, y)
        return self._test_sets[key]

    def defense(self, cell: Cell) -> tuple[Defense, dict[str, Any]]:
        """The trained defense of a cell (trained once, cached as safetensors) and its training info."""
        config = cell.defense_config()
        memo = repr(sorted(config.items()))
        if memo in self._defenses:
            return self._defenses[memo]
        spec = DATASETS.get(cell.dataset)
        cls = DEFENSES.get(cell.defense)
        defense = cls(spec, **cell.defense_params)
        device = self.options.device
        with torch.random.fork_rng(devices=[]):
            # Seeded initialisation: the same cell gives the same weights whatever ran before in this process.
            torch.manual_seed(cell.seed)
            model = defense.starting_model().to(device)  # built, with the user's weights when given
        # Parameters a defense declares evaluation-only (e.g. draw counts) do not change the weights.
        eval_only = getattr(cls, "eval_params", frozenset())
        trained = dict(config, defense_params={k: v for k, v in cell.defense_params.items() if k not in eval_only})
        # The architecture's own file counts too: editing a model invalidates its cached weights.
        sources = [MODELS.get(defense.arch)] if defense.arch in MODELS else []
        path = self.cache.path(trained, code_fingerprint(cls, *sources, bench.models, bench.archs, bench.training,
                                                         bench.defense))
        steps = defense.train_config.steps
        if cell.max_steps is not None:
            steps = min(steps, cell.max_steps)
        info: dict[str, Any] = {"model_file": path.name, "train_steps": steps,
                                "parameters": bench.models.count_parameters(model)}
        if steps == 0:
            info["loaded_from_cache"] = False  # nothing to train: the model is used as built (e.g. pretrained)
        elif self.cache.load(model, path):
            info["loaded_from_cache"] = True
            stored = self.cache.metadata(path)
            info.update({k: v for k, v in stored.items() if k.startswith("train_")})
        else:
            self.options.log(f"training {cell.defense_label} on {cell.dataset} ({steps} steps, {device})")
            train = load_split(cell.dataset, "train", resolve_data_root(self.options.data_root), self.options.download)
            start = time.perf_counter()
            losses = bench.training.fit(defense, model, train, steps=steps, seed=cell.seed, device=device,
                                        progress=self.options.progress)
            seconds = time.perf_counter() - start
            info.update({"loaded_from_cache": False, "train_seconds": seconds,
                         "train_seconds_per_step": seconds / max(steps, 1),
                         "train_final_loss": losses[-1] if losses else None})
            self.cache.save(model, path, config, {k: v for k, v in info.items() if k.startswith("train_")})
        generator = torch.Generator(device=device).manual_seed(cell_seed(path.name))
        defense.attach(model, generator)
        self._defenses[memo] = (defense, info)
        return defense, info

    def _attack_kwargs(self, cell: Cell, attack: Callable) -> dict[str, Any]:
        """The cell's hyperparameters with `steps` capped by --max-steps."""
        kwargs = dict(cell.attack_params)
        if cell.max_steps is not None:
            parameters = inspect.signature(attack).parameters
            default = parameters["steps"].default if "steps" in parameters else None
            current = kwargs.get("steps", default)
            if isinstance(current, int):
                kwargs["steps"] = min(current, cell.max_steps)
        return kwargs

    def run_cell(self, cell: Cell, key: str) -> tuple[list[Record], dict[str, Any]]:
        """Attack (or certify) the cell's test examples batch by batch; returns records and info."""
        defense, defense_info = self.defense(cell)
        indices, x_all, y_all = self.test_examples(cell)
        device = self.options.device
        generator = torch.Generator(device=device).manual_seed(cell_seed(key))
        threat = cell.threat()
        attack = None if cell.attack == "none" else ATTACKS.get(cell.attack)
        meta = {} if attack is None else ATTACKS.meta(cell.attack)
        kwargs = {} if attack is None else self._attack_kwargs(cell, attack)
        records: list[Record] = []
        batch = self.options.batch_size
        bar = tqdm(range(0, len(indices), batch), desc=f"{cell.defense_label} x {cell.attack_label}"
                   + ("" if cell.eps is None else f"@{cell.eps:g}"), disable=not self.options.progress, leave=False)
        for start in bar:
            xb = x_all[start:start + batch].to(device)
            yb = y_all[start:start + batch].to(device)
            began = time.perf_counter()
            with count_forward_passes(defense.model) as passes:
                if attack is None:
                    pred, radius = self._clean(defense, xb)
                    adv_pred, norms = pred, torch.zeros(len(yb))
                else:
                    pred = defense.predict(xb)
                    x_adv = attack(defense.model, xb, yb, threat=threat, generator=generator, **kwargs)
                    self._check_output(cell, x_adv, xb, threat, meta)
                    adv_pred, radius = defense.judge(x_adv)
                    norms = threat.norm_of((x_adv - xb).detach()).cpu()
                    if meta.get("minimum_norm"):
                        # Clean errors need no perturbation; attack failures count as infinitely large.
                        norms = torch.where(pred.cpu() != yb.cpu(), torch.zeros_like(norms), norms)
                        norms = torch.where((pred.cpu() == yb.cpu()) & (adv_pred.cpu() == yb.cpu()),
                                            torch.full_like(norms, math.inf), norms)
            seconds = (time.perf_counter() - began) / len(yb)
            per_example = passes[0] // len(yb)
            for i in range(len(yb)):
                records.append(Record(
                    index=int(indices[start + i]), label=int(yb[i]), clean_pred=int(pred[i]),
                    adv_pred=int(adv_pred[i]), norm=float(norms[i]),
                    radius=None if radius is None else float(radius[i]), seconds=seconds,
                    forward_passes=per_example))
        info = {"defense": defense_info, "device": str(device), "attack_kwargs": kwargs,
                "randomized": bool(getattr(defense, "randomized", False)), "eot": bool(meta.get("eot", False)),
                "minimum_norm": bool(meta.get("minimum_norm", False))}
        if attack is not None:
            # Input-gradient health for bench.checks' masking warning (one pass, noise state restored).
            info["zero_gradients"] = probe_gradients(defense, x_all[:batch].to(device), y_all[:batch].to(device))
        if attack is None:
            # Prediction time per image at 1..1000 draws for the overhead table (random state restored).
            cap = self.options.max_draws
            draws = [k for k in DRAWS if cap is None or k <= cap] or [1]
            info["overhead"] = measure_prediction(defense, x_all, device, draws=draws)
        return records, info

    @staticmethod
    def _clean(defense: Defense, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clean predictions, certified with radii when the defense can certify."""
        if getattr(defense, "certified", False):
            pred, radius = defense.certify(x)
            return pred, radius
        return defense.predict(x), None

    @staticmethod
    def _check_output(cell: Cell, x_adv: Any, x: torch.Tensor, threat, meta: dict[str, Any]) -> None:
        """The runner, not the attack, checks that x_adv is a finite tensor in the ball and the box."""
        name = cell.attack_label
        if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
            shape = getattr(x_adv, "shape", type(x_adv).__name__)
            raise AttackContractError(f"attack {name!r} returned {shape}, expected a tensor of shape {tuple(x.shape)}")
        if not torch.isfinite(x_adv).all():
            raise AttackContractError(f"attack {name!r} returned NaN or inf pixels; check its step size and loss")
        inside = threat.contains(x_adv.detach(), x)
        if not bool(inside.all()):
            bad = int((~inside).sum())
            raise AttackContractError(f"attack {name!r} returned {bad} example(s) outside the {threat.norm} ball of "
                                      f"eps={threat.eps} or the [0,1] box; it must project its output")


def execute(cells: list[tuple[str, Cell]], store: Store, options: RunOptions) -> dict[str, int]:
    """Run every cell not yet in the store (one transaction each); returns counts of run/skipped cells."""
    runner = Runner(store, options)
    done = skipped = 0
    for position, (key, cell) in enumerate(cells, 1):
        if store.is_done(key):
            skipped += 1
            continue
        label = f"[{position}/{len(cells)}] {cell.dataset} / {cell.defense_label} / {cell.attack_label}"
        options.log(label + ("" if cell.eps is None else f" eps={cell.eps:g}"))
        records, info = runner.run_cell(cell, key)
        store.write_cell(key, cell, records, info)
        done += 1
    return {"run": done, "skipped": skipped}


def keyed(cells: list[Cell]) -> list[tuple[str, Cell]]:
    """Pair each cell with its key (config hash + package version)."""
    return [(cell.key(__version__), cell) for cell in cells]
