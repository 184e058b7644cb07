"""The `pixeldp` defense: noise in eval mode, seeded reproducibility, shapes, flags, and the runner path."""
from __future__ import annotations

import pytest
import torch

from bench.profile.config import parse_profile
from bench.core.registry import DATASETS, DEFENSES
from bench.execution.runner import RunOptions, execute, keyed
from bench.execution.store import Store
from defenses.pixeldp.defense import PixelDP
from defenses.pixeldp.noise import NoiseLayer
from defenses.pixeldp.sensitivity import DividedConv2d
from pixeldp_helpers import attached

SPEC = DATASETS.get("mnist5k")


def _untrained(seed: int = 0, **params) -> PixelDP:
    torch.manual_seed(0)
    defense = PixelDP(SPEC, arch="cnn_small", **params)
    defense.attach(defense.build_model(), torch.Generator().manual_seed(seed))
    return defense


def test_registration_flags_and_parameter_checks():
    info = DEFENSES.info("pixeldp")
    assert (info.family, info.randomized, info.certified, info.certifier) == ("PixelDP", True, True, "pixeldp")
    assert info.certified_norm is None  # attack_norm / mechanism choose it: PixelDP.certified_norm(params)
    assert "draws_certify" in info.eval_params and "L" not in info.eval_params
    for bad in ({"mechanism": "uniform"}, {"placement": "body"}, {"certifier": "cohen", "mechanism": "laplace"},
                {"eta": 0.0}, {"draws_certify": 0}, {"eps": 2.0}, {"certifier": "magic"}):
        with pytest.raises(ValueError):
            PixelDP(SPEC, **bad)
    assert PixelDP(SPEC, L=0.3).sigma == pytest.approx(0.3 * 2.5373, abs=1e-4)


def test_model_structure_and_noise_is_active_in_eval_mode():
    defense = _untrained(L=0.1)
    model = defense.model
    assert not model.training and isinstance(model.noise, NoiseLayer) and isinstance(model.stem, DividedConv2d)
    assert model.stem.divisor == 3.0  # ceil(5 / 2)
    assert set(model.state_dict()) == set(defense.build_model().state_dict())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        h = model.pre_noise(x)
        noisy = torch.stack([model.noise(h) - h for _ in range(200)])
    assert noisy.std().item() == pytest.approx(defense.sigma, rel=0.02)
    assert defense.sensitivity == pytest.approx(1.0, abs=0.02)  # orthogonal init + Parseval step


def test_input_placement_and_laplace_mechanism():
    defense = _untrained(L=0.1, placement="input", draws_certify=50)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(defense.model.pre_noise(x), x) and defense.sensitivity == 1.0
    pred, radius = defense.certify(x)
    assert pred.shape == (3,) and radius.shape == (3,)
    laplace = _untrained(L=0.1, mechanism="laplace", draws_certify=50)
    assert laplace.norm == "l1" and laplace.sensitivity == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        h = laplace.model.pre_noise(x)
        noise = laplace.model.noise(h.repeat(50, 1, 1, 1)) - h.repeat(50, 1, 1, 1)
    # Laplace(0, b): mean |noise| = b.
    assert noise.abs().mean().item() == pytest.approx(laplace.sigma, rel=0.03)


@pytest.mark.slow
def test_seeded_generator_reproduces_and_shapes(mnist_test):
    x = mnist_test[0][:12]
    first = attached(0.3, seed=5, draws_certify=200, draws_predict=10)
    second = attached(0.3, seed=5, draws_certify=200, draws_predict=10)
    other = attached(0.3, seed=6, draws_certify=200, draws_predict=10)
    pred1, radius1 = first.certify(x)
    pred2, radius2 = second.certify(x)
    _, radius3 = other.certify(x)
    assert torch.equal(pred1, pred2) and torch.equal(radius1, radius2)
    assert not torch.equal(radius1, radius3)
    assert pred1.shape == (12,) and radius1.shape == (12,) and pred1.dtype == torch.long
    assert torch.all(radius1 >= 0) and bool((radius1 > 0).any())
    assert first.predict(x).shape == (12,)
    adv_pred, adv_radius = first.judge(x)
    assert adv_pred.shape == (12,) and adv_radius.shape == (12,)
    # Every certifier on the same draws and the same predictions.
    pred, radii = first.certify_all(x, draws=200)
    assert set(radii) == {"pixeldp", "cohen", "renyi"}
    assert all(torch.all(torch.isfinite(r) & (r >= 0)) for r in radii.values())
    assert bool((radii["cohen"] > radii["pixeldp"]).any())


@pytest.mark.slow
def test_runner_trains_caches_and_certifies(tmp_path):
    text = """
    [run]
    datasets = ["mnist5k"]
    examples = 10
    seed = 0
    batch_size = 5
    [defenses.pdp]
    defense = "pixeldp"
    params = { L = 0.3, steps = 15, draws_certify = 40, draws_attack = 20, draws_predict = 5 }
    [defenses.pdp_cohen]
    defense = "pixeldp"
    params = { L = 0.3, steps = 15, draws_certify = 40, draws_attack = 20, draws_predict = 5, certifier = "cohen" }
    [attacks.pgd_l2]
    eps = [0.3]
    params = { steps = 2 }
    """
    profile = parse_profile(text, "tiny")
    store = Store(tmp_path / "store.sqlite")
    logs: list[str] = []
    options = RunOptions(results_dir=tmp_path, batch_size=5, progress=False)
    cells = keyed(profile.cells)
    assert execute(cells, store, options, log=logs.append) == {"run": 4, "skipped": 0}
    # The certifier is evaluation-only: one training, the second defense loads the same weights.
    assert sum(message.startswith("training") for message in logs) == 1
    assert len(list((tmp_path / "models").glob("*.safetensors"))) == 1
    records = {cell.defense_label + "/" + cell.attack: store.records(key) for key, cell in cells}
    clean = records["pdp/none"]
    assert len(clean) == 10 and all(r.radius is not None and r.radius >= 0 for r in clean)
    assert all(r.forward_passes == 40 for r in clean)
    # Same weights; each cell draws its own noise (seeded by its configuration, which names the
    # certifier), so a near-tie of this 15-step model may flip, but not more than that.
    agree = sum(r.clean_pred == s.clean_pred for r, s in zip(clean, records["pdp_cohen/none"], strict=True))
    assert agree >= 8, agree
    assert all(r.radius is not None for r in records["pdp/pgd_l2"])
    assert execute(cells, Store(tmp_path / "store.sqlite"), options, log=logs.append) == {"run": 0, "skipped": 4}
