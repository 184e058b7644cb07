"""Baseline defenses' speed: certification time per bound method, training-step cost vs undefended."""
from __future__ import annotations

import functools

import pytest
import torch

from bench.core.defense import Defense
from defenses.undefended import Undefended
from bench.core.registry import DATASETS
from bench.execution.training import make_optimizer
from defenses.convex.bounds import METHODS, certified
from defenses.convex.defense import WongKolter
from defenses.madry import Madry
from timing import best_seconds

SPEC = DATASETS.get("mnist5k")
IMAGES = 8
BATCH = 50


@pytest.fixture(scope="module")
def small_net():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    defense = WongKolter(SPEC, eps=0.1)
    defense.attach(defense.build_model())
    return defense.model


@pytest.mark.parametrize("method", METHODS)
def test_certify_batch_per_method(benchmark, small_net, method):
    """One certification (all 9 margins at eps 0.1) of IMAGES mnist-sized images on wk_small."""
    x = torch.rand(IMAGES, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = small_net(x).argmax(1)
    rounds = 1 if method in ("wong", "crown") else 5
    benchmark.pedantic(certified, args=(small_net, x, y), kwargs={"norm": "linf", "eps": 0.1, "method": method},
                       rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    benchmark.extra_info["seconds_per_image"] = benchmark.stats.stats.min / IMAGES
    print(f"{method}: {benchmark.stats.stats.min / IMAGES * 1e3:.1f} ms per image")


def _step(defense: Defense, model, optimizer, x, y) -> None:
    loss = defense.loss(model, x, y, 10_000)  # past every ramp: the full-eps loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("name,make", [
    ("madry_pgd40", lambda: Madry(SPEC, eps=0.3, attack_steps=40, step_size=0.01, check_every=0)),
    ("madry_pgd5", lambda: Madry(SPEC, eps=0.1, attack_steps=5, check_every=0)),
    ("madry_fast", lambda: Madry(SPEC, eps=0.1, fast=True, check_every=0)),
    ("wong_kolter_crown_ibp", lambda: WongKolter(SPEC, eps=0.1, bound="crown_ibp")),
    ("wong_kolter_ibp", lambda: WongKolter(SPEC, eps=0.1, bound="ibp")),
])
def test_training_step_cost_relative_to_undefended(benchmark, name, make):
    """Seconds per optimizer step (batch 50) divided by an undefended step on the same architecture."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    defense = make()
    plain = Undefended(SPEC, arch=defense.arch)
    x = torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(1))
    timings = {}
    for label, owner in (("defended", defense), ("plain", plain)):
        model = defense.build_model()
        optimizer, _ = make_optimizer(model, owner)
        timings[label] = best_seconds(functools.partial(_step, owner, model, optimizer, x, y))
    model = defense.build_model()
    optimizer, _ = make_optimizer(model, defense)
    benchmark.pedantic(_step, args=(defense, model, optimizer, x, y), rounds=2, iterations=1)
    ratio = timings["defended"] / timings["plain"]
    benchmark.extra_info.update({"relative_to_undefended": ratio, "undefended_step_seconds": timings["plain"]})
    print(f"{name} ({defense.arch}): {timings['defended'] * 1e3:.0f} ms/step, {ratio:.1f}x undefended")
    assert ratio > 1.0  # a defended step does strictly more work than a plain one
