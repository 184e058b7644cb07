"""Randomized smoothing: CERTIFY matches an independent implementation; abstentions are wrong; user models smoothed."""
import copy
import statistics
import sys
import textwrap

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import binomtest

from bench.cli.commands import main
from bench.core.data import gather, load_split, select_examples
from bench.core.registry import DATASETS
from bench.reporting.tables import accuracy_frame
from bench.reporting.tables_certified import certified_frame
from bench.core.types import Cell, Record
from defenses.pixeldp.defense import PixelDP
from defenses.smoothing import ABSTAIN, RandomizedSmoothing, SmoothedClassifier, predict_from_counts

SIGMA, N0, N, ALPHA, SEED = 0.5, 20, 300, 0.001, 7


def reference_certify(base, x, sigma, n0, n, alpha, seed):
    """Cohen et al.'s CERTIFY written out example by example, replaying the documented noise order.

    With chunk_rows >= N * n the defense draws the selection noise as ONE (N, n0, C, H, W) Gaussian
    tensor, then the estimation noise as ONE (N, n, C, H, W) tensor, from the seeded generator.
    The bound is scipy's exact binomial interval at level 1 - 2 alpha (its lower end is the
    one-sided 1 - alpha Clopper-Pearson bound) and the inverse normal CDF is Python's statistics.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = []
    for draws in (n0, n):
        noise = torch.empty((x.shape[0], draws, *x.shape[1:])).normal_(0.0, sigma, generator=generator)
        with torch.no_grad():
            labels = base((noise + x.unsqueeze(1)).flatten(0, 1)).argmax(1).view(x.shape[0], draws)
        counts.append([[int((row == k).sum()) for k in range(10)] for row in labels])
    preds, radii = [], []
    for select, estimate in zip(*counts, strict=True):
        guess = max(range(10), key=lambda k: (select[k], -k))  # most votes, lowest label on ties
        p_lower = binomtest(estimate[guess], n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
        if p_lower < 0.5:
            preds.append(ABSTAIN)
            radii.append(0.0)
        else:
            preds.append(guess)
            radii.append(sigma * statistics.NormalDist().inv_cdf(p_lower) if p_lower < 1 else float("inf"))
    return preds, radii


@pytest.fixture(scope="module")
def examples():
    test = load_split("mnist5k", "test")
    return gather(test, select_examples(test, 40, seed=0))


def smoothing(base, **params):
    defense = RandomizedSmoothing(DATASETS.get("mnist5k"), sigma=SIGMA, draws_select=N0, draws_certify=N, alpha=ALPHA,
                                  **params)
    defense.attach(SmoothedClassifier(copy.deepcopy(base), SIGMA).eval(), torch.Generator().manual_seed(SEED))
    return defense


def test_certified_radii_match_an_independent_certify(trained_cnn, examples):
    x, y = examples
    defense = smoothing(trained_cnn, chunk_rows=10 ** 6)
    pred, radius = defense.certify(x)
    ref_pred, ref_radius = reference_certify(trained_cnn, x, SIGMA, N0, N, ALPHA, SEED)
    assert pred.tolist() == ref_pred
    assert torch.allclose(radius.double(), torch.tensor(ref_radius, dtype=torch.float64), atol=1e-6, rtol=0)
    # The seeded model gives both outcomes at sigma = 0.5: certified predictions and abstentions.
    assert 0 < ref_pred.count(ABSTAIN) < len(ref_pred) and max(ref_radius) > 0.3


def test_chunking_changes_only_the_noise_not_the_guarantee(trained_cnn, examples):
    """Small chunks draw the noise in other pieces: same kind of result, and the same generator gives it again."""
    x, y = examples[0][:20], examples[1][:20]
    first = smoothing(trained_cnn, chunk_rows=64).certify(x)
    again = smoothing(trained_cnn, chunk_rows=64).certify(x)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    reference = smoothing(trained_cnn, chunk_rows=10 ** 6).certify(x)

    def certified(out):
        return int(((out[0] == y) & (out[1] > 0)).sum())

    assert abs(certified(first) - certified(reference)) <= 4


def test_abstentions_count_as_wrong_in_certified_and_clean_accuracy():
    cell = Cell(dataset="mnist5k", defense="randomized_smoothing", attack="none", defense_params={"sigma": 0.5})
    records = [Record(index=0, label=3, clean_pred=ABSTAIN, adv_pred=ABSTAIN, norm=0.0, radius=0.0, seconds=0.0,
                      forward_passes=1),
               Record(index=1, label=3, clean_pred=3, adv_pred=3, norm=0.0, radius=0.3, seconds=0.0, forward_passes=1),
               Record(index=2, label=2, clean_pred=2, adv_pred=2, norm=0.0, radius=0.0, seconds=0.0, forward_passes=1)]
    frame = certified_frame([(cell, records)], [0.0, 0.1, 0.5])
    assert frame["certified"].tolist() == [2, 1, 0] and frame["n"].tolist() == [3, 3, 3]
    assert set(frame["certifier"]) == {"cohen"} and set(frame["norm"]) == {"l2"}
    clean = accuracy_frame([(cell, records)], {"l2": [0.0]})
    assert clean[clean["attack"] == "clean"]["correct"].item() == 2


def test_predict_abstains_unless_the_binomial_test_rejects():
    counts = torch.tensor([[60, 40, 0], [95, 5, 0], [0, 0, 0]]).numpy()
    assert predict_from_counts(counts, 0.001).tolist() == [ABSTAIN, 0, ABSTAIN]
    assert predict_from_counts(counts, 0.1).tolist() == [0, 0, ABSTAIN]  # 60 vs 40: p = 0.057


def test_pixeldp_evaluates_given_weights_with_its_noise_layer(tmp_path, examples):
    """A PixelDP network trained elsewhere (noise layer included) is certified as given with steps = 0."""
    from bench.execution.training import fit

    spec = DATASETS.get("mnist5k")
    params = dict(arch="cnn_small", L=0.1, draws_certify=50, draws_predict=5, parseval_iters=5)
    trained = PixelDP(spec, steps=30, **params)
    torch.manual_seed(0)
    model = trained.build_model()
    fit(trained, model, load_split("mnist5k", "train"), steps=30, seed=0, device=torch.device("cpu"), progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "pixeldp.safetensors"))
    given = PixelDP(spec, steps=0, weights=str(tmp_path / "pixeldp.safetensors"), **params)
    torch.manual_seed(1)  # a different initialisation: everything must come from the file
    loaded = given.starting_model()
    trained.attach(model.eval(), torch.Generator().manual_seed(3))
    given.attach(loaded.eval(), torch.Generator().manual_seed(3))
    x = examples[0][:10]
    assert given.sensitivity == pytest.approx(trained.sensitivity, rel=1e-6)
    for a, b in zip(trained.certify(x), given.certify(x), strict=True):
        assert torch.equal(a, b)


NETS = textwrap.dedent('''
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
''')


def test_a_user_model_is_smoothed_certified_and_attacked_with_eot(trained_cnn, tmp_path, monkeypatch):
    (tmp_path / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("nets", None)
    from defenses.undefended import Undefended

    defense = Undefended(DATASETS.get("mnist5k"), factory="nets:mlp", steps=150, lr=3e-3)
    torch.manual_seed(0)
    model = defense.build_model()
    from bench.execution.training import fit

    fit(defense, model, load_split("mnist5k", "train"), steps=150, seed=0, device=torch.device("cpu"), progress=False)
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    (tmp_path / "user.toml").write_text('''
[run]
examples = 20
thresholds = [0.0, 0.25, 0.5]
[defenses.mine_smoothed]
defense = "randomized_smoothing"
[defenses.mine_smoothed.params]
factory = "nets:mlp"
weights = "mlp.pt"
steps = 0
sigma = 0.25
draws_select = 10
draws_certify = 100
draws_attack = 50
draws_predict = 20
[attacks.pgd_l2_eot]
eps = [0.5]
params = { steps = 3, draws = 4 }
''')
    assert main(["run", str(tmp_path / "user.toml"), "--results", str(tmp_path / "r"), "--quiet",
                 "--threads", "1"]) == 0
    run_dir = next((tmp_path / "r").glob("user-*"))
    certified = pd.read_csv(run_dir / "certified_accuracy.csv")
    assert certified[["defense", "certifier", "norm"]].drop_duplicates().values.tolist() == [
        ["mine_smoothed", "cohen", "l2"]]
    counts = certified["certified"].tolist()
    assert counts[0] >= 10 and counts == sorted(counts, reverse=True)
    robust = pd.read_csv(run_dir / "robust_precision_recall.csv")
    assert set(robust["attack"]) == {"pgd_l2_eot"} and set(robust["eps"]) == {0.5}
