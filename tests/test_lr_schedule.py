"""The cyclic (one-cycle) learning-rate schedule of fast adversarial training (Wong, Rice & Kolter 2020)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from bench.core.defense import TrainConfig
from bench.core.registry import DATASETS
from bench.execution.training import OneCycle, fit, make_optimizer
from defenses.undefended import Undefended

MNIST = DATASETS.get("mnist")


def _lrs(defense, steps):
    """The lr each of the first `steps` optimizer steps runs with."""
    optimizer, scheduler = make_optimizer(defense.build_model(), defense)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_cyclic_rises_to_the_peak_at_two_fifths_then_falls_to_zero():
    lrs = _lrs(Undefended(MNIST, arch="cnn_small", steps=100, lr=5e-3, schedule="cyclic"), 100)
    assert lrs[0] == pytest.approx(5e-3 / 40)  # never a step at lr 0
    assert max(lrs) == pytest.approx(5e-3) and lrs.index(max(lrs)) == 39
    assert all(a < b for a, b in zip(lrs[:40], lrs[1:40], strict=False))
    assert all(a > b for a, b in zip(lrs[39:], lrs[40:], strict=False))
    assert lrs[-1] == 0.0
    assert [OneCycle(10)(t) for t in range(10)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6,
                                                                  1 / 6, 0.0])


def test_step_schedule_is_unchanged():
    lrs = _lrs(Undefended(MNIST, arch="cnn_small", steps=10, lr=1e-3, milestones=[4]), 10)
    assert lrs == pytest.approx([1e-3] * 4 + [1e-4] * 6)


@pytest.mark.parametrize(("settings", "message"), [
    ({"schedule": "cosine"}, "unknown lr schedule 'cosine'; use 'step' or 'cyclic'"),
    ({"schedule": "cyclic", "milestones": (5,)}, "milestones belong to schedule = 'step'"),
])
def test_bad_schedules_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_a_resumed_cyclic_run_ends_where_the_uninterrupted_one_does():
    data = TensorDataset(torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                         torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1)))

    def train(resume=None, saved=None):
        defense = Undefended(MNIST, arch="cnn_small", steps=30, batch_size=16, lr=5e-3, schedule="cyclic")
        torch.manual_seed(0)
        model = defense.build_model()
        keep = None if saved is None else (lambda state: saved.append(copy.deepcopy(state)))
        fit(defense, model, data, steps=30, seed=0, device=torch.device("cpu"), progress=False, resume=resume,
            checkpoint=keep, checkpoint_seconds=0.0)
        return model

    saved: list[dict] = []
    whole = train(saved=saved)
    middle = next(state for state in saved if state["step"] == 17)
    resumed = train(resume=middle)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
