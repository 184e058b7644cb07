"""Cost estimate of a profile before it runs: FLOPs per trained model and per cell, counted with
torch.utils.flop_counter on random inputs of each dataset's shape (no data files, no training), then scaled.

Method (every number is an estimate):
- training: one step (the defense's `loss` + backward on `SAMPLE_ROWS` random rows, scaled linearly to
  the batch size, plus its `after_step` hook) times the step count (--max-steps respected); a model
  shared by several cells (one model-cache key) is counted once;
- cells: the attack, the judgement and the clean prediction / certification on `CELL_ROWS` random
  examples, scaled linearly to the cell's examples; every iteration count (steps, binary_steps,
  restarts, queries, target_classes) and draw count is run at 1 and 2 and extrapolated: an attack's
  cost is a + b * (product of its iteration counts and its `draws`), any other count adds linearly.
  Attacks run against logits biased so that they never succeed: no early stop (an upper bound).
  Cells differing only in eps share one count. The overhead table's timing draws and the gradient
  probe of attack cells are not counted.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.profile.config import Profile
from bench.core.defense import CertifiedDefense, Defense, cell_defense
from bench.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from bench.core.types import AttackOutputError, Cell, canonical_json
from bench.execution.training import DrawsNoise
from bench.profile.config import ConfigError, load_profile
from bench.core.devices import parse_device

__all__ = ["SAMPLE_ROWS", "CellCost", "Estimate", "estimate_profile", "format_estimate", "gemm_rate",
           "model_key", "training_step_flops", "counted"]

SAMPLE_ROWS = 2  # random training rows actually run; a step is scaled from them to the batch size
CELL_ROWS = 1  # random test examples actually run per cell; scaled to the cell's examples
ITERATION_WORDS = ("steps", "restarts", "queries", "target_classes")
PROBE = 5  # the leading iteration count is run at up to this many iterations to fit its slope


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: its backward hooks break `torch.autograd.grad` on
    leaf inputs (every attack's gradient step), and only the global total is needed here."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def counted(function: Callable[[], Any]) -> int:
    """FLOPs that torch.utils.flop_counter counts while `function()` runs (matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    with counter:
        function()
    return int(counter.get_total_flops())


def _is_iteration(name: str) -> bool:
    return name in ITERATION_WORDS or name.endswith("_steps")


def _is_draws(name: str) -> bool:
    return name == "draws" or name.startswith("draws_") or name.endswith("_draws")


def _counts(params: dict[str, Any], eval_only: set[str] | None = None) -> dict[str, int]:
    """The integer iteration and draw counts of `params` (restricted to `eval_only` when given)."""
    return {k: v for k, v in params.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 1
            and (_is_iteration(k) or _is_draws(k)) and (eval_only is None or k in eval_only)}


def extrapolate(measure: Callable[[dict[str, int]], int], real: dict[str, int], product: set[str],
                probe: int = PROBE) -> float:
    """FLOPs at the `real` counts from runs at small counts.

    Counts in `product` multiply (cost a + b * their product, e.g. steps x restarts x draws of an
    attack; those whose doubling changes nothing are dropped): the slope b comes from the first of
    them run at min(n, `probe`) against all counts at 1 (a few steps, so that schedules with
    checkpoints are exercised). Every other count adds
    b_k * (n_k - 1), b_k measured at 2.
    """
    ones = {k: 1 for k in real}
    base = measure(ones)
    total = float(base)
    # A count the run ignores (e.g. target_classes of an untargeted loss) costs nothing when doubled.
    chosen = sorted((k for k in product & set(real) if real[k] == 1 or measure(ones | {k: 2}) != base),
                    key=lambda k: (k != "steps", k))
    if chosen:
        first = chosen[0]
        at = min(real[first], probe)
        if at > 1:
            slope = (measure(ones | {first: at}) - base) / (at - 1)
            total += slope * (math.prod(real[k] for k in chosen) - 1)
    for name in sorted(set(real) - product):
        if real[name] > 1:
            total += (measure(ones | {name: 2}) - base) * (real[name] - 1)
    return max(total, 0.0)


def model_key(cell: Cell) -> str:
    """The cell's model-cache identity: its defense config without evaluation-only parameters (as the runner)."""
    eval_only = set(DEFENSES.info(cell.defense).eval_params)
    trained = dict(cell.defense_config(),
                   defense_params={k: v for k, v in cell.defense_params.items() if k not in eval_only})
    return canonical_json(trained)


def _without_pretrained(params: dict[str, Any]) -> dict[str, Any]:
    """Defense params whose architecture is built with random weights (FLOPs do not depend on them)."""
    arch = params.get("arch")
    if isinstance(arch, str) and arch in MODELS:
        import inspect

        if "weights" in inspect.signature(MODELS.get(arch)).parameters:
            return params | {"arch_params": dict(params.get("arch_params") or {}) | {"weights": "none"}}
    return params


def _defense(cell: Cell, params: dict[str, Any] | None = None) -> Defense:
    """The cell's defense built as the runner builds it, without the user's weights file."""
    given = _without_pretrained(dict(cell.defense_params if params is None else params))
    given.pop("weights", None)
    given.pop("weights_sha256", None)
    return cell_defense(cell, given)


def _inputs(dataset: str, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (rows, C, H, W) in [0, 1] and labels (rows,) of the dataset's shape."""
    spec = DATASETS.get(dataset)
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand((rows, *spec.shape), generator=generator),
            torch.randint(0, spec.classes, (rows,), generator=generator))


def _noise_generators(model: nn.Module, defense: Defense, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, DrawsNoise) and not isinstance(module, Defense):
            module.generator = generator
    defense.step_generator = generator


def training_step_flops(cell: Cell, rows: int = SAMPLE_ROWS) -> tuple[float, int]:
    """(FLOPs of one training step at the configured batch size, steps the runner will train).

    The defense's loss + backward runs on `rows` random rows and is scaled by batch_size / rows;
    the `after_step` hook (e.g. a Parseval projection) is counted once per step.
    """
    defense = _defense(cell)
    steps = defense.train_config.steps if cell.max_steps is None else min(defense.train_config.steps, cell.max_steps)
    if steps == 0:
        return 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cell.seed)
        model = defense.build_model()
        model.train()
        _noise_generators(model, defense, torch.Generator().manual_seed(cell.seed))
        rows = min(rows, defense.train_config.batch_size)
        x, y = _inputs(cell.dataset, rows, cell.seed)
        loss_flops = counted(lambda: defense.loss(model, x, y, 0).backward())
        hook_flops = counted(lambda: defense.after_step(model))
    return loss_flops * defense.train_config.batch_size / rows + hook_flops, steps


