"""Sub-batches that fit the device: a per-example function run over rows in pieces, halved on out-of-memory errors.

EOT attacks keep every draw's activations until one backward pass (100 images x 20 draws of
WRN-28-10 need ~105 GB), so a batch the profile asks for may not fit one GPU. Attacks and
certificates treat examples independently, so the runner runs them over sub-batches: sized from
the device's free memory and a measured cost per row (CUDA), or the profile's `batch_size`, and
halved whenever the device runs out of memory. Every random generator the function draws from is
restored before a retry, so a retried sub-batch sees exactly the draws it would have seen had it
been given that size from the start: records are those of a run with that `batch_size`.
"""
from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from bench.core.draws import noise_split
from bench.core.errors import UserError

__all__ = ["SubBatchMemoryError", "SubBatches", "RandomState", "is_out_of_memory", "halvings", "fit_rows",
           "free_bytes", "attack_row_bytes", "noisy_row_bytes", "rows_within", "FREE_FRACTION", "CHUNK_FREE_FRACTION"]

T = TypeVar("T")

# Share of the free device memory a sub-batch may plan to use: the rest absorbs what the per-row
# estimate misses (allocator fragmentation, cuDNN workspaces, the attack's own buffers).
FREE_FRACTION = 0.8
# Per-row buffers an attack keeps besides one forward and backward pass (x, x_adv, the best
# adversarial so far, momentum, gradients, ...), in units of one input row.
ATTACK_BUFFERS = 12
# Share of the free device memory one no-gradient post-noise forward (a Monte Carlo block) may use by default.
CHUNK_FREE_FRACTION = 0.5
_ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA out of memory")


class SubBatchMemoryError(UserError, RuntimeError):
    """Not even one example fits the device's memory."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says that the device ran out of memory (the caching allocator, cuBLAS or cuDNN)."""
    if isinstance(error, SubBatchMemoryError):
        return False  # already the final verdict of a back-off: retrying around it again cannot help
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _ALLOCATION_FAILURES)


def halvings(limit: int) -> list[int]:
    """The sizes back-off can reach from `limit`: limit, ceil(limit / 2), ..., 1 (e.g. 100, 50, 25, 13, ...)."""
    sizes = [max(1, int(limit))]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def fit_rows(limit: int, row_bytes: float, available: float) -> int:
    """The largest of `halvings(limit)` whose rows cost at most `available` bytes at `row_bytes` each (at least 1).

    Sizing from memory picks among the sizes back-off would reach, so a run sized from memory and
    a run that backed off to the same size make the same sub-batches.
    """
    for size in halvings(limit):
        if size * row_bytes <= available:
            return size
    return 1


def free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on a CUDA `device` (free plus cached but unused); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def peak_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak memory above what is allocated now while `step()` runs on a CUDA `device` (resets the peak counter)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def attack_row_bytes(model: nn.Module, x: torch.Tensor, draws: int = 1) -> float:
    """Estimated device bytes per example of an attack on `model` with x (n >= 1, C, H, W) on a CUDA device.

    Measures the peak of a forward and input-gradient pass at 1 and 3 rows (the difference cancels
    the model's fixed costs). EOT with `draws` draws keeps every draw's post-noise activations until
    its backward pass (the pre-noise part runs once per image, bench.core.draws), so the post-noise
    part's cost counts `draws` times. Adds the attack's per-row buffers. Leaves every random state
    as it was (a randomized model's probe draws noise).
    """
    device = x.device
    pre_noise, noise, post_noise = noise_split(model)

    def whole(xs: torch.Tensor) -> torch.Tensor:
        xs = xs.clone().requires_grad_(True)
        return torch.autograd.grad(model(xs).float().logsumexp(dim=1).sum(), xs)[0]

    def noisy_part(xs: torch.Tensor) -> torch.Tensor:
        h = pre_noise(xs).detach().requires_grad_(True)
        return torch.autograd.grad(post_noise(noise(h)).float().logsumexp(dim=1).sum(), h)[0]

    def per_row(step: Callable[[torch.Tensor], torch.Tensor]) -> float:
        one, three = (x[:1].expand(k, *x.shape[1:]).contiguous() for k in (1, 3))
        with torch.enable_grad():
            return max(peak_bytes(lambda: step(three), device) - peak_bytes(lambda: step(one), device), 0) / 2

    generators = [g for g in (getattr(module, "generator", None) for module in model.modules())
                  if isinstance(g, torch.Generator)]
    state = RandomState.capture(generators, device)
    try:
        cost = per_row(whole)
        if draws > 1:
            cost += (draws - 1) * per_row(noisy_part)
    finally:
        state.restore()
    return cost + ATTACK_BUFFERS * x[0].numel() * x.element_size()


