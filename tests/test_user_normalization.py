"""`input_mean` / `input_std`: a network trained on normalized inputs, evaluated right, budgets and radii in pixels."""
import sys
import textwrap

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from attacks.pgd import pgd_linf
from bench.cli.commands import main
from bench.core.data import gather, load_split, select_examples
from bench.core.errors import ConfigError
from bench.core.input_normalization import NormalizedInput
from bench.core.registry import DATASETS
from bench.core.types import ThreatModel
from bench.profile.config import parse_profile
from bench.profile.params import resolve_defense_params
from defenses.convex.defense import WongKolter
from defenses.smoothing import RandomizedSmoothing
from defenses.user_model import UserModel

# Far from the identity, as a user's own statistics may be: without them the network sees other inputs.
MEAN, STD = 0.5, 0.1
EXAMPLES = 60
NETS = textwrap.dedent('''
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
''')


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small MLP trained for 60 steps on (x - MEAN) / STD, saved as a user's weights file next to its factory."""
    folder = tmp_path_factory.mktemp("normalized")
    (folder / "normalized_nets.py").write_text(NETS)
    train = load_split("mnist5k", "train")
    x, y = gather(train, select_examples(train, 1000, seed=0))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randint(0, len(x), (100,), generator=generator)
        loss = F.cross_entropy(net((x[batch] - MEAN) / STD), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "mlp.safetensors"))
    return folder, net.eval()


@pytest.fixture
def on_path(trained, monkeypatch):
    folder, _ = trained
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("normalized_nets", None)
    return trained


@pytest.fixture(scope="module")
def digits():
    """The test digits a run with `examples = EXAMPLES`, seed 0, evaluates: (x (N, 1, 28, 28), y (N,))."""
    test = load_split("mnist5k", "test")
    return gather(test, select_examples(test, EXAMPLES, seed=0))


def user_model(folder, **params) -> UserModel:
    return UserModel(DATASETS.get("mnist5k"), factory="normalized_nets:mlp",
                     weights=str(folder / "mlp.safetensors"), **params)


PROFILE = """
[run]
examples = {examples}
seed = 0
[defenses.raw]
defense = "user_model"
params = {{ factory = "normalized_nets:mlp", weights = "{weights}" }}
[defenses.normalized]
defense = "user_model"
params = {{ factory = "normalized_nets:mlp", weights = "{weights}", input_mean = [{mean}], input_std = {std} }}
[attacks.pgd_linf]
eps = [0.05]
params = {{ steps = 10 }}
"""


def test_the_normalized_network_is_evaluated_as_trained(on_path, digits, tmp_path):
    folder, net = on_path
    x, y = digits
    with torch.no_grad():
        direct = int((net((x - MEAN) / STD).argmax(1) == y).sum())
    assert direct >= 0.7 * EXAMPLES  # the network learned something (on its own inputs)
    path = tmp_path / "norm.toml"
    path.write_text(PROFILE.format(examples=EXAMPLES, weights=folder / "mlp.safetensors", mean=MEAN, std=STD))
    assert main(["run", str(path), "--results", str(tmp_path / "r"), "--quiet", "--device", "cpu"]) == 0
    frame = pd.read_csv(next((tmp_path / "r").glob("norm-*/accuracy_under_attack.csv")))
    clean = frame[frame.attack == "clean"].set_index("defense").correct
    assert clean["normalized"] == direct
    assert clean["raw"] <= 0.5 * direct  # fed raw pixels, the same network is poor
    attacked = frame[frame.attack == "pgd_linf"].set_index("defense").correct
    assert attacked["normalized"] < clean["normalized"]  # a pixel budget of 0.05 is 0.5 in its own units