def _attached(cell: Cell, model: nn.Module, params: dict[str, Any]) -> Defense:
    defense = _defense(cell, params)
    defense.attach(model, torch.Generator().manual_seed(cell.seed))
    return defense


def _clean_flops(cell: Cell, model: nn.Module, x: torch.Tensor, certify: bool) -> float:
    """FLOPs per example of the clean cell's certification (certify=True) or prediction."""
    eval_only = set(DEFENSES.info(cell.defense).eval_params)

    def measure(counts: dict[str, int]) -> int:
        defense = _attached(cell, model, cell.defense_params | counts)
        if certify:
            assert isinstance(defense, CertifiedDefense)
            return counted(lambda: defense.certify(x))
        return counted(lambda: defense.predict(x))

    return extrapolate(measure, _counts(cell.defense_params, eval_only), set()) / len(x)


UNBREAKABLE = 1e4


def _unbreakable(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    """Forward hook: logits (N, K) with UNBREAKABLE x their largest magnitude added to class 0 (others unchanged)."""
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        bonus = torch.zeros(output.shape[1], dtype=output.dtype, device=output.device)
        # Relative to the logits' scale: an untrained deep net (e.g. Inception-v3) has logits near 1e12.
        bonus[0] = UNBREAKABLE * (1 + float(output.detach().abs().amax()))
        return output + bonus
    return output


def _attack_flops(cell: Cell, model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs per example of an attack cell: clean prediction, the attack (extrapolated in its counts), the judgement."""
    eval_only = set(DEFENSES.info(cell.defense).eval_params)
    threat = cell.threat()
    attack = ATTACKS.get(cell.attack)
    defense = _attached(cell, model, dict(cell.defense_params))
    # An untrained model is broken by any perturbation, and attacks stop on broken examples: the
    # attack runs against a model whose logits favour class 0 by UNBREAKABLE (the true label), so it
    # never succeeds and spends every iteration -- the full cost, an upper bound.
    y = torch.zeros(len(x), dtype=torch.long)
    logits_module = getattr(model, "body", model)
    full_run = {"abort_early": False} if "abort_early" in cell.attack_params else {}

    def run_attack(counts: dict[str, int]) -> int:
        params = dict(cell.attack_params) | full_run | counts
        generator = torch.Generator().manual_seed(cell.seed)
        def call() -> None:
            # Its work is done and counted even when only the check of its output (a rounding slip) fails.
            with contextlib.suppress(AttackOutputError):
                attack(defense.model, x, y, threat=threat, generator=generator, **params)

        handle = logits_module.register_forward_hook(_unbreakable)
        try:
            return counted(call)
        finally:
            handle.remove()

    def judge(counts: dict[str, int]) -> int:
        judged = _attached(cell, model, cell.defense_params | counts)
        return counted(lambda: (judged.predict(x), judged.judge(x)))

    attack_counts = _counts(dict(cell.attack_params))
    product = {k for k in attack_counts if _is_iteration(k)} | ({"draws"} & set(attack_counts))
    total = extrapolate(run_attack, attack_counts, product)
    total += extrapolate(judge, _counts(cell.defense_params, eval_only), set())
    return total / len(x)


@dataclass(frozen=True)
class CellCost:
    """One line of the estimate: a trained model or a cell, with its FLOPs."""

    label: str
    dataset: str
    kind: str  # "train", "certify", "predict", "attack"
    flops: float
    note: str = ""


@dataclass
class Estimate:
    """Every line of a profile's estimate, the device rate used and how long estimating took."""

    lines: list[CellCost]
    device_flops: float
    rate_note: str
    seconds: float = 0.0

    def totals(self) -> dict[str, float]:
        """{dataset: FLOPs} in the profile's order."""
        out: dict[str, float] = {}
        for line in self.lines:
            out[line.dataset] = out.get(line.dataset, 0.0) + line.flops
        return out

    @property
    def total(self) -> float:
        return sum(line.flops for line in self.lines)


def estimate_profile(profile: Profile, device_flops: float, rate_note: str,
                     log: Callable[[str], None] = lambda message: None) -> Estimate:
    """Count the FLOPs of every distinct trained model and every cell of `profile` (see the module docstring)."""
    began = time.perf_counter()
    lines: list[CellCost] = []
    models: dict[str, nn.Module] = {}
    per_example: dict[str, float] = {}
    for cell in profile.cells:
        key = model_key(cell)
        if key not in models:
            log(f"training step of {cell.defense_label} on {cell.dataset}")
            step, steps = training_step_flops(cell)
            note = f"{steps} steps x {step / 1e9:.3g} GFLOP" if steps else "not trained (steps = 0)"
            lines.append(CellCost(f"{cell.defense_label} (train)", cell.dataset, "train", step * steps, note))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cell.seed)
                models[key] = _defense(cell).build_model().eval()
        model = models[key]
        x, _ = _inputs(cell.dataset, CELL_ROWS, cell.seed)
        log(f"cell {cell.label()}")
        if cell.attack == "none":
            certified = DEFENSES.info(cell.defense).certified
            certify_rows = cell.examples if cell.certify_examples is None else min(cell.certify_examples, cell.examples)
            flops = 0.0
            parts = []
            if certified:
                memo = canonical_json([key, "certify", cell.defense_params])
                if memo not in per_example:
                    per_example[memo] = _clean_flops(cell, model, x, certify=True)
                flops += per_example[memo] * certify_rows
                parts.append(f"{certify_rows} certified")
            if not certified or certify_rows < cell.examples:
                memo = canonical_json([key, "predict", cell.defense_params])
                if memo not in per_example:
                    per_example[memo] = _clean_flops(cell, model, x, certify=False)
                predicted = cell.examples - (certify_rows if certified else 0)
                flops += per_example[memo] * predicted
                parts.append(f"{predicted} predicted")
            lines.append(CellCost(cell.label(), cell.dataset, "certify" if certified else "predict", flops,
                                  ", ".join(parts)))
        else:
            # eps is left out: an attack that never succeeds spends the same at every eps.
            memo = canonical_json([key, cell.attack, cell.norm, cell.attack_params, cell.defense_params])
            if memo not in per_example:
                per_example[memo] = _attack_flops(cell, model, x)
            lines.append(CellCost(cell.label(), cell.dataset, "attack", per_example[memo] * cell.examples,
                                  f"{cell.examples} examples"))
    return Estimate(lines, device_flops, rate_note, time.perf_counter() - began)


def gemm_rate(size: int = 2048, repeats: int = 3) -> float:
    """This machine's dense fp32 GEMM rate (FLOP/s): best of `repeats` torch.mm of two size x size matrices."""
    device = parse_device("auto")
    a = torch.rand(size, size, device=device)
    b = torch.rand(size, size, device=device)
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(estimate: Estimate, profile: str) -> str:
    """The estimate as a text table: one line per model and cell, then per-dataset totals and the grand total."""
    rate = estimate.device_flops
    out = [f"estimate of profile {profile!r} at {rate:.3g} FLOP/s ({estimate.rate_note})",
           f"method: FLOPs counted with torch.utils.flop_counter (matmuls, convolutions) on {CELL_ROWS} random "
           f"example(s) per cell and {SAMPLE_ROWS} training rows, iteration and draw counts run small and "
           "extrapolated, scaled to the configured steps, batch sizes and examples; attacks never succeed (no early "
           "stop: an upper bound); each trained model counted once; times assume the device sustains F on this work "
           "(small models and Monte Carlo batches run below a GEMM's rate, so read times as lower bounds)",
           f"{'line':48s} {'dataset':10s} {'kind':8s} {'TFLOP':>12s} {'time':>10s}  note"]
    for line in estimate.lines:
        out.append(f"{line.label[:48]:48s} {line.dataset:10s} {line.kind:8s} {line.flops / 1e12:12.4g} "
                   f"{_duration(line.flops / rate):>10s}  {line.note}")
    out.append("totals:")
    for dataset, flops in estimate.totals().items():
        out.append(f"{'  ' + dataset:48s} {dataset:10s} {'total':8s} {flops / 1e12:12.4g} "
                   f"{_duration(flops / rate):>10s}")
    out.append(f"{'  all datasets':48s} {'':10s} {'total':8s} {estimate.total / 1e12:12.4g} "
               f"{_duration(estimate.total / rate):>10s}")
    out.append(f"(estimated in {estimate.seconds:.1f} s)")
    return "\n".join(out) + "\n"


def cmd_estimate(args: Any) -> int:
    """`pixeldp-bench estimate PROFILE`: print the estimate table; a bad profile or rate is one line, exit 2."""
    if args.device_flops is not None and not (math.isfinite(args.device_flops) and args.device_flops > 0):
        raise ConfigError(f"--device-flops must be a positive number of FLOP/s (e.g. 60e12), got {args.device_flops}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    profile = load_profile(args.profile, examples=args.examples, seed=args.seed if args.seed is not None else 0,
                           max_steps=args.max_steps, max_draws=args.max_draws)
    if args.device_flops is None:
        rate = gemm_rate()
        note = (f"measured: best fp32 torch.mm 2048x2048 on this machine's "
                f"{'CUDA device' if torch.cuda.is_available() else 'CPU'}; pass --device-flops for another device")
    else:
        rate, note = float(args.device_flops), "given by --device-flops"
    estimate = estimate_profile(profile, rate, note,
                                log=lambda message: print(f"counting: {message}", file=sys.stderr, flush=True))
    print(format_estimate(estimate, profile.name), end="")
    return 0


def add_parser(sub: Any) -> None:
    """Register the `estimate` subcommand on the CLI's subparsers."""
    est = sub.add_parser("estimate", help="estimate a profile's FLOPs and time per model, cell and dataset "
                         "(random inputs: no data files, no training)")
    est.add_argument("profile", help="shipped profile name or path to a .toml profile")
    est.add_argument("--device-flops", type=float, metavar="F", help="device rate in FLOP/s for the times, e.g. "
                     "60e12 (default: a measured fp32 GEMM rate of this machine)")
    est.add_argument("--examples", type=int, help="number of test examples, as for run")
    est.add_argument("--max-steps", type=int, help="cap on training steps and attack iterations, as for run")
    est.add_argument("--max-draws", type=int, help="cap on Monte Carlo draw counts, as for run")
    est.add_argument("--seed", type=int, help="seed of the random inputs and models (default 0)")
    est.add_argument("--threads", type=int, help="CPU threads for torch while counting")
    est.set_defaults(func=cmd_estimate)