def noisy_row_bytes(post_noise: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> float:
    """Device bytes one noisy row of pre-noise activations h (n, ...) costs in a post-noise forward without gradients.

    On CUDA: the measured peak of `post_noise` at 6 rows minus that at 2 (fixed costs cancel),
    per row, plus the noisy copy and its noise (two rows of h). Elsewhere: the noisy copy alone
    (h's size per row), the unit of a CPU cache budget.
    """
    row = h[0].numel() * h.element_size()
    if h.device.type != "cuda":
        return float(row)

    def peak(k: int) -> int:
        rows = h[:1].expand(k, *h.shape[1:]).contiguous()
        with torch.no_grad():
            return peak_bytes(lambda: post_noise(rows), h.device)

    return max(peak(6) - peak(2), 0) / 4 + 2 * row


def rows_within(post_noise: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, chunk_rows: int,
                chunk_bytes: int | None = None, cpu_bytes: int | None = None) -> int:
    """Noisy rows per post-noise forward of pre-noise activations h (n, ...): at most `chunk_rows`, and at most
    `chunk_bytes` at `noisy_row_bytes` per row (at least one row).

    Without `chunk_bytes` the budget is `CHUNK_FREE_FRACTION` of the free memory on CUDA, `cpu_bytes`
    on CPU (None: no budget) and none elsewhere: certification blocks are sized in bytes, so a
    model with large activations (Inception-v3) gets fewer rows per forward than a small one.
    """
    rows = max(1, chunk_rows)
    budget: float | None = chunk_bytes
    if budget is None:
        free = free_bytes(h.device)
        budget = CHUNK_FREE_FRACTION * free if free is not None else cpu_bytes if h.device.type == "cpu" else None
    if budget is None:
        return rows
    return min(rows, max(1, int(budget // max(1.0, noisy_row_bytes(post_noise, h)))))


@dataclass
class RandomState:
    """The states of some generators and of torch's global RNGs (CPU and `device`), to replay draws."""

    generators: list[tuple[torch.Generator, torch.Tensor]]
    cpu: torch.Tensor
    cuda: tuple[torch.device, torch.Tensor] | None

    @classmethod
    def capture(cls, generators: Iterable[torch.Generator | None], device: torch.device) -> RandomState:
        """Snapshot `generators` (None entries skipped, each once) and the global RNGs."""
        unique = list({id(g): g for g in generators if g is not None}.values())
        cuda = (device, torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
        return cls([(g, g.get_state()) for g in unique], torch.get_rng_state(), cuda)

    def restore(self) -> None:
        """Put every captured generator back where it was."""
        for generator, state in self.generators:
            generator.set_state(state)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


def _release_cached_memory() -> None:
    """Give the failed attempt's cached blocks back before retrying smaller (fragmentation)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class SubBatches:
    """Runs a per-example function over rows in sub-batches of at most `size` rows, halving on out-of-memory errors.

    `size` starts at `limit` (the profile's batch size), may be lowered once from the device's free
    memory (`fit`), and is remembered: after a back-off every later sub-batch of the same cell
    uses the smaller size instead of failing again.

    Args:
        limit: the most rows per sub-batch.
        device: where the function computes (the RNG of a CUDA device is restored on retries).
        generators: every generator the function draws from (the attack's, the defense's noise):
            restored before a retry, so the retried rows see the draws they would have seen.
        what: names the work in the error raised when one row does not fit.
        log: told about every back-off.
    """

    def __init__(self, limit: int, device: torch.device, generators: Sequence[torch.Generator | None] = (),
                 what: str = "this cell", log: Callable[[str], None] | None = None):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a whole number >= 1, got {limit!r}")
        self.limit = limit
        self.size = limit
        self.device = device
        self.generators = list(generators)
        self.what = what
        self.log = log
        self.sizes: list[int] = []  # every size a sub-batch ran at, in order of first use (stored in the cell info)

    def fit(self, row_bytes: float, available: float | None = None) -> int:
        """Lower `size` to what `FREE_FRACTION` of the free device memory holds at `row_bytes` per row; returns it.

        `available` defaults to the device's free memory; without one (CPU) the size is unchanged.
        """
        if available is None:
            free = free_bytes(self.device)
            if free is None:
                return self.size
            available = FREE_FRACTION * free
        self.size = min(self.size, fit_rows(self.limit, row_bytes, available))
        return self.size

    def run(self, function: Callable[[int, int], T], rows: int, done: Callable[[int], None] | None = None) -> list[T]:
        """[function(start, stop) for each sub-batch] over rows [0, rows), in order; `done(k)` after each k rows.

        On an out-of-memory error the random state is restored, cached memory released, and the
        same rows are retried at half the size; a single row that does not fit raises
        SubBatchMemoryError.
        """
        outputs: list[T] = []
        start = 0
        while start < rows:
            stop = min(start + self.size, rows)
            state = RandomState.capture(self.generators, self.device)
            failure: str | None = None
            try:
                outputs.append(function(start, stop))
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
                if not is_out_of_memory(error):
                    raise
                failure = str(error).splitlines()[0] if str(error) else type(error).__name__
            if failure is None:
                if stop - start not in self.sizes:
                    self.sizes.append(stop - start)
                if done is not None:
                    done(stop - start)
                start = stop
                continue
            # Outside the except block: the error's frames (and their tensors) are gone before retrying.
            state.restore()
            _release_cached_memory()
            if stop - start == 1:
                raise SubBatchMemoryError(
                    f"{self.what}: one example does not fit in the memory of {self.device} ({failure}); lower the "
                    "attack's `draws` or the defense's `chunk_bytes`, free the device, or run on a larger one "
                    "(or --device cpu)")
            self.size = math.ceil((stop - start) / 2)
            if self.log is not None:
                self.log(f"{self.what}: out of memory at {stop - start} examples per sub-batch; retrying with "
                         f"{self.size}")
        return outputs