def test_a_pgd_budget_is_in_pixels(on_path, digits):
    folder, _ = on_path
    x, y = digits
    defense = user_model(folder, input_mean=MEAN, input_std=[STD])
    model = defense.starting_model().eval()
    assert isinstance(model, NormalizedInput)
    eps = 0.05
    x_adv = pgd_linf(model, x, y, threat=ThreatModel("linf", eps), steps=10,
                     generator=torch.Generator().manual_seed(0))
    pixels = (x_adv - x).flatten(1).abs().amax(dim=1)
    assert float(pixels.max()) <= eps + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    # The network itself sees the perturbation divided by std: ten times the pixel budget here.
    seen = (model.normalize(x_adv) - model.normalize(x)).flatten(1).abs().amax(dim=1)
    assert torch.allclose(seen, pixels / STD, atol=1e-4) and float(seen.max()) > eps
    with torch.no_grad():
        assert int((model(x_adv).argmax(1) == y).sum()) < int((model(x).argmax(1) == y).sum())


def folded(net: nn.Sequential) -> nn.Sequential:
    """The same function of pixels, the normalization folded into the first linear layer (W / std, b - W mean / std)."""
    first = net[1]
    layer = nn.Linear(first.in_features, first.out_features)
    with torch.no_grad():
        layer.weight.copy_(first.weight / STD)
        layer.bias.copy_(first.bias - first.weight.sum(dim=1) * MEAN / STD)
    return nn.Sequential(nn.Flatten(), layer, *list(net)[2:]).eval()


@pytest.mark.parametrize("norm, bound", [("linf", "crown_ibp"), ("l2", "crown")])
def test_convex_certificates_are_about_pixels(on_path, digits, norm, bound):
    """The normalization is a linear layer inside the bounded network: the radii equal those of the folded network."""
    folder, net = on_path
    x, _ = digits
    spec = DATASETS.get("mnist5k")
    params = dict(steps=0, norm=norm, eps=0.05 if norm == "linf" else 0.5, certify_bound=bound, bisection_steps=8)
    wrapped = WongKolter(spec, factory="normalized_nets:mlp", weights=str(folder / "mlp.safetensors"),
                         input_mean=MEAN, input_std=STD, **params)
    model = wrapped.starting_model()
    wrapped.check_model(model)
    wrapped.attach(model)
    reference = WongKolter(spec, **params)
    reference.attach(folded(net))
    pred, radius = wrapped.certify(x)
    pred_ref, radius_ref = reference.certify(x)
    assert torch.equal(pred, pred_ref) and bool((radius > 0).any())
    assert torch.allclose(radius, radius_ref, atol=1e-5)


def test_smoothing_adds_its_noise_in_pixels_before_the_normalization(on_path):
    folder, net = on_path
    defense = RandomizedSmoothing(DATASETS.get("mnist5k"), factory="normalized_nets:mlp",
                                  weights=str(folder / "mlp.safetensors"), input_mean=MEAN, input_std=STD, steps=0)
    base = defense.starting_model().body
    assert isinstance(base, NormalizedInput)
    assert all(torch.equal(a, b) for a, b in zip(base.network.state_dict().values(), net.state_dict().values(),
                                                   strict=True))


def test_without_normalization_the_keys_stay_as_they_were():
    assert "input_mean" not in resolve_defense_params("undefended", "mnist5k", {"steps": 5}, "test")
    given = resolve_defense_params("undefended", "mnist5k", {"steps": 5, "input_mean": [0.5], "input_std": 0.1},
                                   "test")
    assert given["input_mean"] == [0.5] and given["input_std"] == 0.1


BAD = """
[run]
examples = 10
[defenses.mine]
defense = "{defense}"
params = {{ steps = 5, {params} }}
"""


@pytest.mark.parametrize("defense, params, message", [
    ("undefended", "input_mean = [0.1, 0.2]", "input_mean has 2 values but the images have 1 channel(s)"),
    ("undefended", "input_std = [0.0]", "input_std must be positive"),
    ("undefended", "input_std = -1.0", "input_std must be positive"),
    ("undefended", 'input_mean = "imagenet"', "input_mean must be a number or a list of numbers"),
    ("pixeldp", "input_std = 0.5", "pixeldp does not take input_mean / input_std"),
])
def test_bad_normalizations_are_one_line(defense, params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        parse_profile(BAD.format(defense=defense, params=params), "bad")
    assert "\n" not in str(caught.value)
