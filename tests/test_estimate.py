"""`pixeldp-bench estimate`: FLOPs counted with torch.utils.flop_counter, scaled linearly, trained models once."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.cli.commands import main
from bench.profile.config import parse_profile
from bench.execution.estimate import estimate_profile, extrapolate, training_step_flops
from bench.core.registry import DATASETS, DEFENSES

TINY = """
[run]
datasets = ["mnist5k"]
examples = {examples}
seed = 0
[defenses.undefended]
params = {{ arch = "cnn_small", steps = {steps}, batch_size = 8 }}
[defenses.again]
defense = "undefended"
params = {{ arch = "cnn_small", steps = {steps}, batch_size = 8 }}
[attacks.pgd_linf]
eps = [0.1, 0.3]
params = {{ steps = 3, restarts = 1 }}
"""


def tiny(examples: int = 4, steps: int = 5):
    return parse_profile(TINY.format(examples=examples, steps=steps), "tiny")


def lines_of(estimate, kind: str):
    return [line for line in estimate.lines if line.kind == kind]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_step_is_forward_and_backward_counted_directly():
    cell = tiny().cells[0]
    step, steps = training_step_flops(cell, rows=8)  # the whole batch of 8: no scaling
    assert steps == 5
    defense = DEFENSES.get(cell.defense)(DATASETS.get(cell.dataset), **cell.defense_params)
    model = defense.build_model().train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with FlopCounterMode(display=False) as both:
        defense.loss(model, x, y, 0).backward()
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(x)
    assert step == both.get_total_flops()
    assert step == pytest.approx(3 * forward.get_total_flops(), rel=0.05)  # backward ~ twice the forward
    # A batch of 2 scaled to 8 counts the same: FLOPs are linear in the rows.
    assert training_step_flops(cell, rows=2)[0] == step


def test_scaling_is_linear_and_a_shared_model_counts_once():
    base = estimate_profile(tiny(examples=4, steps=5), 1e9, "test")
    more_steps = estimate_profile(tiny(examples=4, steps=10), 1e9, "test")
    more_examples = estimate_profile(tiny(examples=8, steps=5), 1e9, "test")
    # Two defense labels with the same parameters train one model: one training line.
    assert len(lines_of(base, "train")) == 1 and len(base.lines) == 1 + 2 * 3
    train = lines_of(base, "train")[0].flops
    assert train > 0 and lines_of(more_steps, "train")[0].flops == 2 * train
    for small, large in zip(base.lines, more_examples.lines, strict=True):
        assert large.flops == (small.flops if small.kind == "train" else 2 * small.flops)
    attacks = lines_of(base, "attack")
    predict = lines_of(base, "predict")[0].flops
    # PGD: 3 steps of forward + backward (~3 forwards each) plus the clean prediction and the judgement.
    assert 6 * predict < attacks[0].flops < 15 * predict
    assert base.total == pytest.approx(sum(base.totals().values()))


def test_extrapolation_is_exact_for_a_multiplicative_and_an_additive_count():
    def cost(counts):
        return 7 + 3 * counts["steps"] * counts["restarts"] * counts["draws"] + 5 * counts["judge_draws"]

    real = {"steps": 100, "restarts": 3, "draws": 20, "judge_draws": 40, "target_classes": 9}
    ignored = dict(real)  # target_classes is not used by `cost`: doubling it changes nothing, so it is dropped
    assert extrapolate(lambda c: cost(c), ignored, {"steps", "restarts", "draws", "target_classes"}) == \
        cost(real)


def test_device_flops_converts_to_time_exactly(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(examples=4, steps=5))
    total = estimate_profile(tiny(), 1e9, "test").total
    assert main(["estimate", str(path), "--device-flops", repr(total / 10), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"at {total / 10:.3g} FLOP/s (given by --device-flops)" in out
    grand = next(line for line in out.splitlines() if "all datasets" in line)
    assert grand.split()[-2:] == ["10.0", "s"]
    assert float(grand.split()[-3]) == pytest.approx(total / 1e12, rel=1e-3)


@pytest.mark.parametrize("argv, words", [
    (["estimate", "no-such-profile"], "unknown profile"),
    (["estimate", "smoke", "--device-flops", "0"], "--device-flops"),
    (["estimate", "smoke", "--device-flops=-6e13"], "--device-flops"),
    (["estimate", "smoke", "--device-flops", "nan"], "--device-flops"),
    (["estimate", "smoke", "--max-steps", "-1"], "--max-steps"),
])
def test_bad_inputs_are_one_line_and_exit_2(argv, words, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and words in captured.err


def test_estimates_are_finite_for_every_kind_of_cell():
    estimate = estimate_profile(tiny(), 1e9, "test")
    assert all(math.isfinite(line.flops) and line.flops > 0 for line in estimate.lines)
