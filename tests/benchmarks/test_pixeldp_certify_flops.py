"""Certification at the hardware's limit: the paper's MNIST CNN under PixelDP at 2,000 draws, in FLOP/s.

The achieved rate counts the convolution and matmul FLOPs of certification with
torch.utils.flop_counter.FlopCounterMode (the useful work: noise draws, ReLUs and softmax are not
counted) and divides by this machine's dense fp32 GEMM rate (torch.mm, best of several square
sizes), both measured in the same run, interleaved, single-threaded. Times are CPU seconds of
the process (one intra-op thread): on a machine shared with other jobs they estimate the
unloaded wall time far better than wall clocks, which are recorded too. Goal: >= 50% of the
GEMM rate (Lecuyer et al. 2019 certify with 2,000 draws per image; issue 12).

The fraction can exceed 1: the counter charges the second conv for every 5x5 tap, but 16% of them
fall on zero padding, which oneDNN's direct convolution skips, and oneDNN's AVX-512 kernels run
closer to peak than MKL's sgemm behind torch.mm.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.core.registry import DATASETS
from defenses.pixeldp.defense import PixelDP

DRAWS = 2000
IMAGES = 8
ROUNDS = 5
GEMM_SIZES = (256, 512, 1024, 2048)
TEST_SET = 10_000  # MNIST's test images
H100_FP32_FLOPS = 60e12  # dense fp32 without TF32 (about 60 TFLOP/s on an H100 SXM)
H100_FRACTION = 0.5  # assumed share of it for batches of 11-MFLOP rows plus memory-bound noise draws


def _cpu_and_wall(fn) -> tuple[float, float]:
    began_cpu, began_wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - began_cpu, time.perf_counter() - began_wall


def _gemm_seconds() -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """Square fp32 operands per size, with the FLOPs of one product (2 n^3)."""
    g = torch.Generator().manual_seed(0)
    return {n: (torch.randn(n, n, generator=g), torch.randn(n, n, generator=g), 2.0 * n ** 3) for n in GEMM_SIZES}


def test_certify_mnist_cnn_at_2000_draws_against_gemm(benchmark):
    if benchmark.disabled:
        pytest.skip("FLOP/s ratios need --benchmark-enable -p no:xdist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        defense = PixelDP(DATASETS.get("mnist"), L=0.1, arch="mnist_cnn", draws_certify=DRAWS)
        defense.attach(defense.build_model().eval(), torch.Generator().manual_seed(0))
        x = torch.rand(IMAGES, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter:
            defense.certify(x)
        flops = counter.get_total_flops()
        gemms = _gemm_seconds()
        for a, b, _ in gemms.values():
            torch.mm(a, b)  # warm-up
        # Interleave GEMMs and certification so that load from other jobs hits both alike.
        best_gemm = {n: float("inf") for n in gemms}
        best_cpu = best_wall = float("inf")
        for _ in range(ROUNDS):
            for n, (a, b, _) in gemms.items():
                repeats = max(1, int(2e9 // gemms[n][2]))
                # Defaults bind this iteration's operands (the lambda runs at once; binding makes that explicit).
                cpu, _ = _cpu_and_wall(lambda a=a, b=b, repeats=repeats: [torch.mm(a, b) for _ in range(repeats)])
                best_gemm[n] = min(best_gemm[n], cpu / repeats)
            cpu, wall = _cpu_and_wall(lambda: defense.certify(x))
            best_cpu, best_wall = min(best_cpu, cpu), min(best_wall, wall)
        benchmark.pedantic(defense.certify, args=(x,), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)

    gemm_rates = {n: gemms[n][2] / best_gemm[n] for n in gemms}
    gemm_rate = max(gemm_rates.values())  # the best dense rate: the fraction is not flattered
    achieved = flops / best_cpu
    per_image = flops / IMAGES
    figures = {
        "images_per_s": IMAGES / best_cpu, "images_per_s_wall": IMAGES / best_wall,
        "gflop_per_image": per_image / 1e9, "achieved_gflops": achieved / 1e9, "gemm_gflops": gemm_rate / 1e9,
        "fraction_of_gemm": achieved / gemm_rate,
        "test_set_minutes_here": TEST_SET * best_cpu / IMAGES / 60,
        "test_set_seconds_h100_estimate": TEST_SET * per_image / (H100_FP32_FLOPS * H100_FRACTION),
    }
    counts = counter.get_flop_counts()["Global"]
    figures.update({f"gflop_per_image_{op.__name__.split('.')[0]}": c / IMAGES / 1e9 for op, c in counts.items()})
    benchmark.extra_info.update(figures)
    benchmark.extra_info.update({f"gemm_gflops_{n}": r / 1e9 for n, r in gemm_rates.items()})
    print({k: round(v, 3) for k, v in figures.items()},
          {n: round(r / 1e9, 1) for n, r in gemm_rates.items()})
    # 2 x (conv 5x5x32->64 at 7x7 + FC 3136->1024 + FC 1024->10) per draw: 11.46 MFLOP, x 2,000 draws.
    assert abs(per_image / DRAWS - 11.46e6) < 0.05e6
    assert figures["fraction_of_gemm"] >= 0.5
